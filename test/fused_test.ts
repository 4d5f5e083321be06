/**
 * The fused ops of native/src/fused.cpp against the unfused compositions they replace, written
 * here with the single ops (each checked against PyTorch by ops_test.ts), in the op order of the
 * diffusers code: the results must be bit-identical, with autograd on (out-of-place path) and off
 * (in-place path), and gradients must flow through them as through the composition. Then the FFI
 * call budget of a UNet forward, which is what the fused ops are for.
 */
import assert from "node:assert/strict";
import { countFfiCalls } from "../ffi/call.ts";
import { enableGrad, Generator, noGrad, ops, scope, type Tensor, TorchError } from "../ffi/mod.ts";
import { IpAdapter, TINY_IP_PLUS } from "../plugins/sd15/ip_adapter.ts";
import type { PlusProjectionConfig } from "../plugins/sd15/ip_projection.ts";
import { UNet2DConditionModel } from "../plugins/sd15/unet.ts";
import { SD15_UNET_CONFIG_JSON } from "../plugins/sd15/unet_config.ts";
import { noLeak } from "./util.ts";

function randn(g: Generator, shape: number[], std = 1): Tensor {
  return ops.mulScalar(ops.randn(shape, "f32", "cpu", g), std);
}

/** max |a - b| over all elements (0 means bit-identical, up to the sign of zero). */
function maxDiff(a: Tensor, b: Tensor): number {
  assert.deepEqual(a.shape, b.shape);
  return ops.maxAll(ops.abs(ops.sub(a, b))).item();
}

/** A fresh leaf that requires grad, sharing `t`'s data. */
function leaf(t: Tensor): Tensor {
  const l = ops.detach(t);
  ops.requiresGrad_(l, true);
  return l;
}

/** Runs `check` with grad mode off and on; both paths of a fused op must give the same bits. */
function inBothGradModes(label: string, check: () => void): void {
  noLeak(`${label} (no grad)`, () => noGrad(() => scope(check)));
  noLeak(`${label} (grad mode)`, () => enableGrad(() => scope(check)));
}

// ---------------------------------------------------------------------------------------------
// The unfused compositions (the UNet's code before the fused ops)

function splitHeads(x: Tensor, heads: number): Tensor {
  return ops.transpose(ops.reshape(x, [x.size(0), -1, heads, x.size(-1) / heads]), 1, 2);
}

function mergeHeads(x: Tensor): Tensor {
  return ops.reshape(ops.transpose(x, 1, 2), [x.size(0), -1, x.size(1) * x.size(3)]);
}

interface AttnArgs {
  x: Tensor;
  context: Tensor | null;
  wq: Tensor;
  wk: Tensor;
  wv: Tensor;
  wo: Tensor;
  bo: Tensor | null;
  heads: number;
  tokens: Tensor[];
  ipWeights: Tensor[];
  scales: Tensor[];
  residual: Tensor | null;
}

function attentionComposed(a: AttnArgs): Tensor {
  const ctx = a.context ?? a.x;
  const q = splitHeads(ops.linear(a.x, a.wq, null), a.heads);
  const k = splitHeads(ops.linear(ctx, a.wk, null), a.heads);
  const v = splitHeads(ops.linear(ctx, a.wv, null), a.heads);
  let out = mergeHeads(ops.sdpa(q, k, v, null, 0, false, null));
  a.tokens.forEach((tok, i) => {
    const ka = splitHeads(ops.linear(tok, a.ipWeights[2 * i], null), a.heads);
    const va = splitHeads(ops.linear(tok, a.ipWeights[2 * i + 1], null), a.heads);
    out = out.add(a.scales[i].mul(mergeHeads(ops.sdpa(q, ka, va, null, 0, false, null))));
  });
  const y = ops.linear(out, a.wo, a.bo);
  return a.residual ? y.add(a.residual) : y;
}

function attentionFused(a: AttnArgs): Tensor {
  return ops.attention(
    a.x,
    a.context,
    a.wq,
    a.wk,
    a.wv,
    a.wo,
    a.bo,
    a.heads,
    a.tokens,
    a.ipWeights,
    a.scales,
    a.residual,
  );
}

