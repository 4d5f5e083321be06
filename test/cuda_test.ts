/**
 * CUDA: every code path that only runs on a GPU, checked against the CPU. The GPU tests run
 * whenever libtorch sees a CUDA device; without one each is listed as ignored with the reason in
 * its name. The parts that need no GPU run everywhere: the op cases cover the whole spec and their
 * f16 runs meet the f16 tolerance on the CPU, the CUDA-graph runner replays like eager and falls
 * back with one warning, and `bench/gpu.sh` refuses at once on a machine without a GPU.
 *
 * Tolerances (|got - want| <= tol * max(1, |want|) unless said otherwise; TF32 off for f32):
 *   ops        f32 1e-5, f16 5e-3 (f16 runs against the f32 CPU reference on f16-exact inputs)
 *   models     f32 1e-4, f16 3e-2 of the output scale (tiny UNet, VAE, CLIP text and vision)
 *   sample     f32: every pixel within 1 of 255; f16: within 8, mean difference below 1
 *   graphs     a replayed UNet call vs the eager one: f32 1e-6, f16 1e-3; the final latents of
 *              a sample with graphs vs without: 1e-2 (steps carry an ulp's difference forward)
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { OPS } from "../native/ops_spec.ts";
import {
  type Device,
  fromHost,
  Generator,
  keep,
  manualSeed,
  memory,
  noGrad,
  ops,
  runtimeInfo,
  SafetensorsFile,
  saveSafetensors,
  scope,
  type Tensor,
  TorchError,
} from "../ffi/mod.ts";
import {
  allowTf32,
  cudaDevices,
  cudaEmptyCache,
  CudaGraph,
  cudaMemoryStats,
  cudaResetPeakMemoryStats,
  cudaSetSyncDebugMode,
  cudaSynchronize,
  sdpaBackend,
  setAllowTf32,
} from "../ffi/runtime.ts";
import { type CallGraph, GraphedCall } from "../ffi/graphed.ts";
import { prepareSample, sampleImage } from "../core/sample.ts";
import { initialNoise, sampleLatents } from "../core/sampling.ts";
import { type Guidance, registry, type Sampler } from "../core/plugins.ts";
import { registerDefaults } from "../plugins/defaults.ts";
import { ClipLoraClassifier } from "../plugins/classifiers/clip_lora.ts";
import { loadClipModel, loadClipText, loadClipVision } from "../plugins/clip/model.ts";
import { ClipTokenizer } from "../plugins/clip/tokenizer.ts";
import { Sd15Backbone } from "../plugins/sd15/backbone.ts";
import { IpAdapter, TINY_IP_PLUS } from "../plugins/sd15/ip_adapter.ts";
import { attentionKernels, UNet2DConditionModel } from "../plugins/sd15/unet.ts";
import {
  parseUNetConfig,
  SD15_UNET_CONFIG_JSON,
  TINY_UNET_CONFIG_JSON,
} from "../plugins/sd15/unet_config.ts";
import { AutoencoderKL } from "../plugins/sd15/vae.ts";
import { TINY_VAE_CONFIG } from "../plugins/sd15/vae_config.ts";
import {
  type FloatDType,
  type OpCase,
  opCases,
  opContext,
  type OpResult,
  staleCustomCases,
} from "./op_cases.ts";
import { assertClose, noiseImage } from "./util.ts";

registerDefaults();

const INFO = runtimeInfo();
const CUDA = INFO.cuda_available;
const WHY_NOT = INFO.built_with_cuda
  ? "libtorch sees no CUDA device"
  : "this libtorch build has no CUDA";
if (!CUDA) console.log(`cuda_test: the GPU tests are skipped: ${WHY_NOT}`);
const GPU: Device = "cuda:0";

/** A test that needs a GPU: ignored, with the reason in its name, when there is none. */
function gpuTest(name: string, fn: () => void | Promise<void>): void {
  Deno.test({
    name: CUDA ? `cuda: ${name}` : `cuda: ${name} [skipped: ${WHY_NOT}]`,
    ignore: !CUDA,
    fn,
  });
}

const OP_TOL: Record<FloatDType, number> = { f32: 1e-5, f16: 5e-3 };
const MODEL_TOL: Record<FloatDType, number> = { f32: 1e-4, f16: 3e-2 };
const REPLAY_TOL: Record<FloatDType, number> = { f32: 1e-6, f16: 1e-3 };
const SAMPLE_REPLAY_TOL = 1e-2;

/** fn with float32 kept in full precision on CUDA (no TF32), restored afterwards. */
function withoutTf32<T>(fn: () => T): T {
  const before = allowTf32();
  setAllowTf32({ matmul: false, conv: false });
  try {
    return fn();
  } finally {
    setAllowTf32(before);
  }
}

