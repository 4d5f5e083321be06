/**
 * The job-level API: each command of the CLI as a function for Deno code and notebooks, with a
 * typed options object, progress through a callback, cancellation through an AbortSignal, and
 * the record the command writes as the result. Each function runs the code its command runs
 * (the same checks, the same files), so a job started here and the same command on the command
 * line give the same bytes.
 *
 * Nothing here prints: messages go to `log` (default: stderr) and progress to `onProgress`.
 */
import { existsSync } from "node:fs";
import { basename, dirname, extname, join, resolve } from "node:path";
import type { Device } from "../ffi/mod.ts";
import { UserError } from "../ffi/errors.ts";
import type { DiffusionBackbone } from "../core/backbone.ts";
import {
  type ConfigLayer,
  DEFAULT_CLIP,
  DEFAULTS,
  loadPluginFiles,
  parseConfigObject,
  readConfigFile,
  resolveConfig,
  type RunConfig,
  TINY,
} from "../core/config.ts";
import {
  generate as generateRun,
  type ManifestEntry,
  type ProgressInfo,
  readManifest,
  RUN_RECORD,
  type RunRecord,
} from "../core/generate.ts";
import {
  IMAGE_EXTENSIONS,
  ImageDecodeError,
  type ImageFormat,
  type RgbImage,
} from "../core/image.ts";
import type { ClassifierProgress } from "../core/plugins.ts";
import type { TrainRecord } from "../plugins/classifiers/trainer.ts";
import type { EvalRecord, SelectRule, ShotOptions, TrainInputs } from "./classify.ts";
import { loadDefaultPlugins } from "./plugins.ts";

/** Where messages go when no `log` is given: stderr, as the CLI prints them. */
const toStderr = (message: string): void => console.error(message);

/** Options every job takes. */
export interface JobOptions {
  /** Stops the job at its next safe point (see each job); what it wrote stays resumable. */
  signal?: AbortSignal;
  /** Warnings and notes, one line each (default: stderr). */
  log?: (message: string) => void;
}

// ---------------------------------------------------------------------------------------------
// generate

/** A plugin by name, or by name with its options beside it (as in a configuration file). */
export type PluginSetting = string | ({ name?: string } & Record<string, unknown>);

/**
 * The settings of the dataset job: the keys of a `dipsy generate --config` file, as `RunConfig`
 * names them; a plugin (guidance, sampler, pairs) by name or with its options. Defaults are those
 * of `DEFAULTS` (core/config.ts) and the preset; unknown keys are refused.
 */
export interface GenerateSettings
  extends
    Partial<Omit<RunConfig, "fewshotSeed" | "guidance" | "sampler" | "pairs" | "plugins">>,
    Partial<Record<"guidance" | "sampler" | "pairs", PluginSetting>> {
  /** DataDream few-shot split when there are several. */
  fewshotSeed?: string | number;
  /** Plugin modules to load first (see docs/plugins.md). */
  plugins?: string[];
}

/** `generate`'s options: the settings, and how this invocation runs. */
export interface GenerateJobOptions extends GenerateSettings, JobOptions {
  /** A JSON or YAML configuration file; the settings above override it. */
  config?: string;
  /** This invocation's share, "I/N" counting from 0. Default: the whole run (or Slurm's). */
  shard?: string;
  /** The shard count for JOB_COMPLETION_INDEX. */
  shardCount?: number;
  /** (Re)make only these images, "CLASS:INDEX". */
  only?: string[];
  /** After each image written, and at each denoising step. */
  onProgress?: (progress: ProgressInfo) => void;
  /** After each image's manifest line is written. */
  onImage?: (entry: ManifestEntry) => void;
}

