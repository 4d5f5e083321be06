/**
 * Small CLIP configs for tests and smoke runs (weights come from a seeded RandomSource). The
 * text vocabulary is exactly the embedded byte-level tokenizer's (`ClipTokenizer.byteLevel()`:
 * 520 ids, BOS 518, EOS 519 = pad), so the tiny models read that tokenizer's ids as they are.
 */
import {
  CLIP_DEFAULTS,
  type ClipModelConfig,
  type ClipTextConfig,
  type ClipVisionConfig,
} from "./config.ts";

export function tinyTextConfig(overrides: Partial<ClipTextConfig> = {}): ClipTextConfig {
  const vocabSize = overrides.vocabSize ?? 520;
  return {
    vocabSize,
    hiddenSize: 32,
    intermediateSize: 64,
    projectionDim: 16,
    numHiddenLayers: 2,
    numAttentionHeads: 4,
    maxPositionEmbeddings: 77,
    hiddenAct: "quick_gelu",
    layerNormEps: 1e-5,
    attentionDropout: 0,
    bosTokenId: vocabSize - 2,
    eosTokenId: vocabSize - 1,
    padTokenId: vocabSize - 1,
    ...overrides,
  };
}

/** Shaped like the IP-Adapter image encoder (exact GELU), scaled down. */
export function tinyVisionConfig(overrides: Partial<ClipVisionConfig> = {}): ClipVisionConfig {
  return {
    hiddenSize: 32,
    intermediateSize: 64,
    projectionDim: 16,
    numHiddenLayers: 2,
    numAttentionHeads: 4,
    numChannels: 3,
    imageSize: 32,
    patchSize: 4,
    hiddenAct: "gelu",
    layerNormEps: 1e-5,
    attentionDropout: 0,
    ...overrides,
  };
}

/** Shaped like openai/clip-vit-base-patch16 (quick_gelu in both towers), scaled down. */
export function tinyClipConfig(): ClipModelConfig {
  return {
    text: tinyTextConfig(),
    vision: tinyVisionConfig({ hiddenAct: "quick_gelu" }),
    projectionDim: 16,
    logitScaleInitValue: CLIP_DEFAULTS.logitScaleInitValue,
  };
}

export const CLIP_PRESETS = ["tiny"] as const;
export type ClipPreset = (typeof CLIP_PRESETS)[number];

export function isClipPreset(s: string): s is ClipPreset {
  return (CLIP_PRESETS as readonly string[]).includes(s);
}