function attentionArgs(g: Generator, opts: { cross: boolean; adapters: number }): AttnArgs {
  const b = 3, len = 10, dim = 16, heads = 2, ctxLen = 7, ctxDim = 12, tokens = 4, ipDim = 12;
  const kvDim = opts.cross ? ctxDim : dim;
  const s = 0.3;
  return {
    x: randn(g, [b, len, dim]),
    context: opts.cross ? randn(g, [b, ctxLen, ctxDim]) : null,
    wq: randn(g, [dim, dim], s),
    wk: randn(g, [dim, kvDim], s),
    wv: randn(g, [dim, kvDim], s),
    wo: randn(g, [dim, dim], s),
    bo: randn(g, [dim], 0.1),
    heads,
    tokens: Array.from({ length: opts.adapters }, () => randn(g, [b, tokens, ipDim])),
    ipWeights: Array.from({ length: 2 * opts.adapters }, () => randn(g, [dim, ipDim], s)),
    // per-sample scales, one sample with every adapter off
    scales: Array.from(
      { length: opts.adapters },
      (_, i) => ops.reshape(ops.linspace(0, 0.4 * (i + 1), b, "f32", "cpu"), [b, 1, 1]),
    ),
    residual: randn(g, [b, len, dim]),
  };
}

function gegluComposed(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor): Tensor {
  const [h, gate] = ops.chunk(ops.linear(x, w1, b1), 2, -1);
  return ops.linear(h.mul(ops.gelu(gate, false)), w2, b2);
}

const ACTS = [
  ["silu", 0, (x: Tensor) => ops.silu(x)],
  ["gelu", 1, (x: Tensor) => ops.gelu(x, false)],
  ["relu", 2, (x: Tensor) => ops.relu(x)],
] as const;

interface ResnetArgs {
  x: Tensor;
  temb: Tensor | null;
  n1w: Tensor;
  n1b: Tensor;
  c1w: Tensor;
  c1b: Tensor;
  tw: Tensor | null;
  tb: Tensor | null;
  n2w: Tensor;
  n2b: Tensor;
  c2w: Tensor;
  c2b: Tensor;
  sw: Tensor | null;
  sb: Tensor | null;
  groups: number;
  eps: number;
  outputScale: number;
}

function resnetArgs(
  g: Generator,
  opts: { temb: boolean; shortcut: boolean; outputScale?: number },
): ResnetArgs {
  const b = 2, cin = 8, cout = opts.shortcut ? 12 : 8, size = 5, tdim = 10;
  return {
    x: randn(g, [b, cin, size, size]),
    temb: opts.temb ? randn(g, [b, tdim]) : null,
    n1w: ops.addScalar(randn(g, [cin], 0.1), 1),
    n1b: randn(g, [cin], 0.1),
    c1w: randn(g, [cout, cin, 3, 3], 0.2),
    c1b: randn(g, [cout], 0.1),
    tw: opts.temb ? randn(g, [cout, tdim], 0.3) : null,
    tb: opts.temb ? randn(g, [cout], 0.1) : null,
    n2w: ops.addScalar(randn(g, [cout], 0.1), 1),
    n2b: randn(g, [cout], 0.1),
    c2w: randn(g, [cout, cout, 3, 3], 0.2),
    c2b: randn(g, [cout], 0.1),
    sw: opts.shortcut ? randn(g, [cout, cin, 1, 1], 0.3) : null,
    sb: opts.shortcut ? randn(g, [cout], 0.1) : null,
    groups: 4,
    eps: 1e-5,
    outputScale: opts.outputScale ?? 1,
  };
}

/** diffusers' ResnetBlock2D.forward, op by op. */
function resnetComposed(a: ResnetArgs, act: (x: Tensor) => Tensor): Tensor {
  const conv = (x: Tensor, w: Tensor, b: Tensor, pad: number) =>
    ops.conv2d(x, w, b, [1, 1], [pad, pad], [1, 1], 1);
  let h = conv(act(ops.groupNorm(a.x, a.groups, a.n1w, a.n1b, a.eps)), a.c1w, a.c1b, 1);
  if (a.temb) {
    const t = ops.linear(act(a.temb), a.tw!, a.tb);
    h = h.add(ops.unsqueeze(ops.unsqueeze(t, -1), -1));
  }
  h = conv(act(ops.groupNorm(h, a.groups, a.n2w, a.n2b, a.eps)), a.c2w, a.c2b, 1);
  const skip = a.sw ? conv(a.x, a.sw, a.sb!, 0) : a.x;
  return skip.add(h).div(a.outputScale);
}

