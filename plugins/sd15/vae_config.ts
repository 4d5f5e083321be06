/**
 * AutoencoderKL configuration, read from a diffusers `vae/config.json`. Missing keys take the
 * values diffusers' AutoencoderKL gives them; anything this implementation cannot run is rejected
 * with the file and the key, instead of loading a model that silently computes something else.
 */
import {
  type CamelFields,
  ConfigFileError,
  ConfigReader,
  type Json,
  positive,
  readModelConfig,
} from "../../core/json_config.ts";
import * as s from "../../core/schema.ts";

/** Activations diffusers' `get_activation` accepts that we run exactly. */
const ACTIVATIONS = ["silu", "swish", "gelu", "relu"] as const;
export type VaeActivation = (typeof ACTIVATIONS)[number];

/** The `AutoencoderKL.__init__` arguments, with diffusers' defaults. */
const VAE_FIELDS = {
  in_channels: positive(3),
  out_channels: positive(3),
  down_block_types: s.array(s.literal("DownEncoderBlock2D"), {
    minItems: 1,
    default: ["DownEncoderBlock2D"],
  }),
  up_block_types: s.array(s.literal("UpDecoderBlock2D"), {
    minItems: 1,
    default: ["UpDecoderBlock2D"],
  }),
  block_out_channels: s.array(positive(), { minItems: 1, default: [64] }),
  layers_per_block: positive(1),
  act_fn: s.choice(ACTIVATIONS, "silu"),
  latent_channels: positive(4),
  norm_num_groups: positive(32),
  sample_size: s.oneOf<number | number[]>([
    positive(),
    s.array(positive(), { minItems: 2, maxItems: 2 }),
  ], {
    expected: "a positive integer or [height, width]",
    default: 32,
  }),
  scaling_factor: s.number({ default: 0.18215 }),
  shift_factor: s.nullable(s.number(), { default: null }),
  latents_mean: s.nullable(s.array(s.number()), { default: null }),
  latents_std: s.nullable(s.array(s.number()), { default: null }),
  force_upcast: s.boolean({ default: true }),
  use_quant_conv: s.boolean({ default: true }),
  use_post_quant_conv: s.boolean({ default: true }),
  mid_block_add_attention: s.boolean({ default: true }),
};

export type VaeConfig = CamelFields<typeof VAE_FIELDS>;

/** A `vae/config.json` that cannot be read, or a value this port does not implement. */
export class VaeConfigError extends ConfigFileError {}

/** Reads and validates `vae/config.json` (the path is named in every error). */
export function readVaeConfig(path: string): VaeConfig {
  const json = readModelConfig(path, VaeConfigError, "VAE config", {
    notFound: "not found (a diffusers vae/ folder holds config.json and the weights)",
  });
  return parseVaeConfig(json, path);
}

/** Validates a parsed config.json object; `file` only names the source in errors. */
export function parseVaeConfig(json: Json, file = "vae/config.json"): VaeConfig {
  // Only scaling_factor has always read null as its default; other nulls are wrong types.
  const r = new ConfigReader(file, json, VaeConfigError, "", (k) => k === "scaling_factor");
  r.get("_class_name", s.literal("AutoencoderKL", { default: "AutoencoderKL" }));
  const cfg = r.fields(VAE_FIELDS);
  const n = cfg.blockOutChannels.length;
  const lists = { down_block_types: cfg.downBlockTypes, up_block_types: cfg.upBlockTypes };
  for (const [key, list] of Object.entries(lists)) {
    if (list.length !== n) {
      r.fail(key, `has ${list.length} entries but block_out_channels has ${n}`);
    }
  }
  for (const c of cfg.blockOutChannels) {
    if (c % cfg.normNumGroups !== 0) {
      r.fail(
        "norm_num_groups",
        `(${cfg.normNumGroups}) does not divide block_out_channels entry ${c}`,
      );
    }
  }
  if (cfg.scalingFactor === 0) r.fail("scaling_factor", "must not be 0");
  return cfg;
}

/** The diffusers defaults with `overrides` applied (for presets and tests). */
export function vaeConfig(overrides: Partial<VaeConfig> = {}): VaeConfig {
  return { ...parseVaeConfig({}, "<defaults>"), ...overrides };
}

/** Stable Diffusion 1.5's `vae/config.json`, for building the full-size model with random weights. */
export const SD15_VAE_CONFIG: VaeConfig = vaeConfig({
  downBlockTypes: Array(4).fill("DownEncoderBlock2D"),
  upBlockTypes: Array(4).fill("UpDecoderBlock2D"),
  blockOutChannels: [128, 256, 512, 512],
  layersPerBlock: 2,
  sampleSize: 512,
});

/** A tiny VAE for fast tests and demos: same code path, 8x fewer channels, 2x downsampling. */
export const TINY_VAE_CONFIG: VaeConfig = vaeConfig({
  downBlockTypes: Array(2).fill("DownEncoderBlock2D"),
  upBlockTypes: Array(2).fill("UpDecoderBlock2D"),
  blockOutChannels: [32, 64],
  layersPerBlock: 1,
  normNumGroups: 8,
  sampleSize: 32,
});

/** Spatial reduction from image to latent: one 2x downsampler per block but the last. */
export function vaeScaleFactor(cfg: VaeConfig): number {
  return 2 ** (cfg.blockOutChannels.length - 1);
}
