/**
 * IP-Adapter image projections (keys under `image_proj.` in h94's flat safetensors files):
 * - base `ImageProjModel`: CLIP image embeds [B, E] -> Linear -> T tokens -> LayerNorm;
 * - Plus `Resampler`: CLIP penultimate hidden states [B, N, W] -> perceiver over learned latents.
 * Dims come from the weight shapes, so one code path serves SD1.5 checkpoints and tiny presets.
 */
import { LayerNorm, Linear, Module } from "../../core/nn.ts";
import { WeightError, type WeightSource } from "../../core/weights.ts";
import { ops, type SafetensorsFile, type Tensor } from "../../ffi/mod.ts";

export interface BaseProjectionConfig {
  kind: "base";
  /** CLIP image-embedding width (1024 for ViT-H/14). */
  embedDim: number;
  /** Image tokens per image (4). */
  tokens: number;
  /** UNet cross-attention width (768). */
  crossDim: number;
}

export interface PlusProjectionConfig {
  kind: "plus";
  /** CLIP hidden width of the input states (1280 for ViT-H/14). */
  inputDim: number;
  /** Width of the latents inside the resampler (768). */
  width: number;
  heads: number;
  dimHead: number;
  /** Learned latent queries = image tokens per image (16). */
  queries: number;
  depth: number;
  ffMult: number;
  crossDim: number;
}

export type IpProjectionConfig = BaseProjectionConfig | PlusProjectionConfig;

/** The Plus checkpoints (and diffusers) use 64-wide heads; the head count follows from to_q. */
export const PLUS_DIM_HEAD = 64;

/**
 * Reads the projection's kind and dims from the shapes in an h94-layout file (keys under
 * `prefix`). `dimHead` splits the Plus attention width into heads.
 */
export function inferProjectionConfig(
  file: SafetensorsFile,
  prefix = "image_proj.",
  dimHead = PLUS_DIM_HEAD,
): IpProjectionConfig {
  const shape = (k: string) => {
    if (!file.has(prefix + k)) {
      throw new WeightError(`${file.path}: missing key "${prefix}${k}" for the image projection`);
    }
    return file.info(prefix + k).shape;
  };
  if (file.has(prefix + "latents")) {
    const [, queries, width] = shape("latents");
    let depth = 0;
    while (file.has(`${prefix}layers.${depth}.0.to_q.weight`)) depth++;
    if (depth === 0) {
      throw new WeightError(`${file.path}: Resampler without "${prefix}layers.0.0.to_q.weight"`);
    }
    const inner = shape("layers.0.0.to_q.weight")[0];
    if (inner % dimHead !== 0) {
      throw new WeightError(
        `${file.path}: "${prefix}layers.0.0.to_q.weight" has ${inner} outputs, not a multiple of ` +
          `the head width ${dimHead}`,
      );
    }
    return {
      kind: "plus",
      inputDim: shape("proj_in.weight")[1],
      width,
      heads: inner / dimHead,
      dimHead,
      queries,
      depth,
      ffMult: shape("layers.0.1.1.weight")[0] / width,
      crossDim: shape("proj_out.weight")[0],
    };
  }
  if (file.has(prefix + "proj.weight") && file.has(prefix + "norm.weight")) {
    const [rows, embedDim] = shape("proj.weight");
    const crossDim = shape("norm.weight")[0];
    if (rows % crossDim !== 0) {
      throw new WeightError(
        `${file.path}: "${prefix}proj.weight" [${rows}, ${embedDim}] does not split into ` +
          `${crossDim}-wide tokens`,
      );
    }
    return { kind: "base", embedDim, tokens: rows / crossDim, crossDim };
  }
  throw new WeightError(
    `${file.path}: unsupported image projection (expected "${prefix}proj.weight" for IP-Adapter ` +
      `or "${prefix}latents" for IP-Adapter Plus; Full-face and FaceID variants are not supported)`,
  );
}

/** IP-Adapter's `ImageProjModel`. */
export class ImageProjModel extends Module {
  readonly proj: Linear;
  readonly norm: LayerNorm;

  constructor(w: WeightSource, readonly config: BaseProjectionConfig) {
    super();
    const c = config;
    this.proj = this.child("proj", new Linear(w.sub("proj"), c.embedDim, c.tokens * c.crossDim));
    this.norm = this.child("norm", new LayerNorm(w.sub("norm"), c.crossDim));
  }

  /** [B, E] image embeds -> [B, tokens, cross_dim]. */
  forward(embeds: Tensor): Tensor {
    const b = embeds.size(0);
    return this.norm.forward(ops.reshape(this.proj.forward(embeds), [b, this.config.tokens, -1]));
  }
}

