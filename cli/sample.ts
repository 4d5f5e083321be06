/**
 * `dipsy sample`: one image from explicit reference images, for trying guidance weights and
 * adapter scales by hand. Everything the main job chooses at random (references, augmentation,
 * seed) is given on the command line instead.
 */
import { existsSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import type { Device } from "../ffi/mod.ts";
import {
  ConfigError,
  DEFAULT_IMAGE_ENCODER,
  DEFAULT_IP_ADAPTER,
  DEFAULTS,
  parseSets,
} from "../core/config.ts";
import { CliError, defineCommand, type FlagValues } from "./command.ts";
import { MODEL_FLAGS, parseSize, PLACEMENT_FLAGS, SETTING_FLAGS } from "./generate.ts";
import { loadPlugins, pluginOptionsHelp } from "./plugin_docs.ts";

const registry = await loadPlugins();

const SECTIONS = {
  "required:": {
    prompt: { value: "TEXT", help: 'text prompt (the negative text prompt is always "")' },
    seed: {
      value: "S",
      help: "initial-noise seed (as torch.Generator().manual_seed(S) on the CPU)",
    },
    out: { value: "FILE", help: "output image: .png, .jpg/.jpeg or .webp" },
    positive: { value: "IMG", help: "positive reference image (guidances that use images)" },
    negative: {
      value: "IMG",
      help: "negative reference image (guidances with a negative term, e.g. dipsy)",
    },
  },
  "options:": {
    "latents-out": { value: "FILE", help: "also save the final latents (float32) as safetensors" },
    ...MODEL_FLAGS,
    tiny: { help: "the embedded tiny model (--model tiny; noise images, for trying things out)" },
    guidance: SETTING_FLAGS.guidance,
    sampler: SETTING_FLAGS.sampler,
    set: {
      value: "KEY=VALUE",
      multiple: true,
      help: "a guidance or sampler option (repeatable), as generate takes it: " +
        "guidance.KEY=V or sampler.KEY=V; the default plugins' options are listed below",
    },
    steps: SETTING_FLAGS.steps,
    size: SETTING_FLAGS.size,
    dtype: PLACEMENT_FLAGS.dtype,
    device: PLACEMENT_FLAGS.device,
    force: { help: "overwrite existing output files" },
    "guidance-opt": {
      value: "K=V",
      multiple: true,
      help: "a guidance option",
      deprecated: "--set guidance.K=V",
    },
    width: { value: "W", help: "output width", deprecated: "--size WxH" },
    height: { value: "H", help: "output height", deprecated: "--size WxH" },
  },
} as const;

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
  negativeIpAdapter: string | null;
  imageEncoder: string | null;
  guidance: string;
  guidanceOptions: Record<string, unknown>;
  sampler: string;
  samplerOptions: Record<string, unknown>;
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

/** `--set guidance.K=V` and `--set sampler.K=V`, values read as generate reads them. */
function pluginSets(specs: readonly string[]) {
  let layer;
  try {
    layer = parseSets(specs);
  } catch (e) {
    if (e instanceof ConfigError) throw new CliError(e.message);
    throw e;
  }
  const other = Object.keys(layer.values);
  if (other.length || layer.pairs) {
    throw new CliError(
      `--set ${other[0] ?? "pairs.*"}: sample takes guidance.KEY=V and sampler.KEY=V ` +
        "(its other settings are flags)",
    );
  }
  return { guidance: layer.guidance, sampler: layer.sampler };
}

type SampleFlags = FlagValues<typeof SECTIONS["required:"] & typeof SECTIONS["options:"]>;

/** Parses and checks the arguments (no native library, no files read); null for --help. */
export function parseSampleArgs(args: string[]): SampleArgs | null {
  const v = command.parse(args);
  return v.help ? null : sampleArgs(v);
}

function sampleArgs(v: SampleFlags): SampleArgs {
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
  const dtype = v.dtype === "auto" ? null : v.dtype ?? null;
  if (dtype !== null && dtype !== "f32" && dtype !== "f16" && dtype !== "bf16") {
    throw new CliError(`--dtype must be auto, f32, f16 or bf16, got "${dtype}"`);
  }
  const device = (v.device === "auto" ? null : v.device ?? null) as Device | null;
  if (device !== null && device !== "cpu" && !/^cuda(:\d+)?$/.test(device)) {
    throw new CliError(`--device must be auto, cpu, cuda or cuda:N, got "${device}"`);
  }
  const sets = pluginSets([
    ...(v["guidance-opt"] ?? []).map((kv) => `guidance.${kv}`),
    ...(v.set ?? []),
  ]);
  if (v.tiny && v.model !== undefined && v.model !== "tiny") {
    throw new CliError(`--tiny and --model ${v.model}: give one of them`);
  }
  const model = v.tiny ? "tiny" : v.model ?? DEFAULTS.model;
  const adapterFlags = ["ip-adapter", "negative-ip-adapter", "image-encoder"] as const;
  if (model === "tiny" && adapterFlags.some((f) => v[f] !== undefined)) {
    throw new CliError(
      "--model tiny embeds its own IP-Adapter and image encoder: drop --ip-adapter, " +
        "--negative-ip-adapter and --image-encoder",
    );
  }
  if (v.size !== undefined && (v.width !== undefined || v.height !== undefined)) {
    throw new CliError("--size and --width/--height: give --size only");
  }
  const size = v.size === undefined ? { width: v.width, height: v.height } : parseSize(v.size);
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
    negativeIpAdapter: v["negative-ip-adapter"] ?? null,
    imageEncoder: v["image-encoder"] ?? null,
    guidance: sets.guidance?.name ?? v.guidance ?? DEFAULTS.guidance.name,
    guidanceOptions: sets.guidance?.options ?? {},
    sampler: sets.sampler?.name ?? v.sampler ?? DEFAULTS.sampler.name,
    samplerOptions: sets.sampler?.options ?? {},
    steps: positiveInt("steps", v.steps) ?? DEFAULTS.steps,
    width: positiveInt(v.size === undefined ? "width" : "size", size.width),
    height: positiveInt(v.size === undefined ? "height" : "size", size.height),
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

async function resolveAdapterFile(ref: string, flag = "--ip-adapter"): Promise<string> {
  if (existsSync(ref) && !ref.endsWith(".safetensors")) {
    throw new CliError(
      `${flag} ${ref}: only .safetensors IP-Adapter files are loaded (pickled .bin ` +
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
  if (field.startsWith("guidanceOptions.")) return `--set guidance.${field.slice(16)}`;
  if (field === "guidanceOptions") return "--set guidance.*";
  if (field === "width" || field === "height") return "--size";
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
    samplerOptions: a.samplerOptions,
    steps: a.steps,
    width: a.width,
    height: a.height,
  };
  const given = { positive: a.positive !== null, negative: a.negative !== null };
  const firstLook = await asFlagError(() => prepareSample(spec, given, { registry }));
  const { guidance, adapters } = firstLook;
  if (firstLook.ignored.length) {
    const flags = firstLook.ignored.map((k) => `--${k}`).join(" ");
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
    ...(adapters > 1 && a.negativeIpAdapter !== null
      ? {
        negativeIpAdapter: await asCliError(
          "--negative-ip-adapter",
          () => resolveAdapterFile(a.negativeIpAdapter!, "--negative-ip-adapter"),
        ),
      }
      : {}),
  };
  // The size and the sampler's options are checked against the model's config files before
  // any weights load.
  const { modelGeometry, schedulerConfigOf } = await import("../app/models.ts");
  const geometry = await modelGeometry(paths);
  await asFlagError(() => sampleSize(geometry, spec));
  const schedulerConfig = await schedulerConfigOf(paths);
  const prepared = await asFlagError(() =>
    prepareSample(spec, given, { registry, schedulerConfig })
  );

  const t0 = performance.now();
  using bb = tiny
    ? Sd15Backbone.tiny({ dtype, device, adapters })
    : await Sd15Backbone.load(paths, { dtype, device, adapters });
  const loaded = performance.now();
  const { StepProgress } = await import("../core/progress.ts");
  const progress = new StepProgress();
  const result = await asFlagError(() =>
    sampleImage(bb, prepared, { positive, negative }, {
      onStep: (i, n) => progress.step(i + 1, n),
    })
  );
  using latents = result.latents;
  progress.finish();
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
      ...(Object.keys(a.samplerOptions).length
        ? { sampler_options: JSON.stringify(a.samplerOptions) }
        : {}),
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

export const command = defineCommand({
  summary: "generate one image from explicit reference images",
  synopsis: "sample --prompt TEXT --seed S --out OUT.png [options]",
  about: "Generates one image with explicit reference images.",
  sections: SECTIONS,
  footer: `${
    pluginOptionsHelp(registry, [
      ["guidance", DEFAULTS.guidance.name],
      ["sampler", DEFAULTS.sampler.name],
    ])
  }
\`dipsy generate --list\` lists every plugin and its options.`,
  async run(values) {
    await runSample(sampleArgs(values));
    return 0;
  },
});
