/**
 * The classifier stages as the CLI runs them: reading and checking the image sets (and the
 * validation split), resolving the CLIP model, training with a progress bar, evaluation with its
 * JSON record and table, and model selection over the epochs' checkpoints.
 *
 * Selection rules: "last" takes the final epoch; "best-val" the epoch with the highest top-1 on
 * the validation split (train --val / --val-shots), so that choosing never reads the test set;
 * "best-test" the epoch with the highest top-1 on the test set itself, as DataDream reports its
 * numbers. Ties go to the earliest epoch (DataDream keeps a new best only when it is higher).
 */
import { existsSync, readFileSync } from "node:fs";
import { basename, dirname, join, relative, resolve } from "node:path";
import type { Device } from "../ffi/mod.ts";
import { TINY } from "../core/config.ts";
import { RunError, writeAtomic, writeJsonAtomic } from "../core/output.ts";
import { Progress } from "../core/progress.ts";
import { type Provenance, provenance } from "../core/provenance.ts";
import {
  type Classifier,
  type ClassifierTrainData,
  type LabeledImage,
  registry,
} from "../core/plugins.ts";
import type { ImageFolder } from "../plugins/classifiers/data.ts";
import type { EvalMetrics, EvalResult, ImagePrediction } from "../plugins/classifiers/evaluate.ts";
import type { EvaluateJobOptions, TrainJobOptions } from "./api.ts";
import { HF_MODEL_FILES, resolveFolderRef } from "./models.ts";
import { loadDefaultPlugins } from "./plugins.ts";

/** Files a CLIP folder needs for the classifier (weights, config, tokenizer). */
export const CLIP_CLASSIFIER_FILES = [...HF_MODEL_FILES, "vocab.json", "merges.txt"];

export const EVAL_RECORD = "eval.json";

/** One line of the predictions file beside an eval record: one test image. */
export interface PredictionLine {
  /** The image, relative to the test folder (with "/"). */
  file: string;
  /** Its class. */
  label: string;
  /** The class it was taken for. */
  predicted: string;
  /** The highest-scoring classes, highest first (up to 5). */
  top5: string[];
  correct: boolean;
}

/** The predictions file of an eval record: predictions-<record name>.jsonl beside it. */
export function predictionsFileFor(evalFile: string): string {
  return join(dirname(evalFile), `predictions-${basename(evalFile).replace(/\.json$/i, "")}.jsonl`);
}
/** The validation split of a run and its per-epoch results (written by training). */
export const VALIDATION_RECORD = "validation.json";
const VALIDATION_FORMAT = "dipsy-validation";

/** Which epoch's weights are evaluated (see the module's note). */
export type SelectRule = "last" | "best-val" | "best-test";

/** Said wherever a test-selected number is shown or saved. */
export const TEST_SELECTED_WARNING = "the epoch was chosen on the test set (as DataDream " +
  "reports): an optimistic number, comparable with DataDream's tables, not a held-out estimate";
/** Which classifier plugin, with which options, trained a run folder (read back by eval). */
export const CLASSIFIER_RECORD = "classifier.json";

interface ClassifierRecord {
  name: string;
  settings: Record<string, unknown>;
  classNames: string[];
  /** The device it was trained on (the default of its evaluation). */
  device?: string;
}

export async function resolveClipSource(ref: string): Promise<string> {
  if (ref === TINY) return TINY;
  return await resolveFolderRef(ref, CLIP_CLASSIFIER_FILES);
}

export async function resolveDevice(device: string): Promise<Device> {
  if (device !== "auto") return device as Device;
  const { runtimeInfo } = await import("../ffi/mod.ts");
  return runtimeInfo().cuda_available ? "cuda" : "cpu";
}

