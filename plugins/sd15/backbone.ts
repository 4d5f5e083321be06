/**
 * Stable Diffusion 1.5 with IP-Adapters as a DiffusionBackbone: the diffusers folder layout
 * (unet/, vae/, text_encoder/, tokenizer/, scheduler/), an h94 IP-Adapter file attached once per
 * image prompt (the negative image's slot may take another file), and its CLIP image encoder.
 * `tiny` builds the same graph with seeded random weights and no files; `random` does so for any
 * configs (the benchmarks' full-size SD1.5).
 *
 * On CUDA the weights default to float16, and the batched UNet call of each step is replayed as
 * a CUDA graph per input shape (ffi/graphed.ts); eager runs are the fallback and the reference.
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
import { GraphedCall } from "../../ffi/graphed.ts";
import type { DiffusionBackbone, ImagePrompt } from "../../core/backbone.ts";
import { clipPreprocess, type RgbImage } from "../../core/image.ts";
import { loadModule, type Module } from "../../core/nn.ts";
import type { SchedulerConfig } from "../../core/plugins.ts";
import { RandomSource, type WeightSource } from "../../core/weights.ts";
import type { ClipTextConfig, ClipVisionConfig } from "../clip/config.ts";
import { loadClipText, loadClipVision } from "../clip/model.ts";
import { tinyTextConfig, tinyVisionConfig } from "../clip/presets.ts";
import { ClipTextModel } from "../clip/text.ts";
import { ClipTokenizer } from "../clip/tokenizer.ts";
import { ClipVisionModel } from "../clip/vision.ts";
import {
  checkAdapterPair,
  checkEncoderFit,
  IpAdapter,
  readIpAdapterConfig,
  TINY_IP_BASE,
  TINY_IP_PLUS,
} from "./ip_adapter.ts";
import type { IpProjectionConfig } from "./ip_projection.ts";
import { readSchedulerConfig, SD15_SCHEDULER_CONFIG } from "../samplers/schedule.ts";
import { UNet2DConditionModel } from "./unet.ts";
import { parseUNetConfig, TINY_UNET_CONFIG_JSON } from "./unet_config.ts";
import { AutoencoderKL } from "./vae.ts";
import { TINY_VAE_CONFIG, type VaeConfig } from "./vae_config.ts";

export interface Sd15Paths {
  /** A diffusers SD1.5 folder. */
  model: string;
  /** An h94 IP-Adapter safetensors file (`ip-adapter-plus_sd15.safetensors` or the base one). */
  ipAdapter?: string;
  /**
   * The negative image's adapter (slot 2), of the same kind and token count; absent: `ipAdapter`
   * in both slots, as DIPSY loads it.
   */
  negativeIpAdapter?: string;
  /** The IP-Adapter's CLIP image encoder folder (`models/image_encoder`). */
  imageEncoder?: string;
}

export interface Sd15Options {
  /** Default: f16 on CUDA (as DIPSY runs), f32 on the CPU. */
  dtype?: DType;
  device?: Device;
  /** IP-Adapters to attach: 2 for DIPSY (the same weights twice), 1, or 0 (text only). */
  adapters?: number;
  /**
   * Replays each step's UNet call as a CUDA graph. Default: on for CUDA, off on the CPU;
   * `DIPSY_CUDA_GRAPHS=0` (or 1) changes that default.
   */
  cudaGraphs?: boolean;
  /** Told once if CUDA graphs fail and the UNet falls back to eager (default: stderr). */
  onGraphFallback?: (message: string) => void;
}

export interface TinyOptions extends Sd15Options {
  seed?: number;
  /** Which IP-Adapter projection the tiny model uses (default "plus", as DIPSY). */
  adapterKind?: "plus" | "base";
}

/** The configs of a model built with random weights (`Sd15Backbone.random`). */
export interface RandomSd15Config {
  /** The UNet's `config.json` content. */
  unet: Record<string, unknown>;
  vae: VaeConfig;
  text: ClipTextConfig;
  /** The IP-Adapter's image encoder; its width (Plus) or projection (base) feeds the adapter. */
  vision: ClipVisionConfig;
  ipAdapter: IpProjectionConfig;
  tokenizer: ClipTokenizer;
}

export interface RandomOptions extends Sd15Options {
  seed?: number;
  /**
   * Where each part's weights come from, given the part's seed (default: `RandomSource`, drawn
   * on the CPU, so a seed gives the same model on any device).
   */
  source?: (seed: number, dtype: DType, device: Device) => WeightSource;
  /** Recorded as the model id in manifests. */
  name?: string;
}

/** f16 on CUDA, f32 on the CPU. */
export function defaultDType(device: Device): DType {
  return device === "cpu" ? "f32" : "f16";
}

function graphsWanted(device: Device, option: boolean | undefined): boolean {
  if (option !== undefined) return option;
  const env = Deno.env.get("DIPSY_CUDA_GRAPHS");
  if (env === "0" || env === "1") return env === "1";
  return device !== "cpu";
}

