/**
 * The classifier job around the recipe: image sets and their checks, DataDream's epoch layout,
 * the prefetching loader (same pixels from workers as inline), training with per-epoch
 * checkpoints and resumption (an interrupted and resumed run ends with the very same weights),
 * evaluation, the CLI commands and their bad-input errors, and a learning test through files on
 * disk with the recipe's augmentations.
 */
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { memory, SafetensorsFile } from "../ffi/mod.ts";
import { drawDataset } from "../cli/demo.ts";
import { main } from "../cli/main.ts";
import { appendLine, imageFileName, MANIFEST } from "../core/output.ts";
import type { LabeledImage } from "../core/plugins.ts";
import {
  batchesOf,
  epochItems,
  epochOrder,
  labelImages,
  readImageFolder,
  realRepeats,
  trainingClasses,
} from "../plugins/classifiers/data.ts";
import { ImageLoader } from "../plugins/classifiers/loader.ts";
import { evaluate } from "../plugins/classifiers/evaluate.ts";
import { loadTrainedRun, trainRun, type TrainSettings } from "../plugins/classifiers/trainer.ts";
import { TRAIN_DEFAULTS } from "../plugins/classifiers/settings.ts";
import { readStepHistory, STEP_HISTORY, type StepRecord } from "../plugins/classifiers/steps.ts";
import { TINY_TRAIN_FLAGS, tinyRunArgs, withTempDir } from "./util.ts";

/** Settings under which the tiny CLIP learns the demo's shapes in seconds. */
const TINY: TrainSettings = {
  ...TRAIN_DEFAULTS,
  clip: "tiny",
  epochs: 3,
  warmupEpochs: 1,
  batch: 16,
  lr: 3e-2,
  minLr: 1e-5,
  lora: { rank: 8, alpha: 16, dropout: 0.1 },
  repeatReal: 4,
};

async function shapes(dir: string) {
  await drawDataset(join(dir, "real"), 4, 0);
  await drawDataset(join(dir, "synthetic"), 2, 7);
  await drawDataset(join(dir, "test"), 6, 1);
  const real = await readImageFolder(join(dir, "real"));
  const synthetic = await readImageFolder(join(dir, "synthetic"));
  const classNames = trainingClasses(real, synthetic);
  return {
    classNames,
    real: labelImages(real, classNames, false),
    synthetic: labelImages(synthetic, classNames, true),
    test: labelImages(await readImageFolder(join(dir, "test")), classNames, false),
  };
}

Deno.test("data: DataDream's repeat count, a seeded shuffle per epoch, batches", () => {
  assert.equal(realRepeats(16 * 10, 200 * 10), 12); // 200 / 16 = 12.5, floored
  assert.equal(realRepeats(16, 8), 1);
  assert.equal(realRepeats(0, 8), 0);
  const real = [{ path: "a", label: 0, synthetic: false }];
  const syn = [{ path: "b", label: 1, synthetic: true }];
  assert.deepEqual(epochItems(real, syn, 3).map((i) => i.path), ["a", "a", "a", "b"]);
  const a = epochOrder(50, 3, 1), b = epochOrder(50, 3, 1), c = epochOrder(50, 3, 2);
  assert.deepEqual(a, b);
  assert.notDeepEqual(a, c);
  assert.deepEqual([...a].sort((x, y) => x - y), [...Array(50).keys()]);
  assert.deepEqual(batchesOf(10, 4), [[0, 4], [4, 8], [8, 10]]);
  assert.throws(() => batchesOf(10, 0), /batch size/);
});

Deno.test("data: mismatched, empty and unknown classes are refused before training", async () => {
  await withTempDir(async (dir) => {
    await drawDataset(join(dir, "real"), 1, 0);
    await drawDataset(join(dir, "syn"), 1, 0);
    await Deno.remove(join(dir, "syn", "red circle"), { recursive: true });
    await Deno.mkdir(join(dir, "syn", "purple star"));
    await Deno.copyFile(
      join(dir, "real", "blue square", "0.png"),
      join(dir, "syn", "purple star", "0.png"),
    );
    const real = await readImageFolder(join(dir, "real"));
    const syn = await readImageFolder(join(dir, "syn"));
    assert.throws(
      () => trainingClasses(real, syn),
      /only in the real set: "red circle"; only in the synthetic set: "purple star"/,
    );
    assert.throws(
      () => labelImages(syn, real.classNames, true),
      /unknown to the model: "purple star"/,
    );
    await Deno.mkdir(join(dir, "empty", "a"), { recursive: true });
    await Deno.mkdir(join(dir, "empty", "b"), { recursive: true });
    await Deno.copyFile(
      join(dir, "real", "blue square", "0.png"),
      join(dir, "empty", "a", "0.png"),
    );
    await assert.rejects(
      () => readImageFolder(join(dir, "empty")),
      /b.*no usable image|empty|no image/i,
    );
  });
});

