/**
 * `UNet2DConditionModel` config as diffusers 0.42 reads it from `unet/config.json`. A missing key
 * takes diffusers' default; a value that changes the architecture in a way this port does not
 * implement is an error naming the file and the key (never a silently different network).
 */
import {
  ConfigFileError,
  ConfigReader,
  type Json,
  positive,
  readModelConfig,
} from "../../core/json_config.ts";
import * as s from "../../core/schema.ts";

const DOWN_TYPES = ["CrossAttnDownBlock2D", "DownBlock2D"] as const;
const UP_TYPES = ["UpBlock2D", "CrossAttnUpBlock2D"] as const;
export type DownBlockType = (typeof DOWN_TYPES)[number];
export type UpBlockType = (typeof UP_TYPES)[number];
export type MidBlockType = "UNetMidBlock2DCrossAttn";
export type UNetActivation = "silu" | "gelu" | "relu";

export interface UNetConfig {
  sampleSize: number | [number, number] | null;
  inChannels: number;
  outChannels: number;
  centerInputSample: boolean;
  flipSinToCos: boolean;
  freqShift: number;
  downBlockTypes: DownBlockType[];
  /** null: no mid block (diffusers allows it). */
  midBlockType: MidBlockType | null;
  upBlockTypes: UpBlockType[];
  /** Per down block; up blocks use it reversed (as diffusers does). */
  onlyCrossAttention: boolean[];
  blockOutChannels: number[];
  /** Per down block; up block i has `layersPerBlock[reversed i] + 1` layers. */
  layersPerBlock: number[];
  downsamplePadding: number;
  midBlockScaleFactor: number;
  /** Read for completeness; inference runs without dropout. */
  dropout: number;
  actFn: UNetActivation;
  normNumGroups: number;
  normEps: number;
  /** Per down block (reversed for up blocks, last for the mid block). */
  crossAttentionDim: number[];
  /** Transformer depth for each attention of each down block. */
  downTransformerLayers: number[][];
  /** Transformer depth for each attention of each up block. */
  upTransformerLayers: number[][];
  /** Transformer depth of the mid block's attention. */
  midTransformerLayers: number;
  /**
   * Attention HEAD COUNT per down block. SD1.5's `attention_head_dim: 8` is really the head count
   * (a historical misnomer diffusers keeps); `num_attention_heads` wins when a config sets it.
   */
  numAttentionHeads: number[];
  useLinearProjection: boolean;
  /** Read for completeness: diffusers' SDPA attention path ignores it too. */
  upcastAttention: boolean;
  resnetTimeScaleShift: "default";
  timeEmbedDim: number;
  convInKernel: number;
  convOutKernel: number;
}

/** A `unet/config.json` that cannot be read, or that asks for an architecture not ported. */
export class UNetConfigError extends ConfigFileError {}

const ACTIVATIONS: Record<string, UNetActivation> = {
  silu: "silu",
  swish: "silu",
  gelu: "gelu",
  relu: "relu",
};

/** A value for every block (or layer), or a list of `n` of them: either way, a list of `n`. */
function spread<T>(
  r: ConfigReader,
  key: string,
  v: unknown,
  n: number,
  item: s.Schema<T> = positive() as s.Schema<T>,
  what = "a positive integer",
): T[] {
  const list = s.array(item, { minItems: n, maxItems: n });
  const got = r.check(
    key,
    v,
    s.oneOf<T | T[]>([item, list], { expected: `${what} or a list of ${n} of them` }),
  );
  return Array.isArray(got) ? got : Array(n).fill(got);
}

