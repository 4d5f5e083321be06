/**
 * The DataDream CLIP LoRA classifier against transformers + peft (fixtures from
 * test/reference/classifier_ref.py): logits, loss, LoRA gradients, AdamW steps and the schedule;
 * adapters saved here load in peft (test/reference/peft_load_check.py); a tiny CLIP learns a
 * colour task in every training mode; no handles leak across a step.
 */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  fromHost,
  Generator,
  manualSeed,
  memory,
  noGrad,
  ops,
  SafetensorsFile,
  saveSafetensors,
  scope,
  setNumThreads,
  type Tensor,
} from "../ffi/mod.ts";
import { loadClipModel } from "../plugins/clip/model.ts";
import { ClipTokenizer } from "../plugins/clip/tokenizer.ts";
import {
  classPrompt,
  ClipLoraClassifier,
  type ClipLoraOptions,
  type TrainMode,
} from "../plugins/classifiers/clip_lora.ts";
import { readAdapterConfig } from "../plugins/classifiers/lora.ts";
import { disposeAll, fixture, loadIO, maxAbsError } from "./util.ts";
import {
  AdamW,
  LossScaler,
  warmupCosineLr,
  warmupCosineSchedule,
} from "../plugins/classifiers/optim.ts";

const ROOT = new URL("../", import.meta.url).pathname;
const TOL = 1e-5;

interface Meta {
  classNames: string[];
  dataset: string;
  prompts: string[];
  rank: number;
  alpha: number;
  lambda_: number;
  lr: number;
  minLr: number;
  weightDecay: number;
  run: { epochs: number; warmup_epochs: number; iters_per_epoch: number };
  firstIteration: number;
  steps: number;
  stepLrs: number[];
  params: string[];
}

const fixturePath = (name = "") => join(fixture("classifier", "meta.json"), name);
const meta = (): Meta => JSON.parse(readFileSync(fixturePath("meta.json"), "utf8"));
const io = (): Map<string, Tensor> => loadIO(fixturePath());

/** Asserts max |got - want| <= tol (absolute: the tolerance of the parity requirement). */
function expectClose(label: string, got: Tensor, want: Tensor, tol = TOL): number {
  const { err } = maxAbsError(got, want, label);
  assert.ok(err <= tol, `${label}: max abs error ${err} exceeds ${tol}`);
  return err;
}

/** The fixture's CLIPModel wrapped like the reference: its peft LoRA, dropout 0. */
function fixtureClassifier(m: Meta, extra: Partial<ClipLoraOptions> = {}): ClipLoraClassifier {
  const model = loadClipModel(fixturePath("clip"));
  return ClipLoraClassifier.create(model, ClipTokenizer.byteLevel(), {
    classNames: m.classNames,
    dataset: m.dataset,
    adapter: fixturePath("adapter_init"),
    lambda: m.lambda_,
    weightDecay: m.weightDecay,
    schedule: {
      baseLr: m.lr,
      finalLr: m.minLr,
      warmupStartLr: m.minLr,
      epochs: m.run.epochs,
      warmupEpochs: m.run.warmup_epochs,
      itersPerEpoch: m.run.iters_per_epoch,
    },
    ownsModel: true,
    ...extra,
  });
}

// ---------------------------------------------------------------------------------------------
// Schedule and optimiser