/** What a `generate` call did, and the records of its output folder. */
export interface GenerateJobResult {
  /** The output folder (absolute). */
  out: string;
  /** Images written by this call. */
  written: number;
  /** Images that were already finished. */
  skipped: number;
  /** Images left to do: non-zero after an abort. */
  remaining: number;
  /** True when the call stopped before its work was done (run it again to resume). */
  interrupted: boolean;
  /** OUT/run.json: what decides the images (null when nothing was written yet). */
  record: RunRecord | null;
  /** OUT/manifest.jsonl, one entry per finished image, in file order. */
  manifest: ManifestEntry[];
}

/** The resolved configuration of a settings object and an optional file, plugins loaded. */
export async function generateConfig(
  settings: GenerateSettings,
  file?: string,
): Promise<RunConfig> {
  const layers: ConfigLayer[] = [];
  if (file) layers.push(await readConfigFile(file));
  layers.push(parseConfigObject(settings, "generate options"));
  await loadDefaultPlugins();
  await loadPluginFiles(layers);
  return resolveConfig(layers);
}

/**
 * `dipsy generate`: the synthetic dataset into `out`. Everything is checked before anything is
 * written; an abort finishes the batch in flight, and calling again with the same options
 * resumes.
 */
export async function generate(opts: GenerateJobOptions): Promise<GenerateJobResult> {
  const {
    config: file,
    shard,
    shardCount,
    only,
    signal,
    log = toStderr,
    onProgress,
    onImage,
    ...settings
  } = opts;
  const { prepareGenerate } = await import("../cli/generate.ts");
  const models = await import("./models.ts");
  const { similaritySource } = await import("./similarity.ts");
  const prepared = await prepareGenerate(await generateConfig(settings, file), {
    shard,
    shardCount,
    log,
  });
  const { config, placement, paths, adapters } = prepared;
  let backbone: DiffusionBackbone | undefined;
  try {
    // What was prepared (the configuration, its plugins, the input, the shard) goes on as it is.
    const result = await generateRun({
      ...prepared,
      similarity: similaritySource(config, placement, log),
      only,
      signal,
      log,
      onProgress,
      onImage,
      backbone: async () => {
        backbone = await models.loadBackbone(config, paths, adapters, placement);
        return backbone;
      },
    });
    const { plan: { out }, ...counts } = result;
    return {
      out,
      ...counts,
      record: await readJson<RunRecord>(join(out, RUN_RECORD)),
      manifest: [...(await readManifest(out)).entries.values()].map((e) => e.entry),
    };
  } finally {
    (backbone as DiffusionBackbone | undefined)?.[Symbol.dispose]();
  }
}

// ---------------------------------------------------------------------------------------------
// sample

/** `sample`'s options: one image from explicit reference images; the models as `RunConfig`'s. */
export interface SampleJobOptions
  extends
    JobOptions,
    Partial<Pick<RunConfig, "model" | "ipAdapter" | "negativeIpAdapter" | "imageEncoder">>,
    Partial<Pick<RunConfig, "steps" | "width" | "height" | "device" | "dtype">> {
  /** Text prompt (the negative text prompt is always ""). */
  prompt: string;
  /** Initial-noise seed, as `torch.Generator().manual_seed(seed)` on the CPU. */
  seed: number;
  /** Positive reference image: a file, or decoded pixels. Needed by guidances with images. */
  positive?: string | RgbImage | null;
  /** Negative reference image. Needed by guidances with a negative term (dipsy). */
  negative?: string | RgbImage | null;
  /** Where to write the image (.png, .jpg/.jpeg or .webp). Default: nothing written. */
  out?: string;
  /** Also save the final latents (float32) there, as safetensors with the settings. */
  latentsOut?: string;
  /** The encoding when `out` is not given. Default "png". */
  format?: ImageFormat;
  /** Replace existing output files. Default false. */
  force?: boolean;
  /** Guidance plugin. Default "dipsy". */
  guidance?: string;
  /** Its options, e.g. `{ textScale: 7.5, negativeScale: 4 }`. Default: the plugin's. */
  guidanceOptions?: Record<string, unknown>;
  /** Sampler plugin. Default "dpm-solver++". */
  sampler?: string;
  /** Its options (scheduler config overrides, e.g. `{ timestep_spacing: "trailing" }`). */
  samplerOptions?: Record<string, unknown>;
  /** At each denoising step (index from 0). */
  onProgress?: (step: { index: number; total: number }) => void;
}

