/**
 * dipsy: synthetic few-shot training data with dual IP-Adapter guidance (DIPSY) on Stable
 * Diffusion 1.5, and a CLIP ViT-B/16 LoRA classifier, on libtorch through Deno FFI.
 *
 * This module re-exports the public API; importing it registers the default plugins.
 */
export * from "./ffi/mod.ts";
export * from "./core/weights.ts";
export * from "./core/nn.ts";
export * from "./core/plugins.ts";
export * from "./core/backbone.ts";
export * from "./core/sampling.ts";
export * from "./core/image.ts";
export * from "./core/hub.ts";
export * from "./core/dataset.ts";
export * from "./core/benchmarks.ts";
export * from "./core/fewshot.ts";
export * from "./core/npz.ts";
export * from "./core/rng.ts";
export { Sd15Backbone } from "./plugins/sd15/backbone.ts";
export {
  type EvalMetrics,
  type EvalResult,
  evaluate,
  formatEvalTable,
  labelImages,
  loadTrainedRun,
  MetricsAccumulator,
  readImageFolder,
  readTrainRecord,
  TRAIN_DEFAULTS,
  type TrainRecord,
  trainRun,
  type TrainSettings,
} from "./plugins/classifiers/mod.ts";
export { ClipLoraClassifier, loadClipLoraClassifier } from "./plugins/classifiers/clip_lora.ts";
import "./plugins/mod.ts";
