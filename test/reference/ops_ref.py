"""Op parity fixtures: PyTorch computes the expected output of every op in native/ops_spec.ts.

Usage: python test/reference/ops_ref.py OUTDIR

Writes
  OUTDIR/cases.safetensors  every input tensor and expected output
  OUTDIR/cases.json         the case list (format below)
  OUTDIR/meta.json          torch version, a hash of this script (so stale fixtures are noticed),
                            and hand-written-test expectations that are not tensors
  OUTDIR/py_written.safetensors  a small file written by Python's safetensors with known values,
                            read back by the Deno safetensors tests

cases.json is a list of
  {"name": str, "op": <spec op name, snake_case>, "args": [...], "out": ..., "atol": number,
   optional "inplace": i, optional "manual_seed": n}
Each arg is {"t": key} (tensor), null (none / keep / default), a number, a boolean, a list of
integers, {"dtype": "f32"}, {"device": "cpu"}, {"gen": seed} (a fresh Generator(seed), which must
match torch.Generator().manual_seed(seed)) or {"tlist": [key, ...]}.
"out" is a key, a list of keys (ops returning several tensors) or {"scalar": number}. For
in-place ops, "inplace": i names the argument whose value after the call is compared with "out".
"manual_seed": n seeds the default generator first (dropout draws from it).

Tolerance: a floating-point value passes when |got - want| <= atol * max(1, |want|), i.e. atol is
an absolute bound for |want| <= 1 and a relative one above (so exp(3) is held to the same number
of significant digits as exp(0.1)). NaN must meet NaN and an infinity the same infinity. Integer
and bool outputs are compared exactly whatever atol says. Dtype and shape must match exactly.

Both sides call the same libtorch build, so most cases come out bit-identical; the tolerances
leave room for a different thread count splitting reductions differently, not for wrong kernels.
"""

import hashlib
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

# Elementwise fp32; accumulating ops (matmul, conv, sdpa, norms, reductions, losses).
EW = 1e-6
ACC = 1e-5
F64 = 1e-12
F16 = 1e-3
BF16 = 1e-2
EXACT = 0.0

DTYPES = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "bool",
}

# Ops exercised only by hand-written tests in test/ops_test.ts (they need autograd state or a
# sequence of calls, which one case cannot express).
HAND_WRITTEN = ["requires_grad_", "backward", "grad", "zero_grad", "adamw_step"]


class Dt:
    def __init__(self, dtype):
        self.dtype = dtype


class Dev:
    def __init__(self, device):
        self.device = device


class Gen:
    def __init__(self, seed):
        self.seed = seed


class TList:
    def __init__(self, tensors):
        self.tensors = tensors


class Fixtures:
    def __init__(self):
        self.tensors = {}
        self.cases = []
        self.names = set()
        # Inputs reused by several cases are stored once; the list keeps ids from being recycled.
        self.key_of = {}
        self.alive = []

    def put(self, key, t):
        assert key not in self.tensors, key
        # Clone: safetensors refuses tensors that share storage, and views must be materialised.
        self.tensors[key] = t.detach().clone().contiguous()
        return key

    def input_key(self, t, key):
        k = self.key_of.get(id(t))
        if k is None:
            k = self.put(key, t)
            self.key_of[id(t)] = k
            self.alive.append(t)
        return k

    def arg(self, name, i, a):
        if isinstance(a, torch.Tensor):
            return {"t": self.input_key(a, f"{name}.in{i}")}
        if isinstance(a, TList):
            return {"tlist": [self.input_key(t, f"{name}.in{i}.{j}") for j, t in enumerate(a.tensors)]}
        if isinstance(a, Dt):
            return {"dtype": DTYPES[a.dtype]}
        if isinstance(a, Dev):
            return {"device": a.device}
        if isinstance(a, Gen):
            return {"gen": a.seed}
        if a is None or isinstance(a, bool):
            return a
        if isinstance(a, (int, float)):
            assert math.isfinite(a), f"{name}: JSON cannot carry {a}"
            return a
        if isinstance(a, (list, tuple)):
            assert all(isinstance(v, int) for v in a), f"{name}: only int lists are args"
            return list(a)
        raise TypeError(f"{name}: cannot encode arg {a!r}")

    def case(self, name, op, args, out, atol, **extra):
        assert name not in self.names, f"duplicate case {name}"
        self.names.add(name)
        enc_args = [self.arg(name, i, a) for i, a in enumerate(args)]
        if isinstance(out, torch.Tensor):
            enc_out = self.put(f"{name}.out", out)
        elif isinstance(out, (list, tuple)):
            enc_out = [self.put(f"{name}.out" if i == 0 else f"{name}.out.{i}", t) for i, t in enumerate(out)]
        else:
            assert math.isfinite(out)
            enc_out = {"scalar": float(out)}
        c = {"name": name, "op": op, "args": enc_args, "out": enc_out, "atol": atol}
        c.update(extra)
        self.cases.append(c)


G = torch.Generator().manual_seed(20240607)


def rn(*shape, dtype=torch.float32, scale=1.0):
    # Draw in f64 then cast, so f16/bf16/f32 inputs of one shape hold "the same" numbers.
    return (torch.randn(shape, generator=G, dtype=torch.float64) * scale).to(dtype)