/** The image `sample` made. */
export interface SampleJobResult {
  /** The encoded image (what `out` holds when given). */
  bytes: Uint8Array;
  /** Its encoding. */
  format: ImageFormat;
  /** The file written, absolute; null without `out`. */
  file: string | null;
  /** The latents file written, absolute; null without `latentsOut`. */
  latentsFile: string | null;
  /** Width in pixels. */
  width: number;
  /** Height in pixels. */
  height: number;
  /** The device it ran on. */
  device: Device;
  /** The model's dtype. */
  dtype: string;
  /** The model identifiers the backbone reports. */
  models: Record<string, string>;
  /** Seconds spent loading the model and sampling. */
  seconds: { load: number; sampling: number };
}

/** A user mistake in a job's option, which `field` names (so the CLI can name its flag). */
export class JobOptionError extends UserError {
  /** `detail` is the problem without the option's name; `overwrite`: `force` would allow it. */
  constructor(readonly field: string, readonly detail: string, readonly overwrite = false) {
    super(`${field}: ${detail}${overwrite ? " (force: true overwrites it)" : ""}`);
  }
}

/**
 * `dipsy sample`: one image. The signal is checked before the model loads and before sampling
 * starts; the image in flight is finished.
 */
export async function sample(opts: SampleJobOptions): Promise<SampleJobResult> {
  const { prepareSample, sampleImage, sampleSize } = await import("../core/sample.ts");
  const { encodeImage, readImage } = await import("../core/image.ts");
  const models = await import("./models.ts");
  await loadDefaultPlugins();
  const force = opts.force ?? false;
  const { file, format, latentsFile } = checkSampleOptions(opts);
  if (file !== null) checkWritable("out", file, force);
  if (latentsFile !== null) checkWritable("latentsOut", latentsFile, force);
  const spec = {
    prompt: opts.prompt,
    seed: opts.seed,
    guidance: opts.guidance ?? DEFAULTS.guidance.name,
    guidanceOptions: opts.guidanceOptions ?? {},
    sampler: opts.sampler ?? DEFAULTS.sampler.name,
    samplerOptions: opts.samplerOptions ?? {},
    steps: opts.steps ?? DEFAULTS.steps,
    width: opts.width ?? null,
    height: opts.height ?? null,
  };
  const given = { positive: opts.positive != null, negative: opts.negative != null };
  const { guidance, adapters, ignored } = prepareSample(spec, given);
  const log = opts.log ?? toStderr;
  for (const k of ignored) log(`note: guidance "${guidance.name}" ignores ${k}`);
  const image = async (option: "positive" | "negative", use: boolean) => {
    const ref = opts[option];
    if (!use || ref == null) return null;
    if (typeof ref !== "string") return ref;
    try {
      return await readImage(ref);
    } catch (e) {
      // An unreadable image is a mistake in its option.
      if (e instanceof ImageDecodeError) throw new JobOptionError(option, e.message);
      throw e;
    }
  };
  const refs = {
    positive: await image("positive", guidance.usesImages),
    negative: await image("negative", guidance.usesNegative),
  };
  const config: RunConfig = {
    ...DEFAULTS,
    model: opts.model ?? DEFAULTS.model,
    ipAdapter: opts.ipAdapter ?? DEFAULTS.ipAdapter,
    negativeIpAdapter: opts.negativeIpAdapter ?? null,
    imageEncoder: opts.imageEncoder ?? DEFAULTS.imageEncoder,
    device: opts.device ?? DEFAULTS.device,
    dtype: opts.dtype ?? DEFAULTS.dtype,
  };
  const placement = await models.resolvePlacement(config);
  const paths = await models.resolveModels(config, adapters);
  // The size and the sampler's options are checked against the model's config files before
  // any weights load.
  sampleSize(await models.modelGeometry(paths), spec);
  const prepared = prepareSample(spec, given, {
    schedulerConfig: await models.schedulerConfigOf(paths),
  });
  opts.signal?.throwIfAborted();
  const t0 = performance.now();
  using bb = await models.loadBackbone(config, paths, adapters, placement);
  const loaded = performance.now();
  opts.signal?.throwIfAborted();
  const result = sampleImage(bb, prepared, refs, {
    onStep: (index, total) => opts.onProgress?.({ index, total }),
  });
  using latents = result.latents;
  const { width, height } = result;
  const bytes = await encodeImage(result.image, format);
  const sampled = performance.now();
  if (file !== null) await writeNew("out", file, force, (tmp) => Deno.writeFile(tmp, bytes));
  if (latentsFile !== null) {
    const { ops, saveSafetensors } = await import("../ffi/mod.ts");
    const meta: Record<string, string> = {
      prompt: spec.prompt,
      seed: String(spec.seed),
      guidance: guidance.name,
      guidance_options: JSON.stringify(spec.guidanceOptions),
      sampler: spec.sampler,
      ...(Object.keys(spec.samplerOptions).length
        ? { sampler_options: JSON.stringify(spec.samplerOptions) }
        : {}),
      steps: String(spec.steps),
      width: String(width),
      height: String(height),
      dtype: placement.dtype,
      models: JSON.stringify(bb.modelIds),
      ...(typeof opts.positive === "string" ? { positive: opts.positive } : {}),
      ...(typeof opts.negative === "string" ? { negative: opts.negative } : {}),
    };
    using host = ops.to(latents, "f32", "cpu");
    await writeNew(
      "latentsOut",
      latentsFile,
      force,
      (tmp) => saveSafetensors(tmp, { latents: host }, meta),
    );
  }
  return {
    bytes,
    format,
    file,
    latentsFile,
    width,
    height,
    ...placement,
    models: { ...bb.modelIds },
    seconds: { load: (loaded - t0) / 1000, sampling: (sampled - loaded) / 1000 },
  };
}

