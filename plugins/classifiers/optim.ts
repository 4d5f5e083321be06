/**
 * The optimiser side of the DataDream recipe: AdamW (Loshchilov & Hutter 2019, "Decoupled Weight
 * Decay Regularization") over a list of trainable tensors, the per-iteration learning-rate
 * schedule, and dynamic loss scaling for half-precision training.
 *
 * AdamW runs `ops.adamwStep`, the op sequence of `torch.optim.AdamW`'s single-tensor path, so a
 * step equals PyTorch's bit for bit given the same gradients.
 */
import { keep, noGrad, ops, scope, type Tensor } from "../../ffi/mod.ts";

export interface AdamWOptions {
  lr?: number;
  betas?: [number, number];
  eps?: number;
  weightDecay?: number;
}

/** Per-tensor optimiser state, as `torch.optim.AdamW` keeps it. */
export interface AdamWState {
  /** Number of updates applied to this tensor (PyTorch's `state["step"]`). */
  step: number;
  expAvg: Tensor;
  expAvgSq: Tensor;
}

export class AdamW implements Disposable {
  readonly params: readonly Tensor[];
  lr: number;
  readonly betas: [number, number];
  readonly eps: number;
  readonly weightDecay: number;
  /** null until a tensor's first update (PyTorch creates state lazily too). */
  readonly state: (AdamWState | null)[];

  /** Defaults are torch.optim.AdamW's. */
  constructor(params: readonly Tensor[], opts: AdamWOptions = {}) {
    this.params = params;
    this.lr = opts.lr ?? 1e-3;
    this.betas = opts.betas ?? [0.9, 0.999];
    this.eps = opts.eps ?? 1e-8;
    this.weightDecay = opts.weightDecay ?? 1e-2;
    this.state = params.map(() => null);
  }

  /** Drops every gradient (PyTorch's `zero_grad(set_to_none=True)`). */
  zeroGrad(): void {
    for (const p of this.params) ops.zeroGrad(p);
  }

  /**
   * One update of every tensor that has a gradient, at `lr` (default: `this.lr`). Tensors without
   * a gradient are skipped and their step count stays, as in PyTorch.
   */
  step(lr = this.lr): void {
    const [beta1, beta2] = this.betas;
    noGrad(() => {
      this.params.forEach((p, i) => {
        const g = ops.grad(p);
        if (g === null) return;
        try {
          let s = this.state[i];
          if (s === null) {
            s = {
              step: 0,
              expAvg: keep(ops.zerosLike(p)),
              expAvgSq: keep(ops.zerosLike(p)),
            };
            this.state[i] = s;
          }
          s.step += 1;
          ops.adamwStep(
            p,
            g,
            s.expAvg,
            s.expAvgSq,
            s.step,
            lr,
            beta1,
            beta2,
            this.eps,
            this.weightDecay,
          );
        } finally {
          g.dispose();
        }
      });
    });
  }