def ru(lo, hi, *shape, dtype=torch.float32):
    return (torch.rand(shape, generator=G, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


def ri(lo, hi, *shape, dtype=torch.int64):
    return torch.randint(lo, hi, shape, generator=G, dtype=dtype)


def rb(*shape, p=0.5):
    return torch.rand(shape, generator=G) < p


def creation(fx):
    c = fx.case
    c("zeros.f32", "zeros", [[2, 3, 4], Dt(torch.float32), Dev("cpu")], torch.zeros(2, 3, 4), EXACT)
    c("zeros.i64", "zeros", [[5], Dt(torch.int64), Dev("cpu")], torch.zeros(5, dtype=torch.int64), EXACT)
    c("zeros.default", "zeros", [[2, 2], None, None], torch.zeros(2, 2), EXACT)
    c("zeros.bf16", "zeros", [[3], Dt(torch.bfloat16), Dev("cpu")], torch.zeros(3, dtype=torch.bfloat16), EXACT)
    c("zeros.empty", "zeros", [[0, 4], Dt(torch.float32), Dev("cpu")], torch.zeros(0, 4), EXACT)
    c("ones.f16", "ones", [[3, 4], Dt(torch.float16), Dev("cpu")], torch.ones(3, 4, dtype=torch.float16), EXACT)
    c("ones.bool", "ones", [[2, 3], Dt(torch.bool), Dev("cpu")], torch.ones(2, 3, dtype=torch.bool), EXACT)
    c("ones.default", "ones", [[4], None, None], torch.ones(4), EXACT)
    c("full.f32", "full", [[2, 3], 3.5, Dt(torch.float32), Dev("cpu")], torch.full((2, 3), 3.5), EXACT)
    c("full.i64", "full", [[4], 7, Dt(torch.int64), Dev("cpu")], torch.full((4,), 7, dtype=torch.int64), EXACT)
    c("full.f64_scalar_shape", "full", [[], 2.5, Dt(torch.float64), Dev("cpu")],
      torch.full((), 2.5, dtype=torch.float64), EXACT)
    # A float fill value with no dtype: PyTorch infers the default float dtype.
    c("full.default", "full", [[3], -1.25, None, None], torch.full((3,), -1.25), EXACT)
    c("arange.f32", "arange", [0, 10, 1, Dt(torch.float32), Dev("cpu")], torch.arange(0.0, 10.0, 1.0), EXACT)
    c("arange.f64_frac", "arange", [-1, 1, 0.25, Dt(torch.float64), None],
      torch.arange(-1.0, 1.0, 0.25, dtype=torch.float64), EXACT)
    c("arange.i64", "arange", [0, 10, 3, Dt(torch.int64), Dev("cpu")],
      torch.arange(0, 10, 3, dtype=torch.int64), EXACT)
    # The binding takes doubles, so the Python twin of "no dtype" is arange over floats (f32).
    c("arange.default", "arange", [0, 5, 0.5, None, None], torch.arange(0.0, 5.0, 0.5), EXACT)
    c("arange.descending", "arange", [5, -5, -1.5, Dt(torch.float32), None], torch.arange(5.0, -5.0, -1.5), EXACT)
    c("linspace.f32", "linspace", [0, 1, 11, Dt(torch.float32), Dev("cpu")], torch.linspace(0.0, 1.0, 11), EW)
    c("linspace.f64", "linspace", [-3, 3, 7, Dt(torch.float64), None],
      torch.linspace(-3.0, 3.0, 7, dtype=torch.float64), F64)
    c("linspace.one_step", "linspace", [2, 9, 1, None, None], torch.linspace(2.0, 9.0, 1), EXACT)

    def tg(seed):
        return torch.Generator().manual_seed(seed)

    c("randn.f32", "randn", [[4, 5], Dt(torch.float32), Dev("cpu"), Gen(0)], torch.randn(4, 5, generator=tg(0)), EXACT)
    # Large enough that the vectorised normal path (16+ elements) is used, not the scalar one.
    c("randn.f32_large", "randn", [[1000], Dt(torch.float32), Dev("cpu"), Gen(42)],
      torch.randn(1000, generator=tg(42)), EXACT)
    c("randn.f64", "randn", [[3, 3], Dt(torch.float64), Dev("cpu"), Gen(7)],
      torch.randn(3, 3, generator=tg(7), dtype=torch.float64), EXACT)
    c("randn.bf16", "randn", [[64], Dt(torch.bfloat16), Dev("cpu"), Gen(8)],
      torch.randn(64, generator=tg(8), dtype=torch.bfloat16), EXACT)
    c("randn.default", "randn", [[2, 8], None, None, Gen(123456789)], torch.randn(2, 8, generator=tg(123456789)), EXACT)
    c("rand.f32", "rand", [[4, 5], Dt(torch.float32), Dev("cpu"), Gen(1)], torch.rand(4, 5, generator=tg(1)), EXACT)
    c("rand.f64", "rand", [[100], Dt(torch.float64), None, Gen(2)],
      torch.rand(100, generator=tg(2), dtype=torch.float64), EXACT)
    c("rand.f16", "rand", [[33], Dt(torch.float16), None, Gen(9)],
      torch.rand(33, generator=tg(9), dtype=torch.float16), EXACT)
    c("randint.i64", "randint", [0, 10, [4, 5], Dt(torch.int64), Dev("cpu"), Gen(3)],
      torch.randint(0, 10, (4, 5), generator=tg(3), dtype=torch.int64), EXACT)
    c("randint.i32_negative", "randint", [-5, 5, [50], Dt(torch.int32), None, Gen(4)],
      torch.randint(-5, 5, (50,), generator=tg(4), dtype=torch.int32), EXACT)
    c("randint.f32", "randint", [0, 100, [10], Dt(torch.float32), None, Gen(6)],
      torch.randint(0, 100, (10,), generator=tg(6), dtype=torch.float32), EXACT)
    # torch.randint's dtype defaults to int64.
    c("randint.default_dtype", "randint", [0, 10, [5], None, None, Gen(5)],
      torch.randint(0, 10, (5,), generator=tg(5)), EXACT)

    x = rn(2, 3)
    xi = ri(-9, 9, 3, 4)
    xb = rn(2, 5, dtype=torch.bfloat16)
    c("zeros_like.f32", "zeros_like", [x], torch.zeros_like(x), EXACT)
    c("zeros_like.i64", "zeros_like", [xi], torch.zeros_like(xi), EXACT)
    c("ones_like.bf16", "ones_like", [xb], torch.ones_like(xb), EXACT)
    c("ones_like.i64", "ones_like", [xi], torch.ones_like(xi), EXACT)
    c("full_like.f32", "full_like", [x, -2.5], torch.full_like(x, -2.5), EXACT)
    c("full_like.i64", "full_like", [xi, 3], torch.full_like(xi, 3.0), EXACT)


def unary_ops(fx):
    c = fx.case
    x = rn(4, 8, 16)
    pos = ru(0.05, 4.0, 4, 8, 16)
    away = torch.where(rb(4, 8, 16), ru(0.2, 3.0, 4, 8, 16), -ru(0.2, 3.0, 4, 8, 16))
    wide = rn(4, 8, 16, scale=3.0)
    table = [
        ("neg", x, torch.neg),
        ("exp", wide, torch.exp),
        ("log", pos, torch.log),
        ("sqrt", pos, torch.sqrt),
        ("rsqrt", pos, torch.rsqrt),
        ("abs", x, torch.abs),
        ("sin", wide, torch.sin),
        ("cos", wide, torch.cos),
        ("tanh", wide, torch.tanh),
        ("sigmoid", wide, torch.sigmoid),
        ("silu", wide, F.silu),
        ("relu", x, torch.relu),
        ("erf", x, torch.erf),
        ("square", wide, torch.square),
        ("reciprocal", away, torch.reciprocal),
        ("floor", wide, torch.floor),
    ]
    for op, inp, fn in table:
        c(f"{op}.f32", op, [inp], fn(inp), EW)

    # Exact halves check round-half-to-even; zeros check sign(0) == 0.
    halves = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, -0.0, 0.49999997, 1e7 + 0.5, 2.4, -2.6])
    c("round.halves", "round", [halves], torch.round(halves), EXACT)
    c("round.f32", "round", [wide], torch.round(wide), EXACT)
    signs = torch.cat([x.flatten()[:20], torch.zeros(4), torch.tensor([-0.0])])
    c("sign.f32", "sign", [signs], torch.sign(signs), EXACT)
    xi = ri(-50, 50, 6, 7)
    c("sign.i64", "sign", [xi], torch.sign(xi), EXACT)
    special = torch.tensor([1.0, float("inf"), float("-inf"), float("nan"), -0.0, 3e38, 1e-45, -7.0])
    c("isfinite.f32", "isfinite", [special], torch.isfinite(special), EXACT)
    c("isfinite.i64", "isfinite", [xi], torch.isfinite(xi), EXACT)
    mask = rb(5, 6)
    c("logical_not.bool", "logical_not", [mask], torch.logical_not(mask), EXACT)
    with_zeros = torch.where(rb(5, 6), torch.zeros(5, 6), rn(5, 6))
    c("logical_not.f32", "logical_not", [with_zeros], torch.logical_not(with_zeros), EXACT)

    # Other dtypes: f64 keeps a tight tolerance, 16-bit ones are held to their precision.
    x64 = rn(3, 17, dtype=torch.float64, scale=2.0)
    c("exp.f64", "exp", [x64], torch.exp(x64), F64)
    c("tanh.f64", "tanh", [x64], torch.tanh(x64), F64)
    xh = rn(4, 33, dtype=torch.float16, scale=2.0)
    c("tanh.f16", "tanh", [xh], torch.tanh(xh), F16)
    c("sigmoid.f16", "sigmoid", [xh], torch.sigmoid(xh), F16)
    xbf = rn(4, 33, dtype=torch.bfloat16, scale=2.0)
    c("silu.bf16", "silu", [xbf], F.silu(xbf), BF16)
    c("exp.bf16", "exp", [xbf], torch.exp(xbf), BF16)
    c("neg.i64", "neg", [xi], torch.neg(xi), EXACT)
    c("abs.i64", "abs", [xi], torch.abs(xi), EXACT)
    c("square.i64", "square", [xi], torch.square(xi), EXACT)
    # Integer inputs to float functions promote to the default float dtype.
    c("sqrt.i64", "sqrt", [xi.abs()], torch.sqrt(xi.abs()), EW)

    c("gelu.erf", "gelu", [wide, False], F.gelu(wide), EW)
    c("gelu.tanh", "gelu", [wide, True], F.gelu(wide, approximate="tanh"), EW)
    c("gelu.bf16", "gelu", [xbf, False], F.gelu(xbf), BF16)
    # The reference expression CLIP/transformers use, in the same op order.
    c("quick_gelu.f32", "quick_gelu", [wide], wide * torch.sigmoid(wide * 1.702), EW)
    c("quick_gelu.f16", "quick_gelu", [xh], xh * torch.sigmoid(xh * 1.702), F16)

    c("clamp.both", "clamp", [x, -0.5, 0.5], torch.clamp(x, -0.5, 0.5), EXACT)
    c("clamp.max_only", "clamp", [x, None, 0.0], torch.clamp(x, max=0.0), EXACT)
    c("clamp.min_only", "clamp", [x, 0.25, None], torch.clamp(x, min=0.25), EXACT)
    c("clamp.i64", "clamp", [xi, -10, 10], torch.clamp(xi, -10.0, 10.0), EXACT)

    c("pow_scalar.frac", "pow_scalar", [pos, 2.5], torch.pow(pos, 2.5), EW)
    c("pow_scalar.square", "pow_scalar", [x, 2], torch.pow(x, 2.0), EW)
    c("pow_scalar.neg", "pow_scalar", [pos, -1.5], torch.pow(pos, -1.5), EW)
    c("pow_scalar.half", "pow_scalar", [pos, 0.5], torch.pow(pos, 0.5), EW)


