/**
 * CLIP configs as transformers reads them: `CLIPTextConfig`, `CLIPVisionConfig` and the combined
 * `CLIPConfig`. Every value comes from the file; a missing key takes transformers' default (not the
 * value a particular checkpoint happens to use), so a config that omits `hidden_act` is quick_gelu.
 */
import { UserError } from "../../ffi/errors.ts";

export type ClipActivation =
  | "quick_gelu"
  | "gelu"
  | "gelu_new"
  | "gelu_pytorch_tanh"
  | "relu"
  | "silu";

const ACTIVATIONS: readonly ClipActivation[] = [
  "quick_gelu",
  "gelu",
  "gelu_new",
  "gelu_pytorch_tanh",
  "relu",
  "silu",
];

/** What both towers' encoder layers need. */
export interface ClipEncoderConfig {
  hiddenSize: number;
  intermediateSize: number;
  numHiddenLayers: number;
  numAttentionHeads: number;
  hiddenAct: ClipActivation;
  layerNormEps: number;
  /** Read for completeness; the models run attention without dropout. */
  attentionDropout: number;
}

export interface ClipTextConfig extends ClipEncoderConfig {
  vocabSize: number;
  maxPositionEmbeddings: number;
  /** Width of `text_projection` in a standalone `CLIPTextModelWithProjection`. */
  projectionDim: number;
  bosTokenId: number | null;
  /**
   * Picks the pooled (EOS) position. The legacy value 2 means "the largest token id" (the real EOS
   * 49407 is the largest id in CLIP's vocabulary); any other value means "first token equal to it".
   */
  eosTokenId: number;
  padTokenId: number | null;
}

export interface ClipVisionConfig extends ClipEncoderConfig {
  numChannels: number;
  imageSize: number;
  patchSize: number;
  projectionDim: number;
}

export interface ClipModelConfig {
  text: ClipTextConfig;
  vision: ClipVisionConfig;
  /** Width of both projections in a `CLIPModel` (the towers' own `projection_dim` is unused). */
  projectionDim: number;
  logitScaleInitValue: number;
}

/** transformers 5.23 `CLIPTextConfig` defaults (openai/clip-vit-base-patch32). */
export const TEXT_DEFAULTS: Readonly<ClipTextConfig> = {
  vocabSize: 49408,
  hiddenSize: 512,
  intermediateSize: 2048,
  projectionDim: 512,
  numHiddenLayers: 12,
  numAttentionHeads: 8,
  maxPositionEmbeddings: 77,
  hiddenAct: "quick_gelu",
  layerNormEps: 1e-5,
  attentionDropout: 0,
  bosTokenId: 49406,
  eosTokenId: 49407,
  padTokenId: 1,
};

/** transformers 5.23 `CLIPVisionConfig` defaults. */
export const VISION_DEFAULTS: Readonly<ClipVisionConfig> = {
  hiddenSize: 768,
  intermediateSize: 3072,
  projectionDim: 512,
  numHiddenLayers: 12,
  numAttentionHeads: 12,
  numChannels: 3,
  imageSize: 224,
  patchSize: 32,
  hiddenAct: "quick_gelu",
  layerNormEps: 1e-5,
  attentionDropout: 0,
};

export const CLIP_DEFAULTS = { projectionDim: 512, logitScaleInitValue: 2.6592 } as const;

/** A CLIP `config.json` that cannot be read, or a value this port does not implement. */
export class ClipConfigError extends UserError {
  /** `key` null: the file as a whole (missing, not JSON, the wrong kind of model). */
  constructor(file: string, key: string | null, detail: string) {
    super(key === null ? `${file}: ${detail}` : `${file}: "${key}" ${detail}`);
  }
}

type Json = Record<string, unknown>;

/** Reads typed values of one JSON object, naming `file` and the dotted key in every error. */
class Reader {
  constructor(readonly json: Json, readonly file: string, readonly path = "") {}

  key(k: string): string {
    return this.path ? `${this.path}.${k}` : k;
  }

