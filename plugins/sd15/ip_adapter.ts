/**
 * IP-Adapter weights (h94 flat safetensors layout): the image projection (`image_proj.*`) and
 * one key/value projection pair per UNet cross-attention layer (`ip_adapter.{k}.to_k_ip/to_v_ip`).
 *
 * k counts attention processors in diffusers' registration order (down blocks, up blocks, mid
 * block), self-attention included, so cross-attention layer i is k = 2i + 1. Only safetensors
 * files are read: pickled `.bin` checkpoints are refused.
 *
 * The positive and the negative image may each have their own file (diffusers' `load_ip_adapter`
 * with one weight name per adapter); both must then read the same image features and give the
 * same number of tokens, which `checkAdapterPair` and `checkEncoderFit` decide from the files'
 * headers and the encoder's config alone, before any weight is loaded.
 */
import { loadModule, Module } from "../../core/nn.ts";
import {
  RandomSource,
  SafetensorsSource,
  WeightError,
  type WeightSource,
} from "../../core/weights.ts";
import { SafetensorsFile, type Tensor } from "../../ffi/mod.ts";
import {
  buildProjection,
  type ImageProjection,
  inferProjectionConfig,
  type IpProjectionConfig,
  PLUS_DIM_HEAD,
} from "./ip_projection.ts";
import type { LoadOptions, UNet2DConditionModel } from "./unet.ts";
import { IpAttnProjection } from "./unet_blocks.ts";

export interface IpAdapterLoadOptions extends LoadOptions {
  /** Head width that splits the Plus resampler's attention (64 in every h94 checkpoint). */
  dimHead?: number;
}

export class IpAdapter extends Module {
  readonly image_proj: ImageProjection;
  /** Layer i belongs to the UNet's cross-attention layer i (checkpoint key 2i + 1). */
  readonly layers: IpAttnProjection[] = [];

  /** `hidden`: the inner width of each UNet cross-attention layer, in registration order. */
  constructor(w: WeightSource, readonly config: IpProjectionConfig, hidden: readonly number[]) {
    super();
    this.image_proj = this.child("image_proj", buildProjection(w.sub("image_proj"), config));
    hidden.forEach((h, i) => {
      const name = `ip_adapter.${2 * i + 1}`;
      this.layers.push(this.child(name, new IpAttnProjection(w.sub(name), config.crossDim, h)));
    });
  }

  get kind(): IpProjectionConfig["kind"] {
    return this.config.kind;
  }

  /**
   * Image tokens [B, T, cross_dim] for the UNet: base takes CLIP `image_embeds` [B, E]; Plus takes
   * the penultimate CLIP hidden states [B, N, W].
   */
  project(image: Tensor): Tensor {
    const want = this.config.kind === "base" ? 2 : 3;
    if (image.ndim !== want) {
      throw new Error(
        `IP-Adapter (${this.config.kind}): image input must have ${want} dims, got ${image}`,
      );
    }
    return this.image_proj.forward(image);
  }

  /** Loads an h94-layout file, sized for `unet`; base vs Plus is read from the keys. */
  static load(
    path: string,
    unet: UNet2DConditionModel,
    opts: IpAdapterLoadOptions = {},
  ): IpAdapter {
    const file = SafetensorsFile.open(path);
    const config = inferProjectionConfig(file, "image_proj.", opts.dimHead ?? PLUS_DIM_HEAD);
    const src = new SafetensorsSource([file], opts.dtype ?? "f32", opts.device ?? "cpu");
    const hidden = unet.crossAttentions().map((a) => a.innerDim);
    try {
      return loadModule(src, (w) => new IpAdapter(w, config, hidden));
    } catch (e) {
      if (!(e instanceof WeightError)) throw e;
      throw new WeightError(
        `IP-Adapter does not fit this UNet (${hidden.length} cross-attention layers, keys ` +
          `ip_adapter.1..${2 * hidden.length - 1}): ${e.message}`,
        { cause: e },
      );
    }
  }

  /** Seeded random weights for a projection config, sized for `unet` (tiny presets, tests). */
  static random(
    config: IpProjectionConfig,
    unet: UNet2DConditionModel,
    seed = 0,
    opts: LoadOptions = {},
  ): IpAdapter {
    const src = new RandomSource(seed, opts.dtype ?? "f32", opts.device ?? "cpu");
    return new IpAdapter(src, config, unet.crossAttentions().map((a) => a.innerDim));
  }
}