/** Which shots of a few-shot folder are read. */
export interface ShotOptions {
  /** Dataset name: DataDream layout, the prompt word, a benchmark's class names. */
  dataset?: string;
  /** DataDream few-shot split when there are several. */
  fewshotSeed?: string;
  /** The first k ranked shots of each class. Default: all. */
  shots?: number;
  /** Leave unreadable or broken images out. Default false. */
  skipBad?: boolean;
}

/** The images a classifier trains on, and its validation split. */
export interface TrainInputs extends ShotOptions {
  /** Real few-shot images: `DIR/<class>/*`, or the DataDream layout. */
  real?: string;
  /** Synthetic images: a generate output folder, or `DIR/<class>/*`. */
  synthetic?: string;
  /** Validation images, one folder per class (for `evaluate`'s "best-val"). */
  val?: string;
  /** Or: the last n real shots of each class, kept out of training for validation. */
  valShots?: number;
}

export interface TrainData extends ClassifierTrainData {
  dataset?: string;
  /** Images to choose the epoch by; empty without a validation split. */
  validation: LabeledImage[];
  /** Where they come from ("DIR" or "the last n shots of DIR"). */
  validationFrom?: string;
}

/** Reads both sets (and the validation split) and checks them before anything trains. */
export async function readTrainData(inputs: TrainInputs): Promise<TrainData> {
  const { labelImages, readImageFolder, trainingClasses } = await import(
    "../plugins/classifiers/data.ts"
  );
  if (inputs.val !== undefined && inputs.valShots !== undefined) {
    throw new RunError("give a validation folder or a number of shots to hold out, not both");
  }
  if (inputs.valShots !== undefined && !inputs.real) {
    throw new RunError("holding shots out for validation needs the real images");
  }
  const real = inputs.real
    ? await readImageFolder(inputs.real, { ...inputs, holdout: inputs.valShots })
    : null;
  const synthetic = inputs.synthetic
    ? await readImageFolder(inputs.synthetic, { skipBad: inputs.skipBad })
    : null;
  const classNames = trainingClasses(real, synthetic);
  const dataset = inputs.dataset ?? real?.dataset;
  let held: ImageFolder | null = null, validationFrom: string | undefined;
  if (inputs.val !== undefined) {
    held = await readImageFolder(inputs.val, { dataset, skipBad: inputs.skipBad });
    validationFrom = held.path;
  } else if (inputs.valShots && real?.heldOut) {
    held = { ...real, images: real.heldOut };
    validationFrom = `the last ${inputs.valShots} shot(s) per class of ${real.path}`;
  }
  const validation = held ? labelImages(held, classNames, false, "the training set") : [];
  return {
    classNames,
    real: real ? labelImages(real, classNames, false) : [],
    synthetic: synthetic ? labelImages(synthetic, classNames, true) : [],
    dataset,
    validation,
    validationFrom,
  };
}

/** Builds a classifier plugin by name from options (defaults: clip-lora). */
export async function makeClassifier(
  name: string,
  options: Record<string, unknown>,
): Promise<Classifier> {
  await loadDefaultPlugins();
  return registry.create<Classifier>("classifier", name, options);
}

/** `trainStage`'s options: `train`'s, on a resolved device, with or without progress bars. */
export interface TrainStageOptions
  extends Pick<TrainJobOptions, "out" | "workers" | "signal" | "onProgress" | "log"> {
  device: string;
  /** Progress bar and log lines on stderr (default true). */
  progress?: boolean;
}

/**
 * Trains (or resumes) into `opts.out` with a progress bar: loss, learning rate, images/s. With
 * a validation split, a complete run is then evaluated on it epoch by epoch (validation.json).
 */
