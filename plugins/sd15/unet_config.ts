/**
 * `UNet2DConditionModel` config as diffusers 0.42 reads it from `unet/config.json`. A missing key
 * takes diffusers' default; a value that changes the architecture in a way this port does not
 * implement is an error naming the file and the key (never a silently different network).
 */
import { UserError } from "../../ffi/errors.ts";

export type DownBlockType = "CrossAttnDownBlock2D" | "DownBlock2D";
export type UpBlockType = "CrossAttnUpBlock2D" | "UpBlock2D";
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

type Json = Record<string, unknown>;

/** A `unet/config.json` that cannot be read, or that asks for an architecture not ported. */
export class UNetConfigError extends UserError {
  constructor(readonly file: string, detail: string) {
    super(`${file}: ${detail}`);
  }
}

class ConfigReader {
  constructor(readonly file: string, readonly json: Json) {}

  fail(key: string, what: string): never {
    throw new UNetConfigError(this.file, `"${key}" ${what}`);
  }

  has(key: string): boolean {
    return this.json[key] !== undefined && this.json[key] !== null;
  }

  int(key: string, def: number): number {
    const v = this.json[key] ?? def;
    if (typeof v !== "number" || !Number.isInteger(v)) {
      this.fail(key, `must be an integer, got ${show(v)}`);
    }
    return v;
  }

  num(key: string, def: number): number {
    const v = this.json[key] ?? def;
    if (typeof v !== "number" || !Number.isFinite(v)) {
      this.fail(key, `must be a number, got ${show(v)}`);
    }
    return v;
  }

  bool(key: string, def: boolean): boolean {
    const v = this.json[key] ?? def;
    if (typeof v !== "boolean") this.fail(key, `must be true or false, got ${show(v)}`);
    return v;
  }

  /** An int or a list of ints, spread to `n` entries. */
  perBlock(key: string, def: number | null, n: number): number[] | null {
    const v = this.json[key] ?? def;
    if (v === null) return null;
    if (typeof v === "number" && Number.isInteger(v) && v > 0) return Array(n).fill(v);
    if (Array.isArray(v) && v.length === n && v.every((x) => Number.isInteger(x) && x > 0)) {
      return v as number[];
    }
    this.fail(key, `must be a positive integer or a list of ${n} of them, got ${show(v)}`);
  }

  /** Must hold the one value this port implements (null and missing count as that value). */
  only(key: string, allowed: unknown, why = "") {
    const v = this.json[key] ?? allowed;
    if (v !== allowed) {
      this.fail(key, `is ${show(v)}; only ${show(allowed)} is supported${why ? ` (${why})` : ""}`);
    }
  }
}

function show(v: unknown): string {
  return JSON.stringify(v) ?? String(v);
}

const DOWN_TYPES: readonly string[] = ["CrossAttnDownBlock2D", "DownBlock2D"];
const UP_TYPES: readonly string[] = ["CrossAttnUpBlock2D", "UpBlock2D"];
const ACTIVATIONS: Record<string, UNetActivation> = {
  silu: "silu",
  swish: "silu",
  gelu: "gelu",
  relu: "relu",
};

/** Depth of each attention in a block: an int for all of them, or one entry per attention. */
function depths(r: ConfigReader, key: string, v: unknown, layers: number): number[] {
  if (typeof v === "number" && Number.isInteger(v) && v > 0) return Array(layers).fill(v);
  if (Array.isArray(v) && v.length === layers && v.every((x) => Number.isInteger(x) && x > 0)) {
    return v as number[];
  }
  r.fail(key, `has an entry ${show(v)} that is neither a positive integer nor ${layers} of them`);
}

