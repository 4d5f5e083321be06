/**
 * CLIP configs as transformers reads them: `CLIPTextConfig`, `CLIPVisionConfig` and the combined
 * `CLIPConfig`. Every value comes from the file; a missing key takes transformers' default (not the
 * value a particular checkpoint happens to use), so a config that omits `hidden_act` is quick_gelu.
 */
import {
  type CamelFields,
  ConfigFileError,
  ConfigReader,
  type Json,
  positive,
} from "../../core/json_config.ts";
import * as s from "../../core/schema.ts";

const ACTIVATIONS = [
  "quick_gelu",
  "gelu",
  "gelu_new",
  "gelu_pytorch_tanh",
  "relu",
  "silu",
] as const;
export type ClipActivation = (typeof ACTIVATIONS)[number];

/** What both towers' encoder layers need, with the tower's transformers defaults. */
function encoderFields(hidden: number, intermediate: number, heads: number) {
  return {
    hidden_size: positive(hidden),
    intermediate_size: positive(intermediate),
    num_hidden_layers: s.integer({ min: 0, default: 12 }),
    num_attention_heads: positive(heads),
    hidden_act: s.choice(ACTIVATIONS, "quick_gelu"),
    layer_norm_eps: s.number({ default: 1e-5 }),
    /** Read for completeness; the models run attention without dropout. */
    attention_dropout: s.number({ default: 0 }),
  };
}

const tokenId = (def: number | null) => s.nullable(s.integer({ min: 0 }), { default: def });

/** transformers 5.23 `CLIPTextConfig` keys and defaults (openai/clip-vit-base-patch32). */
const TEXT_FIELDS = {
  ...encoderFields(512, 2048, 8),
  vocab_size: positive(49408),
  max_position_embeddings: positive(77),
  /** Width of `text_projection` in a standalone `CLIPTextModelWithProjection`. */
  projection_dim: positive(512),
  bos_token_id: tokenId(49406),
  /**
   * Picks the pooled (EOS) position. The legacy value 2 means "the largest token id" (the real EOS
   * 49407 is the largest id in CLIP's vocabulary); any other value means "first token equal to it".
   */
  eos_token_id: s.integer({ min: 0, default: 49407 }),
  pad_token_id: tokenId(1),
};

/** One side of a square (the port has no rectangular images or patches). */
const square = (def: number) =>
  s.oneOf([positive()], {
    expected: "one positive integer (square images and patches)",
    default: def,
  });

/** transformers 5.23 `CLIPVisionConfig` keys and defaults. */
const VISION_FIELDS = {
  ...encoderFields(768, 3072, 12),
  num_channels: positive(3),
  image_size: square(224),
  patch_size: square(32),
  projection_dim: positive(512),
};

export type ClipEncoderConfig = CamelFields<ReturnType<typeof encoderFields>>;
export type ClipTextConfig = CamelFields<typeof TEXT_FIELDS>;
export type ClipVisionConfig = CamelFields<typeof VISION_FIELDS>;

export interface ClipModelConfig {
  text: ClipTextConfig;
  vision: ClipVisionConfig;
  /** Width of both projections in a `CLIPModel` (the towers' own `projection_dim` is unused). */
  projectionDim: number;
  logitScaleInitValue: number;
}

export const CLIP_DEFAULTS = { projectionDim: 512, logitScaleInitValue: 2.6592 } as const;

/** A CLIP `config.json` that cannot be read, or a value this port does not implement. */
export class ClipConfigError extends ConfigFileError {}

function checkHeads(r: ConfigReader, c: ClipEncoderConfig): void {
  if (c.hiddenSize % c.numAttentionHeads !== 0) {
    r.fail(
      "num_attention_heads",
      `(${c.numAttentionHeads}) must divide hidden_size (${c.hiddenSize})`,
    );
  }
}

function readText(r: ConfigReader): ClipTextConfig {
  const eos = r.json.eos_token_id;
  if (eos === null || Array.isArray(eos)) {
    // transformers would compare the ids with a list or None and pool a meaningless position.
    r.fail(
      "eos_token_id",
      `must be one integer token id for CLIP pooling, got ${JSON.stringify(eos)}`,
    );
  }
  const c = r.fields(TEXT_FIELDS);
  checkHeads(r, c);
  return c;
}

function readVision(r: ConfigReader): ClipVisionConfig {
  const c = r.fields(VISION_FIELDS);
  checkHeads(r, c);
  if (c.imageSize % c.patchSize !== 0) {
    r.fail("patch_size", `(${c.patchSize}) must divide image_size (${c.imageSize})`);
  }
  return c;
}

/**
 * A combined config's tower: `text_config_dict` (old openai configs) wins over `text_config`
 * entirely, because transformers rebuilds it with defaults and overwrites every key.
 */
function tower(r: ConfigReader, name: "text" | "vision"): ConfigReader {
  return r.sub(`${name}_config_dict`) ?? r.sub(`${name}_config`) ??
    new ConfigReader(r.file, {}, ClipConfigError, `${name}_config`);
}

const reader = (json: Json, file: string) => new ConfigReader(file, json, ClipConfigError);

export function parseClipTextConfig(json: Json, file = "config.json"): ClipTextConfig {
  return readText(reader(json, file));
}

export function parseClipVisionConfig(json: Json, file = "config.json"): ClipVisionConfig {
  return readVision(reader(json, file));
}

export function parseClipModelConfig(json: Json, file = "config.json"): ClipModelConfig {
  const r = reader(json, file);
  return {
    text: readText(tower(r, "text")),
    vision: readVision(tower(r, "vision")),
    projectionDim: r.get("projection_dim", positive(CLIP_DEFAULTS.projectionDim)),
    logitScaleInitValue: r.get(
      "logit_scale_init_value",
      s.number({ default: CLIP_DEFAULTS.logitScaleInitValue }),
    ),
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
  const modelType = typeof json.model_type === "string" ? json.model_type : undefined;
  const arch = Array.isArray(json.architectures) ? String(json.architectures[0]) : undefined;
  const projection = arch === undefined ? null : arch.endsWith("WithProjection");
  if (modelType === "clip" || json.text_config !== undefined || json.vision_config !== undefined) {
    return { kind: "clip", config: parseClipModelConfig(json, file) };
  }
  if (modelType === "clip_text_model" || arch?.startsWith("CLIPText")) {
    return { kind: "text", config: parseClipTextConfig(json, file), projection };
  }
  if (modelType === "clip_vision_model" || arch?.startsWith("CLIPVision")) {
    return { kind: "vision", config: parseClipVisionConfig(json, file), projection };
  }
  throw new ClipConfigError(
    file,
    "model_type",
    `is ${JSON.stringify(modelType)}; expected "clip", "clip_text_model" or "clip_vision_model"`,
  );
}
