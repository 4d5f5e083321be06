/**
 * dipsy: synthetic few-shot training data with dual IP-Adapter guidance (DIPSY) on Stable
 * Diffusion 1.5, and a CLIP ViT-B/16 LoRA classifier, on libtorch through Deno FFI.
 *
 * The job API runs each command of the CLI from Deno code, with the same results:
 *
 * ```ts
 * import { evaluate, generate, train } from "@dipsy/dipsy";
 *
 * const controller = new AbortController();
 * const gen = await generate({
 *   data: "shots",
 *   out: "synthetic",
 *   dataset: "pets",
 *   perClass: 200,
 *   signal: controller.signal,
 *   onProgress: (p) => console.log(`${p.done}/${p.total}`),
 * });
 * await train({ real: "shots", synthetic: gen.out, out: "run", dataset: "pets" });
 * const { top1 } = await evaluate({ model: "run", test: "test" });
 * ```
 *
 * Beside it: the plugin interfaces and the registry, for guidance, sampler, pair and classifier
 * plugins (docs/plugins.md), and the tensor layer they are written with.
 *
 * @module
 */

// The job API: one function per command.
export {
  evaluate,
  type EvaluateJobOptions,
  generate,
  generateConfig,
  type GenerateJobOptions,
  type GenerateJobResult,
  type GenerateSettings,
  JobOptionError,
  type JobOptions,
  type PluginSetting,
  run,
  type RunJobOptions,
  type RunJobResult,
  sample,
  type SampleJobOptions,
  type SampleJobResult,
  similarity,
  type SimilarityJobOptions,
  type SimilarityJobResult,
  train,
  type TrainJobOptions,
  type TrainJobResult,
} from "./app/api.ts";
export type { ProgressInfo } from "./core/generate.ts";

// The records the jobs write and return.
export {
  type AdapterRecord,
  type ManifestEntry,
  RECORD_FORMAT,
  RECORD_VERSION,
  type RunRecord,
  type ShotRecord,
} from "./core/output.ts";
export type {
  EpochMetrics,
  EvalRecord,
  Selection,
  SelectRule,
  ShotOptions,
  TrainInputs,
} from "./app/classify.ts";
export type { ClassAccuracy, EvalMetrics, EvalResult } from "./plugins/classifiers/evaluate.ts";
export {
  type EpochRecord,
  TRAIN_FORMAT,
  type TrainRecord,
  type TrainSettings,
} from "./plugins/classifiers/trainer.ts";
export type { ClipTower, TrainMode } from "./plugins/classifiers/clip_lora.ts";
export type { LoraConfig } from "./plugins/classifiers/lora.ts";
export type { Provenance } from "./core/provenance.ts";

// The report of a run folder, as `dipsy report` writes it.
export {
  NotDipsyOutputError,
  type ReportKind,
  type ReportOptions,
  type ReportResult,
  writeReport,
} from "./report/mod.ts";

// Configuration defaults.
export {
  DEFAULT_CLIP,
  DEFAULT_IMAGE_ENCODER,
  DEFAULT_IP_ADAPTER,
  DEFAULT_MODEL,
  DEFAULTS,
  type DTypeChoice,
  type PluginChoice,
  type RunConfig,
  type RunSettings,
  TINY,
} from "./core/config.ts";

// Writing plugins: the interfaces, the registry, and what plugins are handed. The jobs register
// the built-in plugins themselves; code that reads the registry first calls loadDefaultPlugins.
export * from "./core/plugins.ts";
export { loadDefaultPlugins } from "./app/plugins.ts";
/** The option-schema combinators plugins declare their options with (`schema.number`, ...). */
export * as schema from "./core/schema.ts";
export type {
  CheckContext,
  Field,
  FieldDoc,
  Infer,
  Issue,
  JsonSchema,
  ObjectOf,
  ObjectSchema,
  RequiredKeys,
  Schema,
  Shape,
} from "./core/schema.ts";
export type { DiffusionBackbone, ImagePrompt } from "./core/backbone.ts";
export { derive, deriveSeed, type Label, Rng, type Seed } from "./core/rng.ts";
export {
  decodeImage,
  type DecodeOptions,
  encodeImage,
  type EncodeOptions,
  ImageDecodeError,
  type ImageFormat,
  readImage,
  type RgbImage,
} from "./core/image.ts";

// Tensors and devices.
export {
  type Device,
  disposeAll,
  DisposedTensorError,
  type DType,
  fromHost,
  Generator,
  type HostArray,
  isDevice,
  isDType,
  keep,
  manualSeed,
  memory,
  type MemoryInfo,
  noGrad,
  ops,
  type RuntimeInfo,
  runtimeInfo,
  SafetensorsFile,
  saveSafetensors,
  scalar,
  scope,
  scopeAsync,
  setNumThreads,
  Tensor,
  type TensorInfo,
  TorchError,
  UserError,
} from "./ffi/mod.ts";
