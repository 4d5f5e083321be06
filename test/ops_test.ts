/**
 * Op parity against PyTorch, plus the runtime contracts around ops: autograd, AdamW, errors,
 * disposal, memory scopes, safetensors, grad mode.
 *
 * The expected values come from test/reference/ops_ref.py (run by `deno task test`), which
 * documents the case format and the tolerance rule: a float value passes when
 * |got - want| <= atol * max(1, |want|); integer and bool values must be equal.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { OPS } from "../native/ops_spec.ts";
import {
  DisposedTensorError,
  type DType,
  enableGrad,
  fromHost,
  Generator,
  isGradEnabled,
  keep,
  manualSeed,
  memory,
  noGrad,
  ops,
  runtimeInfo,
  SafetensorsError,
  SafetensorsFile,
  saveSafetensors,
  scope,
  setGradEnabled,
  type Tensor,
  TorchError,
} from "../ffi/mod.ts";
import { fixture, howToGenerate, noLeak, withTempDirSync } from "./util.ts";

const REF_SCRIPT = fileURLToPath(new URL("./reference/ops_ref.py", import.meta.url));

/** Ops whose behaviour needs state across calls, so hand-written tests below cover them. */
const HAND_WRITTEN = ["requires_grad_", "backward", "grad", "zero_grad", "adamw_step"];

type Arg =
  | null
  | number
  | boolean
  | number[]
  | { t: string }
  | { tlist: string[] }
  | { dtype: DType }
  | { device: "cpu" }
  | { gen: number };

interface Case {
  name: string;
  op: string;
  args: Arg[];
  out: string | string[] | { scalar: number };
  atol: number;
  inplace?: number;
  manual_seed?: number;
}

interface Meta {
  torch_version: string;
  script_sha256: string;
  hand_written_ops: string[];
  adamw: { lr: number; beta1: number; beta2: number; eps: number; weight_decay: number };
}

interface Fixture {
  cases: Case[];
  meta: Meta;
  file: SafetensorsFile;
}

let loaded: Fixture | undefined;

function loadFixture(): Fixture {
  if (loaded) return loaded;
  const dir = fixture("ops", "cases.json", "meta.json", "cases.safetensors");
  const meta: Meta = JSON.parse(readFileSync(join(dir, "meta.json"), "utf8"));
  // Fixtures from an older generator would test yesterday's cases while looking green.
  const sha = createHash("sha256").update(readFileSync(REF_SCRIPT)).digest("hex");
  if (sha !== meta.script_sha256) {
    throw new Error(
      `op fixtures in ${dir} were made by another ops_ref.py: ${howToGenerate("ops")}`,
    );
  }
  loaded = {
    cases: JSON.parse(readFileSync(join(dir, "cases.json"), "utf8")),
    meta,
    file: SafetensorsFile.open(join(dir, "cases.safetensors")),
  };
  return loaded;
}

function load(key: string): Tensor {
  return loadFixture().file.load(key);
}

// ---------------------------------------------------------------------------------------------
// Comparison helpers. Values are decoded from raw host bytes here rather than through the `to`
// op, so a broken cast cannot make both sides agree.

const INTEGRAL = new Set<DType>(["u8", "i8", "i16", "i32", "i64", "bool"]);

function f16ToNumber(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const man = h & 0x3ff;
  if (exp === 0) return sign * man * 2 ** -24;
  if (exp === 31) return man ? NaN : sign * Infinity;
  return sign * (1 + man / 1024) * 2 ** (exp - 15);
}

const BF16_SCRATCH = new Uint32Array(1);
const BF16_AS_F32 = new Float32Array(BF16_SCRATCH.buffer);
function bf16ToNumber(h: number): number {
  BF16_SCRATCH[0] = h << 16;
  return BF16_AS_F32[0];
}

function floatValues(t: Tensor): ArrayLike<number> {
  const h = t.toHost();
  if (t.dtype === "f16") return Array.from(h as Uint16Array, f16ToNumber);
  if (t.dtype === "bf16") return Array.from(h as Uint16Array, bf16ToNumber);
  return h as Float32Array | Float64Array;
}

