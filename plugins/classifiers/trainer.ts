/**
 * The training job of the DataDream recipe around `ClipLoraClassifier`: epochs over the real +
 * synthetic list, batches prepared ahead by the image loader, a checkpoint after every epoch and
 * resumption from the last one.
 *
 * A run folder holds:
 *   train.json                   settings, classes, data fingerprint, per-epoch history, status
 *   steps.jsonl                  one line per optimizer step (loss, learning rate, images/s) of
 *                                the checkpointed epochs, appended an epoch at a time
 *   checkpoints/epoch-NNN/       the peft adapter of that epoch, plus optimizer.safetensors and
 *                                state.json (what resuming needs)
 *   adapter/                     the final adapter (peft layout), once training is complete
 *
 * Every random draw depends only on (seed, epoch, position): the shuffle, each image's
 * augmentation and the LoRA dropout (libtorch's generator is reseeded per epoch). A run killed and
 * resumed therefore ends with the same weights as one that was never interrupted.
 */
import {
  appendFileSync,
  cpSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
} from "node:fs";
import { createHash } from "node:crypto";
import { join } from "node:path";
import {
  type Device,
  type DType,
  fromHost,
  keep,
  manualSeed,
  SafetensorsFile,
  saveSafetensors,
  scope,
  type Tensor,
} from "../../ffi/mod.ts";
import type { ClassifierJob, ClassifierTrainData, LabeledImage } from "../../core/plugins.ts";
import { RunError, writeAtomic, writeJsonAtomic } from "../../core/output.ts";
import { type Provenance, provenance } from "../../core/provenance.ts";
import { deriveSeed } from "../../core/rng.ts";
import {
  type ClipLoraClassifier,
  type ClipTower,
  loadClipLoraClassifier,
  type TrainMode,
} from "./clip_lora.ts";
import type { LoraConfig } from "./lora.ts";
import { batchesOf, epochItems, epochOrder, realRepeats } from "./data.ts";
import { ImageLoader, type LoaderOptions } from "./loader.ts";
import type { PrepareJob } from "./prepare.ts";
import { trainSettings } from "./settings.ts";
import { readStepHistory, STEP_HISTORY, type StepRecord } from "./steps.ts";

export const TRAIN_RECORD = "train.json";
/** The `format` of train.json. */
export const TRAIN_FORMAT = "dipsy-train-run";
export const CHECKPOINTS = "checkpoints";
export const FINAL_ADAPTER = "adapter";

/** Everything that decides the trained weights (a resumed run must match it). */
export interface TrainSettings {
  /** CLIP reference as given ("tiny", a folder or a Hub id). */
  clip: string;
  /** Seed of a preset's random weights. */
  modelSeed: number;
  /** Training epochs. */
  epochs: number;
  /** Epochs of linear warm-up before the cosine decay. */
  warmupEpochs: number;
  /** Images per optimizer step. */
  batch: number;
  /** Peak learning rate. */
  lr: number;
  /** Start of the warm-up and end of the cosine. */
  minLr: number;
  /** AdamW weight decay. */
  weightDecay: number;
  /** Weight of the real part of the loss (the synthetic part has 1 - lambda). */
  lambda: number;
  /** Which images train: mixed, real only or synthetic only. */
  mode: TrainMode;
  /** LoRA rank, alpha and dropout. */
  lora: LoraConfig;
  /** The attention projections that get LoRA. */
  targetModules: string[];
  /** The CLIP towers that get LoRA. */
  towers: ClipTower[];
  /** Prompt template (`{class}`, `{word}`); null: DataDream's. */
  classPrompt: string | null;
  /** Dataset name, for the prompt word. */
  dataset: string | null;
  /** Repeats of the real shots per epoch; null: DataDream's floor(synthetic / real). */
  repeatReal: number | null;
  /** Seed of shuffling, augmentation, dropout and the LoRA init. */
  seed: number;
  /** The recipe's training augmentation; false: the test transform only. */
  augment: boolean;
  /** The frozen weights' dtype (LoRA weights stay f32). */
  dtype: DType;
}

/** One finished epoch in train.json. */
export interface EpochRecord {
  /** The epoch, from 1. */
  epoch: number;
  /** Mean batch loss. */
  loss: number;
  /** Wall-clock seconds. */
  seconds: number;
  /** Training throughput. */
  imagesPerSecond: number;
  /** Rate of the epoch's last step. */
  lr: number;
  /** Optimizer steps skipped by loss scaling (inf/NaN gradients). */
  skippedSteps: number;
}