/**
 * `sample`'s options checked without reading anything: no IP-Adapter or image encoder beside the
 * tiny model (it embeds its own); where it writes: the image's encoding from its name, and a
 * latents file of its own.
 */
export function checkSampleOptions(
  opts: Pick<
    SampleJobOptions,
    "model" | typeof TINY_EMBEDS[number] | "out" | "latentsOut" | "format"
  >,
): { file: string | null; format: ImageFormat; latentsFile: string | null } {
  const embedded = TINY_EMBEDS.find((k) => opts[k] != null);
  if (opts.model === TINY && embedded) {
    throw new JobOptionError(
      embedded,
      "is not for the tiny model, which embeds its own IP-Adapter and image encoder",
    );
  }
  const file = opts.out === undefined ? null : resolve(opts.out);
  const format = file === null
    ? (opts.format ?? "png")
    : IMAGE_EXTENSIONS[extname(file).slice(1).toLowerCase()];
  if (!format) {
    throw new JobOptionError("out", `${opts.out}: use a .png, .jpg, .jpeg or .webp name`);
  }
  const latentsFile = opts.latentsOut === undefined ? null : resolve(opts.latentsOut);
  if (latentsFile !== null && !latentsFile.endsWith(".safetensors")) {
    throw new JobOptionError("latentsOut", `${opts.latentsOut}: the name must end in .safetensors`);
  }
  if (latentsFile !== null && latentsFile === file) {
    throw new JobOptionError("latentsOut", "names the same file as out");
  }
  return { file, format, latentsFile };
}

/** The model files the tiny model embeds. */
const TINY_EMBEDS = ["ipAdapter", "negativeIpAdapter", "imageEncoder"] as const;