function valueError(got: number, want: number): number {
  if (Number.isNaN(want)) return Number.isNaN(got) ? 0 : Infinity;
  if (!Number.isFinite(want)) return got === want ? 0 : Infinity;
  if (Number.isNaN(got)) return Infinity;
  return Math.abs(got - want) / Math.max(1, Math.abs(want));
}

interface Worst {
  err: number;
  index: number;
  got: number | bigint;
  want: number | bigint;
}

/** Checks dtype and shape, then returns the worst element error (0 for equal integers). */
function compareTensor(label: string, got: Tensor, want: Tensor): Worst {
  assert.equal(got.dtype, want.dtype, `${label}: dtype`);
  assert.deepEqual([...got.shape], [...want.shape], `${label}: shape`);
  const worst: Worst = { err: 0, index: -1, got: 0, want: 0 };
  if (INTEGRAL.has(want.dtype)) {
    const g = got.toHost();
    const w = want.toHost();
    for (let i = 0; i < w.length; i++) {
      if (g[i] !== w[i]) return { err: Infinity, index: i, got: g[i], want: w[i] };
    }
    return worst;
  }
  const g = floatValues(got);
  const w = floatValues(want);
  for (let i = 0; i < w.length; i++) {
    const e = valueError(g[i], w[i]);
    if (e > worst.err || (worst.index < 0 && e === Infinity)) {
      worst.err = e;
      worst.index = i;
      worst.got = g[i];
      worst.want = w[i];
    }
  }
  return worst;
}

function assertClose(label: string, got: Tensor, want: Tensor, atol: number): number {
  const w = compareTensor(label, got, want);
  assert.ok(
    w.err <= atol,
    `${label}: worst error ${w.err} at flat index ${w.index} (got ${w.got}, want ${w.want}), ` +
      `atol ${atol}`,
  );
  return w.err;
}

function catchError(fn: () => unknown): unknown {
  try {
    fn();
  } catch (e) {
    return e;
  }
  throw new assert.AssertionError({ message: "expected the call to throw" });
}

// ---------------------------------------------------------------------------------------------
// Op parity cases

type Binding = (...args: unknown[]) => unknown;
const BINDINGS = ops as unknown as Record<string, Binding | undefined>;

/** The generator's naming rule (native/gen_ops.ts): snake_case op, camelCase export. */
function bindingName(op: string): string {
  return op.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());
}

function decodeArg(a: Arg, gens: Generator[]): unknown {
  if (a === null) return undefined;
  if (typeof a !== "object" || Array.isArray(a)) return a;
  if ("t" in a) return load(a.t);
  if ("tlist" in a) return a.tlist.map(load);
  if ("dtype" in a) return a.dtype;
  if ("device" in a) return a.device;
  if ("gen" in a) {
    const g = new Generator(a.gen);
    gens.push(g);
    return g;
  }
  throw new Error(`unknown case argument ${JSON.stringify(a)}`);
}

const worstByCase: { name: string; err: number }[] = [];

