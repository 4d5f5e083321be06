/**
 * `dipsy generate`: the dataset job (see core/generate.ts for its guarantees). This module reads
 * flags into a configuration layer, loads plugin files, shows progress and turns Ctrl-C into a
 * clean stop after the batch in flight.
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import type { DiffusionBackbone } from "../core/backbone.ts";
import {
  type ConfigLayer,
  DEFAULT_CLIP,
  DEFAULTS,
  PRESETS,
  type ResolvedRun,
  resolveRun,
  type RunConfig,
} from "../core/config.ts";
import type { Dataset } from "../core/dataset.ts";
import type { Shard } from "../core/shard.ts";
import type { PluginKind } from "../core/plugins.ts";
import type { Progress } from "../core/progress.ts";
import type { ModelPaths, Placement } from "../app/models.ts";
import { CliError, defineCommand, type Flags, type FlagValues, intFlag } from "./command.ts";
import { loadPlugins, pluginList, pluginOptionsHelp } from "./plugin_docs.ts";

const registry = await loadPlugins();

/** The registered plugins of a kind, for a help text. */
const names = (kind: PluginKind) => registry.list(kind).map((d) => d.name).join(", ");

/** `--size N | WxH` as width and height. */
export function parseSize(text: string): { width: string; height: string } {
  const m = /^\s*(\d+)\s*(?:[x×]\s*(\d+))?\s*$/.exec(text);
  if (!m) throw new CliError(`--size must be N or WxH, got "${text}"`);
  return { width: m[1], height: m[2] ?? m[1] };
}

/** The model flags `generate`, `run` and `sample` share. */
export const MODEL_FLAGS = {
  model: {
    value: "REF",
    help: 'SD1.5 diffusers folder or Hub id (org/name[@revision]), or "tiny" (embedded random ' +
      "weights, no files)",
    default: DEFAULTS.model,
    field: "model",
  },
  tiny: { help: "the tiny models for everything (noise images; for trying things out)" },
  "ip-adapter": {
    value: "REF",
    help: "IP-Adapter .safetensors file, or a file in a Hub repo (org/name/path or " +
      "org/name@revision:path)",
    default: DEFAULTS.ipAdapter,
    field: "ipAdapter",
  },
  "negative-ip-adapter": {
    value: "REF",
    help: "the negative image's IP-Adapter, of the same kind and token count (default: " +
      "--ip-adapter; its scale: guidance.negativeAdapterScale)",
    field: "negativeIpAdapter",
  },
  "image-encoder": {
    value: "REF",
    help: "its CLIP image encoder folder, or one in a Hub repo",
    default: DEFAULTS.imageEncoder,
    field: "imageEncoder",
  },
} as const satisfies Flags;

/** The generation settings `generate` and `run` share. */
export const SETTING_FLAGS = {
  config: { value: "FILE", help: "settings from a JSON or YAML file (flags override it)" },
  preset: {
    value: "NAME",
    help: Object.keys(PRESETS).join(", "),
    default: DEFAULTS.preset,
    field: "preset",
  },
  "per-class": {
    value: "N",
    help: "images per class",
    default: DEFAULTS.perClass,
    field: "perClass",
  },
  seed: {
    value: "S",
    help: "run seed: the same seed gives the same images",
    default: DEFAULTS.seed,
    field: "seed",
  },
  steps: { value: "N", help: "denoising steps", default: DEFAULTS.steps, field: "steps" },
  size: { value: "N|WxH", help: "image size (default: the model's, 512 for SD1.5)" },
  prompt: {
    value: "TEMPLATE",
    help: 'e.g. "A photo of a {class}"; "" for the empty prompt (default: the dataset\'s)',
    field: "prompt",
  },
  guidance: {
    value: "NAME",
    help: `${names("guidance")}, or a plugin's`,
    default: DEFAULTS.guidance.name,
    field: "guidance",
  },
  sampler: {
    value: "NAME",
    help: `${names("sampler")}, or a plugin's`,
    default: DEFAULTS.sampler.name,
    field: "sampler",
  },
  pairs: {
    value: "NAME",
    help: `${names("pairs")}, or a plugin's`,
    default: DEFAULTS.pairs.name,
    field: "pairs",
  },
  set: {
    value: "KEY=VALUE",
    multiple: true,
    help: "any setting or plugin option (repeatable), e.g. --set guidance.negativeScale=4 " +
      "--set pairs.augment=false; the options of the default plugins are listed below, " +
      "`--list` shows every plugin's",
  },
  plugin: {
    value: "FILE",
    multiple: true,
    help: "load plugins from a module (repeatable); see docs/plugins.md",
    field: "plugins",
  },
} as const satisfies Flags;

/** The placement and similarity CLIP flags `generate` and `run` share. */
export const PLACEMENT_FLAGS = {
  clip: {
    value: "REF",
    help: `CLIP for class similarity (default: tiny with --tiny, else ${DEFAULT_CLIP})`,
    field: "clip",
  },
  device: {
    value: "D",
    help: "auto, cpu, cuda, cuda:N",
    default: DEFAULTS.device,
    field: "device",
  },
  dtype: {
    value: "T",
    help: "auto (f16 on CUDA, f32 on CPU), f32, f16, bf16",
    default: DEFAULTS.dtype,
    field: "dtype",
  },
} as const satisfies Flags;

