/**
 * transformers' `CLIPModel` (both towers, both projections, `logit_scale`) and the loaders for
 * every CLIP checkpoint layout the project meets:
 *
 * - SD1.5 `text_encoder/` (`CLIPTextModel`; keys under `text_model.`, or without a prefix when
 *   saved by transformers >= 5),
 * - the IP-Adapter `image_encoder/` (`CLIPVisionModelWithProjection`),
 * - `openai/clip-vit-base-patch16` (`CLIPModel`; either tower can also be loaded alone from it).
 *
 * A folder holds config.json and model.safetensors or a sharded model.safetensors.index.json.
 */
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { readModelConfig } from "../../core/json_config.ts";
import { type Device, type DType, ops, refusePickle, scope, type Tensor } from "../../ffi/mod.ts";
import { loadModule, Module } from "../../core/nn.ts";
import {
  RandomSource,
  SafetensorsSource,
  WeightError,
  type WeightSource,
} from "../../core/weights.ts";
import {
  type ClipCheckpoint,
  ClipConfigError,
  type ClipModelConfig,
  parseClipCheckpointConfig,
} from "./config.ts";
import type { ClipAttention } from "./encoder.ts";
import {
  type ClipPreset,
  isClipPreset,
  tinyClipConfig,
  tinyTextConfig,
  tinyVisionConfig,
} from "./presets.ts";
import { type ClipTextForwardOptions, ClipTextModel, type ClipTextOutput } from "./text.ts";
import { ClipVisionModel, type ClipVisionOutput } from "./vision.ts";

export interface ClipOutput {
  /** [images, texts]: exp(logit_scale) * cosine similarity. */
  logitsPerImage: Tensor;
  /** [texts, images]. */
  logitsPerText: Tensor;
  /** [texts, P], L2-normalised. */
  textEmbeds: Tensor;
  /** [images, P], L2-normalised. */
  imageEmbeds: Tensor;
  text: ClipTextOutput;
  vision: ClipVisionOutput;
}

/** x / ||x||₂ over the last dim, in transformers' op order. */
export function l2Normalize(x: Tensor): Tensor {
  return scope(() => x.div(ops.powScalar(ops.sum(ops.powScalar(x, 2), [-1], true), 0.5)));
}

export class ClipModel extends Module {
  readonly text: ClipTextModel;
  readonly vision: ClipVisionModel;
  /** 0-d, the log of the similarity temperature (frozen in the DataDream recipe). */
  readonly logitScale: Tensor;

  /** `w` holds a `CLIPModel` state dict (`text_model.*`, `vision_model.*`, projections). */
  constructor(w: WeightSource, readonly config: ClipModelConfig) {
    super();
    const dim = config.projectionDim;
    this.text = new ClipTextModel(w.sub("text_model"), config.text, {
      source: w.sub("text_projection"),
      dim,
    });
    this.vision = new ClipVisionModel(w.sub("vision_model"), config.vision, {
      source: w.sub("visual_projection"),
      dim,
    });
    this.logitScale = this.param(w, "logit_scale", []);
  }

  /** Projected, not normalised (transformers' `get_text_features`). */
  getTextFeatures(ids: Tensor, opts: ClipTextForwardOptions = {}): Tensor {
    return scope(() => this.text.forward(ids, opts).textEmbeds!);
  }

  /** Projected, not normalised (transformers' `get_image_features`). */
  getImageFeatures(pixels: Tensor): Tensor {
    return scope(() => this.vision.forward(pixels).imageEmbeds!);
  }

  forward(ids: Tensor, pixels: Tensor, opts: ClipTextForwardOptions = {}): ClipOutput {
    return scope(() => {
      const vision = this.vision.forward(pixels);
      const text = this.text.forward(ids, opts);
      const imageEmbeds = l2Normalize(vision.imageEmbeds!);
      const textEmbeds = l2Normalize(text.textEmbeds!);
      const logitsPerText = ops.matmul(textEmbeds, imageEmbeds.transpose(0, 1))
        .mul(ops.exp(this.logitScale));
      const logitsPerImage = logitsPerText.transpose(0, 1);
      return { logitsPerImage, logitsPerText, textEmbeds, imageEmbeds, text, vision };
    });
  }

