/**
 * The DataDream classifier (Kim et al. 2024, "DataDream: Few-shot Guided Dataset Generation",
 * `classify/` code): CLIP with LoRA on the query and value projections of every attention block
 * of both towers, everything else frozen, logit scale included.
 *
 *   logits = exp(logit_scale) * cos(image features, text features of one prompt per class)
 *   loss   = lambda * CE(real part of the batch) + (1 - lambda) * CE(synthetic part)
 *
 * Each CE is a mean over its own part. The class text features are recomputed every training
 * step, because the text tower's LoRA trains too. Optimiser: AdamW with DataDream's
 * per-iteration warm-up + cosine schedule (optim.ts).
 *
 * Two deliberate differences from the original code, both outside its normal operation:
 * - A batch without real (or synthetic) samples: PyTorch's mean CE over an empty selection is
 *   NaN, and DataDream then stops training (`sys.exit(1)`). Here the empty part contributes 0 and
 *   the other part keeps its weight (no renormalisation), which is what DataDream computes for
 *   every batch it does not abort on.
 * - DataDream averages the normalised features of its prompt templates and normalises again;
 *   with its single template that second normalisation changes nothing but rounding, so it is
 *   skipped.
 */
import { enableGrad, fromHost, keep, noGrad, ops, scope, Tensor } from "../../ffi/mod.ts";
import type { TrainedClassifier } from "../../core/plugins.ts";
import type { Linear } from "../../core/nn.ts";
import { type ClipLoadOptions, type ClipModel, l2Normalize, loadClipModel } from "../clip/model.ts";
import { ClipTokenizer } from "../clip/tokenizer.ts";
import { isClipPreset } from "../clip/presets.ts";
import {
  type AdapterMeta,
  DEFAULT_LORA,
  LoraAdapter,
  type LoraConfig,
  type LoraSlot,
  matchesTarget,
  readAdapterConfig,
} from "./lora.ts";
import {
  AdamW,
  checkSchedule,
  DATADREAM_SCHEDULE,
  LossScaler,
  type LossScalerOptions,
  warmupCosineLr,
  type WarmupCosineOptions,
} from "./optim.ts";

/** A tower of CLIP: the text encoder or the vision encoder. */
export type ClipTower = "text" | "vision";

/**
 * Which samples of a batch train: "mixed" weighs the real and synthetic parts by lambda and
 * 1 - lambda; "real" and "synthetic" train on one kind only (a plain mean CE, DataDream's
 * real-only baseline and synthetic-only runs) and refuse batches holding the other kind.
 */
export type TrainMode = "mixed" | "real" | "synthetic";

/** DataDream's weight of the real part of the loss (lambda_1). */
export const DEFAULT_LAMBDA = 0.8;

/** DataDream's prompt word per dataset (`get_dataset_name_for_template`), under both names. */
export const DATASET_WORDS: Readonly<Record<string, string>> = {
  pets: "pet ",
  aircraft: "aircraft ",
  fgvc_aircraft: "aircraft ",
  cars: "car ",
  eurosat: "satellite ",
  dtd: "texture ",
  flowers: "flower ",
  flowers102: "flower ",
  food: "food ",
  food101: "food ",
  sun: "scene ",
  sun397: "scene ",
  imagenet: "",
  imagenet_100: "",
  caltech: "",
  caltech101: "",
  std10: "",
};

/** DataDream's single template (`TEMPLATES_SMALL[0]`): "a {word}photo of a {class}". */
export const DEFAULT_CLASS_PROMPT = "a {word}photo of a {class}";

/**
 * The prompt of one class. `template` may use `{class}` and `{word}` (the dataset's word, with
 * its trailing space; "" for unknown datasets).
 */
export function classPrompt(
  className: string,
  opts: { dataset?: string; template?: string } = {},
): string {
  const template = opts.template ?? DEFAULT_CLASS_PROMPT;
  if (!template.includes("{class}")) {
    throw new Error(`class prompt template ${JSON.stringify(template)} has no {class} placeholder`);
  }
  const word = DATASET_WORDS[opts.dataset ?? ""] ?? "";
  return template.replaceAll("{word}", word).replaceAll("{class}", className);
}

const ATTENTION_FIELDS = {
  q_proj: ["q", "qProj"],
  k_proj: ["k", "kProj"],
  v_proj: ["v", "vProj"],
  out_proj: ["out", "outProj"],
} as const;
type AttentionModule = keyof typeof ATTENTION_FIELDS;

