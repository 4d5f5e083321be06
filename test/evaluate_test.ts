/**
 * Evaluation: top-1, top-5, per-class accuracy, their mean and the confusion matrix against
 * scikit-learn (fixtures from test/reference/metrics_ref.py), and model selection over a tiny
 * run's epochs: `--select last`, `best-val` (a validation split carved from the shots, recorded
 * per epoch) and `best-test` (labelled as chosen on the test set).
 */
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { memory } from "../ffi/mod.ts";
import { drawDataset } from "../cli/demo.ts";
import { main } from "../cli/main.ts";
import { MetricsAccumulator } from "../plugins/classifiers/evaluate.ts";
import {
  bestEpoch,
  type EvalRecord,
  evalStage,
  type PredictionLine,
  predictionsFileFor,
  readValidationRecord,
  TEST_SELECTED_WARNING,
  type ValidationRecord,
} from "../app/classify.ts";
import { writeFewshot } from "../core/fewshot.ts";
import { fixture, tinyRunArgs, withOutput, withTempDir } from "./util.ts";

interface MetricsCase {
  name: string;
  classes: number;
  scores: number[];
  labels: number[];
  expected: {
    accuracy: number;
    k: number;
    top_k: number;
    confusion: number[][];
    recall: (number | null)[];
    balanced_accuracy: number;
  };
}

Deno.test("metrics equal scikit-learn's (accuracy, top-k, confusion, recall, balanced accuracy)", () => {
  const { cases } = JSON.parse(
    readFileSync(fixture("metrics", "cases.json") + "/cases.json", "utf8"),
  );
  for (const c of cases as MetricsCase[]) {
    const names = Array.from({ length: c.classes }, (_, i) => `c${i}`);
    const m = new MetricsAccumulator(names, 5, true);
    // In uneven batches, as the loader delivers them.
    const n = c.labels.length;
    for (let a = 0, b = 0; a < n; a = b) {
      b = Math.min(n, a + 1 + ((a * 7) % 23));
      m.add(c.scores.slice(a * c.classes, b * c.classes), c.labels.slice(a, b));
    }
    const r = m.result();
    const e = c.expected;
    const close = (x: number, y: number, what: string) =>
      assert.ok(Math.abs(x - y) < 1e-12, `${c.name} ${what}: ${x} vs sklearn ${y}`);
    close(r.top1, e.accuracy, "accuracy");
    assert.equal(r.topK, e.k);
    close(r.top5, e.top_k, `top-${e.k}`);
    assert.deepEqual(r.confusion, e.confusion, `${c.name} confusion`);
    r.perClass.forEach((pc, i) => {
      if (e.recall[i] === null) assert.equal(pc.accuracy, null, `${c.name} class ${i}`);
      else close(pc.accuracy!, e.recall[i]!, `recall ${i}`);
    });
    close(r.meanPerClass, e.balanced_accuracy, "balanced accuracy");
    assert.equal(r.total, n);
    // The kept predictions are sklearn's: labels in order, argmax predictions, its confusion.
    const kept = m.predictions();
    assert.deepEqual(kept.map((p) => p.label), c.labels);
    const tally = names.map(() => names.map(() => 0));
    for (const p of kept) tally[p.label][p.predicted]++;
    assert.deepEqual(tally, e.confusion, `${c.name} kept predictions`);
    kept.forEach((p, i) => {
      const s = c.scores.slice(i * c.classes, (i + 1) * c.classes);
      assert.equal(p.top.length, e.k);
      assert.equal(p.top[0], p.predicted);
      for (let j = 1; j < p.top.length; j++) assert.ok(s[p.top[j - 1]] >= s[p.top[j]]);
      const cut = s[p.top.at(-1)!];
      assert.ok(s.every((v, j) => p.top.includes(j) || v <= cut), `${c.name} image ${i} top-k`);
    });
    console.log(
      `  ${c.name}: top-1 ${r.top1.toFixed(3)}, top-${r.topK} ${r.top5.toFixed(3)}, ` +
        `mean/class ${r.meanPerClass.toFixed(3)}`,
    );
  }
  assert.throws(() => new MetricsAccumulator(["a", "b"]).add([1, 2, 3], [0]), /3 scores/);
  assert.throws(() => new MetricsAccumulator(["a", "b"]).add([1, 2], [2]), /label 2/);
});