def binary_ops(fx):
    c = fx.case
    a = rn(4, 8, 16)
    b = rn(4, 8, 16)
    bc_a = rn(4, 1, 8)
    bc_b = rn(3, 8)
    away = torch.where(rb(4, 8, 16), ru(0.2, 3.0, 4, 8, 16), -ru(0.2, 3.0, 4, 8, 16))
    for op, fn in [("add", torch.add), ("sub", torch.sub), ("mul", torch.mul), ("maximum", torch.maximum),
                   ("minimum", torch.minimum)]:
        c(f"{op}.f32", op, [a, b], fn(a, b), EW)
        c(f"{op}.broadcast", op, [bc_a, bc_b], fn(bc_a, bc_b), EW)
    c("div.f32", "div", [a, away], torch.div(a, away), EW)
    c("div.broadcast", "div", [bc_b, away[0, :3, :8]], torch.div(bc_b, away[0, :3, :8]), EW)
    ai = ri(-20, 20, 5, 6)
    bi = torch.where(rb(5, 6), ri(1, 7, 5, 6), -ri(1, 7, 5, 6))
    c("add.i64", "add", [ai, bi], ai + bi, EXACT)
    c("mul.i64", "mul", [ai, bi], ai * bi, EXACT)
    # True division of integers gives floats.
    c("div.i64", "div", [ai, bi], torch.div(ai, bi), EW)
    # Type promotion across operands.
    af = rn(5, 6)
    c("add.i64_f32", "add", [ai, af], ai + af, EW)
    ah = rn(5, 6, dtype=torch.float16)
    c("mul.f32_f16", "mul", [af, ah], af * ah, EW)
    a64 = rn(5, 6, dtype=torch.float64)
    c("sub.f32_f64", "sub", [af, a64], af - a64, F64)
    abf = rn(5, 6, dtype=torch.bfloat16)
    c("add.bf16", "add", [abf, abf.flip(0)], abf + abf.flip(0), BF16)
    base = ru(0.1, 3.0, 4, 8, 16)
    expo = rn(4, 8, 16)
    c("pow.f32", "pow", [base, expo], torch.pow(base, expo), EW)
    negbase = rn(6, 5)
    ints = ri(0, 4, 6, 5).to(torch.float32)
    c("pow.neg_base_int_exp", "pow", [negbase, ints], torch.pow(negbase, ints), EW)
    ei = ri(0, 4, 5, 6)
    c("pow.i64", "pow", [ai, ei], torch.pow(ai, ei), EXACT)

    c("add_scaled.f32", "add_scaled", [a, b, 0.5], torch.add(a, b, alpha=0.5), EW)
    c("add_scaled.broadcast", "add_scaled", [bc_a, bc_b, -2.0], torch.add(bc_a, bc_b, alpha=-2.0), EW)

    for op, fn in [("add_scalar", torch.add), ("sub_scalar", torch.sub), ("mul_scalar", torch.mul),
                   ("div_scalar", torch.div), ("rsub_scalar", torch.rsub)]:
        c(f"{op}.f32", op, [a, 1.5], fn(a, 1.5), EW)
    c("mul_scalar.f16", "mul_scalar", [ah, 0.125], ah * 0.125, EXACT)
    # 0.3 and 1.1 are not representable in 16 bits: PyTorch computes with the full double.
    for op, fn in [("add_scalar", torch.add), ("sub_scalar", torch.sub), ("mul_scalar", torch.mul),
                   ("div_scalar", torch.div), ("rsub_scalar", torch.rsub)]:
        c(f"{op}.bf16", op, [abf, 0.3], fn(abf, 0.3), EXACT)
        c(f"{op}.f16_inexact", op, [ah, 1.1], fn(ah, 1.1), EXACT)
    # The scalar crosses as a double, so an integer tensor meets a float scalar and promotes:
    # PyTorch's x * 2.0, not x * 2.
    c("mul_scalar.i64", "mul_scalar", [ai, 2], ai * 2.0, EXACT)
    c("add_scalar.i64", "add_scalar", [ai, 0.5], ai + 0.5, EXACT)
    c("div_scalar.f64", "div_scalar", [a64, 3.0], a64 / 3.0, F64)
    c("rsub_scalar.i64", "rsub_scalar", [ai, 1], torch.rsub(ai, 1.0), EXACT)


def comparison_ops(fx):
    c = fx.case
    # Coarse values make ties, so eq/le/ge see both outcomes.
    a = torch.round(rn(6, 7, scale=2.0))
    b = torch.round(rn(6, 7, scale=2.0))
    brow = torch.round(rn(7, scale=2.0))
    for op, fn in [("eq", torch.eq), ("ne", torch.ne), ("lt", torch.lt), ("le", torch.le), ("gt", torch.gt),
                   ("ge", torch.ge)]:
        c(f"{op}.f32", op, [a, b], fn(a, b), EXACT)
        c(f"{op}.broadcast", op, [a, brow], fn(a, brow), EXACT)
    ai = ri(-3, 3, 6, 7)
    bi = ri(-3, 3, 6, 7)
    c("eq.i64", "eq", [ai, bi], torch.eq(ai, bi), EXACT)
    c("lt.i64_f32", "lt", [ai, a], torch.lt(ai, a), EXACT)
    for op, fn in [("eq_scalar", torch.eq), ("lt_scalar", torch.lt), ("le_scalar", torch.le),
                   ("gt_scalar", torch.gt), ("ge_scalar", torch.ge)]:
        c(f"{op}.f32", op, [a, 1.0], fn(a, 1.0), EXACT)
        c(f"{op}.i64", op, [ai, -1], fn(ai, -1.0), EXACT)
    c("gt_scalar.frac", "gt_scalar", [a, 0.5], torch.gt(a, 0.5), EXACT)

    m1 = rb(5, 6)
    m2 = rb(5, 6)
    c("logical_and.bool", "logical_and", [m1, m2], torch.logical_and(m1, m2), EXACT)
    c("logical_or.bool", "logical_or", [m1, m2], torch.logical_or(m1, m2), EXACT)
    fz = torch.where(rb(5, 6), torch.zeros(5, 6), rn(5, 6))
    c("logical_and.f32", "logical_and", [fz, m2], torch.logical_and(fz, m2), EXACT)
    row = rb(6)
    c("logical_or.broadcast", "logical_or", [m1, row], torch.logical_or(m1, row), EXACT)

    cond = rb(4, 5)
    x = rn(4, 5)
    y = rn(4, 5)
    c("where.f32", "where", [cond, x, y], torch.where(cond, x, y), EXACT)
    ycol = rn(4, 1)
    c("where.broadcast", "where", [cond, x, ycol], torch.where(cond, x, ycol), EXACT)
    wi_a, wi_b = ri(0, 9, 4, 5), ri(-9, 0, 4, 5)
    c("where.i64", "where", [cond, wi_a, wi_b], torch.where(cond, wi_a, wi_b), EXACT)
    c("masked_fill.f32", "masked_fill", [x, cond, -1e9], x.masked_fill(cond, -1e9), EXACT)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    sc = rn(2, 5, 5)
    c("masked_fill.broadcast", "masked_fill", [sc, causal, -10000.0], sc.masked_fill(causal, -10000.0), EXACT)
    c("lerp.f32", "lerp", [x, y, 0.3], torch.lerp(x, y, 0.3), EW)
    # Weights >= 0.5 take the other branch of ATen's lerp formula.
    c("lerp.high_weight", "lerp", [x, y, 0.9], torch.lerp(x, y, 0.9), EW)