  /** Every attention block of both towers with its state-dict path (`text_model.encoder…`). */
  namedAttentions(prefix = ""): [string, ClipAttention][] {
    return [...this.text.namedAttentions(prefix), ...this.vision.namedAttentions(prefix)];
  }

  override namedParameters(prefix = ""): Map<string, Tensor> {
    return new Map([
      ...this.text.namedParameters(prefix),
      ...this.vision.namedParameters(prefix),
      ...super.namedParameters(prefix),
    ]);
  }

  override dispose(): void {
    this.text.dispose();
    this.vision.dispose();
    super.dispose();
  }
}

// ---------------------------------------------------------------------------------------------
// Loading

export interface ClipLoadOptions {
  dtype?: DType;
  device?: Device;
  /** Seed of a preset's random weights. */
  seed?: number;
}

/**
 * A local folder, or a preset name (`"tiny"`: random weights). A folder that happens to be called
 * like a preset is reached as `./tiny`.
 */
export type ClipSource = string | ClipPreset;

/** Buffers some checkpoints store that the models rebuild themselves. */
const BUFFERS = /(^|\.)position_ids$/;
const VISION_KEYS = /^(vision_model\.|visual_projection\.|logit_scale$)/;
const TEXT_KEYS = /^(text_model\.|text_projection\.|logit_scale$)/;

interface OpenedCheckpoint {
  info: ClipCheckpoint;
  weights: SafetensorsSource;
  configPath: string;
}

function openFolder(dir: string, opts: ClipLoadOptions): OpenedCheckpoint {
  const configPath = join(dir, "config.json");
  const json = readModelConfig(configPath, ClipConfigError, "CLIP config", {
    notFound: "not found (expected a transformers CLIP folder)",
  });
  const info = parseClipCheckpointConfig(json, configPath);
  return { info, weights: openWeights(dir, opts), configPath };
}

function openWeights(dir: string, opts: ClipLoadOptions): SafetensorsSource {
  const single = join(dir, "model.safetensors");
  if (existsSync(single)) return SafetensorsSource.open(single, opts.dtype, opts.device);
  const indexPath = join(dir, "model.safetensors.index.json");
  if (existsSync(indexPath)) {
    let index: { weight_map?: Record<string, string> } | null;
    try {
      index = JSON.parse(readFileSync(indexPath, "utf8"));
    } catch (e) {
      throw new WeightError(`${indexPath}: not valid JSON (${(e as Error).message})`);
    }
    if (!index?.weight_map || typeof index.weight_map !== "object") {
      throw new WeightError(`${indexPath}: "weight_map" is missing`);
    }
    const shards = [...new Set(Object.values(index.weight_map))].sort().map((f) => join(dir, f));
    return SafetensorsSource.open(shards, opts.dtype, opts.device);
  }
  const pickle = join(dir, "pytorch_model.bin");
  if (existsSync(pickle)) refusePickle(pickle);
  throw new WeightError(`${dir}: no model.safetensors or model.safetensors.index.json`);
}

/** Weights of a standalone tower: legacy files nest them under `text_model.` / `vision_model.`. */
function towerBody(w: WeightSource, prefix: string, probe: string): WeightSource {
  return w.has(`${prefix}.${probe}`) || !w.has(probe) ? w.sub(prefix) : w;
}

function wrongKind(configPath: string, got: string, want: string): Error {
  return new ClipConfigError(
    configPath,
    null,
    `describes a CLIP ${got} model; ${want} was asked for`,
  );
}

/**
 * Builds a model from `w`, then checks that no checkpoint key was left unread; a checkpoint with
 * extra keys is the wrong model, so the built one is freed before the error is thrown.
 */