  #raw(k: string): unknown {
    return this.json[k];
  }

  int(k: string, def: number, min = 1): number {
    const v = this.#raw(k);
    if (v === undefined || v === null) return def;
    if (typeof v !== "number" || !Number.isInteger(v) || v < min) {
      throw new ClipConfigError(
        this.file,
        this.key(k),
        `must be an integer >= ${min}, got ${JSON.stringify(v)}`,
      );
    }
    return v;
  }

  num(k: string, def: number): number {
    const v = this.#raw(k);
    if (v === undefined || v === null) return def;
    if (typeof v !== "number" || !Number.isFinite(v)) {
      throw new ClipConfigError(
        this.file,
        this.key(k),
        `must be a number, got ${JSON.stringify(v)}`,
      );
    }
    return v;
  }

  /** A token id: `null` in the file stays null (transformers allows it). */
  tokenId(k: string, def: number | null): number | null {
    const v = this.#raw(k);
    if (v === undefined) return def;
    if (v === null) return null;
    if (typeof v !== "number" || !Number.isInteger(v) || v < 0) {
      throw new ClipConfigError(
        this.file,
        this.key(k),
        `must be a token id (integer >= 0), got ${JSON.stringify(v)}`,
      );
    }
    return v;
  }

  activation(k: string, def: ClipActivation): ClipActivation {
    const v = this.#raw(k);
    if (v === undefined || v === null) return def;
    if (typeof v !== "string" || !(ACTIVATIONS as readonly string[]).includes(v)) {
      throw new ClipConfigError(
        this.file,
        this.key(k),
        `is ${JSON.stringify(v)}, an activation CLIP does not support here ` +
          `(supported: ${ACTIVATIONS.join(", ")})`,
      );
    }
    return v as ClipActivation;
  }

  object(k: string): Reader | null {
    const v = this.#raw(k);
    if (v === undefined || v === null) return null;
    if (typeof v !== "object" || Array.isArray(v)) {
      throw new ClipConfigError(this.file, this.key(k), "must be a JSON object");
    }
    return new Reader(v as Json, this.file, this.key(k));
  }

  string(k: string): string | undefined {
    const v = this.#raw(k);
    return typeof v === "string" ? v : undefined;
  }
}

function checkHeads(r: Reader, hidden: number, heads: number): void {
  if (hidden % heads !== 0) {
    throw new ClipConfigError(
      r.file,
      r.key("num_attention_heads"),
      `(${heads}) must divide hidden_size (${hidden})`,
    );
  }
}

function readEncoder(r: Reader, d: Readonly<ClipEncoderConfig>): ClipEncoderConfig {
  const hiddenSize = r.int("hidden_size", d.hiddenSize);
  const numAttentionHeads = r.int("num_attention_heads", d.numAttentionHeads);
  checkHeads(r, hiddenSize, numAttentionHeads);
  return {
    hiddenSize,
    intermediateSize: r.int("intermediate_size", d.intermediateSize),
    numHiddenLayers: r.int("num_hidden_layers", d.numHiddenLayers, 0),
    numAttentionHeads,
    hiddenAct: r.activation("hidden_act", d.hiddenAct),
    layerNormEps: r.num("layer_norm_eps", d.layerNormEps),
    attentionDropout: r.num("attention_dropout", d.attentionDropout),
  };
}

function readText(r: Reader): ClipTextConfig {
  const eos = r.json["eos_token_id"];
  if (eos === null || Array.isArray(eos)) {
    // transformers would compare the ids with a list or None and pool a meaningless position.
    throw new ClipConfigError(
      r.file,
      r.key("eos_token_id"),
      `must be one integer token id for CLIP pooling, got ${JSON.stringify(eos)}`,
    );
  }
  return {
    ...readEncoder(r, TEXT_DEFAULTS),
    vocabSize: r.int("vocab_size", TEXT_DEFAULTS.vocabSize),
    maxPositionEmbeddings: r.int("max_position_embeddings", TEXT_DEFAULTS.maxPositionEmbeddings),
    projectionDim: r.int("projection_dim", TEXT_DEFAULTS.projectionDim),
    bosTokenId: r.tokenId("bos_token_id", TEXT_DEFAULTS.bosTokenId),
    eosTokenId: r.tokenId("eos_token_id", TEXT_DEFAULTS.eosTokenId)!,
    padTokenId: r.tokenId("pad_token_id", TEXT_DEFAULTS.padTokenId),
  };
}