const towerOf = (path: string): ClipTower => (path.startsWith("text_model.") ? "text" : "vision");

/** Every attention projection of the model that LoRA could wrap, by state-dict path. */
function candidateSlots(model: ClipModel): LoraSlot[] {
  const slots: LoraSlot[] = [];
  for (const [prefix, attn] of model.namedAttentions()) {
    for (const [name, [baseKey, field]] of Object.entries(ATTENTION_FIELDS)) {
      const base: Linear = attn.base[baseKey];
      slots.push({ path: `${prefix}.${name}`, base, install: (p) => (attn[field] = p) });
    }
  }
  return slots;
}

/** peft `target_modules` that select exactly `modules` in `towers` of a CLIPModel. */
function peftTargets(modules: readonly string[], towers: readonly ClipTower[]): string | string[] {
  if (towers.includes("text") && towers.includes("vision")) return [...modules];
  const tower = towers[0] === "text" ? "text_model" : "vision_model";
  return `${tower}\\.encoder\\.layers\\.\\d+\\.self_attn\\.(?:${modules.join("|")})`;
}

export interface ClipLoraOptions {
  classNames: readonly string[];
  /** Picks the prompt word (DATASET_WORDS); unknown or absent means "". */
  dataset?: string;
  /** Overrides the prompt template (must contain `{class}`; may contain `{word}`). */
  classPrompt?: string;
  /** LoRA rank / alpha / dropout; DataDream: 16 / 32 / 0.1. */
  lora?: Partial<LoraConfig>;
  /** Attention projections to wrap: q_proj, k_proj, v_proj, out_proj. Default q_proj, v_proj. */
  targetModules?: readonly string[];
  /** Towers that get LoRA. Default both. */
  towers?: readonly ClipTower[];
  /**
   * Start from a saved peft adapter folder: its rank, alpha, dropout and target modules replace
   * `lora`, `targetModules` and `towers`, and its weights are loaded.
   */
  adapter?: string;
  /** Weight of the real part of the loss (DataDream's lambda_1; default DEFAULT_LAMBDA). */
  lambda?: number;
  mode?: TrainMode;
  /** AdamW weight decay, default 1e-4; AdamW's lr comes from the schedule. */
  weightDecay?: number;
  /**
   * The learning-rate schedule (defaults: DATADREAM_SCHEDULE). `itersPerEpoch` must be given to
   * train without passing a rate to each step.
   */
  schedule?: Partial<WarmupCosineOptions>;
  /** Seed of the LoRA A initialisation. Dropout draws from libtorch's default generator. */
  seed?: number;
  /**
   * Dynamic loss scaling (GradScaler); default on when the model's weights are f16, which is how
   * half-precision training runs on CUDA. The LoRA weights and the loss stay f32.
   */
  lossScaling?: boolean | LossScalerOptions;
  /** Dispose the CLIP model with the classifier. Default false. */
  ownsModel?: boolean;
}

type Labels = Tensor | ArrayLike<number>;
type Flags = Tensor | ArrayLike<boolean | number>;

function hostNumbers(x: Tensor | ArrayLike<number | boolean>, what: string): number[] {
  if (x instanceof Tensor) {
    const t = x;
    if (t.ndim !== 1) throw new RangeError(`${what} must be 1-D, got [${t.shape}]`);
    return Array.from(t.toFloat64());
  }
  return Array.from(x as ArrayLike<number | boolean>, Number);
}

export class ClipLoraClassifier implements TrainedClassifier {
  readonly classNames: readonly string[];
  readonly prompts: readonly string[];
  readonly adapter: LoraAdapter;
  readonly optimizer: AdamW;
  readonly scaler: LossScaler | null;
  readonly lambda: number;
  readonly mode: TrainMode;
  readonly towers: readonly ClipTower[];
  readonly targetModules: string | string[];
  readonly schedule: Partial<WarmupCosineOptions>;
  /** Global training iteration: the next step uses the schedule's rate for it. */
  iteration = 0;
  /** The rate the last optimizer step used. */
  lastLr = NaN;
  /** Whether the last optimizer step was applied (false: skipped for inf/NaN gradients). */
  lastStepApplied = true;

  /** Prompt token ids [classes, length]. */
  readonly #ids: Tensor;
  /** Normalised text features with no autograd history, valid until the next training step. */
  #textCache: Tensor | null = null;
  readonly #textTrains: boolean;
  readonly #ownsModel: boolean;