export async function trainStage(
  classifier: Classifier,
  data: TrainData,
  opts: TrainStageOptions,
): Promise<{ complete: boolean; epochsDone: number; validation?: ValidationRecord }> {
  const modelSource = await resolveClipSource(classifier.model);
  const device = await resolveDevice(opts.device);
  let bar: Progress | null = null;
  const show = opts.progress ?? true;
  const log = (line: string) =>
    bar ? bar.log(line) : opts.log ? opts.log(line) : show && console.error(line);
  const out = resolve(opts.out);
  let result: { complete: boolean; epochsDone: number };
  try {
    result = await classifier.train(data, {
      out,
      modelSource,
      device,
      workers: opts.workers,
      signal: opts.signal,
      log,
      onProgress: (p) => {
        opts.onProgress?.(p);
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
      device,
    };
    await writeJsonAtomic(join(out, CLASSIFIER_RECORD), record);
  } finally {
    (bar as Progress | null)?.finish();
  }
  if (!result.complete || !data.validation.length) return result;
  const validation = await validateEpochs(classifier, out, data.validation, {
    from: data.validationFrom ?? "",
    device: opts.device,
    workers: opts.workers,
    signal: opts.signal,
    progress: opts.progress,
  });
  return { ...result, validation };
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

/** `evalStage`'s options: `evaluate`'s, with or without progress bars. */
export interface EvalStageOptions extends Omit<EvaluateJobOptions, "log"> {
  /** Progress bars on stderr (default true). */
  progress?: boolean;
}

/** Top-1, top-k and the mean per class of one epoch. */
export interface EpochMetrics
  extends Pick<EvalMetrics, "top1" | "top5" | "meanPerClass" | "correct" | "total"> {
  /** The epoch, from 1. */
  epoch: number;
}

/** Which epoch an evaluation took, and why. */
export interface Selection {
  /** The rule asked for. */
  rule: SelectRule;
  /** The epoch whose weights were evaluated. */
  epoch: number;
  /** What chose it. */
  selectedOn: "last epoch" | "validation" | "test";
  /** True when the test set chose the epoch: the number is not a held-out estimate. */
  testSelected: boolean;
  /** Said with a test-selected number. */
  warning?: string;
}

/** What eval.json holds: the metrics of the selected epoch on a test folder. */
export interface EvalRecord extends EvalResult {
  /** The training run folder (absolute). */
  model: string;
  /** The test folder (absolute). */
  test: string;
  /** Which epoch was evaluated. */
  selection: Selection;
  /** Test metrics of every epoch (with perEpoch or best-test). */
  perEpoch?: EpochMetrics[];
  /** Who evaluated it, on which device. */
  provenance?: Provenance;
  /** The run's validation results, when it has a validation split. */
  validation?: { from: string; images: number; epochs: EpochMetrics[] };
}

export interface ValidationRecord {
  format: typeof VALIDATION_FORMAT;
  version: 1;
  from: string;
  images: number;
  /** sha256 of the (label, file) list, as the trainer fingerprints its images. */
  fingerprint: string;
  epochs: EpochMetrics[];
  best: { epoch: number; top1: number };
}

const brief = (epoch: number, m: EvalMetrics): EpochMetrics => {
  const { top1, top5, meanPerClass, correct, total } = m;
  return { epoch, top1, top5, meanPerClass, correct, total };
};

/** The epoch of the highest top-1, the earliest among equals. */
export function bestEpoch(epochs: readonly EpochMetrics[]): EpochMetrics {
  if (!epochs.length) throw new RunError("no epoch results to choose from");
  return epochs.reduce((best, e) => (e.top1 > best.top1 ? e : best));
}

export function readValidationRecord(run: string): ValidationRecord | null {
  const path = join(run, VALIDATION_RECORD);
  if (!existsSync(path)) return null;
  try {
    const r = JSON.parse(readFileSync(path, "utf8")) as ValidationRecord;
    if (r?.format !== VALIDATION_FORMAT) throw new Error(`format ${JSON.stringify(r?.format)}`);
    return r;
  } catch (e) {
    throw new RunError(`${path}: not a validation record (${(e as Error).message})`);
  }
}

/** Loads each epoch's checkpoint in turn and evaluates it on `images` (with each prediction). */
async function evaluateEpochs<E extends number | undefined>(
  classifier: Classifier,
  run: string,
  images: readonly LabeledImage[],
  epochs: readonly E[],
  label: string,
  opts: Partial<EvalStageOptions>,
  onEpoch: (epoch: E, result: EvalResult, predictions: ImagePrediction[]) => unknown,
): Promise<void> {
  const { evaluate } = await import("../plugins/classifiers/evaluate.ts");
  const device = opts.device ? await resolveDevice(opts.device) : undefined;
  const modelSource = await resolveClipSource(classifier.model);
  for (const epoch of epochs) {
    const show = opts.progress ?? true;
    const what = epoch === undefined ? label : `${label} epoch ${epoch}`;
    const bar = show ? new Progress(images.length, { unit: "images", label: what }) : null;
    try {
      using trained = await classifier.load(run, { modelSource, device, epoch });
      const predictions: ImagePrediction[] = [];
      const r = await evaluate(trained, images, {
        predictions,
        batch: opts.batch,
        loader: { workers: opts.workers },
        signal: opts.signal,
        onProgress: (done) => {
          bar?.update(done);
          opts.onProgress?.({ done, total: images.length });
        },
      });
      await onEpoch(epoch, r, predictions);
    } finally {
      bar?.finish();
    }
  }
}

function runEpochs(classifier: Classifier, run: string): number[] {
  const epochs = classifier.epochs?.(run) ?? [];
  if (!epochs.length) {
    throw new RunError(`${run}: the ${classifier.name} classifier keeps no per-epoch checkpoints`);
  }
  return epochs;
}

/**
 * Evaluates every epoch of a complete run on the validation images and writes
 * RUN/validation.json; epochs already recorded for the same images are not evaluated again.
 */
async function validateEpochs(
  classifier: Classifier,
  run: string,
  images: readonly LabeledImage[],
  opts: Partial<EvalStageOptions> & { from: string },
): Promise<ValidationRecord> {
  const out = resolve(run);
  const epochs = runEpochs(classifier, out);
  const fingerprint = (await import("../plugins/classifiers/trainer.ts")).fingerprint(images);
  const previous = readValidationRecord(out);
  const known = new Map(
    previous?.fingerprint === fingerprint ? previous.epochs.map((e) => [e.epoch, e]) : [],
  );
  const record = (): ValidationRecord => {
    const list = epochs.filter((e) => known.has(e)).map((e) => known.get(e)!);
    const best = list.length ? bestEpoch(list) : { epoch: 0, top1: 0 };
    return {
      format: VALIDATION_FORMAT,
      version: 1,
      from: opts.from,
      images: images.length,
      fingerprint,
      epochs: list,
      best: { epoch: best.epoch, top1: best.top1 },
    };
  };
  const save = () => writeJsonAtomic(join(out, VALIDATION_RECORD), record());
  const todo = epochs.filter((e) => !known.has(e));
  // Each epoch is saved as it is done, so an interrupted evaluation resumes.
  await evaluateEpochs(classifier, out, images, todo, "val", opts, async (epoch, r) => {
    known.set(epoch, brief(epoch, r));
    await save();
  });
  if (!todo.length && JSON.stringify(previous) !== JSON.stringify(record())) await save();
  return record();
}

/** Evaluates a trained run on a test folder; writes the JSON record. */
export async function evalStage(opts: EvalStageOptions): Promise<EvalRecord & { file: string }> {
  const { labelImages, readImageFolder } = await import("../plugins/classifiers/data.ts");
  const run = resolve(opts.model);
  const record = readClassifierRecord(run);
  const validation = readValidationRecord(run);
  const rule = opts.select ?? (validation ? "best-val" : "last");
  if (rule === "best-val" && !validation?.epochs.length) {
    throw new RunError(
      `${run}: no validation results to select by (train it with a validation split: ` +
        "--val DIR or --val-shots N)",
    );
  }
  // The test set is checked before the model loads.
  const dataset = opts.dataset ?? (record.settings.dataset as string | null | undefined) ??
    undefined;
  const folder = await readImageFolder(opts.test, { dataset });
  const images = labelImages(folder, record.classNames, false, `the model in ${run}`);
  if (images.length === 0) throw new RunError(`${opts.test}: no test images`);
  const classifier = await makeClassifier(record.name, record.settings);
  // A classifier without per-epoch checkpoints can still be evaluated as it ended.
  const epochs = rule === "last" && !opts.perEpoch
    ? (classifier.epochs?.(run) ?? [])
    : runEpochs(classifier, run);
  const last = epochs.at(-1);

  // The epochs evaluated on the test set, with each image's prediction to keep the selected one's.
  const tested = new Map<number | undefined, [EvalResult, ImagePrediction[]]>();
  const onTest = (list: readonly (number | undefined)[], label: string) =>
    evaluateEpochs(classifier, run, images, list, label, opts, (e, r, p) => tested.set(e, [r, p]));
  if (rule === "best-test" || opts.perEpoch) await onTest(epochs, "test");
  const briefs = tested.size ? [...tested].map(([e, [r]]) => brief(e!, r)) : undefined;
  const selection: Selection = rule === "best-test"
    ? { rule, epoch: bestEpoch(briefs!).epoch, selectedOn: "test", testSelected: true }
    : rule === "best-val"
    ? { rule, epoch: validation!.best.epoch, selectedOn: "validation", testSelected: false }
    : { rule, epoch: last ?? 0, selectedOn: "last epoch", testSelected: false };
  if (selection.testSelected) selection.warning = TEST_SELECTED_WARNING;
  const which = rule === "last" ? last : selection.epoch;
  if (!tested.has(which)) await onTest([which], "eval");
  const [result, predictions] = tested.get(which)!;

  const file = opts.out === undefined ? evalFileFor(run, opts.test) : resolve(opts.out);
  const json: EvalRecord = {
    model: run,
    test: resolve(opts.test),
    selection,
    ...result,
    ...(briefs ? { perEpoch: briefs } : {}),
    ...(validation
      ? {
        validation: { from: validation.from, images: validation.images, epochs: validation.epochs },
      }
      : {}),
    provenance: await provenance({
      device: opts.device ? await resolveDevice(opts.device) : record.device ?? "unknown",
      dtype: String(record.settings.dtype ?? "unknown"),
    }),
  };
  // Written first: a record on disk always has its own predictions beside it.
  const names = record.classNames, testDir = resolve(opts.test);
  const lines = predictions.map((p, i): PredictionLine => ({
    file: relative(testDir, images[i].path).replaceAll("\\", "/"),
    label: names[p.label],
    predicted: names[p.predicted],
    top5: p.top.map((j) => names[j]),
    correct: p.label === p.predicted,
  }));
  await writeAtomic(predictionsFileFor(file), lines.map((l) => JSON.stringify(l) + "\n").join(""));
  await writeJsonAtomic(file, json);
  return { ...json, file };
}

/**
 * RUN/eval.json, unless it holds the results of another test folder: then
 * RUN/eval-<folder name>.json, so that evaluating on a second test set keeps the first.
 */
export function evalFileFor(run: string, test: string): string {
  const testDir = resolve(test);
  const held = (file: string) => {
    try {
      return (JSON.parse(readFileSync(file, "utf8")) as { test?: string }).test ?? null;
    } catch {
      return null; // missing or unreadable: free to (re)write
    }
  };
  const own = join(run, EVAL_RECORD);
  const first = held(own);
  if (first === null || first === testDir) return own;
  const other = join(run, `eval-${basename(testDir)}.json`);
  const second = held(other);
  if (second !== null && second !== testDir) {
    throw new RunError(
      `${other} holds the results of ${second}, another test folder named like ${testDir}: ` +
        "give --out FILE",
    );
  }
  return other;
}
