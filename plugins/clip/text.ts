/**
 * CLIP text tower (transformers' `CLIPTextModel`, plus `text_projection` for
 * `CLIPTextModelWithProjection` and `CLIPModel`): token + position embeddings, a causal pre-LN
 * encoder, a final LayerNorm, and the hidden state at the EOS token as the pooled output.
 */
import { type Device, ops, scope, type Tensor } from "../../ffi/mod.ts";
import { Embedding, LayerNorm, Linear, Module } from "../../core/nn.ts";
import type { WeightSource } from "../../core/weights.ts";
import type { ClipTextConfig } from "./config.ts";
import { type ClipAttention, ClipEncoder } from "./encoder.ts";

export interface ClipTextOutput {
  /** [B, L, D] after `final_layer_norm`. */
  lastHiddenState: Tensor;
  /** [B, D]: the EOS token's row of `lastHiddenState`. */
  pooled: Tensor;
  /** [B, P]: `text_projection(pooled)`, or null when the model has no projection. */
  textEmbeds: Tensor | null;
}

export interface ClipTextForwardOptions {
  /**
   * [B, L] with 1 for real tokens and 0 for padding, as transformers accepts it. Stable Diffusion
   * passes none (padding then only changes the padded positions' own states: attention is causal).
   */
  attentionMask?: Tensor | null;
}

class ClipTextEmbeddings extends Module {
  readonly tokenEmbedding: Embedding;
  readonly positionEmbedding: Embedding;

  constructor(w: WeightSource, cfg: ClipTextConfig) {
    super();
    const d = cfg.hiddenSize;
    this.tokenEmbedding = this.child(
      "token_embedding",
      new Embedding(w.sub("token_embedding"), cfg.vocabSize, d),
    );
    this.positionEmbedding = this.child(
      "position_embedding",
      new Embedding(w.sub("position_embedding"), cfg.maxPositionEmbeddings, d),
    );
  }

  forward(ids: Tensor): Tensor {
    return scope(() => {
      const pos = ops.narrow(this.positionEmbedding.weight, 0, 0, ids.shape[1]);
      return this.tokenEmbedding.forward(ids).add(pos);
    });
  }
}

/** The body under `text_model.` in the checkpoints. */
export class ClipTextTransformer extends Module {
  readonly embeddings: ClipTextEmbeddings;
  readonly encoder: ClipEncoder;
  readonly finalLayerNorm: LayerNorm;

  constructor(w: WeightSource, readonly config: ClipTextConfig) {
    super();
    this.embeddings = this.child("embeddings", new ClipTextEmbeddings(w.sub("embeddings"), config));
    this.encoder = this.child("encoder", new ClipEncoder(w.sub("encoder"), config));
    this.finalLayerNorm = this.child(
      "final_layer_norm",
      new LayerNorm(w.sub("final_layer_norm"), config.hiddenSize, config.layerNormEps),
    );
  }

  /** Runs `count` encoder layers on token ids; returns the raw (un-normalised) hidden state. */
  hidden(ids: Tensor, count: number, attentionMask?: Tensor | null): Tensor {
    return scope(() => {
      const [b, l] = checkIds(ids, this.config);
      const x = this.embeddings.forward(ids.to(this.embeddings.tokenEmbedding.weight.device));
      const mask = attentionMask ? paddedCausalMask(attentionMask, b, l, x.device) : null;
      // Without padding, SDPA's own causal path is the one transformers takes.
      return this.encoder.forward(x, { mask, causal: mask === null, count });
    });
  }

  forward(
    ids: Tensor,
    opts: ClipTextForwardOptions = {},
  ): { lastHiddenState: Tensor; pooled: Tensor } {
    return scope(() => {
      const h = this.hidden(ids, this.encoder.layers.length, opts.attentionMask);
      const lastHiddenState = this.finalLayerNorm.forward(h);
      return { lastHiddenState, pooled: this.#pool(lastHiddenState, ids) };
    });
  }

  /** The hidden state at transformers' EOS position, one row per sequence. */
  #pool(hidden: Tensor, ids: Tensor): Tensor {
    const [b, l, d] = hidden.shape;
    const onDevice = ids.to(hidden.device);
    const eos = this.config.eosTokenId;
    // eos_token_id 2 marks old configs whose real EOS (49407) is the largest id: take the argmax.
    const pos = eos === 2
      ? ops.argmax(onDevice, -1, false)
      : ops.argmax(ops.eqScalar(onDevice, eos).to("i32"), -1, false);
    const rows = ops.arange(0, b * l, l, "i64", hidden.device).add(pos);
    return ops.indexSelect(hidden.reshape([b * l, d]), 0, rows);
  }
}