Deno.test("classifier: the LR schedule is DataDream's cosine_scheduler at every iteration", () => {
  const cases = JSON.parse(readFileSync(fixturePath("schedule.json"), "utf8")) as {
    epochs: number;
    warmupEpochs: number;
    itersPerEpoch: number;
    baseLr: number;
    finalLr: number;
    warmupStartLr: number;
    datadream: number[];
    closedForm: number[];
  }[];
  let worst = 0, warmupExact = true, count = 0;
  for (const c of cases) {
    const ours = warmupCosineSchedule(c);
    assert.equal(ours.length, c.datadream.length);
    const w = c.warmupEpochs * c.itersPerEpoch;
    for (let i = 0; i < ours.length; i++) {
      const rel = Math.abs(ours[i] - c.datadream[i]) / c.datadream[i];
      worst = Math.max(worst, rel, Math.abs(ours[i] - c.closedForm[i]) / c.closedForm[i]);
      if (i < w && ours[i] !== c.datadream[i]) warmupExact = false;
      count++;
    }
  }
  console.log(`  ${count} rates, worst relative difference ${worst.toExponential(2)}`);
  assert.ok(warmupExact, "warm-up rates must equal numpy.linspace bit for bit");
  assert.ok(worst <= 4e-16, `schedule differs by ${worst} (relative)`);

  const run = { baseLr: 1e-4, finalLr: 1e-8, warmupStartLr: 1e-8, epochs: 10, warmupEpochs: 3 };
  const o = { ...run, itersPerEpoch: 5 };
  assert.equal(warmupCosineLr(0, o), 1e-8);
  assert.equal(warmupCosineLr(14, o), 1e-4);
  assert.equal(warmupCosineLr(15, o), 1e-4);
  assert.ok(warmupCosineLr(49, o) > 1e-8 && warmupCosineLr(49, o) < 1e-6);
  assert.throws(() => warmupCosineLr(50, o), /outside 0\.\.49/);
  assert.throws(() => warmupCosineSchedule({ ...o, warmupEpochs: 11 }), /exceed/);
});

Deno.test("classifier: AdamW skips tensors without a gradient; zeroGrad drops gradients", () => {
  const before = memory().handles;
  const p = scope(() => ops.mulScalar(ops.ones([3], "f32", "cpu"), 1));
  const q = scope(() => ops.mulScalar(ops.ones([3], "f32", "cpu"), 1));
  ops.requiresGrad_(p, true);
  ops.requiresGrad_(q, true);
  const opt = new AdamW([p, q], { lr: 0.1, weightDecay: 0 });
  scope(() => ops.backward(ops.sumAll(p.mul(2)), null));
  opt.step();
  assert.equal(opt.state[0]?.step, 1);
  assert.equal(opt.state[1], null, "q had no gradient: no state, no update");
  assert.deepEqual([...q.toFloat64()], [1, 1, 1]);
  // First Adam step moves by lr * sign(grad) (bias-corrected m / sqrt(v) = 1).
  for (const v of p.toFloat64()) assert.ok(Math.abs(v - 0.9) < 1e-6, `${v}`);
  opt.zeroGrad();
  assert.equal(ops.grad(p), null);
  opt.dispose();
  p.dispose();
  q.dispose();
  assert.equal(memory().handles, before);
});

Deno.test("classifier: LossScaler skips non-finite steps and adapts the scale", () => {
  const p = scope(() => ops.mulScalar(ops.ones([2], "f32", "cpu"), 1));
  ops.requiresGrad_(p, true);
  const s = new LossScaler({ initScale: 8, growthInterval: 2 });
  scope(() => ops.backward(s.scaleLoss(ops.sumAll(p.mul(3))), null));
  assert.equal(s.unscale([p]), true);
  using g = ops.grad(p)!;
  assert.deepEqual([...g.toFloat64()], [3, 3], "gradients divided back by the scale");
  s.update(true);
  s.update(true);
  assert.equal(s.scale, 16, "doubles after growthInterval clean steps");
  ops.zeroGrad(p);
  scope(() => ops.backward(ops.sumAll(p.mul(Infinity)), null));
  assert.equal(s.unscale([p]), false);
  s.update(false);
  assert.equal(s.scale, 8);
  assert.equal(s.growthTracker, 0);
  p.dispose();
});

// ---------------------------------------------------------------------------------------------
// Parity with transformers + peft