def linalg_ops(fx):
    c = fx.case
    a = rn(2, 3, 4, 5)
    b = rn(5, 6)
    c("matmul.broadcast", "matmul", [a, b], a @ b, ACC)
    v = rn(4)
    m = rn(4, 3)
    c("matmul.vec_mat", "matmul", [v, m], v @ m, ACC)
    c("matmul.mat_vec", "matmul", [m.T.contiguous(), v], m.T @ v, ACC)
    ba = rn(2, 8, 16)
    bb = rn(2, 16, 4)
    c("matmul.batched", "matmul", [ba, bb], ba @ bb, ACC)
    a64 = rn(7, 9, dtype=torch.float64)
    b64 = rn(9, 3, dtype=torch.float64)
    c("matmul.f64", "matmul", [a64, b64], a64 @ b64, F64)
    ah = rn(8, 16, dtype=torch.bfloat16)
    bh = rn(16, 8, dtype=torch.bfloat16)
    c("matmul.bf16", "matmul", [ah, bh], ah @ bh, BF16)
    m1 = rn(16, 32)
    m2 = rn(32, 8)
    c("mm.f32", "mm", [m1, m2], torch.mm(m1, m2), ACC)
    b1 = rn(4, 8, 16)
    b2 = rn(4, 16, 8)
    c("bmm.f32", "bmm", [b1, b2], torch.bmm(b1, b2), ACC)
    inp = rn(4, 8, 8)
    c("baddbmm.f32", "baddbmm", [inp, b1, b2, 0.5, 2.0], torch.baddbmm(inp, b1, b2, beta=0.5, alpha=2.0), ACC)
    c("baddbmm.beta0", "baddbmm", [inp, b1, b2, 0.0, 1.0], torch.baddbmm(inp, b1, b2, beta=0.0, alpha=1.0), ACC)
    bias = rn(8)
    c("addmm.f32", "addmm", [bias, m1, m2, 1.0, 1.0], torch.addmm(bias, m1, m2), ACC)
    c("addmm.scaled", "addmm", [bias, m1, m2, 0.0, 0.5], torch.addmm(bias, m1, m2, beta=0.0, alpha=0.5), ACC)
    x = rn(2, 5, 32)
    w = rn(16, 32)
    lb = rn(16)
    c("linear.bias", "linear", [x, w, lb], F.linear(x, w, lb), ACC)
    c("linear.no_bias", "linear", [x, w, None], F.linear(x, w), ACC)

    xc = rn(2, 4, 8, 8)
    w3 = rn(8, 4, 3, 3, scale=0.3)
    cb = rn(8)
    c("conv2d.s1_p1", "conv2d", [xc, w3, cb, [1, 1], [1, 1], [1, 1], 1],
      F.conv2d(xc, w3, cb, stride=1, padding=1), ACC)
    c("conv2d.s2_p1", "conv2d", [xc, w3, cb, [2, 2], [1, 1], [1, 1], 1],
      F.conv2d(xc, w3, cb, stride=2, padding=1), ACC)
    wg = rn(8, 2, 3, 3, scale=0.3)
    c("conv2d.groups2", "conv2d", [xc, wg, cb, [1, 1], [1, 1], [1, 1], 2],
      F.conv2d(xc, wg, cb, padding=1, groups=2), ACC)
    wd = rn(4, 1, 3, 3, scale=0.3)
    c("conv2d.depthwise", "conv2d", [xc, wd, None, [1, 1], [1, 1], [1, 1], 4],
      F.conv2d(xc, wd, None, padding=1, groups=4), ACC)
    c("conv2d.dilation2", "conv2d", [xc, w3, cb, [1, 1], [2, 2], [2, 2], 1],
      F.conv2d(xc, w3, cb, padding=2, dilation=2), ACC)
    w1 = rn(6, 4, 1, 1)
    c("conv2d.1x1_no_bias", "conv2d", [xc, w1, None, [1, 1], [0, 0], [1, 1], 1], F.conv2d(xc, w1), ACC)
    c("conv2d.asymmetric", "conv2d", [xc, w3, cb, [1, 2], [0, 1], [1, 1], 1],
      F.conv2d(xc, w3, cb, stride=(1, 2), padding=(0, 1)), ACC)

    q = rn(2, 8, 16, 32)
    k = rn(2, 8, 16, 32)
    vv = rn(2, 8, 16, 32)
    sdpa = F.scaled_dot_product_attention
    c("sdpa.plain", "sdpa", [q, k, vv, None, 0.0, False, None], sdpa(q, k, vv), ACC)
    c("sdpa.causal", "sdpa", [q, k, vv, None, 0.0, True, None], sdpa(q, k, vv, is_causal=True), ACC)
    c("sdpa.scale", "sdpa", [q, k, vv, None, 0.0, False, 0.1], sdpa(q, k, vv, scale=0.1), ACC)
    bmask = rb(2, 1, 16, 16, p=0.7)
    bmask[..., 0] = True  # every query row keeps at least one key, so no row is all -inf
    c("sdpa.bool_mask", "sdpa", [q, k, vv, bmask, 0.0, False, None], sdpa(q, k, vv, attn_mask=bmask), ACC)
    fmask = rn(16, 16)
    c("sdpa.float_mask", "sdpa", [q, k, vv, fmask, 0.0, False, None], sdpa(q, k, vv, attn_mask=fmask), ACC)
    kx = rn(2, 8, 24, 32)
    vx = rn(2, 8, 24, 32)
    c("sdpa.cross_causal_scale", "sdpa", [q, kx, vx, None, 0.0, True, 0.25],
      sdpa(q, kx, vx, is_causal=True, scale=0.25), ACC)
    q3 = rn(4, 10, 16)
    c("sdpa.3d", "sdpa", [q3, q3, q3, None, 0.0, False, None], sdpa(q3, q3, q3), ACC)


