/**
 * The building blocks of diffusers' `UNet2DConditionModel`, named like its state-dict keys:
 * time embedding, ResnetBlock2D, Transformer2DModel (BasicTransformerBlock with self attention,
 * text cross attention plus IP-Adapter decoupled cross attention, GEGLU feed-forward), the down /
 * mid / up blocks SD1.5 uses, and the resampling layers. Op order follows diffusers so fp32 results
 * agree to rounding. Attention (with its IP-Adapter branches), the feed-forward and the resnets
 * each run as one fused native op (native/src/fused.cpp): a forward makes a few hundred FFI calls,
 * not thousands, which is what bounds a small UNet on the CPU and every UNet's host time on a GPU.
 */
import { Conv2d, GroupNorm, LayerNorm, Linear, Module } from "../../core/nn.ts";
import type { WeightSource } from "../../core/weights.ts";
import { ops, scope, type Tensor } from "../../ffi/mod.ts";
import type { UNetActivation } from "./unet_config.ts";
import {
  activation,
  Downsample2D,
  ResnetBlock2D,
  type ResnetOptions,
  Upsample2D,
} from "./layers.ts";

export { activation, Downsample2D, ResnetBlock2D, type ResnetOptions, Upsample2D };

/**
 * Sinusoidal timestep features as diffusers' `get_timestep_embedding` (max period 10000):
 * `t * exp(-ln(10000) * i / (half - freqShift))`, [sin | cos], swapped to [cos | sin] when
 * `flipSinToCos`, zero-padded to odd `dim`. `t` is a [B] float tensor.
 */
export function timestepFeatures(
  t: Tensor,
  dim: number,
  flipSinToCos: boolean,
  freqShift: number,
): Tensor {
  const half = Math.floor(dim / 2);
  const exponent = ops.arange(0, half, 1, "f32", t.device).mul(-Math.log(10000)).div(
    half - freqShift,
  );
  const args = ops.mul(
    ops.unsqueeze(ops.to(t, "f32", undefined), 1),
    ops.unsqueeze(ops.exp(exponent), 0),
  );
  const sin = ops.sin(args), cos = ops.cos(args);
  const emb = ops.cat(flipSinToCos ? [cos, sin] : [sin, cos], -1);
  return dim % 2 === 1 ? ops.pad(emb, [0, 1, 0, 0], 0, 0) : emb;
}

/** `TimestepEmbedding`: linear_1, activation, linear_2. */
export class TimestepEmbedding extends Module {
  readonly linear_1: Linear;
  readonly linear_2: Linear;

  constructor(w: WeightSource, inDim: number, dim: number, readonly act: UNetActivation) {
    super();
    this.linear_1 = this.child("linear_1", new Linear(w.sub("linear_1"), inDim, dim));
    this.linear_2 = this.child("linear_2", new Linear(w.sub("linear_2"), dim, dim));
  }

  forward(x: Tensor): Tensor {
    return this.linear_2.forward(activation(this.linear_1.forward(x), this.act));
  }
}

/** One adapter's key/value projections for one cross-attention layer (no biases). */
export class IpAttnProjection extends Module {
  readonly to_k_ip: Linear;
  readonly to_v_ip: Linear;

  constructor(w: WeightSource, crossDim: number, hidden: number) {
    super();
    this.to_k_ip = this.child("to_k_ip", new Linear(w.sub("to_k_ip"), crossDim, hidden, false));
    this.to_v_ip = this.child("to_v_ip", new Linear(w.sub("to_v_ip"), crossDim, hidden, false));
  }
}

/**
 * Image-prompt inputs for one batched UNet call: per adapter, its image tokens [B, T_a, cross]
 * and its per-sample scale as a [B, 1, 1] column.
 */
export interface IpBatch {
  tokens: readonly Tensor[];
  scales: readonly Tensor[];
}

/** The conditioning every cross-attention layer sees. */
export interface CrossCond {
  text: Tensor;
  ip: IpBatch | null;
}

/**
 * diffusers' `Attention` with the SDPA processor (heads of `dimHead`, default 1/sqrt(d) scale),
 * run as one native op together with its IP-Adapter branches and the block's residual add.
 */