function runCase(c: Case): void {
  const fn = BINDINGS[bindingName(c.op)];
  assert.ok(fn, `no binding ${bindingName(c.op)} for op ${c.op}`);
  scope(() => {
    const gens: Generator[] = [];
    try {
      if (c.manual_seed !== undefined) manualSeed(c.manual_seed);
      const args = c.args.map((a) => decodeArg(a, gens));
      const ret = fn(...args);
      let worst = 0;
      if (typeof c.out === "object" && "scalar" in c.out) {
        assert.equal(typeof ret, "number", `${c.name}: expected a number`);
        const err = valueError(ret as number, c.out.scalar);
        assert.ok(
          err <= c.atol,
          `${c.name}: got ${ret}, want ${c.out.scalar} (error ${err}, atol ${c.atol})`,
        );
        worst = err;
      } else {
        const keys = typeof c.out === "string" ? [c.out] : c.out;
        let got: Tensor[];
        if (c.inplace !== undefined) {
          assert.equal(ret, undefined, `${c.name}: in-place ops return nothing`);
          got = [args[c.inplace] as Tensor];
        } else {
          got = Array.isArray(ret) ? ret : [ret as Tensor];
        }
        assert.equal(got.length, keys.length, `${c.name}: number of outputs`);
        for (let i = 0; i < keys.length; i++) {
          const label = keys.length > 1 ? `${c.name} output ${i}` : c.name;
          worst = Math.max(worst, assertClose(label, got[i], load(keys[i]), c.atol));
        }
      }
      worstByCase.push({ name: c.name, err: worst });
    } finally {
      for (const g of gens) g.dispose();
    }
  });
}

function registerCaseTests(): void {
  let cases: Case[];
  try {
    cases = loadFixture().cases;
  } catch (e) {
    const message = (e as Error).message;
    Deno.test("op parity cases", () => {
      throw new Error(message);
    });
    return;
  }
  const byOp = new Map<string, Case[]>();
  for (const c of cases) byOp.set(c.op, [...(byOp.get(c.op) ?? []), c]);
  for (const [op, list] of byOp) {
    Deno.test(`op ${op}`, async (t) => {
      for (const c of list) await t.step(c.name, () => runCase(c));
    });
  }
  Deno.test("op parity: worst errors", () => {
    // Only informative; DIPSY_OPS_REPORT=1 prints the cases that needed their tolerance most.
    if (Deno.env.get("DIPSY_OPS_REPORT")) {
      const top = [...worstByCase].sort((a, b) => b.err - a.err).slice(0, 15);
      console.log(top.map((w) => `${w.name}: ${w.err.toExponential(3)}`).join("\n"));
      const exact = worstByCase.filter((w) => w.err === 0).length;
      console.log(`${exact} of ${worstByCase.length} passing cases are bit-identical to PyTorch`);
    }
  });
}

Deno.test("op cases cover every op in native/ops_spec.ts", () => {
  const fx = loadFixture();
  const specNames = new Set(OPS.map((o) => o.name));
  assert.deepEqual(fx.meta.hand_written_ops, HAND_WRITTEN, "ops_ref.py and this test disagree");
  const covered = new Set([...fx.cases.map((c) => c.op), ...HAND_WRITTEN]);
  assert.deepEqual([...specNames].filter((n) => !covered.has(n)), [], "ops without cases");
  assert.deepEqual(
    [...covered].filter((n) => !specNames.has(n)),
    [],
    "cases for ops that are not in the spec",
  );
  const unbound = OPS.map((o) => bindingName(o.name)).filter((n) => !BINDINGS[n]);
  assert.deepEqual(unbound, [], "spec ops without a TypeScript binding");
  const names = fx.cases.map((c) => c.name);
  assert.equal(new Set(names).size, names.length, "case names are unique");
});

registerCaseTests();

// ---------------------------------------------------------------------------------------------
// Autograd and the optimizer

Deno.test("autograd: gradients of sum(silu(x @ w) * y) match torch", () => {
  scope(() => {
    const x = load("autograd.x");
    const w = load("autograd.w");
    const y = load("autograd.y");
    assert.equal(x.requiresGrad, false);
    ops.requiresGrad_(x, true);
    ops.requiresGrad_(w, true);
    assert.equal(x.requiresGrad, true);
    assert.equal(ops.grad(x), null, "no gradient before backward");

    const forward = () => ops.sumAll(ops.mul(ops.silu(ops.matmul(x, w)), y));
    const loss = forward();
    assert.equal(loss.requiresGrad, true);
    assertClose("loss", loss, load("autograd.loss"), 1e-5);
    ops.backward(loss, null);
    const gx = ops.grad(x);
    const gw = ops.grad(w);
    assert.ok(gx && gw);
    assertClose("grad x", gx, load("autograd.grad_x"), 1e-5);
    assertClose("grad w", gw, load("autograd.grad_w"), 1e-5);
    assert.equal(ops.grad(y), null, "y does not require grad");

    // A second backward accumulates into .grad, as in PyTorch.
    ops.backward(forward(), null);
    const want = floatValues(load("autograd.grad_x"));
    const twice = floatValues(ops.grad(x)!);
    for (let i = 0; i < want.length; i++) {
      assert.ok(valueError(twice[i], 2 * want[i]) <= 1e-5, `accumulated grad at ${i}`);
    }

    ops.zeroGrad(x);
    assert.equal(ops.grad(x), null, "zeroGrad drops the gradient");
    assert.ok(ops.grad(w) !== null, "zeroGrad on x leaves w alone");
    ops.requiresGrad_(x, false);
    assert.equal(x.requiresGrad, false);
  });
});