Deno.test("--select: last, best-val (carved from the shots) and best-test, recorded", async () => {
  await withTempDir(async (dir) => {
    await drawDataset(join(dir, "data"), 5, 0);
    await drawDataset(join(dir, "test"), 3, 1);
    const run = join(dir, "run");
    const lines: string[] = [];
    const cli = async (args: string[]) => {
      const { result, lines: out } = await withOutput(() => main(args));
      lines.push(...out);
      return result;
    };
    const before = memory().handles;
    const trainArgs = [
      "train",
      "--real",
      join(dir, "data"),
      "--out",
      run,
      "--mode",
      "real",
      "--clip",
      "tiny",
      "--epochs",
      "3",
      "--warmup-epochs",
      "1",
      "--batch",
      "8",
      "--lr",
      "3e-2",
      "--workers",
      "1",
      "--val-shots",
      "2",
    ];
    assert.equal(await cli(trainArgs), 0, lines.join("\n"));
    const train = JSON.parse(readFileSync(join(run, "train.json"), "utf8"));
    const classes = train.classNames.length;
    assert.equal(train.data.real, 3 * classes, "two of five shots per class held out");
    const val: ValidationRecord = readValidationRecord(run)!;
    assert.equal(val.images, 2 * classes);
    assert.deepEqual(val.epochs.map((e) => e.epoch), [1, 2, 3]);
    assert.equal(val.best.epoch, bestEpoch(val.epochs).epoch);
    const maxTop1 = Math.max(...val.epochs.map((e) => e.top1));
    assert.equal(val.best.epoch, val.epochs.find((e) => e.top1 === maxTop1)!.epoch);
    assert.match(lines.join("\n"), /validation \(the last 2 shot\(s\) per class/);

    const test = join(dir, "test");
    const quiet = { progress: false, workers: 1 };
    const last = await evalStage({ model: run, test, select: "last", ...quiet });
    assert.deepEqual(last.selection, {
      rule: "last",
      epoch: 3,
      selectedOn: "last epoch",
      testSelected: false,
    });
    // The default with a validation split is best-val; --per-epoch records every epoch on test.
    const byVal = await evalStage({ model: run, test, perEpoch: true, ...quiet });
    assert.equal(byVal.selection.rule, "best-val");
    assert.equal(byVal.selection.epoch, val.best.epoch);
    assert.equal(byVal.selection.testSelected, false);
    assert.deepEqual(byVal.validation!.epochs, val.epochs);
    const perEpoch = byVal.perEpoch!;
    assert.deepEqual(perEpoch.map((e) => e.epoch), [1, 2, 3]);
    assert.equal(perEpoch[2].top1, last.top1, "epoch 3 is the last epoch");
    assert.equal(perEpoch[val.best.epoch - 1].top1, byVal.top1);

    const byTest = await evalStage({ model: run, test, select: "best-test", ...quiet });
    assert.equal(byTest.selection.selectedOn, "test");
    assert.equal(byTest.selection.testSelected, true);
    assert.equal(byTest.selection.warning, TEST_SELECTED_WARNING);
    assert.equal(byTest.top1, Math.max(...perEpoch.map((e) => e.top1)));
    assert.equal(byTest.selection.epoch, bestEpoch(perEpoch).epoch);

    // eval.json holds it all; the confusion matrix adds up to the test set.
    const saved: EvalRecord = JSON.parse(readFileSync(join(run, "eval.json"), "utf8"));
    assert.equal(saved.selection.rule, "best-test");
    assert.equal(saved.confusion.flat().reduce((a, b) => a + b, 0), saved.total);
    assert.equal(saved.total, 3 * classes);
    assert.ok(saved.top5 >= saved.top1);
    // Beside it, each test image's prediction, which adds up to its confusion matrix.
    const predictions: PredictionLine[] = readFileSync(
      predictionsFileFor(join(run, "eval.json")),
      "utf8",
    )
      .trim().split("\n").map((l) => JSON.parse(l));
    assert.equal(predictions.length, saved.total);
    const names = saved.perClass.map((c) => c.class);
    const tally = names.map(() => names.map(() => 0));
    for (const p of predictions) {
      assert.ok(existsSync(join(test, p.file)), p.file);
      assert.equal(p.file.split("/")[0], p.label, "a test image's folder is its class");
      assert.equal(p.correct, p.label === p.predicted);
      assert.equal(p.top5[0], p.predicted);
      tally[names.indexOf(p.label)][names.indexOf(p.predicted)]++;
    }
    assert.deepEqual(tally, saved.confusion);

    // Training again on the same folder finds it complete and its epochs evaluated.
    const stamp = Deno.statSync(join(run, "validation.json")).mtime!.getTime();
    assert.equal(await cli(trainArgs), 0, lines.join("\n"));
    assert.equal(Deno.statSync(join(run, "validation.json")).mtime!.getTime(), stamp);
    assert.deepEqual(readValidationRecord(run)!.epochs, val.epochs);

    // The CLI prints the warning; best-val without a validation split is one line.
    lines.length = 0;
    assert.equal(
      await cli([
        "eval",
        "--model",
        run,
        "--test",
        test,
        "--select",
        "best-test",
        "--workers",
        "1",
      ]),
      0,
    );
    assert.match(lines.join("\n"), /WARNING: the epoch was chosen on the test set/);
    assert.match(lines.join("\n"), /top-5/);
    assert.equal(await cli(["eval", "--model", run, "--test", test, "--select", "best"]), 2);
    assert.match(lines.at(-1)!, /--select must be last, best-val or best-test, got "best"/);
    Deno.removeSync(join(run, "validation.json"));
    assert.equal(
      await cli(["eval", "--model", run, "--test", test, "--select", "best-val"]),
      1,
    );
    assert.match(lines.at(-1)!, /no validation results to select by \(train it with a validation/);

    // Without validation.json, training again evaluates the epochs again.
    assert.equal(await cli(trainArgs), 0, lines.join("\n"));
    assert.deepEqual(readValidationRecord(run)!.epochs, val.epochs);
    assert.equal(memory().handles, before, "tensor handles leaked");
  });
});

Deno.test("run --shots k --val-shots n: the validation shots guide no image, train nothing, pick the epoch", async () => {
  await withTempDir(async (dir) => {
    await drawDataset(join(dir, "full"), 6, 0);
    await drawDataset(join(dir, "test"), 2, 1);
    await writeFewshot({
      source: join(dir, "full"),
      out: join(dir, "data"),
      dataset: "shapes",
      shots: [2, 5],
      seeds: [0],
    });
    const out = join(dir, "exp");
    const { result: code, lines } = await withOutput(() =>
      main(
        tinyRunArgs(
          join(dir, "data"),
          join(dir, "test"),
          out,
          "--shots",
          "4",
          "--val-shots",
          "1",
          "--select",
          "best-val",
        ),
      )
    );
    assert.equal(code, 0, lines.join("\n"));
    // Generation drew its references from ranks 0-2 only; rank 3 validates, rank 4 is unused.
    const gen = JSON.parse(readFileSync(join(out, "synthetic", "run.json"), "utf8"));
    for (const c of gen.dataset.classes) {
      assert.deepEqual(c.shots.map((s: string) => s.slice(0, 4)), ["000_", "001_", "002_"]);
    }
    const train = JSON.parse(readFileSync(join(out, "train", "train.json"), "utf8"));
    assert.equal(train.data.real, 3 * train.classNames.length);
    const val = readValidationRecord(join(out, "train"))!;
    assert.equal(val.images, train.classNames.length);
    const report = JSON.parse(readFileSync(join(out, "report.json"), "utf8"));
    assert.equal(report.selection.rule, "best-val");
    assert.equal(report.selection.epoch, val.best.epoch);
    assert.equal(typeof report.accuracy.top5, "number");
    assert.match(lines.join("\n"), /evaluated: epoch \d \(--select best-val: validation\)/);
  });
});