/** The projection config of an h94-layout file, read from its header (no weights are loaded). */
export function readIpAdapterConfig(path: string, dimHead = PLUS_DIM_HEAD): IpProjectionConfig {
  return inferProjectionConfig(SafetensorsFile.open(path), "image_proj.", dimHead);
}

/** An adapter file and its projection config, as the checks below name them. */
export interface AdapterFile {
  path: string;
  config: IpProjectionConfig;
}

/** What the image encoder hands an adapter: its width (Plus) and its projection (base). */
export interface EncoderFeatures {
  /** The encoder's folder, for messages. */
  path: string;
  hiddenSize: number;
  /** Null: the encoder has no projection (no `image_embeds`). */
  projectionDim: number | null;
}

function describeAdapter(c: IpProjectionConfig): string {
  return c.kind === "plus"
    ? `IP-Adapter Plus (${c.queries} tokens from ${c.inputDim}-wide hidden states)`
    : `base IP-Adapter (${c.tokens} tokens from ${c.embedDim}-d image embeds)`;
}

/**
 * Refuses a positive/negative pair that would not read the same encoder output or give the same
 * tokens: both are encoded by one image encoder, and an ablation that swaps a file must change
 * the weights only, never the kind of conditioning.
 */
export function checkAdapterPair(positive: AdapterFile, negative: AdapterFile): void {
  const a = positive.config, b = negative.config;
  const tokens = (c: IpProjectionConfig) => c.kind === "plus" ? c.queries : c.tokens;
  const input = (c: IpProjectionConfig) => c.kind === "plus" ? c.inputDim : c.embedDim;
  if (
    a.kind !== b.kind || tokens(a) !== tokens(b) || input(a) !== input(b) ||
    a.crossDim !== b.crossDim
  ) {
    throw new WeightError(
      `the positive and negative IP-Adapters do not match: ${positive.path} is ` +
        `${describeAdapter(a)}, ${negative.path} is ${describeAdapter(b)}; both must be the ` +
        "same kind (Plus or base) with the same token count",
    );
  }
}

/** Refuses an adapter that its image encoder cannot feed (Plus: width; base: projection). */
export function checkEncoderFit(adapter: AdapterFile, encoder: EncoderFeatures): void {
  const c = adapter.config;
  const have = c.kind === "plus" ? encoder.hiddenSize : encoder.projectionDim;
  const want = c.kind === "plus" ? c.inputDim : c.embedDim;
  if (have === want) return;
  const what = c.kind === "plus"
    ? `${encoder.hiddenSize}-wide hidden states`
    : have === null
    ? "no image embeds (it has no projection)"
    : `${have}-d image embeds`;
  throw new WeightError(
    `${adapter.path} is ${describeAdapter(c)} but its image encoder ${encoder.path} gives ${what}`,
  );
}

/** h94 `ip-adapter_sd15`: ViT-H/14 image embeds (1024) -> 4 tokens of 768. */
export const SD15_IP_BASE: IpProjectionConfig = {
  kind: "base",
  embedDim: 1024,
  tokens: 4,
  crossDim: 768,
};

/** h94 `ip-adapter-plus_sd15`: ViT-H/14 hidden states (1280) -> 16 tokens of 768. */
export const SD15_IP_PLUS: IpProjectionConfig = {
  kind: "plus",
  inputDim: 1280,
  width: 768,
  heads: 12,
  dimHead: 64,
  queries: 16,
  depth: 4,
  ffMult: 4,
  crossDim: 768,
};

/** Base projection matching the tiny UNet preset (cross_attention_dim 32). */
export const TINY_IP_BASE: IpProjectionConfig = {
  kind: "base",
  embedDim: 16,
  tokens: 4,
  crossDim: 32,
};

/** Plus resampler matching the tiny UNet preset (2 heads of 64, as diffusers splits them). */
export const TINY_IP_PLUS: IpProjectionConfig = {
  kind: "plus",
  inputDim: 48,
  width: 128,
  heads: 2,
  dimHead: 64,
  queries: 6,
  depth: 4,
  ffMult: 4,
  crossDim: 32,
};