/** What train.json holds: the settings, the data, and each finished epoch. */
export interface TrainRecord {
  /** Always TRAIN_FORMAT. */
  format: typeof TRAIN_FORMAT;
  /** The record layout's version. */
  version: 1;
  /** "complete" once every epoch is done and the adapter is saved. */
  status: "running" | "complete";
  /** Everything that decides the weights. */
  settings: TrainSettings;
  /** The classes, in label order. */
  classNames: string[];
  /** Each class's text prompt. */
  prompts: string[];
  /** Image counts per kind and epoch, and the fingerprint of the image list. */
  data: {
    real: number;
    synthetic: number;
    repeatReal: number;
    perEpoch: number;
    itersPerEpoch: number;
    /** sha256 of the (label, kind, file) list: a resumed run must train on the same images. */
    fingerprint: string;
  };
  /** The resolved model folder (or preset) the run loaded. */
  modelSource: string;
  /** The device it trained on. */
  device: string;
  /** Epochs finished (and checkpointed). */
  epochsDone: number;
  /** One entry per finished epoch. */
  history: EpochRecord[];
  /** Training seconds, over every session. */
  seconds: number;
  /** Who trained it (of the latest session); never compared on resume. */
  provenance?: Provenance;
}

/** The plugin's job, with the image loader's options in place of its thread count. */
export interface TrainJobOptions extends Omit<ClassifierJob, "workers"> {
  loader?: LoaderOptions;
}

export interface TrainResult {
  record: TrainRecord;
  /** Whether anything was trained in this call (false: the run was complete already). */
  trained: boolean;
  /** Whether the signal stopped it before the last epoch. */
  interrupted: boolean;
}

export function fingerprint(items: readonly LabeledImage[]): string {
  const h = createHash("sha256");
  for (const im of items) h.update(`${im.label}\t${im.synthetic ? "s" : "r"}\t${im.path}\n`);
  return h.digest("hex");
}

export const epochDir = (out: string, epoch: number): string =>
  join(out, CHECKPOINTS, `epoch-${String(epoch).padStart(3, "0")}`);

export function readTrainRecord(out: string): TrainRecord | null {
  const path = join(out, TRAIN_RECORD);
  if (!existsSync(path)) return null;
  let record: TrainRecord;
  try {
    record = JSON.parse(readFileSync(path, "utf8"));
  } catch (e) {
    throw new RunError(`${path} is not valid JSON (${(e as Error).message})`);
  }
  if (record?.format !== TRAIN_FORMAT) {
    throw new RunError(`${path} is not a dipsy training record (format "${record?.format}")`);
  }
  return record;
}

function differences(a: unknown, b: unknown, prefix = ""): string[] {
  if (a !== null && b !== null && typeof a === "object" && typeof b === "object") {
    const keys = [...new Set([...Object.keys(a), ...Object.keys(b)])].sort();
    return keys.flatMap((k) =>
      differences(
        (a as Record<string, unknown>)[k],
        (b as Record<string, unknown>)[k],
        prefix ? `${prefix}.${k}` : k,
      )
    );
  }
  return JSON.stringify(a) === JSON.stringify(b)
    ? []
    : [`${prefix}: ${JSON.stringify(a)} before, ${JSON.stringify(b)} now`];
}

/**
 * Cuts steps.jsonl back to the checkpointed epochs: an epoch's steps are appended just before its
 * checkpoint, so a kill in between (or during the append) leaves steps that the resumed run
 * redoes.
 */
async function restoreStepHistory(out: string, done: number): Promise<void> {
  const path = join(out, STEP_HISTORY);
  if (!existsSync(path)) return;
  const kept = readStepHistory(out).filter((s) => s.epoch <= done);
  const text = kept.map((s) => JSON.stringify(s) + "\n").join("");
  if (readFileSync(path, "utf8") !== text) await writeAtomic(path, text, `${path}.tmp`);
}

interface CheckpointState {
  epoch: number;
  /** The epoch's history entry: a kill between the checkpoint and train.json must not lose it. */
  record: EpochRecord;
  iteration: number;
  optimizerSteps: number[];
  scaler: { scale: number; growthTracker: number } | null;
}

