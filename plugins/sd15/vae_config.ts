/**
 * AutoencoderKL configuration, read from a diffusers `vae/config.json`. Missing keys take the
 * values diffusers' AutoencoderKL gives them; anything this implementation cannot run is rejected
 * with the file and the key, instead of loading a model that silently computes something else.
 */
import { readFileSync } from "node:fs";
import { UserError } from "../../ffi/errors.ts";

/** Activations diffusers' `get_activation` accepts that we run exactly. */
export type VaeActivation = "silu" | "swish" | "gelu" | "relu";
const ACTIVATIONS: readonly VaeActivation[] = ["silu", "swish", "gelu", "relu"];

export interface VaeConfig {
  inChannels: number;
  outChannels: number;
  downBlockTypes: "DownEncoderBlock2D"[];
  upBlockTypes: "UpDecoderBlock2D"[];
  blockOutChannels: number[];
  layersPerBlock: number;
  actFn: VaeActivation;
  latentChannels: number;
  normNumGroups: number;
  sampleSize: number | number[];
  scalingFactor: number;
  shiftFactor: number | null;
  latentsMean: number[] | null;
  latentsStd: number[] | null;
  forceUpcast: boolean;
  useQuantConv: boolean;
  usePostQuantConv: boolean;
  midBlockAddAttention: boolean;
}

/** A `vae/config.json` that cannot be read, or a value this port does not implement. */
export class VaeConfigError extends UserError {
  /** `key` null: the file as a whole (missing, not JSON). */
  constructor(readonly file: string, readonly key: string | null, detail: string) {
    super(key === null ? `${file}: ${detail}` : `${file}: "${key}" ${detail}`);
  }
}

/** Typed reads of config.json values; each failure names the file and key. */
class Reader {
  constructor(readonly json: Record<string, unknown>, readonly file: string) {}

  raw(key: string): unknown {
    return this.json[key];
  }

  #fail(key: string, detail: string): never {
    throw new VaeConfigError(this.file, key, detail);
  }

  #show(v: unknown): string {
    return JSON.stringify(v);
  }

  int(key: string, dflt: number): number {
    const v = this.json[key];
    if (v === undefined) return dflt;
    if (typeof v !== "number" || !Number.isInteger(v) || v <= 0) {
      this.#fail(key, `must be a positive integer, got ${this.#show(v)}`);
    }
    return v;
  }

  number(key: string, dflt: number): number {
    const v = this.json[key];
    if (v === undefined || v === null) return dflt;
    if (typeof v !== "number" || !Number.isFinite(v)) {
      this.#fail(key, `must be a number, got ${this.#show(v)}`);
    }
    return v;
  }

  nullableNumber(key: string): number | null {
    const v = this.json[key];
    if (v === undefined || v === null) return null;
    if (typeof v !== "number" || !Number.isFinite(v)) {
      this.#fail(key, `must be a number or null, got ${this.#show(v)}`);
    }
    return v;
  }

  nullableNumberList(key: string): number[] | null {
    const v = this.json[key];
    if (v === undefined || v === null) return null;
    if (!Array.isArray(v) || v.some((x) => typeof x !== "number" || !Number.isFinite(x))) {
      this.#fail(key, `must be a list of numbers or null, got ${this.#show(v)}`);
    }
    return v as number[];
  }

  bool(key: string, dflt: boolean): boolean {
    const v = this.json[key];
    if (v === undefined) return dflt;
    if (typeof v !== "boolean") this.#fail(key, `must be true or false, got ${this.#show(v)}`);
    return v;
  }

  intList(key: string, dflt: number[]): number[] {
    const v = this.json[key];
    if (v === undefined) return [...dflt];
    if (
      !Array.isArray(v) || v.length === 0 ||
      v.some((x) => typeof x !== "number" || !Number.isInteger(x) || x <= 0)
    ) {
      this.#fail(key, `must be a non-empty list of positive integers, got ${this.#show(v)}`);
    }
    return v as number[];
  }

  sampleSize(key: string, dflt: number): number | number[] {
    const v = this.json[key];
    if (v === undefined) return dflt;
    if (typeof v === "number" && Number.isInteger(v) && v > 0) return v;
    if (Array.isArray(v) && v.length === 2 && v.every((x) => Number.isInteger(x) && x > 0)) {
      return v as number[];
    }
    this.#fail(key, `must be a positive integer or [height, width], got ${this.#show(v)}`);
  }

  enumValue<T extends string>(key: string, allowed: readonly T[], dflt: T): T {
    const v = this.json[key];
    if (v === undefined) return dflt;
    if (typeof v !== "string" || !allowed.includes(v as T)) {
      this.#fail(key, `is ${this.#show(v)}; supported: ${allowed.join(", ")}`);
    }
    return v as T;
  }

  enumList<T extends string>(key: string, allowed: readonly T[], dflt: T[]): T[] {
    const v = this.json[key];
    if (v === undefined) return [...dflt];
    if (!Array.isArray(v) || v.length === 0) {
      this.#fail(key, `must be a non-empty list, got ${this.#show(v)}`);
    }
    v.forEach((x, i) => {
      if (typeof x !== "string" || !allowed.includes(x as T)) {
        this.#fail(key, `entry ${i} is ${this.#show(x)}; supported: ${allowed.join(", ")}`);
      }
    });
    return v as T[];
  }
}