Deno.test("data: a generate output folder is read from its manifest (finished images only)", async () => {
  await withTempDir(async (dir) => {
    await drawDataset(join(dir, "gen"), 2, 0);
    // A manifest written as `generate` does, with one image listed but missing on disk.
    const classes = ["blue square", "red circle"];
    for (const [k, c] of classes.entries()) {
      for (let i = 0; i < 3; i++) {
        const file = `${c}/${imageFileName(i)}`;
        if (i < 2) await Deno.rename(join(dir, "gen", c, `${i}.png`), join(dir, "gen", file));
        await appendLine(
          join(dir, "gen", MANIFEST),
          JSON.stringify({ file, class: c, classIndex: k, index: i }),
        );
      }
    }
    const folder = await readImageFolder(join(dir, "gen"));
    assert.deepEqual(folder.classNames, classes);
    assert.equal(folder.images.length, 4);
    assert.ok(folder.images.every((im) => existsSync(im.path)));
  });
});

Deno.test("loader: workers prepare the same pixels as the calling thread, in order", async () => {
  await withTempDir(async (dir) => {
    const { real } = await shapes(dir);
    const jobs = [real.slice(0, 5), real.slice(5, 11), real.slice(11)].map((b) =>
      b.map((im, i) => ({ path: im.path, seed: String(1000 + i) }))
    );
    const collect = async (workers: number, kind: "train" | "test") => {
      using loader = new ImageLoader({ kind, size: 32 }, { workers, prefetch: 2 });
      const out: Float32Array[] = [];
      for await (const b of loader.batches(jobs)) {
        assert.equal(b.index, out.length);
        assert.equal(b.pixels.length, jobs[b.index].length * 3 * 32 * 32);
        out.push(b.pixels);
      }
      return out;
    };
    for (const kind of ["train", "test"] as const) {
      const inline = await collect(0, kind), pooled = await collect(2, kind);
      assert.deepEqual(pooled, inline, `${kind}: workers and inline differ`);
    }
    // A broken file fails its batch with the file's name.
    await Deno.writeTextFile(join(dir, "broken.png"), "not an image");
    using loader = new ImageLoader({ kind: "test", size: 32 }, { workers: 1 });
    await assert.rejects(async () => {
      for await (const _ of loader.batches([[{ path: join(dir, "broken.png") }]])) { /* */ }
    }, /broken\.png/);
  });
});

function adapterBytes(run: string): Uint8Array {
  return readFileSync(join(run, "adapter", "adapter_model.safetensors"));
}

