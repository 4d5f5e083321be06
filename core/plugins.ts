/**
 * Plugin families and their registry. A plugin is a plain object `{ kind, name, ... }` made by a
 * factory from one options object and registered by name, so that configuration files and CLI
 * flags choose every part of an experiment (each ablation is a configuration, not a code edit).
 */
import type { Device, Generator, Tensor } from "../ffi/mod.ts";
import { UserError } from "../ffi/errors.ts";

export type PluginKind = "sampler" | "guidance" | "pairs" | "classifier";

export interface Plugin {
  readonly kind: PluginKind;
  readonly name: string;
}

/** Registration record: how to build a plugin of `kind` named `name` from its options. */
export interface PluginDef<P extends Plugin = Plugin, O = Record<string, unknown>> {
  kind: P["kind"];
  name: string;
  description: string;
  /** Option names with a one-line description and default, for `--help` and docs. */
  options?: Record<string, { description: string; default?: unknown }>;
  create(options: O): P;
}

/** An error raised by a plugin, labelled with the plugin that raised it. */
export class PluginError extends UserError {
  constructor(readonly kind: PluginKind, readonly pluginName: string, cause: unknown) {
    super(`${kind} plugin "${pluginName}": ${cause instanceof Error ? cause.message : cause}`, {
      cause,
    });
  }
}

/** A plugin name that no registered plugin of its kind has (a typo in a flag or file). */
export class UnknownPluginError extends UserError {
  constructor(readonly kind: PluginKind, readonly pluginName: string, available: string[]) {
    super(
      `unknown ${kind} plugin "${pluginName}" (available: ${
        available.join(", ") || "none registered"
      })`,
    );
  }
}

export class Registry {
  readonly #defs = new Map<string, PluginDef>();

  register<P extends Plugin, O>(def: PluginDef<P, O>): void {
    const key = `${def.kind}:${def.name}`;
    if (this.#defs.has(key)) {
      throw new Error(`a ${def.kind} plugin named "${def.name}" exists already`);
    }
    this.#defs.set(key, def as unknown as PluginDef);
  }

  has(kind: PluginKind, name: string): boolean {
    return this.#defs.has(`${kind}:${name}`);
  }