function saveCheckpoint(clf: ClipLoraClassifier, out: string, record: EpochRecord): void {
  const epoch = record.epoch;
  const final = epochDir(out, epoch);
  const tmp = `${final}.tmp`;
  rmSync(tmp, { recursive: true, force: true });
  clf.saveAdapter(tmp);
  const tensors = new Map<string, Tensor>();
  const steps: number[] = [];
  clf.optimizer.state.forEach((s, i) => {
    steps.push(s?.step ?? 0);
    if (s) {
      tensors.set(`${i}.exp_avg`, s.expAvg);
      tensors.set(`${i}.exp_avg_sq`, s.expAvgSq);
    }
  });
  saveSafetensors(join(tmp, "optimizer.safetensors"), tensors, { format: "pt" });
  const state: CheckpointState = {
    epoch,
    record,
    iteration: clf.iteration,
    optimizerSteps: steps,
    scaler: clf.scaler
      ? { scale: clf.scaler.scale, growthTracker: clf.scaler.growthTracker }
      : null,
  };
  // Written last, into a folder that is renamed into place whole.
  Deno.writeTextFileSync(join(tmp, "state.json"), JSON.stringify(state, null, 2) + "\n");
  rmSync(final, { recursive: true, force: true });
  renameSync(tmp, final);
}

function checkpointState(out: string, epoch: number): CheckpointState {
  return JSON.parse(readFileSync(join(epochDir(out, epoch), "state.json"), "utf8"));
}

function loadCheckpoint(clf: ClipLoraClassifier, out: string, epoch: number): void {
  const dir = epochDir(out, epoch);
  const state = checkpointState(out, epoch);
  clf.loadAdapter(dir);
  const file = SafetensorsFile.open(join(dir, "optimizer.safetensors"));
  const device = clf.optimizer.params[0].device;
  if (state.optimizerSteps.length !== clf.optimizer.params.length) {
    throw new RunError(
      `${dir}: optimizer state for ${state.optimizerSteps.length} tensors, the model has ${clf.optimizer.params.length}`,
    );
  }
  state.optimizerSteps.forEach((step, i) => {
    if (step === 0) return;
    clf.optimizer.state[i]?.expAvg.dispose();
    clf.optimizer.state[i]?.expAvgSq.dispose();
    clf.optimizer.state[i] = {
      step,
      expAvg: keep(file.load(`${i}.exp_avg`, { dtype: "f32", device })),
      expAvgSq: keep(file.load(`${i}.exp_avg_sq`, { dtype: "f32", device })),
    };
  });
  clf.iteration = state.iteration;
  if (clf.scaler && state.scaler) Object.assign(clf.scaler, state.scaler);
}

/** The classifier a run trains (fresh LoRA) or trained (with `adapter`). */
async function openClassifier(
  settings: TrainSettings,
  classNames: readonly string[],
  modelSource: string,
  device: Device,
  opts: { adapter?: string; itersPerEpoch?: number } = {},
): Promise<ClipLoraClassifier> {
  return await loadClipLoraClassifier(modelSource, {
    classNames,
    dataset: settings.dataset ?? undefined,
    classPrompt: settings.classPrompt ?? undefined,
    lora: settings.lora,
    targetModules: settings.targetModules,
    towers: settings.towers,
    adapter: opts.adapter,
    lambda: settings.lambda,
    mode: settings.mode,
    weightDecay: settings.weightDecay,
    schedule: {
      baseLr: settings.lr,
      finalLr: settings.minLr,
      warmupStartLr: settings.minLr,
      epochs: settings.epochs,
      warmupEpochs: settings.warmupEpochs,
      itersPerEpoch: opts.itersPerEpoch,
    },
    seed: settings.seed,
    load: { dtype: settings.dtype, device, seed: settings.modelSeed },
  });
}

/**
 * Trains (or resumes, or finds complete) the run in `opts.out`. Stops between steps when the
 * signal aborts; the epochs already checkpointed are kept.
 */
