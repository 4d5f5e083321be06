/**
 * `dipsy sample`: one image from explicit reference images, for trying guidance weights and
 * adapter scales by hand. Everything the main job chooses at random (references, augmentation,
 * seed) is given on the command line instead.
 */
import { existsSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import type { Device } from "../ffi/mod.ts";
import { CliError, type Command, parseFlags } from "./command.ts";

import { DEFAULT_IMAGE_ENCODER, DEFAULT_IP_ADAPTER, DEFAULT_MODEL } from "../core/config.ts";

const USAGE = `usage: deno task dipsy sample --prompt TEXT --seed S --out OUT.png [options]

Generates one image with explicit reference images.

required:
  --prompt TEXT            text prompt (the negative text prompt is always "")
  --seed S                 initial-noise seed (as torch.Generator().manual_seed(S) on the CPU)
  --out FILE               output image: .png, .jpg/.jpeg or .webp
  --positive IMG           positive reference image (guidances that use images)
  --negative IMG           negative reference image (guidances with a negative term, e.g. dipsy)

options:
  --latents-out FILE       also save the final latents (float32) as safetensors
  --model REF              "tiny" (embedded random model), a diffusers SD1.5 folder, or a Hub id
                           org/name[@revision] (default ${DEFAULT_MODEL})
  --ip-adapter REF         an h94-layout .safetensors file, or a file in a Hub repo:
                           org/name/path or org/name@revision:path (default
                           ${DEFAULT_IP_ADAPTER})
  --image-encoder REF      the adapter's CLIP image encoder folder, or one in a Hub repo
                           (default ${DEFAULT_IMAGE_ENCODER})
  --guidance NAME          guidance plugin (default dipsy; \`dipsy generate --list\` lists them)
  --guidance-opt K=V       guidance option, repeatable; V is JSON or a string
                           (e.g. textScale=7.5 negativeScale=4 interval=[0.2,0.8])
  --sampler NAME           dpm-solver++ (default), ddim or euler
  --steps N                denoising steps (default 50)
  --width W, --height H    output size in pixels (default: the model's, 512 for SD1.5)
  --dtype f32|f16|bf16     model precision (default f16 on CUDA, f32 on the CPU)
  --device cpu|cuda[:N]    (default cuda when available)
  --force                  overwrite existing output files
  -h, --help               this text`;

const IMAGE_FORMATS: Record<string, "png" | "jpeg" | "webp"> = {
  png: "png",
  jpg: "jpeg",
  jpeg: "jpeg",
  webp: "webp",
};

export interface SampleArgs {
  prompt: string;
  seed: number;
  out: string;
  format: "png" | "jpeg" | "webp";
  latentsOut: string | null;
  positive: string | null;
  negative: string | null;
  model: string;
  ipAdapter: string | null;
  imageEncoder: string | null;
  guidance: string;
  guidanceOptions: Record<string, unknown>;
  sampler: string;
  steps: number;
  width: number | null;
  height: number | null;
  dtype: "f32" | "f16" | "bf16" | null;
  device: Device | null;
  force: boolean;
}

function positiveInt(flag: string, v: string | undefined): number | null {
  if (v === undefined) return null;
  if (!/^\d+$/.test(v) || Number(v) < 1 || !Number.isSafeInteger(Number(v))) {
    throw new CliError(`--${flag} must be a positive integer, got "${v}"`);
  }
  return Number(v);
}

function optionValue(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

const FLAGS = {
  help: { type: "boolean", short: "h" },
  prompt: { type: "string" },
  seed: { type: "string" },
  out: { type: "string" },
  "latents-out": { type: "string" },
  positive: { type: "string" },
  negative: { type: "string" },
  model: { type: "string" },
  "ip-adapter": { type: "string" },
  "image-encoder": { type: "string" },
  guidance: { type: "string" },
  "guidance-opt": { type: "string", multiple: true },
  sampler: { type: "string" },
  steps: { type: "string" },
  width: { type: "string" },
  height: { type: "string" },
  dtype: { type: "string" },
  device: { type: "string" },
  force: { type: "boolean" },
} as const;

/** Parses and checks the arguments (no native library, no files read); null for --help. */
export function parseSampleArgs(args: string[]): SampleArgs | null {
  const v = parseFlags(args, FLAGS);
  if (v.help) return null;
  for (const flag of ["prompt", "seed", "out"] as const) {
    if (v[flag] === undefined) throw new CliError(`--${flag} is required (see --help)`);
  }
  const seedText = v.seed!;
  if (!/^\d+$/.test(seedText) || !Number.isSafeInteger(Number(seedText))) {
    throw new CliError(`--seed must be a non-negative integer, got "${seedText}"`);
  }
  const out = v.out!;
  const format = IMAGE_FORMATS[out.slice(out.lastIndexOf(".") + 1).toLowerCase()];
  if (!out.includes(".") || !format) {
    throw new CliError(`--out ${out}: use a .png, .jpg, .jpeg or .webp file name`);
  }
  const latentsOut = v["latents-out"] ?? null;
  if (latentsOut !== null && !latentsOut.endsWith(".safetensors")) {
    throw new CliError(`--latents-out ${latentsOut}: the file name must end in .safetensors`);
  }
  if (latentsOut !== null && resolve(latentsOut) === resolve(out)) {
    throw new CliError("--out and --latents-out name the same file");
  }
  const dtype = v.dtype ?? null;
  if (dtype !== null && dtype !== "f32" && dtype !== "f16" && dtype !== "bf16") {
    throw new CliError(`--dtype must be f32, f16 or bf16, got "${dtype}"`);
  }
  const device = (v.device ?? null) as Device | null;
  if (device !== null && device !== "cpu" && !/^cuda(:\d+)?$/.test(device)) {
    throw new CliError(`--device must be cpu, cuda or cuda:N, got "${device}"`);
  }
  const guidanceOptions: Record<string, unknown> = {};
  for (const kv of v["guidance-opt"] ?? []) {
    const eq = kv.indexOf("=");
    if (eq <= 0) throw new CliError(`--guidance-opt takes KEY=VALUE, got "${kv}"`);
    guidanceOptions[kv.slice(0, eq)] = optionValue(kv.slice(eq + 1));
  }
  const model = v.model ?? DEFAULT_MODEL;
  if (model === "tiny" && (v["ip-adapter"] !== undefined || v["image-encoder"] !== undefined)) {
    throw new CliError(
      "--model tiny embeds its own IP-Adapter and image encoder: drop --ip-adapter/--image-encoder",
    );
  }
  return {
    prompt: v.prompt!,
    seed: Number(seedText),
    out,
    format,
    latentsOut,
    positive: v.positive ?? null,
    negative: v.negative ?? null,
    model,
    ipAdapter: v["ip-adapter"] ?? null,
    imageEncoder: v["image-encoder"] ?? null,
    guidance: v.guidance ?? "dipsy",
    guidanceOptions,
    sampler: v.sampler ?? "dpm-solver++",
    steps: positiveInt("steps", v.steps) ?? 50,
    width: positiveInt("width", v.width),
    height: positiveInt("height", v.height),
    dtype,
    device,
    force: v.force ?? false,
  };
}

// ---------------------------------------------------------------------------------------------
// Model references

// References resolve as in `dipsy generate` (app/models.ts): a local path, a Hub id, or a path
// inside a Hub repo, `org/name/path` or `org/name@revision:path`.

async function resolveSd15(ref: string): Promise<string> {
  const { resolveFolderRef, SD15_FILES } = await import("../app/models.ts");
  return await resolveFolderRef(ref, SD15_FILES);
}

async function resolveAdapterFile(ref: string): Promise<string> {
  if (existsSync(ref) && !ref.endsWith(".safetensors")) {
    throw new CliError(
      `--ip-adapter ${ref}: only .safetensors IP-Adapter files are loaded (pickled .bin ` +
        "checkpoints can run code when unpickled)",
    );
  }
  const { resolveFileRef } = await import("../app/models.ts");
  return await resolveFileRef(ref);
}

async function resolveEncoderDir(ref: string): Promise<string> {
  const { resolveFolderRef, HF_MODEL_FILES } = await import("../app/models.ts");
  return await resolveFolderRef(ref, HF_MODEL_FILES);
}

/** A missing model or unreadable input is the user's to fix: report it without a stack trace. */
async function asCliError<T>(flag: string, fn: () => Promise<T>): Promise<T> {
  const { ModelNotFoundError } = await import("../core/hub.ts");
  const { ImageDecodeError } = await import("../core/image.ts");
  const { RunError } = await import("../core/generate.ts");
  try {
    return await fn();
  } catch (e) {
    if (
      e instanceof ModelNotFoundError || e instanceof ImageDecodeError || e instanceof RunError
    ) {
      throw new CliError(`${flag}: ${e.message}`);
    }
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// Output

/**
 * Lets `write` fill a temporary file next to `path`, then moves it into place, so a reader never
 * sees a partial file.
 * Without `force` an existing file is never replaced, even one created while this ran.
 */
async function writeAtomic(
  path: string,
  force: boolean,
  write: (tmp: string) => Promise<void> | void,
): Promise<void> {
  const tmp = join(dirname(path), `.${basename(path)}.tmp-${Deno.pid}-${Date.now()}`);
  try {
    await write(tmp);
    if (force) {
      await Deno.rename(tmp, path);
    } else {
      try {
        // A hard link fails if the target exists: no window in which another file is clobbered.
        await Deno.link(tmp, path);
      } catch (e) {
        if (e instanceof Deno.errors.AlreadyExists) {
          throw new CliError(`${path} exists (pass --force to overwrite it)`);
        }
        throw e;
      }
    }
  } finally {
    await Deno.remove(tmp).catch(() => {});
  }
}

function checkWritable(path: string, force: boolean, flag: string): void {
  if (!force && existsSync(path)) {
    throw new CliError(`--${flag} ${path} exists (pass --force to overwrite it)`);
  }
  const dir = dirname(resolve(path));
  if (!existsSync(dir)) throw new CliError(`--${flag} ${path}: folder ${dir} does not exist`);
}

// ---------------------------------------------------------------------------------------------

/** Flags named in messages about a core/sample.ts field. */
function flagOf(field: string): string {
  if (field.startsWith("guidanceOptions")) return "--guidance-opt";
  return `--${field}`;
}

async function asFlagError<T>(fn: () => T | Promise<T>): Promise<T> {
  const { SampleError } = await import("../core/sample.ts");
  try {
    return await fn();
  } catch (e) {
    if (e instanceof SampleError) throw new CliError(`${flagOf(e.field)}: ${e.message}`);
    throw e;
  }
}

export async function runSample(a: SampleArgs): Promise<void> {
  checkWritable(a.out, a.force, "out");
  if (a.latentsOut) checkWritable(a.latentsOut, a.force, "latents-out");

  await import("../plugins/guidance/mod.ts");
  await import("../plugins/samplers/mod.ts");
  const { ops, runtimeInfo, saveSafetensors } = await import("../ffi/mod.ts");
  const { readImage, encodeImage } = await import("../core/image.ts");
  const { prepareSample, sampleImage, sampleSize } = await import("../core/sample.ts");
  const { Sd15Backbone } = await import("../plugins/sd15/backbone.ts");

  const spec = {
    prompt: a.prompt,
    seed: a.seed,
    guidance: a.guidance,
    guidanceOptions: a.guidanceOptions,
    sampler: a.sampler,
    steps: a.steps,
    width: a.width,
    height: a.height,
  };
  const prepared = await asFlagError(() =>
    prepareSample(spec, { positive: a.positive !== null, negative: a.negative !== null })
  );
  const { guidance, adapters } = prepared;
  if (prepared.ignored.length) {
    const flags = prepared.ignored.map((k) => `--${k}`).join(" ");
    console.error(`note: guidance "${guidance.name}" ignores ${flags}`);
  }

  const positive = guidance.usesImages
    ? await asCliError("--positive", () => readImage(a.positive!))
    : null;
  const negative = guidance.usesNegative
    ? await asCliError("--negative", () => readImage(a.negative!))
    : null;

  const info = runtimeInfo();
  const device: Device = a.device ?? (info.cuda_available ? "cuda" : "cpu");
  if (device !== "cpu" && !info.cuda_available) {
    throw new CliError(`--device ${device}: this libtorch build has no usable CUDA device`);
  }
  const dtype = a.dtype ?? (device === "cpu" ? "f32" : "f16");

  const tiny = a.model === "tiny";
  const paths = tiny ? { model: "tiny" } : {
    model: await asCliError("--model", () => resolveSd15(a.model)),
    ...(adapters > 0
      ? {
        ipAdapter: await asCliError(
          "--ip-adapter",
          () => resolveAdapterFile(a.ipAdapter ?? DEFAULT_IP_ADAPTER),
        ),
        imageEncoder: await asCliError(
          "--image-encoder",
          () => resolveEncoderDir(a.imageEncoder ?? DEFAULT_IMAGE_ENCODER),
        ),
      }
      : {}),
  };
  // The size is checked against the model's config files before any weights load.
  const { modelGeometry } = await import("../app/models.ts");
  const geometry = await modelGeometry(paths);
  await asFlagError(() => sampleSize(geometry, spec));

  const t0 = performance.now();
  using bb = tiny
    ? Sd15Backbone.tiny({ dtype, device, adapters })
    : await Sd15Backbone.load(paths, { dtype, device, adapters });
  const loaded = performance.now();
  const tty = Deno.stderr.isTerminal();
  const result = await asFlagError(() =>
    sampleImage(bb, prepared, { positive, negative }, {
      onStep: (i, n) => {
        if (tty) Deno.stderr.writeSync(new TextEncoder().encode(`\rstep ${i + 1}/${n}`));
      },
    })
  );
  using latents = result.latents;
  if (tty) Deno.stderr.writeSync(new TextEncoder().encode("\n"));
  const { width, height } = result;
  const bytes = await encodeImage(result.image, a.format);
  await writeAtomic(a.out, a.force, (tmp) => Deno.writeFile(tmp, bytes));
  if (a.latentsOut) {
    const meta: Record<string, string> = {
      prompt: a.prompt,
      seed: String(a.seed),
      guidance: guidance.name,
      guidance_options: JSON.stringify(a.guidanceOptions),
      sampler: a.sampler,
      steps: String(a.steps),
      width: String(width),
      height: String(height),
      dtype,
      models: JSON.stringify(bb.modelIds),
      ...(a.positive ? { positive: a.positive } : {}),
      ...(a.negative ? { negative: a.negative } : {}),
    };
    using host = ops.to(latents, "f32", "cpu");
    await writeAtomic(
      a.latentsOut,
      a.force,
      (tmp) => saveSafetensors(tmp, { latents: host }, meta),
    );
  }
  const s = (ms: number) => (ms / 1000).toFixed(1);
  console.log(
    `wrote ${a.out}${a.latentsOut ? ` and ${a.latentsOut}` : ""} (${width}x${height}, ` +
      `${guidance.name}, ${a.sampler} ${a.steps} steps, ${device} ${dtype}; load ` +
      `${s(loaded - t0)} s, sampling ${s(performance.now() - loaded)} s)`,
  );
}

export const command: Command = {
  summary: "generate one image from explicit reference images",
  usage: USAGE,
  flags: FLAGS,
  async run(args) {
    const a = parseSampleArgs(args);
    if (!a) {
      console.log(USAGE);
      return 0;
    }
    await runSample(a);
    return 0;
  },
};
