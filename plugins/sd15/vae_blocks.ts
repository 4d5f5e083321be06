/**
 * The building blocks of diffusers' VAE Encoder/Decoder, named like their state-dict keys:
 * the mid-block attention and the DownEncoderBlock2D / UpDecoderBlock2D / UNetMidBlock2D containers
 * around the layers shared with the UNet (layers.ts: ResnetBlock2D without time embedding,
 * Downsample2D with padding 0, Upsample2D).
 *
 * Every forward runs in its own memory scope, so a block's temporaries are freed as soon as it
 * returns: at 512 px the decoder's activations are hundreds of MB each, and holding them until
 * the end of `decode` would multiply peak memory. When a key fails to load (missing, wrong
 * shape), constructors free the layers they had already built before rethrowing.
 */
import { ops, scope, type Tensor } from "../../ffi/mod.ts";
import { GroupNorm, Linear, Module } from "../../core/nn.ts";
import type { WeightSource } from "../../core/weights.ts";
import type { VaeActivation } from "./vae_config.ts";
import { Downsample2D, ResnetBlock2D, Upsample2D } from "./layers.ts";

/** diffusers builds every VAE norm with this eps (resnets, attention and the output norms). */
export const VAE_NORM_EPS = 1e-6;

/** The VAE's resnets: no time embedding. */
function resnet(
  w: WeightSource,
  cin: number,
  cout: number,
  groups: number,
  act: VaeActivation,
): ResnetBlock2D {
  return new ResnetBlock2D(w, cin, cout, { groups, eps: VAE_NORM_EPS, act, tembChannels: null });
}

/**
 * The mid-block self-attention: group norm, then one head spanning all channels over the H*W
 * positions, projected back and added to the input. Loads current diffusers names
 * (to_q/to_k/to_v/to_out.0) and, for VAE folders saved by old diffusers versions, the deprecated
 * query/key/value/proj_attn names (same shapes, as diffusers itself converts them on load).
 */
export class VaeAttention extends Module {
  readonly groupNorm: GroupNorm;
  readonly toQ: Linear;
  readonly toK: Linear;
  readonly toV: Linear;
  readonly toOut: Linear;

  constructor(w: WeightSource, readonly channels: number, groups: number) {
    super();
    const legacy = !w.has("to_q.weight") && w.has("query.weight");
    const names = legacy
      ? { q: "query", k: "key", v: "value", out: "proj_attn" }
      : { q: "to_q", k: "to_k", v: "to_v", out: "to_out.0" };
    this.groupNorm = this.child(
      "group_norm",
      new GroupNorm(w.sub("group_norm"), groups, channels, VAE_NORM_EPS),
    );
    const lin = (name: string) => this.child(name, new Linear(w.sub(name), channels, channels));
    this.toQ = lin(names.q);
    this.toK = lin(names.k);
    this.toV = lin(names.v);
    this.toOut = lin(names.out);
  }

  forward(x: Tensor): Tensor {
    return scope(() => {
      const [b, c, h, wd] = x.shape;
      // [B, C, H, W] -> [B, HW, C]: positions are the sequence, channels the features.
      const seq = this.groupNorm.forward(x).reshape([b, c, h * wd]).transpose(1, 2);
      // A head axis of 1 keeps sdpa on its 4-D fused kernels where the device has them.
      const q = this.toQ.forward(seq).unsqueeze(1);
      const k = this.toK.forward(seq).unsqueeze(1);
      const v = this.toV.forward(seq).unsqueeze(1);
      const attn = ops.sdpa(q, k, v, null, 0, false, null).squeeze(1);
      const out = this.toOut.forward(attn).transpose(1, 2).reshape([b, c, h, wd]);
      return ops.add(out, x);
    });
  }
}

/** UNetMidBlock2D as the VAE builds it: resnet, (attention), resnet. */
export class VaeMidBlock extends Module {
  readonly resnets: ResnetBlock2D[] = [];
  readonly attention: VaeAttention | null = null;

  constructor(
    w: WeightSource,
    channels: number,
    groups: number,
    act: VaeActivation,
    addAttention: boolean,
  ) {
    super();
    for (let i = 0; i < 2; i++) {
      const name = `resnets.${i}`;
      this.resnets.push(
        this.child(name, resnet(w.sub(name), channels, channels, groups, act)),
      );
      if (i === 0 && addAttention) {
        this.attention = this.child(
          "attentions.0",
          new VaeAttention(w.sub("attentions.0"), channels, groups),
        );
      }
    }
  }

  forward(x: Tensor): Tensor {
    return scope(() => {
      let h = this.resnets[0].forward(x);
      if (this.attention) h = this.attention.forward(h);
      return this.resnets[1].forward(h);
    });
  }
}

/** DownEncoderBlock2D: `layers` resnets, then an optional stride-2 downsampler. */
export class DownEncoderBlock extends Module {
  readonly resnets: ResnetBlock2D[] = [];
  readonly downsampler: Downsample2D | null = null;

  constructor(
    w: WeightSource,
    cin: number,
    cout: number,
    layers: number,
    groups: number,
    act: VaeActivation,
    addDownsample: boolean,
  ) {
    super();
    for (let i = 0; i < layers; i++) {
      const name = `resnets.${i}`;
      this.resnets.push(
        this.child(
          name,
          resnet(w.sub(name), i === 0 ? cin : cout, cout, groups, act),
        ),
      );
    }
    if (addDownsample) {
      this.downsampler = this.child(
        "downsamplers.0",
        new Downsample2D(w.sub("downsamplers.0"), cout, 0),
      );
    }
  }

  forward(x: Tensor): Tensor {
    return scope(() => {
      let h = x;
      for (const r of this.resnets) h = r.forward(h);
      return this.downsampler ? this.downsampler.forward(h) : h;
    });
  }
}

/** UpDecoderBlock2D: `layers` resnets, then an optional 2x upsampler. */
export class UpDecoderBlock extends Module {
  readonly resnets: ResnetBlock2D[] = [];
  readonly upsampler: Upsample2D | null = null;

  constructor(
    w: WeightSource,
    cin: number,
    cout: number,
    layers: number,
    groups: number,
    act: VaeActivation,
    addUpsample: boolean,
  ) {
    super();
    for (let i = 0; i < layers; i++) {
      const name = `resnets.${i}`;
      this.resnets.push(
        this.child(
          name,
          resnet(w.sub(name), i === 0 ? cin : cout, cout, groups, act),
        ),
      );
    }
    if (addUpsample) {
      this.upsampler = this.child("upsamplers.0", new Upsample2D(w.sub("upsamplers.0"), cout));
    }
  }

  forward(x: Tensor): Tensor {
    return scope(() => {
      let h = x;
      for (const r of this.resnets) h = r.forward(h);
      return this.upsampler ? this.upsampler.forward(h) : h;
    });
  }
}