def norm_loss_ops(fx):
    c = fx.case
    x = rn(4, 8, 16, scale=3.0)
    c("softmax.last", "softmax", [x, -1], torch.softmax(x, -1), ACC)
    c("softmax.dim1", "softmax", [x, 1], torch.softmax(x, 1), ACC)
    big = rn(3, 50, scale=60.0)
    c("softmax.large_logits", "softmax", [big, -1], torch.softmax(big, -1), ACC)
    c("log_softmax.last", "log_softmax", [x, -1], torch.log_softmax(x, -1), ACC)
    c("log_softmax.large_logits", "log_softmax", [big, 1], torch.log_softmax(big, 1), ACC)
    xh = rn(4, 40, dtype=torch.float16, scale=3.0)
    c("softmax.f16", "softmax", [xh, -1], torch.softmax(xh, -1), F16)

    xg = rn(2, 64, 8, 8, scale=2.0) + 0.5
    gw = rn(64)
    gb = rn(64)
    c("group_norm.affine", "group_norm", [xg, 32, gw, gb, 1e-5], F.group_norm(xg, 32, gw, gb, 1e-5), ACC)
    c("group_norm.plain", "group_norm", [xg, 32, None, None, 1e-5], F.group_norm(xg, 32, eps=1e-5), ACC)
    xg2 = rn(1, 128, 4, 4)
    c("group_norm.eps1e-6", "group_norm", [xg2, 32, None, None, 1e-6], F.group_norm(xg2, 32, eps=1e-6), ACC)
    c("group_norm.groups8", "group_norm", [xg, 8, gw, None, 1e-5], F.group_norm(xg, 8, gw, None, 1e-5), ACC)
    xl = rn(2, 16, 64, scale=2.0) - 1.0
    lw = rn(64)
    lb = rn(64)
    c("layer_norm.affine", "layer_norm", [xl, [64], lw, lb, 1e-5], F.layer_norm(xl, [64], lw, lb, 1e-5), ACC)
    c("layer_norm.two_dims", "layer_norm", [xl, [16, 64], None, None, 1e-5],
      F.layer_norm(xl, [16, 64], eps=1e-5), ACC)
    c("layer_norm.weight_only", "layer_norm", [xl, [64], lw, None, 1e-6],
      F.layer_norm(xl, [64], lw, None, 1e-6), ACC)

    xd = rn(8, 32)
    c("dropout.eval", "dropout", [xd, 0.5, False], F.dropout(xd, 0.5, False), EXACT)
    c("dropout.p0_train", "dropout", [xd, 0.0, True], F.dropout(xd, 0.0, True), EXACT)
    c("dropout.p1_train", "dropout", [xd, 1.0, True], F.dropout(xd, 1.0, True), EXACT)
    torch.manual_seed(31337)
    c("dropout.seeded", "dropout", [xd, 0.3, True], F.dropout(xd, 0.3, True), EW, manual_seed=31337)

    ew = rn(50, 16)
    ids = ri(0, 50, 2, 7)
    c("embedding.i64", "embedding", [ew, ids], F.embedding(ids, ew), EXACT)
    ids32 = ri(0, 50, 9, dtype=torch.int32)
    c("embedding.i32", "embedding", [ew, ids32], F.embedding(ids32, ew), EXACT)

    logits = rn(8, 10, scale=2.0)
    target = ri(0, 10, 8)
    for red, rname in [(0, "none"), (1, "mean"), (2, "sum")]:
        c(f"cross_entropy.{rname}", "cross_entropy", [logits, target, red, 0.0],
          F.cross_entropy(logits, target, reduction=rname), ACC)
        c(f"cross_entropy.{rname}_smooth", "cross_entropy", [logits, target, red, 0.1],
          F.cross_entropy(logits, target, reduction=rname, label_smoothing=0.1), ACC)
    ign = target.clone()
    ign[[1, 5]] = -100
    c("cross_entropy.ignore_index", "cross_entropy", [logits, ign, 1, 0.0], F.cross_entropy(logits, ign), ACC)
    c("cross_entropy.ignore_index_smooth", "cross_entropy", [logits, ign, 1, 0.2],
      F.cross_entropy(logits, ign, label_smoothing=0.2), ACC)
    probs = torch.softmax(rn(8, 10), -1)
    c("cross_entropy.prob_target", "cross_entropy", [logits, probs, 1, 0.0], F.cross_entropy(logits, probs), ACC)
    seg = rn(2, 5, 4, 4)
    segt = ri(0, 5, 2, 4, 4)
    c("cross_entropy.spatial", "cross_entropy", [seg, segt, 1, 0.0], F.cross_entropy(seg, segt), ACC)

    pa = rn(4, 9)
    pb = rn(4, 9)
    for red, rname in [(0, "none"), (1, "mean"), (2, "sum")]:
        c(f"mse_loss.{rname}", "mse_loss", [pa, pb, red], F.mse_loss(pa, pb, reduction=rname), ACC)


def shape_ops(fx):
    c = fx.case
    x = rn(2, 3, 4)
    c("reshape.f32", "reshape", [x, [6, 4]], x.reshape(6, 4), EXACT)
    c("reshape.infer", "reshape", [x, [-1, 2]], x.reshape(-1, 2), EXACT)
    one = rn(1, 1)
    c("reshape.to_scalar", "reshape", [one, []], one.reshape(()), EXACT)
    x4 = rn(2, 3, 4, 5)
    c("permute.f32", "permute", [x4, [0, 2, 3, 1]], x4.permute(0, 2, 3, 1), EXACT)
    c("permute.negative", "permute", [x4, [-1, 0, 2, 1]], x4.permute(-1, 0, 2, 1), EXACT)
    c("transpose.f32", "transpose", [x4, 1, -1], x4.transpose(1, -1), EXACT)
    xi = ri(0, 100, 3, 4)
    c("transpose.i64", "transpose", [xi, 0, 1], xi.transpose(0, 1), EXACT)
    c("contiguous.f32", "contiguous", [x], x.contiguous(), EXACT)
    c("unsqueeze.front", "unsqueeze", [x, 0], x.unsqueeze(0), EXACT)
    c("unsqueeze.back", "unsqueeze", [x, -1], x.unsqueeze(-1), EXACT)
    s = rn(3, 1, 4)
    c("squeeze.dim1", "squeeze", [s, 1], s.squeeze(1), EXACT)
    c("squeeze.not_one", "squeeze", [s, 0], s.squeeze(0), EXACT)
    c("flatten.tail", "flatten", [x4, 1, -1], x4.flatten(1, -1), EXACT)
    c("flatten.head", "flatten", [x4, 0, 1], x4.flatten(0, 1), EXACT)
    col = rn(3, 1)
    c("expand.f32", "expand", [col, [3, 5]], col.expand(3, 5), EXACT)
    rowv = rn(1, 4)
    c("expand.new_dims", "expand", [rowv, [2, 3, -1]], rowv.expand(2, 3, -1), EXACT)
    r = rn(2, 3)
    c("repeat.f32", "repeat", [r, [2, 1, 3]], r.repeat(2, 1, 3), EXACT)
    c("repeat.i64", "repeat", [xi, [1, 2]], xi.repeat(1, 2), EXACT)
    y = rn(4, 12, 3)
    c("slice.step", "slice", [y, 1, 2, 10, 3], y[:, 2:10:3], EXACT)
    c("slice.negative_start", "slice", [y, 1, -4, 12, 1], y[:, -4:], EXACT)
    c("slice.end_past", "slice", [y, 0, 1, 1000, 1], y[1:1000], EXACT)
    c("narrow.f32", "narrow", [y, 1, 3, 5], y.narrow(1, 3, 5), EXACT)
    c("narrow.negative_start", "narrow", [y, 2, -2, 2], y.narrow(2, -2, 2), EXACT)
    c("select.f32", "select", [y, 1, 4], y.select(1, 4), EXACT)
    c("select.negative", "select", [y, 0, -1], y.select(0, -1), EXACT)
    idx = torch.tensor([3, 0, 3, 11, 7], dtype=torch.int64)
    c("index_select.dim1", "index_select", [y, 1, idx], y.index_select(1, idx), EXACT)
    idx0 = torch.tensor([2, 2, 0], dtype=torch.int64)
    c("index_select.dim0", "index_select", [y, 0, idx0], y.index_select(0, idx0), EXACT)
    g = rn(4, 8)
    gi = ri(0, 8, 4, 3)
    c("gather.dim1", "gather", [g, 1, gi], torch.gather(g, 1, gi), EXACT)
    gi0 = ri(0, 4, 2, 8)
    c("gather.dim0", "gather", [g, 0, gi0], torch.gather(g, 0, gi0), EXACT)

    p = rn(2, 3, 4)
    q = rn(2, 5, 4)
    rr = rn(2, 1, 4)
    c("cat.dim1", "cat", [TList([p, q, rr]), 1], torch.cat([p, q, rr], 1), EXACT)
    p0 = rn(1, 3, 4)
    c("cat.dim0", "cat", [TList([p, p0]), 0], torch.cat([p, p0], 0), EXACT)
    e = torch.zeros(2, 0, 4)
    c("cat.with_empty", "cat", [TList([p, e]), 1], torch.cat([p, e], 1), EXACT)
    c("cat.negative_dim", "cat", [TList([p, p]), -1], torch.cat([p, p], -1), EXACT)
    p2 = rn(2, 3, 4)
    c("stack.dim0", "stack", [TList([p, p2]), 0], torch.stack([p, p2], 0), EXACT)
    c("stack.last", "stack", [TList([p, p2, p]), -1], torch.stack([p, p2, p], -1), EXACT)
    ch = rn(8, 6)
    c("chunk.uneven", "chunk", [ch, 3, 0], list(ch.chunk(3, 0)), EXACT)
    c("chunk.dim1", "chunk", [ch, 2, 1], list(ch.chunk(2, 1)), EXACT)
    sp = rn(10, 3)
    c("split.sizes", "split", [sp, [2, 3, 5], 0], list(sp.split([2, 3, 5], 0)), EXACT)
    c("split.dim1", "split", [sp, [1, 2], 1], list(sp.split([1, 2], 1)), EXACT)
    c("flip.dim0", "flip", [x, [0]], x.flip(0), EXACT)
    c("flip.two_dims", "flip", [x, [1, 2]], x.flip(1, 2), EXACT)
    sq = rn(2, 5, 5)
    c("tril.main", "tril", [sq, 0], sq.tril(0), EXACT)
    c("tril.below", "tril", [sq, -1], sq.tril(-1), EXACT)
    c("triu.above", "triu", [sq, 1], sq.triu(1), EXACT)
    rect = rn(4, 6)
    c("triu.rect", "triu", [rect, -1], rect.triu(-1), EXACT)

    img = rn(2, 3, 5, 6)
    c("pad.constant", "pad", [img, [1, 2, 3, 4], 0, 0.5], F.pad(img, [1, 2, 3, 4], "constant", 0.5), EXACT)
    c("pad.constant_zero", "pad", [img, [1, 1], 0, 0.0], F.pad(img, [1, 1]), EXACT)
    c("pad.reflect", "pad", [img, [2, 2, 1, 1], 1, 0.0], F.pad(img, [2, 2, 1, 1], "reflect"), EXACT)
    c("pad.replicate", "pad", [img, [1, 1, 1, 1], 2, 0.0], F.pad(img, [1, 1, 1, 1], "replicate"), EXACT)
    c("pad.circular", "pad", [img, [1, 1, 2, 0], 3, 0.0], F.pad(img, [1, 1, 2, 0], "circular"), EXACT)
    seq = rn(2, 3, 8)
    c("pad.reflect_1d", "pad", [seq, [3, 3], 1, 0.0], F.pad(seq, [3, 3], "reflect"), EXACT)
    c("pad.negative_crop", "pad", [img, [-1, -1, 0, 0], 0, 0.0], F.pad(img, [-1, -1, 0, 0]), EXACT)

    im = rn(2, 3, 5, 7)
    c("upsample_nearest2d.up", "upsample_nearest2d", [im, 10, 14],
      F.interpolate(im, size=(10, 14), mode="nearest"), EXACT)
    c("upsample_nearest2d.down", "upsample_nearest2d", [im, 3, 4],
      F.interpolate(im, size=(3, 4), mode="nearest"), EXACT)
    x8 = rn(2, 3, 8, 8)
    x16 = rn(2, 3, 16, 16)
    c("interpolate.nearest", "interpolate", [x8, 16, 16, 0, False, False],
      F.interpolate(x8, size=(16, 16), mode="nearest"), EXACT)
    c("interpolate.nearest_odd", "interpolate", [x8, 11, 13, 0, False, False],
      F.interpolate(x8, size=(11, 13), mode="nearest"), EXACT)
    for mode, code in [("bilinear", 1), ("bicubic", 2)]:
        for ac in [False, True]:
            c(f"interpolate.{mode}_up_ac{int(ac)}", "interpolate", [x8, 13, 19, code, ac, False],
              F.interpolate(x8, size=(13, 19), mode=mode, align_corners=ac), EW)
            c(f"interpolate.{mode}_down_aa_ac{int(ac)}", "interpolate", [x16, 5, 7, code, ac, True],
              F.interpolate(x16, size=(5, 7), mode=mode, align_corners=ac, antialias=True), EW)
        c(f"interpolate.{mode}_down_no_aa", "interpolate", [x16, 5, 7, code, False, False],
          F.interpolate(x16, size=(5, 7), mode=mode, align_corners=False), EW)


