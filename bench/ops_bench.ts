/**
 * Per-op cost of TS -> FFI -> libtorch against the same op from Python PyTorch eager, same shapes,
 * same thread count, timed in one run. Small ops measure call overhead; the two large ones show
 * that both sides reach the same kernels.
 */
import { Generator, noGrad, ops, scope, type Tensor } from "../ffi/mod.ts";
import { type BenchResult, medianSeconds, runPythonReference } from "./harness.ts";

function cases(): Record<string, { iters: number; fn: () => Tensor }> {
  using g = new Generator(0);
  const r = (shape: number[]) => ops.randn(shape, "f32", "cpu", g);
  const a = r([2, 3]), b = r([2, 3]), m8 = r([8, 8]), x64 = r([1, 64]), w64 = r([64, 64]);
  const b64 = r([64]), s = r([4, 16]), img = r([1, 4, 8, 8]), k = r([4, 4, 3, 3]);
  const m256 = r([256, 256]), x32 = r([1, 64, 32, 32]), k64 = r([64, 64, 3, 3]);
  const small = 20000;
  return {
    add_2x3: { iters: small, fn: () => ops.add(a, b) },
    mul_scalar_2x3: { iters: small, fn: () => ops.mulScalar(a, 0.5) },
    matmul_8x8: { iters: small, fn: () => ops.matmul(m8, m8) },
    linear_1x64: { iters: small, fn: () => ops.linear(x64, w64, b64) },
    softmax_4x16: { iters: small, fn: () => ops.softmax(s, -1) },
    cat_2x3: { iters: small, fn: () => ops.cat([a, b], 0) },
    reshape_permute_2x3: {
      iters: small,
      fn: () => {
        using t = ops.reshape(a, [3, 2]);
        return ops.permute(t, [1, 0]);
      },
    },
    conv2d_1x4x8x8: { iters: 5000, fn: () => ops.conv2d(img, k, null, [1, 1], [1, 1], [1, 1], 1) },
    matmul_256x256: { iters: 200, fn: () => ops.matmul(m256, m256) },
    conv2d_1x64x32x32: {
      iters: 50,
      fn: () => ops.conv2d(x32, k64, null, [1, 1], [1, 1], [1, 1], 1),
    },
  };
}

/**
 * Alternating rounds (Python, then ours), each side's best round kept: the machines these run on
 * are shared, and a neighbour's burst during one side's turn would otherwise decide the ratio.
 */
const ROUNDS = 3;

export async function benchOps(): Promise<BenchResult[]> {
  const table = cases();
  const plan = Object.fromEntries(Object.entries(table).map(([k, v]) => [k, v.iters]));
  const best = (a: number | undefined, b: number) => (a === undefined ? b : Math.min(a, b));
  const ours: Record<string, number> = {}, reference: Record<string, number> = {};
  for (let round = 0; round < ROUNDS; round++) {
    const ref = await runPythonReference("bench/reference/ops_bench.py", [JSON.stringify(plan)]);
    for (const [k, v] of Object.entries(ref)) reference[k] = best(reference[k], v);
    // Inside a scope, as model code runs: results are freed by dispose() right away, like
    // Python's refcounting frees them, and no GC finalizer is registered per tensor.
    noGrad(() =>
      scope(() => {
        for (const [name, { iters, fn }] of Object.entries(table)) {
          ours[name] = best(ours[name], medianSeconds(iters, () => fn().dispose()));
        }
      })
    );
  }
  return Object.keys(table).map((name) => ({
    bench: `op_${name}`,
    ours_s: ours[name],
    reference_s: reference[name],
  }));
}