/** Parses a diffusers `unet/config.json` object; `file` names it in errors. */
export function parseUNetConfig(json: Json, file = "unet/config.json"): UNetConfig {
  const r = new ConfigReader(file, json);

  const down = (json.down_block_types ?? [
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "DownBlock2D",
  ]) as unknown[];
  const up = (json.up_block_types ?? [
    "UpBlock2D",
    "CrossAttnUpBlock2D",
    "CrossAttnUpBlock2D",
    "CrossAttnUpBlock2D",
  ]) as unknown[];
  if (!Array.isArray(down) || down.length === 0) r.fail("down_block_types", "must be a list");
  if (!Array.isArray(up) || up.length !== down.length) {
    r.fail("up_block_types", `must list as many blocks as down_block_types (${down.length})`);
  }
  down.forEach((t, i) => {
    if (!DOWN_TYPES.includes(t as string)) {
      r.fail(`down_block_types`, `entry ${i} is ${show(t)}; supported: ${DOWN_TYPES.join(", ")}`);
    }
  });
  up.forEach((t, i) => {
    if (!UP_TYPES.includes(t as string)) {
      r.fail(`up_block_types`, `entry ${i} is ${show(t)}; supported: ${UP_TYPES.join(", ")}`);
    }
  });
  const n = down.length;
  const midRaw = json.mid_block_type === undefined
    ? "UNetMidBlock2DCrossAttn"
    : json.mid_block_type;
  if (midRaw !== null && midRaw !== "UNetMidBlock2DCrossAttn") {
    r.fail("mid_block_type", `is ${show(midRaw)}; supported: "UNetMidBlock2DCrossAttn" or null`);
  }

  const blockOut = (json.block_out_channels ?? [320, 640, 1280, 1280]) as number[];
  if (
    !Array.isArray(blockOut) || blockOut.length !== n ||
    !blockOut.every((c) => Number.isInteger(c) && c > 0)
  ) {
    r.fail("block_out_channels", `must list ${n} channel counts, one per down block`);
  }
  const layersPerBlock = r.perBlock("layers_per_block", 2, n)!;
  const crossAttentionDim = r.perBlock("cross_attention_dim", 1280, n)!;
  const headDim = r.perBlock("attention_head_dim", 8, n)!;
  const heads = r.perBlock("num_attention_heads", null, n) ?? headDim;

  const onlyCrossRaw = json.only_cross_attention ?? false;
  const onlyCrossAttention: boolean[] = typeof onlyCrossRaw === "boolean"
    ? Array(n).fill(onlyCrossRaw)
    : onlyCrossRaw as boolean[];
  if (
    !Array.isArray(onlyCrossAttention) || onlyCrossAttention.length !== n ||
    !onlyCrossAttention.every((x) => typeof x === "boolean")
  ) {
    r.fail("only_cross_attention", `must be a boolean or ${n} of them, got ${show(onlyCrossRaw)}`);
  }

  const tlRaw = json.transformer_layers_per_block ?? 1;
  const tlList: unknown[] = Array.isArray(tlRaw) ? tlRaw : Array(n).fill(tlRaw);
  if (tlList.length !== n) r.fail("transformer_layers_per_block", `must list ${n} entries`);
  const downTransformerLayers = tlList.map((v, i) =>
    depths(r, "transformer_layers_per_block", v, layersPerBlock[i])
  );
  const reverseRaw = (json.reverse_transformer_layers_per_block ?? null) as unknown[] | null;
  let upTransformerLayers: number[][];
  if (reverseRaw === null) {
    // diffusers hands each up block the reversed down entry, spread over its layers + 1
    upTransformerLayers = [...tlList].reverse().map((v, i) => {
      const layers = layersPerBlock[n - 1 - i] + 1;
      if (Array.isArray(v)) {
        r.fail(
          "transformer_layers_per_block",
          "nested lists need reverse_transformer_layers_per_block as well",
        );
      }
      return depths(r, "transformer_layers_per_block", v, layers);
    });
  } else {
    if (!Array.isArray(reverseRaw) || reverseRaw.length !== n) {
      r.fail("reverse_transformer_layers_per_block", `must list ${n} entries`);
    }
    upTransformerLayers = reverseRaw.map((v, i) =>
      depths(r, "reverse_transformer_layers_per_block", v, layersPerBlock[n - 1 - i] + 1)
    );
  }
  const lastTl = tlList[n - 1];
  if (typeof lastTl !== "number") {
    r.fail("transformer_layers_per_block", "the mid block needs a single depth as the last entry");
  }

  const actRaw = json.act_fn ?? "silu";
  const actFn = ACTIVATIONS[actRaw as string];
  if (!actFn) {
    r.fail("act_fn", `is ${show(actRaw)}; supported: ${Object.keys(ACTIVATIONS).join(", ")}`);
  }

  let sampleSize: UNetConfig["sampleSize"] = null;
  const ss = json.sample_size ?? null;
  if (typeof ss === "number") sampleSize = ss;
  else if (Array.isArray(ss) && ss.length === 2) sampleSize = [ss[0], ss[1]];
  else if (ss !== null) r.fail("sample_size", `must be an integer or [h, w], got ${show(ss)}`);

  if (json.norm_num_groups === null) {
    r.fail("norm_num_groups", "is null; only GroupNorm UNets are supported");
  }

  r.only("resnet_time_scale_shift", "default", "scale_shift time conditioning is not implemented");
  r.only("time_embedding_type", "positional");
  r.only("class_embed_type", null);
  r.only("num_class_embeds", null);
  r.only("addition_embed_type", null);
  r.only(
    "encoder_hid_dim_type",
    null,
    "IP-Adapters are attached separately, not saved in the UNet",
  );
  r.only("encoder_hid_dim", null);
  r.only("time_cond_proj_dim", null);
  r.only("timestep_post_act", null);
  r.only("time_embedding_act_fn", null);
  r.only("attention_type", "default");
  r.only("cross_attention_norm", null);
  r.only("dual_cross_attention", false);
  r.only("class_embeddings_concat", false);
  // mid_block_only_cross_attention, resnet_skip_time_act and resnet_out_scale_factor only reach
  // block types this port rejects above, so any value builds the same network.

  const convInKernel = r.int("conv_in_kernel", 3);
  const convOutKernel = r.int("conv_out_kernel", 3);
  if (convInKernel % 2 === 0) r.fail("conv_in_kernel", "must be odd");
  if (convOutKernel % 2 === 0) r.fail("conv_out_kernel", "must be odd");

  const normNumGroups = r.int("norm_num_groups", 32);
  for (const c of blockOut) {
    if (c % normNumGroups !== 0) {
      r.fail("norm_num_groups", `(${normNumGroups}) must divide every block_out_channels entry`);
    }
  }

  return {
    sampleSize,
    inChannels: r.int("in_channels", 4),
    outChannels: r.int("out_channels", 4),
    centerInputSample: r.bool("center_input_sample", false),
    flipSinToCos: r.bool("flip_sin_to_cos", true),
    freqShift: r.num("freq_shift", 0),
    downBlockTypes: down as DownBlockType[],
    midBlockType: midRaw as MidBlockType | null,
    upBlockTypes: up as UpBlockType[],
    onlyCrossAttention,
    blockOutChannels: blockOut,
    layersPerBlock,
    downsamplePadding: r.int("downsample_padding", 1),
    midBlockScaleFactor: r.num("mid_block_scale_factor", 1),
    dropout: r.num("dropout", 0),
    actFn,
    normNumGroups,
    normEps: r.num("norm_eps", 1e-5),
    crossAttentionDim,
    downTransformerLayers,
    upTransformerLayers,
    midTransformerLayers: lastTl as number,
    numAttentionHeads: heads,
    useLinearProjection: r.bool("use_linear_projection", false),
    upcastAttention: r.bool("upcast_attention", false),
    resnetTimeScaleShift: "default",
    timeEmbedDim: r.has("time_embedding_dim") ? r.int("time_embedding_dim", 0) : blockOut[0] * 4,
    convInKernel,
    convOutKernel,
  };
}

/** Reads and parses `<dir>/config.json`. */
export function loadUNetConfig(dir: string): UNetConfig {
  const file = `${dir}/config.json`;
  let text: string;
  try {
    text = Deno.readTextFileSync(file);
  } catch (e) {
    throw new UNetConfigError(
      file,
      e instanceof Deno.errors.NotFound
        ? "not found (a diffusers unet/ folder holds config.json and the weights)"
        : `cannot read the UNet config (${(e as Error).message})`,
    );
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new UNetConfigError(file, `not valid JSON (${(e as Error).message})`);
  }
  if (json === null || typeof json !== "object" || Array.isArray(json)) {
    throw new UNetConfigError(file, "expected a JSON object");
  }
  return parseUNetConfig(json as Json, file);
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
