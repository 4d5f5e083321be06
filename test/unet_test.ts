/**
 * UNet2DConditionModel + IP-Adapter parity with diffusers. Fixtures come from
 * test/reference/unet_ref.py (run by `deno task test`): random UNets saved with save_pretrained,
 * h94-layout IP-Adapter files, and diffusers' outputs, one diffusers run per scale setting.
 */
import assert from "node:assert/strict";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import {
  memory,
  noGrad,
  ops,
  SafetensorsFile,
  saveSafetensors,
  scope,
  type Tensor,
} from "../ffi/mod.ts";
import { IpAdapter, TINY_IP_BASE, TINY_IP_PLUS } from "../plugins/sd15/ip_adapter.ts";
import { UNet2DConditionModel } from "../plugins/sd15/unet.ts";
import { TINY_UNET_CONFIG_JSON } from "../plugins/sd15/unet_config.ts";

const FIXTURES = join(import.meta.dirname!, "fixtures", "unet");
const TOL = 1e-4;

interface Meta {
  ip_cases: { name: string; files: string[] }[];
  scalar_timestep: number;
  cross_layers?: number[];
}

function modelDir(name: string): string {
  const dir = join(FIXTURES, name);
  if (!existsSync(join(dir, "io.safetensors"))) {
    throw new Error(
      `missing fixture ${dir}: run \`deno task test\` (it generates fixtures with ` +
        "test/reference/unet_ref.py)",
    );
  }
  return dir;
}

function loadModel(name: string) {
  const dir = modelDir(name);
  const meta: Meta = JSON.parse(readFileSync(join(dir, "meta.json"), "utf8"));
  const io = SafetensorsFile.open(join(dir, "io.safetensors")).loadAll({ dtype: "f32" });
  return { dir, meta, io, get: (k: string) => io.get(k)! };
}

function disposeIO(io: Map<string, Tensor>) {
  for (const t of io.values()) t.dispose();
}

/** Max abs difference, checked against TOL relative to the reference's scale (at least 1). */
function assertClose(label: string, got: Tensor, want: Tensor): void {
  assert.deepEqual(got.shape, want.shape, `${label}: shape`);
  const [err, scale] = scope(() => [
    ops.maxAll(ops.abs(ops.sub(got, want))).item(),
    ops.maxAll(ops.abs(want)).item(),
  ]);
  console.log(`  ${label}: max abs err ${err.toExponential(2)} (output scale ${scale.toFixed(3)})`);
  assert.ok(err <= TOL * Math.max(1, scale), `${label}: max abs err ${err} > ${TOL}`);
}

function assertRowEqual(label: string, got: Tensor, want: Tensor, row: number): void {
  const diff = scope(() =>
    ops.maxAll(ops.abs(ops.sub(ops.select(got, 0, row), ops.select(want, 0, row)))).item()
  );
  assert.equal(diff, 0, `${label}: row ${row} differs from the no-adapter output by ${diff}`);
}

for (const name of ["tiny", "variant", "sd15arch"]) {
  Deno.test(`unet ${name}: matches diffusers without adapters, no handle leaks`, () => {
    const { dir, meta, io, get } = loadModel(name);
    using unet = UNet2DConditionModel.fromPretrained(join(dir, "unet"));
    noGrad(() => {
      scope(() => unet.forward(get("sample"), get("timesteps"), get("text")));
      const before = memory().handles;
      scope(() => {
        const t0 = performance.now();
        const out = unet.forward(get("sample"), get("timesteps"), get("text"));
        const ms = performance.now() - t0;
        console.log(`  ${name} forward [${get("sample").shape}]: ${ms.toFixed(1)} ms`);
        assertClose(`${name} out`, out, get("out"));
        assertClose(
          `${name} scalar timestep`,
          unet.forward(get("sample"), meta.scalar_timestep, get("text")),
          get("out_scalar_t"),
        );
      });
      assert.equal(memory().handles, before, "tensor handles leaked across a forward");
    });
    disposeIO(io);
  });
}

Deno.test({
  name: "unet sd15full: the real SD1.5 UNet (random weights, 8x8 latent) matches diffusers",
  // 3.4 GB of weights: DIPSY_UNET_FULL=0 opts out on small machines (unet_ref.py then skips it)
  ignore: Deno.env.get("DIPSY_UNET_FULL") === "0",
  fn() {
    const { dir, io, get } = loadModel("sd15full");
    using unet = UNet2DConditionModel.fromPretrained(join(dir, "unet"));
    noGrad(() =>
      scope(() => {
        const t0 = performance.now();
        const out = unet.forward(get("sample"), get("timesteps"), get("text"));
        console.log(`  sd15full forward: ${(performance.now() - t0).toFixed(0)} ms`);
        assertClose("sd15full out", out, get("out"));
      })
    );
    disposeIO(io);
  },
});