/** Parses a diffusers `unet/config.json` object; `file` names it in errors. */
export function parseUNetConfig(json: Json, file = "unet/config.json"): UNetConfig {
  const r = new ConfigReader(file, json, UNetConfigError);
  const int = (key: string, def: number) => r.get(key, s.integer({ default: def }));
  const num = (key: string, def: number) => r.get(key, s.number({ default: def }));
  const bool = (key: string, def: boolean) => r.get(key, s.boolean({ default: def }));
  /** Must hold the one value this port implements (null and missing count as that value). */
  const only = (key: string, value: string | boolean | null, why = "") =>
    r.get(key, s.literal(value, { default: value }), why);

  const down = r.get(
    "down_block_types",
    s.array<DownBlockType>(s.choice(DOWN_TYPES), {
      minItems: 1,
      default: [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
      ],
    }),
  );
  const n = down.length;
  const up = r.get(
    "up_block_types",
    s.array<UpBlockType>(s.choice(UP_TYPES), {
      default: ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    }),
  );
  if (up.length !== n) {
    r.fail("up_block_types", `must list as many blocks as down_block_types (${n})`);
  }
  const midBlockType = r.get(
    "mid_block_type",
    s.oneOf<MidBlockType | null>([s.literal("UNetMidBlock2DCrossAttn"), s.literal(null)], {
      expected: '"UNetMidBlock2DCrossAttn" or null (the only ones supported)',
      default: "UNetMidBlock2DCrossAttn",
    }),
  );
  const blockOut = r.check(
    "block_out_channels",
    json.block_out_channels ?? [320, 640, 1280, 1280],
    s.array(positive(), { minItems: n, maxItems: n }),
  );
  const perBlock = (key: string, def: number) => spread<number>(r, key, json[key] ?? def, n);
  const layersPerBlock = perBlock("layers_per_block", 2);
  const headDim = perBlock("attention_head_dim", 8);
  const onlyCross = json.only_cross_attention ?? false;
  const onlyCrossAttention = spread(
    r,
    "only_cross_attention",
    onlyCross,
    n,
    s.boolean(),
    "a boolean",
  );

  const tlKey = "transformer_layers_per_block";
  const tlRaw = json[tlKey] ?? 1;
  const tlList: unknown[] = Array.isArray(tlRaw) ? tlRaw : Array(n).fill(tlRaw);
  if (tlList.length !== n) r.fail(tlKey, `must list ${n} entries`);
  const depths = (key: string, v: unknown, layers: number) => spread<number>(r, key, v, layers);
  const downTransformerLayers = tlList.map((v, i) => depths(tlKey, v, layersPerBlock[i]));
  const reverseKey = "reverse_transformer_layers_per_block";
  let upTransformerLayers: number[][];
  if (json[reverseKey] === undefined || json[reverseKey] === null) {
    // diffusers hands each up block the reversed down entry, spread over its layers + 1
    upTransformerLayers = [...tlList].reverse().map((v, i) => {
      if (Array.isArray(v)) r.fail(tlKey, `nested lists need ${reverseKey} as well`);
      return depths(tlKey, v, layersPerBlock[n - 1 - i] + 1);
    });
  } else {
    const reverse = r.get(reverseKey, s.array(s.jsonValue(), { minItems: n, maxItems: n }));
    upTransformerLayers = reverse.map((v, i) =>
      depths(reverseKey, v, layersPerBlock[n - 1 - i] + 1)
    );
  }
  const lastTl = tlList[n - 1];
  if (typeof lastTl !== "number") {
    r.fail(tlKey, "the mid block needs a single depth as the last entry");
  }

  if (json.norm_num_groups === null) {
    r.fail("norm_num_groups", "is null; only GroupNorm UNets are supported");
  }

  only("resnet_time_scale_shift", "default", "scale_shift time conditioning is not implemented");
  only("time_embedding_type", "positional");
  only("class_embed_type", null);
  only("num_class_embeds", null);
  only("addition_embed_type", null);
  only("encoder_hid_dim_type", null, "IP-Adapters are attached separately, not saved in the UNet");
  only("encoder_hid_dim", null);
  only("time_cond_proj_dim", null);
  only("timestep_post_act", null);
  only("time_embedding_act_fn", null);
  only("attention_type", "default");
  only("cross_attention_norm", null);
  only("dual_cross_attention", false);
  only("class_embeddings_concat", false);
  // mid_block_only_cross_attention, resnet_skip_time_act and resnet_out_scale_factor only reach
  // block types this port rejects above, so any value builds the same network.

  const convInKernel = int("conv_in_kernel", 3);
  const convOutKernel = int("conv_out_kernel", 3);
  if (convInKernel % 2 === 0) r.fail("conv_in_kernel", "must be odd");
  if (convOutKernel % 2 === 0) r.fail("conv_out_kernel", "must be odd");

  const normNumGroups = int("norm_num_groups", 32);
  for (const c of blockOut) {
    if (c % normNumGroups !== 0) {
      r.fail("norm_num_groups", `(${normNumGroups}) must divide every block_out_channels entry`);
    }
  }

  const sizes = s.array(s.number(), { minItems: 2, maxItems: 2 }) as s.Schema<[number, number]>;
  return {
    sampleSize: r.get(
      "sample_size",
      s.nullable(
        s.oneOf<number | [number, number]>([s.number(), sizes], {
          expected: "an integer or [h, w]",
        }),
        { default: null },
      ),
    ),
    inChannels: int("in_channels", 4),
    outChannels: int("out_channels", 4),
    centerInputSample: bool("center_input_sample", false),
    flipSinToCos: bool("flip_sin_to_cos", true),
    freqShift: num("freq_shift", 0),
    downBlockTypes: down,
    midBlockType,
    upBlockTypes: up,
    onlyCrossAttention,
    blockOutChannels: blockOut,
    layersPerBlock,
    downsamplePadding: int("downsample_padding", 1),
    midBlockScaleFactor: num("mid_block_scale_factor", 1),
    dropout: num("dropout", 0),
    actFn: ACTIVATIONS[r.get("act_fn", s.choice(Object.keys(ACTIVATIONS), "silu"))],
    normNumGroups,
    normEps: num("norm_eps", 1e-5),
    crossAttentionDim: perBlock("cross_attention_dim", 1280),
    downTransformerLayers,
    upTransformerLayers,
    midTransformerLayers: lastTl as number,
    numAttentionHeads: json.num_attention_heads == null
      ? headDim
      : spread<number>(r, "num_attention_heads", json.num_attention_heads, n),
    useLinearProjection: bool("use_linear_projection", false),
    upcastAttention: bool("upcast_attention", false),
    resnetTimeScaleShift: "default",
    timeEmbedDim: int("time_embedding_dim", blockOut[0] * 4),
    convInKernel,
    convOutKernel,
  };
}