  private constructor(
    readonly model: ClipModel,
    ids: Tensor,
    prompts: string[],
    adapter: LoraAdapter,
    opts: ClipLoraOptions,
    towers: ClipTower[],
    targetModules: string | string[],
  ) {
    this.classNames = [...opts.classNames];
    this.prompts = prompts;
    this.#ids = ids;
    this.adapter = adapter;
    this.towers = towers;
    this.targetModules = targetModules;
    this.#textTrains = adapter.paths.some((p) => towerOf(p) === "text");
    this.lambda = opts.lambda ?? DEFAULT_LAMBDA;
    this.mode = opts.mode ?? "mixed";
    this.schedule = { ...DATADREAM_SCHEDULE, ...opts.schedule };
    this.optimizer = new AdamW(adapter.parameters(), {
      lr: this.schedule.baseLr,
      weightDecay: opts.weightDecay ?? 1e-4,
    });
    const scaling = opts.lossScaling ?? model.logitScale.dtype === "f16";
    this.scaler = scaling === false ? null : new LossScaler(scaling === true ? {} : scaling);
    this.#ownsModel = opts.ownsModel ?? false;
  }

  /** Wraps the model's projections with LoRA (the model is modified in place until dispose). */
  static create(
    model: ClipModel,
    tokenizer: ClipTokenizer,
    opts: ClipLoraOptions,
  ): ClipLoraClassifier {
    if (opts.classNames.length < 2) throw new Error("a classifier needs at least two classes");
    const lambda = opts.lambda ?? DEFAULT_LAMBDA;
    if (!(lambda >= 0 && lambda <= 1)) {
      throw new RangeError(`lambda must be in [0, 1], got ${lambda}`);
    }
    const mode = opts.mode ?? "mixed";
    if (!["mixed", "real", "synthetic"].includes(mode)) {
      throw new Error(`mode must be "mixed", "real" or "synthetic", got ${JSON.stringify(mode)}`);
    }
    if (opts.schedule?.itersPerEpoch !== undefined) {
      checkSchedule({ ...DATADREAM_SCHEDULE, itersPerEpoch: 1, ...opts.schedule });
    }

    let config: LoraConfig;
    let slots: LoraSlot[];
    let towers: ClipTower[];
    let targets: string | string[];
    const all = candidateSlots(model);
    if (opts.adapter !== undefined) {
      const saved = readAdapterConfig(opts.adapter);
      config = { rank: saved.rank, alpha: saved.alpha, dropout: saved.dropout };
      targets = saved.targetModules;
      slots = all.filter((s) => matchesTarget(s.path, saved.targetModules));
      towers = (["text", "vision"] as const).filter((t) =>
        slots.some((s) => towerOf(s.path) === t)
      );
      if (slots.length === 0) {
        throw new Error(
          `${opts.adapter}: target_modules ${JSON.stringify(targets)} match no attention ` +
            "projection of this CLIP model",
        );
      }
    } else {
      config = { ...DEFAULT_LORA, ...opts.lora };
      const modules = opts.targetModules ?? ["q_proj", "v_proj"];
      for (const m of modules) {
        if (!(m in ATTENTION_FIELDS)) {
          throw new Error(
            `LoRA target module "${m}" is not supported (choose from ${
              Object.keys(ATTENTION_FIELDS).join(", ")
            })`,
          );
        }
      }
      towers = [...new Set<ClipTower>(opts.towers ?? ["text", "vision"])];
      for (const t of towers) {
        if (t !== "text" && t !== "vision") throw new Error(`unknown CLIP tower "${t}"`);
      }
      if (towers.length === 0) throw new Error("LoRA needs at least one tower");
      slots = all.filter((s) =>
        towers.includes(towerOf(s.path)) &&
        (modules as string[]).some((m) => s.path.endsWith(`.${m as AttentionModule}`))
      );
      targets = peftTargets(modules, towers);
    }

    const prompts = opts.classNames.map((c) =>
      classPrompt(c, { dataset: opts.dataset, template: opts.classPrompt })
    );
    const enc = tokenizer.encodeBatch(prompts, { padding: "longest" });
    const device = model.logitScale.device;
    const ids = keep(scope(() => fromHost(enc.ids, enc.shape, "i64").to(device)));
    let adapter: LoraAdapter | null = null;
    try {
      adapter = LoraAdapter.attach(slots, config, opts.seed ?? 0);
      if (opts.adapter !== undefined) adapter.load(opts.adapter);
      return new ClipLoraClassifier(model, ids, prompts, adapter, opts, towers, targets);
    } catch (e) {
      adapter?.dispose();
      ids.dispose();
      throw e;
    }
  }