for (const name of ["tiny", "sd15arch"]) {
  Deno.test(`unet ${name}: IP-Adapters with per-sample scales match diffusers`, () => {
    const { dir, meta, io, get } = loadModel(name);
    using unet = UNet2DConditionModel.fromPretrained(join(dir, "unet"));
    assert.deepEqual(
      unet.crossAttentions().map((_, i) => 2 * i + 1),
      meta.cross_layers,
      "cross-attention layers in diffusers' processor order",
    );
    // one adapter object per file: the same file twice is attached twice (DIPSY's default)
    const adapters = new Map<string, IpAdapter>();
    for (const c of meta.ip_cases) {
      for (const f of c.files) {
        if (!adapters.has(f)) adapters.set(f, IpAdapter.load(join(dir, f), unet));
      }
    }
    noGrad(() => {
      const plain = unet.forward(get("sample"), get("timesteps"), get("text"));
      for (const c of meta.ip_cases) {
        const list = c.files.map((f) => adapters.get(f)!);
        unet.attachIpAdapters(list);
        const before = memory().handles;
        scope(() => {
          const tokens = list.map((a, i) => {
            const tok = a.project(get(`${c.name}.image.${i}`));
            assertClose(
              `${name} ${c.name} projection ${i} (${a.kind})`,
              tok,
              get(`${c.name}.tokens.${i}`),
            );
            return tok;
          });
          const scales = get(`${c.name}.scales`);
          const out = unet.forward(get("sample"), get("timesteps"), get("text"), {
            tokens,
            scales,
          });
          assertClose(`${name} ${c.name} batched per-sample scales`, out, get(`${c.name}.out`));
          const rows = scales.toFloat64();
          const n = list.length;
          for (let r = 0; r < scales.size(0); r++) {
            if (rows.subarray(r * n, r * n + n).every((s) => s === 0)) {
              assertRowEqual(`${name} ${c.name}`, out, plain, r);
            }
          }
        });
        assert.equal(memory().handles, before, `${c.name}: tensor handles leaked across a forward`);
      }
      plain.dispose();
    });
    unet.detachIpAdapters();
    for (const a of adapters.values()) a.dispose();
    disposeIO(io);
  });
}

Deno.test("unet: IP-Adapter files are recognised as base or Plus from their keys", () => {
  const dir = modelDir("tiny");
  using unet = UNet2DConditionModel.fromPretrained(join(dir, "unet"));
  using base = IpAdapter.load(join(dir, "ip-adapter_tiny.safetensors"), unet);
  using plus = IpAdapter.load(join(dir, "ip-adapter-plus_tiny.safetensors"), unet);
  // the reference writes its tiny files with the presets' dims
  assert.deepEqual(base.config, TINY_IP_BASE);
  assert.deepEqual(plus.config, TINY_IP_PLUS);
});

Deno.test("unet: tiny presets have the diffusers layout and run with two adapters", () => {
  const file = SafetensorsFile.open(
    join(modelDir("tiny"), "unet", "diffusion_pytorch_model.safetensors"),
  );
  const before = memory().handles;
  {
    using unet = UNet2DConditionModel.random(TINY_UNET_CONFIG_JSON, 3);
    const params = unet.namedParameters();
    assert.deepEqual([...params.keys()].sort(), file.keys().sort());
    for (const [k, t] of params) assert.deepEqual(t.shape, file.info(k).shape, k);
    using base = IpAdapter.random(TINY_IP_BASE, unet, 4);
    using plus = IpAdapter.random(TINY_IP_PLUS, unet, 5);
    const ipFile = SafetensorsFile.open(join(modelDir("tiny"), "ip-adapter-plus_tiny.safetensors"));
    assert.deepEqual([...plus.namedParameters().keys()].sort(), ipFile.keys().sort());
    unet.attachIpAdapters([plus, base]);
    noGrad(() =>
      scope(() => {
        const x = ops.randn([2, 4, 8, 8], "f32", "cpu", null);
        const text = ops.randn([2, 77, 32], "f32", "cpu", null);
        const tokens = [
          plus.project(ops.randn([2, 17, 48], "f32", "cpu", null)),
          base.project(ops.randn([2, 16], "f32", "cpu", null)),
        ];
        const scales = ops.full([2, 2], 0.6, "f32", "cpu");
        assert.deepEqual(unet.forward(x, 10, text, { tokens, scales }).shape, [2, 4, 8, 8]);
      })
    );
  }
  assert.equal(memory().handles, before, "disposing the models frees every weight");
});

