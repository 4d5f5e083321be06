/**
 * AutoencoderKL parity with diffusers. Fixtures come from test/reference/vae_ref.py (run by
 * `deno task test`): random VAEs saved with save_pretrained, fixed inputs, diffusers' outputs.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { Generator, noGrad, ops, SafetensorsFile, scope, type Tensor } from "../ffi/mod.ts";
import { MapSource } from "../core/weights.ts";
import { AutoencoderKL } from "../plugins/sd15/vae.ts";
import { readVaeConfig, TINY_VAE_CONFIG, vaeScaleFactor } from "../plugins/sd15/vae_config.ts";
import { assertClose, disposeAll, fixture, loadIO, noLeak, scratchModel } from "./util.ts";

const TOL = 1e-4;

function caseDir(name: string): string {
  return fixture(`vae/${name}`, "io.safetensors");
}

for (const name of ["tiny", "mid", "bare"]) {
  Deno.test(`vae ${name}: encode/decode match diffusers, no handle leaks`, () => {
    const dir = caseDir(name);
    const meta = JSON.parse(readFileSync(join(dir, "meta.json"), "utf8"));
    const io = loadIO(dir, { dtype: "f32" });
    using vae = AutoencoderKL.fromPretrained(join(dir, "vae"));
    const cfg = vae.config;
    noGrad(() => {
      // Warm-up outside the leak check: first calls may create lasting library state.
      scope(() => vae.decode(io.get("latents")!));
      noLeak("encode/decode", () =>
        scope(() => {
          const { mean, logvar } = vae.encode(io.get("image")!);
          assertClose(`${name} mean`, mean, io.get("mean")!, TOL);
          assertClose(`${name} logvar`, logvar, io.get("logvar")!, TOL);

          const gen = new Generator(meta.sample_seed);
          const sampled = vae.encodeLatents(io.get("image")!, gen);
          gen.dispose();
          let want = io.get("sample")!;
          if (cfg.shiftFactor !== null) want = ops.subScalar(want, cfg.shiftFactor);
          const scaled = ops.mulScalar(want, cfg.scalingFactor);
          assertClose(`${name} sampled latents`, sampled, scaled, TOL);

          assertClose(`${name} decode`, vae.decode(io.get("latents")!), io.get("decoded")!, TOL);
          assertClose(
            `${name} decodeToImage`,
            vae.decodeToImage(io.get("latents")!),
            io.get("decoded_image")!,
            TOL,
          );
        }));
    });
    disposeAll(io);
  });
}

Deno.test("vae: mean latents are the scaled posterior mean", () => {
  const dir = caseDir("tiny");
  const io = loadIO(dir, { dtype: "f32" });
  using vae = AutoencoderKL.fromPretrained(join(dir, "vae"));
  noGrad(() =>
    scope(() => {
      const latents = vae.encodeLatents(io.get("image")!);
      assertClose("tiny mean latents", latents, ops.mulScalar(io.get("mean")!, 0.18215), TOL);
    })
  );
  disposeAll(io);
});

Deno.test("vae: old diffusers attention names (query/key/value/proj_attn) load too", () => {
  const dir = caseDir("tiny");
  const io = loadIO(dir, { dtype: "f32" });
  const weights = SafetensorsFile.open(join(dir, "vae", "diffusion_pytorch_model.safetensors"))
    .loadAll();
  const legacy = new Map<string, Tensor>();
  const rename: Record<string, string> = {
    to_q: "query",
    to_k: "key",
    to_v: "value",
    "to_out.0": "proj_attn",
  };
  for (const [k, t] of weights) {
    const m = k.match(/^(.*\.attentions\.0\.)(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$/);
    legacy.set(m ? `${m[1]}${rename[m[2]]}.${m[3]}` : k, t);
  }
  assert.ok([...legacy.keys()].some((k) => k.endsWith("attentions.0.proj_attn.weight")));
  const source = new MapSource(legacy);
  using vae = new AutoencoderKL(source, readVaeConfig(join(dir, "vae", "config.json")));
  source.assertAllUsed();
  noGrad(() =>
    scope(() =>
      assertClose("legacy decode", vae.decode(io.get("latents")!), io.get("decoded")!, TOL)
    )
  );
  disposeAll(weights, io);
});

Deno.test("vae: tiny preset has the diffusers layout and runs", () => {
  // The fixture's "tiny" case is built from the same numbers as the preset.
  const file = SafetensorsFile.open(
    join(caseDir("tiny"), "vae", "diffusion_pytorch_model.safetensors"),
  );
  noLeak("disposing the model frees every weight", () => {
    using vae = AutoencoderKL.random(TINY_VAE_CONFIG, 7);
    const params = vae.namedParameters();
    assert.deepEqual([...params.keys()].sort(), file.keys().sort());
    for (const [k, t] of params) assert.deepEqual(t.shape, file.info(k).shape, k);
    const f = vaeScaleFactor(TINY_VAE_CONFIG);
    noGrad(() =>
      scope(() => {
        const z = ops.randn([1, 4, 32 / f, 32 / f], "f32", "cpu", null);
        const img = vae.decodeToImage(z);
        assert.deepEqual(img.shape, [1, 3, 32, 32]);
        const lat = vae.encodeLatents(img);
        assert.deepEqual(lat.shape, [1, 4, 16, 16]);
      })
    );
  });
});

/** A scratch vae/ folder: the tiny fixture's files, with the config and/or weights edited. */
function scratchVae(
  editConfig?: (c: Record<string, unknown>) => void,
  editWeights?: (w: Map<string, Tensor>) => void,
): string {
  return scratchModel(join(caseDir("tiny"), "vae"), "diffusion_pytorch_model.safetensors", {
    config: editConfig,
    weights: editWeights,
  });
}

