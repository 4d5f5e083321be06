/**
 * The guided denoising loop. Every prediction a Guidance plugin asks for, for every image of the
 * batch, runs in ONE UNet call: the conditionings differ only in the text states and in the
 * per-sample adapter scales, and an adapter at scale 0 contributes exactly nothing. DIPSY's four
 * predictions thus cost one batch-4 call per image instead of the official three batch-2 calls.
 * The positive image goes through adapter slot 1 at the guidance's `adapterScale`, the negative
 * through slot 2 (which may hold another file) at `negativeAdapterScale`, or the same scale.
 *
 * On a GPU the loop waits for the device only at the ends of a batch: everything made on the
 * host (noise, row indices, adapter scales) is made and moved before the first step, and nothing
 * is read back before the last.
 */
import { disposeAll, Generator, keep, ops, scope, type Tensor } from "../ffi/mod.ts";
import { fromHost } from "../ffi/tensor.ts";
import type { DiffusionBackbone, ImagePrompt } from "./backbone.ts";
import type { RgbImage } from "./image.ts";
import { type Conditioning, type Guidance, parseConditioning, type Sampler } from "./plugins.ts";

export interface SampleRequest {
  prompt: string;
  /** Positive reference image (adapter 1), already augmented. */
  positive?: RgbImage | null;
  /** Negative reference image (adapter 2), already augmented. */
  negative?: RgbImage | null;
  /** Seeds the image's initial noise, as `torch.Generator().manual_seed(seed)` would. */
  seed: number;
}

export interface SampleOptions {
  width: number;
  height: number;
  guidance: Guidance;
  /** A fresh sampler for this batch (it keeps multistep history). */
  sampler: Sampler;
  /** Called after each denoising step. */
  onStep?: (index: number, total: number) => void;
}

/**
 * Initial latents of one image: float32 N(0, 1) of shape [1, C, h, w] drawn from a CPU generator
 * seeded with `seed`, so diffusers with `torch.Generator().manual_seed(seed)` draws the same.
 */
export function initialNoise(seed: number, channels: number, h: number, w: number): Tensor {
  using g = new Generator(seed);
  return ops.randn([1, channels, h, w], "f32", "cpu", g);
}

function checkRequests(bb: DiffusionBackbone, reqs: readonly SampleRequest[], g: Guidance) {
  if (reqs.length === 0) throw new Error("sample: no requests");
  if (!g.usesImages) return;
  if (bb.adapterCount === 0) {
    throw new Error(`guidance "${g.name}" uses image prompts but the model has no IP-Adapter`);
  }
  reqs.forEach((r, i) => {
    if (!r.positive) throw new Error(`request ${i}: guidance "${g.name}" needs a positive image`);
    if (g.usesNegative && !r.negative) {
      throw new Error(`request ${i}: guidance "${g.name}" needs a negative image`);
    }
  });
  if (g.usesNegative && bb.adapterCount < 2) {
    throw new Error(`guidance "${g.name}" needs two IP-Adapters (positive and negative)`);
  }
}

/** The negative image's adapter scale: its own when the guidance sets one, else lambda's. */
export function negativeScale(g: Guidance): number {
  return g.negativeAdapterScale ?? g.adapterScale;
}