export async function trainRun(
  data: ClassifierTrainData,
  settings: TrainSettings,
  opts: TrainJobOptions,
): Promise<TrainResult> {
  // Refuses settings the schema or the recipe cannot run (a run made by code, not options).
  trainSettings(settings as unknown as Record<string, unknown>);
  const { out } = opts;
  const log = opts.log ?? (() => {});
  if (settings.mode !== "synthetic" && data.real.length === 0) {
    throw new RunError(`${settings.mode} training needs real images`);
  }
  if (settings.mode !== "real" && data.synthetic.length === 0) {
    throw new RunError(`${settings.mode} training needs synthetic images`);
  }
  const real = settings.mode === "synthetic" ? [] : data.real;
  const synthetic = settings.mode === "real" ? [] : data.synthetic;
  const repeats = real.length === 0
    ? 0
    : settings.repeatReal ?? realRepeats(real.length, synthetic.length);
  const items = epochItems(real, synthetic, repeats);
  const batches = batchesOf(items.length, settings.batch);
  const fp = fingerprint([...real, ...synthetic]);

  mkdirSync(out, { recursive: true });
  const previous = readTrainRecord(out);
  if (previous) {
    const diff = [
      ...differences(previous.settings, settings, "settings"),
      ...differences(previous.classNames, data.classNames, "classes"),
      ...(previous.data.fingerprint !== fp
        ? [
          `the training images differ (${previous.data.real} real + ${previous.data.synthetic} synthetic before, ${real.length} + ${synthetic.length} now)`,
        ]
        : []),
    ];
    if (diff.length) {
      throw new RunError(
        `${out} holds a training run with other settings or data; resuming would mix them:\n` +
          diff.map((d) => `  - ${d}`).join("\n") +
          "\nUse a new --out folder, or the previous settings (see its train.json).",
      );
    }
    if (previous.status === "complete") {
      log(`${out}: training is complete (${previous.epochsDone} epochs); nothing to do`);
      return { record: previous, trained: false, interrupted: false };
    }
  }

  if (settings.warmupEpochs > 0 && settings.warmupEpochs >= settings.epochs) {
    log(
      `warning: ${settings.warmupEpochs} warm-up epoch(s) of ${settings.epochs}: the learning ` +
        "rate only rises, with no cosine decay (give --warmup-epochs below --epochs)",
    );
  }
  const clf = await openClassifier(settings, data.classNames, opts.modelSource, opts.device, {
    itersPerEpoch: batches.length,
  });
  const size = clf.inputSize;
  using loader = new ImageLoader({
    kind: "train",
    size,
    augment: settings.augment ? {} : false,
  }, opts.loader);
  try {
    // The last epoch whose checkpoint is complete (its state.json is written last).
    const done = previous ? Math.min(checkpointEpochs(out).at(-1) ?? 0, settings.epochs) : 0;
    const record: TrainRecord = {
      format: TRAIN_FORMAT,
      version: 1,
      status: "running",
      settings,
      classNames: [...data.classNames],
      prompts: [...clf.prompts],
      data: {
        real: real.length,
        synthetic: synthetic.length,
        repeatReal: repeats,
        perEpoch: items.length,
        itersPerEpoch: batches.length,
        fingerprint: fp,
      },
      modelSource: opts.modelSource,
      device: opts.device,
      epochsDone: done,
      history: checkpointEpochs(out).filter((e) => e <= done).map((e) =>
        checkpointState(out, e).record
      ),
      seconds: previous?.seconds ?? 0,
      provenance: await provenance({ device: opts.device, dtype: settings.dtype }),
    };
    // One fixed temporary name, so a write cut by a kill is overwritten by the next.
    const recordPath = join(out, TRAIN_RECORD);
    const saveRecord = () => writeJsonAtomic(recordPath, record, `${recordPath}.tmp`);
    await restoreStepHistory(out, done);
    if (done > 0) {
      loadCheckpoint(clf, out, done);
      log(`resuming ${out} after epoch ${done}/${settings.epochs}`);
    }
    await saveRecord();

    const { device, dtype } = clf.model.logitScale;
    const { epochs } = settings, totalImages = (epochs - done) * items.length;
    let imagesDone = 0;
    const progress = (epoch: number, loss: number, lr: number) =>
      opts.onProgress?.({ epoch, epochs, images: imagesDone, totalImages, loss, lr });
    progress(done + 1, NaN, NaN);
    for (let epoch = done + 1; epoch <= settings.epochs; epoch++) {
      const started = performance.now();
      manualSeed(deriveSeed(settings.seed, "dropout", epoch));
      const order = epochOrder(items.length, settings.seed, epoch);
      const jobs: PrepareJob[][] = batches.map(([a, b]) =>
        Array.from(order.subarray(a, b), (pos) => ({
          path: items[pos].path,
          seed: deriveSeed(settings.seed, "augment", epoch, pos).toString(),
        }))
      );
      let lossSum = 0, steps = 0, skipped = 0, stepStarted = performance.now();
      const stepRecords: StepRecord[] = [];
      for await (const batch of loader.batches(jobs, opts.signal)) {
        const [a, b] = batches[batch.index];
        const picked = Array.from(order.subarray(a, b), (pos) => items[pos]);
        const loss = scope(() => {
          const pixels = fromHost(batch.pixels, [batch.count, 3, size, size], "f32")
            .to({ device, dtype });
          return clf.trainStep(pixels, picked.map((p) => p.label), picked.map((p) => p.synthetic));
        });
        if (!clf.lastStepApplied) skipped++;
        lossSum += loss;
        steps++;
        const now = performance.now();
        stepRecords.push({
          step: (epoch - 1) * batches.length + steps,
          epoch,
          loss,
          lr: clf.lastLr,
          imagesPerSecond: batch.count / Math.max(1e-6, (now - stepStarted) / 1000),
          skipped: !clf.lastStepApplied,
        });
        stepStarted = now;
        imagesDone += batch.count;
        progress(epoch, loss, clf.lastLr);
        if (opts.signal?.aborted) break;
      }
      if (steps < batches.length) {
        record.seconds += (performance.now() - started) / 1000;
        await saveRecord();
        log(`stopped during epoch ${epoch}; the next run resumes after epoch ${epoch - 1}`);
        return { record, trained: true, interrupted: true };
      }
      const seconds = (performance.now() - started) / 1000;
      const epochRecord: EpochRecord = {
        epoch,
        loss: lossSum / steps,
        seconds,
        imagesPerSecond: items.length / seconds,
        lr: clf.lastLr,
        skippedSteps: skipped,
      };
      appendFileSync(
        join(out, STEP_HISTORY),
        stepRecords.map((s) => JSON.stringify(s) + "\n").join(""),
      );
      saveCheckpoint(clf, out, epochRecord);
      record.history.push(epochRecord);
      record.epochsDone = epoch;
      record.seconds += seconds;
      await saveRecord();
      log(
        `epoch ${epoch}/${settings.epochs}: loss ${(lossSum / steps).toFixed(4)}, checkpoint ${
          epochDir(out, epoch)
        }`,
      );
    }
    const finalDir = join(out, FINAL_ADAPTER);
    const tmp = `${finalDir}.tmp`;
    rmSync(tmp, { recursive: true, force: true });
    cpSync(epochDir(out, settings.epochs), tmp, { recursive: true });
    for (const f of ["optimizer.safetensors", "state.json"]) rmSync(join(tmp, f), { force: true });
    rmSync(finalDir, { recursive: true, force: true });
    renameSync(tmp, finalDir);
    record.status = "complete";
    await saveRecord();
    return { record, trained: true, interrupted: false };
  } finally {
    clf.dispose();
  }
}

