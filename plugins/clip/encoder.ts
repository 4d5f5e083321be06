/**
 * The pre-LayerNorm transformer encoder both CLIP towers share (transformers' `CLIPEncoder`).
 * Field names mirror the state-dict keys (`layers.N.self_attn.q_proj`, `layer_norm1`, `mlp.fc1`).
 */
import { ops, scope, type Tensor } from "../../ffi/mod.ts";
import { LayerNorm, Linear, Module } from "../../core/nn.ts";
import type { WeightSource } from "../../core/weights.ts";
import type { ClipActivation, ClipEncoderConfig } from "./config.ts";

/**
 * Anything that maps [..., in] to [..., out]. The attention projections are typed this way so a
 * LoRA wrapper can take the place of a `Linear` (e.g. `attn.qProj = lora(attn.qProj)`).
 */
export interface Projection {
  forward(x: Tensor): Tensor;
}

export function activate(x: Tensor, act: ClipActivation): Tensor {
  switch (act) {
    case "quick_gelu":
      return ops.quickGelu(x);
    case "gelu":
      return ops.gelu(x, false);
    case "gelu_new":
    case "gelu_pytorch_tanh":
      return ops.gelu(x, true);
    case "relu":
      return ops.relu(x);
    case "silu":
      return ops.silu(x);
  }
}

export class ClipAttention extends Module {
  /** Replaceable: LoRA wraps `qProj` and `vProj` (the base `Linear`s stay registered as params). */
  qProj: Projection;
  kProj: Projection;
  vProj: Projection;
  outProj: Projection;
  /** The loaded layers, whatever now sits in the replaceable fields. */
  readonly base: { q: Linear; k: Linear; v: Linear; out: Linear };
  readonly heads: number;
  readonly headDim: number;

  constructor(w: WeightSource, cfg: ClipEncoderConfig) {
    super();
    const d = cfg.hiddenSize;
    this.heads = cfg.numAttentionHeads;
    this.headDim = d / this.heads;
    // Registered in checkpoint order so namedParameters() reads like the state dict.
    const k = this.child("k_proj", new Linear(w.sub("k_proj"), d, d));
    const v = this.child("v_proj", new Linear(w.sub("v_proj"), d, d));
    const q = this.child("q_proj", new Linear(w.sub("q_proj"), d, d));
    const out = this.child("out_proj", new Linear(w.sub("out_proj"), d, d));
    this.base = { q, k, v, out };
    this.qProj = q;
    this.kProj = k;
    this.vProj = v;
    this.outProj = out;
  }

  /** x [B, L, D]; `mask` is a boolean [B, 1, L, L] (true = attend) or null. */
  forward(x: Tensor, mask: Tensor | null, causal: boolean): Tensor {
    return scope(() => {
      const [b, l, d] = x.shape;
      const heads = (t: Tensor) => t.reshape([b, l, this.heads, this.headDim]).transpose(1, 2);
      const q = heads(this.qProj.forward(x));
      const k = heads(this.kProj.forward(x));
      const v = heads(this.vProj.forward(x));
      const o = ops.sdpa(q, k, v, mask, 0, causal, this.headDim ** -0.5);
      return this.outProj.forward(o.transpose(1, 2).reshape([b, l, d]));
    });
  }
}

export class ClipMlp extends Module {
  readonly fc1: Linear;
  readonly fc2: Linear;

  constructor(w: WeightSource, cfg: ClipEncoderConfig, readonly act = cfg.hiddenAct) {
    super();
    this.fc1 = this.child("fc1", new Linear(w.sub("fc1"), cfg.hiddenSize, cfg.intermediateSize));
    this.fc2 = this.child("fc2", new Linear(w.sub("fc2"), cfg.intermediateSize, cfg.hiddenSize));
  }

  forward(x: Tensor): Tensor {
    return scope(() => this.fc2.forward(activate(this.fc1.forward(x), this.act)));
  }
}

export class ClipEncoderLayer extends Module {
  readonly selfAttn: ClipAttention;
  readonly layerNorm1: LayerNorm;
  readonly mlp: ClipMlp;
  readonly layerNorm2: LayerNorm;

  constructor(w: WeightSource, cfg: ClipEncoderConfig) {
    super();
    const d = cfg.hiddenSize, eps = cfg.layerNormEps;
    this.selfAttn = this.child("self_attn", new ClipAttention(w.sub("self_attn"), cfg));
    this.layerNorm1 = this.child("layer_norm1", new LayerNorm(w.sub("layer_norm1"), d, eps));
    this.mlp = this.child("mlp", new ClipMlp(w.sub("mlp"), cfg));
    this.layerNorm2 = this.child("layer_norm2", new LayerNorm(w.sub("layer_norm2"), d, eps));
  }

  forward(x: Tensor, mask: Tensor | null, causal: boolean): Tensor {
    return scope(() => {
      const h = x.add(this.selfAttn.forward(this.layerNorm1.forward(x), mask, causal));
      return h.add(this.mlp.forward(this.layerNorm2.forward(h)));
    });
  }
}

export class ClipEncoder extends Module {
  readonly layers: ClipEncoderLayer[] = [];

  constructor(w: WeightSource, cfg: ClipEncoderConfig) {
    super();
    for (let i = 0; i < cfg.numHiddenLayers; i++) {
      this.layers.push(this.child(`layers.${i}`, new ClipEncoderLayer(w.sub(`layers.${i}`), cfg)));
    }
  }

  /**
   * Runs the first `count` layers (all by default). transformers' `hidden_states[i]` is the
   * output of `i` layers, so `hidden_states[-2]` is `count = layers - 1`.
   */
  forward(
    x: Tensor,
    opts: { mask?: Tensor | null; causal?: boolean; count?: number } = {},
  ): Tensor {
    const count = opts.count ?? this.layers.length;
    if (count === 0) return x.share();
    let h = x;
    for (let i = 0; i < count; i++) {
      const next = this.layers[i].forward(h, opts.mask ?? null, opts.causal ?? false);
      if (h !== x) h.dispose();
      h = next;
    }
    return h;
  }

  /** Resolves a Python-style `hidden_states` index (negative counts from the end) to a count. */
  layerCount(index: number): number {
    const n = this.layers.length + 1;
    const i = index < 0 ? n + index : index;
    if (!Number.isInteger(i) || i < 0 || i >= n) {
      throw new RangeError(`hidden_states index ${index} is out of range for ${n - 1} layers`);
    }
    return i;
  }
}