Deno.test("autograd: backward with an explicit upstream gradient", () => {
  scope(() => {
    const x = load("autograd.x");
    const w = load("autograd.w");
    ops.requiresGrad_(x, true);
    const out = ops.matmul(x, w);
    const err = catchError(() => ops.backward(out, null));
    assert.ok(err instanceof TorchError, String(err));
    assert.match(err.message, /scalar outputs/);
    ops.backward(out, load("autograd.gout"));
    assertClose("vjp x", ops.grad(x)!, load("autograd.vjp_x"), 1e-5);
  });
});

for (const [prefix, dtype] of [["adamw", "f32"], ["adamw_f16", "f16"]]) {
  Deno.test(`adamwStep matches torch.optim.AdamW over 3 steps (${dtype})`, () => {
    const { lr, beta1, beta2, eps, weight_decay } = loadFixture().meta.adamw;
    scope(() => {
      const p = load(`${prefix}.p0`);
      assert.equal(p.dtype, dtype);
      const m = ops.zerosLike(p);
      const v = ops.zerosLike(p);
      for (let step = 1; step <= 3; step++) {
        const g = load(`${prefix}.g${step}`);
        ops.adamwStep(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay);
        assertClose(`param after step ${step}`, p, load(`${prefix}.p${step}`), 1e-7);
      }
      assertClose("exp_avg", m, load(`${prefix}.exp_avg`), 1e-7);
      assertClose("exp_avg_sq", v, load(`${prefix}.exp_avg_sq`), 1e-7);
    });
  });
}

Deno.test("Generator: consecutive draws follow torch.Generator's sequence", () => {
  scope(() => {
    using g = new Generator(2024);
    const exact = (label: string, t: Tensor) => assertClose(label, t, load(label), 0);
    exact("gen_seq.randn", ops.randn([5, 7], "f32", "cpu", g));
    exact("gen_seq.rand", ops.rand([9], "f32", "cpu", g));
    exact("gen_seq.randint", ops.randint(-3, 3, [11], "i64", "cpu", g));
    exact("gen_seq.randn2", ops.randn([3], "f64", "cpu", g));
    // A second generator with the same seed starts over, untouched by the first one's draws.
    using g2 = new Generator(2024);
    exact("gen_seq.randn", ops.randn([5, 7], "f32", "cpu", g2));
  });
});

// ---------------------------------------------------------------------------------------------
// Errors, disposal, scopes

/** libtorch's c10::Error::what() appends these; users must only see the message itself. */
const BACKTRACE = /Exception raised from|frame #\d|\.cpp:\d+|libtorch|c10::/;