  list(kind?: PluginKind): PluginDef[] {
    return [...this.#defs.values()].filter((d) => !kind || d.kind === kind);
  }

  /** The registration of a plugin; an unknown name is an UnknownPluginError listing the choices. */
  definition(kind: PluginKind, name: string): PluginDef {
    const def = this.#defs.get(`${kind}:${name}`);
    if (!def) throw new UnknownPluginError(kind, name, this.list(kind).map((d) => d.name));
    return def;
  }

  /** Builds a plugin; unknown names list the choices, factory errors name the plugin. */
  create<P extends Plugin>(kind: P["kind"], name: string, options: object = {}): P {
    const def = this.definition(kind, name);
    try {
      return def.create(options as Record<string, unknown>) as P;
    } catch (e) {
      throw new PluginError(kind, name, e);
    }
  }
}

/** The process-wide registry the CLI and configs use; default plugins register themselves. */
export const registry = new Registry();

// ---------------------------------------------------------------------------------------------
// Sampler: a diffusion scheduler. Stateful (multistep history), so one is built per image batch.

/** The scheduler fields of a diffusers `scheduler_config.json`. */
export interface SchedulerConfig {
  num_train_timesteps: number;
  beta_start: number;
  beta_end: number;
  beta_schedule: "linear" | "scaled_linear" | "squaredcos_cap_v2";
  prediction_type: "epsilon" | "v_prediction" | "sample";
  steps_offset: number;
  set_alpha_to_one: boolean;
  clip_sample: boolean;
  timestep_spacing: "leading" | "linspace" | "trailing";
  [key: string]: unknown;
}

export interface Sampler extends Plugin, Disposable {
  readonly kind: "sampler";
  /** The model timesteps, in evaluation order. */
  readonly timesteps: readonly number[];
  /** Factor for the initial Gaussian noise. */
  readonly initNoiseSigma: number;
  /** The model input at step `i` (some samplers rescale it; others return a new handle to it). */
  scaleModelInput(sample: Tensor, i: number): Tensor;
  /** Advances `sample` by one step given the model's output at step `i`; returns a new tensor. */
  step(modelOutput: Tensor, i: number, sample: Tensor, generator?: Generator): Tensor;
}

export interface SamplerOptions {
  steps: number;
  config: SchedulerConfig;
  [key: string]: unknown;
}

// ---------------------------------------------------------------------------------------------
// Guidance: which predictions a step needs, and how to combine them.

/**
 * One conditioning of the UNet: "uncond" is the empty prompt, "text" the class prompt; "+pos"
 * and "+neg" switch on the positive (adapter 1) and negative (adapter 2) image prompts at the
 * adapter scale. Examples: "uncond", "text", "text+pos", "text+pos+neg", "uncond+neg".
 */
export type Conditioning = string;

export interface ParsedConditioning {
  text: "empty" | "prompt";
  positive: boolean;
  negative: boolean;
}

export function parseConditioning(c: Conditioning): ParsedConditioning {
  const [base, ...rest] = c.split("+");
  if (base !== "uncond" && base !== "text") {
    throw new Error(`conditioning "${c}" must start with "uncond" or "text"`);
  }
  const bad = rest.filter((r) => r !== "pos" && r !== "neg");
  if (bad.length || new Set(rest).size !== rest.length) {
    throw new Error(`conditioning "${c}": only "+pos" and "+neg" may follow, once each`);
  }
  return {
    text: base === "uncond" ? "empty" : "prompt",
    positive: rest.includes("pos"),
    negative: rest.includes("neg"),
  };
}

export interface GuidanceStep {
  /** 0-based index of the denoising step. */
  index: number;
  /** Number of denoising steps. */
  total: number;
}

export interface Guidance extends Plugin {
  readonly kind: "guidance";
  /** Adapter scale (lambda) for image prompts that are switched on. */
  readonly adapterScale: number;
  /** Whether the negative reference image is used at all (false: no negative is sampled). */
  readonly usesNegative: boolean;
  /** Whether image prompts are used at all (false: plain text-to-image). */
  readonly usesImages: boolean;
  /** The predictions this step needs; the host runs them as one batched UNet call. */
  needs(step: GuidanceStep): readonly Conditioning[];
  /**
   * Combines the predictions (one [B, C, h, w] tensor per needed conditioning) into the guided
   * noise estimate. Must not dispose its inputs and must return a fresh tensor.
   */
  combine(preds: ReadonlyMap<Conditioning, Tensor>, step: GuidanceStep): Tensor;
}

// ---------------------------------------------------------------------------------------------
// SamplerPair: which few-shot images condition each generated image.

export interface ShotRef {
  classIndex: number;
  /** Index of the image within its class (sorted file order). */
  shotIndex: number;
}

/** Parameters of the reference-image augmentation, recorded in the manifest for reproduction. */
export interface AugmentParams {
  flip: boolean;
  /** Square crop [x, y, side] applied before rotation (null for square inputs). */
  crop: [number, number, number] | null;
  /** Rotation in degrees. */
  angle: number;
}

export interface PairChoice {
  classIndex: number;
  index: number;
  positive: ShotRef;
  positiveAugment: AugmentParams | null;
  negative: ShotRef | null;
  negativeAugment: AugmentParams | null;
}

/** What a pair sampler may look at: class names, shot counts and (optionally) similarities. */
export interface PairContext {
  classNames: readonly string[];
  shotCounts: readonly number[];
  /** Cosine similarity of class-mean embeddings, [K][K]; present when the plugin asked for it. */
  similarity?: readonly (readonly number[])[];
  /** Image sizes per class and shot ([width, height]), for augmentation parameters. */
  shotSizes: readonly (readonly (readonly [number, number])[])[];
  seed: number;
}

export interface SamplerPair extends Plugin {
  readonly kind: "pairs";
  /** True when `choose` needs `PairContext.similarity`. */
  readonly needsSimilarity: boolean;
  /** Deterministic in (context.seed, classIndex, index): an image can be regenerated alone. */
  choose(context: PairContext, classIndex: number, index: number): PairChoice;
}

// ---------------------------------------------------------------------------------------------
// Classifier: trained on real + synthetic images, then predicts.

export interface LabeledImage {
  path: string;
  label: number;
  synthetic: boolean;
}

export interface TrainedClassifier extends Disposable {
  readonly classNames: readonly string[];
  /** Side of the square images `predict` takes. */
  readonly inputSize: number;
  /** Class scores [B, K] for preprocessed images [B, 3, inputSize, inputSize] (f32, any device). */
  predict(pixels: Tensor): Tensor;
}

export interface ClassifierTrainData {
  classNames: readonly string[];
  real: readonly LabeledImage[];
  synthetic: readonly LabeledImage[];
}

export interface ClassifierProgress {
  epoch: number;
  epochs: number;
  /** Images trained on so far in this call, and in total for the epochs it has left. */
  images: number;
  totalImages: number;
  /** The last batch's loss and learning rate (NaN before the first step). */
  loss: number;
  lr: number;
}

export interface ClassifierJob {
  /** Run folder: checkpoints, the final model and its record; a second call resumes. */
  out: string;
  /** The resolved `model` reference: a local folder or a preset name. */
  modelSource: string;
  device: Device;
  /** Image preparation threads (default: cores - 1, 1..16). */
  workers?: number;
  signal?: AbortSignal;
  onProgress?: (p: ClassifierProgress) => void;
  log?: (line: string) => void;
}

export interface Classifier extends Plugin {
  readonly kind: "classifier";
  /** Model reference to resolve into `ClassifierJob.modelSource` (a folder, Hub id or preset). */
  readonly model: string;
  /** Options as resolved (defaults filled in), for records and reports. */
  readonly settings: Readonly<Record<string, unknown>>;
  /** Trains into `job.out`, resuming what an earlier call left there. */
  train(
    data: ClassifierTrainData,
    job: ClassifierJob,
  ): Promise<{ complete: boolean; epochsDone: number }>;
  /** The trained classifier of a complete run folder (`epoch`: that epoch's checkpoint). */
  load(
    out: string,
    opts?: { modelSource?: string; device?: Device; epoch?: number },
  ): Promise<TrainedClassifier>;
  /** The epochs of a complete run whose checkpoint `load` can take (for model selection). */
  epochs?(out: string): number[];
}
