/**
 * `dipsy generate`: the dataset job (see core/generate.ts for its guarantees). This module reads
 * flags into a configuration layer, loads plugin files, shows progress and turns Ctrl-C into a
 * clean stop after the batch in flight.
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import type { parseArgs } from "node:util";
import type { DiffusionBackbone } from "../core/backbone.ts";
import {
  type ConfigLayer,
  DEFAULT_CLIP,
  DEFAULT_IMAGE_ENCODER,
  DEFAULT_IP_ADAPTER,
  DEFAULT_MODEL,
  type RunConfig,
} from "../core/config.ts";
import type { Dataset } from "../core/dataset.ts";
import type { Shard } from "../core/shard.ts";
import type { Guidance, Sampler } from "../core/plugins.ts";
import type { Progress } from "../core/progress.ts";
import type { ModelPaths, Placement } from "../app/models.ts";
import { loadDefaultPlugins } from "../app/plugins.ts";
import { CliError, type Command, parseFlags } from "./command.ts";

const USAGE = `usage: deno task dipsy generate --data DIR --out DIR [options]

Generates --per-class images for every class of the few-shot data into OUT/<class>/<index>.jpg,
with one line per image in OUT/manifest.jsonl. Rerunning the same command resumes; shards of
one run may share OUT.

input and output:
  --data DIR            few-shot images: DIR/<class>/*.jpg, or the DataDream layout
  --out DIR             output folder (new, empty, or an earlier run of the same configuration)
  --dataset NAME        dataset name: prompt template (aircraft, cars, dtd, eurosat, flowers,
                        food, pets; others "A photo of a {c}"), DataDream folder, and for the
                        ten benchmarks their class names (n01440764 -> "tench")
  --fewshot-seed S      DataDream few-shot split when there are several
  --shots K             the first K shots of each class, by rank (a \`dipsy fewshot\` split)
  --skip-bad            leave unreadable or broken shots out instead of stopping
  --similarity FILE     class similarity, .json or the official .npz (default: OUT's copy,
                        DIR/similarity.json, or computed)

what to generate:
  --config FILE         settings from a JSON or YAML file (flags override it)
  --preset NAME         dipsy (default), no-negative, uniform-negative, no-augment,
                        no-negative-no-augment, uniform-no-augment, sd15, empty-prompt, single-ip
  --per-class N         images per class (default 200)
  --seed S              run seed (default 0): the same seed gives the same images
  --steps N             denoising steps (default 50)
  --size N | WxH        image size (default: the model's, 512 for SD1.5)
  --prompt TEMPLATE     e.g. "A photo of a {class}"; "" for the empty prompt
  --guidance NAME       dipsy, single-ip, cfg, neg-text-relative, diffusers-style, or a plugin's
  --sampler NAME        dpm-solver++ (default), ddim, euler, or a plugin's
  --pairs NAME          class-similarity (default), uniform, none, or a plugin's
  --set KEY=VALUE       any setting or plugin option, e.g. --set guidance.negativeScale=4
                        --set pairs.augment=false --set sampler.timestep_spacing=trailing
  --plugin FILE         load plugins from a module (repeatable); see docs/plugins.md

models:
  --model REF           SD1.5 diffusers folder or Hub id, or "tiny" (embedded random weights,
                        no files); default ${DEFAULT_MODEL}
  --tiny                the tiny models for everything (noise images; for trying things out)
  --ip-adapter REF      IP-Adapter file, or org/name/file in a Hub repo (default
                        ${DEFAULT_IP_ADAPTER})
  --image-encoder REF   its image encoder (default ${DEFAULT_IMAGE_ENCODER})
  --clip REF            CLIP for class similarity (default ${DEFAULT_CLIP})
  --device D            auto, cpu, cuda, cuda:N (default auto)
  --dtype T             auto (f16 on CUDA, f32 on CPU), f32, f16, bf16
  --batch B             images per model call (default 4)
  --quality Q           JPEG quality (default 95)

running:
  --shard I/N           do shard I of N, I counting from 0 (0/2 and 1/2 are the two halves;
                        also from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, or
                        JOB_COMPLETION_INDEX with --shard-count N or DIPSY_SHARD_COUNT)
  --shard-count N       the shard count for JOB_COMPLETION_INDEX; with SLURM_ARRAY_TASK_ID, the
                        task id is then the shard index (for an array resubmitted as
                        \`sbatch --array=1,3\`)
  --devices LIST        one worker process per device, e.g. cuda:0,cuda:1 or all (every GPU),
                        each a shard of this run (or of --shard's), all into OUT; not with --device
  --only CLASS:INDEX    (re)make just these images (repeatable); their batch is computed whole
                        so they come out identical to a full run
  --print-config        print the resolved configuration as YAML and exit
  --list                list presets and plugins and exit

Ctrl-C finishes and writes the batch in flight, then stops; run the same command to resume.`;

export const GENERATE_FLAGS = {
  help: { type: "boolean", short: "h" },
  data: { type: "string" },
  out: { type: "string" },
  dataset: { type: "string" },
  "fewshot-seed": { type: "string" },
  shots: { type: "string" },
  "skip-bad": { type: "boolean" },
  similarity: { type: "string" },
  config: { type: "string" },
  preset: { type: "string" },
  "per-class": { type: "string" },
  seed: { type: "string" },
  steps: { type: "string" },
  size: { type: "string" },
  prompt: { type: "string" },
  guidance: { type: "string" },
  sampler: { type: "string" },
  pairs: { type: "string" },
  set: { type: "string", multiple: true },
  plugin: { type: "string", multiple: true },
  model: { type: "string" },
  tiny: { type: "boolean" },
  "ip-adapter": { type: "string" },
  "image-encoder": { type: "string" },
  clip: { type: "string" },
  device: { type: "string" },
  dtype: { type: "string" },
  batch: { type: "string" },
  quality: { type: "string" },
  shard: { type: "string" },
  "shard-count": { type: "string" },
  devices: { type: "string" },
  only: { type: "string", multiple: true },
  "print-config": { type: "boolean" },
  list: { type: "boolean" },
} as const;

export type GenerateFlags = ReturnType<
  typeof parseArgs<{ options: typeof GENERATE_FLAGS }>
>["values"];

/** Flags as a configuration layer (values are text, parsed per setting). */
function flagsLayer(
  flags: GenerateFlags,
  parse: typeof import("../core/config.ts").parseConfigObject,
): ConfigLayer {
  const raw: Record<string, unknown> = {
    data: flags.data,
    out: flags.out,
    dataset: flags.dataset,
    fewshotSeed: flags["fewshot-seed"],
    shots: flags.shots,
    skipBad: flags["skip-bad"],
    similarity: flags.similarity,
    preset: flags.preset,
    perClass: flags["per-class"],
    seed: flags.seed,
    steps: flags.steps,
    prompt: flags.prompt,
    guidance: flags.guidance,
    sampler: flags.sampler,
    pairs: flags.pairs,
    plugins: flags.plugin,
    model: flags.tiny ? "tiny" : flags.model,
    clip: flags.clip ?? (flags.tiny ? "tiny" : undefined),
    ipAdapter: flags["ip-adapter"],
    imageEncoder: flags["image-encoder"],
    device: flags.device,
    dtype: flags.dtype,
    batch: flags.batch,
    quality: flags.quality,
  };
  if (flags.size !== undefined) {
    const m = /^\s*(\d+)\s*(?:[x×]\s*(\d+))?\s*$/.exec(flags.size);
    if (!m) throw new CliError(`--size must be N or WxH, got "${flags.size}"`);
    raw.width = m[1];
    raw.height = m[2] ?? m[1];
  }
  return parse(raw, "command line", { textual: true, labels: FLAG_LABELS });
}