function readVision(r: Reader): ClipVisionConfig {
  for (const k of ["image_size", "patch_size"]) {
    if (Array.isArray(r.json[k])) {
      throw new ClipConfigError(
        r.file,
        r.key(k),
        "must be one integer (square images and patches)",
      );
    }
  }
  const c: ClipVisionConfig = {
    ...readEncoder(r, VISION_DEFAULTS),
    numChannels: r.int("num_channels", VISION_DEFAULTS.numChannels),
    imageSize: r.int("image_size", VISION_DEFAULTS.imageSize),
    patchSize: r.int("patch_size", VISION_DEFAULTS.patchSize),
    projectionDim: r.int("projection_dim", VISION_DEFAULTS.projectionDim),
  };
  if (c.imageSize % c.patchSize !== 0) {
    throw new ClipConfigError(
      r.file,
      r.key("patch_size"),
      `(${c.patchSize}) must divide image_size (${c.imageSize})`,
    );
  }
  return c;
}

/**
 * A combined config's tower: `text_config_dict` (old openai configs) wins over `text_config`
 * entirely, because transformers rebuilds it with defaults and overwrites every key.
 */
function tower(r: Reader, name: "text" | "vision"): Reader {
  return r.object(`${name}_config_dict`) ?? r.object(`${name}_config`) ??
    new Reader({}, r.file, `${name}_config`);
}

export function parseClipTextConfig(json: Json, file = "config.json"): ClipTextConfig {
  return readText(new Reader(json, file));
}

export function parseClipVisionConfig(json: Json, file = "config.json"): ClipVisionConfig {
  return readVision(new Reader(json, file));
}

export function parseClipModelConfig(json: Json, file = "config.json"): ClipModelConfig {
  const r = new Reader(json, file);
  return {
    text: readText(tower(r, "text")),
    vision: readVision(tower(r, "vision")),
    projectionDim: r.int("projection_dim", CLIP_DEFAULTS.projectionDim),
    logitScaleInitValue: r.num("logit_scale_init_value", CLIP_DEFAULTS.logitScaleInitValue),
  };
}

/** Which checkpoint class a config.json describes, and so which keys its weights file holds. */
export type ClipCheckpoint =
  | { kind: "text"; config: ClipTextConfig; projection: boolean | null }
  | { kind: "vision"; config: ClipVisionConfig; projection: boolean | null }
  | { kind: "clip"; config: ClipModelConfig };

/**
 * Classifies a config.json. `projection` is true / false when `architectures` says whether the
 * tower has its projection (…WithProjection), null when the file does not say.
 */
export function parseClipCheckpointConfig(json: Json, file = "config.json"): ClipCheckpoint {
  const r = new Reader(json, file);
  const modelType = r.string("model_type");
  const arch = Array.isArray(json.architectures) ? String(json.architectures[0]) : undefined;
  const projection = arch === undefined ? null : arch.endsWith("WithProjection");
  if (modelType === "clip" || json.text_config !== undefined || json.vision_config !== undefined) {
    return { kind: "clip", config: parseClipModelConfig(json, file) };
  }
  if (modelType === "clip_text_model" || arch?.startsWith("CLIPText")) {
    return { kind: "text", config: readText(r), projection };
  }
  if (modelType === "clip_vision_model" || arch?.startsWith("CLIPVision")) {
    return { kind: "vision", config: readVision(r), projection };
  }
  throw new ClipConfigError(
    file,
    "model_type",
    `is ${JSON.stringify(modelType)}; expected "clip", "clip_text_model" or "clip_vision_model"`,
  );
}
