/**
 * Pair sampling: class similarity and P(j|k) against numpy (fixtures from
 * test/reference/pairs_ref.py, which follows the official softmax-then-mask route), the same
 * probabilities by other routes in the test, determinism in (seed, class, index) whatever the
 * call order, empirical frequencies, and the uniform and none plugins.
 */
import assert from "node:assert/strict";
import { fromHost } from "../ffi/mod.ts";
import { type PairChoice, type PairContext, registry, type SamplerPair } from "../core/plugins.ts";
import {
  classSimilarity,
  loadSimilarity,
  negativeProbabilities,
  saveSimilarity,
} from "../plugins/pairs/mod.ts";
import { registerDefaults } from "../plugins/defaults.ts";
import { fixture, noLeak, withTempDir } from "./util.ts";

registerDefaults();

interface Cases {
  similarity: { name: string; tau: number; similarity: number[][]; expected: number[][] }[];
  embeddings: { embeddings: number[][][]; expected: number[][] };
}

function load(): Cases {
  return JSON.parse(Deno.readTextFileSync(fixture("pairs/cases.json")));
}

const S3 = [[1.0, 0.5, 0.1], [0.5, 1.0, 0.3], [0.1, 0.3, 1.0]];
const S4 = [
  [1.0, 0.82, 0.61, 0.40],
  [0.82, 1.0, 0.77, 0.35],
  [0.61, 0.77, 1.0, 0.58],
  [0.40, 0.35, 0.58, 1.0],
];

function context(similarity: number[][] | undefined, shots: number[], seed = 42): PairContext {
  return {
    classNames: shots.map((_, i) => `class ${i}`),
    shotCounts: shots,
    shotSizes: shots.map((n, c) =>
      Array.from({ length: n }, (_, s) => [40 + 7 * c + s, 40 + 3 * s] as const)
    ),
    similarity,
    seed,
  };
}

function pairs(name: string, options: object = {}): SamplerPair {
  return registry.create<SamplerPair>("pairs", name, options);
}

Deno.test("negativeProbabilities matches numpy (softmax, diagonal zeroed, renormalised)", () => {
  const cases = load();
  let worst = 0;
  for (const c of cases.similarity) {
    c.similarity.forEach((_, k) => {
      const p = negativeProbabilities(c.similarity, k, c.tau);
      assert.equal(p[k], 0);
      p.forEach((v, j) => (worst = Math.max(worst, Math.abs(v - c.expected[k][j]))));
    });
  }
  console.log(
    `${cases.similarity.length} matrices, max abs error vs numpy ${worst.toExponential(2)}`,
  );
  assert.ok(worst <= 1e-12, `max abs error ${worst}`);
});

Deno.test("negativeProbabilities by other routes: closed form and masked softmax", () => {
  // 3 classes: P(1|0) = e^{0.5/tau} / (e^{0.5/tau} + e^{0.1/tau}) = sigmoid(0.4 / tau).
  const p = negativeProbabilities(S3, 0, 0.4);
  assert.ok(Math.abs(p[1] - 1 / (1 + Math.exp(-1))) < 1e-15);
  assert.ok(Math.abs(p[2] - 1 / (1 + Math.exp(1))) < 1e-15);
  // The definition written directly, without the max shift.
  for (const tau of [0.4, 0.25, 2]) {
    for (let k = 0; k < 4; k++) {
      const e = S4[k].map((s, j) => (j === k ? 0 : Math.exp(s / tau)));
      const z = e.reduce((a, b) => a + b, 0);
      const got = negativeProbabilities(S4, k, tau);
      got.forEach((v, j) => assert.ok(Math.abs(v - e[j] / z) < 1e-14, `tau ${tau} P(${j}|${k})`));
      assert.ok(Math.abs(got.reduce((a, b) => a + b, 0) - 1) < 1e-14);
    }
  }
  // A tiny temperature overflows exp() without the shift; the result is still exact.
  const sharp = negativeProbabilities(S4, 0, 1e-4);
  assert.deepEqual(sharp, [0, 1, 0, 0]);
  assert.throws(() => negativeProbabilities(S4, 0, 0), /tau/);
  assert.throws(() => negativeProbabilities(S4, 4), /not in/);
  assert.throws(() => negativeProbabilities([[1]], 0), /two classes/);
});

Deno.test("classSimilarity: cosine of unnormalised class means, as numpy", () => {
  const { embeddings, expected } = load().embeddings;
  noLeak("classSimilarity", () => {
    for (const dtype of ["f64", "f32"] as const) {
      const tensors = embeddings.map((e) =>
        fromHost(new Float64Array(e.flat()), [e.length, e[0].length], "f64")
      );
      const inputs = dtype === "f64" ? tensors : tensors.map((t) => t.to("f32"));
      const s = classSimilarity(inputs);
      let worst = 0;
      s.forEach((row, i) =>
        row.forEach((v, j) => (worst = Math.max(worst, Math.abs(v - expected[i][j]))))
      );
      console.log(`${dtype} inputs: max abs error vs numpy ${worst.toExponential(2)}`);
      // The fixture values are float32 numbers, so the f32 copy is exact too.
      assert.ok(worst <= 1e-12, `max abs error ${worst}`);
      for (const t of new Set([...tensors, ...inputs])) t.dispose();
    }
  });
  using bad = fromHost(new Float32Array(6), [2, 3], "f32");
  assert.throws(() => classSimilarity([bad]), /norm 0/);
});