Deno.test("errors from libtorch surface as TorchError without backtraces", () => {
  scope(() => {
    const before = memory().handles;
    const a = ops.ones([2, 3], "f32", "cpu");
    const b = ops.ones([2, 3], "f32", "cpu");
    const err = catchError(() => ops.matmul(a, b));
    assert.ok(err instanceof TorchError, `not a TorchError: ${err}`);
    assert.equal(err.op, "matmul");
    assert.match(err.message, /cannot be multiplied/);
    assert.doesNotMatch(err.message, BACKTRACE);
    assert.ok(!err.message.includes("\n"), `multi-line message: ${err.message}`);
    assert.equal(memory().handles, before + 2, "a failed op leaves no handle behind");

    // Every result kind reports errors: T[], void, f64, and the hand-written mode checks.
    const failures: [string, () => unknown, RegExp][] = [
      ["split", () => ops.split(a, [1, 1], 1), /split_sizes to sum exactly to 3/],
      [
        "copy_",
        () => ops.copy_(a, ops.ones([4], "f32", "cpu")),
        /size of tensor a \(3\) must match/,
      ],
      ["item", () => ops.item(a), /6 elements cannot be converted to Scalar/],
      ["pad", () => ops.pad(a, [1, 1], 7, 0), /mode must be 0\.\.3, got 7/],
      ["interpolate", () => ops.interpolate(a, 4, 4, 5, false, false), /mode must be/],
      [
        "cat",
        () => ops.cat([a, ops.ones([2, 3, 1], "f32", "cpu")], 0),
        /same number of dimensions/,
      ],
      [
        "index_select",
        () => ops.indexSelect(a, 0, ops.full([1], 5, "i64", "cpu")),
        /index out of range/,
      ],
    ];
    for (const [op, fn, pattern] of failures) {
      const e = catchError(fn);
      assert.ok(e instanceof TorchError, `${op}: not a TorchError: ${e}`);
      assert.equal(e.op, op);
      assert.match(e.torchMessage, pattern, `${op}: ${e.torchMessage}`);
      assert.doesNotMatch(e.message, BACKTRACE, `${op} leaks a backtrace`);
    }

    // The process keeps working, and a stale error message does not resurface.
    const c = ops.matmul(a, ops.transpose(b, 0, 1));
    assert.deepEqual([...c.toHost()], [3, 3, 3, 3]);
    assert.equal(ops.item(ops.sumAll(c)), 12);
  });
});

Deno.test("disposed tensors throw DisposedTensorError; dispose is idempotent", () => {
  const before = memory().handles;
  const t = ops.full([2, 2], 1.5, "f32", "cpu");
  assert.equal(memory().handles, before + 1);
  t.dispose();
  assert.equal(t.disposed, true);
  assert.equal(memory().handles, before);
  t.dispose();
  assert.equal(memory().handles, before, "second dispose frees nothing");
  for (const use of [() => ops.neg(t), () => t.toHost(), () => ops.cat([t], 0), () => t.shape]) {
    const e = catchError(use);
    assert.ok(e instanceof DisposedTensorError, `not a DisposedTensorError: ${e}`);
    assert.match(e.message, /full/, "names the op that made the tensor");
  }
  {
    using u = ops.ones([3], "f32", "cpu");
    assert.equal(u.disposed, false);
  }
  assert.equal(memory().handles, before, "`using` frees at block end");
});

Deno.test("scopes: 10,000 ops leave no handles behind", () => {
  // Handles, not bytes: the byte count is process-wide and parallel test modules share it.
  noLeak("10,000 scoped ops", () =>
    scope(() => {
      using g = new Generator(1);
      const x = ops.randn([16, 16], "f32", "cpu", g);
      for (let i = 0; i < 1000; i++) {
        scope(() => {
          let y = x;
          for (let j = 0; j < 10; j++) y = j % 2 ? ops.tanh(y) : ops.addScalar(y, 0.01);
          return y; // escapes to the outer scope, which must free it in turn
        });
      }
    }));
});

