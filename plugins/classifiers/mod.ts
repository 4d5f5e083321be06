/**
 * Classifier plugins. `clip-lora` (default) is the DataDream recipe DIPSY evaluates with: CLIP
 * ViT-B/16 with LoRA on both towers, trained on the real shots and the synthetic images.
 * Its options are `TrainSettings` (trainer.ts); every ablation of the recipe is an option.
 */
import { type Classifier, registry } from "../../core/plugins.ts";
import { RunError } from "../../core/output.ts";
import type { Device } from "../../ffi/mod.ts";
import {
  checkpointEpochs,
  checkSettings,
  loadTrainedRun,
  TRAIN_DEFAULTS,
  trainRun,
  type TrainSettings,
} from "./trainer.ts";

export {
  checkpointEpochs,
  epochDir,
  loadTrainedRun,
  readTrainRecord,
  TRAIN_DEFAULTS,
  TRAIN_RECORD,
  type TrainRecord,
  trainRun,
  type TrainSettings,
} from "./trainer.ts";
export {
  type EvalMetrics,
  type EvalResult,
  evaluate,
  formatEvalTable,
  MetricsAccumulator,
  topConfusions,
} from "./evaluate.ts";
export { labelImages, readImageFolder, realRepeats, trainingClasses } from "./data.ts";

const NUMBER_KEYS = [
  "modelSeed",
  "epochs",
  "warmupEpochs",
  "batch",
  "lr",
  "minLr",
  "weightDecay",
  "lambda",
  "seed",
] as const;

/** Settings from plugin options: defaults filled in, types and ranges checked. */
export function trainSettings(options: Record<string, unknown>): TrainSettings {
  const s: TrainSettings = structuredClone(TRAIN_DEFAULTS) as TrainSettings;
  const known = new Set([...Object.keys(TRAIN_DEFAULTS), "rank", "alpha", "dropout"]);
  for (const [k, v] of Object.entries(options)) {
    if (v === undefined) continue;
    if (!known.has(k)) {
      throw new RunError(`unknown option "${k}" (options: ${[...known].sort().join(", ")})`);
    }
    const num = (x: unknown) => {
      const n = typeof x === "string" && x.trim() !== "" ? Number(x) : x;
      if (typeof n !== "number" || !Number.isFinite(n)) {
        throw new RunError(`option ${k} must be a number, got ${JSON.stringify(x)}`);
      }
      return n;
    };
    const list = (x: unknown) =>
      Array.isArray(x) ? x.map(String) : String(x).split(",").map((p) => p.trim()).filter(Boolean);
    if ((NUMBER_KEYS as readonly string[]).includes(k)) {
      (s as unknown as Record<string, number>)[k] = num(v);
    } else if (k === "rank" || k === "alpha" || k === "dropout") {
      s.lora = { ...s.lora, [k]: num(v) };
    } else if (k === "lora") {
      s.lora = { ...s.lora, ...(v as object) };
    } else if (k === "repeatReal") {
      s.repeatReal = v === null || v === "auto" ? null : num(v);
    } else if (k === "targetModules") {
      s.targetModules = list(v);
    } else if (k === "towers") {
      s.towers = list(v) as TrainSettings["towers"];
    } else if (k === "augment") {
      if (typeof v !== "boolean" && v !== "true" && v !== "false") {
        throw new RunError(`option augment must be true or false, got ${JSON.stringify(v)}`);
      }
      s.augment = v === true || v === "true";
    } else if (k === "mode") {
      if (!["mixed", "real", "synthetic"].includes(String(v))) {
        throw new RunError(
          `option mode must be mixed, real or synthetic, got ${JSON.stringify(v)}`,
        );
      }
      s.mode = v as TrainSettings["mode"];
    } else if (k === "classPrompt" || k === "dataset") {
      s[k] = v === null ? null : String(v);
    } else if (k === "clip") {
      s.clip = String(v);
    } else if (k === "dtype") {
      s.dtype = v as TrainSettings["dtype"];
    }
  }
  checkSettings(s);
  return s;
}

export function clipLoraClassifier(options: Record<string, unknown> = {}): Classifier {
  const settings = trainSettings(options);
  return {
    kind: "classifier",
    name: "clip-lora",
    model: settings.clip,
    settings: settings as unknown as Record<string, unknown>,
    async train(data, job) {
      const result = await trainRun(data, settings, {
        out: job.out,
        modelSource: job.modelSource,
        device: job.device,
        loader: { workers: job.workers },
        signal: job.signal,
        onProgress: job.onProgress,
        log: job.log,
      });
      return {
        complete: result.record.status === "complete",
        epochsDone: result.record.epochsDone,
      };
    },
    async load(out: string, opts: { modelSource?: string; device?: Device; epoch?: number } = {}) {
      return (await loadTrainedRun(out, opts)).classifier;
    },
    epochs: (out: string) => checkpointEpochs(out),
  };
}

const describe = (k: keyof TrainSettings, text: string) => ({
  description: text,
  default: TRAIN_DEFAULTS[k],
});

registry.register<Classifier, Record<string, unknown>>({
  kind: "classifier",
  name: "clip-lora",
  description: "CLIP + LoRA on q/v of both towers, DataDream's recipe (DIPSY's classifier)",
  options: {
    clip: describe("clip", "CLIP model: folder, Hub id, or tiny"),
    epochs: describe("epochs", "training epochs"),
    warmupEpochs: describe("warmupEpochs", "epochs of linear warm-up"),
    batch: describe("batch", "images per step"),
    lr: describe("lr", "peak learning rate"),
    minLr: describe("minLr", "warm-up start and cosine end rate"),
    weightDecay: describe("weightDecay", "AdamW weight decay"),
    lambda: describe("lambda", "weight of the real part of the loss"),
    mode: describe("mode", "mixed, real (real-only) or synthetic (synthetic-only)"),
    rank: { description: "LoRA rank", default: TRAIN_DEFAULTS.lora.rank },
    alpha: { description: "LoRA alpha", default: TRAIN_DEFAULTS.lora.alpha },
    dropout: { description: "LoRA dropout", default: TRAIN_DEFAULTS.lora.dropout },
    targetModules: describe("targetModules", "attention projections with LoRA"),
    towers: describe("towers", "CLIP towers with LoRA"),
    classPrompt: describe("classPrompt", "prompt template ({class}, {word}); null: DataDream's"),
    dataset: describe("dataset", "dataset name, picks the prompt word"),
    repeatReal: describe("repeatReal", "repeats of the real shots; null: synthetic/real, floored"),
    augment: describe("augment", "the recipe's training augmentation"),
    seed: describe("seed", "seed of shuffling, augmentation, dropout and LoRA init"),
    dtype: describe("dtype", "weights dtype: f32, bf16 or f16 (LoRA stays f32)"),
    modelSeed: describe("modelSeed", "seed of a preset's random weights"),
  },
  create: (o) => clipLoraClassifier(o),
});