export class Attention extends Module {
  readonly to_q: Linear;
  readonly to_k: Linear;
  readonly to_v: Linear;
  readonly to_out: Linear;
  #ip: readonly IpAttnProjection[] = [];
  /** The attached adapters' weights as the op takes them: to_k_ip, to_v_ip per adapter. */
  #ipWeights: Tensor[] = [];

  constructor(
    w: WeightSource,
    readonly queryDim: number,
    readonly contextDim: number,
    readonly heads: number,
    readonly dimHead: number,
  ) {
    super();
    const inner = heads * dimHead;
    this.to_q = this.child("to_q", new Linear(w.sub("to_q"), queryDim, inner, false));
    this.to_k = this.child("to_k", new Linear(w.sub("to_k"), contextDim, inner, false));
    this.to_v = this.child("to_v", new Linear(w.sub("to_v"), contextDim, inner, false));
    this.to_out = this.child("to_out.0", new Linear(w.sub("to_out.0"), inner, queryDim));
  }

  get innerDim(): number {
    return this.heads * this.dimHead;
  }

  /** IP-Adapter projections attached by the UNet (owned by the adapters, not by this layer). */
  get ip(): readonly IpAttnProjection[] {
    return this.#ip;
  }

  set ip(layers: readonly IpAttnProjection[]) {
    this.#ip = layers;
    this.#ipWeights = layers.flatMap((l) => [l.to_k_ip.weight, l.to_v_ip.weight]);
  }

  /**
   * `context` null means self attention. With `ip`, every attached adapter adds its own softmax
   * attention over its image tokens, times its per-sample scale, before the output projection
   * (decoupled cross attention, as diffusers' IPAdapterAttnProcessor2_0). `residual`, when
   * given, is added to the output (the transformer block's skip).
   */
  forward(
    x: Tensor,
    context: Tensor | null,
    ip: IpBatch | null = null,
    residual: Tensor | null = null,
  ): Tensor {
    const withIp = ip !== null && this.#ip.length > 0;
    return ops.attention(
      x,
      context,
      this.to_q.weight,
      this.to_k.weight,
      this.to_v.weight,
      this.to_out.weight,
      this.to_out.bias,
      this.heads,
      withIp ? ip.tokens : NONE,
      withIp ? this.#ipWeights : NONE,
      withIp ? ip.scales : NONE,
      residual,
    );
  }
}

const NONE: readonly Tensor[] = [];

/** `FeedForward` with GEGLU: net.0.proj -> (h, gate) -> h * gelu(gate) -> net.2 (one native op). */
export class GegluFeedForward extends Module {
  readonly proj: Linear;
  readonly out: Linear;

  constructor(w: WeightSource, dim: number, mult = 4) {
    super();
    const inner = dim * mult;
    this.proj = this.child("net.0.proj", new Linear(w.sub("net.0.proj"), dim, inner * 2));
    this.out = this.child("net.2", new Linear(w.sub("net.2"), inner, dim));
  }

  /** `residual`, when given, is added to the output (the transformer block's skip). */
  forward(x: Tensor, residual: Tensor | null = null): Tensor {
    return ops.gegluFeedForward(
      x,
      this.proj.weight,
      this.proj.bias,
      this.out.weight,
      this.out.bias,
      residual,
    );
  }
}

export interface TransformerOptions {
  heads: number;
  crossDim: number;
  groups: number;
  depth: number;
  useLinearProjection: boolean;
  onlyCrossAttention: boolean;
}

/** `BasicTransformerBlock`: self attention, cross attention (+ IP), GEGLU feed-forward. */
export class BasicTransformerBlock extends Module {
  readonly norm1: LayerNorm;
  readonly attn1: Attention;
  readonly norm2: LayerNorm;
  readonly attn2: Attention;
  readonly norm3: LayerNorm;
  readonly ff: GegluFeedForward;

  constructor(
    w: WeightSource,
    dim: number,
    heads: number,
    dimHead: number,
    crossDim: number,
    readonly onlyCrossAttention: boolean,
  ) {
    super();
    this.norm1 = this.child("norm1", new LayerNorm(w.sub("norm1"), dim));
    // with only_cross_attention, attn1 reads the text instead of the image features
    const ctx1 = onlyCrossAttention ? crossDim : dim;
    this.attn1 = this.child("attn1", new Attention(w.sub("attn1"), dim, ctx1, heads, dimHead));
    this.norm2 = this.child("norm2", new LayerNorm(w.sub("norm2"), dim));
    this.attn2 = this.child("attn2", new Attention(w.sub("attn2"), dim, crossDim, heads, dimHead));
    this.norm3 = this.child("norm3", new LayerNorm(w.sub("norm3"), dim));
    this.ff = this.child("ff", new GegluFeedForward(w.sub("ff"), dim));
  }

