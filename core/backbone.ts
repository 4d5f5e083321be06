/**
 * What the generation loop needs from a diffusion model family. Stable Diffusion 1.5 with
 * IP-Adapters (plugins/sd15/backbone.ts) is the implementation; the loop in core/sampling.ts only
 * sees this interface.
 */
import type { Device, DType, Tensor } from "../ffi/mod.ts";
import type { RgbImage } from "./image.ts";
import type { SchedulerConfig } from "./plugins.ts";

/** The IP-Adapter conditioning of a UNet batch. */
export interface ImagePrompt {
  /** Image tokens per attached adapter, each [B, T, cross_dim]. */
  tokens: readonly Tensor[];
  /** [B, adapters] float scales; 0 switches an adapter off for that sample, exactly. */
  scales: Tensor;
}

/** A loaded diffusion model: text and image encoders, the noise predictor and the decoder. */
export interface DiffusionBackbone extends Disposable {
  /** The weights' dtype. */
  readonly dtype: DType;
  /** Where the weights live. */
  readonly device: Device;
  /** Channels of the latent space (4 for SD1.5). */
  readonly latentChannels: number;
  /** Pixels per latent cell along each side (8 for SD1.5). */
  readonly vaeScaleFactor: number;
  /** Default output size in pixels (the UNet's sample_size times vaeScaleFactor). */
  readonly defaultSize: number;
  /** The model's scheduler settings, which samplers are built from. */
  readonly schedulerConfig: SchedulerConfig;
  /** IP-Adapters attached to the UNet (DIPSY attaches the same weights twice). */
  readonly adapterCount: number;
  /** Model identifiers recorded in every manifest line. */
  readonly modelIds: Readonly<Record<string, string>>;

  /** Text-encoder states for prompts: [N, L, cross_dim]. */
  encodePrompts(prompts: readonly string[]): Tensor;
  /**
   * IP-Adapter image tokens for reference images: [N, T, cross_dim], by the projection of adapter
   * slot `adapter` (0, the default: positive; 1: negative, which may have its own file).
   */
  encodeImages(images: readonly RgbImage[], adapter?: number): Tensor;
  /** The UNet's noise prediction for a batch. */
  predictNoise(latents: Tensor, timestep: number, text: Tensor, ip: ImagePrompt | null): Tensor;
  /** Final latents to images in [0, 1]: [B, 3, H, W] float32 on the CPU. */
  decode(latents: Tensor): Tensor;
}