function checkIds(ids: Tensor, cfg: ClipTextConfig): [number, number] {
  if (ids.ndim !== 2) {
    throw new RangeError(`CLIP text: token ids must be [batch, length], got [${ids.shape}]`);
  }
  if (ids.dtype !== "i64" && ids.dtype !== "i32") {
    throw new TypeError(`CLIP text: token ids must be an integer tensor, got ${ids.dtype}`);
  }
  const [b, l] = ids.shape;
  if (l > cfg.maxPositionEmbeddings) {
    throw new RangeError(
      `CLIP text: ${l} tokens exceed max_position_embeddings (${cfg.maxPositionEmbeddings})`,
    );
  }
  return [b, l];
}

/**
 * Causal mask combined with key padding, [B, 1, L, L] boolean, or null when nothing is padded (then
 * SDPA's own causal path runs, as in transformers). Like transformers 5, a query row with nothing
 * to attend to (left padding) is handed to SDPA as it is.
 */
function paddedCausalMask(
  attentionMask: Tensor,
  b: number,
  l: number,
  device: Device,
): Tensor | null {
  return scope(() => {
    if (
      attentionMask.shape.length !== 2 || attentionMask.shape[0] !== b ||
      attentionMask.shape[1] !== l
    ) {
      throw new RangeError(
        `CLIP text: attention mask must be [${b}, ${l}], got [${attentionMask.shape}]`,
      );
    }
    const keys = ops.gtScalar(attentionMask.to(device), 0);
    if (ops.all(keys).item()) return null;
    const causal = ops.tril(ops.ones([l, l], "bool", device), 0);
    return ops.logicalAnd(causal, keys.reshape([b, 1, 1, l]));
  });
}

/** `CLIPTextModel` / `CLIPTextModelWithProjection`: the tower plus an optional projection. */
export class ClipTextModel extends Module {
  readonly textModel: ClipTextTransformer;
  readonly textProjection: Linear | null;

  /**
   * `body` holds the tower's keys (`embeddings.*`, `encoder.*`, `final_layer_norm.*`);
   * `projection` holds `weight` of the projection, or is null for a tower without one.
   */
  constructor(
    body: WeightSource,
    readonly config: ClipTextConfig,
    projection: { source: WeightSource; dim: number } | null,
  ) {
    super();
    this.textModel = this.child("text_model", new ClipTextTransformer(body, config));
    this.textProjection = projection
      ? this.child(
        "text_projection",
        new Linear(projection.source, config.hiddenSize, projection.dim, false),
      )
      : null;
  }

  forward(ids: Tensor, opts: ClipTextForwardOptions = {}): ClipTextOutput {
    return scope(() => {
      const { lastHiddenState, pooled } = this.textModel.forward(ids, opts);
      const textEmbeds = this.textProjection ? this.textProjection.forward(pooled) : null;
      return { lastHiddenState, pooled, textEmbeds };
    });
  }

  /**
   * transformers' `hidden_states[index]` (negative counts from the end): the output of that many
   * encoder layers, without `final_layer_norm`. Only the layers needed are run.
   */
  hiddenState(ids: Tensor, index: number, opts: ClipTextForwardOptions = {}): Tensor {
    return this.textModel.hidden(ids, this.textModel.encoder.layerCount(index), opts.attentionMask);
  }

  /** Every attention block with its state-dict path, for LoRA (`….self_attn.q_proj`). */
  namedAttentions(prefix = ""): [string, ClipAttention][] {
    return this.textModel.encoder.layers.map((layer, i) => [
      `${prefix}text_model.encoder.layers.${i}.self_attn`,
      layer.selfAttn,
    ]);
  }
}