interface Parts {
  unet: UNet2DConditionModel;
  vae: AutoencoderKL;
  text: ClipTextModel;
  tokenizer: ClipTokenizer;
  imageEncoder: ClipVisionModel | null;
  /** The adapter of each slot (positive, negative); one instance twice when they share a file. */
  adapters: IpAdapter[];
  schedulerConfig: SchedulerConfig;
  modelIds: Record<string, string>;
  dtype: DType;
  device: Device;
  /** Side of the image encoder's square input. */
  encoderSize: number;
  cudaGraphs: boolean;
  onGraphFallback?: (message: string) => void;
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
  /** The UNet call replayed as CUDA graphs, when they are on. */
  readonly #graphs: GraphedCall | null;

  private constructor(private readonly p: Parts) {
    this.dtype = p.dtype;
    this.device = p.device;
    this.latentChannels = p.unet.config.inChannels;
    this.vaeScaleFactor = 2 ** (p.vae.config.blockOutChannels.length - 1);
    const ss = p.unet.config.sampleSize ?? 64;
    this.defaultSize = (typeof ss === "number" ? ss : ss[0]) * this.vaeScaleFactor;
    this.schedulerConfig = p.schedulerConfig;
    this.modelIds = p.modelIds;
    if (p.adapters.length > 0) p.unet.attachIpAdapters(p.adapters);
    this.adapterCount = p.adapters.length;
    const unet = p.unet;
    this.#graphs = p.cudaGraphs
      ? new GraphedCall(
        // [latents, timestep, text, ...tokens per adapter, scales]
        (a) =>
          unet.forward(
            a[0],
            a[1],
            a[2],
            a.length > 3 ? { tokens: a.slice(3, -1), scales: a.at(-1)! } : null,
          ),
        { name: "UNet", onFallback: p.onGraphFallback },
      )
      : null;
  }

  /** The CUDA graph runner of the UNet call, when graphs are on (its figures, for tests). */
  get unetGraphs(): GraphedCall | null {
    return this.#graphs;
  }

  /** Loads SD1.5 from a diffusers folder, plus the IP-Adapter and its image encoder if given. */
  static async load(paths: Sd15Paths, opts: Sd15Options = {}): Promise<Sd15Backbone> {
    const device = opts.device ?? "cpu", dtype = opts.dtype ?? defaultDType(device);
    const adapters = paths.ipAdapter ? opts.adapters ?? 2 : 0;
    if (adapters > 0 && !paths.imageEncoder) {
      throw new Error("an IP-Adapter needs its CLIP image encoder folder (models/image_encoder)");
    }
    const negativeFile = adapters > 1 && paths.negativeIpAdapter &&
        paths.negativeIpAdapter !== paths.ipAdapter
      ? paths.negativeIpAdapter
      : null;
    // From the headers, before any weight is read.
    if (negativeFile) {
      checkAdapterPair(
        { path: paths.ipAdapter!, config: readIpAdapterConfig(paths.ipAdapter!) },
        { path: negativeFile, config: readIpAdapterConfig(negativeFile) },
      );
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
      const negative = negativeFile ? own(IpAdapter.load(negativeFile, unet, lo)) : null;
      const imageEncoder = adapter ? own(loadClipVision(paths.imageEncoder!, lo)) : null;
      if (imageEncoder) {
        const features = {
          path: paths.imageEncoder!,
          hiddenSize: imageEncoder.config.hiddenSize,
          projectionDim: imageEncoder.visualProjection ? imageEncoder.config.projectionDim : null,
        };
        checkEncoderFit({ path: paths.ipAdapter!, config: adapter!.config }, features);
        if (negative) checkEncoderFit({ path: negativeFile!, config: negative.config }, features);
      }
      const slots = adapter
        ? Array.from({ length: adapters }, (_, i) => i === 1 && negative ? negative : adapter)
        : [];
      return new Sd15Backbone({
        unet,
        vae,
        text,
        tokenizer,
        imageEncoder,
        adapters: slots,
        schedulerConfig: modelSchedulerConfig(paths.model),
        modelIds: {
          model: paths.model,
          ...(paths.ipAdapter ? { ipAdapter: paths.ipAdapter } : {}),
          ...(negativeFile ? { negativeIpAdapter: negativeFile } : {}),
          ...(paths.imageEncoder ? { imageEncoder: paths.imageEncoder } : {}),
        },
        dtype,
        device,
        encoderSize: imageEncoder?.config.imageSize ?? 224,
        cudaGraphs: graphsWanted(device, opts.cudaGraphs),
        onGraphFallback: opts.onGraphFallback,
      });
    } catch (e) {
      for (const x of owned) x[Symbol.dispose]();
      throw e;
    }
  }

