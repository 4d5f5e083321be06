/**
 * Classifier plugins. `clip-lora` (default) is the DataDream recipe DIPSY evaluates with: CLIP
 * ViT-B/16 with LoRA on both towers, trained on the real shots and the synthetic images.
 * Its options (settings.ts) make `TrainSettings`; every ablation of the recipe is an option.
 */
import type { Classifier, PluginDef } from "../../core/plugins.ts";
import { checkpointEpochs, loadTrainedRun, trainRun } from "./trainer.ts";
import { TRAIN_SCHEMA, trainSettings } from "./settings.ts";

export { readTrainRecord } from "./trainer.ts";
export { TRAIN_SCHEMA } from "./settings.ts";

export function clipLoraClassifier(options: Record<string, unknown> = {}): Classifier {
  const settings = trainSettings(options);
  return {
    kind: "classifier",
    name: "clip-lora",
    model: settings.clip,
    settings: settings as unknown as Record<string, unknown>,
    async train(data, job) {
      const run = await trainRun(data, settings, { ...job, loader: { workers: job.workers } });
      return { complete: run.record.status === "complete", epochsDone: run.record.epochsDone };
    },
    load: async (out, opts = {}) => (await loadTrainedRun(out, opts)).classifier,
    epochs: checkpointEpochs,
  };
}

export const CLASSIFIER_PLUGINS: PluginDef<Classifier, Record<string, unknown>>[] = [{
  kind: "classifier",
  name: "clip-lora",
  description: "CLIP + LoRA on q/v of both towers, DataDream's recipe (DIPSY's classifier)",
  schema: TRAIN_SCHEMA,
  text: true,
  create: clipLoraClassifier,
}];