def reduction_ops(fx):
    c = fx.case
    x = rn(3, 4, 5, scale=2.0)
    for op, fn in [("sum", torch.sum), ("mean", torch.mean), ("amax", torch.amax), ("amin", torch.amin),
                   ("logsumexp", torch.logsumexp)]:
        c(f"{op}.dim1", op, [x, [1], False], fn(x, [1], False), ACC)
        c(f"{op}.dim1_keepdim", op, [x, [1], True], fn(x, [1], True), ACC)
        c(f"{op}.dims02", op, [x, [0, 2], False], fn(x, [0, 2], False), ACC)
        c(f"{op}.last_keepdim", op, [x, [-1], True], fn(x, [-1], True), ACC)
    # An empty dim list reduces everything for these ops.
    c("sum.no_dims", "sum", [x, [], False], torch.sum(x, [], False), ACC)
    c("mean.no_dims", "mean", [x, [], True], torch.mean(x, [], True), ACC)
    c("amax.no_dims", "amax", [x, [], False], torch.amax(x, [], False), EXACT)
    xi = ri(-100, 100, 4, 6)
    c("sum.i64", "sum", [xi, [0], False], torch.sum(xi, [0], False), EXACT)
    c("amax.i64", "amax", [xi, [1], True], torch.amax(xi, [1], True), EXACT)
    mb = rb(4, 6)
    c("sum.bool", "sum", [mb, [1], False], torch.sum(mb, [1], False), EXACT)
    xh = rn(6, 64, dtype=torch.float16)
    c("sum.f16", "sum", [xh, [1], False], torch.sum(xh, [1], False), F16)
    xbf = rn(6, 64, dtype=torch.bfloat16)
    c("mean.bf16", "mean", [xbf, [1], False], torch.mean(xbf, [1], False), BF16)
    big = rn(64, 256)
    c("sum.large", "sum", [big, [1], False], torch.sum(big, [1], False), ACC)
    big80 = big * 80
    c("logsumexp.large_values", "logsumexp", [big80, [1], False], torch.logsumexp(big80, [1], False), ACC)

    c("sum_all.f32", "sum_all", [x], torch.sum(x), ACC)
    c("sum_all.i64", "sum_all", [xi], torch.sum(xi), EXACT)
    c("sum_all.bool", "sum_all", [mb], torch.sum(mb), EXACT)
    empty = torch.zeros(0, 3)
    c("sum_all.empty", "sum_all", [empty], torch.sum(empty), EXACT)
    c("mean_all.f32", "mean_all", [x], torch.mean(x), ACC)
    big64 = big.double()
    c("mean_all.f64", "mean_all", [big64], torch.mean(big64), F64)
    c("max_all.f32", "max_all", [x], torch.max(x), EXACT)
    c("max_all.i64", "max_all", [xi], torch.max(xi), EXACT)
    c("min_all.f32", "min_all", [x], torch.min(x), EXACT)
    c("min_all.i64", "min_all", [xi], torch.min(xi), EXACT)
    c("all.bool", "all", [mb], torch.all(mb), EXACT)
    alltrue = torch.ones(3, 3, dtype=torch.bool)
    c("all.true", "all", [alltrue], torch.all(alltrue), EXACT)
    c("all.f32", "all", [x], torch.all(x), EXACT)
    c("any.bool", "any", [mb], torch.any(mb), EXACT)
    nonez = torch.zeros(4, 2, dtype=torch.bool)
    c("any.false", "any", [nonez], torch.any(nonez), EXACT)
    zf = torch.zeros(5)
    c("any.f32_zeros", "any", [zf], torch.any(zf), EXACT)
    c("argmax.dim1", "argmax", [x, 1, False], torch.argmax(x, 1, False), EXACT)
    c("argmax.last_keepdim", "argmax", [x, -1, True], torch.argmax(x, -1, True), EXACT)
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    c("argmax.ties_first", "argmax", [ties, 1, False], torch.argmax(ties, 1, False), EXACT)
    c("variance.dim1", "variance", [x, [1], 1.0, False], torch.var(x, [1], correction=1), ACC)
    c("variance.population", "variance", [x, [1], 0.0, False], torch.var(x, [1], correction=0), ACC)
    c("variance.keepdim", "variance", [x, [0, 2], 1.0, True], torch.var(x, [0, 2], correction=1, keepdim=True), ACC)
    c("variance.all_dims", "variance", [x, [], 1.0, False], torch.var(x, [], correction=1), ACC)
    c("norm.l2_last", "norm", [x, 2.0, [-1], False], torch.linalg.vector_norm(x, 2.0, [-1], False), ACC)
    c("norm.l1_keepdim", "norm", [x, 1.0, [1, 2], True], torch.linalg.vector_norm(x, 1.0, [1, 2], True), ACC)
    c("norm.p3", "norm", [x, 3.0, [0], False], torch.linalg.vector_norm(x, 3.0, [0], False), ACC)
    c("norm.all", "norm", [x, 2.0, [], False], torch.linalg.vector_norm(x, 2.0, [], False), ACC)
    c("cumsum.dim1", "cumsum", [x, 1], torch.cumsum(x, 1), ACC)
    c("cumsum.i64", "cumsum", [xi, -1], torch.cumsum(xi, -1), EXACT)
    c("cumsum.bool", "cumsum", [mb, 1], torch.cumsum(mb, 1), EXACT)
    near1 = ru(0.8, 1.25, 5, 6)
    c("cumprod.dim0", "cumprod", [near1, 0], torch.cumprod(near1, 0), ACC)
    c("cumprod.last", "cumprod", [near1, -1], torch.cumprod(near1, -1), ACC)


