/**
 * Device-independent cases for every op of native/ops_spec.ts, generated from the spec: an op
 * whose arguments follow the table's naming conventions (x:T, a:T b:T, s:f64, dim:int, dims:int[],
 * shape:int[], dtype, device, gen, ...) gets its case from ARG_RULES alone; ops that need shaped or
 * related inputs (matmul, conv2d, sdpa, gather, ...) or a sequence of calls (autograd, AdamW) have
 * an entry in CUSTOM. `opCases` reports every op that has neither, so a new op cannot be missed.
 *
 * A case runs against a context that fixes the device and the float dtype of its inputs, so the
 * same case runs on the CPU in f32 (the reference), on CUDA in f32 and in f16. Float inputs lie on
 * a 1/64 grid in [-2, 2), exact in f16, so an f16 run differs from the f32 reference only by what
 * the op computes in f16, not by rounded inputs.
 */
import assert from "node:assert/strict";
import { OPS, type OpSpec } from "../native/ops_spec.ts";
import {
  type Device,
  enableGrad,
  fromHost,
  Generator,
  manualSeed,
  ops,
  type Tensor,
} from "../ffi/mod.ts";

export type FloatDType = "f32" | "f16";

export interface OpContext {
  readonly device: Device;
  readonly dtype: FloatDType;
  /**
   * A float tensor of values from `lo` (default -2) over `span` (default 4) on a grid of span/256,
   * seeded; every value is exact in f16.
   */
  float(shape: readonly number[], seed?: number, lo?: number, span?: number): Tensor;
  /** int64 values in [0, high). */
  index(shape: readonly number[], high: number, seed?: number): Tensor;
  /** A bool mask, about half true. */
  mask(shape: readonly number[], seed?: number): Tensor;
  /** A generator on this context's device (disposed with the context). */
  generator(seed: number): Generator;
}

/** What a case returns: its output tensors, or the number an op like `item` returns. */
export type OpResult = Tensor[] | number;

export interface OpCase {
  /** Unique: the op name, with a variant after a colon when an op has several cases. */
  name: string;
  op: string;
  run(ctx: OpContext): OpResult;
  /**
   * Draws random numbers: devices draw different streams, so such a case is checked by its
   * determinism and the range of its values (`check`), not against the CPU.
   */
  random?: { check(out: OpResult, ctx: OpContext): void };
  /** Why the case has no f16 run (omitted: it has one). */
  noF16?: string;
  /** Why the CPU cannot run the case in f16, while CUDA can. */
  noCpuF16?: string;
}

// ---------------------------------------------------------------------------------------------
// Inputs

/** Deterministic inputs: a linear congruential generator per (case, argument seed). */
function lcg(seed: number): () => number {
  let s = (seed * 2654435761 + 12345) >>> 0;
  return () => {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    return s >>> 8;
  };
}

