/**
 * CLIP vision tower (transformers' `CLIPVisionModel`, plus `visual_projection` for
 * `CLIPVisionModelWithProjection` and `CLIPModel`): bias-free patch convolution, a class token,
 * learned positions, `pre_layrnorm` (sic, the checkpoint spelling), the encoder, and
 * `post_layernorm` on the class token only.
 */
import { ops, scope, type Tensor } from "../../ffi/mod.ts";
import { Conv2d, Embedding, LayerNorm, Linear, Module } from "../../core/nn.ts";
import type { WeightSource } from "../../core/weights.ts";
import type { ClipVisionConfig } from "./config.ts";
import { type ClipAttention, ClipEncoder } from "./encoder.ts";

export interface ClipVisionOutput {
  /** [B, 1 + patches, D], the last layer's output (no LayerNorm). */
  lastHiddenState: Tensor;
  /** [B, D]: `post_layernorm` of the class token. */
  pooled: Tensor;
  /** [B, P]: `visual_projection(pooled)`, or null when the model has no projection. */
  imageEmbeds: Tensor | null;
  /** transformers' `hidden_states[-2]`: the input of the last layer (IP-Adapter Plus uses it). */
  penultimateHiddenState: Tensor;
}

class ClipVisionEmbeddings extends Module {
  readonly classEmbedding: Tensor;
  readonly patchEmbedding: Conv2d;
  readonly positionEmbedding: Embedding;

  constructor(w: WeightSource, readonly config: ClipVisionConfig) {
    super();
    const d = config.hiddenSize, p = config.patchSize;
    const positions = (config.imageSize / p) ** 2 + 1;
    this.classEmbedding = this.param(w, "class_embedding", [d]);
    this.patchEmbedding = this.child(
      "patch_embedding",
      new Conv2d(w.sub("patch_embedding"), config.numChannels, d, p, { stride: p, bias: false }),
    );
    this.positionEmbedding = this.child(
      "position_embedding",
      new Embedding(w.sub("position_embedding"), positions, d),
    );
  }

  forward(pixels: Tensor): Tensor {
    return scope(() => {
      const { numChannels: c, imageSize: s, hiddenSize: d } = this.config;
      const [b, pc, h, w] = pixels.shape;
      if (pixels.ndim !== 4 || pc !== c || h !== s || w !== s) {
        throw new RangeError(
          `CLIP vision: pixels must be [batch, ${c}, ${s}, ${s}], got [${pixels.shape}]`,
        );
      }
      const weight = this.patchEmbedding.weight;
      const x = pixels.to({ dtype: weight.dtype, device: weight.device });
      const patches = this.patchEmbedding.forward(x).flatten(2).transpose(1, 2);
      const cls = ops.expand(this.classEmbedding.reshape([1, 1, d]), [b, 1, d]);
      return ops.cat([cls, patches], 1).add(this.positionEmbedding.weight);
    });
  }
}

/** The body under `vision_model.` in the checkpoints. */
export class ClipVisionTransformer extends Module {
  readonly embeddings: ClipVisionEmbeddings;
  readonly preLayrnorm: LayerNorm;
  readonly encoder: ClipEncoder;
  readonly postLayernorm: LayerNorm;

  constructor(w: WeightSource, readonly config: ClipVisionConfig) {
    super();
    const d = config.hiddenSize, eps = config.layerNormEps;
    this.embeddings = this.child(
      "embeddings",
      new ClipVisionEmbeddings(w.sub("embeddings"), config),
    );
    this.preLayrnorm = this.child("pre_layrnorm", new LayerNorm(w.sub("pre_layrnorm"), d, eps));
    this.encoder = this.child("encoder", new ClipEncoder(w.sub("encoder"), config));
    this.postLayernorm = this.child(
      "post_layernorm",
      new LayerNorm(w.sub("post_layernorm"), d, eps),
    );
  }

  /** Embeddings and `pre_layrnorm`: transformers' `hidden_states[0]`. */
  embed(pixels: Tensor): Tensor {
    return scope(() => this.preLayrnorm.forward(this.embeddings.forward(pixels)));
  }

  forward(pixels: Tensor): Omit<ClipVisionOutput, "imageEmbeds"> {
    return scope(() => {
      const enc = this.encoder;
      const n = enc.layers.length;
      const x = this.embed(pixels);
      const penultimateHiddenState = n === 0 ? x : enc.forward(x, { count: n - 1 });
      const lastHiddenState = n === 0
        ? x
        : enc.layers[n - 1].forward(penultimateHiddenState, null, false);
      const pooled = this.postLayernorm.forward(ops.select(lastHiddenState, 1, 0));
      return { lastHiddenState, pooled, penultimateHiddenState };
    });
  }
}

/** `CLIPVisionModel` / `CLIPVisionModelWithProjection`: the tower plus an optional projection. */
export class ClipVisionModel extends Module {
  readonly visionModel: ClipVisionTransformer;
  readonly visualProjection: Linear | null;

  /**
   * `body` holds the tower's keys (`embeddings.*`, `pre_layrnorm.*`, …); `projection` holds
   * `weight` of the projection, or is null for a tower without one.
   */
  constructor(
    body: WeightSource,
    readonly config: ClipVisionConfig,
    projection: { source: WeightSource; dim: number } | null,
  ) {
    super();
    this.visionModel = this.child("vision_model", new ClipVisionTransformer(body, config));
    this.visualProjection = projection
      ? this.child(
        "visual_projection",
        new Linear(projection.source, config.hiddenSize, projection.dim, false),
      )
      : null;
  }

  /** pixels: [B, C, S, S], already resized and normalised. */
  forward(pixels: Tensor): ClipVisionOutput {
    return scope(() => {
      const out = this.visionModel.forward(pixels);
      const imageEmbeds = this.visualProjection ? this.visualProjection.forward(out.pooled) : null;
      return { ...out, imageEmbeds };
    });
  }

  /**
   * transformers' `hidden_states[index]` (negative counts from the end), running only the layers
   * it needs: `hiddenState(px, -2)` is IP-Adapter Plus's input without the last layer's cost.
   */
  hiddenState(pixels: Tensor, index: number): Tensor {
    const vm = this.visionModel;
    const count = vm.encoder.layerCount(index);
    return scope(() => vm.encoder.forward(vm.embed(pixels), { count }));
  }

  /** Every attention block with its state-dict path, for LoRA (`….self_attn.q_proj`). */
  namedAttentions(prefix = ""): [string, ClipAttention][] {
    return this.visionModel.encoder.layers.map((layer, i) => [
      `${prefix}vision_model.encoder.layers.${i}.self_attn`,
      layer.selfAttn,
    ]);
  }
}