Deno.test("scopes: results escape, keep() survives, nesting and throwing free the rest", () => {
  const base = memory().handles;
  let inner: Tensor[] = [];
  const r = scope(() => {
    const a = ops.full([3], 2, "f32", "cpu");
    const b = ops.add(a, a);
    inner = [a, b];
    return ops.mul(b, b);
  });
  assert.ok(inner.every((t) => t.disposed), "intermediates are freed");
  assert.equal(r.disposed, false);
  assert.deepEqual([...r.toHost()], [16, 16, 16]);
  assert.equal(memory().handles, base + 1);
  r.dispose();

  const both = scope(() => ({
    list: [ops.ones([1], "f32", "cpu")],
    z: ops.zeros([1], "f32", "cpu"),
  }));
  assert.equal(memory().handles, base + 2, "tensors in returned arrays and objects escape");
  both.list[0].dispose();
  both.z.dispose();

  let kept: Tensor | undefined;
  let fromInner: Tensor | undefined;
  scope(() => {
    kept = keep(ops.ones([2], "f32", "cpu"));
    fromInner = scope(() => {
      ops.zeros([5], "f32", "cpu");
      return ops.ones([4], "f32", "cpu");
    });
    assert.equal(fromInner.disposed, false, "inner result lives on in the outer scope");
    assert.equal(memory().handles, base + 2);
  });
  assert.equal(fromInner!.disposed, true, "the outer scope frees what it did not return");
  assert.equal(kept!.disposed, false, "keep() takes a tensor out of scope management");
  kept!.dispose();
  assert.equal(memory().handles, base);

  let made: Tensor[] = [];
  const err = catchError(() =>
    scope(() => {
      made = [ops.ones([8], "f32", "cpu"), ops.zeros([8], "f32", "cpu")];
      ops.matmul(made[0], ops.ones([3, 3], "f32", "cpu"));
    })
  );
  assert.ok(err instanceof TorchError);
  assert.ok(made.every((t) => t.disposed), "a throwing scope still frees");
  assert.equal(memory().handles, base);
});

// ---------------------------------------------------------------------------------------------
// safetensors

function bytesOf(t: Tensor): Uint8Array {
  const h = t.toHost();
  return new Uint8Array(h.buffer, h.byteOffset, h.byteLength);
}

Deno.test("safetensors: save and reload f32/f16/bf16/i64/bool bit for bit", () => {
  withTempDirSync((dir) => {
    scope(() => {
      const f32 = Float32Array.from([0, -0, 1.5, -1e-40, 3.4e38, Infinity, -Infinity, NaN, 1 / 3]);
      // Every 16-bit pattern, NaN payloads and subnormals included.
      const all16 = Uint16Array.from({ length: 65536 }, (_, i) => i);
      const i64 = BigInt64Array.from([-(2n ** 63n), 2n ** 63n - 1n, 0n, -1n, 2n ** 53n + 1n]);
      const tensors = {
        f32: fromHost(f32, [3, 3], "f32"),
        f16: fromHost(all16, [256, 256], "f16"),
        bf16: fromHost(all16, [65536], "bf16"),
        i64: fromHost(i64, [5], "i64"),
        mask: fromHost([1, 0, 1, 1], [2, 2], "bool"),
        scalar: fromHost([2.5], [], "f64"),
      };
      const path = join(dir, "round.safetensors");
      saveSafetensors(path, tensors, { purpose: "round trip" });
      const f = SafetensorsFile.open(path);
      assert.deepEqual(f.keys().sort(), Object.keys(tensors).sort());
      assert.deepEqual(f.metadata, { purpose: "round trip" });
      for (const [name, t] of Object.entries(tensors)) {
        const back = f.load(name);
        assert.equal(back.dtype, t.dtype, name);
        assert.deepEqual([...back.shape], [...t.shape], name);
        assert.deepEqual(bytesOf(back), bytesOf(t), `${name} bytes`);
      }
      // A cast on load goes through libtorch; check it against an independent decoder.
      const asF32 = f.load("f16", { dtype: "f32" }).toHost() as Float32Array;
      for (let i = 0; i < 65536; i++) {
        const want = f16ToNumber(i);
        assert.ok(
          Object.is(asF32[i], Math.fround(want)) || (Number.isNaN(want) && Number.isNaN(asF32[i])),
          `f16 bits ${i}: ${asF32[i]} vs ${want}`,
        );
      }
    });
  });
});