/** The epochs of a run with a complete checkpoint, in order. */
export function checkpointEpochs(out: string): number[] {
  const dir = join(out, CHECKPOINTS);
  if (!existsSync(dir)) return [];
  return readdirSync(dir)
    .map((name) => /^epoch-(\d+)$/.exec(name))
    .filter((m): m is RegExpExecArray => !!m && existsSync(join(dir, m[0], "state.json")))
    .map((m) => Number(m[1]))
    .sort((a, b) => a - b);
}

/**
 * Loads a complete run's classifier for prediction: the final adapter, or with `epoch` that
 * epoch's checkpoint (its peft adapter).
 */
export async function loadTrainedRun(
  out: string,
  opts: { modelSource?: string; device?: Device; epoch?: number } = {},
): Promise<{ record: TrainRecord; classifier: ClipLoraClassifier }> {
  const record = readTrainRecord(out);
  if (!record) throw new RunError(`${out}: no ${TRAIN_RECORD} (not a training run folder)`);
  if (record.status !== "complete") {
    throw new RunError(
      `${out}: training is not complete (${record.epochsDone}/${record.settings.epochs} epochs); ` +
        "run train again to finish it",
    );
  }
  let adapter = join(out, FINAL_ADAPTER);
  if (opts.epoch !== undefined) {
    adapter = epochDir(out, opts.epoch);
    if (!existsSync(join(adapter, "state.json"))) {
      throw new RunError(`${out}: no checkpoint of epoch ${opts.epoch} (${adapter})`);
    }
  }
  const classifier = await openClassifier(
    record.settings,
    record.classNames,
    opts.modelSource ?? record.modelSource,
    opts.device ?? (record.device as Device),
    { adapter },
  );
  return { record, classifier };
}
