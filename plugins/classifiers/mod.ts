/**
 * Classifier plugins. `clip-lora` (default) is the DataDream recipe DIPSY evaluates with: CLIP
 * ViT-B/16 with LoRA on both towers, trained on the real shots and the synthetic images.
 * Its options (settings.ts) make `TrainSettings`; every ablation of the recipe is an option.
 */
import type { Classifier, PluginDef } from "../../core/plugins.ts";
import type { Device } from "../../ffi/mod.ts";
import { checkpointEpochs, loadTrainedRun, trainRun } from "./trainer.ts";
import { TRAIN_SCHEMA, trainSettings } from "./settings.ts";

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
export { TRAIN_SCHEMA, trainSettings } from "./settings.ts";
export {
  type EvalMetrics,
  type EvalResult,
  evaluate,
  formatEvalTable,
  MetricsAccumulator,
  topConfusions,
} from "./evaluate.ts";
export { labelImages, readImageFolder, realRepeats, trainingClasses } from "./data.ts";

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

export const CLASSIFIER_PLUGINS: PluginDef<Classifier, Record<string, unknown>>[] = [{
  kind: "classifier",
  name: "clip-lora",
  description: "CLIP + LoRA on q/v of both towers, DataDream's recipe (DIPSY's classifier)",
  schema: TRAIN_SCHEMA,
  text: true,
  create: (o) => clipLoraClassifier(o),
}];