Deno.test("safetensors: reads a file written by Python's safetensors", () => {
  const path = fixture("ops/py_written.safetensors");
  scope(() => {
    const f = SafetensorsFile.open(path);
    assert.deepEqual(f.metadata, { format: "pt" });
    const f32 = f.load("f32");
    assert.deepEqual([...f32.shape], [2, 3, 4]);
    assert.deepEqual([...f32.toHost()], Array.from({ length: 24 }, (_, i) => i * 0.5 - 3));
    assert.equal(f.load("f16").dtype, "f16");
    // Bit patterns of 0.5, -2, 65504 and 1 in IEEE half precision.
    assert.deepEqual([...f.load("f16").toHost()], [0x3800, 0xc000, 0x7bff, 0x3c00]);
    const bf = f.load("bf16");
    assert.deepEqual([...bf.shape], [2, 2]);
    assert.deepEqual([...bf.toHost()], [0x3f80, 0xc000, 0x3f00, 0x0000]);
    assert.deepEqual([...f.load("i64").toHost()], [-(2n ** 40n), 0n, 2n ** 62n + 1n]);
    const b = f.load("bool");
    assert.equal(b.dtype, "bool");
    assert.deepEqual([...b.toHost()], [1, 0, 1]);
    const s = f.load("scalar");
    assert.deepEqual([...s.shape], []);
    assert.equal(s.item(), 7);
    assert.deepEqual([...f.load("empty").shape], [0, 5]);
    const e = catchError(() => f.load("nope"));
    assert.ok(e instanceof SafetensorsError && /no tensor named "nope"/.test(e.message));
  });
});

function writeRaw(path: string, header: string, data: Uint8Array, headerLen?: number): void {
  const h = new TextEncoder().encode(header);
  const out = new Uint8Array(8 + h.length + data.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerLen ?? h.length), true);
  out.set(h, 8);
  out.set(data, 8 + h.length);
  Deno.writeFileSync(path, out);
}

Deno.test("safetensors: corrupt files fail with a SafetensorsError naming file and problem", () => {
  withTempDirSync((dir) => {
    const f32x = (shape: number[], offs: [number, number]) => ({
      dtype: "F32",
      shape,
      data_offsets: offs,
    });
    const bad: [string, (p: string) => void, RegExp][] = [
      ["truncated", (p) => {
        scope(() => saveSafetensors(p, { a: ops.ones([4, 4], "f32", "cpu") }));
        Deno.truncateSync(p, Deno.statSync(p).size - 4);
      }, /truncated/],
      ["header_past_end", (p) => writeRaw(p, "{}", new Uint8Array(0), 1000), /runs past the end/],
      // The length as stored: a double would print 2^60 as 1152921504606847000.
      [
        "huge_header",
        (p) => writeRaw(p, "{}", new Uint8Array(0), 2 ** 60),
        /length 1152921504606846976 /,
      ],
      ["tiny", (p) => Deno.writeFileSync(p, new Uint8Array(3)), /shorter than the 8-byte/],
      ["not_json", (p) => writeRaw(p, "{not json", new Uint8Array(0)), /not JSON/],
      ["not_object", (p) => writeRaw(p, "[1, 2]", new Uint8Array(0)), /not a JSON object/],
      ["wrong_span", (p) => {
        writeRaw(p, JSON.stringify({ a: f32x([2, 3], [0, 20]) }), new Uint8Array(24));
      }, /spans 20 bytes but f32 \[2,3\] needs 24/],
      ["overlap", (p) => {
        const h = { a: f32x([4], [0, 16]), b: f32x([4], [8, 24]) };
        writeRaw(p, JSON.stringify(h), new Uint8Array(24));
      }, /overlap/],
      ["unknown_dtype", (p) => {
        const h = { a: { dtype: "F8_E4M3", shape: [4], data_offsets: [0, 4] } };
        writeRaw(p, JSON.stringify(h), new Uint8Array(4));
      }, /unsupported dtype "F8_E4M3"/],
      ["bad_offsets", (p) => {
        writeRaw(p, JSON.stringify({ a: f32x([1], [8, 4]) }), new Uint8Array(8));
      }, /bad data_offsets/],
      ["bad_shape", (p) => {
        writeRaw(p, JSON.stringify({ a: f32x([-1], [0, 4]) }), new Uint8Array(4));
      }, /bad shape/],
    ];
    for (const [name, make, pattern] of bad) {
      const path = join(dir, `${name}.safetensors`);
      make(path);
      const e = catchError(() => SafetensorsFile.open(path));
      assert.ok(e instanceof SafetensorsError, `${name}: not a SafetensorsError: ${e}`);
      assert.equal(e.path, path);
      assert.ok(e.message.includes(path), `${name}: message does not name the file`);
      assert.match(e.message, pattern, name);
    }
    const missing = join(dir, "absent.safetensors");
    const e1 = catchError(() => SafetensorsFile.open(missing));
    assert.ok(e1 instanceof SafetensorsError && /cannot open/.test(e1.message), String(e1));
    const pickle = join(dir, "pytorch_model.bin");
    Deno.writeFileSync(pickle, new Uint8Array(64));
    const e2 = catchError(() => SafetensorsFile.open(pickle));
    assert.ok(e2 instanceof SafetensorsError, String(e2));
    assert.ok(e2.message.includes(pickle));
    assert.match(e2.message, /pickle/);
    // Nothing above took the process down.
    scope(() => assert.equal(ops.item(ops.sumAll(ops.ones([3], "f32", "cpu"))), 3));
  });
});