/** Messages about a setting given on the command line name its flag. */
const FLAG_LABELS: Record<string, string> = {
  fewshotSeed: "--fewshot-seed",
  skipBad: "--skip-bad",
  perClass: "--per-class",
  ipAdapter: "--ip-adapter",
  imageEncoder: "--image-encoder",
  width: "--size",
  height: "--size",
  ...Object.fromEntries(
    [
      "data",
      "out",
      "dataset",
      "shots",
      "similarity",
      "preset",
      "seed",
      "steps",
      "prompt",
      "model",
      "clip",
      "device",
      "dtype",
      "batch",
      "quality",
    ].map((k) => [k, `--${k}`]),
  ),
};

async function listPlugins(): Promise<void> {
  const { PRESETS } = await import("../core/config.ts");
  const { registry } = await import("../core/plugins.ts");
  console.log("presets:");
  for (const [name, p] of Object.entries(PRESETS)) {
    console.log(`  ${name.padEnd(24)} ${p.description} [paper: ${p.paper}]`);
  }
  for (const kind of ["guidance", "sampler", "pairs"] as const) {
    console.log(`\n${kind} plugins:`);
    for (const d of registry.list(kind)) {
      console.log(`  ${d.name.padEnd(24)} ${d.description}`);
      for (const [k, o] of Object.entries(d.options ?? {})) {
        const def = o.default === undefined ? "" : ` (default ${JSON.stringify(o.default)})`;
        console.log(`      ${k}: ${o.description}${def}`);
      }
    }
  }
}

/** Reads the configuration from --config and the flags, loading plugin files on the way. */
export async function configFromFlags(flags: GenerateFlags): Promise<RunConfig> {
  const cfg = await import("../core/config.ts");
  const layers: ConfigLayer[] = [];
  if (flags.config) layers.push(await cfg.readConfigFile(flags.config));
  layers.push(flagsLayer(flags, cfg.parseConfigObject));
  if (flags.set?.length) layers.push(cfg.parseSets(flags.set));
  await loadDefaultPlugins();
  await cfg.loadPluginFiles(layers);
  return cfg.resolveConfig(layers);
}