  dispose(): void {
    for (const s of this.state) {
      s?.expAvg.dispose();
      s?.expAvgSq.dispose();
    }
    this.state.fill(null);
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

// ---------------------------------------------------------------------------------------------
// Learning-rate schedule

export interface WarmupCosineOptions {
  /** Peak rate, reached at the last warm-up iteration. */
  baseLr: number;
  /** The cosine decays towards this rate (never quite reached: the last iteration is above it). */
  finalLr: number;
  /** Rate of iteration 0 when there is a warm-up. */
  warmupStartLr: number;
  epochs: number;
  warmupEpochs: number;
  /** Optimiser steps per epoch (DataDream: `len(train_loader)`, the last batch may be short). */
  itersPerEpoch: number;
}

/** The DataDream recipe: peak 1e-4, from and towards 1e-8, 10 epochs with 3 of warm-up. */
export const DATADREAM_SCHEDULE = {
  baseLr: 1e-4,
  finalLr: 1e-8,
  warmupStartLr: 1e-8,
  epochs: 10,
  warmupEpochs: 3,
} as const;

/**
 * The learning rate of global iteration `it` (0-based), exactly as DataDream's
 * `classify/utils.py cosine_scheduler` fills its array (DINO's scheduler). With
 * W = warmupEpochs * itersPerEpoch and T = epochs * itersPerEpoch:
 *
 *   it < W, W = 1:      warmupStartLr
 *   it < W - 1:         it * ((baseLr - warmupStartLr) / (W - 1)) + warmupStartLr
 *   it = W - 1 (W > 1): baseLr
 *   W <= it < T:        finalLr + 0.5 * (baseLr - finalLr) * (1 + cos(pi * (it - W) / (T - W)))
 *
 * The warm-up is numpy's `linspace(warmupStartLr, baseLr, W)` term by term (same float64 ops), so
 * it matches bit for bit; the cosine part could differ from numpy's `cos` in the last bit (it
 * matched exactly in every run test/classifier_test.ts compares).
 */
export function warmupCosineLr(it: number, o: WarmupCosineOptions): number {
  const w = o.warmupEpochs * o.itersPerEpoch;
  const total = o.epochs * o.itersPerEpoch;
  if (!Number.isInteger(it) || it < 0 || it >= total) {
    throw new RangeError(`learning-rate schedule: iteration ${it} is outside 0..${total - 1}`);
  }
  if (it < w) {
    if (w === 1) return o.warmupStartLr;
    if (it === w - 1) return o.baseLr;
    return it * ((o.baseLr - o.warmupStartLr) / (w - 1)) + o.warmupStartLr;
  }
  return o.finalLr +
    0.5 * (o.baseLr - o.finalLr) * (1 + Math.cos((Math.PI * (it - w)) / (total - w)));
}

export function checkSchedule(o: WarmupCosineOptions): void {
  for (const k of ["epochs", "warmupEpochs", "itersPerEpoch"] as const) {
    if (!Number.isInteger(o[k]) || o[k] < 0) {
      throw new RangeError(
        `learning-rate schedule: ${k} must be a non-negative integer, got ${o[k]}`,
      );
    }
  }
  if (o.epochs < 1 || o.itersPerEpoch < 1) {
    throw new RangeError("learning-rate schedule: needs at least one epoch and one iteration");
  }
  if (o.warmupEpochs > o.epochs) {
    throw new RangeError(
      `learning-rate schedule: ${o.warmupEpochs} warm-up epochs exceed ${o.epochs} epochs`,
    );
  }
}

/** Every rate of a run, like DataDream's precomputed array. */
export function warmupCosineSchedule(o: WarmupCosineOptions): Float64Array {
  checkSchedule(o);
  const out = new Float64Array(o.epochs * o.itersPerEpoch);
  for (let i = 0; i < out.length; i++) out[i] = warmupCosineLr(i, o);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Dynamic loss scaling

export interface LossScalerOptions {
  initScale?: number;
  growthFactor?: number;
  backoffFactor?: number;
  growthInterval?: number;
}

/**
 * torch.amp.GradScaler's algorithm: the loss is multiplied by `scale` before backward so small
 * half-precision gradients do not flush to zero; before the update the gradients are divided
 * back. A step whose gradients hold an inf/NaN is skipped and the scale halves; after
 * `growthInterval` clean steps in a row it doubles.
 */
export class LossScaler {
  scale: number;
  readonly growthFactor: number;
  readonly backoffFactor: number;
  readonly growthInterval: number;
  /** Clean steps since the last change of scale. */
  growthTracker = 0;

  /** Defaults are GradScaler's. */
  constructor(opts: LossScalerOptions = {}) {
    this.scale = opts.initScale ?? 2 ** 16;
    this.growthFactor = opts.growthFactor ?? 2;
    this.backoffFactor = opts.backoffFactor ?? 0.5;
    this.growthInterval = opts.growthInterval ?? 2000;
  }

  /** loss * scale, a new tensor to call backward on. */
  scaleLoss(loss: Tensor): Tensor {
    return loss.mul(this.scale);
  }

  /**
   * Divides every gradient by the scale in place and reports whether all are finite. Gradients
   * are unscaled in f32 (the trainable tensors are f32 master weights).
   */
  unscale(params: readonly Tensor[]): boolean {
    const inv = 1 / this.scale;
    let finite = true;
    noGrad(() => {
      for (const p of params) {
        const g = ops.grad(p);
        if (g === null) continue;
        try {
          ops.mulScalar_(g, inv);
          if (finite) finite = scope(() => ops.all(ops.isfinite(g)).item() !== 0);
        } finally {
          g.dispose();
        }
      }
    });
    return finite;
  }

  /** Adjusts the scale after a step; `finite` is what `unscale` returned. */
  update(finite: boolean): void {
    if (!finite) {
      this.scale *= this.backoffFactor;
      this.growthTracker = 0;
      return;
    }
    this.growthTracker += 1;
    if (this.growthTracker === this.growthInterval) {
      this.scale *= this.growthFactor;
      this.growthTracker = 0;
    }
  }
}