Deno.test("similarity files: exact round trip, reordering, class-list mismatch", async () => {
  await withTempDir(async (dir) => {
    const file = `${dir}/similarity.json`;
    const s = load().similarity[8].similarity;
    const names = s.map((_, i) => `c${i}`);
    names[3] = "F/A-18";
    await saveSimilarity(file, { classNames: names, similarity: s, meta: { tau: 0.4 } });
    const back = await loadSimilarity(file, names);
    assert.deepEqual(back.similarity, s);
    assert.deepEqual(back.meta, { tau: 0.4 });

    const reversed = [...names].reverse();
    const r = await loadSimilarity(file, reversed);
    assert.equal(r.similarity[0][1], s[s.length - 1][s.length - 2]);

    await assert.rejects(
      () => loadSimilarity(file, [...names.slice(1), "new class"]),
      /other classes; missing: "new class"; not in this dataset: "c0"/,
    );
    await Deno.writeTextFile(file, '{"format": "something else"}');
    await assert.rejects(() => loadSimilarity(file), /not a "dipsy-class-similarity"/);
  });
});

function chooseAll(
  p: SamplerPair,
  ctx: PairContext,
  order: [number, number][],
): Map<string, PairChoice> {
  return new Map(order.map(([c, i]) => [`${c}/${i}`, p.choose(ctx, c, i)]));
}

Deno.test("pair choices depend only on (seed, class, index)", () => {
  const ctx = context(S4, [3, 5, 1, 4]);
  const order: [number, number][] = [];
  for (let c = 0; c < 4; c++) for (let i = 0; i < 50; i++) order.push([c, i]);
  for (const name of ["class-similarity", "uniform", "none"]) {
    const forward = chooseAll(pairs(name), ctx, order);
    const shuffled = [...order].sort((a, b) =>
      ((a[1] * 7919 + a[0] * 31) % 97) - ((b[1] * 7919 + b[0] * 31) % 97)
    );
    const again = chooseAll(pairs(name), ctx, shuffled);
    for (const [key, choice] of forward) assert.deepEqual(again.get(key), choice, `${name} ${key}`);
    // A different run seed gives different choices.
    const other = chooseAll(pairs(name), { ...ctx, seed: 43 }, order);
    assert.ok([...forward].some(([k, v]) => JSON.stringify(other.get(k)) !== JSON.stringify(v)));
  }
});

Deno.test("class-similarity: negative class frequencies within 2% of P over 20k draws", () => {
  for (const tau of [0.4, 0.1]) {
    const p = pairs("class-similarity", { tau, augment: false });
    const ctx = context(S4, [2, 2, 2, 2], 7);
    for (const k of [0, 2]) {
      const counts = [0, 0, 0, 0];
      const shots = [0, 0];
      for (let i = 0; i < 20000; i++) {
        const ch = p.choose(ctx, k, i);
        counts[ch.negative!.classIndex]++;
        shots[ch.positive.shotIndex]++;
        assert.equal(ch.positive.classIndex, k);
      }
      const want = negativeProbabilities(S4, k, tau);
      assert.equal(counts[k], 0);
      counts.forEach((n, j) =>
        assert.ok(
          Math.abs(n / 20000 - want[j]) < 0.02,
          `tau ${tau} P(${j}|${k}) ${n / 20000} vs ${want[j]}`,
        )
      );
      assert.ok(Math.abs(shots[0] / 20000 - 0.5) < 0.02, "positive shots are uniform");
    }
  }
});

Deno.test("uniform and none plugins; the positive side is shared by all plugins", () => {
  const ctx = context(S4, [3, 5, 1, 4], 11);
  const uniform = pairs("uniform");
  const counts = [0, 0, 0, 0];
  for (let i = 0; i < 20000; i++) counts[uniform.choose(ctx, 1, i).negative!.classIndex]++;
  assert.equal(counts[1], 0);
  for (const j of [0, 2, 3]) assert.ok(Math.abs(counts[j] / 20000 - 1 / 3) < 0.02, `${counts}`);

  const none = pairs("none");
  const sim = pairs("class-similarity");
  assert.equal(none.needsSimilarity, false);
  assert.equal(uniform.needsSimilarity, false);
  assert.equal(sim.needsSimilarity, true);
  for (let i = 0; i < 30; i++) {
    const a = none.choose(ctx, 3, i);
    const b = sim.choose(ctx, 3, i);
    const c = uniform.choose(ctx, 3, i);
    assert.equal(a.negative, null);
    assert.equal(a.negativeAugment, null);
    assert.deepEqual(a.positive, b.positive);
    assert.deepEqual(a.positiveAugment, b.positiveAugment);
    assert.deepEqual(a.positive, c.positive);
    // Recorded parameters fit the chosen images.
    for (
      const [shot, aug] of [[b.positive, b.positiveAugment], [
        b.negative!,
        b.negativeAugment,
      ]] as const
    ) {
      const [w, h] = ctx.shotSizes[shot.classIndex][shot.shotIndex];
      assert.ok(aug);
      assert.equal(aug.crop === null, w === h);
      if (aug.crop) assert.equal(aug.crop[2], Math.min(w, h));
    }
  }
  const plain = pairs("class-similarity", { augment: false }).choose(ctx, 0, 0);
  assert.equal(plain.positiveAugment, null);
  assert.equal(plain.negativeAugment, null);
  // Without a similarity matrix, one class, or bad options: clear errors.
  assert.throws(() => sim.choose(context(undefined, [2, 2]), 0, 0), /similarity matrix/);
  assert.throws(() => uniform.choose(context(undefined, [2]), 0, 0), /at least two classes/);
  assert.doesNotThrow(() => none.choose(context(undefined, [2]), 0, 0));
  assert.throws(
    () => pairs("uniform", { tau: 0.4 }),
    /pairs plugin "uniform": unknown option "tau" \(options: augment\)/,
  );
  assert.throws(
    () => pairs("class-similarity", { tau: -1 }),
    /option "tau" must be above 0, got -1/,
  );
  assert.throws(() => sim.choose(ctx, 4, 0), /class index 4/);
});
