/**
 * `dipsy generate`: the dataset job (see core/generate.ts for its guarantees). This module reads
 * flags into a configuration layer, loads plugin files, shows progress and turns Ctrl-C into a
 * clean stop after the batch in flight.
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import type { DiffusionBackbone } from "../core/backbone.ts";
import {
  configFieldDocs,
  type ConfigLayer,
  DEFAULT_CLIP,
  DEFAULTS,
  formatConfig,
  loadPluginFiles,
  parseConfigObject,
  parseSets,
  type PluginKey,
  PRESETS,
  readConfigFile,
  resolveConfig,
  resolveRun,
  type RunConfig,
} from "../core/config.ts";
import type { Shard } from "../core/shard.ts";
import type { Progress } from "../core/progress.ts";
import type { GenerateJobOptions } from "../app/api.ts";
import {
  CliError,
  defineCommand,
  fieldFlags,
  type Flags,
  type FlagValues,
  intFlag,
  withInterrupt,
} from "./command.ts";
import { loadPlugins, pluginList, pluginOptionsHelp } from "./plugin_docs.ts";

const registry = await loadPlugins();

/** `--size N | WxH` as width and height. */
export function parseSize(text: string): { width: string; height: string } {
  const m = /^\s*(\d+)\s*(?:[x×]\s*(\d+))?\s*$/.exec(text);
  if (!m) throw new CliError(`--size must be N or WxH, got "${text}"`);
  return { width: m[1], height: m[2] ?? m[1] };
}

const RUN_DOCS = configFieldDocs();

/** The model flags `generate`, `run` and `sample` share. */
export const MODEL_FLAGS = {
  ...fieldFlags(RUN_DOCS, {
    model: {
      value: "REF",
      help: 'SD1.5 diffusers folder or Hub id (org/name[@revision]), or "tiny" (embedded random ' +
        "weights, no files)",
    },
    ipAdapter: {
      value: "REF",
      help: "IP-Adapter .safetensors file, or a file in a Hub repo (org/name/path or " +
        "org/name@revision:path)",
    },
    negativeIpAdapter: {
      value: "REF",
      help: "the negative image's IP-Adapter, of the same kind and token count (default: " +
        "--ip-adapter; its scale: guidance.negativeAdapterScale)",
    },
    imageEncoder: { value: "REF", help: "its CLIP image encoder folder, or one in a Hub repo" },
  }),
  tiny: { help: "the tiny models for everything (noise images; for trying things out)" },
} as const satisfies Flags;

/** `--guidance`, `--sampler` or `--pairs`: the plugin of that kind. */
const pluginFlag = (kind: PluginKey) => ({
  value: "NAME",
  help: `${registry.list(kind).map((d) => d.name).join(", ")}, or a plugin's`,
  default: DEFAULTS[kind].name,
  field: kind,
} as const);

