/**
 * LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") for frozen `Linear`
 * layers, laid out like peft 0.21 so adapters move both ways between this project and Python:
 *
 *   y = base(x) + B(A(dropout(x))) * alpha / r      A: [r, in], B: [out, r], no biases
 *
 * A starts as peft's `kaiming_uniform_(a=sqrt(5))`, i.e. U(-1/sqrt(in), 1/sqrt(in)), and B at
 * zero, so a fresh adapter leaves the model unchanged. Dropout only touches the LoRA branch's
 * input. Only A and B require grad; the base weights never accumulate gradients.
 *
 * On disk (peft's `save_pretrained`): `adapter_model.safetensors` with keys
 * `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (the adapter name "default"
 * is not part of the saved keys), plus `adapter_config.json`.
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import {
  Generator,
  keep,
  noGrad,
  ops,
  SafetensorsFile,
  saveSafetensors,
  scope,
  type Tensor,
} from "../../ffi/mod.ts";
import type { Linear } from "../../core/nn.ts";

/** The low-rank update's shape: rank, scale and dropout. */
export interface LoraConfig {
  /** Rank r of the update B·A. */
  rank: number;
  /** The update is scaled by alpha / rank. */
  alpha: number;
  /** Dropout probability on the LoRA branch's input while training. */
  dropout: number;
}

export const DEFAULT_LORA: Readonly<LoraConfig> = { rank: 16, alpha: 32, dropout: 0.1 };

/** peft's prefix of every key in a saved adapter. */
export const PEFT_PREFIX = "base_model.model.";
export const ADAPTER_WEIGHTS = "adapter_model.safetensors";
export const ADAPTER_CONFIG = "adapter_config.json";

export function checkLoraConfig(c: LoraConfig): void {
  if (!Number.isInteger(c.rank) || c.rank < 1) {
    throw new RangeError(`LoRA rank must be a positive integer, got ${c.rank}`);
  }
  if (!Number.isFinite(c.alpha)) throw new RangeError(`LoRA alpha must be finite, got ${c.alpha}`);
  if (!(c.dropout >= 0 && c.dropout < 1)) {
    throw new RangeError(`LoRA dropout must be in [0, 1), got ${c.dropout}`);
  }
}

/** A frozen `Linear` plus a trainable low-rank update; drop-in for the layer it wraps. */
export class LoraLinear implements Disposable {
  readonly loraA: Tensor;
  readonly loraB: Tensor;
  readonly scaling: number;
  /** Dropout is applied only while training. */
  training = true;

  constructor(readonly base: Linear, readonly config: LoraConfig, generator: Generator) {
    checkLoraConfig(config);
    const [out, inp] = base.weight.shape;
    const device = base.weight.device;
    const bound = 1 / Math.sqrt(inp);
    // LoRA weights stay f32 whatever the base dtype: they are the optimiser's master copy.
    const [a, b] = scope(() => {
      const u = ops.rand([config.rank, inp], "f32", "cpu", generator);
      return [
        ops.to(u.mul(2 * bound).sub(bound), "f32", device),
        ops.zeros([out, config.rank], "f32", device),
      ];
    });
    this.loraA = keep(a);
    this.loraB = keep(b);
    ops.requiresGrad_(this.loraA, true);
    ops.requiresGrad_(this.loraB, true);
    this.scaling = config.alpha / config.rank;
  }

  forward(x: Tensor): Tensor {
    return scope(() => {
      const y = this.base.forward(x);
      const p = this.config.dropout;
      const h = this.training && p > 0 ? ops.dropout(x, p, true) : x;
      // Half-precision bases run the branch in their dtype (as autocast would); the cast is
      // differentiable, so gradients still land on the f32 weights.
      const a = this.loraA.dtype === h.dtype ? this.loraA : this.loraA.to(h.dtype);
      const b = this.loraB.dtype === h.dtype ? this.loraB : this.loraB.to(h.dtype);
      const update = ops.linear(ops.linear(h, a, null), b, null).mul(this.scaling);
      return y.add(update);
    });
  }

  /** Overwrites A and B (shapes must match), keeping them trainable. */
  assign(a: Tensor, b: Tensor): void {
    for (
      const [dst, src, what] of [[this.loraA, a, "lora_A"], [this.loraB, b, "lora_B"]] as const
    ) {
      if (dst.shape.length !== src.shape.length || dst.shape.some((d, i) => d !== src.shape[i])) {
        throw new RangeError(
          `${what}: got shape [${src.shape}], the layer needs [${dst.shape}]`,
        );
      }
      noGrad(() => ops.copy_(dst, src));
    }
  }

