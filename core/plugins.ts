/**
 * Plugin families and their registry. A plugin is a plain object `{ kind, name, ... }` made by a
 * factory from one options object and registered by name, so that configuration files and CLI
 * flags choose every part of an experiment (each ablation is a configuration, not a code edit).
 */
import type { Device, Generator, Tensor } from "../ffi/mod.ts";
import { UserError } from "../ffi/errors.ts";
import { type FieldDoc, fieldDocs, issueText, type ObjectSchema, validate } from "./schema.ts";
import { closest } from "./suggest.ts";

/** The plugin families. */
export type PluginKind = "sampler" | "guidance" | "pairs" | "classifier";

/** What every plugin is. */
export interface Plugin {
  /** Its family. */
  readonly kind: PluginKind;
  /** The name it is registered (and chosen) by. */
  readonly name: string;
  /** Its options as resolved (defaults filled in), which records and manifests show. */
  readonly settings?: Readonly<Record<string, unknown>>;
}

/**
 * Registration record: how to build a plugin of `kind` named `name`. `schema` declares every
 * option once (type, default, bounds, one-line doc); `create` gets the options it resolved,
 * defaults filled in, plus what the host supplies at run time (a sampler's steps and config).
 */
export interface PluginDef<P extends Plugin = Plugin, O = Record<string, unknown>> {
  /** The family it belongs to. */
  kind: P["kind"];
  /** The name configurations and flags choose it by. */
  name: string;
  /** One line for `--list`. */
  description: string;
  /** Its options, each declared once (see core/schema.ts). */
  schema: ObjectSchema;
  /** Keys the host supplies at run time (a sampler's steps and config), not user options. */
  runtime?: readonly string[];
  /** Options may arrive as command-line text: numbers, booleans and lists are read from it. */
  text?: boolean;
  /** Builds the plugin from checked options with their defaults (and the runtime keys). */
  create(options: O): P;
}

/** An error raised by a plugin, labelled with the plugin that raised it. */
export class PluginError extends UserError {
  /** `cause`: what the plugin threw (its message becomes this one's). */
  constructor(readonly kind: PluginKind, readonly pluginName: string, cause: unknown) {
    super(`${kind} plugin "${pluginName}": ${cause instanceof Error ? cause.message : cause}`, {
      cause,
    });
  }
}

/** A plugin name that no registered plugin of its kind has (a typo in a flag or file). */
export class UnknownPluginError extends UserError {
  /** `available`: the names registered for `kind`. */
  constructor(readonly kind: PluginKind, readonly pluginName: string, available: string[]) {
    const guess = closest(pluginName, available);
    super(
      `unknown ${kind} plugin "${pluginName}"${guess ? ` (did you mean "${guess}"?)` : ""} ` +
        `(available: ${available.join(", ") || "none registered"})`,
    );
  }
}

/** Plugin definitions by kind and name; builds plugins from checked options. */
export class Registry {
  readonly #defs = new Map<string, PluginDef>();

  /** Adds a definition; a second one with the same kind and name is refused. */
  register<P extends Plugin, O>(def: PluginDef<P, O>): void {
    const key = `${def.kind}:${def.name}`;
    if (typeof def.schema?.check !== "function") {
      throw new Error(`the ${def.kind} plugin "${def.name}" has no options schema ("schema")`);
    }
    if (this.#defs.has(key)) {
      throw new Error(`a ${def.kind} plugin named "${def.name}" exists already`);
    }
    this.#defs.set(key, def as unknown as PluginDef);
  }

  /** Whether a plugin of `kind` is registered as `name`. */
  has(kind: PluginKind, name: string): boolean {
    return this.#defs.has(`${kind}:${name}`);
  }