function either(a: RegExp, b: RegExp): RegExp {
  return new RegExp(`(?:${a.source})|(?:${b.source})`);
}

/** `CLIPTextModel` / `CLIPTextModelWithProjection`, or the text tower of a `CLIPModel`. */
export function loadClipText(src: ClipSource, opts: ClipLoadOptions = {}): ClipTextModel {
  if (isClipPreset(src)) {
    const w = new RandomSource(opts.seed ?? 0, opts.dtype, opts.device);
    return new ClipTextModel(w.sub("text_model"), tinyTextConfig(), null);
  }
  const { info, weights: w, configPath } = openFolder(src, opts);
  if (info.kind === "vision") throw wrongKind(configPath, "vision", "a text model");
  if (info.kind === "clip") {
    const cfg = info.config;
    return loadModule(
      w,
      () =>
        new ClipTextModel(w.sub("text_model"), cfg.text, {
          source: w.sub("text_projection"),
          dim: cfg.projectionDim,
        }),
      { ignoreUnused: either(BUFFERS, VISION_KEYS) },
    );
  }
  const cfg = info.config;
  const projection = info.projection ?? w.has("text_projection.weight");
  const body = towerBody(w, "text_model", "embeddings.token_embedding.weight");
  return loadModule(
    w,
    () =>
      new ClipTextModel(
        body,
        cfg,
        projection ? { source: w.sub("text_projection"), dim: cfg.projectionDim } : null,
      ),
    { ignoreUnused: BUFFERS },
  );
}

/** `CLIPVisionModel` / `CLIPVisionModelWithProjection`, or the vision tower of a `CLIPModel`. */
export function loadClipVision(src: ClipSource, opts: ClipLoadOptions = {}): ClipVisionModel {
  if (isClipPreset(src)) {
    const w = new RandomSource(opts.seed ?? 0, opts.dtype, opts.device);
    const cfg = tinyVisionConfig();
    return new ClipVisionModel(w.sub("vision_model"), cfg, {
      source: w.sub("visual_projection"),
      dim: cfg.projectionDim,
    });
  }
  const { info, weights: w, configPath } = openFolder(src, opts);
  if (info.kind === "text") throw wrongKind(configPath, "text", "a vision model");
  if (info.kind === "clip") {
    const cfg = info.config;
    return loadModule(
      w,
      () =>
        new ClipVisionModel(w.sub("vision_model"), cfg.vision, {
          source: w.sub("visual_projection"),
          dim: cfg.projectionDim,
        }),
      { ignoreUnused: either(BUFFERS, TEXT_KEYS) },
    );
  }
  const cfg = info.config;
  const projection = info.projection ?? w.has("visual_projection.weight");
  const body = towerBody(w, "vision_model", "embeddings.class_embedding");
  return loadModule(
    w,
    () =>
      new ClipVisionModel(
        body,
        cfg,
        projection ? { source: w.sub("visual_projection"), dim: cfg.projectionDim } : null,
      ),
    { ignoreUnused: BUFFERS },
  );
}

/** A full `CLIPModel` (e.g. openai/clip-vit-base-patch16). */
export function loadClipModel(src: ClipSource, opts: ClipLoadOptions = {}): ClipModel {
  if (isClipPreset(src)) {
    const cfg = tinyClipConfig();
    const model = new ClipModel(new RandomSource(opts.seed ?? 0, opts.dtype, opts.device), cfg);
    // A random logit scale near 0 would make a useless classifier temperature: use the init value.
    ops.fill_(model.logitScale, cfg.logitScaleInitValue);
    return model;
  }
  const { info, weights: w, configPath } = openFolder(src, opts);
  if (info.kind !== "clip") throw wrongKind(configPath, info.kind, "a full CLIPModel");
  const cfg = info.config;
  return loadModule(w, () => new ClipModel(w, cfg), { ignoreUnused: BUFFERS });
}
