/**
 * docs/plugins.md shows its examples verbatim (the code blocks equal docs/examples/*.ts), and the
 * examples work: loaded with --plugin, they drive `generate` end to end on the tiny models.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { fromHost, setNumThreads, type Tensor } from "../ffi/mod.ts";
import {
  type Guidance,
  type PairContext,
  Registry,
  registry,
  type SamplerPair,
} from "../core/plugins.ts";
import type { ManifestEntry } from "../core/generate.ts";
import { main } from "../cli/main.ts";
import { drawDataset } from "../cli/demo.ts";
import { rampedNegative } from "../docs/examples/my_guidance.ts";
import { hardestNegative } from "../docs/examples/my_pairs.ts";
import { registerDefaults } from "../plugins/defaults.ts";
import { noLeak, withTempDir } from "./util.ts";

registerDefaults();

setNumThreads(1);

const repo = (p: string) => new URL(`../${p}`, import.meta.url).pathname;
const EXAMPLES = ["docs/examples/my_guidance.ts", "docs/examples/my_pairs.ts"];

Deno.test("docs/plugins.md includes each example file verbatim", async () => {
  const doc = await Deno.readTextFile(repo("docs/plugins.md"));
  for (const file of EXAMPLES) {
    const marker = `<!-- file: ${file} -->`;
    const at = doc.indexOf(marker);
    assert.ok(at >= 0, `docs/plugins.md has no ${marker}`);
    const m = /^\s*```ts\n([\s\S]*?)\n```/.exec(doc.slice(at + marker.length));
    assert.ok(m, `no ts code block after ${marker}`);
    const code = await Deno.readTextFile(repo(file));
    assert.equal(`${m[1]}\n`, code, `the block after ${marker} differs from ${file}`);
  }
});

/** The examples in a registry of their own, built from checked options as `--plugin` builds them. */
const examples = new Registry();
examples.register(rampedNegative);
examples.register(hardestNegative);

Deno.test("the example guidance ramps Eq. 9's negative weight over the steps", () => {
  const g = examples.create<Guidance>("guidance", "ramped-negative", { negativeScale: 4 });
  const dipsy = registry.create<Guidance>("guidance", "dipsy", { negativeScale: 4 });
  const single = registry.create<Guidance>("guidance", "single-ip");
  const t = (v: number[]) => fromHost(v, [1, 2], "f32");
  const preds = new Map<string, Tensor>([
    ["uncond", t([0.1, -0.2])],
    ["text", t([0.3, 0.5])],
    ["text+pos", t([-0.4, 0.2])],
    ["text+pos+neg", t([0.7, -0.1])],
  ]);
  const same = (a: Tensor, b: Tensor) => {
    const x = a.toFloat64(), y = b.toFloat64();
    x.forEach((v, i) => assert.ok(Math.abs(v - y[i]) < 1e-6, `${v} vs ${y[i]}`));
    a.dispose();
    b.dispose();
  };
  const last = { index: 9, total: 10 }, first = { index: 0, total: 10 };
  noLeak("combine", () => {
    same(g.combine(preds, last), dipsy.combine(preds, last));
    same(g.combine(preds, first), single.combine(preds, first));
  });
  for (const x of preds.values()) x.dispose();
  assert.throws(
    () => examples.create("guidance", "ramped-negative", { textScale: -1 }),
    /textScale/,
  );
});

Deno.test("the example pair sampler takes the most similar class, deterministically", () => {
  const p = examples.create<SamplerPair>("pairs", "hardest-negative");
  const context: PairContext = {
    classNames: ["a", "b", "c"],
    shotCounts: [2, 3, 1],
    shotSizes: [[[40, 30], [30, 30]], [[20, 20], [20, 30], [25, 25]], [[50, 40]]],
    similarity: [[1, 0.2, 0.9], [0.2, 1, 0.1], [0.9, 0.1, 1]],
    seed: 3,
  };
  for (let index = 0; index < 20; index++) {
    const c = p.choose(context, 1, index);
    assert.equal(c.negative!.classIndex, 0);
    assert.equal(c.positive.classIndex, 1);
    assert.deepEqual(p.choose(context, 1, index), c, "same (seed, class, index), same choice");
  }
  assert.equal(p.choose(context, 0, 0).negative!.classIndex, 2);
  for (let index = 0; index < 10; index++) {
    const c = p.choose(context, 0, index);
    const [w, h] = context.shotSizes[0][c.positive.shotIndex];
    assert.equal(c.positiveAugment!.crop !== null, w !== h, "non-square shots are cropped");
  }
  assert.equal(
    examples.create<SamplerPair>("pairs", "hardest-negative", { augment: false }).choose(
      context,
      0,
      0,
    )
      .positiveAugment,
    null,
  );
});

Deno.test("generate --plugin loads both examples and uses them", async () => {
  await withTempDir(async (root) => {
    const data = join(root, "data"), out = join(root, "out");
    await drawDataset(data, 2);
    const code = await main([
      "generate",
      "--data",
      data,
      "--out",
      out,
      "--tiny",
      "--plugin",
      repo(EXAMPLES[0]),
      "--plugin",
      repo(EXAMPLES[1]),
      "--guidance",
      "ramped-negative",
      "--pairs",
      "hardest-negative",
      "--set",
      "guidance.negativeScale=8",
      "--per-class",
      "1",
      "--steps",
      "2",
      "--size",
      "32",
      "--device",
      "cpu",
      "--dtype",
      "f32",
    ]);
    assert.equal(code, 0);
    const lines = (await Deno.readTextFile(join(out, "manifest.jsonl"))).trim().split("\n");
    assert.equal(lines.length, 4);
    const sim = JSON.parse(await Deno.readTextFile(join(out, "similarity.json")));
    for (const l of lines) {
      const e = JSON.parse(l) as ManifestEntry;
      assert.equal(e.guidance.name, "ramped-negative");
      assert.equal(e.guidance.negativeScale, 8);
      assert.equal(e.pairs.name, "hardest-negative");
      const row = sim.similarity[e.classIndex] as number[];
      const best = row.reduce((b, v, j) => j !== e.classIndex && (b < 0 || v > row[b]) ? j : b, -1);
      assert.equal(e.negative!.class, sim.classNames[best]);
    }
  });
});