Deno.test("trainer: killed after an epoch and resumed, a run ends with the same weights", async () => {
  await withTempDir(async (dir) => {
    const data = await shapes(dir);
    const job = { modelSource: "tiny", device: "cpu" as const, loader: { workers: 1 } };
    const handles = memory().handles;
    const whole = await trainRun(data, TINY, { ...job, out: join(dir, "whole") });
    assert.equal(whole.record.status, "complete");
    assert.equal(whole.record.history.length, 3);
    assert.equal(memory().handles, handles, "training leaked tensor handles");

    // Stop in the middle of epoch 2: epoch 1's checkpoint survives, epoch 2 is redone.
    const controller = new AbortController();
    const cut = await trainRun(data, TINY, {
      ...job,
      out: join(dir, "cut"),
      signal: controller.signal,
      onProgress: (p) => p.epoch === 2 && p.images > 40 && controller.abort(),
    });
    assert.equal(cut.interrupted, true);
    assert.equal(cut.record.epochsDone, 1);
    assert.ok(existsSync(join(dir, "cut", "checkpoints", "epoch-001", "state.json")));
    assert.ok(!existsSync(join(dir, "cut", "adapter")));
    // As if killed after epoch 2's steps were appended but before its checkpoint, mid-line.
    Deno.writeTextFileSync(
      join(dir, "cut", STEP_HISTORY),
      JSON.stringify({ step: 99, epoch: 2, loss: 1, lr: 1, imagesPerSecond: 1, skipped: false }) +
        '\n{"step": 100, "ep',
      { append: true },
    );
    const lines: string[] = [];
    const resumed = await trainRun(data, TINY, {
      ...job,
      out: join(dir, "cut"),
      log: (l) => lines.push(l),
    });
    assert.ok(lines.some((l) => /resuming .* after epoch 1\/3/.test(l)), lines.join("\n"));
    assert.equal(resumed.record.status, "complete");
    assert.deepEqual(adapterBytes(join(dir, "cut")), adapterBytes(join(dir, "whole")));
    assert.deepEqual(
      resumed.record.history.map((h) => h.loss),
      whole.record.history.map((h) => h.loss),
    );
    // The per-step history of the resumed run is the uninterrupted one's, apart from timing.
    const untimed = (steps: StepRecord[]) => steps.map(({ imagesPerSecond: _, ...s }) => s);
    const wholeSteps = readStepHistory(join(dir, "whole"));
    const perEpoch = whole.record.data.itersPerEpoch;
    assert.deepEqual(
      wholeSteps.map((s) => s.step),
      Array.from({ length: 3 * perEpoch }, (_, i) => i + 1),
    );
    assert.ok(wholeSteps.every((s) => s.imagesPerSecond > 0 && Number.isFinite(s.loss)));
    assert.deepEqual(untimed(readStepHistory(join(dir, "cut"))), untimed(wholeSteps));
    // Each epoch's mean loss and last rate are its steps'.
    whole.record.history.forEach((h) => {
      const mine = wholeSteps.filter((s) => s.epoch === h.epoch);
      assert.equal(mine.at(-1)!.lr, h.lr);
      assert.ok(Math.abs(mine.reduce((a, s) => a + s.loss, 0) / mine.length - h.loss) < 1e-12);
    });
    assert.equal(memory().handles, handles, "resuming leaked tensor handles");

    // Complete runs are left alone; other settings are refused rather than mixed in.
    const again = await trainRun(data, TINY, { ...job, out: join(dir, "whole") });
    assert.equal(again.trained, false);
    await assert.rejects(
      () => trainRun(data, { ...TINY, lambda: 0.5 }, { ...job, out: join(dir, "whole") }),
      /settings\.lambda: 0\.8 before, 0\.5 now/,
    );
    await assert.rejects(
      () =>
        trainRun({ ...data, synthetic: data.synthetic.slice(1) }, TINY, {
          ...job,
          out: join(dir, "whole"),
        }),
      /training images differ/,
    );
  });
});

Deno.test("trainer: the tiny CLIP learns the shapes through files and augmentations (>= 90%)", async () => {
  await withTempDir(async (dir) => {
    const data = await shapes(dir);
    const job = { modelSource: "tiny", device: "cpu" as const, loader: { workers: 1 } };
    const results: Record<string, number> = {};
    for (const mode of ["mixed", "real", "synthetic"] as const) {
      const settings: TrainSettings = { ...TINY, epochs: 10, mode, repeatReal: 16 };
      const input = {
        ...data,
        // Synthetic-only needs as many images as the others see: the 8 drawn ones, 32 times.
        synthetic: mode === "synthetic"
          ? Array.from({ length: 32 }, () => data.synthetic).flat() as LabeledImage[]
          : data.synthetic,
      };
      const out = join(dir, mode);
      await trainRun(input, settings, { ...job, out });
      const before = memory().handles;
      const { classifier } = await loadTrainedRun(out);
      const r = await evaluate(classifier, data.test, { loader: { workers: 0 } });
      classifier.dispose();
      assert.equal(memory().handles, before, "loading and evaluating leaked tensor handles");
      assert.equal(r.total, data.test.length);
      assert.equal(r.perClass.reduce((s, c) => s + c.total, 0), r.total);
      results[mode] = r.top1;
    }
    console.log(`  top-1 after training (chance 0.25): ${JSON.stringify(results)}`);
    for (const [mode, top1] of Object.entries(results)) assert.ok(top1 >= 0.9, `${mode}: ${top1}`);
  });
});