function checkWritable(option: string, file: string, force: boolean): void {
  if (!force && existsSync(file)) throw new JobOptionError(option, `${file} exists`, true);
  if (!existsSync(dirname(file))) {
    throw new JobOptionError(option, `${file}: folder ${dirname(file)} does not exist`);
  }
}

/**
 * Lets `write` fill a temporary file, then moves it into place, so a reader never sees a partial
 * file; without `force` the final step is a hard link, which fails rather than replace a file
 * that appeared meanwhile.
 */
async function writeNew(
  option: string,
  file: string,
  force: boolean,
  write: (tmp: string) => Promise<void> | void,
): Promise<void> {
  const tmp = join(dirname(file), `.${basename(file)}.${crypto.randomUUID().slice(0, 8)}.tmp`);
  try {
    await write(tmp);
    await (force ? Deno.rename(tmp, file) : Deno.link(tmp, file));
  } catch (e) {
    if (e instanceof Deno.errors.AlreadyExists) {
      throw new JobOptionError(option, `${file} exists`, true);
    }
    throw e;
  } finally {
    await Deno.remove(tmp).catch(() => {});
  }
}

// ---------------------------------------------------------------------------------------------
// similarity

/** `similarity`'s options. */
export interface SimilarityJobOptions
  extends JobOptions, ShotOptions, Partial<Pick<RunConfig, "device" | "dtype">> {
  /** Few-shot images: `DIR/<class>/*`, or the DataDream layout. */
  data: string;
  /** A .json or .npz file, or a folder. Default: similarity.json in the class root. */
  out?: string;
  /** CLIP folder or Hub id, or "tiny". Default `DEFAULT_CLIP`. */
  clip?: string;
  /** Recompute when the file exists. Default false. */
  force?: boolean;
  /** Seed of the tiny CLIP's random weights. Default 0. */
  seed?: number;
  /** After each class is encoded. */
  onProgress?: (progress: { done: number; total: number }) => void;
}

/** The class similarity matrix and where it is saved. */
export interface SimilarityJobResult {
  /** The file (absolute). */
  file: string;
  /** The classes, in the dataset's order. */
  classNames: string[];
  /** Cosine similarities, in the order of `classNames`. */
  matrix: number[][];
  /** False when a saved file was current and read instead. */
  computed: boolean;
}

/**
 * `dipsy similarity`: the class similarity matrix, saved where `generate` finds it. A saved file
 * made with another CLIP is computed again. The signal is checked before the model loads.
 */
export async function similarity(opts: SimilarityJobOptions): Promise<SimilarityJobResult> {
  const { validateDataset } = await import("../core/dataset.ts");
  const sim = await import("./similarity.ts");
  const log = opts.log ?? toStderr;
  const { device, dtype } = opts;
  const placement = parseConfigObject({ device, dtype }, "similarity options").values;
  const input = { ...opts, skipBad: opts.skipBad ?? false, negatives: false };
  const dataset = await validateDataset(opts.data, input);
  for (const p of dataset.problems) log(`${p.severity}: ${p.path}: ${p.message}`);
  let file = opts.out ? resolve(opts.out) : join(dataset.root, sim.SIMILARITY_FILE);
  if (opts.out && !/\.(json|npz)$/i.test(file)) file = join(file, sim.SIMILARITY_FILE);
  const { matrix, computed } = await sim.similarityStage(
    file,
    dataset,
    { ...DEFAULTS, ...placement, clip: opts.clip ?? DEFAULT_CLIP, modelSeed: opts.seed ?? 0 },
    {
      force: opts.force,
      log,
      beforeCompute: () => opts.signal?.throwIfAborted(),
      onClass: (done, total) => opts.onProgress?.({ done, total }),
    },
  );
  return { file, classNames: dataset.classes.map((c) => c.name), matrix, computed };
}