export interface PrepareOptions {
  shard?: string;
  shardCount?: number;
  /** Messages (default: stderr). */
  log?: (message: string) => void;
}

export interface RunOptions extends PrepareOptions {
  only?: string[];
  /** Stop after the batch in flight when aborted (the CLI wires Ctrl-C to it). */
  signal?: AbortSignal;
  /** Draw a progress bar (default true). */
  progress?: boolean;
  /** Awaited as each batch starts (see ExecuteOptions.beforeBatch). */
  beforeBatch?: () => Promise<void>;
}

/** A configuration checked as far as it can be without loading the models. */
export interface PreparedGenerate {
  /** Device, dtype and image size filled in. */
  config: RunConfig;
  dataset: Dataset;
  shard: Shard;
  adapters: number;
  placement: Placement;
  paths: ModelPaths;
  vaeScaleFactor: number;
}

/**
 * Every check that needs no model weights: the input images, the plugins and their options, the
 * model files and configs, the image size. Writes nothing, so a refused configuration never
 * leaves anything behind that would block the corrected one.
 */
export async function prepareGenerate(
  config: RunConfig,
  opts: PrepareOptions = {},
): Promise<PreparedGenerate> {
  const log = opts.log ?? ((m: string) => console.error(m));
  const { registry } = await import("../core/plugins.ts");
  const gen = await import("../core/generate.ts");
  const models = await import("../app/models.ts");

  if (!config.data) throw new CliError("--data is required (or `data:` in the config file)");
  if (!config.out) throw new CliError("--out is required (or `out:` in the config file)");
  const shard = gen.resolveShard(opts.shard, opts.shardCount);
  const guidance = registry.create<Guidance>(
    "guidance",
    config.guidance.name,
    config.guidance.options,
  );
  const adapters = gen.adaptersFor(guidance);
  // The input first: a bad image should fail the run before any model is looked for.
  const dataset = await gen.validateInput(config, registry);
  for (const p of dataset.problems) log(`${p.severity}: ${p.path}: ${p.message}`);
  const placement = await models.resolvePlacement(config);
  const paths = await models.resolveModels(config, adapters);
  const { defaultSize, vaeScaleFactor } = await models.modelGeometry(paths);
  const resolved: RunConfig = {
    ...config,
    device: placement.device,
    dtype: placement.dtype,
    width: config.width ?? defaultSize,
    height: config.height ?? defaultSize,
  };
  gen.checkImageSize(resolved, vaeScaleFactor);
  // Sampler options are checked now, not after the model has loaded.
  registry.create<Sampler>("sampler", config.sampler.name, {
    ...config.sampler.options,
    steps: config.steps,
    config: await models.schedulerConfigOf(paths),
  })[Symbol.dispose]();
  return { config: resolved, dataset, shard, adapters, placement, paths, vaeScaleFactor };
}

/** Runs the job for a configuration; returns the process exit code. */
export async function runGenerate(config: RunConfig, opts: RunOptions = {}): Promise<number> {
  return await runPrepared(await prepareGenerate(config, opts), opts);
}