/** Perceiver cross attention of the latents over [image states, latents]. */
export class PerceiverAttention extends Module {
  readonly norm1: LayerNorm;
  readonly norm2: LayerNorm;
  readonly to_q: Linear;
  readonly to_kv: Linear;
  readonly to_out: Linear;

  constructor(w: WeightSource, width: number, readonly heads: number, readonly dimHead: number) {
    super();
    const inner = heads * dimHead;
    this.norm1 = this.child("norm1", new LayerNorm(w.sub("norm1"), width));
    this.norm2 = this.child("norm2", new LayerNorm(w.sub("norm2"), width));
    this.to_q = this.child("to_q", new Linear(w.sub("to_q"), width, inner, false));
    this.to_kv = this.child("to_kv", new Linear(w.sub("to_kv"), width, inner * 2, false));
    this.to_out = this.child("to_out", new Linear(w.sub("to_out"), inner, width, false));
  }

  #split(x: Tensor): Tensor {
    return ops.transpose(ops.reshape(x, [x.size(0), -1, this.heads, this.dimHead]), 1, 2);
  }

  /** Returns the attention output (the caller adds the residual). */
  forward(x: Tensor, latents: Tensor): Tensor {
    const xs = this.norm1.forward(x);
    const lat = this.norm2.forward(latents);
    const kvIn = ops.cat([xs, lat], -2);
    // k and v as two products with the halves of to_kv (the split diffusers loads them with)
    const [wk, wv] = ops.chunk(this.to_kv.weight, 2, 0);
    const q = this.#split(this.to_q.forward(lat));
    const k = this.#split(ops.linear(kvIn, wk, null));
    const v = this.#split(ops.linear(kvIn, wv, null));
    // softmax((q d^-1/4)(k d^-1/4)^T) v is SDPA's default 1/sqrt(d) scaling
    const o = ops.sdpa(q, k, v, null, 0, false, null);
    const merged = ops.reshape(ops.transpose(o, 1, 2), [
      latents.size(0),
      -1,
      this.heads * this.dimHead,
    ]);
    return this.to_out.forward(merged);
  }
}

/** The resampler's feed-forward: LayerNorm (0), Linear (1), GELU (2), Linear (3), no biases. */
export class ResamplerFeedForward extends Module {
  readonly norm: LayerNorm;
  readonly fc1: Linear;
  readonly fc2: Linear;

  constructor(w: WeightSource, width: number, mult: number) {
    super();
    this.norm = this.child("0", new LayerNorm(w.sub("0"), width));
    this.fc1 = this.child("1", new Linear(w.sub("1"), width, width * mult, false));
    this.fc2 = this.child("3", new Linear(w.sub("3"), width * mult, width, false));
  }

  forward(x: Tensor): Tensor {
    return this.fc2.forward(ops.gelu(this.fc1.forward(this.norm.forward(x)), false));
  }
}

/** IP-Adapter Plus `Resampler`. */
export class Resampler extends Module {
  readonly latents: Tensor;
  readonly proj_in: Linear;
  readonly attns: PerceiverAttention[] = [];
  readonly ffs: ResamplerFeedForward[] = [];
  readonly proj_out: Linear;
  readonly norm_out: LayerNorm;

  constructor(w: WeightSource, readonly config: PlusProjectionConfig) {
    super();
    const c = config;
    this.latents = this.param(w, "latents", [1, c.queries, c.width]);
    this.proj_in = this.child("proj_in", new Linear(w.sub("proj_in"), c.inputDim, c.width));
    for (let l = 0; l < c.depth; l++) {
      const a = `layers.${l}.0`, f = `layers.${l}.1`;
      this.attns.push(
        this.child(a, new PerceiverAttention(w.sub(a), c.width, c.heads, c.dimHead)),
      );
      this.ffs.push(this.child(f, new ResamplerFeedForward(w.sub(f), c.width, c.ffMult)));
    }
    this.proj_out = this.child("proj_out", new Linear(w.sub("proj_out"), c.width, c.crossDim));
    this.norm_out = this.child("norm_out", new LayerNorm(w.sub("norm_out"), c.crossDim));
  }

  /** [B, N, inputDim] CLIP hidden states -> [B, queries, cross_dim]. */
  forward(states: Tensor): Tensor {
    const x = this.proj_in.forward(states);
    let lat = ops.repeat(this.latents, [states.size(0), 1, 1]);
    for (let l = 0; l < this.attns.length; l++) {
      lat = this.attns[l].forward(x, lat).add(lat);
      lat = this.ffs[l].forward(lat).add(lat);
    }
    return this.norm_out.forward(this.proj_out.forward(lat));
  }
}

export type ImageProjection = ImageProjModel | Resampler;

export function buildProjection(w: WeightSource, config: IpProjectionConfig): ImageProjection {
  return config.kind === "base" ? new ImageProjModel(w, config) : new Resampler(w, config);
}