  /** The definitions (of one kind), in registration order. */
  list(kind?: PluginKind): PluginDef[] {
    return [...this.#defs.values()].filter((d) => !kind || d.kind === kind);
  }

  /** The registration of a plugin; an unknown name is an UnknownPluginError listing the choices. */
  definition(kind: PluginKind, name: string): PluginDef {
    const def = this.#defs.get(`${kind}:${name}`);
    if (!def) throw new UnknownPluginError(kind, name, this.list(kind).map((d) => d.name));
    return def;
  }

  /**
   * The options a plugin runs with: checked against its schema, defaults filled in; a misspelt
   * key is refused naming the valid ones (a typo would otherwise run with the default).
   */
  resolve(kind: PluginKind, name: string, options: object = {}): Record<string, unknown> {
    const def = this.definition(kind, name);
    const r = validate(def.schema, options, { text: def.text });
    if (!r.ok) {
      throw new PluginError(kind, name, r.issues.map((i) => issueText(i, "option")).join("; "));
    }
    return r.value as Record<string, unknown>;
  }

  /**
   * Builds a plugin from its resolved options plus the `runtime` keys the host supplies (a
   * sampler's `steps` and `config`); the plugin carries the resolved options as `settings`.
   */
  create<P extends Plugin>(kind: P["kind"], name: string, options: object = {}): P {
    const def = this.definition(kind, name);
    const given: Record<string, unknown> = {}, runtime: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(options)) {
      (def.runtime?.includes(k) ? runtime : given)[k] = v;
    }
    const settings = Object.freeze(this.resolve(kind, name, given));
    let plugin: P;
    try {
      plugin = def.create({ ...settings, ...runtime }) as P;
    } catch (e) {
      throw new PluginError(kind, name, e);
    }
    return plugin.settings ? plugin : Object.assign(plugin, { settings });
  }

  /** A plugin's options for help texts and `--list`. */
  docs(kind: PluginKind, name: string): FieldDoc[] {
    return fieldDocs(this.definition(kind, name).schema);
  }
}

/** The process-wide registry the CLI and configs use (`registerDefaults` fills it). */
export const registry = new Registry();

// ---------------------------------------------------------------------------------------------
// Sampler: a diffusion scheduler. Stateful (multistep history), so one is built per image batch.

/** The scheduler fields of a diffusers `scheduler_config.json`. */
export interface SchedulerConfig {
  /** Training timesteps (1000 for SD1.5). */
  num_train_timesteps: number;
  /** First beta of the noise schedule. */
  beta_start: number;
  /** Last beta of the noise schedule. */
  beta_end: number;
  /** How betas go from beta_start to beta_end. */
  beta_schedule: "linear" | "scaled_linear" | "squaredcos_cap_v2";
  /** What the model predicts. */
  prediction_type: "epsilon" | "v_prediction" | "sample";
  /** Added to "leading" timesteps. */
  steps_offset: number;
  /** DDIM: the alpha product after the last step is 1. */
  set_alpha_to_one: boolean;
  /** DDIM: clamp the predicted sample. */
  clip_sample: boolean;
  /** How inference timesteps are spread over the training ones. */
  timestep_spacing: "leading" | "linspace" | "trailing";
  /** Other keys of the file, which each sampler reads as diffusers' from_config does. */
  [key: string]: unknown;
}