  dispose(): void {
    this.loraA.dispose();
    this.loraB.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** Somewhere a LoRA layer can be installed: a module path and a replaceable `Linear`. */
export interface LoraSlot {
  /** State-dict path of the layer, e.g. `text_model.encoder.layers.0.self_attn.q_proj`. */
  path: string;
  base: Linear;
  /** Puts a projection in the model's forward path (the LoRA layer, or the base to undo). */
  install(p: { forward(x: Tensor): Tensor }): void;
}

/**
 * peft's module matching: a list matches a module whose path equals an entry or ends with
 * `.<entry>`; a string is a regular expression that must match the whole path.
 */
export function matchesTarget(path: string, targets: string | readonly string[]): boolean {
  if (typeof targets === "string") return new RegExp(`^(?:${targets})$`).test(path);
  return targets.some((t) => path === t || path.endsWith(`.${t}`));
}

export interface AdapterMeta {
  /** peft `target_modules`: module names, or one regular expression over module paths. */
  targetModules: string | string[];
  /** Recorded in adapter_config.json (peft's `auto_mapping`). */
  baseModelClass?: string;
  parentLibrary?: string;
  baseModelNameOrPath?: string | null;
}

/** What an adapter_config.json says, as far as this implementation uses it. */
export interface PeftAdapterConfig extends LoraConfig {
  targetModules: string | string[];
}

/** Reads and validates an adapter_config.json written by peft or by `LoraAdapter.save`. */
export function readAdapterConfig(dir: string): PeftAdapterConfig {
  const file = join(dir, ADAPTER_CONFIG);
  if (!existsSync(file)) throw new Error(`${dir}: no ${ADAPTER_CONFIG} (expected a peft adapter)`);
  let j: Record<string, unknown>;
  try {
    j = JSON.parse(readFileSync(file, "utf8"));
  } catch (e) {
    throw new Error(`${file}: not valid JSON (${(e as Error).message})`);
  }
  const bad = (key: string, why: string) => new Error(`${file}: "${key}" ${why}`);
  if (j.peft_type !== undefined && j.peft_type !== "LORA") {
    throw bad("peft_type", `is ${JSON.stringify(j.peft_type)}; only LORA adapters are supported`);
  }
  const num = (key: string, dflt: number) => {
    const v = j[key] ?? dflt;
    if (typeof v !== "number") throw bad(key, `must be a number, got ${JSON.stringify(v)}`);
    return v;
  };
  // Defaults are peft's LoraConfig defaults.
  const config: PeftAdapterConfig = {
    rank: num("r", 8),
    alpha: num("lora_alpha", 8),
    dropout: num("lora_dropout", 0),
    targetModules: [],
  };
  const t = j.target_modules;
  if (typeof t === "string") config.targetModules = t;
  else if (Array.isArray(t) && t.every((x) => typeof x === "string")) config.targetModules = t;
  else throw bad("target_modules", `must be a list of names or a regex, got ${JSON.stringify(t)}`);
  // Options that change the maths or the key layout; refusing beats silently mis-loading.
  const unsupported: [string, (v: unknown) => boolean][] = [
    ["use_rslora", (v) => v === true],
    ["use_dora", (v) => v === true],
    ["fan_in_fan_out", (v) => v === true],
    ["bias", (v) => v !== undefined && v !== "none"],
    ["lora_bias", (v) => v === true],
    ["rank_pattern", (v) => v !== undefined && v !== null && Object.keys(v as object).length > 0],
    ["alpha_pattern", (v) => v !== undefined && v !== null && Object.keys(v as object).length > 0],
    ["layers_to_transform", (v) => v !== undefined && v !== null],
    ["modules_to_save", (v) => v !== undefined && v !== null],
    ["exclude_modules", (v) => v !== undefined && v !== null],
    ["target_parameters", (v) => v !== undefined && v !== null],
  ];
  for (const [key, isSet] of unsupported) {
    if (isSet(j[key])) throw bad(key, `= ${JSON.stringify(j[key])} is not supported`);
  }
  checkLoraConfig(config);
  return config;
}

/** The LoRA layers installed in one model, with peft-compatible names and files. */
export class LoraAdapter implements Disposable {
  readonly #slots: LoraSlot[];
  readonly layers: LoraLinear[];
  #attached = true;

  private constructor(slots: LoraSlot[], layers: LoraLinear[], readonly config: LoraConfig) {
    this.#slots = slots;
    this.layers = layers;
  }

  /** Wraps every slot in a fresh LoRA layer (A from `seed`, B zero) and installs it. */
  static attach(slots: LoraSlot[], config: LoraConfig, seed = 0): LoraAdapter {
    checkLoraConfig(config);
    if (slots.length === 0) throw new Error("LoRA: no layer matched the target modules");
    const layers: LoraLinear[] = [];
    using g = new Generator(seed);
    try {
      for (const s of slots) layers.push(new LoraLinear(s.base, config, g));
    } catch (e) {
      for (const l of layers) l.dispose();
      throw e;
    }
    slots.forEach((s, i) => s.install(layers[i]));
    return new LoraAdapter(slots, layers, config);
  }

  /** Every trainable tensor: A then B of each layer, in slot order. */
  parameters(): Tensor[] {
    return this.layers.flatMap((l) => [l.loraA, l.loraB]);
  }

  /** Trainable tensors by name (`<path>.lora_A.weight`), in slot order. */
  namedParameters(): Map<string, Tensor> {
    const out = new Map<string, Tensor>();
    this.#slots.forEach((s, i) => {
      out.set(`${s.path}.lora_A.weight`, this.layers[i].loraA);
      out.set(`${s.path}.lora_B.weight`, this.layers[i].loraB);
    });
    return out;
  }