// ---------------------------------------------------------------------------------------------
// train

/** `train`'s options: the images (as `TrainInputs` names them), the run folder, the plugin. */
export interface TrainJobOptions
  extends JobOptions, TrainInputs, Pick<GenerateSettings, "plugins"> {
  /** Run folder; a second call resumes after the last finished epoch. */
  out: string;
  /** "auto", "cpu", "cuda" or "cuda:N". Default "auto". */
  device?: string;
  /** Image preparation threads. Default: cores - 1, at most 16. */
  workers?: number;
  /** Classifier plugin. Default "clip-lora". */
  classifier?: string;
  /**
   * Its options (`dipsy train --help` lists clip-lora's: epochs, batch, lr, lambda, rank, ...).
   * Default: the plugin's (DataDream's recipe); dtype "auto" is f16 on CUDA, f32 on the CPU.
   */
  options?: Record<string, unknown>;
  /** After each training step. */
  onProgress?: (progress: ClassifierProgress) => void;
}

/** What a `train` call left in its run folder. */
export interface TrainJobResult {
  /** False when aborted: call again to resume. */
  complete: boolean;
  /** Epochs finished in the run folder. */
  epochsDone: number;
  /** The run folder (absolute). */
  out: string;
  /** RUN/train.json, null for a classifier plugin that keeps none. */
  record: TrainRecord | null;
}

/**
 * `dipsy train`: fine-tunes the classifier on the real and synthetic images, with a checkpoint
 * per epoch. An abort stops after the step in flight.
 */
export async function train(opts: TrainJobOptions): Promise<TrainJobResult> {
  if (!opts.real && !opts.synthetic) {
    throw new JobOptionError("real", "give real and/or synthetic images");
  }
  const app = await import("./classify.ts");
  const { loadPluginFile } = await import("../core/config.ts");
  const { DEFAULT_CLASSIFIER, withRunDefaults } = await import("../cli/train_flags.ts");
  const { readTrainRecord } = await import("../plugins/classifiers/trainer.ts");
  await loadDefaultPlugins();
  for (const file of opts.plugins ?? []) await loadPluginFile(resolve(file));
  const name = opts.classifier ?? DEFAULT_CLASSIFIER;
  const given = opts.options ?? {};
  // A mistyped plugin name or option is reported before any image is read.
  await app.makeClassifier(name, withRunDefaults(given, {}));
  const data = await app.readTrainData(opts);
  const device = await app.resolveDevice(opts.device ?? "auto");
  const classifier = await app.makeClassifier(
    name,
    withRunDefaults(given, { dataset: data.dataset, device }),
  );
  const result = await app.trainStage(classifier, data, {
    ...opts,
    device,
    progress: false,
    log: opts.log ?? toStderr,
  });
  const out = resolve(opts.out);
  return { ...result, out, record: readTrainRecord(out) };
}

// ---------------------------------------------------------------------------------------------
// evaluate

/** `evaluate`'s options. */
export interface EvaluateJobOptions extends JobOptions, Pick<TrainJobOptions, "workers"> {
  /** Training run folder (of `train` or `run`). */
  model: string;
  /** Test images, one folder per class. */
  test: string;
  /** Where to write the JSON. Default RUN/eval.json, or RUN/eval-<test name>.json. */
  out?: string;
  /** Dataset name. Default: the run's. */
  dataset?: string;
  /** Images per forward. Default 64. */
  batch?: number;
  /** "auto", "cpu", "cuda" or "cuda:N". Default: the training device. */
  device?: string;
  /** Which epoch: "last", "best-val" or "best-test". Default "best-val" with a validation split. */
  select?: SelectRule;
  /** Also evaluate every epoch on the test set. Default false. */
  perEpoch?: boolean;
  /** Images evaluated so far, per pass over the test set. */
  onProgress?: (progress: { done: number; total: number }) => void;
}

