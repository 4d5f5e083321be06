/**
 * Building blocks for models. A Module owns its weight tensors (outside any memory scope) and
 * frees them on dispose; forward passes create only scoped temporaries. Build models through
 * `build()` so that a load that fails half-way frees what it had already read.
 */
import { keep, ops, type Tensor } from "../ffi/mod.ts";
import type { Init, WeightSource } from "./weights.ts";

export abstract class Module implements Disposable {
  readonly #params = new Map<string, Tensor>();
  readonly #children = new Map<string, Module>();

  /** Loads and owns one weight tensor. */
  protected param(w: WeightSource, name: string, shape: readonly number[], init?: Init): Tensor {
    const t = keep(w.get(name, shape, init));
    loading.at(-1)?.push(t);
    this.#params.set(name, t);
    return t;
  }

  /** Registers a child module under `name` (mirrors the state-dict key). */
  protected child<M extends Module>(name: string, m: M): M {
    this.#children.set(name, m);
    return m;
  }

  /** Every weight, keyed by its state-dict name relative to this module. */
  namedParameters(prefix = ""): Map<string, Tensor> {
    const out = new Map<string, Tensor>();
    for (const [k, t] of this.#params) out.set(prefix + k, t);
    for (const [k, m] of this.#children) {
      for (const [kk, t] of m.namedParameters(`${prefix}${k}.`)) out.set(kk, t);
    }
    return out;
  }

  dispose(): void {
    for (const t of this.#params.values()) t.dispose();
    for (const m of this.#children.values()) m.dispose();
    this.#params.clear();
    this.#children.clear();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** Weights loaded by the `build()` calls in progress, innermost last. */
const loading: Tensor[][] = [];

/** Constructs a module; if construction throws, every weight it had loaded so far is freed. */
export function build<M extends Module>(construct: () => M): M {
  const loaded: Tensor[] = [];
  loading.push(loaded);
  try {
    return construct();
  } catch (e) {
    for (const t of loaded) t.dispose();
    throw e;
  } finally {
    loading.pop();
    loading.at(-1)?.push(...loaded);
  }
}

/**
 * Builds a model from `source` and checks that it read every key the source holds (a checkpoint
 * with extra keys is a different model). If construction or the check fails, every weight loaded
 * so far is freed before the error propagates: a bad checkpoint leaks nothing.
 */
export function loadModule<M extends Module>(
  source: WeightSource,
  construct: (w: WeightSource) => M,
  opts: { ignoreUnused?: RegExp; checkUnused?: boolean } = {},
): M {
  const m = build(() => construct(source));
  if (opts.checkUnused === false) return m;
  try {
    source.assertAllUsed(opts.ignoreUnused);
  } catch (e) {
    m.dispose();
    throw e;
  }
  return m;
}

export class Linear extends Module {
  readonly weight: Tensor;
  readonly bias: Tensor | null;

  constructor(w: WeightSource, inFeatures: number, outFeatures: number, bias = true) {
    super();
    this.weight = this.param(w, "weight", [outFeatures, inFeatures]);
    this.bias = bias ? this.param(w, "bias", [outFeatures], "zeros") : null;
  }

  forward(x: Tensor): Tensor {
    return ops.linear(x, this.weight, this.bias);
  }
}

export interface Conv2dOptions {
  stride?: number;
  padding?: number;
  bias?: boolean;
}

export class Conv2d extends Module {
  readonly weight: Tensor;
  readonly bias: Tensor | null;
  readonly stride: number;
  readonly padding: number;

  constructor(
    w: WeightSource,
    cin: number,
    cout: number,
    kernel: number,
    opts: Conv2dOptions = {},
  ) {
    super();
    this.weight = this.param(w, "weight", [cout, cin, kernel, kernel]);
    this.bias = opts.bias === false ? null : this.param(w, "bias", [cout], "zeros");
    this.stride = opts.stride ?? 1;
    this.padding = opts.padding ?? 0;
  }

  forward(x: Tensor): Tensor {
    const s = this.stride, p = this.padding;
    return ops.conv2d(x, this.weight, this.bias, [s, s], [p, p], [1, 1], 1);
  }
}

export class LayerNorm extends Module {
  readonly weight: Tensor;
  readonly bias: Tensor;

  constructor(w: WeightSource, readonly dim: number, readonly eps = 1e-5) {
    super();
    this.weight = this.param(w, "weight", [dim], "ones");
    this.bias = this.param(w, "bias", [dim], "zeros");
  }

  forward(x: Tensor): Tensor {
    return ops.layerNorm(x, [this.dim], this.weight, this.bias, this.eps);
  }
}

export class GroupNorm extends Module {
  readonly weight: Tensor;
  readonly bias: Tensor;

  constructor(w: WeightSource, readonly groups: number, channels: number, readonly eps = 1e-5) {
    super();
    this.weight = this.param(w, "weight", [channels], "ones");
    this.bias = this.param(w, "bias", [channels], "zeros");
  }

  forward(x: Tensor): Tensor {
    return ops.groupNorm(x, this.groups, this.weight, this.bias, this.eps);
  }
}

export class Embedding extends Module {
  readonly weight: Tensor;

  constructor(w: WeightSource, count: number, dim: number) {
    super();
    this.weight = this.param(w, "weight", [count, dim]);
  }

  forward(ids: Tensor): Tensor {
    return ops.embedding(this.weight, ids);
  }
}