const SECTIONS = {
  "input and output:": {
    data: {
      value: "DIR",
      help: "few-shot images: DIR/<class>/*.jpg, or the DataDream layout",
      field: "data",
    },
    out: {
      value: "DIR",
      help: "output folder (new, empty, or an earlier run of the same configuration)",
      field: "out",
    },
    dataset: {
      value: "NAME",
      help: "dataset name: prompt template (aircraft, cars, dtd, eurosat, flowers, food, pets; " +
        'others "A photo of a {c}"), DataDream folder, and for the ten benchmarks their class ' +
        'names (n01440764 -> "tench")',
      field: "dataset",
    },
    "fewshot-seed": {
      value: "S",
      help: "DataDream few-shot split when there are several",
      field: "fewshotSeed",
    },
    shots: {
      value: "K",
      help: "the first K shots of each class, by rank (a `dipsy fewshot` split)",
      field: "shots",
    },
    "skip-bad": {
      help: "leave unreadable or broken shots out instead of stopping",
      field: "skipBad",
    },
    similarity: {
      value: "FILE",
      help: "class similarity, .json or the official .npz (default: OUT's copy, " +
        "DIR/similarity.json, or computed)",
      field: "similarity",
    },
  },
  "what to generate:": SETTING_FLAGS,
  "models:": {
    ...MODEL_FLAGS,
    ...PLACEMENT_FLAGS,
    batch: { value: "B", help: "images per model call", default: DEFAULTS.batch, field: "batch" },
    quality: { value: "Q", help: "JPEG quality", default: DEFAULTS.quality, field: "quality" },
  },
  "running:": {
    shard: {
      value: "I/N",
      help: "do shard I of N, I counting from 0 (0/2 and 1/2 are the two halves; also from " +
        "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, or JOB_COMPLETION_INDEX with " +
        "--shard-count N or DIPSY_SHARD_COUNT)",
    },
    "shard-count": {
      value: "N",
      help: "the shard count for JOB_COMPLETION_INDEX; with SLURM_ARRAY_TASK_ID, the task id " +
        "is then the shard index (for an array resubmitted as `sbatch --array=1,3`)",
    },
    devices: {
      value: "LIST",
      help: "one worker process per device, e.g. cuda:0,cuda:1 or all (every GPU), each a " +
        "shard of this run (or of --shard's), all into OUT; not with --device",
    },
    only: {
      value: "CLASS:INDEX",
      multiple: true,
      help: "(re)make just these images (repeatable); their batch is computed whole so they " +
        "come out identical to a full run",
    },
    "print-config": { help: "print the resolved configuration as YAML and exit" },
    list: { help: "list presets and plugins and exit" },
  },
} as const satisfies Record<string, Flags>;

type Declared = typeof SECTIONS[keyof typeof SECTIONS];
export type GenerateFlags = FlagValues<
  & typeof SECTIONS["input and output:"]
  & typeof SETTING_FLAGS
  & typeof SECTIONS["models:"]
  & typeof SECTIONS["running:"]
>;

/**
 * Flags as a configuration layer (values are text, parsed per setting); messages about a
 * setting name its flag.
 */
function flagsLayer(
  flags: GenerateFlags,
  parse: typeof import("../core/config.ts").parseConfigObject,
): ConfigLayer {
  const raw: Record<string, unknown> = {};
  const labels: Record<string, string> = { width: "--size", height: "--size" };
  for (const section of Object.values(SECTIONS) as Declared[]) {
    for (const [name, flag] of Object.entries(section) as [string, { field?: string }][]) {
      const value = flags[name as keyof GenerateFlags];
      if (!flag.field || value === undefined) continue;
      raw[flag.field] = value;
      labels[flag.field] = `--${name}`;
    }
  }
  if (flags.tiny) {
    raw.model = "tiny";
    raw.clip ??= "tiny";
  }
  if (flags.size !== undefined) Object.assign(raw, parseSize(flags.size));
  return parse(raw, "command line", { textual: true, labels });
}

function listPlugins(): void {
  console.log("presets:");
  for (const [name, p] of Object.entries(PRESETS)) {
    console.log(`  ${name.padEnd(24)} ${p.description} [paper: ${p.paper}]`);
  }
  console.log(`\n${pluginList(registry, ["guidance", "sampler", "pairs"])}`);
}

/** Reads the configuration from --config and the flags, loading plugin files on the way. */
export async function configFromFlags(flags: GenerateFlags): Promise<RunConfig> {
  const cfg = await import("../core/config.ts");
  const layers: ConfigLayer[] = [];
  if (flags.config) layers.push(await cfg.readConfigFile(flags.config));
  layers.push(flagsLayer(flags, cfg.parseConfigObject));
  if (flags.set?.length) layers.push(cfg.parseSets(flags.set));
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
  /** Its plugins, built once. */
  run: ResolvedRun;
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
  const run = resolveRun(config, registry);
  const adapters = gen.adaptersFor(run.guidance);
  // The input first: a bad image should fail the run before any model is looked for.
  const dataset = await gen.validateInput(config, run);
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
  run.sampler(await models.schedulerConfigOf(paths))[Symbol.dispose]();
  return { config: resolved, run, dataset, shard, adapters, placement, paths, vaeScaleFactor };
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
      run: prepared.run,
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

export const command = defineCommand({
  summary: "generate the synthetic dataset (resumable, shardable)",
  synopsis: "generate --data DIR --out DIR [options]",
  about: `Generates --per-class images for every class of the few-shot data into
OUT/<class>/<index>.jpg, with one line per image in OUT/manifest.jsonl. Rerunning the same command
resumes; shards of one run may share OUT.`,
  sections: SECTIONS,
  footer: `${
    pluginOptionsHelp(
      registry,
      (["guidance", "sampler", "pairs"] as const).map((k) => [k, DEFAULTS[k].name]),
    )
  }

Ctrl-C finishes and writes the batch in flight, then stops; run the same command to resume.`,
  async run(flags: GenerateFlags) {
    const shardCount = intFlag(flags["shard-count"], "--shard-count", 1);

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
        listPlugins();
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
});