/** A diffusion scheduler for one image batch (it keeps multistep history; dispose it). */
export interface Sampler extends Plugin, Disposable {
  /** Its family. */
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

/** What a sampler definition's `create` gets. */
export interface SamplerOptions {
  /** Denoising steps (supplied by the host). */
  steps: number;
  /** The model's scheduler config (supplied by the host). */
  config: SchedulerConfig;
  /** The sampler's own options, checked by its schema. */
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

/** A conditioning as switches: which text, which image prompts. */
export interface ParsedConditioning {
  /** The empty prompt or the class prompt. */
  text: "empty" | "prompt";
  /** The positive image's adapter is on. */
  positive: boolean;
  /** The negative image's adapter is on. */
  negative: boolean;
}

/** Reads a conditioning name ("text+pos+neg"); a malformed one throws. */
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

/** Where in the denoising loop a step is. */
export interface GuidanceStep {
  /** 0-based index of the denoising step. */
  index: number;
  /** Number of denoising steps. */
  total: number;
}

/** Which predictions a step needs and how they combine into the guided noise estimate. */
export interface Guidance extends Plugin {
  /** Its family. */
  readonly kind: "guidance";
  /** Adapter scale (lambda) for image prompts that are switched on. */
  readonly adapterScale: number;
  /** The negative image's adapter scale; null (or absent): the same as `adapterScale`. */
  readonly negativeAdapterScale?: number | null;
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

/** One few-shot image: its class and its place in the class. */
export interface ShotRef {
  /** Index of the class. */
  classIndex: number;
  /** Index of the image within its class (sorted file order). */
  shotIndex: number;
}

/** Parameters of the reference-image augmentation, recorded in the manifest for reproduction. */
export interface AugmentParams {
  /** Mirrored left to right. */
  flip: boolean;
  /** Square crop [x, y, side] applied before rotation (null for square inputs). */
  crop: [number, number, number] | null;
  /** Rotation in degrees. */
  angle: number;
}

/** The references of one generated image. */
export interface PairChoice {
  /** The target class. */
  classIndex: number;
  /** The image's index within its class. */
  index: number;
  /** The positive reference (a shot of the target class). */
  positive: ShotRef;
  /** Its augmentation; null: used as it is. */
  positiveAugment: AugmentParams | null;
  /** The negative reference (a shot of another class), or none. */
  negative: ShotRef | null;
  /** Its augmentation; null: used as it is (or no negative). */
  negativeAugment: AugmentParams | null;
}

/** What a pair sampler may look at: class names, shot counts and (optionally) similarities. */
export interface PairContext {
  /** The class names, in class order. */
  classNames: readonly string[];
  /** Shots per class. */
  shotCounts: readonly number[];
  /** Cosine similarity of class-mean embeddings, [K][K]; present when the plugin asked for it. */
  similarity?: readonly (readonly number[])[];
  /** Image sizes per class and shot ([width, height]), for augmentation parameters. */
  shotSizes: readonly (readonly (readonly [number, number])[])[];
  /** The run seed every choice derives from. */
  seed: number;
}

/** Chooses the positive and negative references of each image to generate. */
export interface SamplerPair extends Plugin {
  /** Its family. */
  readonly kind: "pairs";
  /** True when `choose` needs `PairContext.similarity`. */
  readonly needsSimilarity: boolean;
  /** Deterministic in (context.seed, classIndex, index): an image can be regenerated alone. */
  choose(context: PairContext, classIndex: number, index: number): PairChoice;
}

// ---------------------------------------------------------------------------------------------
// Classifier: trained on real + synthetic images, then predicts.

/** One training image. */
export interface LabeledImage {
  /** Its file. */
  path: string;
  /** Its class index. */
  label: number;
  /** Generated (true) or real (false). */
  synthetic: boolean;
}

/** A trained model that scores images (dispose it to free its weights). */
export interface TrainedClassifier extends Disposable {
  /** The classes it scores, in score order. */
  readonly classNames: readonly string[];
  /** Side of the square images `predict` takes. */
  readonly inputSize: number;
  /** Class scores [B, K] for preprocessed images [B, 3, inputSize, inputSize] (f32, any device). */
  predict(pixels: Tensor): Tensor;
}

/** What a classifier trains on. */
export interface ClassifierTrainData {
  /** The classes, in label order. */
  classNames: readonly string[];
  /** The real shots. */
  real: readonly LabeledImage[];
  /** The generated images. */
  synthetic: readonly LabeledImage[];
}

/** How far training is. */
export interface ClassifierProgress {
  /** The epoch in progress (1-based). */
  epoch: number;
  /** Epochs in all. */
  epochs: number;
  /** Images trained on so far in this call, and in total for the epochs it has left. */
  images: number;
  /** See images. */
  totalImages: number;
  /** The last batch's loss and learning rate (NaN before the first step). */
  loss: number;
  /** See loss. */
  lr: number;
}

/** Where and how a classifier trains. */
export interface ClassifierJob {
  /** Run folder: checkpoints, the final model and its record; a second call resumes. */
  out: string;
  /** The resolved `model` reference: a local folder or a preset name. */
  modelSource: string;
  /** Where it trains. */
  device: Device;
  /** Image preparation threads (default: cores - 1, 1..16). */
  workers?: number;
  /** Stops training between steps; the checkpointed epochs are kept. */
  signal?: AbortSignal;
  /** Called after each step. */
  onProgress?: (p: ClassifierProgress) => void;
  /** Lines for the user (resumption, checkpoints). */
  log?: (line: string) => void;
}

/** Trains a classifier on real and generated images and loads what it trained. */
export interface Classifier extends Plugin {
  /** Its family. */
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