function resnetFused(a: ResnetArgs, code: number): Tensor {
  return ops.resnetBlock(
    a.x,
    a.temb,
    a.n1w,
    a.n1b,
    a.c1w,
    a.c1b,
    a.tw,
    a.tb,
    a.n2w,
    a.n2b,
    a.c2w,
    a.c2b,
    a.sw,
    a.sb,
    a.groups,
    a.eps,
    code,
    a.outputScale,
  );
}

// ---------------------------------------------------------------------------------------------
// Parity

for (
  const [label, opts] of [
    ["self attention", { cross: false, adapters: 0 }],
    ["cross attention", { cross: true, adapters: 0 }],
    ["cross attention + 2 IP-Adapters", { cross: true, adapters: 2 }],
  ] as const
) {
  Deno.test(`fused attention: ${label} is bit-identical to the composition`, () => {
    using g = new Generator(1);
    inBothGradModes(label, () => {
      const a = attentionArgs(g, opts);
      assert.equal(maxDiff(attentionFused(a), attentionComposed(a)), 0);
      const plain = { ...a, residual: null };
      assert.equal(maxDiff(attentionFused(plain), attentionComposed(plain)), 0, "no residual");
    });
  });
}

Deno.test("fused attention: a sample whose IP scales are all 0 gets exactly the output without adapters", () => {
  using g = new Generator(2);
  inBothGradModes("zero scales", () => {
    const a = attentionArgs(g, { cross: true, adapters: 2 });
    const none = { ...a, tokens: [], ipWeights: [], scales: [] };
    // row 0 has scale 0 for both adapters (linspace starts at 0)
    assert.equal(
      maxDiff(ops.select(attentionFused(a), 0, 0), ops.select(attentionFused(none), 0, 0)),
      0,
    );
  });
});

Deno.test("fused attention: gradients match the composition's", () => {
  using g = new Generator(3);
  noLeak("attention backward", () =>
    enableGrad(() =>
      scope(() => {
        const a = attentionArgs(g, { cross: true, adapters: 1 });
        const [fused, composed] = [attentionFused, attentionComposed].map((f) => {
          const x = leaf(a.x), wq = leaf(a.wq);
          ops.backward(ops.sumAll(ops.square(f({ ...a, x, wq }))), null);
          return [ops.grad(x)!, ops.grad(wq)!];
        });
        assert.ok(maxDiff(fused[0], composed[0]) <= 1e-5, "d/dx");
        assert.ok(maxDiff(fused[1], composed[1]) <= 1e-5, "d/dw_q");
      })
    ));
});

Deno.test("fused GEGLU feed-forward is bit-identical to the composition", () => {
  using g = new Generator(4);
  inBothGradModes("geglu", () => {
    const x = randn(g, [2, 6, 8]), w1 = randn(g, [32, 8], 0.3), b1 = randn(g, [32], 0.1);
    const w2 = randn(g, [8, 16], 0.3), b2 = randn(g, [8], 0.1), res = randn(g, [2, 6, 8]);
    const want = gegluComposed(x, w1, b1, w2, b2);
    assert.equal(maxDiff(ops.gegluFeedForward(x, w1, b1, w2, b2, null), want), 0);
    assert.equal(maxDiff(ops.gegluFeedForward(x, w1, b1, w2, b2, res), want.add(res)), 0);
  });
});

for (
  const [label, opts] of [
    ["with time embedding and shortcut", { temb: true, shortcut: true }],
    ["without time embedding, output scale 2", { temb: false, shortcut: false, outputScale: 2 }],
  ] as const
) {
  Deno.test(`fused resnet block ${label} is bit-identical to the composition`, () => {
    using g = new Generator(5);
    for (const [name, code, act] of ACTS) {
      inBothGradModes(`${label}, ${name}`, () => {
        const a = resnetArgs(g, opts);
        assert.equal(maxDiff(resnetFused(a, code), resnetComposed(a, act)), 0, name);
      });
    }
  });
}

