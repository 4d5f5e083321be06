/**
 * Stable Diffusion 1.5 with IP-Adapters as a DiffusionBackbone: the diffusers folder layout
 * (unet/, vae/, text_encoder/, tokenizer/, scheduler/), an h94 IP-Adapter file attached once per
 * image prompt, and its CLIP image encoder. `tiny` builds the same graph with seeded random
 * weights and no files.
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import {
  type Device,
  type DType,
  fromHost,
  noGrad,
  ops,
  scope,
  type Tensor,
} from "../../ffi/mod.ts";
import type { DiffusionBackbone, ImagePrompt } from "../../core/backbone.ts";
import { clipPreprocess, type RgbImage } from "../../core/image.ts";
import type { SchedulerConfig } from "../../core/plugins.ts";
import { RandomSource } from "../../core/weights.ts";
import { loadClipText, loadClipVision } from "../clip/model.ts";
import { tinyVisionConfig } from "../clip/presets.ts";
import type { ClipTextModel } from "../clip/text.ts";
import { ClipTokenizer } from "../clip/tokenizer.ts";
import { ClipVisionModel } from "../clip/vision.ts";
import { IpAdapter, TINY_IP_BASE, TINY_IP_PLUS } from "./ip_adapter.ts";
import { readSchedulerConfig, SD15_SCHEDULER_CONFIG } from "../samplers/schedule.ts";
import { UNet2DConditionModel } from "./unet.ts";
import { TINY_UNET_CONFIG_JSON } from "./unet_config.ts";
import { AutoencoderKL } from "./vae.ts";
import { TINY_VAE_CONFIG } from "./vae_config.ts";

export interface Sd15Paths {
  /** A diffusers SD1.5 folder. */
  model: string;
  /** An h94 IP-Adapter safetensors file (`ip-adapter-plus_sd15.safetensors` or the base one). */
  ipAdapter?: string;
  /** The IP-Adapter's CLIP image encoder folder (`models/image_encoder`). */
  imageEncoder?: string;
}

export interface Sd15Options {
  dtype?: DType;
  device?: Device;
  /** IP-Adapters to attach: 2 for DIPSY (the same weights twice), 1, or 0 (text only). */
  adapters?: number;
}

export interface TinyOptions extends Sd15Options {
  seed?: number;
  /** Which IP-Adapter projection the tiny model uses (default "plus", as DIPSY). */
  adapterKind?: "plus" | "base";
}

interface Parts {
  unet: UNet2DConditionModel;
  vae: AutoencoderKL;
  text: ClipTextModel;
  tokenizer: ClipTokenizer;
  imageEncoder: ClipVisionModel | null;
  adapter: IpAdapter | null;
  schedulerConfig: SchedulerConfig;
  modelIds: Record<string, string>;
  adapters: number;
  dtype: DType;
  device: Device;
  /** Side of the image encoder's square input. */
  encoderSize: number;
}

export class Sd15Backbone implements DiffusionBackbone {
  readonly dtype: DType;
  readonly device: Device;
  readonly latentChannels: number;
  readonly vaeScaleFactor: number;
  readonly defaultSize: number;
  readonly schedulerConfig: SchedulerConfig;
  readonly adapterCount: number;
  readonly modelIds: Readonly<Record<string, string>>;

  private constructor(private readonly p: Parts) {
    this.dtype = p.dtype;
    this.device = p.device;
    this.latentChannels = p.unet.config.inChannels;
    this.vaeScaleFactor = 2 ** (p.vae.config.blockOutChannels.length - 1);
    const ss = p.unet.config.sampleSize ?? 64;
    this.defaultSize = (typeof ss === "number" ? ss : ss[0]) * this.vaeScaleFactor;
    this.schedulerConfig = p.schedulerConfig;
    this.modelIds = p.modelIds;
    if (p.adapter && p.adapters > 0) {
      p.unet.attachIpAdapters(Array.from({ length: p.adapters }, () => p.adapter!));
    }
    this.adapterCount = p.adapter ? p.adapters : 0;
  }