// ---------------------------------------------------------------------------------------------
// Runtime

// CI also runs these tests on a CUDA build against another torch (.ci/run), and names that torch
// in DIPSY_EXPECT_TORCH: the fixtures then stand for the reference numbers only.
Deno.test("runtimeInfo reports the torch version the fixtures were made with, or DIPSY_EXPECT_TORCH", () => {
  const info = runtimeInfo();
  const expected = Deno.env.get("DIPSY_EXPECT_TORCH") || loadFixture().meta.torch_version;
  assert.equal(info.torch_version, expected);
});

Deno.test("grad mode: noGrad blocks history, enableGrad and setGradEnabled restore it", () => {
  assert.equal(isGradEnabled(), true);
  scope(() => {
    const x = ops.full([3], 2, "f32", "cpu");
    ops.requiresGrad_(x, true);
    assert.equal(ops.mulScalar(x, 2).requiresGrad, true);
    const y = noGrad(() => {
      assert.equal(isGradEnabled(), false);
      assert.equal(enableGrad(() => ops.mulScalar(x, 2)).requiresGrad, true);
      assert.equal(isGradEnabled(), false, "enableGrad restores the outer mode");
      return ops.mulScalar(x, 2);
    });
    assert.equal(y.requiresGrad, false);
    assert.equal(isGradEnabled(), true);

    // In-place updates of a leaf are the optimizer's job: allowed only without grad.
    const e = catchError(() => ops.mulScalar_(x, 0.5));
    assert.ok(e instanceof TorchError && /leaf Variable/.test(e.message), String(e));
    noGrad(() => ops.mulScalar_(x, 0.5));
    assert.deepEqual([...x.toHost()], [1, 1, 1]);

    assert.throws(() =>
      noGrad(() => {
        throw new Error("inside");
      }), /inside/);
    assert.equal(isGradEnabled(), true, "noGrad restores the mode when fn throws");

    setGradEnabled(false);
    try {
      assert.equal(ops.add(x, x).requiresGrad, false);
    } finally {
      setGradEnabled(true);
    }

    // backward enables grad itself, so it works from inside noGrad.
    const loss = ops.sumAll(ops.square(x));
    noGrad(() => ops.backward(loss, null));
    assert.deepEqual([...ops.grad(x)!.toHost()], [2, 2, 2]);
  });
});