/** Reads and validates `vae/config.json` (the path is named in every error). */
export function readVaeConfig(path: string): VaeConfig {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    throw new VaeConfigError(
      path,
      null,
      (e as { code?: string }).code === "ENOENT"
        ? "not found (a diffusers vae/ folder holds config.json and the weights)"
        : `cannot read the VAE config (${(e as Error).message})`,
    );
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new VaeConfigError(path, null, `not valid JSON (${(e as Error).message})`);
  }
  return parseVaeConfig(json, path);
}

/** Validates a parsed config.json object; `file` only names the source in errors. */
export function parseVaeConfig(json: unknown, file = "vae/config.json"): VaeConfig {
  if (json === null || typeof json !== "object" || Array.isArray(json)) {
    throw new VaeConfigError(file, null, "expected a JSON object");
  }
  const r = new Reader(json as Record<string, unknown>, file);
  const cls = r.raw("_class_name");
  if (cls !== undefined && cls !== "AutoencoderKL") {
    throw new VaeConfigError(
      file,
      "_class_name",
      `is ${JSON.stringify(cls)}, expected "AutoencoderKL"`,
    );
  }
  const blockOutChannels = r.intList("block_out_channels", [64]);
  const downBlockTypes = r.enumList("down_block_types", ["DownEncoderBlock2D"] as const, [
    "DownEncoderBlock2D",
  ]);
  const upBlockTypes = r.enumList("up_block_types", ["UpDecoderBlock2D"] as const, [
    "UpDecoderBlock2D",
  ]);
  for (
    const [key, list] of [["down_block_types", downBlockTypes], ["up_block_types", upBlockTypes]]
  ) {
    if (list.length !== blockOutChannels.length) {
      throw new VaeConfigError(
        file,
        key as string,
        `has ${list.length} entries but block_out_channels has ${blockOutChannels.length}`,
      );
    }
  }
  const cfg: VaeConfig = {
    inChannels: r.int("in_channels", 3),
    outChannels: r.int("out_channels", 3),
    downBlockTypes,
    upBlockTypes,
    blockOutChannels,
    layersPerBlock: r.int("layers_per_block", 1),
    actFn: r.enumValue("act_fn", ACTIVATIONS, "silu"),
    latentChannels: r.int("latent_channels", 4),
    normNumGroups: r.int("norm_num_groups", 32),
    sampleSize: r.sampleSize("sample_size", 32),
    scalingFactor: r.number("scaling_factor", 0.18215),
    shiftFactor: r.nullableNumber("shift_factor"),
    latentsMean: r.nullableNumberList("latents_mean"),
    latentsStd: r.nullableNumberList("latents_std"),
    forceUpcast: r.bool("force_upcast", true),
    useQuantConv: r.bool("use_quant_conv", true),
    usePostQuantConv: r.bool("use_post_quant_conv", true),
    midBlockAddAttention: r.bool("mid_block_add_attention", true),
  };
  for (const c of cfg.blockOutChannels) {
    if (c % cfg.normNumGroups !== 0) {
      throw new VaeConfigError(
        file,
        "norm_num_groups",
        `(${cfg.normNumGroups}) does not divide block_out_channels entry ${c}`,
      );
    }
  }
  if (cfg.scalingFactor === 0) throw new VaeConfigError(file, "scaling_factor", "must not be 0");
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

export const VAE_PRESETS = { tiny: TINY_VAE_CONFIG, sd15: SD15_VAE_CONFIG } as const;

/** Spatial reduction from image to latent: one 2x downsampler per block but the last. */
export function vaeScaleFactor(cfg: VaeConfig): number {
  return 2 ** (cfg.blockOutChannels.length - 1);
}