/** Reads and parses `<dir>/config.json`. */
export function loadUNetConfig(dir: string): UNetConfig {
  const file = `${dir}/config.json`;
  const json = readModelConfig(file, UNetConfigError, "UNet config", {
    notFound: "not found (a diffusers unet/ folder holds config.json and the weights)",
  });
  return parseUNetConfig(json, file);
}

/** The SD1.5 UNet as its `config.json` states it (useful to build random-weight stand-ins). */
export const SD15_UNET_CONFIG_JSON: Readonly<Json> = {
  _class_name: "UNet2DConditionModel",
  act_fn: "silu",
  attention_head_dim: 8,
  block_out_channels: [320, 640, 1280, 1280],
  center_input_sample: false,
  cross_attention_dim: 768,
  down_block_types: [
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "DownBlock2D",
  ],
  downsample_padding: 1,
  flip_sin_to_cos: true,
  freq_shift: 0,
  in_channels: 4,
  layers_per_block: 2,
  mid_block_scale_factor: 1,
  norm_eps: 1e-5,
  norm_num_groups: 32,
  out_channels: 4,
  sample_size: 64,
  up_block_types: ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
};

/**
 * A tiny UNet with every block kind SD1.5 uses (cross-attention down, plain down, mid, plain up,
 * cross-attention up), for tests and random-weight presets.
 */
export const TINY_UNET_CONFIG_JSON: Readonly<Json> = {
  act_fn: "silu",
  attention_head_dim: 2,
  block_out_channels: [32, 64],
  cross_attention_dim: 32,
  down_block_types: ["CrossAttnDownBlock2D", "DownBlock2D"],
  up_block_types: ["UpBlock2D", "CrossAttnUpBlock2D"],
  in_channels: 4,
  out_channels: 4,
  layers_per_block: 1,
  norm_num_groups: 8,
  sample_size: 8,
};
