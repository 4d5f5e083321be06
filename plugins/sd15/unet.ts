/**
 * diffusers' `UNet2DConditionModel` (the SD1.5 denoiser) with any number of IP-Adapters attached.
 * One call can mix conditionings: each sample has its own scale for each adapter, so DIPSY's four
 * predictions (unconditional, text, text + positive image, text + both images) run as one batch.
 */
import { existsSync } from "node:fs";
import { Conv2d, GroupNorm, loadModule, Module } from "../../core/nn.ts";
import {
  RandomSource,
  SafetensorsSource,
  WeightError,
  type WeightSource,
} from "../../core/weights.ts";
import { type Device, type DType, ops, refusePickle, scope, type Tensor } from "../../ffi/mod.ts";
import { type SdpaBackend, sdpaBackend } from "../../ffi/runtime.ts";
import {
  activation,
  type Attention,
  type BlockOptions,
  type CrossCond,
  DownBlock,
  type IpAttnProjection,
  type IpBatch,
  MidBlock,
  TimestepEmbedding,
  timestepFeatures,
  UpBlock,
} from "./unet_blocks.ts";
import {
  loadUNetConfig,
  parseUNetConfig,
  SD15_UNET_CONFIG_JSON,
  type UNetConfig,
} from "./unet_config.ts";

/** Image-prompt inputs of one UNet call. */
export interface IpInput {
  /** Per attached adapter, its projected image tokens [B, T_a, cross_dim]. */
  tokens: readonly Tensor[];
  /** [B, adapters]: the scale of each adapter for each sample; 0 switches it off exactly. */
  scales: Tensor;
}

/** Anything that carries one IP projection per cross-attention layer (see ip_adapter.ts). */
export interface IpAttachable {
  readonly layers: readonly IpAttnProjection[];
}

export interface LoadOptions {
  dtype?: DType;
  device?: Device;
}

export class UNet2DConditionModel extends Module {
  readonly conv_in: Conv2d;
  readonly time_embedding: TimestepEmbedding;
  readonly down_blocks: DownBlock[] = [];
  readonly mid_block: MidBlock | null;
  readonly up_blocks: UpBlock[] = [];
  readonly conv_norm_out: GroupNorm;
  readonly conv_out: Conv2d;
  #adapters = 0;

  constructor(w: WeightSource, readonly config: UNetConfig) {
    super();
    const c = config;
    const boc = c.blockOutChannels;
    const n = boc.length;
    this.conv_in = this.child(
      "conv_in",
      new Conv2d(w.sub("conv_in"), c.inChannels, boc[0], c.convInKernel, {
        padding: (c.convInKernel - 1) >> 1,
      }),
    );
    this.time_embedding = this.child(
      "time_embedding",
      new TimestepEmbedding(w.sub("time_embedding"), boc[0], c.timeEmbedDim, c.actFn),
    );
    const base = {
      groups: c.normNumGroups,
      eps: c.normEps,
      act: c.actFn,
      tembChannels: c.timeEmbedDim,
    };
    const opts = (cross: boolean, i: number, onlyCross: boolean): BlockOptions => ({
      ...base,
      transformer: cross
        ? {
          heads: c.numAttentionHeads[i],
          crossDim: c.crossAttentionDim[i],
          groups: c.normNumGroups,
          useLinearProjection: c.useLinearProjection,
          onlyCrossAttention: onlyCross,
        }
        : null,
    });

    let out = boc[0];
    c.downBlockTypes.forEach((type, i) => {
      const cin = out;
      out = boc[i];
      const cross = type === "CrossAttnDownBlock2D";
      const depths = cross ? c.downTransformerLayers[i] : Array(c.layersPerBlock[i]).fill(0);
      const name = `down_blocks.${i}`;
      this.down_blocks.push(this.child(
        name,
        new DownBlock(
          w.sub(name),
          cin,
          out,
          depths,
          i < n - 1,
          c.downsamplePadding,
          opts(cross, i, c.onlyCrossAttention[i]),
        ),
      ));
    });

    // the mid block never uses only_cross_attention in diffusers' UNetMidBlock2DCrossAttn
    this.mid_block = c.midBlockType === null ? null : this.child(
      "mid_block",
      new MidBlock(w.sub("mid_block"), boc[n - 1], c.midTransformerLayers, {
        ...opts(true, n - 1, false),
        outputScaleFactor: c.midBlockScaleFactor,
      }),
    );

    const rev = [...boc].reverse();
    out = rev[0];
    c.upBlockTypes.forEach((type, i) => {
      const prevOut = out;
      out = rev[i];
      const cin = rev[Math.min(i + 1, n - 1)];
      const cross = type === "CrossAttnUpBlock2D";
      const layers = c.layersPerBlock[n - 1 - i] + 1;
      const depths = cross ? c.upTransformerLayers[i] : Array(layers).fill(0);
      const name = `up_blocks.${i}`;
      this.up_blocks.push(this.child(
        name,
        new UpBlock(
          w.sub(name),
          cin,
          prevOut,
          out,
          depths,
          i < n - 1,
          opts(cross, n - 1 - i, c.onlyCrossAttention[n - 1 - i]),
        ),
      ));
    });

    this.conv_norm_out = this.child(
      "conv_norm_out",
      new GroupNorm(w.sub("conv_norm_out"), c.normNumGroups, boc[0], c.normEps),
    );
    this.conv_out = this.child(
      "conv_out",
      new Conv2d(w.sub("conv_out"), boc[0], c.outChannels, c.convOutKernel, {
        padding: (c.convOutKernel - 1) >> 1,
      }),
    );
  }