/** A scratch unet/ folder: the tiny fixture's files, with the config and/or weights edited. */
function scratchUnet(
  editConfig?: (c: Record<string, unknown>) => void,
  editWeights?: (w: Map<string, Tensor>) => void,
): string {
  const src = join(modelDir("tiny"), "unet");
  const dir = Deno.makeTempDirSync({ prefix: "dipsy-unet-" });
  const config = JSON.parse(readFileSync(join(src, "config.json"), "utf8"));
  editConfig?.(config);
  writeFileSync(join(dir, "config.json"), JSON.stringify(config, null, 2));
  const weightsPath = join(dir, "diffusion_pytorch_model.safetensors");
  if (editWeights) {
    const w = SafetensorsFile.open(join(src, "diffusion_pytorch_model.safetensors")).loadAll();
    editWeights(w);
    saveSafetensors(weightsPath, w);
    for (const t of w.values()) t.dispose();
  } else {
    Deno.copyFileSync(join(src, "diffusion_pytorch_model.safetensors"), weightsPath);
  }
  return dir;
}

Deno.test("unet: unsupported config values name the file and key", () => {
  const cases: [string, (c: Record<string, unknown>) => void][] = [
    ["down_block_types", (c) => (c.down_block_types = ["CrossAttnDownBlock2D", "FooBlock2D"])],
    ["up_block_types", (c) => (c.up_block_types = ["UpBlock2D", "SimpleCrossAttnUpBlock2D"])],
    ["mid_block_type", (c) => (c.mid_block_type = "UNetMidBlock2DSimpleCrossAttn")],
    ["resnet_time_scale_shift", (c) => (c.resnet_time_scale_shift = "scale_shift")],
    ["class_embed_type", (c) => (c.class_embed_type = "timestep")],
    ["addition_embed_type", (c) => (c.addition_embed_type = "text_time")],
    ["time_embedding_type", (c) => (c.time_embedding_type = "fourier")],
    ["dual_cross_attention", (c) => (c.dual_cross_attention = true)],
    ["act_fn", (c) => (c.act_fn = "mish")],
    ["attention_head_dim", (c) => (c.attention_head_dim = [2, 2, 2])],
  ];
  for (const [key, edit] of cases) {
    const dir = scratchUnet(edit);
    try {
      const before = memory().handles;
      assert.throws(
        () => UNet2DConditionModel.fromPretrained(dir),
        (e: Error) =>
          e.message.includes(join(dir, "config.json")) && e.message.includes(`"${key}"`),
        key,
      );
      assert.equal(memory().handles, before);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  }
});

Deno.test("unet: a missing, wrong-shape or unexpected weight names the file, key and shapes", () => {
  const key = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight";
  const missing = scratchUnet(undefined, (w) => {
    w.get(key)!.dispose();
    w.delete(key);
  });
  const wrong = scratchUnet(undefined, (w) => {
    w.get(key)!.dispose();
    w.set(key, ops.zeros([32, 16], "f32", "cpu"));
  });
  const extra = scratchUnet(
    undefined,
    (w) => w.set("mid_block.extra.weight", ops.zeros([2], "f32", "cpu")),
  );
  try {
    const before = memory().handles;
    const file = (d: string) => join(d, "diffusion_pytorch_model.safetensors");
    assert.throws(
      () => UNet2DConditionModel.fromPretrained(missing),
      (e: Error) =>
        e.message.includes(file(missing)) && e.message.includes(`"${key}"`) &&
        e.message.includes("[32, 32]"),
    );
    assert.equal(memory().handles, before, "a failed load frees the weights it had loaded");
    assert.throws(
      () => UNet2DConditionModel.fromPretrained(wrong),
      (e: Error) =>
        e.message.includes(file(wrong)) && e.message.includes(`"${key}"`) &&
        e.message.includes("[32, 16]") && e.message.includes("[32, 32]"),
    );
    assert.equal(memory().handles, before);
    assert.throws(
      () => UNet2DConditionModel.fromPretrained(extra),
      (e: Error) => e.message.includes(file(extra)) && e.message.includes("mid_block.extra.weight"),
    );
    assert.equal(memory().handles, before);
  } finally {
    for (const d of [missing, wrong, extra]) Deno.removeSync(d, { recursive: true });
  }
});

Deno.test("unet: an IP-Adapter for another UNet is refused with the key and shapes", () => {
  using unet = UNet2DConditionModel.fromPretrained(join(modelDir("tiny"), "unet"));
  const path = join(modelDir("sd15arch"), "ip-adapter_sd15arch.safetensors");
  const before = memory().handles;
  assert.throws(
    () => IpAdapter.load(path, unet),
    (e: Error) => e.message.includes(path) && /ip_adapter\.1\.to_k_ip\.weight/.test(e.message),
  );
  assert.equal(memory().handles, before, "a failed load frees the weights it had loaded");
  assert.throws(
    () => IpAdapter.load(join(modelDir("tiny"), "unet", "diffusion_pytorch_model.bin"), unet),
    /pickle/,
  );
});
