import assert from "node:assert/strict";
import { SafetensorsFile, type Tensor } from "../ffi/mod.ts";
import { parseConditioning, registry } from "../core/plugins.ts";
import type { Guidance } from "../core/plugins.ts";
import { registerDefaults } from "../plugins/defaults.ts";
import { assertClose, disposeAll, fixture, noLeak } from "./util.ts";

registerDefaults();

function references(): Map<string, Tensor> {
  return SafetensorsFile.open(fixture("guidance/guidance.safetensors")).loadAll();
}

const STEP = { index: 10, total: 50 };

Deno.test("guidance formulas match the reference combinations", () => {
  const t = references();
  const cases: [string, object, string][] = [
    ["dipsy", {}, "out.dipsy"],
    ["single-ip", {}, "out.single-ip"],
    ["cfg", {}, "out.cfg"],
    ["neg-text-relative", {}, "out.neg-text-relative"],
    ["diffusers-style", {}, "out.diffusers-style"],
    ["dipsy", { textScale: 3, positiveScale: 2, negativeScale: 1.5 }, "out.dipsy.custom"],
  ];
  noLeak("combine", () => {
    for (const [name, opts, key] of cases) {
      const g = registry.create<Guidance>("guidance", name, opts);
      const needs = g.needs(STEP);
      const preds = new Map(needs.map((c) => [c, t.get(c)!]));
      using out = g.combine(preds, STEP);
      assertClose(`${name} ${JSON.stringify(opts)}`, out, t.get(key)!, 1e-5, { absolute: true });
    }
  });
  disposeAll(t);
});

Deno.test("dipsy needs the four predictions of Eq. 9 and defaults to the paper's weights", () => {
  const g = registry.create<Guidance>("guidance", "dipsy");
  assert.deepEqual([...g.needs(STEP)].sort(), ["text", "text+pos", "text+pos+neg", "uncond"]);
  assert.equal(g.adapterScale, 0.6);
  assert.ok(g.usesNegative && g.usesImages);
  const cfg = registry.create<Guidance>("guidance", "cfg");
  assert.ok(!cfg.usesImages && !cfg.usesNegative);
  assert.deepEqual([...cfg.needs(STEP)].sort(), ["text", "uncond"]);
});

Deno.test("a guidance interval drops the image predictions outside it", () => {
  const g = registry.create<Guidance>("guidance", "dipsy", { interval: [0.2, 0.8] });
  assert.deepEqual([...g.needs({ index: 0, total: 10 })].sort(), ["text", "uncond"]);
  assert.equal(g.needs({ index: 5, total: 10 }).length, 4);
  assert.deepEqual([...g.needs({ index: 8, total: 10 })].sort(), ["text", "uncond"]);
  const t = references();
  const preds = new Map(["uncond", "text"].map((c) => [c, t.get(c)!]));
  using out = g.combine(preds, { index: 9, total: 10 });
  assertClose("outside the interval it is text CFG", out, t.get("out.cfg")!, 1e-5, {
    absolute: true,
  });
  disposeAll(t);
});

Deno.test("bad guidance options and names give clear errors", () => {
  assert.throws(
    () => registry.create("guidance", "dipsy", { textScale: "high" }),
    /guidance plugin "dipsy": option "textScale" must be a number, got "high"/,
  );
  assert.throws(
    () => registry.create("guidance", "dipsy", { interval: [0.9, 0.1] }),
    /option "interval"/,
  );
  assert.throws(() => registry.create("guidance", "nope"), /unknown guidance plugin "nope".*dipsy/);
  const g = registry.create<Guidance>("guidance", "dipsy");
  assert.throws(() => g.combine(new Map(), STEP), /prediction "uncond" was not computed/);
});

Deno.test("conditioning names parse into text and adapter switches", () => {
  assert.deepEqual(parseConditioning("text+pos+neg"), {
    text: "prompt",
    positive: true,
    negative: true,
  });
  assert.deepEqual(parseConditioning("uncond+neg"), {
    text: "empty",
    positive: false,
    negative: true,
  });
  assert.throws(() => parseConditioning("image+pos"), /must start with "uncond" or "text"/);
  assert.throws(() => parseConditioning("text+pos+pos"), /once each/);
});