/** Runs fn and checks that this isolate holds as many tensor handles after as before. */
function leakFree<T>(label: string, fn: () => T): T {
  const before = memory().handles;
  const out = fn();
  assert.equal(memory().handles, before, `${label}: tensor handles leaked`);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Comparing op results

const INTEGRAL = new Set(["u8", "i8", "i16", "i32", "i64", "bool"]);

function valueError(got: number, want: number): number {
  if (Number.isNaN(want)) return Number.isNaN(got) ? 0 : Infinity;
  if (!Number.isFinite(want)) return got === want ? 0 : Infinity;
  if (!Number.isFinite(got)) return Infinity;
  return Math.abs(got - want) / Math.max(1, Math.abs(want));
}

/**
 * The worst error of `got` against the reference `want`. With `halfOf`, got is the f16 run of a
 * case whose reference ran in f32: its float outputs must then be f16 where the reference's are
 * f32; otherwise dtypes must be equal.
 */
function worstError(label: string, got: OpResult, want: OpResult, halfOf = false): number {
  if (typeof want === "number") {
    assert.equal(typeof got, "number", `${label}: a number`);
    return valueError(got as number, want);
  }
  assert.ok(Array.isArray(got), `${label}: tensors`);
  assert.equal(got.length, want.length, `${label}: number of outputs`);
  let worst = 0;
  want.forEach((w, i) => {
    const g = got[i];
    const what = `${label}, output ${i}`;
    assert.deepEqual([...g.shape], [...w.shape], `${what}: shape`);
    assert.equal(g.dtype, halfOf && w.dtype === "f32" ? "f16" : w.dtype, `${what}: dtype`);
    const gv = g.toFloat64(), wv = w.toFloat64();
    for (let k = 0; k < wv.length; k++) {
      const e = INTEGRAL.has(w.dtype) ? (gv[k] === wv[k] ? 0 : Infinity) : valueError(gv[k], wv[k]);
      if (e > worst) worst = e;
      if (e === Infinity) {
        assert.fail(`${what}: element ${k} is ${gv[k]}, the reference ${wv[k]}`);
      }
    }
  });
  return worst;
}

/** The case's outputs (inputs and intermediates are freed). */
function runCase(c: OpCase, device: Device, dtype: FloatDType): OpResult {
  return scope(() => {
    using ctx = opContext(c.name, device, dtype);
    return c.run(ctx);
  });
}

function disposeResult(r: OpResult): void {
  if (typeof r !== "number") { for (const t of r) t.dispose(); }
}

/** A random case: the same seed draws the same values on `device`, and they pass the check. */
function checkRandom(c: OpCase, device: Device, dtype: FloatDType): void {
  const a = runCase(c, device, dtype), b = runCase(c, device, dtype);
  try {
    assert.equal(worstError(`${c.name} (${device} ${dtype}, drawn twice)`, b, a), 0);
    scope(() => {
      using ctx = opContext(c.name, device, dtype);
      c.random!.check(a, ctx);
    });
  } finally {
    disposeResult(a);
    disposeResult(b);
  }
}

// ---------------------------------------------------------------------------------------------
// Op cases: coverage and the f16 tolerance, on the CPU

Deno.test("cuda cases: every op in native/ops_spec.ts has a device case", () => {
  const { cases, missing } = opCases();
  assert.deepEqual(missing, [], "ops without a case: add an ARG_RULES entry or a CUSTOM case");
  assert.deepEqual(staleCustomCases(), [], "cases for ops the spec no longer has");
  const names = cases.map((c) => c.name);
  assert.equal(new Set(names).size, names.length, "case names are unique");
  assert.deepEqual(
    OPS.map((o) => o.name).filter((n) => !cases.some((c) => c.op === n)),
    [],
    "every op appears in a case",
  );
});

Deno.test("cuda cases: each runs on the CPU, and its f16 run meets the f16 tolerance", () => {
  const { cases } = opCases();
  let worst = 0, worstName = "";
  let compared = 0;
  leakFree("op cases", () => {
    for (const c of cases) {
      if (c.random) {
        checkRandom(c, "cpu", "f32");
        continue;
      }
      const want = runCase(c, "cpu", "f32");
      try {
        if (c.noF16 || c.noCpuF16) continue;
        const got = runCase(c, "cpu", "f16");
        try {
          const e = worstError(`${c.name} (cpu f16)`, got, want, true);
          assert.ok(e <= OP_TOL.f16, `${c.name}: f16 error ${e} > ${OP_TOL.f16}`);
          compared++;
          if (e > worst) [worst, worstName] = [e, c.name];
        } finally {
          disposeResult(got);
        }
      } finally {
        disposeResult(want);
      }
    }
  });
  console.log(
    `  ${compared} cases in f16 on the CPU; worst ${worst.toExponential(2)} (${worstName})`,
  );
});

gpuTest("every op matches the CPU in f32 and f16", () => {
  const { cases } = opCases();
  const worst: Record<FloatDType, [number, string]> = { f32: [0, ""], f16: [0, ""] };
  withoutTf32(() =>
    leakFree("op cases", () => {
      for (const c of cases) {
        for (const dtype of ["f32", "f16"] as const) {
          if (dtype === "f16" && c.noF16) continue;
          if (c.random) {
            checkRandom(c, GPU, dtype);
            continue;
          }
          const want = runCase(c, "cpu", "f32");
          const got = runCase(c, GPU, dtype);
          try {
            const e = worstError(`${c.name} (cuda ${dtype})`, got, want, dtype === "f16");
            assert.ok(e <= OP_TOL[dtype], `${c.name}: cuda ${dtype} error ${e} > ${OP_TOL[dtype]}`);
            if (e > worst[dtype][0]) worst[dtype] = [e, c.name];
          } finally {
            disposeResult(got);
            disposeResult(want);
          }
        }
      }
    })
  );
  for (const d of ["f32", "f16"] as const) {
    console.log(`  worst ${d} error ${worst[d][0].toExponential(2)} (${worst[d][1]})`);
  }
});

// ---------------------------------------------------------------------------------------------
// The CUDA-graph runner, with a stand-in graph on the CPU

/**
 * A graph that replays by running the captured function again and writing its result into the
 * captured output, which is what a CUDA graph's replay does to the output's memory.
 */
class RerunGraph implements CallGraph {
  static made = 0;
  static captures = 0;
  #fn: (() => Tensor) | null = null;
  #out: Tensor | null = null;
  constructor(readonly failCapture = false) {
    RerunGraph.made++;
  }
  warmup<T>(fn: () => T): T {
    return fn();
  }
  capture(fn: () => Tensor): Tensor {
    RerunGraph.captures++;
    if (this.failCapture) throw new Error("operation not permitted when stream is capturing");
    this.#fn = fn;
    this.#out = fn();
    return this.#out;
  }
  replay(): void {
    scope(() => ops.copy_(this.#out!, this.#fn!()));
  }
  [Symbol.dispose](): void {}
}

/** out = x * t + y.sum(): reads every input, so a stale static buffer would show. */
const affine = (a: readonly Tensor[]) => ops.add(ops.mul(a[0], a[1]), ops.sumAll(a[2]));

Deno.test("graphs: replays equal eager calls; inputs and numbers reach the static buffers", () => {
  RerunGraph.made = RerunGraph.captures = 0;
  leakFree("graphed calls", () => {
    const warnings: string[] = [];
    using g = new GraphedCall(affine, {
      name: "affine",
      warmup: 2,
      newGraph: () => new RerunGraph(),
      onFallback: (m) => warnings.push(m),
    });
    for (let i = 0; i < 6; i++) {
      scope(() => {
        const x = ops.full([2, 3], i + 1, "f32", "cpu"), y = ops.full([4], 0.5 * i, "f32", "cpu");
        const got = g.call([x, 10 + i, y]);
        const want = affine([x, ops.full([1], 10 + i, "f32", "cpu"), y]);
        assert.equal(ops.maxAll(ops.abs(ops.sub(got, want))).item(), 0, `call ${i}`);
      });
    }
    assert.equal(RerunGraph.made, 1, "one graph for one signature");
    assert.equal(RerunGraph.captures, 1, "captured once, after the warm-up calls");
    assert.equal(g.replays, 4, "calls after warm-up are replays");
    assert.deepEqual(warnings, []);
    // a new shape is a new graph; past the limit the least recently used one goes
    scope(() => {
      for (const n of [1, 2, 3, 4, 5]) {
        for (let k = 0; k < 3; k++) {
          g.call([ops.ones([n], "f32", "cpu"), 1, ops.ones([1], "f32", "cpu")]);
        }
      }
    });
    assert.equal(g.graphs, 4, "at most maxGraphs graphs are kept");
  });
});

Deno.test("graphs: a failed capture warns once, then every call is eager with the same results", () => {
  leakFree("failed capture", () => {
    const warnings: string[] = [];
    using g = new GraphedCall(affine, {
      name: "affine",
      warmup: 1,
      newGraph: () => new RerunGraph(true),
      onFallback: (m) => warnings.push(m),
    });
    for (let i = 0; i < 4; i++) {
      scope(() => {
        const x = ops.full([3], i, "f32", "cpu"), y = ops.ones([2], "f32", "cpu");
        const got = g.call([x, 2, y]);
        assert.deepEqual(Array.from(got.toFloat64()), [2 * i + 2, 2 * i + 2, 2 * i + 2]);
      });
    }
    assert.equal(warnings.length, 1, warnings.join("\n"));
    assert.match(
      warnings[0],
      /affine: CUDA graph capture failed \(operation not permitted.*running eagerly/,
    );
    assert.match(g.failure!, /capture failed/);
    assert.equal(g.graphs, 0);
  });
});

Deno.test("graphs: forced on for a CPU model, the UNet warns once and samples what eager does", () => {
  const spec = {
    prompt: "a photo of a cat",
    seed: 3,
    guidance: "dipsy",
    guidanceOptions: {},
    sampler: "dpm-solver++",
    steps: 6,
    width: 32,
    height: 32,
  };
  const prepared = prepareSample(spec, { positive: true, negative: true });
  const refs = { positive: noiseImage(40, 36, 1), negative: noiseImage(36, 40, 2) };
  const warnings: string[] = [];
  const image = (cudaGraphs: boolean) => {
    using bb = Sd15Backbone.tiny({ cudaGraphs, onGraphFallback: (m) => warnings.push(m) });
    const r = sampleImage(bb, prepared, refs);
    r.latents.dispose();
    return r.image.data;
  };
  const eager = image(false), graphed = image(true);
  assert.deepEqual(graphed, eager);
  assert.equal(warnings.length, 1, warnings.join("\n"));
  assert.match(warnings[0], /^UNet: CUDA graphs need inputs on a CUDA device/);
});

Deno.test({
  name: "cuda runtime: without a GPU, graphs and CUDA memory calls fail with the reason" +
    (CUDA ? " [skipped: there is a GPU]" : ""),
  ignore: CUDA,
}, () => {
  const why = INFO.built_with_cuda ? /CUDA|device/ : /built without CUDA/;
  assert.throws(() => new CudaGraph(), (e) => e instanceof TorchError && why.test(e.message));
  assert.throws(() => cudaMemoryStats(), (e) => e instanceof TorchError && why.test(e.message));
  assert.deepEqual(cudaDevices(), []);
});

Deno.test("runtime: TF32 switches round-trip", () => {
  const before = allowTf32();
  try {
    for (const want of [{ matmul: true, conv: false }, { matmul: false, conv: true }]) {
      setAllowTf32(want);
      assert.deepEqual(allowTf32(), want);
    }
  } finally {
    setAllowTf32(before);
  }
});

Deno.test("attention kernels: one per attention kind and level of SD1.5, each a known kernel", () => {
  const config = parseUNetConfig({ ...SD15_UNET_CONFIG_JSON }, "SD1.5");
  const ks = leakFree(
    "kernel report",
    () =>
      attentionKernels(config, { batch: 1, height: 16, width: 16, dtype: "f32", device: "cpu" }),
  );
  assert.deepEqual(ks.map((k) => k.headDim), [
    40,
    40,
    40,
    80,
    80,
    80,
    160,
    160,
    160,
    160,
    160,
    160,
  ]);
  assert.deepEqual(ks.map((k) => k.queries), [256, 256, 256, 64, 64, 64, 16, 16, 16, 4, 4, 4]);
  for (const k of ks) {
    assert.ok(["math", "flash", "efficient", "cudnn"].includes(k.backend), k.backend);
  }
});

// ---------------------------------------------------------------------------------------------
// The prepared GPU command

const GPU_SH = fileURLToPath(new URL("../bench/gpu.sh", import.meta.url));

async function runGpuSh(path: string): Promise<{ code: number; text: string; seconds: number }> {
  const t0 = performance.now();
  const out = await new Deno.Command("/bin/bash", {
    args: [GPU_SH],
    env: { PATH: path },
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return {
    code: out.code,
    text: dec.decode(out.stdout) + dec.decode(out.stderr),
    seconds: (performance.now() - t0) / 1000,
  };
}

Deno.test("bench/gpu.sh stops at once, saying why, on a machine without a GPU", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dipsy-nogpu-" });
  try {
    const none = await runGpuSh(dir);
    assert.equal(none.code, 2, none.text);
    assert.match(none.text, /bench\/gpu\.sh needs an NVIDIA GPU: nvidia-smi is not on PATH/);
    // a driver without a device
    await Deno.writeTextFile(
      join(dir, "nvidia-smi"),
      "#!/bin/bash\necho 'No devices were found'\nexit 6\n",
      { mode: 0o755 },
    );
    const broken = await runGpuSh(dir);
    assert.equal(broken.code, 2, broken.text);
    assert.match(
      broken.text,
      /bench\/gpu\.sh needs an NVIDIA GPU: nvidia-smi lists none \(No devices were found\)/,
    );
    assert.ok(none.seconds < 5 && broken.seconds < 5, "it stops before doing any work");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("bench/gpu_bench.ts --smoke runs both sides on tiny models and prints every figure", async () => {
  const script = fileURLToPath(new URL("../bench/gpu_bench.ts", import.meta.url));
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--check", "--cached-only", script, "--smoke"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  assert.equal(out.code, 0, dec.decode(out.stderr));
  const lines = dec.decode(out.stdout).split("\n").filter(Boolean).map((l) => JSON.parse(l));
  const names = lines.map((l) => l.bench);
  for (const n of [1, 2]) {
    for (const mode of ["eager", "graphs"]) {
      assert.ok(names.includes(`gpu_dipsy_32px_${n}img_${mode}`), mode);
    }
    assert.ok(names.includes(`gpu_official_32px_${n}img_diffusers_eager`));
    const vs = lines.find((l) => l.bench === `gpu_dipsy_vs_official_${n}img`);
    assert.ok(vs && vs.ours_s > 0 && vs.reference_s > 0 && vs.ratio === vs.ours_s / vs.reference_s);
  }
});

// ---------------------------------------------------------------------------------------------
// GPU: runtime

gpuTest("devices are listed with a name, capability and memory", () => {
  const ds = cudaDevices();
  assert.equal(ds.length, INFO.cuda_device_count);
  assert.ok(ds[0].name.length > 0 && /^\d+\.\d+$/.test(ds[0].capability) && ds[0].memory_bytes > 0);
  console.log(`  ${ds.map((d) => `${d.name} (sm ${d.capability})`).join(", ")}`);
});

gpuTest(
  "memory stats follow allocations; empty_cache hands cached memory back; peaks reset",
  () => {
    cudaSynchronize();
    cudaEmptyCache();
    const base = cudaMemoryStats();
    const bytes = 64 << 20;
    const t = ops.zeros([bytes / 4], "f32", GPU);
    const held = cudaMemoryStats();
    assert.ok(held.allocated_bytes >= base.allocated_bytes + bytes, JSON.stringify({ base, held }));
    assert.ok(held.peak_allocated_bytes >= held.allocated_bytes);
    assert.ok(held.reserved_bytes >= held.allocated_bytes);
    t.dispose();
    const freed = cudaMemoryStats();
    assert.ok(
      freed.allocated_bytes <= held.allocated_bytes - bytes,
      JSON.stringify({ held, freed }),
    );
    assert.ok(freed.reserved_bytes >= bytes, "a freed block stays cached");
    cudaEmptyCache();
    const emptied = cudaMemoryStats();
    assert.ok(
      emptied.reserved_bytes <= freed.reserved_bytes - bytes,
      JSON.stringify({ freed, emptied }),
    );
    cudaResetPeakMemoryStats();
    const reset = cudaMemoryStats();
    assert.equal(reset.peak_allocated_bytes, reset.allocated_bytes);
  },
);

gpuTest(
  "generators: a seed gives the same draws, another seed others; CPU noise moves unchanged",
  () => {
    leakFree("generators", () =>
      scope(() => {
        const draw = (seed: number) => {
          using g = new Generator(seed, GPU);
          return [ops.randn([1000], "f32", GPU, g), ops.randn([1000], "f32", GPU, g)];
        };
        const [a1, a2] = draw(7), [b1] = draw(7), [c1] = draw(8);
        assert.equal(ops.maxAll(ops.abs(ops.sub(a1, b1))).item(), 0, "same seed, same draws");
        assert.ok(ops.maxAll(ops.abs(ops.sub(a1, c1))).item() > 0.1, "another seed, other draws");
        assert.ok(ops.maxAll(ops.abs(ops.sub(a1, a2))).item() > 0.1, "the state advances");
        // initial noise is drawn on a CPU generator, as diffusers does, so it is device-independent
        const cpu = initialNoise(5, 4, 8, 8);
        const moved = ops.to(ops.to(cpu, undefined, GPU), undefined, "cpu");
        assert.equal(ops.maxAll(ops.abs(ops.sub(cpu, moved))).item(), 0);
      }));
  },
);

gpuTest(
  "f16 attention takes a flash or memory-efficient kernel at SD1.5's head dims 40, 80, 160",
  () => {
    const config = parseUNetConfig({ ...SD15_UNET_CONFIG_JSON }, "SD1.5");
    const ks = attentionKernels(config, {
      batch: 2,
      height: 64,
      width: 64,
      dtype: "f16",
      device: GPU,
    });
    for (const k of ks) {
      assert.ok(
        k.backend === "flash" || k.backend === "efficient",
        `${k.kind} attention, head dim ${k.headDim}: ${k.backend}`,
      );
    }
    console.log(
      `  ${[...new Set(ks.map((k) => `d${k.headDim} ${k.kind}: ${k.backend}`))].join(", ")}`,
    );
    scope(() => {
      const q = ops.zeros([1, 8, 64, 40], "f16", GPU);
      assert.notEqual(sdpaBackend(q, q, q), "math");
    });
  },
);

gpuTest("safetensors load straight to the GPU, cast on the way", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dipsy-cuda-" });
  try {
    leakFree("safetensors", () =>
      scope(() => {
        const w = new Map([["a", cpuInput([3, 5], 70)], ["b", cpuInput([7], 71)]]);
        saveSafetensors(join(dir, "w.safetensors"), w);
        const file = SafetensorsFile.open(join(dir, "w.safetensors"));
        for (const [k, want] of w) {
          const got = file.load(k, { dtype: "f16", device: GPU });
          assert.equal(got.device, GPU);
          assert.equal(got.dtype, "f16");
          assertClose(`${k} as f16 on the GPU`, got, ops.to(want, "f16", undefined), 0, {
            absolute: true,
          });
        }
      }));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---------------------------------------------------------------------------------------------
// GPU: models and the pipeline against the CPU

/** Random f32 inputs on the CPU, the same for every device run. */
function cpuInput(shape: number[], seed: number): Tensor {
  using g = new Generator(seed);
  return ops.randn(shape, "f32", "cpu", g);
}

const on = (t: Tensor, dtype: FloatDType, device: Device) => ops.to(t, dtype, device);

gpuTest("tiny UNet, VAE and CLIP towers match the CPU (f32 and f16)", () => {
  withoutTf32(() =>
    leakFree("models", () => {
      const run = (dtype: FloatDType, device: Device): Record<string, Tensor> =>
        noGrad(() =>
          scope(() => {
            const lo = { dtype, device };
            using unet = UNet2DConditionModel.random({ ...TINY_UNET_CONFIG_JSON }, 0, lo);
            using plus = IpAdapter.random(TINY_IP_PLUS, unet, 1, lo);
            unet.attachIpAdapters([plus, plus]);
            const tokens = on(cpuInput([2, 6, 32], 12), dtype, device);
            const eps = unet.forward(
              on(cpuInput([2, 4, 16, 16], 10), dtype, device),
              500,
              on(cpuInput([2, 8, 32], 11), dtype, device),
              {
                tokens: [tokens, tokens],
                scales: on(fromHost([0.6, 0, 0.6, 0.6], [2, 2]), dtype, device),
              },
            );
            unet.detachIpAdapters();
            using vae = AutoencoderKL.random(TINY_VAE_CONFIG, 1, lo);
            const decoded = vae.decode(on(cpuInput([1, 4, 8, 8], 13), dtype, device));
            const mean = vae.encode(on(cpuInput([1, 3, 16, 16], 14), dtype, device)).mean;
            using text = loadClipText("tiny", { ...lo, seed: 2 });
            const ids = ops.to(
              fromHost([518, 5, 77, 300, 519, 519], [1, 6], "i64"),
              undefined,
              device,
            );
            const hidden = text.forward(ids).lastHiddenState;
            using vision = loadClipVision("tiny", { ...lo, seed: 3 });
            const embeds = vision.forward(on(cpuInput([2, 3, 32, 32], 15), dtype, device))
              .imageEmbeds!;
            return { eps, decoded, mean, hidden, embeds };
          })
        );
      const want = run("f32", "cpu");
      for (const dtype of ["f32", "f16"] as const) {
        const got = run(dtype, GPU);
        for (const [k, w] of Object.entries(want)) {
          assertClose(`${k} (cuda ${dtype})`, got[k], w, MODEL_TOL[dtype]);
          got[k].dispose();
        }
      }
      for (const t of Object.values(want)) t.dispose();
    })
  );
});

const SAMPLE_SPEC = {
  prompt: "a photo of a cat",
  seed: 3,
  guidance: "dipsy",
  guidanceOptions: {},
  sampler: "dpm-solver++",
  steps: 12,
  width: 32,
  height: 32,
};
const REFS = { positive: noiseImage(40, 36, 1), negative: noiseImage(36, 40, 2) };

function pixelDiff(a: Uint8Array, b: Uint8Array): { max: number; mean: number } {
  let max = 0, sum = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    max = Math.max(max, d);
    sum += d;
  }
  return { max, mean: sum / a.length };
}

gpuTest("tiny sample: the same seed gives the CPU's image (f32, and f16 by default)", () => {
  const prepared = prepareSample(SAMPLE_SPEC, { positive: true, negative: true });
  const image = (opts: { device: Device; dtype?: FloatDType }) => {
    using bb = Sd15Backbone.tiny(opts);
    if (opts.device !== "cpu" && !opts.dtype) {
      assert.equal(bb.dtype, "f16", "f16 is CUDA's default");
    }
    const r = sampleImage(bb, prepared, REFS);
    r.latents.dispose();
    return r.image.data;
  };
  const cpu = image({ device: "cpu" });
  const f32 = withoutTf32(() => pixelDiff(image({ device: GPU, dtype: "f32" }), cpu));
  const f16 = pixelDiff(image({ device: GPU }), cpu);
  console.log(
    `  pixel difference to the CPU: f32 ${JSON.stringify(f32)}, f16 ${JSON.stringify(f16)}`,
  );
  assert.ok(f32.max <= 1, `f32: ${JSON.stringify(f32)}`);
  assert.ok(f16.max <= 8 && f16.mean < 1, `f16: ${JSON.stringify(f16)}`);
});

gpuTest("one LoRA training step matches the CPU: loss, gradients, updated weights", () => {
  const labels = [0, 1, 2, 3, 0, 1, 2, 3], synthetic = [0, 1, 0, 1, 0, 1, 0, 1];
  const lr = 1e-2;
  const step = (device: Device) => {
    manualSeed(0);
    using clf = ClipLoraClassifier.create(
      loadClipModel("tiny", { seed: 4, device, dtype: "f32" }),
      ClipTokenizer.byteLevel(),
      {
        classNames: ["red", "green", "blue", "white"],
        lora: { rank: 8, alpha: 16, dropout: 0 },
        seed: 1,
        ownsModel: true,
      },
    );
    return scope(() => {
      const px = ops.to(cpuInput([8, 3, 32, 32], 20), undefined, device);
      const loss = clf.forwardBackward(px, labels, synthetic);
      const host = (t: Tensor) => keep(ops.clone(ops.to(t, undefined, "cpu")));
      const grads = clf.adapter.parameters().map((p) => host(ops.grad(p)!));
      clf.optimizerStep(lr);
      const params = clf.adapter.parameters().map(host);
      return { loss, grads, params };
    });
  };
  withoutTf32(() =>
    leakFree("lora step", () => {
      const cpu = step("cpu"), gpu = step(GPU);
      try {
        assert.ok(valueError(gpu.loss, cpu.loss) <= 1e-5, `loss ${gpu.loss} vs ${cpu.loss}`);
        let gradScale = 0;
        for (const g of cpu.grads) gradScale = Math.max(gradScale, ops.maxAll(ops.abs(g)).item());
        cpu.grads.forEach((g, i) =>
          assertClose(`grad ${i}`, gpu.grads[i], g, 1e-5 * gradScale, { absolute: true })
        );
        // AdamW's first step moves each weight by about lr * sign(grad): compared where the
        // gradient is clearly not zero, elsewhere bounded by the step size
        cpu.params.forEach((p, i) => {
          const g = cpu.grads[i].toFloat64(), want = p.toFloat64(), got = gpu.params[i].toFloat64();
          for (let k = 0; k < want.length; k++) {
            const tol = Math.abs(g[k]) > 1e-3 * gradScale ? 1e-5 : 2.1 * lr;
            assert.ok(
              Math.abs(got[k] - want[k]) <= tol,
              `weight ${i}[${k}]: ${got[k]} vs ${want[k]}`,
            );
          }
        });
      } finally {
        for (const r of [cpu, gpu]) for (const t of [...r.grads, ...r.params]) t.dispose();
      }
    })
  );
});

// ---------------------------------------------------------------------------------------------
// GPU: CUDA graphs

gpuTest(
  "a captured graph replays what eager computes on new inputs; a failed capture restores the stream",
  () => {
    leakFree("cuda graph", () =>
      scope(() => {
        const x = ops.zeros([256], "f32", GPU), y = ops.zeros([256], "f32", GPU);
        const f = () => ops.addScalar(ops.mul(ops.sin(x), y), 1);
        using graph = new CudaGraph();
        graph.warmup(() => f().dispose());
        let out: Tensor | null = null;
        graph.capture(() => {
          out = f();
        });
        for (let i = 0; i < 3; i++) {
          ops.copy_(x, cpuInput([256], 30 + i).to(GPU));
          ops.fill_(y, i + 0.5);
          graph.replay();
          assert.equal(ops.maxAll(ops.abs(ops.sub(out!, f()))).item(), 0, `replay ${i}`);
        }
        // waiting for the GPU inside a capture is refused; the stream must be the caller's again
        using bad = new CudaGraph();
        assert.throws(() => bad.capture(() => void ops.item(ops.sumAll(x))));
        assert.throws(() => bad.replay(), /replay before a successful capture/);
        const z = ops.addScalar(x, 1);
        cudaSynchronize();
        assert.equal(
          ops.maxAll(ops.abs(ops.sub(ops.subScalar(z, 1), x))).item(),
          0,
          "eager ops run",
        );
        using again = new CudaGraph();
        let o2: Tensor | null = null;
        again.capture(() => {
          o2 = ops.mulScalar(x, 2);
        });
        again.replay();
        assert.equal(
          ops.maxAll(ops.abs(ops.sub(o2!, ops.mulScalar(x, 2)))).item(),
          0,
          "a new capture works",
        );
      }));
  },
);

gpuTest("the UNet's graph replays equal eager calls, per shape, across timesteps", () => {
  for (const dtype of ["f32", "f16"] as const) {
    leakFree(`unet graphs ${dtype}`, () => {
      const lo = { dtype, device: GPU };
      using unet = UNet2DConditionModel.random({ ...TINY_UNET_CONFIG_JSON }, 0, lo);
      using plus = IpAdapter.random(TINY_IP_PLUS, unet, 1, lo);
      unet.attachIpAdapters([plus, plus]);
      const warnings: string[] = [];
      using graphs = new GraphedCall(
        (a) => unet.forward(a[0], a[1], a[2], { tokens: a.slice(3, -1), scales: a.at(-1)! }),
        { name: "UNet", onFallback: (m) => warnings.push(m) },
      );
      noGrad(() =>
        scope(() => {
          for (const batch of [4, 8]) {
            for (let i = 0; i < 5; i++) {
              scope(() => {
                const t = 999 - 97 * i;
                const x = on(cpuInput([batch, 4, 16, 16], 40 + i), dtype, GPU);
                const text = on(cpuInput([batch, 8, 32], 50 + i), dtype, GPU);
                const tokens = on(cpuInput([batch, 6, 32], 60 + i), dtype, GPU);
                const scales = ops.full([batch, 2], 0.6, dtype, GPU);
                const got = graphs.call([x, t, text, tokens, tokens, scales]);
                const want = unet.forward(x, t, text, { tokens: [tokens, tokens], scales });
                assertClose(`batch ${batch} step ${i} (${dtype})`, got, want, REPLAY_TOL[dtype]);
              });
            }
          }
        })
      );
      assert.deepEqual(warnings, []);
      assert.equal(graphs.graphs, 2, "one graph per shape");
      assert.equal(graphs.replays, 2 * (5 - 2), "replays after the two warm-up calls per shape");
      unet.detachIpAdapters();
    });
  }
});

gpuTest("sampling with graphs gives the eager image, and no step waits for the GPU", () => {
  const run = (cudaGraphs: boolean) => {
    const warnings: string[] = [];
    using bb = Sd15Backbone.tiny({
      device: GPU,
      cudaGraphs,
      onGraphFallback: (m) => warnings.push(m),
    });
    const guidance = registry.create<Guidance>("guidance", "dipsy", {});
    using sampler = registry.create<Sampler>("sampler", "dpm-solver++", {
      steps: SAMPLE_SPEC.steps,
      config: bb.schedulerConfig,
    });
    // Waiting for the GPU becomes an error once the warm-up calls and the capture are behind
    // (step 3 on); the eager run is checked from step 1 on.
    const from = cudaGraphs ? 2 : 0;
    let latents: Tensor;
    try {
      latents = sampleLatents(bb, [{
        prompt: SAMPLE_SPEC.prompt,
        seed: SAMPLE_SPEC.seed,
        positive: REFS.positive,
        negative: REFS.negative,
      }], {
        width: 32,
        height: 32,
        guidance,
        sampler,
        onStep: (i) => {
          if (i === from) cudaSetSyncDebugMode("error");
        },
      });
    } finally {
      cudaSetSyncDebugMode("off");
    }
    try {
      assert.deepEqual(warnings, []);
      if (cudaGraphs) assert.equal(bb.unetGraphs!.replays, SAMPLE_SPEC.steps - 2);
      return scope(() => Array.from(ops.to(latents, "f32", "cpu").toFloat64()));
    } finally {
      latents.dispose();
    }
  };
  const eager = run(false), graphed = run(true);
  let err = 0, scale = 0;
  eager.forEach((v, i) => {
    err = Math.max(err, Math.abs(graphed[i] - v));
    scale = Math.max(scale, Math.abs(v));
  });
  console.log(`  final latents, graphs vs eager: max abs difference ${err.toExponential(2)}`);
  assert.ok(
    err <= SAMPLE_REPLAY_TOL * Math.max(1, scale),
    `graphs vs eager: ${err} (scale ${scale})`,
  );
});
