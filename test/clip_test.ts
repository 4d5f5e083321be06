/**
 * CLIP encoders against transformers 5.23 (fixtures from test/reference/clip_ref.py), plus
 * config parsing, checkpoint errors, presets, LoRA hook points and handle leaks.
 */
import assert from "node:assert/strict";
import { readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { enableGrad, fromHost, Generator, noGrad, ops, scope, type Tensor } from "../ffi/mod.ts";
import { WeightError } from "../core/weights.ts";
import {
  ClipConfigError,
  parseClipModelConfig,
  parseClipTextConfig,
  parseClipVisionConfig,
} from "../plugins/clip/config.ts";
import { loadClipModel, loadClipText, loadClipVision } from "../plugins/clip/model.ts";
import type { Projection } from "../plugins/clip/encoder.ts";
import { assertClose, disposeAll, fixture, loadIO, noLeak, scratchModel } from "./util.ts";

const TOL = 1e-4;

function clipFixture(name: string): string {
  return fixture(`clip/${name}`);
}

/** The reference inputs and outputs of one fixture model; the caller disposes them. */
function io(name: string): Map<string, Tensor> {
  return loadIO(clipFixture(name));
}

function expectClose(label: string, got: Tensor, want: Tensor): void {
  assertClose(label, got, want, TOL);
}

// ---------------------------------------------------------------------------------------------
// Configs

Deno.test("clip config: real config.json files resolve like transformers", () => {
  const dir = clipFixture("configs");
  const cases: [string, (j: Record<string, unknown>, f: string) => unknown][] = [
    ["sd15_text_encoder", parseClipTextConfig],
    ["text_minimal", parseClipTextConfig],
    ["ip_adapter_image_encoder", parseClipVisionConfig],
    ["vision_minimal", parseClipVisionConfig],
    ["clip_vit_base_patch16", parseClipModelConfig],
    ["clip_minimal", parseClipModelConfig],
  ];
  for (const [name, parse] of cases) {
    const file = join(dir, `${name}.json`);
    const got = parse(JSON.parse(readFileSync(file, "utf8")), file);
    const want = JSON.parse(readFileSync(join(dir, `${name}.resolved.json`), "utf8"));
    assert.deepEqual(got, want, name);
  }
  const ipa = parseClipVisionConfig(
    JSON.parse(readFileSync(join(dir, "ip_adapter_image_encoder.json"), "utf8")),
  );
  assert.equal(ipa.hiddenSize, 1280);
  assert.equal(ipa.numHiddenLayers, 32);
  assert.equal(ipa.hiddenAct, "gelu");
  assert.equal(ipa.projectionDim, 1024);
});

Deno.test("clip config: unsupported values name the file and key", () => {
  assert.throws(
    () => parseClipTextConfig({ hidden_act: "swiglu" }, "/x/text_encoder/config.json"),
    (e: Error) =>
      e instanceof ClipConfigError && e.message.includes("/x/text_encoder/config.json") &&
      e.message.includes('"hidden_act"') && e.message.includes("swiglu"),
  );
  assert.throws(
    () => parseClipModelConfig({ vision_config: { hidden_act: "mish" } }, "c.json"),
    /c\.json: "vision_config\.hidden_act"/,
  );
  assert.throws(
    () => parseClipVisionConfig({ hidden_size: 30, num_attention_heads: 4 }, "v.json"),
    /v\.json: "num_attention_heads"/,
  );
  assert.throws(() => parseClipTextConfig({ eos_token_id: [2, 3] }, "t.json"), /"eos_token_id"/);
});

// ---------------------------------------------------------------------------------------------
// Parity

Deno.test("clip text: SD-like CLIPTextModel matches transformers", () => {
  const ref = io("text");
  using model = loadClipText(clipFixture("text"));
  assert.equal(model.textProjection, null);
  noGrad(() =>
    noLeak("text forward", () =>
      scope(() => {
        const ids = ref.get("input_ids")!;
        const out = model.forward(ids);
        expectClose("last_hidden_state", out.lastHiddenState, ref.get("last_hidden_state")!);
        expectClose("pooler_output", out.pooled, ref.get("pooler_output")!);
        assert.equal(out.textEmbeds, null);
        expectClose("hidden_states[-2]", model.hiddenState(ids, -2), ref.get("hidden_states_m2")!);
        const masked = model.forward(ids, { attentionMask: ref.get("attention_mask")! });
        expectClose("masked last", masked.lastHiddenState, ref.get("masked_last_hidden_state")!);
        expectClose("masked pooled", masked.pooled, ref.get("masked_pooler_output")!);
        const left = model.forward(ref.get("left_input_ids")!, {
          attentionMask: ref.get("left_attention_mask")!,
        });
        expectClose("left-padded last", left.lastHiddenState, ref.get("left_last_hidden_state")!);
      }))
  );

  // The SD1.5 file layout (`text_model.` prefix, position_ids buffer) loads to the same model.
  using legacy = loadClipText(clipFixture("text_legacy"));
  noGrad(() =>
    scope(() => {
      const out = legacy.forward(ref.get("input_ids")!);
      expectClose("legacy last_hidden_state", out.lastHiddenState, ref.get("last_hidden_state")!);
    })
  );
  disposeAll(ref);
});

Deno.test("clip vision: IP-Adapter-like CLIPVisionModelWithProjection matches transformers", () => {
  const ref = io("vision");
  using model = loadClipVision(clipFixture("vision"));
  noGrad(() =>
    noLeak("vision forward", () =>
      scope(() => {
        const px = ref.get("pixel_values")!;
        const out = model.forward(px);
        expectClose("last_hidden_state", out.lastHiddenState, ref.get("last_hidden_state")!);
        expectClose("pooler_output", out.pooled, ref.get("pooler_output")!);
        expectClose("image_embeds", out.imageEmbeds!, ref.get("image_embeds")!);
        expectClose("hidden_states[-2]", out.penultimateHiddenState, ref.get("hidden_states_m2")!);

        // hiddenState(-2) must not run the last layer: make that layer unusable and ask again.
        const last = model.visionModel.encoder.layers.at(-1)!.selfAttn;
        const saved = last.qProj;
        last.qProj = {
          forward(): Tensor {
            throw new Error("last layer ran");
          },
        };
        try {
          expectClose("hiddenState(-2)", model.hiddenState(px, -2), ref.get("hidden_states_m2")!);
        } finally {
          last.qProj = saved;
        }
      }))
  );
  disposeAll(ref);
});

Deno.test("clip model: CLIPModel logits and features match transformers", () => {
  const ref = io("clip");
  using model = loadClipModel(clipFixture("clip"));
  noGrad(() =>
    noLeak("clip forward", () =>
      scope(() => {
        const ids = ref.get("input_ids")!, px = ref.get("pixel_values")!;
        const out = model.forward(ids, px);
        expectClose("logits_per_image", out.logitsPerImage, ref.get("logits_per_image")!);
        expectClose("text_embeds", out.textEmbeds, ref.get("text_embeds")!);
        expectClose("image_embeds", out.imageEmbeds, ref.get("image_embeds")!);
        expectClose("text last", out.text.lastHiddenState, ref.get("text_last_hidden_state")!);
        expectClose("text_features", model.getTextFeatures(ids), ref.get("text_features")!);
        expectClose("image_features", model.getImageFeatures(px), ref.get("image_features")!);
      }))
  );
  // Either tower alone from the same CLIPModel folder (pair sampling needs the image side only).
  using vision = loadClipVision(clipFixture("clip"));
  using text = loadClipText(clipFixture("clip"));
  noGrad(() =>
    scope(() => {
      const img = vision.forward(ref.get("pixel_values")!).imageEmbeds!;
      expectClose("vision tower alone", img, ref.get("image_features")!);
      const txt = text.forward(ref.get("input_ids")!).textEmbeds!;
      expectClose("text tower alone", txt, ref.get("text_features")!);
    })
  );
  disposeAll(ref);
});

Deno.test("clip mid-size: sharded 256-wide towers with 77 tokens and 257 patches", () => {
  const ref = io("mid_text");
  using text = loadClipText(clipFixture("mid_text"));
  noGrad(() =>
    noLeak("mid text", () =>
      scope(() => {
        const out = text.forward(ref.get("input_ids")!);
        expectClose("mid last_hidden_state", out.lastHiddenState, ref.get("last_hidden_state")!);
        expectClose("mid text_embeds", out.textEmbeds!, ref.get("text_embeds")!);
      }))
  );
  disposeAll(ref);

  const vref = io("mid_vision");
  using vision = loadClipVision(clipFixture("mid_vision"));
  noGrad(() =>
    noLeak("mid vision", () =>
      scope(() => {
        const out = vision.forward(vref.get("pixel_values")!);
        expectClose("mid vision last", out.lastHiddenState, vref.get("last_hidden_state")!);
        expectClose("mid image_embeds", out.imageEmbeds!, vref.get("image_embeds")!);
        expectClose(
          "mid hidden_states[-2]",
          out.penultimateHiddenState,
          vref.get("hidden_states_m2")!,
        );
      }))
  );
  disposeAll(vref);
});

// ---------------------------------------------------------------------------------------------
// Checkpoint errors

/** A copy of the `vision` fixture with its weights edited by `edit`. */
function editedVision(edit: (m: Map<string, Tensor>) => void): string {
  return scratchModel(clipFixture("vision"), "model.safetensors", { weights: edit });
}

Deno.test("clip loading: missing, mis-shaped and unexpected keys fail loudly", () => {
  const key = "vision_model.encoder.layers.1.mlp.fc1.weight";
  const missing = editedVision((m) => {
    m.get(key)!.dispose();
    m.delete(key);
  });
  const reshaped = editedVision((m) => {
    m.get(key)!.dispose();
    m.set(key, ops.zeros([64, 31], "f32", "cpu"));
  });
  const extra = editedVision((m) =>
    m.set("vision_model.encoder.layers.9.mlp.fc1.weight", ops.zeros([2], "f32", "cpu"))
  );
  try {
    const file = (d: string) => join(d, "model.safetensors");
    assert.throws(
      () => loadClipVision(missing),
      (e: Error) =>
        e instanceof WeightError && e.message.includes(file(missing)) && e.message.includes(key) &&
        e.message.includes("[64, 32]"),
    );
    assert.throws(
      () => loadClipVision(reshaped),
      (e: Error) =>
        e instanceof WeightError && e.message.includes(file(reshaped)) &&
        e.message.includes(key) && e.message.includes("[64, 31]") && e.message.includes("[64, 32]"),
    );
    assert.throws(() => loadClipVision(extra), /layers\.9\.mlp\.fc1\.weight/);
    assert.throws(() => loadClipText(clipFixture("vision")), /describes a CLIP vision model/);
  } finally {
    for (const d of [missing, reshaped, extra]) rmSync(d, { recursive: true });
  }
});

Deno.test("clip loading: unsupported hidden_act in a folder names config.json", () => {
  const dir = scratchModel(clipFixture("text"), "model.safetensors", {
    config: (c) => (c.hidden_act = "swish_glu"),
  });
  try {
    assert.throws(
      () => loadClipText(dir),
      (e: Error) =>
        e.message.includes(join(dir, "config.json")) && e.message.includes('"hidden_act"'),
    );
  } finally {
    rmSync(dir, { recursive: true });
  }
});

// ---------------------------------------------------------------------------------------------
// Presets and LoRA hook points

Deno.test("clip presets: tiny towers run, and names mirror the checkpoint keys", () => {
  using text = loadClipText("tiny", { seed: 1 });
  using vision = loadClipVision("tiny", { seed: 1 });
  using clip = loadClipModel("tiny", { seed: 1 });
  assert.ok(clip.namedParameters().has("text_model.encoder.layers.1.self_attn.q_proj.weight"));
  assert.ok(clip.namedParameters().has("vision_model.pre_layrnorm.weight"));
  assert.ok(clip.namedParameters().has("logit_scale"));
  assert.ok(Math.abs(clip.logitScale.item() - 2.6592) < 1e-6);
  const names = clip.namedAttentions().map(([n]) => n);
  assert.equal(names.length, 4);
  assert.equal(names[0], "text_model.encoder.layers.0.self_attn");
  assert.equal(names[3], "vision_model.encoder.layers.1.self_attn");

  noGrad(() =>
    noLeak("tiny presets", () =>
      scope(() => {
        const eos = text.config.eosTokenId, bos = text.config.bosTokenId!;
        const ids = fromHost([bos, 72, 105, eos, eos, eos, bos, 519, 3, 4, 5, eos], [2, 6], "i64");
        const t = text.forward(ids);
        assert.deepEqual([...t.lastHiddenState.shape], [2, 6, 32]);
        assert.deepEqual([...t.pooled.shape], [2, 32]);
        const v = vision.forward(ops.zeros([1, 3, 32, 32], "f32", "cpu"));
        assert.deepEqual([...v.imageEmbeds!.shape], [1, 16]);
        assert.deepEqual([...v.penultimateHiddenState.shape], [1, 65, 32]);
        const c = clip.forward(ids, ops.zeros([3, 3, 32, 32], "f32", "cpu"));
        assert.deepEqual([...c.logitsPerImage.shape], [3, 2]);
      }))
  );
});

Deno.test("clip LoRA hook: a wrapped q_proj changes the output and receives gradients", () => {
  using clip = loadClipModel("tiny", { seed: 2 });
  const attn = clip.text.textModel.encoder.layers[0].selfAttn;
  const base = attn.qProj;
  // Random, not constant: a constant matrix maps LayerNorm outputs (zero mean) to zero.
  const a = scope(() => {
    using g = new Generator(7n);
    return ops.mulScalar(ops.randn([32, 32], "f32", "cpu", g), 0.1);
  });
  ops.requiresGrad_(a, true);
  const wrapped: Projection = {
    forward: (x) => scope(() => base.forward(x).add(ops.matmul(x, a))),
  };
  const ids = fromHost([518, 10, 20, 519], [1, 4], "i64");
  const px = ops.zeros([1, 3, 32, 32], "f32", "cpu");
  try {
    const before = noGrad(() => scope(() => clip.getTextFeatures(ids).toFloat64()));
    attn.qProj = wrapped;
    noLeak("lora backward", () =>
      enableGrad(() =>
        scope(() => {
          const loss = clip.forward(ids, px).logitsPerImage.sum();
          ops.backward(loss, null);
        })
      ));
    const g = ops.grad(a);
    assert.ok(g !== null, "LoRA weight got no gradient");
    assert.ok(g.toFloat64().some((v) => v !== 0));
    g.dispose();
    const after = noGrad(() => scope(() => clip.getTextFeatures(ids).toFloat64()));
    assert.ok(after.some((v, i) => Math.abs(v - before[i]) > 1e-7), "wrapper had no effect");
  } finally {
    attn.qProj = base;
    for (const t of [a, ids, px]) t.dispose();
  }
});

Deno.test("clip vision: an image the encoder cannot take is a clear error, not a crash", () => {
  const v = loadClipVision("tiny");
  try {
    for (const shape of [[1, 1, 32, 32], [1, 3, 33, 32], [3, 32, 32], [1, 3, 64, 64]]) {
      noLeak(`bad pixels ${shape}`, () => {
        using px = ops.zeros(shape, "f32", "cpu");
        assert.throws(() => v.forward(px), /CLIP vision: pixels must be \[batch, 3, 32, 32\]/);
      });
    }
  } finally {
    v.dispose();
  }
});
