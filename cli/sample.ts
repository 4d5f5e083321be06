/**
 * `dipsy sample`: one image from explicit reference images, for trying guidance weights and
 * adapter scales by hand. Everything the main job chooses at random (references, augmentation,
 * seed) is given on the command line instead.
 */
import { ConfigError, DEFAULTS, parseSets } from "../core/config.ts";
import { SampleError } from "../core/sample.ts";
import { checkSampleOptions, JobOptionError, sample, type SampleJobOptions } from "../app/api.ts";
import { CliError, defineCommand, deviceFlag, type FlagValues, intFlag } from "./command.ts";
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

/** `sample`'s job options as the command line sets them. */
export type SampleArgs =
  & SampleJobOptions
  & Required<Pick<SampleJobOptions, "out" | "model" | "guidance" | "sampler" | "steps" | "force">>;

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
  const { out, "latents-out": latentsOut } = v;
  const dtype = v.dtype === "auto" ? undefined : v.dtype;
  if (dtype !== undefined && dtype !== "f32" && dtype !== "f16" && dtype !== "bf16") {
    throw new CliError(`--dtype must be auto, f32, f16 or bf16, got "${dtype}"`);
  }
  const device = deviceFlag(v.device);
  const sets = pluginSets([
    ...(v["guidance-opt"] ?? []).map((kv) => `guidance.${kv}`),
    ...(v.set ?? []),
  ]);
  if (v.tiny && v.model !== undefined && v.model !== "tiny") {
    throw new CliError(`--tiny and --model ${v.model}: give one of them`);
  }
  const model = v.tiny ? "tiny" : v.model ?? DEFAULTS.model;
  const models = {
    model,
    ipAdapter: v["ip-adapter"],
    negativeIpAdapter: v["negative-ip-adapter"],
    imageEncoder: v["image-encoder"],
  };
  try {
    checkSampleOptions({ ...models, out, latentsOut });
  } catch (e) {
    throw flagError(e);
  }
  if (v.size !== undefined && (v.width !== undefined || v.height !== undefined)) {
    throw new CliError("--size and --width/--height: give --size only");
  }
  const size = v.size === undefined ? { width: v.width, height: v.height } : parseSize(v.size);
  return {
    prompt: v.prompt!,
    seed: intFlag(v.seed, "--seed")!,
    out: out!,
    latentsOut,
    positive: v.positive,
    negative: v.negative,
    ...models,
    guidance: sets.guidance?.name ?? v.guidance ?? DEFAULTS.guidance.name,
    guidanceOptions: sets.guidance?.options ?? {},
    sampler: sets.sampler?.name ?? v.sampler ?? DEFAULTS.sampler.name,
    samplerOptions: sets.sampler?.options ?? {},
    steps: intFlag(v.steps, "--steps", 1) ?? DEFAULTS.steps,
    width: intFlag(size.width, v.size === undefined ? "--width" : "--size", 1),
    height: intFlag(size.height, v.size === undefined ? "--height" : "--size", 1),
    dtype,
    device: device === "auto" ? undefined : device,
    force: v.force ?? false,
  };
}

// ---------------------------------------------------------------------------------------------

/** The flag of a `sample` job option or core/sample.ts field (in kebab case), for messages. */
function flagOf(field: string): string {
  if (field.startsWith("guidanceOptions.")) return `--set guidance.${field.slice(16)}`;
  if (field === "guidanceOptions") return "--set guidance.*";
  if (field === "width" || field === "height") return "--size";
  return `--${field.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`;
}

/** A job option's mistake as the CLI says it, naming the flag that set it. */
export function flagError(e: unknown): unknown {
  if (e instanceof JobOptionError) {
    const fix = e.overwrite ? " (pass --force to overwrite it)" : "";
    return new CliError(`${flagOf(e.field)} ${e.detail}${fix}`);
  }
  if (e instanceof SampleError) return new CliError(`${flagOf(e.field)}: ${e.message}`);
  return e;
}

/** Runs the job of the parsed arguments, printing what it wrote. */
export async function runSample(a: SampleArgs): Promise<void> {
  const { StepProgress } = await import("../core/progress.ts");
  const progress = new StepProgress();
  let result;
  try {
    result = await sample({
      ...a,
      onProgress: ({ index, total }) => progress.step(index + 1, total),
    });
  } catch (e) {
    throw flagError(e);
  }
  progress.finish();
  const { width, height, device, dtype, seconds } = result;
  console.log(
    `wrote ${a.out}${a.latentsOut ? ` and ${a.latentsOut}` : ""} (${width}x${height}, ` +
      `${a.guidance}, ${a.sampler} ${a.steps} steps, ${device} ${dtype}; load ` +
      `${seconds.load.toFixed(1)} s, sampling ${seconds.sampling.toFixed(1)} s)`,
  );
}

export const command = defineCommand({
  synopsis: "sample --prompt TEXT --seed S --out OUT.png [options]",
  about: "Generates one image with explicit reference images.",
  sections: SECTIONS,
  footer: `${pluginOptionsHelp(registry, ["guidance", "sampler"])}
\`dipsy generate --list\` lists every plugin and its options.`,
  async run(values) {
    await runSample(sampleArgs(values));
    return 0;
  },
});