/** The generation settings `generate` and `run` share. */
export const SETTING_FLAGS = {
  config: { value: "FILE", help: "settings from a JSON or YAML file (flags override it)" },
  ...fieldFlags(RUN_DOCS, {
    preset: "NAME",
    perClass: "N",
    seed: { value: "S", help: "run seed: the same seed gives the same images" },
    steps: "N",
    prompt: {
      value: "TEMPLATE",
      help: 'e.g. "A photo of a {class}"; "" for the empty prompt (default: the dataset\'s)',
    },
  }),
  size: { value: "N|WxH", help: "image size (default: the model's, 512 for SD1.5)" },
  guidance: pluginFlag("guidance"),
  sampler: pluginFlag("sampler"),
  pairs: pluginFlag("pairs"),
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

/** The placement and similarity CLIP flags the commands share. */
export const PLACEMENT_FLAGS = fieldFlags(RUN_DOCS, {
  clip: {
    value: "REF",
    help: `CLIP for class similarity (default: tiny with --tiny, else ${DEFAULT_CLIP})`,
  },
  device: "D",
  dtype: "T",
});

/** The input and output flags `generate`, `run` and `similarity` share. */
export const INPUT_FLAGS = fieldFlags(RUN_DOCS, {
  data: { value: "DIR", help: "few-shot images: DIR/<class>/*.jpg, or the DataDream layout" },
  out: {
    value: "DIR",
    help: "output folder (new, empty, or an earlier run of the same configuration)",
  },
  dataset: {
    value: "NAME",
    help: "dataset name: prompt template (aircraft, cars, dtd, eurosat, flowers, food, pets; " +
      'others "A photo of a {c}"), DataDream folder, and for the ten benchmarks their class ' +
      'names (n01440764 -> "tench")',
  },
  fewshotSeed: { value: "S", help: "DataDream few-shot split when there are several" },
  shots: {
    value: "K",
    help: "the first K shots of each class, by rank (a `dipsy fewshot` split)",
  },
  skipBad: { help: "leave unreadable or broken shots out instead of stopping" },
  similarity: {
    value: "FILE",
    help: "class similarity, .json or the official .npz (default: OUT's copy, " +
      "DIR/similarity.json, or computed)",
  },
});

const SECTIONS = {
  "input and output:": INPUT_FLAGS,
  "what to generate:": SETTING_FLAGS,
  "models:": {
    ...MODEL_FLAGS,
    ...PLACEMENT_FLAGS,
    ...fieldFlags(RUN_DOCS, { batch: "B", quality: "Q" }),
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

export type GenerateFlags = FlagValues<
  & typeof INPUT_FLAGS
  & typeof SETTING_FLAGS
  & typeof SECTIONS["models:"]
  & typeof SECTIONS["running:"]
>;

/**
 * Flags as a configuration layer (values are text, parsed per setting); messages about a
 * setting name its flag.
 */
function flagsLayer(flags: GenerateFlags): ConfigLayer {
  const raw: Record<string, unknown> = {};
  const labels: Record<string, string> = { width: "--size", height: "--size" };
  for (const [name, flag] of Object.entries(command.declared as Flags)) {
    const value = flags[name as keyof GenerateFlags];
    if (!flag.field || value === undefined) continue;
    raw[flag.field] = value;
    labels[flag.field] = `--${name}`;
  }
  if (flags.tiny) {
    raw.model = "tiny";
    raw.clip ??= "tiny";
  }
  if (flags.size !== undefined) Object.assign(raw, parseSize(flags.size));
  return parseConfigObject(raw, "command line", { textual: true, labels });
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
  const layers: ConfigLayer[] = [];
  if (flags.config) layers.push(await readConfigFile(flags.config));
  layers.push(flagsLayer(flags));
  if (flags.set?.length) layers.push(parseSets(flags.set));
  await loadPluginFiles(layers);
  return resolveConfig(layers);
}

export type PrepareOptions = Pick<GenerateJobOptions, "shard" | "shardCount" | "log">;

export interface RunOptions extends PrepareOptions, Pick<GenerateJobOptions, "only" | "signal"> {
  /** Draw a progress bar (default true). */
  progress?: boolean;
  /** Awaited as each batch starts (see ExecuteOptions.beforeBatch). */
  beforeBatch?: () => Promise<void>;
}

/** A configuration checked as far as it can be without loading the models. */
export type PreparedGenerate = Awaited<ReturnType<typeof prepareGenerate>>;

/**
 * Every check that needs no model weights: the input images, the plugins and their options, the
 * model files and configs, the image size. Writes nothing, so a refused configuration never
 * leaves anything behind that would block the corrected one.
 */
export async function prepareGenerate(
  config: RunConfig,
  opts: PrepareOptions = {},
) {
  const log = opts.log ?? ((m: string) => console.error(m));
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
  // Device, dtype and image size filled in.
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
  // The plugins are built once, here, and handed on.
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
  synopsis: "generate --data DIR --out DIR [options]",
  about: `Generates --per-class images for every class of the few-shot data into
OUT/<class>/<index>.jpg, with one line per image in OUT/manifest.jsonl. Rerunning the same command
resumes; shards of one run may share OUT.`,
  sections: SECTIONS,
  footer: `${pluginOptionsHelp(registry, ["guidance", "sampler", "pairs"])}

Ctrl-C finishes and writes the batch in flight, then stops; run the same command to resume.`,
  async run(flags: GenerateFlags) {
    const shardCount = intFlag(flags["shard-count"], "--shard-count", 1);
    let devices: string[] | null = null;
    if (flags.devices !== undefined) {
      if (flags.device !== undefined) {
        throw new CliError("--device and --devices: give one of them");
      }
      const { parseDevices } = await import("./devices.ts");
      devices = await parseDevices(flags.devices);
    }
    const config = await configFromFlags(devices ? { ...flags, device: devices[0] } : flags);
    if (flags.list) {
      listPlugins();
      return 0;
    }
    if (flags["print-config"]) {
      console.log(formatConfig(config).trimEnd());
      return 0;
    }
    const prepared = await prepareGenerate(config, { shard: flags.shard, shardCount });
    if (devices && devices.length > 1) {
      const { runOnDevices } = await import("./devices.ts");
      return await runOnDevices(flags, devices, prepared);
    }
    const hold = Deno.env.get(HOLD_AFTER_BATCH);
    return await withInterrupt(
      (signal) =>
        runPrepared(prepared, {
          only: flags.only,
          signal,
          beforeBatch: hold ? holdAfterFirstBatch(hold, prepared.shard) : undefined,
        }),
      "Ctrl-C: finishing the batch in flight, then stopping (Ctrl-\\ or Ctrl-C again stops at " +
        "once; that batch is then redone on resume)",
    );
  },
});