Deno.test("cli: train, eval and run on the tiny models; bad input fails early and clearly", async () => {
  await withTempDir(async (dir) => {
    await drawDataset(join(dir, "data"), 3, 0);
    await drawDataset(join(dir, "test"), 2, 1);
    const common = ["--clip", "tiny", ...TINY_TRAIN_FLAGS];
    const run = async (args: string[]) => {
      const lines: string[] = [];
      const log = console.log, err = console.error;
      console.log = console.error = (...a: unknown[]) => lines.push(a.join(" "));
      try {
        return { code: await main(args), text: lines.join("\n") };
      } finally {
        console.log = log;
        console.error = err;
      }
    };

    // run: similarity -> generate -> train -> eval, then everything skipped on a second call.
    const out = join(dir, "exp");
    const args = tinyRunArgs(join(dir, "data"), join(dir, "test"), out);
    const first = await run(args);
    assert.equal(first.code, 0, first.text);
    const report = JSON.parse(readFileSync(join(out, "report.json"), "utf8"));
    assert.deepEqual(report.stages.map((s: { status: string }) => s.status), [
      "done",
      "done",
      "done",
      "done",
    ]);
    assert.equal(report.accuracy.total, 8);
    assert.match(first.text, /top-1/);
    const second = await run(args);
    assert.equal(second.code, 0, second.text);
    const again = JSON.parse(readFileSync(join(out, "report.json"), "utf8"));
    assert.deepEqual(again.stages.map((s: { status: string }) => s.status), [
      "skipped",
      "skipped",
      "skipped",
      "skipped",
    ]);

    // train + eval on the run's images, as separate commands.
    const trained = await run([
      "train",
      "--real",
      join(dir, "data"),
      "--synthetic",
      join(out, "synthetic"),
      "--out",
      join(dir, "t"),
      ...common,
    ]);
    assert.equal(trained.code, 0, trained.text);
    const evaluated = await run([
      "eval",
      "--model",
      join(dir, "t"),
      "--test",
      join(dir, "test"),
      "--workers",
      "1",
    ]);
    assert.equal(evaluated.code, 0, evaluated.text);
    const record = JSON.parse(readFileSync(join(dir, "t", "eval.json"), "utf8"));
    assert.equal(record.perClass.length, 4);
    assert.match(evaluated.text, /blue square\s+\d+\s+2/);

    // Bad input: each refused with the file or class named, and nothing trained.
    await Deno.mkdir(join(dir, "odd", "purple star"), { recursive: true });
    await Deno.copyFile(
      join(dir, "test", "red circle", "0.png"),
      join(dir, "odd", "purple star", "0.png"),
    );
    const unknown = await run(["eval", "--model", join(dir, "t"), "--test", join(dir, "odd")]);
    assert.equal(unknown.code, 1);
    assert.match(unknown.text, /class\(es\) unknown to the model .*"purple star"/);
    const mismatch = await run([
      "train",
      "--real",
      join(dir, "data"),
      "--synthetic",
      join(dir, "odd"),
      "--out",
      join(dir, "t2"),
      ...common,
    ]);
    assert.equal(mismatch.code, 1);
    assert.match(mismatch.text, /different classes/);
    assert.ok(!existsSync(join(dir, "t2")), "a refused run must not create its folder");
    const badRun = await run([
      "run",
      "--data",
      join(dir, "data"),
      "--test",
      join(dir, "odd"),
      "--out",
      join(dir, "exp2"),
      "--tiny",
    ]);
    assert.equal(badRun.code, 1, badRun.text);
    assert.match(badRun.text, /test class\(es\) not in .*"purple star"/);
    assert.ok(!existsSync(join(dir, "exp2")), "a refused run must not create its folder");
    await Deno.mkdir(join(dir, "data", "grey blob"));
    const empty = await run([
      "train",
      "--real",
      join(dir, "data"),
      "--out",
      join(dir, "t3"),
      "--mode",
      "real",
      ...common,
    ]);
    assert.equal(empty.code, 1);
    assert.match(empty.text, /grey blob/);
    const unfinished = await run([
      "eval",
      "--model",
      join(dir, "nothing"),
      "--test",
      join(dir, "test"),
    ]);
    assert.equal(unfinished.code, 1);
    assert.match(unfinished.text, /not a training run folder/);
    const usage = await run(["train", "--real", join(dir, "data")]);
    assert.equal(usage.code, 2);
    assert.match(usage.text, /--out is required/);
  });
});

