/**
 * Stable Diffusion's VAE: diffusers' AutoencoderKL (Encoder + DiagonalGaussian + Decoder), loaded
 * from a diffusers `vae/` folder by the same state-dict keys. Images are [B, C, H, W] in [-1, 1];
 * latents are [B, latent_channels, H/f, W/f] with f = 2^(blocks - 1).
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import {
  type Device,
  type DType,
  type Generator,
  ops,
  refusePickle,
  scope,
  type Tensor,
} from "../../ffi/mod.ts";
import { Conv2d, GroupNorm, loadModule, Module } from "../../core/nn.ts";
import {
  RandomSource,
  SafetensorsSource,
  WeightError,
  type WeightSource,
} from "../../core/weights.ts";
import { activation } from "./layers.ts";
import { DownEncoderBlock, UpDecoderBlock, VAE_NORM_EPS, VaeMidBlock } from "./vae_blocks.ts";
import { readVaeConfig, type VaeConfig } from "./vae_config.ts";

/** The encoder's Gaussian over latents, in unscaled latent units. */
export interface LatentDistribution {
  mean: Tensor;
  /** Clamped to [-30, 20] as diffusers does, so exp() stays finite. */
  logvar: Tensor;
}

export class VaeEncoder extends Module {
  readonly convIn: Conv2d;
  readonly downBlocks: DownEncoderBlock[] = [];
  readonly midBlock: VaeMidBlock;
  readonly convNormOut: GroupNorm;
  readonly convOut: Conv2d;

  constructor(w: WeightSource, readonly cfg: VaeConfig) {
    super();
    const ch = cfg.blockOutChannels, groups = cfg.normNumGroups, act = cfg.actFn;
    const last = ch[ch.length - 1];
    this.convIn = this.child(
      "conv_in",
      new Conv2d(w.sub("conv_in"), cfg.inChannels, ch[0], 3, { padding: 1 }),
    );
    for (let i = 0; i < ch.length; i++) {
      const name = `down_blocks.${i}`;
      const cin = i === 0 ? ch[0] : ch[i - 1];
      const block = new DownEncoderBlock(
        w.sub(name),
        cin,
        ch[i],
        cfg.layersPerBlock,
        groups,
        act,
        i < ch.length - 1,
      );
      this.downBlocks.push(this.child(name, block));
    }
    this.midBlock = this.child(
      "mid_block",
      new VaeMidBlock(w.sub("mid_block"), last, groups, act, cfg.midBlockAddAttention),
    );
    this.convNormOut = this.child(
      "conv_norm_out",
      new GroupNorm(w.sub("conv_norm_out"), groups, last, VAE_NORM_EPS),
    );
    // Mean and log-variance for every latent channel.
    this.convOut = this.child(
      "conv_out",
      new Conv2d(w.sub("conv_out"), last, 2 * cfg.latentChannels, 3, { padding: 1 }),
    );
  }

  forward(x: Tensor): Tensor {
    return scope(() => {
      let h = this.convIn.forward(x);
      for (const b of this.downBlocks) h = b.forward(h);
      h = this.midBlock.forward(h);
      // diffusers hard-codes SiLU here whatever act_fn says (act_fn only reaches the resnets).
      return this.convOut.forward(activation(this.convNormOut.forward(h), "silu"));
    });
  }
}

export class VaeDecoder extends Module {
  readonly convIn: Conv2d;
  readonly midBlock: VaeMidBlock;
  readonly upBlocks: UpDecoderBlock[] = [];
  readonly convNormOut: GroupNorm;
  readonly convOut: Conv2d;

  constructor(w: WeightSource, readonly cfg: VaeConfig) {
    super();
    const rev = [...cfg.blockOutChannels].reverse();
    const groups = cfg.normNumGroups, act = cfg.actFn;
    this.convIn = this.child(
      "conv_in",
      new Conv2d(w.sub("conv_in"), cfg.latentChannels, rev[0], 3, { padding: 1 }),
    );
    this.midBlock = this.child(
      "mid_block",
      new VaeMidBlock(w.sub("mid_block"), rev[0], groups, act, cfg.midBlockAddAttention),
    );
    for (let i = 0; i < rev.length; i++) {
      const name = `up_blocks.${i}`;
      const cin = i === 0 ? rev[0] : rev[i - 1];
      // One resnet more than the encoder's blocks, as in the original LDM decoder.
      const block = new UpDecoderBlock(
        w.sub(name),
        cin,
        rev[i],
        cfg.layersPerBlock + 1,
        groups,
        act,
        i < rev.length - 1,
      );
      this.upBlocks.push(this.child(name, block));
    }
    const first = rev[rev.length - 1];
    this.convNormOut = this.child(
      "conv_norm_out",
      new GroupNorm(w.sub("conv_norm_out"), groups, first, VAE_NORM_EPS),
    );
    this.convOut = this.child(
      "conv_out",
      new Conv2d(w.sub("conv_out"), first, cfg.outChannels, 3, { padding: 1 }),
    );
  }

  forward(z: Tensor): Tensor {
    return scope(() => {
      let h = this.convIn.forward(z);
      h = this.midBlock.forward(h);
      for (const b of this.upBlocks) h = b.forward(h);
      return this.convOut.forward(activation(this.convNormOut.forward(h), "silu"));
    });
  }
}