def dtype_ops(fx):
    c = fx.case
    x = rn(4, 9, scale=3.0)
    for dt, tol in [(torch.float16, EXACT), (torch.bfloat16, EXACT), (torch.float64, EXACT),
                    (torch.int64, EXACT), (torch.int32, EXACT), (torch.bool, EXACT), (torch.float32, EXACT)]:
        c(f"to.f32_to_{DTYPES[dt]}", "to", [x, Dt(dt), Dev("cpu")], x.to(dt), tol)
    xh = rn(4, 9, dtype=torch.float16)
    xb = rn(4, 9, dtype=torch.bfloat16)
    x64 = rn(4, 9, dtype=torch.float64)
    xi = ri(-1000, 1000, 4, 9)
    big_i = torch.tensor([2**40 + 1, -(2**31), 2**24 + 1, 7], dtype=torch.int64)
    c("to.f16_to_f32", "to", [xh, Dt(torch.float32), None], xh.float(), EXACT)
    c("to.bf16_to_f32", "to", [xb, Dt(torch.float32), None], xb.float(), EXACT)
    c("to.f16_to_bf16", "to", [xh, Dt(torch.bfloat16), None], xh.to(torch.bfloat16), EXACT)
    c("to.f64_to_f32", "to", [x64, Dt(torch.float32), Dev("cpu")], x64.float(), EXACT)
    c("to.f64_to_f16", "to", [x64, Dt(torch.float16), None], x64.half(), EXACT)
    c("to.i64_to_f32", "to", [xi, Dt(torch.float32), None], xi.float(), EXACT)
    c("to.i64_to_f64_big", "to", [big_i, Dt(torch.float64), None], big_i.double(), EXACT)
    c("to.i64_to_f32_rounding", "to", [big_i, Dt(torch.float32), None], big_i.float(), EXACT)
    c("to.i64_to_bf16", "to", [xi, Dt(torch.bfloat16), None], xi.to(torch.bfloat16), EXACT)
    pos_mask = xi > 0
    c("to.bool_to_f32", "to", [pos_mask, Dt(torch.float32), None], pos_mask.float(), EXACT)
    c("to.keep_dtype", "to", [x, None, Dev("cpu")], x.to("cpu"), EXACT)
    c("to.keep_both", "to", [xi, None, None], xi.clone(), EXACT)
    overflow = torch.tensor([70000.0, -70000.0, 65519.0, 65520.0, 1e-8, 3.0e-5])
    c("to.f32_to_f16_overflow", "to", [overflow, Dt(torch.float16), None], overflow.half(), EXACT)
    c("clone.f32", "clone", [x], x.clone(), EXACT)
    c("clone.bf16", "clone", [xb], xb.clone(), EXACT)
    c("detach.f32", "detach", [x], x.detach(), EXACT)

    s = torch.tensor(3.25)
    c("item.f32", "item", [s], s.item(), EXACT)
    s2 = torch.tensor([[-123456789012]], dtype=torch.int64)
    c("item.i64", "item", [s2], s2.item(), EXACT)
    s3 = torch.tensor([True])
    c("item.bool", "item", [s3], 1.0, EXACT)
    s4 = torch.tensor(0.1, dtype=torch.float16)
    c("item.f16", "item", [s4], s4.item(), EXACT)
    s5 = torch.tensor([0.1], dtype=torch.float64)
    c("item.f64", "item", [s5], s5.item(), EXACT)


def inplace_ops(fx):
    c = fx.case
    dst = rn(3, 4)
    src = rn(3, 4, dtype=torch.float16)
    c("copy_.cast", "copy_", [dst, src], dst.clone().copy_(src), EXACT, inplace=0)
    row = rn(4)
    c("copy_.broadcast", "copy_", [dst, row], dst.clone().copy_(row), EXACT, inplace=0)
    di = ri(0, 5, 3, 4)
    c("copy_.f32_into_i64", "copy_", [di, dst], di.clone().copy_(dst), EXACT, inplace=0)
    c("fill_.f32", "fill_", [dst, 2.5], dst.clone().fill_(2.5), EXACT, inplace=0)
    c("fill_.i64_truncates", "fill_", [di, 2.75], di.clone().fill_(2.75), EXACT, inplace=0)
    y = rn(3, 4)
    c("add_.alpha", "add_", [dst, y, 0.5], dst.clone().add_(y, alpha=0.5), EW, inplace=0)
    c("add_.broadcast", "add_", [dst, row, 1.0], dst.clone().add_(row), EW, inplace=0)
    c("mul_scalar_.f32", "mul_scalar_", [dst, -3.0], dst.clone().mul_(-3.0), EW, inplace=0)
    # 0.3 is not representable in 16 bits; Python's x.mul_(0.3) multiplies by the full double.
    bh = rn(5, 5, dtype=torch.bfloat16)
    c("mul_scalar_.bf16", "mul_scalar_", [bh, 0.3], bh.clone().mul_(0.3), EXACT, inplace=0)
    hh = rn(5, 5, dtype=torch.float16)
    c("mul_scalar_.f16", "mul_scalar_", [hh, 0.999], hh.clone().mul_(0.999), EXACT, inplace=0)
    c("fill_.bf16", "fill_", [bh, 0.3], bh.clone().fill_(0.3), EXACT, inplace=0)
    c("add_.bf16_alpha", "add_", [bh, bh.flip(0), 0.3], bh.clone().add_(bh.flip(0), alpha=0.3), EXACT, inplace=0)


def autograd_fixtures(fx):
    """Expected gradients and optimizer trajectories for the hand-written tests."""
    put = fx.put
    x = rn(4, 8)
    w = rn(8, 6, scale=0.5)
    y = rn(4, 6)
    put("autograd.x", x)
    put("autograd.w", w)
    put("autograd.y", y)
    xg = x.clone().requires_grad_(True)
    wg = w.clone().requires_grad_(True)
    loss = (F.silu(xg @ wg) * y).sum()
    loss.backward()
    put("autograd.loss", loss)
    put("autograd.grad_x", xg.grad)
    put("autograd.grad_w", wg.grad)

    # backward from a non-scalar output with an explicit upstream gradient.
    gout = rn(4, 6)
    put("autograd.gout", gout)
    xg2 = x.clone().requires_grad_(True)
    (xg2 @ w).backward(gout)
    put("autograd.vjp_x", xg2.grad)

    # f32 is the training dtype; f16 parameters keep their optimizer state in f16 too, where
    # every rounding of a scalar factor shows.
    for prefix, dtype in [("adamw", torch.float32), ("adamw_f16", torch.float16)]:
        p0 = rn(4, 5, dtype=dtype)
        put(f"{prefix}.p0", p0)
        p = torch.nn.Parameter(p0.clone())
        opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, foreach=False)
        for i in range(1, 4):
            # Later gradients are large, then tiny, so both moments and bias corrections matter.
            g = rn(4, 5, scale=[1.0, 10.0, 1e-3][i - 1], dtype=dtype)
            put(f"{prefix}.g{i}", g)
            p.grad = g.clone()
            opt.step()
            put(f"{prefix}.p{i}", p.data)
        st = opt.state[p]
        put(f"{prefix}.exp_avg", st["exp_avg"])
        put(f"{prefix}.exp_avg_sq", st["exp_avg_sq"])

    # One generator serving several draws in a row must follow PyTorch's sequence.
    g = torch.Generator().manual_seed(2024)
    put("gen_seq.randn", torch.randn(5, 7, generator=g))
    put("gen_seq.rand", torch.rand(9, generator=g))
    put("gen_seq.randint", torch.randint(-3, 3, (11,), generator=g))
    put("gen_seq.randn2", torch.randn(3, generator=g, dtype=torch.float64))