Deno.test("classifier: prompts, logits, loss and LoRA gradients match peft", () => {
  const m = meta();
  const ref = io();
  using clf = fixtureClassifier(m);
  try {
    assert.deepEqual(clf.prompts, m.prompts);
    assert.equal(classPrompt("cat", { dataset: "pets" }), "a pet photo of a cat");
    assert.equal(classPrompt("cat", { dataset: "nope" }), "a photo of a cat");
    const ids = ClipTokenizer.byteLevel().encodeBatch(m.prompts, { padding: "longest" });
    assert.deepEqual([...ids.ids], [...ref.get("input_ids")!.toFloat64()], "prompt token ids");
    assert.deepEqual([...clf.adapter.namedParameters().keys()].sort(), m.params);
    for (const [name, t] of clf.adapter.namedParameters()) {
      expectClose(`init ${name}`, t, ref.get(`init.${name}`)!, 0);
    }

    const pixels = ref.get("pixels")!, labels = ref.get("labels")!;
    const synthetic = ref.get("is_synthetic")!;
    const errs = { logits: 0, loss: 0, grad: 0 };
    noGrad(() =>
      scope(() => {
        errs.logits = expectClose("logits", clf.predict(pixels), ref.get("logits")!);
      })
    );
    const loss = clf.forwardBackward(pixels, labels, synthetic);
    errs.loss = Math.abs(loss - ref.get("loss")!.item());
    assert.ok(errs.loss <= TOL, `loss ${loss} vs ${ref.get("loss")!.item()}`);
    for (const [name, t] of clf.adapter.namedParameters()) {
      using g = ops.grad(t);
      assert.ok(g !== null, `${name} has no gradient`);
      errs.grad = Math.max(errs.grad, expectClose(`grad ${name}`, g, ref.get(`grad.${name}`)!));
    }
    console.log(
      `  max abs error: logits ${errs.logits.toExponential(2)}, loss ${
        errs.loss.toExponential(2)
      }, LoRA grads ${errs.grad.toExponential(2)} (${clf.adapter.parameters().length} tensors)`,
    );
    // Frozen weights never collect gradients.
    for (const [name, t] of clf.model.namedParameters()) {
      assert.equal(ops.grad(t), null, `frozen ${name} got a gradient`);
    }
  } finally {
    disposeAll(ref);
  }
});

Deno.test("classifier: three AdamW steps on the recipe's schedule match torch.optim.AdamW", () => {
  const m = meta();
  const ref = io();
  using clf = fixtureClassifier(m);
  try {
    clf.iteration = m.firstIteration;
    const pixels = ref.get("pixels")!, labels = ref.get("labels")!;
    const synthetic = ref.get("is_synthetic")!;
    let worstParam = 0, worstLoss = 0;
    for (let k = 1; k <= m.steps; k++) {
      const loss = clf.trainStep(pixels, labels, synthetic);
      assert.equal(clf.lastLr, m.stepLrs[k - 1], `step ${k} learning rate`);
      worstLoss = Math.max(worstLoss, Math.abs(loss - ref.get(`step${k}.loss`)!.item()));
      for (const [name, t] of clf.adapter.namedParameters()) {
        worstParam = Math.max(
          worstParam,
          expectClose(`step ${k} ${name}`, t, ref.get(`step${k}.${name}`)!, 1e-6),
        );
      }
    }
    assert.ok(worstLoss <= TOL, `loss differs by ${worstLoss}`);
    assert.equal(clf.iteration, m.firstIteration + m.steps);
    assert.equal(clf.optimizer.state[0]?.step, m.steps);
    const e = noGrad(() =>
      scope(() => expectClose("final logits", clf.predict(pixels), ref.get("final_logits")!))
    );
    console.log(
      `  after ${m.steps} steps: params ${worstParam.toExponential(2)}, losses ${
        worstLoss.toExponential(2)
      }, logits ${e.toExponential(2)}`,
    );
  } finally {
    disposeAll(ref);
  }
});