export interface VaeLoadOptions {
  dtype?: DType;
  device?: Device;
  /** Loads `diffusion_pytorch_model.<variant>.safetensors` (e.g. "fp16"). */
  variant?: string;
}

export class AutoencoderKL extends Module {
  readonly encoder: VaeEncoder;
  readonly decoder: VaeDecoder;
  readonly quantConv: Conv2d | null = null;
  readonly postQuantConv: Conv2d | null = null;
  readonly dtype: DType;
  readonly device: Device;

  constructor(w: WeightSource, readonly config: VaeConfig) {
    super();
    this.dtype = w.dtype;
    this.device = w.device;
    const lat = config.latentChannels;
    this.encoder = this.child("encoder", new VaeEncoder(w.sub("encoder"), config));
    this.decoder = this.child("decoder", new VaeDecoder(w.sub("decoder"), config));
    if (config.useQuantConv) {
      this.quantConv = this.child(
        "quant_conv",
        new Conv2d(w.sub("quant_conv"), 2 * lat, 2 * lat, 1),
      );
    }
    if (config.usePostQuantConv) {
      this.postQuantConv = this.child(
        "post_quant_conv",
        new Conv2d(w.sub("post_quant_conv"), lat, lat, 1),
      );
    }
  }

  /**
   * Loads a diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors). Every
   * tensor in the file must be used: a checkpoint with extra keys is a different model.
   */
  static fromPretrained(dir: string, opts: VaeLoadOptions = {}): AutoencoderKL {
    const config = readVaeConfig(join(dir, "config.json"));
    const base = "diffusion_pytorch_model";
    const file = join(
      dir,
      opts.variant ? `${base}.${opts.variant}.safetensors` : `${base}.safetensors`,
    );
    if (!existsSync(file)) {
      const bin = join(dir, opts.variant ? `${base}.${opts.variant}.bin` : `${base}.bin`);
      if (existsSync(bin)) refusePickle(bin);
      throw new WeightError(`${file}: VAE weights not found (expected a diffusers vae/ folder)`);
    }
    const source = SafetensorsSource.open(file, opts.dtype ?? "f32", opts.device ?? "cpu");
    return loadModule(source, (w) => new AutoencoderKL(w, config));
  }

  /** Seeded random weights (tiny presets, benchmarks of the full-size shape). */
  static random(
    config: VaeConfig,
    seed = 0,
    opts: { dtype?: DType; device?: Device } = {},
  ): AutoencoderKL {
    const source = new RandomSource(seed, opts.dtype, opts.device);
    return loadModule(source, (w) => new AutoencoderKL(w, config), { checkUnused: false });
  }

  #input(x: Tensor, channels: number, what: string): Tensor {
    if (x.ndim !== 4 || x.shape[1] !== channels) {
      throw new RangeError(
        `AutoencoderKL.${what}: expected [B, ${channels}, H, W], got [${x.shape.join(", ")}]`,
      );
    }
    return x.dtype === this.dtype && x.device === this.device
      ? x
      : ops.to(x, this.dtype, this.device);
  }

  /** The posterior's parameters for images in [-1, 1]. */
  encode(x: Tensor): LatentDistribution {
    return scope(() => {
      let h = this.encoder.forward(this.#input(x, this.config.inChannels, "encode"));
      if (this.quantConv) h = this.quantConv.forward(h);
      const [mean, logvar] = ops.chunk(h, 2, 1);
      return { mean: ops.contiguous(mean), logvar: ops.clamp(logvar, -30, 20) };
    });
  }

  /** Raw decoder output for unscaled latents (about [-1, 1]; not rescaled or clamped). */
  decode(z: Tensor): Tensor {
    return scope(() => {
      let h = this.#input(z, this.config.latentChannels, "decode");
      if (this.postQuantConv) h = this.postQuantConv.forward(h);
      return this.decoder.forward(h);
    });
  }

  /**
   * Scaled latents for images in [-1, 1], as the UNet sees them: the posterior mean, or a sample
   * from it when a generator is given (drawn like diffusers' `latent_dist.sample(generator)` with
   * a CPU generator), then `(z - shift) * scaling_factor`.
   */
  encodeLatents(x: Tensor, gen?: Generator): Tensor {
    return scope(() => {
      const { mean, logvar } = this.encode(x);
      let z = mean;
      if (gen) {
        const noise = ops.to(ops.randn(mean.shape, mean.dtype, "cpu", gen), undefined, mean.device);
        z = ops.add(mean, ops.mul(ops.exp(ops.mulScalar(logvar, 0.5)), noise));
      }
      const shift = this.config.shiftFactor;
      if (shift !== null) z = ops.subScalar(z, shift);
      return ops.mulScalar(z, this.config.scalingFactor);
    });
  }

  /** Images in [0, 1] from scaled latents: decode(z / scaling_factor + shift) / 2 + 0.5, clamped. */
  decodeToImage(latents: Tensor): Tensor {
    return scope(() => {
      let z = ops.divScalar(latents, this.config.scalingFactor);
      const shift = this.config.shiftFactor;
      if (shift !== null) z = ops.addScalar(z, shift);
      const x = this.decode(z);
      return ops.clamp(ops.addScalar(ops.mulScalar(x, 0.5), 0.5), 0, 1);
    });
  }
}