/**
 * `dipsy eval`: top-1, top-5, per-class accuracy and the confusion matrix of a trained run, for
 * the epoch `select` picks; writes and returns the record (with `file`, where it went).
 */
export async function evaluate(opts: EvaluateJobOptions): Promise<EvalRecord & { file: string }> {
  const { evalStage } = await import("./classify.ts");
  return await evalStage({ ...opts, progress: false });
}

// ---------------------------------------------------------------------------------------------
// run

/**
 * `run`'s options: the experiment's inputs, generation settings and classifier options. Its
 * messages, progress bars and summary table go to stderr and stdout, as the command prints them.
 */
export interface RunJobOptions
  extends
    Pick<TrainJobOptions, "signal" | "device" | "workers" | "classifier">,
    Pick<TrainInputs, "dataset" | "fewshotSeed" | "shots" | "val" | "valShots">,
    Pick<EvaluateJobOptions, "test" | "select" | "perEpoch"> {
  /** Few-shot images (the real training set). */
  data: string;
  /** Experiment folder. */
  out: string;
  /** Run one stage only. Default: all. */
  stage?: "similarity" | "generate" | "train";
  /** Generation settings from a JSON or YAML file; `generation` overrides it. */
  config?: string;
  /** The embedded tiny models for everything. Default false. */
  tiny?: boolean;
  /**
   * Generation settings (as `generate`'s; data, out and the input keys above are the run's).
   * Plugin options go in the plugin's object: `guidance: { negativeScale: 4 }`.
   */
  generation?: Omit<GenerateSettings, "data" | "out" | "dataset" | "fewshotSeed" | "shots">;
  /** The classifier's options, as `train`'s `options`. */
  train?: Record<string, unknown>;
}

/** `run`'s record: OUT/report.json (configuration, stage timings, accuracy). */
export interface RunJobResult {
  /** 0 when every stage ran or was complete; 130 when aborted (call again to resume). */
  code: number;
  /** OUT/report.json, null when the run stopped before its end (or ran one stage). */
  report: Record<string, unknown> | null;
}

/**
 * `dipsy run`: similarity -> generate -> train -> eval into `out`, each stage skipped when its
 * output is complete. Progress is drawn on stderr as the command draws it.
 */
export async function run(opts: RunJobOptions): Promise<RunJobResult> {
  const { runExperiment } = await import("../cli/run.ts");
  const { REPORT_FILE } = await import("../core/output.ts");
  const { DEFAULT_CLASSIFIER, withRunDefaults } = await import("../cli/train_flags.ts");
  const { intFlag } = await import("../cli/command.ts");
  const { data, dataset, fewshotSeed, shots } = opts;
  const out = resolve(opts.out);
  // The run's own keys are its; generation's settings override the run's device and --tiny.
  const settings: GenerateSettings = {
    ...opts.generation,
    data,
    dataset,
    fewshotSeed,
    shots,
    out: join(out, "synthetic"),
  };
  settings.device ??= opts.device;
  if (opts.tiny) {
    settings.model ??= TINY;
    settings.clip ??= TINY;
  }
  const config = await generateConfig(settings, opts.config);
  const code = await runExperiment({
    ...opts,
    out,
    workers: intFlag(opts.workers?.toString(), "--workers"),
    valShots: intFlag(opts.valShots?.toString(), "--val-shots", 1),
    config,
    classifier: (run) => ({
      name: opts.classifier ?? DEFAULT_CLASSIFIER,
      options: withRunDefaults(
        { ...(config.model === TINY ? { clip: TINY } : {}), ...opts.train },
        run,
      ),
    }),
  });
  const report = code === 0 && opts.stage === undefined
    ? await readJson<Record<string, unknown>>(join(out, REPORT_FILE))
    : null;
  return { code, report };
}

async function readJson<T>(path: string): Promise<T | null> {
  try {
    return JSON.parse(await Deno.readTextFile(path)) as T;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    throw e;
  }
}