def fused_ops(fx):
    """The fused ops of native/src/fused.cpp, computed as diffusers computes them: the SDPA and
    IP-Adapter attention processors, FeedForward with GEGLU, ResnetBlock2D, and Transformer2DModel's
    moves between images and tokens."""
    c = fx.case
    b, n, dim, heads, cdim = 2, 12, 16, 2, 24

    def w(o, i):
        return rn(o, i, scale=i**-0.5)

    x, ctx, res = rn(b, n, dim), rn(b, 7, cdim), rn(b, n, dim)
    wq, wk, wv, wo, bo = w(dim, dim), w(dim, dim), w(dim, dim), w(dim, dim), rn(dim, scale=0.1)
    wkx, wvx = w(dim, cdim), w(dim, cdim)
    tokens = [rn(b, 4, cdim), rn(b, 6, cdim)]
    ip_w = [w(dim, cdim) for _ in range(4)]
    # per-sample scales; sample 0 has every adapter off
    scales = [torch.tensor([0.0, 0.7]).reshape(b, 1, 1), torch.tensor([0.0, -0.4]).reshape(b, 1, 1)]

    def split(t):
        return t.view(b, -1, heads, dim // heads).transpose(1, 2)

    def merge(t):
        return t.transpose(1, 2).reshape(b, -1, heads * (dim // heads))

    def attention(x, context, wk, wv, wo, bo, tokens=(), ip_w=(), scales=(), residual=None):
        context = x if context is None else context
        q = split(F.linear(x, wq))
        out = merge(F.scaled_dot_product_attention(q, split(F.linear(context, wk)), split(F.linear(context, wv))))
        for i, t in enumerate(tokens):
            k_ip, v_ip = split(F.linear(t, ip_w[2 * i])), split(F.linear(t, ip_w[2 * i + 1]))
            out = out + scales[i] * merge(F.scaled_dot_product_attention(q, k_ip, v_ip))
        out = F.linear(out, wo, bo)
        return out if residual is None else out + residual

    none = TList([])
    c("attention.self_residual", "attention", [x, None, wq, wk, wv, wo, bo, heads, none, none, none, res],
      attention(x, None, wk, wv, wo, bo, residual=res), ACC)
    c("attention.cross_no_bias", "attention", [x, ctx, wq, wkx, wvx, wo, None, heads, none, none, none, None],
      attention(x, ctx, wkx, wvx, wo, None), ACC)
    c("attention.cross_ip2", "attention",
      [x, ctx, wq, wkx, wvx, wo, bo, heads, TList(tokens), TList(ip_w), TList(scales), res],
      attention(x, ctx, wkx, wvx, wo, bo, tokens, ip_w, scales, res), ACC)

    w1, b1, w2, b2 = w(4 * dim, dim), rn(4 * dim, scale=0.1), w(dim, 2 * dim), rn(dim, scale=0.1)

    def geglu(x, residual=None):
        h, gate = F.linear(x, w1, b1).chunk(2, dim=-1)
        out = F.linear(h * F.gelu(gate), w2, b2)
        return out if residual is None else out + residual

    c("geglu_feed_forward.residual", "geglu_feed_forward", [x, w1, b1, w2, b2, res], geglu(x, res), ACC)
    c("geglu_feed_forward.plain", "geglu_feed_forward", [x, w1, b1, w2, b2, None], geglu(x), ACC)

    cin, cout, groups, tdim = 8, 12, 4, 10
    xi, temb = rn(b, cin, 6, 5), rn(b, tdim)

    def resnet_weights(cin, cout, temb):
        return dict(
            n1w=1 + rn(cin, scale=0.1), n1b=rn(cin, scale=0.1),
            c1w=rn(cout, cin, 3, 3, scale=0.2), c1b=rn(cout, scale=0.1),
            tw=w(cout, tdim) if temb else None, tb=rn(cout, scale=0.1) if temb else None,
            n2w=1 + rn(cout, scale=0.1), n2b=rn(cout, scale=0.1),
            c2w=rn(cout, cout, 3, 3, scale=0.2), c2b=rn(cout, scale=0.1),
            sw=rn(cout, cin, 1, 1, scale=0.3) if cin != cout else None,
            sb=rn(cout, scale=0.1) if cin != cout else None,
        )

    def resnet(x, temb, p, act, eps, scale):
        # ResnetBlock2D.forward, time_embedding_norm "default"
        h = F.conv2d(act(F.group_norm(x, groups, p["n1w"], p["n1b"], eps)), p["c1w"], p["c1b"], padding=1)
        if temb is not None:
            h = h + F.linear(act(temb), p["tw"], p["tb"])[:, :, None, None]
        h = F.conv2d(act(F.group_norm(h, groups, p["n2w"], p["n2b"], eps)), p["c2w"], p["c2b"], padding=1)
        skip = x if p["sw"] is None else F.conv2d(x, p["sw"], p["sb"])
        return (skip + h) / scale

    def resnet_args(x, temb, p, act_code, eps, scale):
        return [x, temb, p["n1w"], p["n1b"], p["c1w"], p["c1b"], p["tw"], p["tb"], p["n2w"], p["n2b"],
                p["c2w"], p["c2b"], p["sw"], p["sb"], groups, eps, act_code, scale]

    p = resnet_weights(cin, cout, True)
    c("resnet_block.silu_temb_shortcut", "resnet_block", resnet_args(xi, temb, p, 0, 1e-5, 1.0),
      resnet(xi, temb, p, F.silu, 1e-5, 1.0), ACC)
    p = resnet_weights(cin, cin, False)
    c("resnet_block.gelu_plain_scaled", "resnet_block", resnet_args(xi, None, p, 1, 1e-6, 2.0),
      resnet(xi, None, p, F.gelu, 1e-6, 2.0), ACC)
    p = resnet_weights(cin, cout, True)
    c("resnet_block.relu_temb_shortcut", "resnet_block", resnet_args(xi, temb, p, 2, 1e-5, 1.0),
      resnet(xi, temb, p, F.relu, 1e-5, 1.0), ACC)

    img = rn(b, 5, 3, 4)
    c("image_to_tokens.f32", "image_to_tokens", [img], img.permute(0, 2, 3, 1).reshape(b, 12, 5), EXACT)
    toks = rn(b, 12, 5)
    c("tokens_to_image.f32", "tokens_to_image", [toks, 3, 4],
      toks.reshape(b, 3, 4, 5).permute(0, 3, 1, 2).contiguous(), EXACT)


def write_py_file(outdir):
    """A file written by the reference safetensors library, with values the test knows by heart."""
    tensors = {
        "f32": torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) * 0.5 - 3.0,
        "f16": torch.tensor([0.5, -2.0, 65504.0, 1.0], dtype=torch.float16),
        "bf16": torch.tensor([[1.0, -2.0], [0.5, 0.0]], dtype=torch.bfloat16),
        "i64": torch.tensor([-(2**40), 0, 2**62 + 1], dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(7.0, dtype=torch.float64),
        "empty": torch.zeros(0, 5),
    }
    # One metadata key: the writer keeps metadata in a hash map, so several keys would come out in
    # a different order on every run and the fixture would not be byte-for-byte reproducible.
    save_file(tensors, os.path.join(outdir, "py_written.safetensors"), metadata={"format": "pt"})


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: python test/reference/ops_ref.py OUTDIR")
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    torch.manual_seed(0)
    fx = Fixtures()
    for part in [creation, unary_ops, binary_ops, comparison_ops, linalg_ops, norm_loss_ops, shape_ops,
                 reduction_ops, dtype_ops, inplace_ops, autograd_fixtures, fused_ops]:
        part(fx)

    save_file(fx.tensors, os.path.join(outdir, "cases.safetensors"))
    with open(os.path.join(outdir, "cases.json"), "w") as f:
        json.dump(fx.cases, f, indent=1, allow_nan=False)
    write_py_file(outdir)
    with open(__file__, "rb") as f:
        script_hash = hashlib.sha256(f.read()).hexdigest()
    meta = {
        "torch_version": torch.__version__.split("+")[0],
        "script_sha256": script_hash,
        "hand_written_ops": HAND_WRITTEN,
        "num_threads": torch.get_num_threads(),
        "adamw": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2, "steps": 3},
    }
    with open(os.path.join(outdir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, allow_nan=False)
    print(f"ops_ref: {len(fx.cases)} cases, {len(fx.tensors)} tensors -> {outdir}")


if __name__ == "__main__":
    main()