  /**
   * Loads a diffusers `unet/` folder: `config.json` + `diffusion_pytorch_model.safetensors`.
   * Every key of the file must be used.
   */
  static fromPretrained(dir: string, opts: LoadOptions = {}): UNet2DConditionModel {
    const config = loadUNetConfig(dir);
    const file = `${dir}/diffusion_pytorch_model.safetensors`;
    if (!existsSync(file)) {
      const bin = `${dir}/diffusion_pytorch_model.bin`;
      if (existsSync(bin)) refusePickle(bin);
      throw new WeightError(`${file}: not found (expected a diffusers unet/ folder)`);
    }
    const src = SafetensorsSource.open(file, opts.dtype ?? "f32", opts.device ?? "cpu");
    return loadModule(src, (w) => new UNet2DConditionModel(w, config));
  }

  /** Random weights (seeded) for a config given as `config.json` content: tiny presets, tests. */
  static random(
    configJson: Record<string, unknown>,
    seed = 0,
    opts: LoadOptions = {},
  ): UNet2DConditionModel {
    const src = new RandomSource(seed, opts.dtype ?? "f32", opts.device ?? "cpu");
    return new UNet2DConditionModel(src, parseUNetConfig(configJson, "preset config"));
  }

  /**
   * Every cross-attention layer (`attn2`) in diffusers' attention-processor registration order:
   * down blocks, then up blocks, then the mid block. Layer i is IP-Adapter key `2i + 1`.
   */
  crossAttentions(): Attention[] {
    const out: Attention[] = [];
    const blocks = [
      ...this.down_blocks,
      ...this.up_blocks,
      ...(this.mid_block ? [this.mid_block] : []),
    ];
    for (const b of blocks) {
      for (const t of b.attentions) for (const blk of t.blocks) out.push(blk.attn2);
    }
    return out;
  }

  /** Attaches adapters in order (adapter a reads `ip.tokens[a]` and `ip.scales[:, a]`). */
  attachIpAdapters(adapters: readonly IpAttachable[]): void {
    const layers = this.crossAttentions();
    adapters.forEach((a, ai) => {
      if (a.layers.length !== layers.length) {
        throw new Error(
          `IP-Adapter ${ai} has ${a.layers.length} attention projections; this UNet has ` +
            `${layers.length} cross-attention layers`,
        );
      }
      a.layers.forEach((p, i) => {
        const want = layers[i].innerDim;
        const got = p.to_k_ip.weight.size(0);
        if (got !== want) {
          throw new Error(
            `IP-Adapter ${ai}: ip_adapter.${2 * i + 1}.to_k_ip has ${got} outputs, the UNet's ` +
              `cross-attention layer ${i} needs ${want}`,
          );
        }
      });
    });
    layers.forEach((l, i) => l.ip = adapters.map((a) => a.layers[i]));
    this.#adapters = adapters.length;
  }

  detachIpAdapters(): void {
    for (const l of this.crossAttentions()) l.ip = [];
    this.#adapters = 0;
  }

  get ipAdapterCount(): number {
    return this.#adapters;
  }

  /**
   * Predicts the noise for `sample` [B, C, h, w] at `timestep` (a number, or a [B] / [1] / []
   * tensor on any device) given text states [B, L, cross_dim]. With `ip`, every attached adapter
   * adds its image attention scaled per sample; without it the adapters are off. A timestep tensor
   * on the sample's device makes the forward free of host data, as a CUDA graph needs: a number
   * becomes a tensor made here.
   */
  forward(
    sample: Tensor,
    timestep: number | Tensor,
    encoderHiddenStates: Tensor,
    ip?: IpInput | null,
  ): Tensor {
    return scope(() => {
      const c = this.config;
      const b = sample.size(0);
      const { dtype, device } = sample;
      if (encoderHiddenStates.size(0) !== b) {
        throw new Error(
          `UNet: encoderHiddenStates batch ${encoderHiddenStates.size(0)} != sample batch ${b}`,
        );
      }
      let t: Tensor;
      if (typeof timestep === "number") {
        t = ops.full([b], timestep, "f32", device);
      } else {
        t = ops.to(timestep.ndim === 0 ? ops.reshape(timestep, [1]) : timestep, undefined, device);
        t = ops.expand(t, [b]);
      }
      const tFeat = ops.to(
        timestepFeatures(t, c.blockOutChannels[0], c.flipSinToCos, c.freqShift),
        dtype,
        undefined,
      );
      const temb = this.time_embedding.forward(tFeat);
      const cond: CrossCond = {
        text: encoderHiddenStates,
        ip: this.#ipBatch(ip ?? null, b, sample),
      };

      let h = c.centerInputSample ? sample.mul(2).sub(1) : sample;
      h = this.conv_in.forward(h);
      const skips: Tensor[] = [h];
      for (const blk of this.down_blocks) {
        const r = blk.forward(h, temb, cond);
        h = r.out;
        skips.push(...r.skips);
      }
      if (this.mid_block) h = this.mid_block.forward(h, temb, cond);
      for (const blk of this.up_blocks) h = blk.forward(h, skips, temb, cond);
      h = activation(this.conv_norm_out.forward(h), c.actFn);
      return this.conv_out.forward(h);
    });
  }