  /** Class text features [classes, P], L2-normalised, f32, in the current grad mode. */
  textFeatures(): Tensor {
    return scope(() => l2Normalize(this.model.getTextFeatures(this.#ids).to("f32")));
  }

  /** Image features [B, P], L2-normalised, f32. */
  imageFeatures(pixels: Tensor): Tensor {
    return scope(() => l2Normalize(this.model.getImageFeatures(pixels).to("f32")));
  }

  #cachedText(): Tensor {
    if (this.#textCache === null) this.#textCache = keep(noGrad(() => this.textFeatures()));
    return this.#textCache;
  }

  /**
   * Class scores [B, classes] in f32, in the current grad mode and train/eval state. In a
   * training forward the text features are recomputed (their LoRA trains); otherwise they are
   * computed once and reused until the next training step.
   */
  logits(pixels: Tensor): Tensor {
    return scope(() => {
      const fresh = this.#textTrains && this.adapter.layers[0].training;
      const text = fresh ? this.textFeatures() : this.#cachedText();
      const image = this.imageFeatures(pixels);
      return ops.matmul(image, text.transpose(0, 1)).mul(ops.exp(this.model.logitScale.to("f32")));
    });
  }

  /**
   * The recipe's loss for one batch: lambda * CE(real) + (1 - lambda) * CE(synthetic) in "mixed"
   * mode (an empty part adds 0, the other keeps its weight), a plain mean CE in the one-kind modes.
   */
  loss(logits: Tensor, labels: Labels, isSynthetic: Flags): Tensor {
    return scope(() => {
      const y = hostNumbers(labels, "labels");
      const syn = hostNumbers(isSynthetic, "isSynthetic").map((v) => v !== 0);
      const b = logits.shape[0];
      if (y.length !== b || syn.length !== b) {
        throw new RangeError(
          `loss: ${b} logits rows, ${y.length} labels, ${syn.length} synthetic flags`,
        );
      }
      const k = logits.shape[1];
      const bad = y.find((v) => !Number.isInteger(v) || v < 0 || v >= k);
      if (bad !== undefined) throw new RangeError(`label ${bad} is not a class index 0..${k - 1}`);
      const real = [...y.keys()].filter((i) => !syn[i]);
      const synthetic = [...y.keys()].filter((i) => syn[i]);
      let parts: [number[], number][];
      if (this.mode === "mixed") {
        parts = [[real, this.lambda], [synthetic, 1 - this.lambda]];
      } else {
        const [keep, other, what] = this.mode === "real"
          ? [real, synthetic, "synthetic"]
          : [synthetic, real, "real"];
        if (other.length) {
          throw new Error(`${this.mode}-only training got ${other.length} ${what} sample(s)`);
        }
        parts = [[keep, 1]];
      }
      if (b === 0) throw new RangeError("loss: empty batch");
      let total: Tensor | null = null;
      for (const [rows, weight] of parts) {
        if (rows.length === 0) continue;
        const ce = this.#meanCe(logits, y, rows);
        const term = weight === 1 ? ce : ce.mul(weight);
        total = total === null ? term : total.add(term);
      }
      return total!;
    });
  }

  #meanCe(logits: Tensor, labels: number[], rows: number[]): Tensor {
    const device = logits.device;
    const target = fromHost(rows.map((i) => labels[i]), [rows.length], "i64").to(device);
    const part = rows.length === logits.shape[0]
      ? logits
      : ops.indexSelect(logits, 0, fromHost(rows, [rows.length], "i64").to(device));
    return ops.crossEntropy(part, target, 1, 0);
  }

  /**
   * Forward and backward of one batch with LoRA dropout on; leaves the gradients on the LoRA
   * weights (scaled, when loss scaling is on) and returns the unscaled loss. A non-finite loss
   * throws, as DataDream stops on one.
   */
  forwardBackward(pixels: Tensor, labels: Labels, isSynthetic: Flags): number {
    this.adapter.train(true);
    if (this.#textTrains) this.#dropTextCache();
    this.optimizer.zeroGrad();
    return enableGrad(() =>
      scope(() => {
        const loss = this.loss(this.logits(pixels), labels, isSynthetic);
        const value = loss.item();
        if (!Number.isFinite(value)) {
          throw new Error(`loss is ${value} at iteration ${this.iteration}: training stopped`);
        }
        ops.backward(this.scaler ? this.scaler.scaleLoss(loss) : loss, null);
        return value;
      })
    );
  }

  /** The schedule's rate for `iteration` (default: the next step's). */
  lrAt(iteration = this.iteration): number {
    const s = this.schedule;
    if (s.itersPerEpoch === undefined) {
      throw new Error(
        "no learning-rate schedule: give schedule.itersPerEpoch, or pass a rate to the step",
      );
    }
    return warmupCosineLr(iteration, s as WarmupCosineOptions);
  }

  /**
   * AdamW on the gradients `forwardBackward` left, at `lr` or the schedule's rate, then advances
   * the iteration. With loss scaling, a step with inf/NaN gradients is skipped (GradScaler);
   * the iteration still advances, as DataDream's loop does.
   */
  optimizerStep(lr?: number): boolean {
    const rate = lr ?? this.lrAt();
    let applied = true;
    if (this.scaler) {
      applied = this.scaler.unscale(this.optimizer.params);
      if (applied) this.optimizer.step(rate);
      this.scaler.update(applied);
    } else {
      this.optimizer.step(rate);
    }
    if (this.#textTrains) this.#dropTextCache();
    this.lastLr = rate;
    this.lastStepApplied = applied;
    this.iteration += 1;
    return applied;
  }

  /** One training iteration: forward, backward, AdamW. Returns the batch loss. */
  trainStep(pixels: Tensor, labels: Labels, isSynthetic: Flags, lr?: number): number {
    const loss = this.forwardBackward(pixels, labels, isSynthetic);
    this.optimizerStep(lr);
    return loss;
  }

  /** Side of the square images the vision tower takes. */
  get inputSize(): number {
    return this.model.vision.config.imageSize;
  }

  /**
   * Class scores [B, classes] (f32) for preprocessed images (any device and float dtype: they are
   * moved to the model's), dropout off, no autograd.
   */
  predict(pixels: Tensor): Tensor {
    this.adapter.train(false);
    const { device, dtype } = this.model.logitScale;
    return noGrad(() =>
      scope(() =>
        this.logits(
          pixels.device === device && pixels.dtype === dtype
            ? pixels
            : pixels.to({ device, dtype }),
        )
      )
    );
  }

  /** Predicted class index per image. */
  predictLabels(pixels: Tensor): number[] {
    return scope(() => Array.from(ops.argmax(this.predict(pixels), -1, false).toFloat64()));
  }

  /** Writes the LoRA weights as a peft adapter folder (loads with `PeftModel.from_pretrained`). */
  saveAdapter(dir: string, meta: Partial<AdapterMeta> = {}): void {
    this.adapter.save(dir, {
      targetModules: this.targetModules,
      baseModelClass: "CLIPModel",
      parentLibrary: "transformers.models.clip.modeling_clip",
      ...meta,
    });
  }

  /** Loads LoRA weights saved by `saveAdapter` or by peft into the existing layers. */
  loadAdapter(dir: string): void {
    this.adapter.load(dir);
    this.#dropTextCache();
  }

  #dropTextCache(): void {
    this.#textCache?.dispose();
    this.#textCache = null;
  }

  /** Restores the model's own projections and frees the LoRA and optimiser state. */
  dispose(): void {
    this.#dropTextCache();
    this.optimizer.dispose();
    this.adapter.dispose();
    this.#ids.dispose();
    if (this.#ownsModel) this.model.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

/**
 * Loads a CLIPModel (a transformers folder such as openai/clip-vit-base-patch16 with its
 * tokenizer files, or the "tiny" preset with the byte-level tokenizer) and wraps it; the
 * classifier owns the model.
 */
export async function loadClipLoraClassifier(
  src: string,
  opts: ClipLoraOptions & { load?: ClipLoadOptions },
): Promise<ClipLoraClassifier> {
  const tokenizer = isClipPreset(src)
    ? ClipTokenizer.byteLevel()
    : await ClipTokenizer.fromFolder(src);
  const model = loadClipModel(src, opts.load);
  try {
    return ClipLoraClassifier.create(model, tokenizer, { ...opts, ownsModel: true });
  } catch (e) {
    model.dispose();
    throw e;
  }
}