/** Runs the job for a prepared configuration; returns the process exit code. */
export async function runPrepared(
  prepared: PreparedGenerate,
  opts: RunOptions = {},
): Promise<number> {
  const log = opts.log ?? ((m: string) => console.error(m));
  const gen = await import("../core/generate.ts");
  const models = await import("../app/models.ts");
  const { similaritySource } = await import("../app/similarity.ts");
  const progressModule = await import("../core/progress.ts");
  const { config: resolved, dataset, shard, adapters, placement, paths } = prepared;

  // Set from callbacks; a holder keeps TypeScript from narrowing them to their initial null.
  const held: { backbone?: DiffusionBackbone; progress?: Progress } = {};
  const started = performance.now();
  try {
    const result = await gen.generate({
      config: resolved,
      dataset,
      vaeScaleFactor: prepared.vaeScaleFactor,
      similarity: similaritySource(resolved, placement, log),
      shard,
      only: opts.only,
      signal: opts.signal,
      beforeBatch: opts.beforeBatch,
      log,
      onPlan(plan, opened) {
        const k = plan.dataset.classes.length;
        const where = shard.count > 1 ? ` (shard ${shard.index}/${shard.count})` : "";
        const skipped = opened.finished.size;
        log(
          `${opened.toWrite} image(s) to generate${where} for ${k} classes x ` +
            `${resolved.perClass} into ${plan.out}` +
            (skipped ? `; ${skipped} already finished` : "") +
            ` [${resolved.preset}: guidance ${resolved.guidance.name}, pairs ` +
            `${resolved.pairs.name}, ${resolved.sampler.name} ${resolved.steps} steps, ` +
            `${resolved.width}x${resolved.height}, ${placement.device} ${placement.dtype}]`,
        );
        if (plan.similarity) log(`class similarity: ${plan.similarity.from}`);
        if (opened.toWrite > 0) {
          log(`loading ${resolved.model === "tiny" ? "the tiny models" : resolved.model}...`);
        }
      },
      backbone: async () => {
        held.backbone = await models.loadBackbone(resolved, paths, adapters, placement);
        return held.backbone;
      },
      onProgress(p) {
        if (opts.progress === false) return;
        held.progress ??= new progressModule.Progress(p.total, {
          unit: "images",
          label: "generate",
        });
        held.progress.update(p.done, p.step ? `step ${p.step.index + 1}/${p.step.total}` : "");
      },
    });
    held.progress?.finish();
    const out = result.plan.out;
    if (result.interrupted && opts.signal?.aborted) {
      log(
        `stopped: ${result.written} image(s) written, ${result.remaining} left. ` +
          "Run the same command again to resume.",
      );
      return 130;
    }
    const secs = ((performance.now() - started) / 1000).toFixed(1);
    log(
      `done: ${result.written} image(s) written` +
        (result.skipped ? `, ${result.skipped} were already there` : "") +
        ` in ${secs} s; images in ${out}/<class>/, manifest ${out}/${gen.MANIFEST}`,
    );
    return 0;
  } finally {
    held.backbone?.[Symbol.dispose]();
  }
}

/** The environment variable that turns on the latch of holdAfterFirstBatch. */
export const HOLD_AFTER_BATCH = "DIPSY_TEST_HOLD_AFTER_BATCH";

/**
 * A latch for tests that must act on a run known to be part-way through (cancel it, say)
 * without racing it: once this process has written its first batch, it appends its pid to
 * DIR/held-<shard index> and waits until DIR/release-<shard index> exists.
 */
export function holdAfterFirstBatch(dir: string, shard: Shard): () => Promise<void> {
  let batches = 0;
  return async () => {
    if (batches++ !== 1) return;
    const release = join(dir, `release-${shard.index}`);
    if (existsSync(release)) return;
    await Deno.writeTextFile(join(dir, `held-${shard.index}`), `${Deno.pid}\n`, { append: true });
    while (!existsSync(release)) await new Promise((r) => setTimeout(r, 50));
  };
}

export const command: Command = {
  summary: "generate the synthetic dataset (resumable, shardable)",
  usage: USAGE,
  flags: GENERATE_FLAGS,
  async run(args) {
    const flags: GenerateFlags = parseFlags(args, GENERATE_FLAGS);
    if (flags.help) {
      console.log(USAGE);
      return 0;
    }
    const shardCount = flags["shard-count"] === undefined
      ? undefined
      : Number(flags["shard-count"]);
    if (shardCount !== undefined && !(Number.isInteger(shardCount) && shardCount > 0)) {
      throw new CliError(`--shard-count must be a positive integer, got "${flags["shard-count"]}"`);
    }

    const controller = new AbortController();
    let interrupts = 0;
    const onSigint = () => {
      interrupts++;
      if (interrupts === 1) {
        console.error(
          "\nCtrl-C: finishing the batch in flight, then stopping (Ctrl-\\ stops at once; " +
            "that batch is then redone on resume)",
        );
        controller.abort();
      } else {
        Deno.exit(130);
      }
    };
    let devices: string[] | null = null;
    if (flags.devices !== undefined) {
      if (flags.device !== undefined) {
        throw new CliError("--device and --devices: give one of them");
      }
      const { parseDevices } = await import("./devices.ts");
      devices = await parseDevices(flags.devices);
    }
    try {
      const config = await configFromFlags(devices ? { ...flags, device: devices[0] } : flags);
      if (flags.list) {
        await listPlugins();
        return 0;
      }
      if (flags["print-config"]) {
        const { formatConfig } = await import("../core/config.ts");
        console.log(formatConfig(config).trimEnd());
        return 0;
      }
      const prepared = await prepareGenerate(config, { shard: flags.shard, shardCount });
      if (devices && devices.length > 1) {
        const { runOnDevices } = await import("./devices.ts");
        return await runOnDevices(flags, devices, prepared);
      }
      Deno.addSignalListener("SIGINT", onSigint);
      const hold = Deno.env.get(HOLD_AFTER_BATCH);
      return await runPrepared(prepared, {
        only: flags.only,
        signal: controller.signal,
        beforeBatch: hold ? holdAfterFirstBatch(hold, prepared.shard) : undefined,
      });
    } finally {
      Deno.removeSignalListener("SIGINT", onSigint);
    }
  },
};