  forward(x: Tensor, cond: CrossCond): Tensor {
    const ctx1 = this.onlyCrossAttention ? cond.text : null;
    x = this.attn1.forward(this.norm1.forward(x), ctx1, null, x);
    x = this.attn2.forward(this.norm2.forward(x), cond.text, cond.ip, x);
    return this.ff.forward(this.norm3.forward(x), x);
  }
}

/** `Transformer2DModel` over continuous [B, C, H, W] input (1x1 conv or linear in/out). */
export class Transformer2DModel extends Module {
  readonly norm: GroupNorm;
  readonly proj_in: Conv2d | Linear;
  readonly proj_out: Conv2d | Linear;
  readonly blocks: BasicTransformerBlock[] = [];
  readonly inner: number;

  constructor(w: WeightSource, channels: number, readonly o: TransformerOptions) {
    super();
    const dimHead = Math.floor(channels / o.heads);
    const inner = this.inner = o.heads * dimHead;
    // diffusers fixes this GroupNorm's eps at 1e-6, whatever the UNet's norm_eps
    this.norm = this.child("norm", new GroupNorm(w.sub("norm"), o.groups, channels, 1e-6));
    this.proj_in = this.child(
      "proj_in",
      o.useLinearProjection
        ? new Linear(w.sub("proj_in"), channels, inner)
        : new Conv2d(w.sub("proj_in"), channels, inner, 1),
    );
    for (let i = 0; i < o.depth; i++) {
      const name = `transformer_blocks.${i}`;
      this.blocks.push(this.child(
        name,
        new BasicTransformerBlock(
          w.sub(name),
          inner,
          o.heads,
          dimHead,
          o.crossDim,
          o.onlyCrossAttention,
        ),
      ));
    }
    this.proj_out = this.child(
      "proj_out",
      o.useLinearProjection
        ? new Linear(w.sub("proj_out"), inner, channels)
        : new Conv2d(w.sub("proj_out"), inner, channels, 1),
    );
  }

  /** In its own scope: at 512 px the token activations of one transformer are hundreds of MB. */
  forward(x: Tensor, cond: CrossCond): Tensor {
    return scope(() => {
      const [, , hgt, wid] = x.shape;
      const linear = this.o.useLinearProjection;
      const normed = this.norm.forward(x);
      let h = linear
        ? this.proj_in.forward(ops.imageToTokens(normed))
        : ops.imageToTokens(this.proj_in.forward(normed));
      for (const blk of this.blocks) h = blk.forward(h, cond);
      h = linear
        ? ops.tokensToImage(this.proj_out.forward(h), hgt, wid)
        : this.proj_out.forward(ops.tokensToImage(h, hgt, wid));
      return h.add(x);
    });
  }
}

/** What the down/mid/up blocks share from the UNet config. */
export interface BlockOptions extends ResnetOptions {
  /** null for blocks without attention. */
  transformer: Omit<TransformerOptions, "depth"> | null;
}

/**
 * `CrossAttnDownBlock2D` and `DownBlock2D` (the latter when `o.transformer` is null). `depths` has
 * one entry per layer: the depth of that layer's transformer (unused without attention).
 */
export class DownBlock extends Module {
  readonly resnets: ResnetBlock2D[] = [];
  readonly attentions: Transformer2DModel[] = [];
  readonly downsampler: Downsample2D | null;

  constructor(
    w: WeightSource,
    cin: number,
    cout: number,
    depths: readonly number[],
    addDownsample: boolean,
    downsamplePadding: number,
    o: BlockOptions,
  ) {
    super();
    depths.forEach((depth, i) => {
      this.resnets.push(
        this.child(
          `resnets.${i}`,
          new ResnetBlock2D(w.sub(`resnets.${i}`), i ? cout : cin, cout, o),
        ),
      );
      if (o.transformer) {
        const name = `attentions.${i}`;
        this.attentions.push(
          this.child(name, new Transformer2DModel(w.sub(name), cout, { ...o.transformer, depth })),
        );
      }
    });
    this.downsampler = addDownsample
      ? this.child(
        "downsamplers.0",
        new Downsample2D(w.sub("downsamplers.0"), cout, downsamplePadding),
      )
      : null;
  }