  #ipBatch(ip: IpInput | null, b: number, like: Tensor): IpBatch | null {
    if (!ip) return null;
    const n = this.#adapters;
    if (ip.tokens.length !== n) {
      throw new Error(`UNet: got image tokens for ${ip.tokens.length} adapter(s), ${n} attached`);
    }
    const s = ip.scales.shape;
    if (s.length !== 2 || s[0] !== b || s[1] !== n) {
      throw new Error(
        `UNet: IP scales must be [${b}, ${n}] (batch, adapters), got [${s.join(", ")}]`,
      );
    }
    const scales = ops.to(ip.scales, like.dtype, like.device);
    return {
      tokens: ip.tokens.map((t, a) => {
        if (t.ndim !== 3 || t.size(0) !== b) {
          throw new Error(`UNet: image tokens of adapter ${a} must be [${b}, T, D], got ${t}`);
        }
        return ops.to(t, like.dtype, like.device);
      }),
      scales: Array.from({ length: n }, (_, a) => ops.reshape(ops.select(scales, 1, a), [b, 1, 1])),
    };
  }
}

/** The attention kernel one kind of attention at one UNet level runs. */
export interface AttentionKernel {
  /** Down block index of the level; the up blocks and the mid block repeat these shapes. */
  level: number;
  kind: "self" | "text" | "image";
  heads: number;
  headDim: number;
  queries: number;
  keys: number;
  backend: SdpaBackend;
}

export interface AttentionKernelOptions {
  batch: number;
  /** Latent height and width. */
  height: number;
  width: number;
  dtype: DType;
  device: Device;
  /** Text states per prompt (77 for CLIP). */
  textTokens?: number;
  /** Image tokens per adapter (16 for IP-Adapter Plus); 0: no adapters. */
  imageTokens?: number;
}

/**
 * Which kernel scaled_dot_product_attention picks for each attention of a forward of this UNet
 * config, on inputs laid out as the attention layers lay them out ([B, L, H, d] transposed).
 */
export function attentionKernels(config: UNetConfig, o: AttentionKernelOptions): AttentionKernel[] {
  const out: AttentionKernel[] = [];
  const text = o.textTokens ?? 77, image = o.imageTokens ?? 16;
  scope(() => {
    const heads = (n: number, len: number, d: number) =>
      ops.transpose(ops.zeros([o.batch, len, n, d], o.dtype, o.device), 1, 2);
    const level = (i: number, queries: number) => {
      const n = config.numAttentionHeads[i];
      const d = config.blockOutChannels[i] / n;
      const q = heads(n, queries, d);
      const kinds: [AttentionKernel["kind"], number][] = [["self", queries], ["text", text]];
      if (image > 0) kinds.push(["image", image]);
      for (const [kind, keys] of kinds) {
        const kv = kind === "self" ? q : heads(n, keys, d);
        out.push({
          level: i,
          kind,
          heads: n,
          headDim: d,
          queries,
          keys,
          backend: sdpaBackend(q, kv, kv),
        });
      }
    };
    let h = o.height, w = o.width;
    const last = config.downBlockTypes.length - 1;
    config.downBlockTypes.forEach((type, i) => {
      if (type === "CrossAttnDownBlock2D") level(i, h * w);
      if (i < last) {
        h = Math.ceil(h / 2);
        w = Math.ceil(w / 2);
      }
    });
    // the mid block attends at the last level's size
    if (config.midBlockType !== null) level(last, h * w);
  });
  return out;
}

/**
 * The attention kernels of one SD1.5 forward at 512 px (batch 2, two Plus adapters) on `device`
 * in `dtype`, keyed "<kind> attention, head dim <d>, <queries> x <keys>".
 */
export function sd15AttentionReport(
  device: Device,
  dtype: DType,
): { device: Device; dtype: DType; kernels: Record<string, SdpaBackend> } {
  const config = parseUNetConfig({ ...SD15_UNET_CONFIG_JSON }, "SD1.5 config");
  const kernels: Record<string, SdpaBackend> = {};
  for (const k of attentionKernels(config, { batch: 2, height: 64, width: 64, dtype, device })) {
    kernels[`${k.kind} attention, head dim ${k.headDim}, ${k.queries} x ${k.keys}`] = k.backend;
  }
  return { device, dtype, kernels };
}