Deno.test("classifier: adapters saved here load in peft and give the same logits", async () => {
  const m = meta();
  const ref = io();
  const dir = mkdtempSync(join(tmpdir(), "dipsy-lora-"));
  try {
    const pixels = ref.get("pixels")!;
    const adapters: string[] = [];
    for (const towers of [["text", "vision"], ["vision"]] as const) {
      manualSeed(5);
      using clf = ClipLoraClassifier.create(
        loadClipModel(fixturePath("clip")),
        ClipTokenizer.byteLevel(),
        {
          classNames: m.classNames,
          dataset: m.dataset,
          towers,
          lora: { rank: 4, alpha: 8, dropout: 0.1 },
          seed: 3,
          ownsModel: true,
        },
      );
      // A few large steps, so lora_B is far from its zero start.
      for (let i = 0; i < 3; i++) {
        clf.trainStep(pixels, ref.get("labels")!, ref.get("is_synthetic")!, 1e-2);
      }
      const out = join(dir, towers.join("_"));
      clf.saveAdapter(out);
      const logits = clf.predict(pixels);
      saveSafetensors(join(out, "expected.safetensors"), { pixels, logits });
      logits.dispose();
      adapters.push(out);

      // The saved folder reads back into a fresh model with the same result.
      const cfg = readAdapterConfig(out);
      assert.equal(cfg.rank, 4);
      assert.equal(cfg.dropout, 0.1);
      using again = ClipLoraClassifier.create(
        loadClipModel(fixturePath("clip")),
        ClipTokenizer.byteLevel(),
        { classNames: m.classNames, dataset: m.dataset, adapter: out, ownsModel: true },
      );
      assert.deepEqual(again.towers, towers);
      assert.deepEqual(again.adapter.paths, clf.adapter.paths);
      noGrad(() =>
        scope(() => {
          const want = SafetensorsFile.open(join(out, "expected.safetensors")).load("logits");
          expectClose("reloaded logits", again.predict(pixels), want, 0);
        })
      );
    }
    const py = join(ROOT, ".venv/bin/python");
    const res = await new Deno.Command(py, {
      args: [join(ROOT, "test/reference/peft_load_check.py"), fixturePath(), ...adapters],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stdout = new TextDecoder().decode(res.stdout).trim();
    assert.equal(
      res.code,
      0,
      `peft_load_check.py failed:\n${new TextDecoder().decode(res.stderr)}`,
    );
    const { results } = JSON.parse(stdout.split("\n").at(-1)!) as {
      results: { adapter: string; keys: number; max_abs_err: number }[];
    };
    for (const r of results) {
      console.log(
        `  peft ${r.adapter.split("/").at(-1)}: ${r.keys} tensors, max abs err ${
          r.max_abs_err.toExponential(2)
        }`,
      );
      assert.ok(r.max_abs_err <= TOL, `${r.adapter}: peft logits differ by ${r.max_abs_err}`);
    }
    assert.deepEqual(results.map((r) => r.keys), [16, 8]);
  } finally {
    disposeAll(ref);
    rmSync(dir, { recursive: true, force: true });
  }
});

Deno.test("classifier: adapter files that do not fit are refused with the reason", () => {
  const m = meta();
  const dir = mkdtempSync(join(tmpdir(), "dipsy-lora-bad-"));
  try {
    const cfg = JSON.parse(readFileSync(fixturePath("adapter_init/adapter_config.json"), "utf8"));
    writeFileSync(join(dir, "adapter_config.json"), JSON.stringify({ ...cfg, use_dora: true }));
    assert.throws(() => readAdapterConfig(dir), /"use_dora" = true is not supported/);
    assert.throws(
      () => fixtureClassifier(m, { adapter: fixturePath("nope") }),
      /no adapter_config\.json/,
    );
    using clf = fixtureClassifier(m);
    writeFileSync(join(dir, "adapter_config.json"), JSON.stringify({ ...cfg, r: 8 }));
    assert.throws(() => clf.loadAdapter(dir), /r=8, lora_alpha=8 do not match/);
    writeFileSync(join(dir, "adapter_config.json"), JSON.stringify(cfg));
    saveSafetensors(join(dir, "adapter_model.safetensors"), {
      "base_model.model.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": clf.adapter
        .layers[0].loraA,
    });
    assert.throws(() => clf.loadAdapter(dir), /missing 15/);
    assert.throws(
      () => fixtureClassifier(m, { adapter: undefined, targetModules: ["fc1"] }),
      /"fc1" is not supported/,
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

// ---------------------------------------------------------------------------------------------
// The loss and the training modes

Deno.test("classifier: lambda weighs the real and synthetic means; empty parts add 0", () => {
  const m = meta();
  const ref = io();
  try {
    const pixels = ref.get("pixels")!, labels = ref.get("labels")!;
    const ceReal = ref.get("loss_real")!.item(), ceSyn = ref.get("loss_synthetic")!.item();
    const lossOf = (clf: ClipLoraClassifier, syn: number[]) =>
      noGrad(() => scope(() => clf.loss(clf.predict(pixels), labels, syn).item()));
    const mixed = [0, 1, 1, 0, 1, 1];
    {
      using clf = fixtureClassifier(m);
      assert.ok(Math.abs(lossOf(clf, mixed) - (0.8 * ceReal + 0.2 * ceSyn)) <= TOL);
      // No real sample: the synthetic mean keeps its 0.2 weight (no renormalisation).
      const ceAll = noGrad(() =>
        scope(() => ops.crossEntropy(clf.predict(pixels), labels, 1, 0).item())
      );
      assert.ok(Math.abs(lossOf(clf, [1, 1, 1, 1, 1, 1]) - 0.2 * ceAll) <= TOL);
      assert.ok(Math.abs(lossOf(clf, [0, 0, 0, 0, 0, 0]) - 0.8 * ceAll) <= TOL);
    }
    {
      // One-kind modes: a plain mean CE over the batch.
      using clf = fixtureClassifier(m, { mode: "real" });
      const ceAll = noGrad(() =>
        scope(() => ops.crossEntropy(clf.predict(pixels), labels, 1, 0).item())
      );
      assert.equal(lossOf(clf, [0, 0, 0, 0, 0, 0]), ceAll);
      assert.throws(() => lossOf(clf, mixed), /real-only training got 4 synthetic/);
    }
    {
      using clf = fixtureClassifier(m, { mode: "synthetic" });
      assert.throws(() => lossOf(clf, mixed), /synthetic-only training got 2 real/);
    }
    {
      // lambda 1: synthetic samples contribute no gradient at all.
      using clf = fixtureClassifier(m, { lambda: 1 });
      clf.forwardBackward(pixels, labels, mixed);
      const withSyn = clf.adapter.parameters().map((t) => {
        using g = ops.grad(t)!;
        return g.toFloat64();
      });
      scope(() => {
        const rows = ops.indexSelect(pixels, 0, ops.arange(0, 6, 3, "i64", "cpu"));
        clf.forwardBackward(rows, [0, 2], [0, 0]);
      });
      clf.adapter.parameters().forEach((t, i) => {
        using g = ops.grad(t)!;
        const a = g.toFloat64();
        // Equal up to rounding (the batches differ in size, so kernels may sum in other orders).
        const scale = Math.max(...a.map(Math.abs));
        for (let j = 0; j < a.length; j++) {
          assert.ok(Math.abs(a[j] - withSyn[i][j]) <= 1e-5 * scale, `tensor ${i}`);
        }
      });
    }
  } finally {
    disposeAll(ref);
  }
});

// ---------------------------------------------------------------------------------------------
// Training runs of a tiny CLIP from the preset: a colour task, and half-precision weights. They
// run in a child process with one intra-op thread: these steps are hundreds of tiny ops, which
// two threads per process make many times slower while the runner executes test files in
// parallel on a small machine (and libtorch's thread count is process-wide, so the test must not
// change it for its neighbours).

const COLOURS = ["red", "green", "blue", "yellow"];
const RGB = [[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]];

/** Solid colours with per-pixel noise; `shift` pulls the colour towards grey (a domain gap). */
function colourImages(labels: number[], g: Generator, noise: number, shift: number): Tensor {
  return scope(() => {
    const base = labels.flatMap((k) => RGB[k].map((v) => v * (1 - shift)));
    const colour = fromHost(base, [labels.length, 3, 1, 1]);
    return colour.add(ops.randn([labels.length, 3, 32, 32], "f32", "cpu", g).mul(noise));
  });
}

/** A seeded permutation (mulberry32), so batches mix real and synthetic samples reproducibly. */
function shuffled(n: number, seed: number): number[] {
  let s = seed >>> 0;
  const rand = () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const p = [...Array(n).keys()];
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [p[i], p[j]] = [p[j], p[i]];
  }
  return p;
}

function accuracy(clf: ClipLoraClassifier, pixels: Tensor, labels: number[]): number {
  const pred = clf.predictLabels(pixels);
  return pred.filter((p, i) => p === labels[i]).length / labels.length;
}

interface LearningRun {
  mode: TrainMode;
  samples: number;
  steps: number;
  seconds: number;
  before: number;
  after: number;
  /** Mean batch loss of the last epoch. */
  lastEpochLoss: number;
  /** Live handles gained across each step after the first epoch (all must be 0). */
  leaks: number[];
}

/** Trains the tiny preset on a 4-colour task in each mode, with the recipe's batch mixing. */
function learnColours(): LearningRun[] {
  const shots = 4, perClassSynthetic = 16, batch = 32, epochs = 8;
  const repeats = Math.round(perClassSynthetic / shots);
  using g = new Generator(11);
  const classes = COLOURS.length;
  const realLabels = [...Array(classes * shots).keys()].map((i) => i % classes);
  const synLabels = [...Array(classes * perClassSynthetic).keys()].map((i) => i % classes);
  const testLabels = [...Array(classes * 15).keys()].map((i) => i % classes);
  // The synthetic images are noisier and paler than the real ones: a domain gap.
  using real = colourImages(realLabels, g, 0.4, 0);
  using synthetic = colourImages(synLabels, g, 0.5, 0.15);
  using test = colourImages(testLabels, g, 0.4, 0);
  const runs: LearningRun[] = [];
  for (const mode of ["real", "synthetic", "mixed"] as TrainMode[]) {
    // The pooled set: real shots repeated round(M / N) times, synthetic images once, shuffled.
    const pool: { src: Tensor; row: number; label: number; syn: boolean }[] = [];
    if (mode !== "synthetic") {
      for (let r = 0; r < repeats; r++) {
        realLabels.forEach((label, row) => pool.push({ src: real, row, label, syn: false }));
      }
    }
    if (mode !== "real") {
      synLabels.forEach((label, row) => pool.push({ src: synthetic, row, label, syn: true }));
    }
    const itersPerEpoch = Math.ceil(pool.length / batch);
    manualSeed(1);
    using clf = ClipLoraClassifier.create(
      loadClipModel("tiny", { seed: 4 }),
      ClipTokenizer.byteLevel(),
      {
        classNames: COLOURS,
        mode,
        lora: { rank: 8, alpha: 16, dropout: 0.1 },
        // A tiny model learns in a few dozen steps only with a far larger rate than CLIP's 1e-4.
        schedule: {
          baseLr: 3e-2,
          finalLr: 1e-5,
          warmupStartLr: 1e-5,
          epochs,
          warmupEpochs: 1,
          itersPerEpoch,
        },
        ownsModel: true,
      },
    );
    const before = accuracy(clf, test, testLabels);
    const t0 = performance.now();
    const leaks: number[] = [];
    let epochLosses: number[] = [];
    for (let e = 0; e < epochs; e++) {
      const order = shuffled(pool.length, 100 + e);
      epochLosses = [];
      for (let i = 0; i < order.length; i += batch) {
        const items = order.slice(i, i + batch).map((k) => pool[k]);
        const handles = memory().handles;
        const loss = scope(() => {
          const px = ops.cat(items.map((it) => ops.narrow(it.src, 0, it.row, 1)), 0);
          return clf.trainStep(px, items.map((it) => it.label), items.map((it) => it.syn));
        });
        epochLosses.push(loss);
        // The first epoch creates the optimiser state; after that a step must be neutral.
        if (e > 0) leaks.push(memory().handles - handles);
      }
    }
    runs.push({
      mode,
      samples: pool.length,
      steps: clf.iteration,
      seconds: (performance.now() - t0) / 1000,
      before,
      after: accuracy(clf, test, testLabels),
      lastEpochLoss: epochLosses.reduce((a, b) => a + b, 0) / epochLosses.length,
      leaks,
    });
  }
  return runs;
}

interface HalfRun {
  dtype: "f16" | "bf16";
  scaled: boolean;
  masterDtypes: string[];
  logitsDtype: string;
  losses: number[];
  applied: number;
  scale: number | null;
}

/** A few steps with f16 weights (loss scaling on by default) and bf16 weights (off). */
function trainHalf(): HalfRun[] {
  return (["f16", "bf16"] as const).map((dtype) => {
    manualSeed(0);
    using clf = ClipLoraClassifier.create(
      loadClipModel("tiny", { seed: 4, dtype }),
      ClipTokenizer.byteLevel(),
      { classNames: COLOURS, lora: { rank: 8, alpha: 16, dropout: 0.1 }, ownsModel: true },
    );
    using g = new Generator(1);
    const labels = [0, 1, 2, 3, 0, 1, 2, 3];
    using px = colourImages(labels, g, 0.3, 0);
    const losses: number[] = [];
    let applied = 0;
    for (let i = 0; i < 12; i++) {
      losses.push(clf.trainStep(px, labels, [0, 1, 0, 1, 0, 1, 0, 1], 1e-2));
      if (clf.lastStepApplied) applied++;
    }
    const logitsDtype = scope(() => clf.predict(px).dtype);
    return {
      dtype,
      scaled: clf.scaler !== null,
      masterDtypes: [...new Set(clf.adapter.parameters().map((t) => t.dtype))],
      logitsDtype,
      losses,
      applied,
      scale: clf.scaler?.scale ?? null,
    };
  });
}

interface ChildReport {
  learning: LearningRun[];
  half: HalfRun[];
}

let child: Promise<ChildReport> | null = null;

/** Runs this file as a program (see the bottom) in a child process, once. */
function trainingRuns(): Promise<ChildReport> {
  child ??= (async () => {
    const res = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", new URL(import.meta.url).pathname, "--training-runs"],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const err = new TextDecoder().decode(res.stderr);
    if (res.code !== 0) throw new Error(`training runs failed (exit ${res.code}):\n${err}`);
    return JSON.parse(new TextDecoder().decode(res.stdout).trim().split("\n").at(-1)!);
  })();
  return child;
}

Deno.test("classifier: a tiny CLIP learns a colour task (real-only, synthetic-only, mixed)", async () => {
  const { learning } = await trainingRuns();
  assert.deepEqual(learning.map((r) => r.mode), ["real", "synthetic", "mixed"]);
  for (const r of learning) {
    console.log(
      `  ${r.mode}: ${r.samples} samples, ${r.steps} steps in ${r.seconds.toFixed(1)} s, ` +
        `test accuracy ${(r.before * 100).toFixed(0)}% -> ${(r.after * 100).toFixed(0)}%, ` +
        `last epoch's mean loss ${r.lastEpochLoss.toFixed(3)}`,
    );
    assert.ok(r.before <= 0.5, `${r.mode}: untrained accuracy ${r.before} is not near chance`);
    assert.ok(r.after >= 0.9, `${r.mode}: accuracy ${r.after} after training`);
    assert.ok(r.leaks.length > 0 && r.leaks.every((n) => n === 0), `${r.mode}: leaks ${r.leaks}`);
  }
});

Deno.test("classifier: half-precision weights train (f16 with loss scaling, bf16 without)", async () => {
  const { half } = await trainingRuns();
  for (const r of half) {
    const [first, last] = [r.losses[0], r.losses.at(-1)!];
    // GradScaler starts at 2^16 and backs off until the half-precision gradients fit.
    console.log(
      `  ${r.dtype}: loss ${first.toFixed(3)} -> ${last.toFixed(3)}, ${r.applied}/12 steps ` +
        `applied, scale ${r.scale ?? "none"}`,
    );
    assert.equal(r.scaled, r.dtype === "f16", "loss scaling follows the weight dtype");
    assert.deepEqual(r.masterDtypes, ["f32"], "LoRA master weights stay f32");
    assert.equal(r.logitsDtype, "f32");
    assert.ok(r.applied >= 4, `${r.dtype}: only ${r.applied} steps applied`);
    assert.ok(last < first / 2, `${r.dtype}: loss did not fall`);
  }
});

if (import.meta.main && Deno.args.includes("--training-runs")) {
  setNumThreads(1);
  const report: ChildReport = { learning: learnColours(), half: trainHalf() };
  console.log(JSON.stringify(report));
}