  /** Returns the block output and the skip tensors it adds for the up path. */
  forward(x: Tensor, temb: Tensor, cond: CrossCond): { out: Tensor; skips: Tensor[] } {
    const skips: Tensor[] = [];
    let h = x;
    this.resnets.forEach((r, i) => {
      h = r.forward(h, temb);
      if (this.attentions.length) h = this.attentions[i].forward(h, cond);
      skips.push(h);
    });
    if (this.downsampler) {
      h = this.downsampler.forward(h);
      skips.push(h);
    }
    return { out: h, skips };
  }
}

/** `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) per layer. */
export class MidBlock extends Module {
  readonly resnets: ResnetBlock2D[] = [];
  readonly attentions: Transformer2DModel[] = [];

  constructor(w: WeightSource, channels: number, depth: number, o: BlockOptions) {
    super();
    if (!o.transformer) throw new Error("UNetMidBlock2DCrossAttn needs attention options");
    const layers = 1; // get_mid_block always builds it with the default num_layers
    this.resnets.push(
      this.child("resnets.0", new ResnetBlock2D(w.sub("resnets.0"), channels, channels, o)),
    );
    for (let i = 0; i < layers; i++) {
      const an = `attentions.${i}`, rn = `resnets.${i + 1}`;
      this.attentions.push(
        this.child(an, new Transformer2DModel(w.sub(an), channels, { ...o.transformer, depth })),
      );
      this.resnets.push(this.child(rn, new ResnetBlock2D(w.sub(rn), channels, channels, o)));
    }
  }

  forward(x: Tensor, temb: Tensor, cond: CrossCond): Tensor {
    let h = this.resnets[0].forward(x, temb);
    this.attentions.forEach((a, i) => {
      h = this.resnets[i + 1].forward(a.forward(h, cond), temb);
    });
    return h;
  }
}

/** `CrossAttnUpBlock2D` and `UpBlock2D` (the latter when `o.transformer` is null); see DownBlock. */
export class UpBlock extends Module {
  readonly resnets: ResnetBlock2D[] = [];
  readonly attentions: Transformer2DModel[] = [];
  readonly upsampler: Upsample2D | null;

  constructor(
    w: WeightSource,
    cin: number,
    prevOut: number,
    cout: number,
    depths: readonly number[],
    addUpsample: boolean,
    o: BlockOptions,
  ) {
    super();
    const n = depths.length;
    depths.forEach((depth, i) => {
      // the skip of the last layer comes from the block below (cin), the others from this level
      const skip = i === n - 1 ? cin : cout;
      const resIn = i === 0 ? prevOut : cout;
      this.resnets.push(
        this.child(
          `resnets.${i}`,
          new ResnetBlock2D(w.sub(`resnets.${i}`), resIn + skip, cout, o),
        ),
      );
      if (o.transformer) {
        const name = `attentions.${i}`;
        this.attentions.push(
          this.child(name, new Transformer2DModel(w.sub(name), cout, { ...o.transformer, depth })),
        );
      }
    });
    this.upsampler = addUpsample
      ? this.child("upsamplers.0", new Upsample2D(w.sub("upsamplers.0"), cout))
      : null;
  }

  /**
   * Consumes its skips from the end of `skips`. The upsampler targets the size of the next skip
   * left on the stack: 2x when the latent divides evenly, and still aligned when it does not.
   */
  forward(x: Tensor, skips: Tensor[], temb: Tensor, cond: CrossCond): Tensor {
    let h = x;
    this.resnets.forEach((r, i) => {
      const skip = skips.pop();
      if (!skip) throw new Error("UNet up block: ran out of skip connections");
      h = r.forward(ops.cat([h, skip], 1), temb);
      if (this.attentions.length) h = this.attentions[i].forward(h, cond);
    });
    if (!this.upsampler) return h;
    const next = skips[skips.length - 1];
    return this.upsampler.forward(h, next ? [next.size(2), next.size(3)] : undefined);
  }
}