  get paths(): string[] {
    return this.#slots.map((s) => s.path);
  }

  /** Switches LoRA dropout on (training) or off (evaluation). */
  train(on: boolean): void {
    for (const l of this.layers) l.training = on;
  }

  /** Writes `adapter_model.safetensors` + `adapter_config.json` as peft's save_pretrained does. */
  save(dir: string, meta: AdapterMeta): void {
    mkdirSync(dir, { recursive: true });
    const weights = new Map<string, Tensor>();
    try {
      noGrad(() => {
        for (const [name, t] of this.namedParameters()) {
          const host = scope(() => ops.to(ops.contiguous(t.detach()), "f32", "cpu"));
          weights.set(PEFT_PREFIX + name, keep(host));
        }
      });
      saveSafetensors(join(dir, ADAPTER_WEIGHTS), weights, { format: "pt" });
    } finally {
      for (const t of weights.values()) t.dispose();
    }
    const config = {
      peft_type: "LORA",
      task_type: null,
      auto_mapping: meta.baseModelClass
        ? { base_model_class: meta.baseModelClass, parent_library: meta.parentLibrary ?? null }
        : null,
      base_model_name_or_path: meta.baseModelNameOrPath ?? null,
      revision: null,
      inference_mode: true,
      r: this.config.rank,
      lora_alpha: this.config.alpha,
      lora_dropout: this.config.dropout,
      target_modules: meta.targetModules,
      exclude_modules: null,
      bias: "none",
      fan_in_fan_out: false,
      init_lora_weights: true,
      use_rslora: false,
      use_dora: false,
      modules_to_save: null,
      layers_to_transform: null,
      layers_pattern: null,
      rank_pattern: {},
      alpha_pattern: {},
    };
    writeFileSync(join(dir, ADAPTER_CONFIG), JSON.stringify(config, null, 2) + "\n");
  }

  /**
   * Loads weights saved by peft or by `save` into these layers. The file must hold exactly this
   * adapter's keys (with or without peft's `base_model.model.` prefix) and the config the same
   * rank and alpha; anything else names the offending key or field.
   */
  load(dir: string): void {
    const cfg = readAdapterConfig(dir);
    const file = join(dir, ADAPTER_CONFIG);
    if (
      cfg.rank !== this.config.rank || cfg.alpha / cfg.rank !== this.config.alpha / this.config.rank
    ) {
      throw new Error(
        `${file}: r=${cfg.rank}, lora_alpha=${cfg.alpha} do not match this adapter ` +
          `(r=${this.config.rank}, alpha=${this.config.alpha})`,
      );
    }
    const path = join(dir, ADAPTER_WEIGHTS);
    if (!existsSync(path)) throw new Error(`${dir}: no ${ADAPTER_WEIGHTS}`);
    const f = SafetensorsFile.open(path);
    const strip = (k: string) => (k.startsWith(PEFT_PREFIX) ? k.slice(PEFT_PREFIX.length) : k);
    const inFile = new Map(f.keys().map((k) => [strip(k), k]));
    const wanted = this.namedParameters();
    const missing = [...wanted.keys()].filter((k) => !inFile.has(k));
    const extra = [...inFile.keys()].filter((k) => !wanted.has(k));
    if (missing.length || extra.length) {
      const show = (l: string[]) => l.slice(0, 4).join(", ") + (l.length > 4 ? ", ..." : "");
      throw new Error(
        `${path}: does not fit this model's LoRA layers` +
          (missing.length ? `; missing ${missing.length}: ${show(missing)}` : "") +
          (extra.length ? `; unexpected ${extra.length}: ${show(extra)}` : ""),
      );
    }
    this.#slots.forEach((s, i) => {
      const layer = this.layers[i];
      const device = layer.loraA.device;
      scope(() => {
        const a = f.load(inFile.get(`${s.path}.lora_A.weight`)!, { dtype: "f32", device });
        const b = f.load(inFile.get(`${s.path}.lora_B.weight`)!, { dtype: "f32", device });
        try {
          layer.assign(a, b);
        } catch (e) {
          throw new Error(`${path}: ${s.path}: ${(e as Error).message}`);
        }
      });
    });
  }

  /** Puts the base layers back into the model (the LoRA weights stay alive until dispose). */
  detach(): void {
    if (!this.#attached) return;
    for (const s of this.#slots) s.install(s.base);
    this.#attached = false;
  }

  /** Detaches and frees the LoRA weights; the model's own weights are untouched. */
  dispose(): void {
    this.detach();
    for (const l of this.layers) l.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
