/**
 * The classifier stages as the CLI runs them: reading and checking the image sets, resolving the
 * CLIP model, training with a progress bar, evaluation with its JSON record and table.
 */
import { join, resolve } from "node:path";
import type { Device } from "../ffi/mod.ts";
import { TINY } from "../core/config.ts";
import { RunError, writeAtomic } from "../core/output.ts";
import { Progress } from "../core/progress.ts";
import { type Classifier, type ClassifierTrainData, registry } from "../core/plugins.ts";
import type { EvalResult } from "../plugins/classifiers/evaluate.ts";

/** Files a CLIP folder needs for the classifier (weights, config, tokenizer). */
export const CLIP_CLASSIFIER_FILES = [
  "config.json",
  "model.safetensors",
  "vocab.json",
  "merges.txt",
];

export const EVAL_RECORD = "eval.json";
/** Which classifier plugin, with which options, trained a run folder (read back by eval). */
export const CLASSIFIER_RECORD = "classifier.json";

interface ClassifierRecord {
  name: string;
  settings: Record<string, unknown>;
  classNames: string[];
}

export async function resolveClipSource(ref: string): Promise<string> {
  if (ref === TINY) return TINY;
  const { resolveFolderRef } = await import("./models.ts");
  return await resolveFolderRef(ref, CLIP_CLASSIFIER_FILES);
}

export async function resolveDevice(device: string): Promise<Device> {
  if (device !== "auto") return device as Device;
  const { runtimeInfo } = await import("../ffi/mod.ts");
  return runtimeInfo().cuda_available ? "cuda" : "cpu";
}

export interface TrainInputs {
  real?: string;
  synthetic?: string;
  /** Dataset name (DataDream layout, prompt word). */
  dataset?: string;
  fewshotSeed?: string;
  skipBad?: boolean;
}

/** Reads both sets and checks them against each other before anything trains. */
export async function readTrainData(
  inputs: TrainInputs,
): Promise<ClassifierTrainData & { dataset?: string }> {
  const { labelImages, readImageFolder, trainingClasses } = await import(
    "../plugins/classifiers/data.ts"
  );
  const opts = {
    dataset: inputs.dataset,
    fewshotSeed: inputs.fewshotSeed,
    skipBad: inputs.skipBad,
  };
  const real = inputs.real ? await readImageFolder(inputs.real, opts) : null;
  const synthetic = inputs.synthetic
    ? await readImageFolder(inputs.synthetic, { skipBad: inputs.skipBad })
    : null;
  const classNames = trainingClasses(real, synthetic);
  return {
    classNames,
    real: real ? labelImages(real, classNames, false) : [],
    synthetic: synthetic ? labelImages(synthetic, classNames, true) : [],
    dataset: inputs.dataset ?? real?.dataset,
  };
}

/** Builds a classifier plugin by name from options (defaults: clip-lora). */
export async function makeClassifier(
  name: string,
  options: Record<string, unknown>,
): Promise<Classifier> {
  const { loadDefaultPlugins } = await import("./plugins.ts");
  await loadDefaultPlugins();
  return registry.create<Classifier>("classifier", name, options);
}

export interface TrainStageOptions {
  out: string;
  device: string;
  workers?: number;
  signal?: AbortSignal;
  /** Progress bar and log lines on stderr (default true). */
  progress?: boolean;
}

/** Trains (or resumes) into `opts.out` with a progress bar: loss, learning rate, images/s. */
export async function trainStage(
  classifier: Classifier,
  data: ClassifierTrainData,
  opts: TrainStageOptions,
): Promise<{ complete: boolean; epochsDone: number }> {
  const modelSource = await resolveClipSource(classifier.model);
  const device = await resolveDevice(opts.device);
  let bar: Progress | null = null;
  const show = opts.progress ?? true;
  const log = (line: string) => (bar ? bar.log(line) : show && console.error(line));
  const out = resolve(opts.out);
  try {
    const result = await classifier.train(data, {
      out,
      modelSource,
      device,
      workers: opts.workers,
      signal: opts.signal,
      log,
      onProgress: (p) => {
        if (!show) return;
        bar ??= new Progress(p.totalImages, { unit: "images", label: "train" });
        const num = (x: number, f: (x: number) => string) => (Number.isFinite(x) ? f(x) : "-");
        bar.update(
          p.images,
          `epoch ${p.epoch}/${p.epochs}  loss ${num(p.loss, (x) => x.toFixed(4))}  ` +
            `lr ${num(p.lr, (x) => x.toExponential(2))}`,
        );
      },
    });
    // Written once the plugin has accepted the folder (it refuses one holding another run).
    const record: ClassifierRecord = {
      name: classifier.name,
      settings: { ...classifier.settings },
      classNames: [...data.classNames],
    };
    await writeAtomic(
      join(out, CLASSIFIER_RECORD),
      new TextEncoder().encode(JSON.stringify(record, null, 2) + "\n"),
    );
    return result;
  } finally {
    (bar as Progress | null)?.finish();
  }
}

function readClassifierRecord(run: string): ClassifierRecord {
  const path = join(run, CLASSIFIER_RECORD);
  let record: ClassifierRecord;
  try {
    record = JSON.parse(Deno.readTextFileSync(path));
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new RunError(`${run}: not a training run folder (no ${CLASSIFIER_RECORD})`);
    }
    throw new RunError(`${path}: ${(e as Error).message}`);
  }
  if (typeof record?.name !== "string" || !Array.isArray(record.classNames)) {
    throw new RunError(`${path}: not a classifier record (needs name, settings, classNames)`);
  }
  return record;
}

export interface EvalStageOptions {
  /** Training run folder. */
  model: string;
  /** Test images: root/<class>/* (or the DataDream layout). */
  test: string;
  /** Where to write the JSON (default RUN/eval.json). */
  out?: string;
  device?: string;
  workers?: number;
  batch?: number;
  dataset?: string;
  signal?: AbortSignal;
  progress?: boolean;
}

/** Evaluates a trained run on a test folder; writes the JSON record. */
export async function evalStage(opts: EvalStageOptions): Promise<EvalResult & { file: string }> {
  const { labelImages, readImageFolder } = await import("../plugins/classifiers/data.ts");
  const { evaluate } = await import("../plugins/classifiers/evaluate.ts");
  const run = resolve(opts.model);
  const record = readClassifierRecord(run);
  // The test set is checked before the model loads.
  const folder = await readImageFolder(opts.test, { dataset: opts.dataset });
  const images = labelImages(folder, record.classNames, false, `the model in ${run}`);
  if (images.length === 0) throw new RunError(`${opts.test}: no test images`);
  const classifier = await makeClassifier(record.name, record.settings);
  const device = opts.device ? await resolveDevice(opts.device) : undefined;
  const modelSource = await resolveClipSource(classifier.model);
  using trained = await classifier.load(run, { modelSource, device });
  const show = opts.progress ?? true;
  const bar = show ? new Progress(images.length, { unit: "images", label: "eval" }) : null;
  let result: EvalResult;
  try {
    result = await evaluate(trained, images, {
      batch: opts.batch,
      loader: { workers: opts.workers },
      signal: opts.signal,
      onProgress: (done) => bar?.update(done),
    });
  } finally {
    bar?.finish();
  }
  const file = resolve(opts.out ?? join(run, EVAL_RECORD));
  const json = {
    model: run,
    test: resolve(opts.test),
    ...result,
  };
  await writeAtomic(file, new TextEncoder().encode(JSON.stringify(json, null, 2) + "\n"));
  return { ...result, file };
}