/** Denoises a batch and returns its final latents [B, C, h, w] (model dtype and device). */
export function sampleLatents(
  bb: DiffusionBackbone,
  reqs: readonly SampleRequest[],
  opts: SampleOptions,
): Tensor {
  const { guidance, sampler } = opts;
  checkRequests(bb, reqs, guidance);
  const f = bb.vaeScaleFactor;
  if (opts.width % f || opts.height % f) {
    throw new Error(`image size ${opts.width}x${opts.height} must be a multiple of ${f}`);
  }
  const h = opts.height / f, w = opts.width / f;
  const b = reqs.length;

  // Conditioning inputs, computed once per batch and reused at every step.
  const cond = scope(() => {
    const prompts = [...new Set(reqs.map((r) => r.prompt))];
    const states = bb.encodePrompts(["", ...prompts]);
    const rows = (ids: number[]) =>
      ops.indexSelect(
        states,
        0,
        ops.to(fromHost(ids, [ids.length], "i64"), undefined, states.device),
      );
    const text = rows(reqs.map((r) => 1 + prompts.indexOf(r.prompt)));
    const empty = rows(reqs.map(() => 0));
    let pos: Tensor | null = null, neg: Tensor | null = null;
    if (guidance.usesImages) {
      pos = bb.encodeImages(reqs.map((r) => r.positive!));
      // Adapter 2 is off wherever no negative exists; its tokens then only fill the batch.
      neg = guidance.usesNegative ? bb.encodeImages(reqs.map((r) => r.negative!), 1) : pos.clone();
    }
    const noise = ops.cat(reqs.map((r) => initialNoise(r.seed, bb.latentChannels, h, w)), 0);
    const latents = ops.to(ops.mulScalar(noise, sampler.initNoiseSigma), bb.dtype, bb.device);
    return { text, empty, pos, neg, latents };
  });

  // The batched text states and image prompts depend only on which conditionings a step needs,
  // which changes at most at a guidance interval's edges: build each set once, not every step.
  const batches = new Map<string, { text: Tensor; ip: ImagePrompt | null }>();
  const conditioningBatch = (needs: readonly Conditioning[]) => {
    const key = needs.join(",");
    let batch = batches.get(key);
    if (!batch) {
      batch = scope(() => {
        const parsed = needs.map(parseConditioning);
        const text = ops.cat(parsed.map((p) => p.text === "empty" ? cond.empty : cond.text), 0);
        if (!cond.pos || bb.adapterCount === 0) return { text, ip: null };
        const lambda = guidance.adapterScale;
        const lambdaNeg = negativeScale(guidance);
        const scales: number[] = [];
        for (const p of parsed) {
          for (let r = 0; r < b; r++) {
            scales.push(p.positive ? lambda : 0);
            if (bb.adapterCount > 1) scales.push(p.negative ? lambdaNeg : 0);
          }
        }
        const tokens = [ops.cat(needs.map(() => cond.pos!), 0)];
        if (bb.adapterCount > 1) tokens.push(ops.cat(needs.map(() => cond.neg!), 0));
        const scaleRows = fromHost(scales, [needs.length * b, bb.adapterCount]);
        return { text, ip: { tokens, scales: ops.to(scaleRows, bb.dtype, bb.device) } };
      });
      keep([batch.text, ...(batch.ip ? [...batch.ip.tokens, batch.ip.scales] : [])]);
      batches.set(key, batch);
    }
    return batch;
  };

  let latents = cond.latents;
  let done = false;
  try {
    const total = sampler.timesteps.length;
    // Every conditioning set the run will use is moved to the device now, not mid-loop.
    for (let i = 0; i < total; i++) conditioningBatch(guidance.needs({ index: i, total }));
    for (let i = 0; i < total; i++) {
      const step = { index: i, total };
      const needs = guidance.needs(step);
      const { text, ip } = conditioningBatch(needs);
      const next = scope(() => {
        const x = sampler.scaleModelInput(latents, i);
        const batchLatents = ops.cat(needs.map(() => x), 0);
        const eps = bb.predictNoise(batchLatents, sampler.timesteps[i], text, ip);
        const parts = ops.chunk(eps, needs.length, 0);
        const guided = guidance.combine(new Map(needs.map((c, k) => [c, parts[k]])), step);
        return sampler.step(guided, i, latents);
      });
      if (latents !== cond.latents) latents.dispose();
      latents = next;
      opts.onStep?.(i, total);
    }
    done = true;
    return latents;
  } finally {
    for (const { text, ip } of batches.values()) disposeAll([text, ip?.tokens, ip?.scales]);
    for (const t of [cond.text, cond.empty, cond.pos, cond.neg, cond.latents]) {
      if (t && t !== latents) t.dispose();
    }
    if (!done) latents.dispose();
  }
}