  /** Loads SD1.5 from a diffusers folder, plus the IP-Adapter and its image encoder if given. */
  static async load(paths: Sd15Paths, opts: Sd15Options = {}): Promise<Sd15Backbone> {
    const dtype = opts.dtype ?? "f32", device = opts.device ?? "cpu";
    const adapters = paths.ipAdapter ? opts.adapters ?? 2 : 0;
    if (adapters > 0 && !paths.imageEncoder) {
      throw new Error("an IP-Adapter needs its CLIP image encoder folder (models/image_encoder)");
    }
    const tokenizer = await ClipTokenizer.fromFolder(join(paths.model, "tokenizer"));
    const lo = { dtype, device };
    const owned: Disposable[] = [];
    const own = <T extends Disposable>(x: T): T => (owned.push(x), x);
    try {
      const unet = own(UNet2DConditionModel.fromPretrained(join(paths.model, "unet"), lo));
      const vae = own(AutoencoderKL.fromPretrained(join(paths.model, "vae"), lo));
      const text = own(loadClipText(join(paths.model, "text_encoder"), lo));
      const adapter = paths.ipAdapter && adapters > 0
        ? own(IpAdapter.load(paths.ipAdapter, unet, lo))
        : null;
      const imageEncoder = adapter ? own(loadClipVision(paths.imageEncoder!, lo)) : null;
      return new Sd15Backbone({
        unet,
        vae,
        text,
        tokenizer,
        imageEncoder,
        adapter,
        schedulerConfig: modelSchedulerConfig(paths.model),
        modelIds: {
          model: paths.model,
          ...(paths.ipAdapter ? { ipAdapter: paths.ipAdapter } : {}),
          ...(paths.imageEncoder ? { imageEncoder: paths.imageEncoder } : {}),
        },
        adapters,
        dtype,
        device,
        encoderSize: imageEncoder?.config.imageSize ?? 224,
      });
    } catch (e) {
      for (const x of owned) x[Symbol.dispose]();
      throw e;
    }
  }

  /** The embedded tiny model: same code, small configs, seeded random weights, no files. */
  static tiny(opts: TinyOptions = {}): Sd15Backbone {
    const seed = opts.seed ?? 0;
    const dtype = opts.dtype ?? "f32", device = opts.device ?? "cpu";
    const kind = opts.adapterKind ?? "plus";
    const lo = { dtype, device };
    const unet = UNet2DConditionModel.random({ ...TINY_UNET_CONFIG_JSON }, seed, lo);
    const vae = AutoencoderKL.random(TINY_VAE_CONFIG, seed + 1, lo);
    const text = loadClipText("tiny", { ...lo, seed: seed + 2 });
    const ipCfg = kind === "plus" ? TINY_IP_PLUS : TINY_IP_BASE;
    // The encoder's width feeds Plus, its projection feeds base: size both to the adapter.
    const visionCfg = tinyVisionConfig({
      hiddenSize: ipCfg.kind === "plus" ? ipCfg.inputDim : 32,
      projectionDim: ipCfg.kind === "base" ? ipCfg.embedDim : 16,
    });
    const w = new RandomSource(seed + 3, dtype, device);
    const imageEncoder = new ClipVisionModel(w.sub("vision_model"), visionCfg, {
      source: w.sub("visual_projection"),
      dim: visionCfg.projectionDim,
    });
    const adapter = IpAdapter.random(ipCfg, unet, seed + 4, lo);
    return new Sd15Backbone({
      unet,
      vae,
      text,
      tokenizer: ClipTokenizer.byteLevel(),
      imageEncoder,
      adapter,
      schedulerConfig: SD15_SCHEDULER_CONFIG,
      modelIds: { model: `tiny (seed ${seed}, ip-adapter ${kind})` },
      adapters: opts.adapters ?? 2,
      dtype,
      device,
      encoderSize: visionCfg.imageSize,
    });
  }

  encodePrompts(prompts: readonly string[]): Tensor {
    return noGrad(() =>
      scope(() => {
        const enc = this.p.tokenizer.encodeBatch([...prompts]);
        const ids = fromHost(enc.ids, enc.shape, "i32");
        return this.p.text.forward(ops.to(ids, "i64", this.device)).lastHiddenState;
      })
    );
  }

  encodeImages(images: readonly RgbImage[]): Tensor {
    const { imageEncoder, adapter } = this.p;
    if (!imageEncoder || !adapter) throw new Error("this model has no IP-Adapter");
    return noGrad(() =>
      scope(() => {
        const size = this.p.encoderSize;
        const px = ops.to(clipPreprocess(images, { size }), this.dtype, this.device);
        // Plus reads the penultimate hidden states; base the projected image embeds.
        const features = adapter.kind === "plus"
          ? imageEncoder.hiddenState(px, -2)
          : imageEncoder.forward(px).imageEmbeds!;
        return adapter.project(features);
      })
    );
  }

  predictNoise(latents: Tensor, timestep: number, text: Tensor, ip: ImagePrompt | null): Tensor {
    return noGrad(() => this.p.unet.forward(latents, timestep, text, ip));
  }

  decode(latents: Tensor): Tensor {
    return noGrad(() => scope(() => ops.to(this.p.vae.decodeToImage(latents), "f32", "cpu")));
  }

  [Symbol.dispose](): void {
    const p = this.p;
    p.unet.detachIpAdapters();
    for (const m of [p.unet, p.vae, p.text, p.imageEncoder, p.adapter]) m?.dispose();
  }
}

/**
 * The model's `scheduler/scheduler_config.json`, or SD1.5's when the folder has none. Keys the
 * file lacks stay marked as defaults, so each sampler applies its own (as diffusers' from_config).
 */
export function modelSchedulerConfig(modelDir: string): SchedulerConfig {
  const path = join(modelDir, "scheduler", "scheduler_config.json");
  return existsSync(path) ? readSchedulerConfig(path) : SD15_SCHEDULER_CONFIG;
}