Deno.test("fused resnet block: gradients match the composition's", () => {
  using g = new Generator(6);
  noLeak("resnet backward", () =>
    enableGrad(() =>
      scope(() => {
        const a = resnetArgs(g, { temb: true, shortcut: true });
        const run = [
          (r: ResnetArgs) => resnetFused(r, 0),
          (r: ResnetArgs) => resnetComposed(r, ops.silu),
        ];
        const [fused, composed] = run.map((f) => {
          const x = leaf(a.x), c1w = leaf(a.c1w);
          ops.backward(ops.sumAll(ops.square(f({ ...a, x, c1w }))), null);
          return [ops.grad(x)!, ops.grad(c1w)!];
        });
        assert.ok(maxDiff(fused[0], composed[0]) <= 1e-4, "d/dx");
        assert.ok(maxDiff(fused[1], composed[1]) <= 1e-4, "d/dconv1");
      })
    ));
});

Deno.test("image_to_tokens and tokens_to_image are the permute/reshape pairs they replace", () => {
  using g = new Generator(7);
  inBothGradModes("layout", () => {
    const x = randn(g, [2, 5, 3, 4]);
    const tokens = ops.imageToTokens(x);
    const want = ops.reshape(ops.permute(x, [0, 2, 3, 1]), [2, 12, 5]);
    assert.equal(maxDiff(tokens, want), 0);
    const back = ops.tokensToImage(tokens, 3, 4);
    assert.equal(maxDiff(back, x), 0);
  });
});

// ---------------------------------------------------------------------------------------------
// Errors: one message from the shim, nothing leaked

Deno.test("fused ops refuse bad arguments with a message and leak nothing", () => {
  using g = new Generator(8);
  noLeak("errors", () =>
    noGrad(() =>
      scope(() => {
        const a = attentionArgs(g, { cross: true, adapters: 2 });
        const refuses = (fn: () => unknown, text: string) =>
          assert.throws(fn, (e: Error) => e instanceof TorchError && e.message.includes(text));
        refuses(() => attentionFused({ ...a, ipWeights: a.ipWeights.slice(1) }), "two weights");
        refuses(() => attentionFused({ ...a, heads: 0 }), "heads must be positive");
        refuses(() => attentionFused({ ...a, x: ops.reshape(a.x, [-1, 16]) }), "[B, L, C]");
        const r = resnetArgs(g, { temb: true, shortcut: true });
        refuses(() => resnetFused(r, 3), "activation must be");
        refuses(() => resnetFused({ ...r, tw: null }, 0), "time embedding needs");
        refuses(
          () => ops.tokensToImage(ops.zeros([1, 6, 2], "f32", "cpu"), 2, 2),
          "tokens_to_image",
        );
      })
    ));
});

// ---------------------------------------------------------------------------------------------
// The FFI call budget

/** SD1.5's block structure at a given width (the call count depends on neither width nor size). */
function sd15Structure(width: number): Record<string, unknown> {
  return {
    ...SD15_UNET_CONFIG_JSON,
    block_out_channels: [width, 2 * width, 4 * width, 4 * width],
    cross_attention_dim: TINY_IP_PLUS.crossDim,
  };
}

function forwardCalls(width: number): number {
  using unet = UNet2DConditionModel.random(sd15Structure(width), 0);
  using plus = IpAdapter.random(TINY_IP_PLUS, unet, 1);
  unet.attachIpAdapters([plus, plus]);
  return noGrad(() =>
    scope(() => {
      using g = new Generator(9);
      const b = 4, cross = TINY_IP_PLUS.crossDim;
      const x = randn(g, [b, 4, 8, 8]), text = randn(g, [b, 77, cross]);
      const tokens = randn(g, [b, (TINY_IP_PLUS as PlusProjectionConfig).queries, cross]);
      const ip = { tokens: [tokens, tokens], scales: ops.full([b, 2], 0.6, "f32", "cpu") };
      const t = ops.full([b], 500, "f32", "cpu");
      return countFfiCalls(() => scope(() => void unet.forward(x, t, text, ip))).calls.total;
    })
  );
}

Deno.test("a UNet forward with SD1.5's blocks and two IP-Adapters makes at most 1,000 FFI calls", () => {
  const narrow = forwardCalls(32), wide = forwardCalls(64);
  console.log(`  FFI calls per forward: ${narrow}`);
  assert.equal(narrow, wide, "the count depends on the width");
  assert.ok(narrow <= 1000, `${narrow} FFI calls`);
});