Deno.test("vae: unsupported config values name the file and key", () => {
  const cases: [string, (c: Record<string, unknown>) => void][] = [
    [
      "down_block_types",
      (c) => (c.down_block_types = ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ],
    ["up_block_types", (c) => (c.up_block_types = ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"])],
    ["act_fn", (c) => (c.act_fn = "mish")],
    ["norm_num_groups", (c) => (c.norm_num_groups = 24)],
    ["block_out_channels", (c) => (c.block_out_channels = [32, "64"])],
  ];
  for (const [key, edit] of cases) {
    const dir = scratchVae(edit);
    try {
      noLeak(key, () =>
        assert.throws(
          () => AutoencoderKL.fromPretrained(dir),
          (e: Error) =>
            e.message.includes(join(dir, "config.json")) && e.message.includes(`"${key}"`),
          key,
        ));
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  }
});

Deno.test("vae: a wrong-shape or unexpected weight names the file and key", () => {
  const bad = "decoder.up_blocks.1.resnets.0.conv1.weight";
  const dir = scratchVae(undefined, (w) => {
    w.get(bad)!.dispose();
    w.set(bad, ops.zeros([32, 32, 3, 3], "f32", "cpu"));
  });
  const extra = scratchVae(
    undefined,
    (w) => w.set("decoder.extra.weight", ops.zeros([2], "f32", "cpu")),
  );
  try {
    const file = join(dir, "diffusion_pytorch_model.safetensors");
    noLeak("a failed load frees the weights it had loaded", () =>
      assert.throws(
        () => AutoencoderKL.fromPretrained(dir),
        (e: Error) => e.message.includes(file) && e.message.includes(`"${bad}"`),
      ));
    noLeak("unexpected weight", () =>
      assert.throws(
        () => AutoencoderKL.fromPretrained(extra),
        (e: Error) => e.message.includes("decoder.extra.weight"),
      ));
  } finally {
    Deno.removeSync(dir, { recursive: true });
    Deno.removeSync(extra, { recursive: true });
  }
});