  /** The embedded tiny model: same code, small configs, seeded random weights, no files. */
  static tiny(opts: TinyOptions = {}): Sd15Backbone {
    const seed = opts.seed ?? 0;
    const kind = opts.adapterKind ?? "plus";
    const ipAdapter = kind === "plus" ? TINY_IP_PLUS : TINY_IP_BASE;
    // The encoder's width feeds Plus, its projection feeds base: size both to the adapter.
    const vision = tinyVisionConfig({
      hiddenSize: ipAdapter.kind === "plus" ? ipAdapter.inputDim : 32,
      projectionDim: ipAdapter.kind === "base" ? ipAdapter.embedDim : 16,
    });
    return Sd15Backbone.random({
      unet: { ...TINY_UNET_CONFIG_JSON },
      vae: TINY_VAE_CONFIG,
      text: tinyTextConfig(),
      vision,
      ipAdapter,
      tokenizer: ClipTokenizer.byteLevel(),
    }, { ...opts, seed, name: `tiny (seed ${seed}, ip-adapter ${kind})` });
  }

  /**
   * A model of the given configs with seeded random weights: part k (UNet, VAE, text encoder,
   * image encoder, IP-Adapter) draws from seed + k, as `tiny` always has.
   */
  static random(config: RandomSd15Config, opts: RandomOptions = {}): Sd15Backbone {
    const seed = opts.seed ?? 0;
    const device = opts.device ?? "cpu", dtype = opts.dtype ?? defaultDType(device);
    const source = opts.source ?? ((s, dt, dev) => new RandomSource(s, dt, dev));
    const owned: { dispose(): void }[] = [];
    const own = <T extends { dispose(): void }>(x: T): T => (owned.push(x), x);
    const part = <M extends Module>(k: number, make: (w: WeightSource) => M): M =>
      own(loadModule(source(seed + k, dtype, device), make, { checkUnused: false }));
    try {
      const unetConfig = parseUNetConfig(config.unet, "unet config");
      const unet = part(0, (w) => new UNet2DConditionModel(w, unetConfig));
      const vae = part(1, (w) => new AutoencoderKL(w, config.vae));
      const text = part(2, (w) => new ClipTextModel(w.sub("text_model"), config.text, null));
      const imageEncoder = part(
        3,
        (w) =>
          new ClipVisionModel(w.sub("vision_model"), config.vision, {
            source: w.sub("visual_projection"),
            dim: config.vision.projectionDim,
          }),
      );
      const hidden = unet.crossAttentions().map((a) => a.innerDim);
      const count = opts.adapters ?? 2;
      const adapter = count > 0 ? part(4, (w) => new IpAdapter(w, config.ipAdapter, hidden)) : null;
      return new Sd15Backbone({
        unet,
        vae,
        text,
        tokenizer: config.tokenizer,
        imageEncoder,
        adapters: Array.from({ length: count }, () => adapter!),
        schedulerConfig: SD15_SCHEDULER_CONFIG,
        modelIds: { model: opts.name ?? `random (seed ${seed})` },
        dtype,
        device,
        encoderSize: config.vision.imageSize,
        cudaGraphs: graphsWanted(device, opts.cudaGraphs),
        onGraphFallback: opts.onGraphFallback,
      });
    } catch (e) {
      for (const x of owned) x.dispose();
      throw e;
    }
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

  /** Image tokens for adapter slot `adapter` (0: positive, 1: negative), by its own projection. */
  encodeImages(images: readonly RgbImage[], adapter = 0): Tensor {
    const { imageEncoder } = this.p;
    const ip = this.p.adapters[adapter];
    if (!imageEncoder || !ip) {
      throw new Error(
        this.p.adapters.length
          ? `this model has ${this.p.adapters.length} IP-Adapter(s), no slot ${adapter}`
          : "this model has no IP-Adapter",
      );
    }
    return noGrad(() =>
      scope(() => {
        const size = this.p.encoderSize;
        const px = ops.to(clipPreprocess(images, { size }), this.dtype, this.device);
        // Plus reads the penultimate hidden states; base the projected image embeds.
        const features = ip.kind === "plus"
          ? imageEncoder.hiddenState(px, -2)
          : imageEncoder.forward(px).imageEmbeds!;
        return ip.project(features);
      })
    );
  }

  predictNoise(latents: Tensor, timestep: number, text: Tensor, ip: ImagePrompt | null): Tensor {
    const graphs = this.#graphs;
    if (graphs) {
      const ipArgs = ip ? [...ip.tokens, ip.scales] : [];
      return noGrad(() => graphs.call([latents, timestep, text, ...ipArgs]));
    }
    return noGrad(() => this.p.unet.forward(latents, timestep, text, ip));
  }

  decode(latents: Tensor): Tensor {
    return noGrad(() => scope(() => ops.to(this.p.vae.decodeToImage(latents), "f32", "cpu")));
  }

  [Symbol.dispose](): void {
    const p = this.p;
    this.#graphs?.dispose();
    p.unet.detachIpAdapters();
    for (const m of [p.unet, p.vae, p.text, p.imageEncoder, ...new Set(p.adapters)]) m?.dispose();
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