function hashName(name: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

/** The context a case runs in; dispose() frees its generators. */
export function opContext(
  caseName: string,
  device: Device,
  dtype: FloatDType,
): OpContext & Disposable {
  const base = hashName(caseName);
  const gens: Generator[] = [];
  const numel = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);
  return {
    device,
    dtype,
    float(shape, seed = 0, lo = -2, span = 4) {
      const next = lcg(base + 7919 * seed);
      const data = Float32Array.from(
        { length: numel(shape) },
        () => lo + (next() % 256) * span / 256,
      );
      return ops.to(fromHost(data, shape, "f32"), dtype, device);
    },
    index(shape, high, seed = 0) {
      const next = lcg(base + 104729 * (seed + 1));
      const data = Array.from({ length: numel(shape) }, () => next() % high);
      return ops.to(fromHost(data, shape, "i64"), undefined, device);
    },
    mask(shape, seed = 0) {
      const next = lcg(base + 15485863 * (seed + 1));
      const data = Uint8Array.from({ length: numel(shape) }, () => next() & 1);
      return ops.to(fromHost(data, shape, "bool"), undefined, device);
    },
    generator(seed) {
      const g = new Generator(seed, device);
      gens.push(g);
      return g;
    },
    [Symbol.dispose]() {
      for (const g of gens) g.dispose();
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Calling a binding

type Binding = (...args: unknown[]) => unknown;
const BINDINGS = ops as unknown as Record<string, Binding | undefined>;

/** The generator's naming rule (native/gen_ops.ts): snake_case op, camelCase export. */
export function bindingName(op: string): string {
  return op.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());
}

/** Calls op with args; an in-place op (void) answers with its first argument, now changed. */
function call(op: string, args: unknown[]): OpResult {
  const fn = BINDINGS[bindingName(op)];
  if (!fn) throw new Error(`no binding ${bindingName(op)} for op ${op}`);
  const ret = fn(...args);
  if (ret === undefined) return [args[0] as Tensor];
  if (typeof ret === "number") return ret;
  return Array.isArray(ret) ? ret : [ret as Tensor];
}

// ---------------------------------------------------------------------------------------------
// Generated cases: one value per argument, by the argument's name and kind

const S = [2, 3, 4];

const ARG_RULES: Record<string, (c: OpContext) => unknown> = {
  "x:T": (c) => c.float(S, 0),
  "a:T": (c) => c.float(S, 1),
  "b:T": (c) => c.float(S, 2),
  "y:T": (c) => c.float(S, 3),
  "cond:T": (c) => c.mask(S),
  "mask:T": (c) => c.mask(S),
  "xs:T[]": (c) => [c.float(S, 1), c.float(S, 2), c.float(S, 3)],
  // a binary grid value: exact in f16, and some inputs equal it (comparisons see ties)
  "s:f64": () => 0.75,
  "value:f64": () => 0.5,
  "alpha:f64": () => 0.5,
  "weight:f64": () => 0.25,
  "exponent:f64": () => 2,
  "min:f64?": () => -0.5,
  "max:f64?": () => 1.25,
  "tanh:bool": () => false,
  "keepdim:bool": () => true,
  "dim:int": () => 1,
  "diagonal:int": () => 0,
  "dims:int[]": () => [1],
  "shape:int[]": () => S,
  "dtype:dtype": (c) => c.dtype,
  "device:device": (c) => c.device,
  "gen:gen": (c) => c.generator(11),
};

function generated(spec: OpSpec): OpCase | null {
  const tokens = spec.args.split(",").map((a) => a.trim()).filter(Boolean);
  if (!tokens.every((t) => t in ARG_RULES)) return null;
  return {
    name: spec.name,
    op: spec.name,
    run: (c) => call(spec.name, tokens.map((t) => ARG_RULES[t](c))),
  };
}

// ---------------------------------------------------------------------------------------------
// Cases written out: shaped inputs, several variants, random draws, sequences of calls

function moments(out: OpResult): { mean: number; std: number; min: number; max: number } {
  const v = (out as Tensor[])[0].toFloat64();
  let sum = 0, sq = 0, min = Infinity, max = -Infinity;
  for (const x of v) {
    sum += x;
    sq += x * x;
    min = Math.min(min, x);
    max = Math.max(max, x);
  }
  const mean = sum / v.length;
  return { mean, std: Math.sqrt(sq / v.length - mean * mean), min, max };
}

const R = [64, 64];

type Custom = (spec: OpSpec) => OpCase[];
const simple =
  (variant: string, args: (c: OpContext) => unknown[], extra: Partial<OpCase> = {}) =>
  (spec: OpSpec): OpCase => ({
    name: variant ? `${spec.name}: ${variant}` : spec.name,
    op: spec.name,
    run: (c) => call(spec.name, args(c)),
    ...extra,
  });
const cases = (...makers: ((s: OpSpec) => OpCase)[]): Custom => (spec) =>
  makers.map((m) => m(spec));

const CUSTOM: Record<string, Custom> = {
  randn: cases(simple("", (c) => [R, c.dtype, c.device, c.generator(3)], {
    random: {
      check(out) {
        const m = moments(out);
        assert.ok(
          Math.abs(m.mean) < 0.1 && Math.abs(m.std - 1) < 0.1,
          `randn moments ${JSON.stringify(m)}`,
        );
      },
    },
  })),
  rand: cases(simple("", (c) => [R, c.dtype, c.device, c.generator(3)], {
    random: {
      check(out) {
        const m = moments(out);
        assert.ok(
          m.min >= 0 && m.max <= 1 && Math.abs(m.mean - 0.5) < 0.05,
          `rand ${JSON.stringify(m)}`,
        );
      },
    },
  })),
  randint: cases(simple("", (c) => [2, 9, R, undefined, c.device, c.generator(3)], {
    random: {
      check(out) {
        const t = (out as Tensor[])[0];
        assert.equal(t.dtype, "i64");
        const m = moments(out);
        assert.ok(
          m.min >= 2 && m.max <= 8 && Math.abs(m.mean - 5) < 0.3,
          `randint ${JSON.stringify(m)}`,
        );
      },
    },
  })),
  dropout: cases(
    simple("eval", (c) => [c.float(S), 0.5, false]),
    simple("train", (c) => {
      manualSeed(5);
      return [c.float(R, 0, 0.25), 0.5, true];
    }, {
      random: {
        check(out, c) {
          // kept values are doubled, dropped ones are 0; about half are dropped
          const got = (out as Tensor[])[0].toFloat64();
          const x = c.float(R, 0, 0.25).toFloat64();
          let zeros = 0;
          got.forEach((g, i) => {
            if (g === 0) zeros++;
            else assert.ok(Math.abs(g - 2 * x[i]) <= 1e-2 * g, `dropout kept ${x[i]} as ${g}`);
          });
          assert.ok(Math.abs(zeros / got.length - 0.5) < 0.05, `dropout dropped ${zeros}`);
        },
      },
    }),
  ),
  arange: cases(simple("", (c) => [-1, 3, 0.25, c.dtype, c.device])),
  linspace: cases(simple("", (c) => [-1, 1, 9, c.dtype, c.device])),
  gelu: cases(
    simple("exact", (c) => [c.float(S), false]),
    simple("tanh", (c) => [c.float(S), true]),
  ),
  log: cases(simple("", (c) => [c.float(S, 0, 0.25)])),
  sqrt: cases(simple("", (c) => [c.float(S, 0, 0.25)])),
  rsqrt: cases(simple("", (c) => [c.float(S, 0, 0.25)])),
  reciprocal: cases(simple("", (c) => [c.float(S, 0, 0.25)])),
  pow: cases(simple("", (c) => [c.float(S, 0, 0.25), c.float(S, 1)])),
  pow_scalar: cases(
    simple("square", (c) => [c.float(S), 2]),
    simple("root", (c) => [c.float(S, 0, 0.25), 0.5]),
  ),
  div: cases(simple("", (c) => [c.float(S, 1), c.float(S, 2, 0.25)])),
  matmul: cases(
    simple("batched", (c) => [c.float([2, 3, 4], 1), c.float([4, 5], 2)]),
    simple("vector", (c) => [c.float([3, 4], 1), c.float([4], 2)]),
  ),
  mm: cases(simple("", (c) => [c.float([3, 4], 1), c.float([4, 5], 2)])),
  bmm: cases(simple("", (c) => [c.float([2, 3, 4], 1), c.float([2, 4, 5], 2)])),
  baddbmm: cases(
    simple("", (c) => [c.float([2, 3, 5]), c.float([2, 3, 4], 1), c.float([2, 4, 5], 2), 0.5, 1.5]),
  ),
  addmm: cases(
    simple("", (c) => [c.float([3, 5]), c.float([3, 4], 1), c.float([4, 5], 2), 0.5, 1.5]),
  ),
  linear: cases(
    simple("bias", (c) => [c.float([2, 3, 4]), c.float([5, 4], 1), c.float([5], 2)]),
    simple("no bias", (c) => [c.float([2, 3, 4]), c.float([5, 4], 1), null]),
  ),
  conv2d: cases(
    simple(
      "3x3 groups 2",
      (
        c,
      ) => [c.float([2, 4, 6, 6]), c.float([6, 2, 3, 3], 1), c.float([6], 2), [1, 1], [1, 1], [
        1,
        1,
      ], 2],
    ),
    simple(
      "stride 2",
      (c) => [c.float([1, 3, 7, 7]), c.float([4, 3, 3, 3], 1), null, [2, 2], [1, 1], [1, 1], 1],
    ),
  ),
  sdpa: cases(
    simple(
      "cross",
      (
        c,
      ) => [
        c.float([2, 2, 5, 8]),
        c.float([2, 2, 6, 8], 1),
        c.float([2, 2, 6, 8], 2),
        null,
        0,
        false,
        null,
      ],
    ),
    simple(
      "causal, scaled",
      (
        c,
      ) => [
        c.float([1, 2, 6, 8]),
        c.float([1, 2, 6, 8], 1),
        c.float([1, 2, 6, 8], 2),
        null,
        0,
        true,
        0.25,
      ],
    ),
    simple(
      "bool mask",
      (
        c,
      ) => [
        c.float([1, 2, 5, 8]),
        c.float([1, 2, 6, 8], 1),
        c.float([1, 2, 6, 8], 2),
        keysMask(c),
        0,
        false,
        null,
      ],
    ),
  ),
  group_norm: cases(
    simple("", (c) => [c.float([2, 4, 3, 3]), 2, c.float([4], 1), c.float([4], 2), 1e-5]),
  ),
  layer_norm: cases(
    simple("", (c) => [c.float([2, 3, 4]), [4], c.float([4], 1), c.float([4], 2), 1e-5]),
  ),
  embedding: cases(simple("", (c) => [c.float([10, 4]), c.index([2, 3], 10)])),
  cross_entropy: cases(
    simple("mean, smoothed", (c) => [c.float([5, 4]), c.index([5], 4), 1, 0.1]),
    simple("none", (c) => [c.float([5, 4]), c.index([5], 4), 0, 0]),
  ),
  mse_loss: cases(simple("", (c) => [c.float(S, 1), c.float(S, 2), 1])),
  reshape: cases(simple("", (c) => [c.float(S), [4, 6]])),
  expand: cases(simple("", (c) => [c.float([2, 1, 4]), [2, 3, 4]])),
  permute: cases(simple("", (c) => [c.float(S), [2, 0, 1]])),
  transpose: cases(simple("", (c) => [c.float(S), 0, 2])),
  flatten: cases(simple("", (c) => [c.float(S), 1, 2])),
  repeat: cases(simple("", (c) => [c.float(S), [2, 1, 2]])),
  slice: cases(simple("", (c) => [c.float(S), 2, 0, 4, 2])),
  narrow: cases(simple("", (c) => [c.float(S), 1, 1, 2])),
  select: cases(simple("", (c) => [c.float(S), 1, 2])),
  index_select: cases(simple("", (c) => [c.float(S), 1, c.index([4], 3)])),
  gather: cases(simple("", (c) => [c.float(S), 2, c.index([2, 3, 2], 4)])),
  chunk: cases(simple("", (c) => [c.float(S), 2, 2])),
  split: cases(simple("", (c) => [c.float(S), [1, 2], 1])),
  pad: cases(
    simple("constant", (c) => [c.float([1, 2, 4, 5]), [1, 2, 0, 1], 0, 0.5]),
    simple("reflect", (c) => [c.float([1, 2, 4, 5]), [1, 2, 2, 1], 1, 0]),
  ),
  upsample_nearest2d: cases(simple("", (c) => [c.float([1, 2, 4, 5]), 8, 10])),
  interpolate: cases(
    simple("nearest", (c) => [c.float([1, 2, 4, 5]), 7, 9, 0, false, false]),
    simple("bilinear", (c) => [c.float([1, 2, 4, 5]), 7, 9, 1, false, false]),
    simple("bicubic, corners", (c) => [c.float([1, 2, 4, 5]), 7, 9, 2, true, false]),
    simple("bilinear antialias", (c) => [c.float([1, 2, 8, 10]), 3, 4, 1, false, true], {
      noCpuF16: "libtorch's CPU antialias kernel has no f16 (CUDA's has)",
    }),
  ),
  argmax: cases(simple("", (c) => [c.float(S), 1, false])),
  variance: cases(simple("", (c) => [c.float(S), [1], 1, false])),
  norm: cases(simple("", (c) => [c.float(S), 2, [1], false])),
  to: cases(
    simple("f64", (c) => [c.float(S), "f64", c.device]),
    simple("to cpu", (c) => [c.float(S), undefined, "cpu"]),
  ),
  item: cases(simple("", (c) => [c.float([])])),
  copy_: cases(simple("", (c) => [c.float(S, 1), c.float(S, 2)])),
  add_: cases(simple("", (c) => [c.float(S, 1), c.float(S, 2), 0.5])),
  // fused blocks (native/src/fused.cpp); weights in [-0.5, 0.5), so attention logits stay small
  attention: cases(
    simple("self", (c) => {
      const w = (shape: number[], seed: number) => c.float(shape, seed, -0.5, 1);
      return [
        c.float([2, 6, 8]),
        null,
        w([8, 8], 1),
        w([8, 8], 2),
        w([8, 8], 3),
        w([8, 8], 4),
        null,
        2,
        [],
        [],
        [],
        null,
      ];
    }),
    simple("cross, two adapters, bias, residual", (c) => {
      const w = (shape: number[], seed: number) => c.float(shape, seed, -0.5, 1);
      const tokens = [c.float([2, 3, 12], 20), c.float([2, 4, 12], 21)];
      const ipWeights = [w([8, 12], 22), w([8, 12], 23), w([8, 12], 24), w([8, 12], 25)];
      const scales = [c.float([2, 1, 1], 26, 0, 1), c.float([2, 1, 1], 27, 0, 1)];
      return [
        c.float([2, 6, 8]),
        c.float([2, 5, 12], 5),
        w([8, 8], 1),
        w([8, 12], 2),
        w([8, 12], 3),
        w([8, 8], 4),
        c.float([8], 6),
        2,
        tokens,
        ipWeights,
        scales,
        c.float([2, 6, 8], 7),
      ];
    }),
  ),
  geglu_feed_forward: cases(
    simple("bias, residual", (c) => {
      const w = (shape: number[], seed: number) => c.float(shape, seed, -0.5, 1);
      return [
        c.float(S),
        w([12, 4], 1),
        c.float([12], 2),
        w([4, 6], 3),
        c.float([4], 4),
        c.float(S, 5),
      ];
    }),
    simple(
      "bare",
      (
        c,
      ) => [
        c.float(S),
        c.float([12, 4], 1, -0.5, 1),
        null,
        c.float([4, 6], 3, -0.5, 1),
        null,
        null,
      ],
    ),
  ),
  resnet_block: cases(
    simple("time embedding, shortcut, silu", (c) => {
      const w = (shape: number[], seed: number) => c.float(shape, seed, -0.5, 1);
      return [
        c.float([2, 4, 5, 5]),
        c.float([2, 6], 1),
        c.float([4], 2),
        c.float([4], 3),
        w([6, 4, 3, 3], 4),
        c.float([6], 5),
        w([6, 6], 6),
        c.float([6], 7),
        c.float([6], 8),
        c.float([6], 9),
        w([6, 6, 3, 3], 10),
        c.float([6], 11),
        w([6, 4, 1, 1], 12),
        c.float([6], 13),
        2,
        1e-5,
        0,
        1,
      ];
    }),
    simple("plain, gelu, output scale", (c) => {
      const w = (shape: number[], seed: number) => c.float(shape, seed, -0.5, 1);
      return [
        c.float([1, 4, 5, 5]),
        null,
        c.float([4], 2),
        c.float([4], 3),
        w([4, 4, 3, 3], 4),
        null,
        null,
        null,
        c.float([4], 8),
        c.float([4], 9),
        w([4, 4, 3, 3], 10),
        null,
        null,
        null,
        2,
        1e-5,
        1,
        2,
      ];
    }),
  ),
  image_to_tokens: cases(simple("", (c) => [c.float([2, 3, 4, 5])])),
  tokens_to_image: cases(simple("", (c) => [c.float([2, 20, 3]), 4, 5])),
  // autograd state, one sequence of calls: requires_grad_, backward, grad, zero_grad
  ...Object.fromEntries(
    ["requires_grad_", "backward", "grad", "zero_grad"].map((name) => [name, cases(autogradCase)]),
  ),
  adamw_step: cases((spec) => ({
    name: spec.name,
    op: spec.name,
    run(c) {
      const p = c.float([3, 4]), g = c.float([3, 4], 1);
      const m = ops.zerosLike(p), v = ops.zerosLike(p);
      for (let step = 1; step <= 3; step++) {
        ops.adamwStep(p, g, m, v, step, 1e-2, 0.9, 0.999, 1e-8, 0.01);
      }
      return [p, m, v];
    },
    noF16: "the trainer keeps AdamW state in float32 (f16 moments underflow at eps 1e-8)",
  })),
};

/** [1, 1, 5, 6]: every query sees some keys (a fully masked row is NaN or 0 by backend). */
function keysMask(c: OpContext): Tensor {
  const data = Uint8Array.from(
    { length: 30 },
    (_, i) => (i % 6 + Math.floor(i / 6)) % 3 === 0 ? 0 : 1,
  );
  return ops.to(fromHost(data, [1, 1, 5, 6], "bool"), undefined, c.device);
}

function autogradCase(spec: OpSpec): OpCase {
  return {
    name: `${spec.name}: sum(silu(x @ w) * y)`,
    op: spec.name,
    run(c) {
      const x = c.float([3, 4]), w = c.float([4, 5], 1), y = c.float([3, 5], 2);
      ops.requiresGrad_(x, true);
      ops.requiresGrad_(w, true);
      const loss = enableGrad(() => ops.sumAll(ops.mul(ops.silu(ops.matmul(x, w)), y)));
      ops.backward(loss, null);
      const gx = ops.grad(x), gw = ops.grad(w);
      assert.ok(gx && gw, "gradients after backward");
      ops.zeroGrad(x);
      assert.equal(ops.grad(x), null, "zero_grad drops the gradient");
      return [ops.detach(loss), gx, gw];
    },
  };
}

/** Every op's cases; `missing`: the ops that got none (the coverage test fails on them). */
export function opCases(specs: readonly OpSpec[] = OPS): { cases: OpCase[]; missing: string[] } {
  const out: OpCase[] = [], missing: string[] = [];
  for (const spec of specs) {
    const custom = CUSTOM[spec.name];
    const list = custom ? custom(spec) : [generated(spec)].filter((c): c is OpCase => c !== null);
    if (list.length === 0) missing.push(spec.name);
    out.push(...list);
  }
  return { cases: out, missing };
}

/** Ops that CUSTOM covers but the spec no longer has (stale entries). */
export function staleCustomCases(specs: readonly OpSpec[] = OPS): string[] {
  const names = new Set(specs.map((s) => s.name));
  return Object.keys(CUSTOM).filter((n) => !names.has(n));
}