Deno.test("cli: train killed (SIGKILL) and then stopped (SIGINT) resumes to the uninterrupted weights", async () => {
  await withTempDir(async (dir) => {
    await drawDataset(join(dir, "data"), 4, 0);
    await drawDataset(join(dir, "syn"), 2, 7);
    const trainArgs = (out: string) => [
      "run",
      "-A",
      fileURLToPath(new URL("../cli/main.ts", import.meta.url)),
      "train",
      "--real",
      join(dir, "data"),
      "--synthetic",
      join(dir, "syn"),
      "--out",
      out,
      "--clip",
      "tiny",
      "--epochs",
      "4",
      "--warmup-epochs",
      "1",
      "--batch",
      "16",
      "--repeat-real",
      "24",
      "--workers",
      "1",
      "--device",
      "cpu",
    ];
    const spawn = (out: string) =>
      new Deno.Command(Deno.execPath(), {
        args: trainArgs(out),
        stdout: "piped",
        stderr: "piped",
        env: { OMP_NUM_THREADS: "1" },
      }).spawn();
    const waitFor = async (path: string, child: Deno.ChildProcess) => {
      let exited = false;
      child.status.then(() => (exited = true));
      while (!existsSync(path)) {
        if (exited) throw new Error(`the run ended before ${path} appeared`);
        await new Promise((r) => setTimeout(r, 20));
      }
    };
    const whole = spawn(join(dir, "whole"));
    assert.equal((await whole.output()).code, 0);

    const out = join(dir, "cut");
    const epoch = (n: number) => join(out, "checkpoints", `epoch-00${n}`, "state.json");
    const killed = spawn(out);
    await waitFor(epoch(1), killed);
    killed.kill("SIGKILL");
    await killed.output();
    assert.ok(!existsSync(join(out, "adapter")), "the kill came too late to test anything");

    const stopped = spawn(out);
    await waitFor(epoch(2), stopped);
    stopped.kill("SIGINT");
    const res = await stopped.output();
    const stderr = new TextDecoder().decode(res.stderr);
    if (!existsSync(join(out, "adapter"))) {
      assert.equal(res.code, 130, stderr);
      assert.match(stderr, /run the same command to resume/);
    }
    const last = spawn(out);
    const done = await last.output();
    assert.equal(done.code, 0, new TextDecoder().decode(done.stderr));
    assert.deepEqual(adapterBytes(out), adapterBytes(join(dir, "whole")));
    const record = JSON.parse(readFileSync(join(out, "train.json"), "utf8"));
    assert.equal(record.status, "complete");
    assert.deepEqual(record.history.map((h: { epoch: number }) => h.epoch), [1, 2, 3, 4]);
    const untimed = (steps: StepRecord[]) => steps.map(({ imagesPerSecond: _, ...s }) => s);
    assert.deepEqual(
      untimed(readStepHistory(out)),
      untimed(readStepHistory(join(dir, "whole"))),
      "the step history after a SIGKILL and a SIGINT differs from the uninterrupted run's",
    );
    // Nothing half-written is left behind by the stops.
    const names = [out, join(out, "checkpoints")].flatMap((d) =>
      [...Deno.readDirSync(d)].map((e) => e.name)
    );
    assert.deepEqual(names.filter((n) => n.endsWith(".tmp")), []);
  });
});

Deno.test("trainer: bf16 and f16 weights train with f32 LoRA weights (f16 with loss scaling)", async () => {
  await withTempDir(async (dir) => {
    const data = await shapes(dir);
    for (const dtype of ["bf16", "f16"] as const) {
      const out = join(dir, dtype);
      const { record } = await trainRun(data, { ...TINY, epochs: 2, dtype }, {
        out,
        modelSource: "tiny",
        device: "cpu",
        loader: { workers: 0 },
      });
      assert.equal(record.status, "complete");
      assert.ok(
        record.history.every((h) => Number.isFinite(h.loss)),
        JSON.stringify(record.history),
      );
      const saved = SafetensorsFile.open(join(out, "adapter", "adapter_model.safetensors"));
      assert.ok(saved.keys().length > 0);
      for (const k of saved.keys()) assert.equal(saved.info(k).dtype, "f32", k);
      const state = JSON.parse(
        readFileSync(join(out, "checkpoints", "epoch-002", "state.json"), "utf8"),
      );
      // Loss scaling is GradScaler's, and on only for half-precision weights.
      assert.equal(state.scaler === null, dtype === "bf16");
    }
  });
});
