/**
 * The job API (mod.ts) against the CLI: on the tiny models, each function gives the bytes and
 * records its command writes with the same settings, an aborted `generate` leaves a folder the
 * next call completes, and no call leaves a tensor handle behind.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { drawDataset } from "../cli/demo.ts";
import { main } from "../cli/main.ts";
import {
  evaluate,
  generate,
  type GenerateSettings,
  memory,
  run,
  sample,
  setNumThreads,
  similarity,
  train,
} from "../mod.ts";
import {
  quickGenerateFlags,
  readTree,
  TINY_TRAIN_FLAGS,
  tinyRunArgs,
  withOutput,
  writeNoiseImage,
  writeTinyDataset,
} from "./util.ts";

setNumThreads(1);

const ROOT = await Deno.makeTempDir({ prefix: "dipsy_api_test_" });
const DATA = join(ROOT, "data");
await writeTinyDataset(DATA);

/** The CLI in this process; fails the test with its output when it does not exit with 0. */
async function cli(...args: string[]): Promise<void> {
  const { result, lines } = await withOutput(() => main(args));
  assert.equal(result, 0, `dipsy ${args[0]} failed:\n${lines.join("\n")}`);
}

/** Runs `fn` and checks that it leaves as many live tensor handles as it found. */
async function noLeak<T>(label: string, fn: () => Promise<T>): Promise<T> {
  const before = memory().handles;
  const result = await fn();
  assert.equal(memory().handles, before, `${label}: tensor handles leaked`);
  return result;
}

const PER_CLASS = 3, SEED = 7;
/** `--tiny` and quickGenerateFlags(PER_CLASS, SEED) as settings. */
const QUICK: GenerateSettings = {
  model: "tiny",
  clip: "tiny",
  perClass: PER_CLASS,
  steps: 2,
  width: 32,
  height: 32,
  batch: 2,
  seed: SEED,
  device: "cpu",
  dtype: "f32",
};
const QUIET = { log: () => {} };

function images(files: Map<string, Uint8Array>): Map<string, Uint8Array> {
  return new Map([...files].filter(([k]) => k.endsWith(".jpg")));
}

function manifestLines(files: Map<string, Uint8Array>): string[] {
  return new TextDecoder().decode(files.get("manifest.jsonl")).split("\n").filter((l) => l);
}

/** run.json without provenance, which names the process that wrote it. */
function runRecord(files: Map<string, Uint8Array>): unknown {
  const { provenance: _, ...rest } = JSON.parse(new TextDecoder().decode(files.get("run.json")));
  return rest;
}

const CLI_OUT = join(ROOT, "cli-generate"), API_OUT = join(ROOT, "api-generate");
await cli(
  "generate",
  "--data",
  DATA,
  "--out",
  CLI_OUT,
  "--tiny",
  "--device",
  "cpu",
  "--dtype",
  "f32",
  ...quickGenerateFlags(PER_CLASS, SEED),
);
const fromCli = await readTree(CLI_OUT);

Deno.test("generate() writes the images, manifest and run record of dipsy generate", async () => {
  const result = await noLeak(
    "generate",
    () => generate({ data: DATA, out: API_OUT, ...QUICK, ...QUIET }),
  );
  const files = await readTree(API_OUT);
  const total = 2 * PER_CLASS;
  assert.equal(result.written, total);
  assert.equal(result.interrupted, false);
  assert.equal(images(files).size, total);
  assert.deepEqual(images(files), images(fromCli));
  assert.deepEqual(manifestLines(files), manifestLines(fromCli));
  assert.deepEqual(runRecord(files), runRecord(fromCli));
  // The result is what the folder holds.
  assert.deepEqual(
    result.manifest.map((e) => JSON.stringify(e)).sort(),
    manifestLines(files).sort(),
  );
  assert.deepEqual(result.record, JSON.parse(new TextDecoder().decode(files.get("run.json"))));
});

Deno.test("generate() aborted from its progress callback after the first batch resumes to the same output", async () => {
  const out = join(ROOT, "api-aborted");
  const controller = new AbortController();
  const batch = QUICK.batch!;
  const stopped = await noLeak("aborted generate", () =>
    generate({
      data: DATA,
      out,
      ...QUICK,
      ...QUIET,
      signal: controller.signal,
      onProgress: (p) => {
        if (p.step === undefined && p.done === batch) controller.abort();
      },
    }));
  assert.equal(stopped.interrupted, true);
  assert.equal(stopped.written, batch);
  assert.equal(stopped.remaining, 2 * PER_CLASS - batch);
  assert.equal(stopped.manifest.length, batch);
  const partial = await readTree(out);
  assert.equal(images(partial).size, batch);
  assert.deepEqual(
    [...partial.keys()].filter((k) => k.endsWith(".tmp")),
    [],
    "temporary files left behind",
  );

  const resumed = await noLeak(
    "resumed generate",
    () => generate({ data: DATA, out, ...QUICK, ...QUIET }),
  );
  assert.equal(resumed.written, 2 * PER_CLASS - batch);
  assert.equal(resumed.skipped, batch);
  const files = await readTree(out);
  assert.deepEqual(images(files), images(fromCli));
  assert.deepEqual(manifestLines(files).sort(), manifestLines(fromCli).sort());
});

Deno.test("sample() gives the bytes of dipsy sample", async () => {
  const positive = join(ROOT, "positive.png"), negative = join(ROOT, "negative.png");
  await writeNoiseImage(positive, 40, 36, 1);
  await writeNoiseImage(negative, 36, 44, 2);
  const prompt = "A photo of a red circle";
  const cliFile = join(ROOT, "cli-sample.png"), apiFile = join(ROOT, "api-sample.png");
  await cli(
    "sample",
    "--model",
    "tiny",
    "--prompt",
    prompt,
    "--seed",
    "3",
    "--steps",
    "2",
    "--positive",
    positive,
    "--negative",
    negative,
    "--device",
    "cpu",
    "--dtype",
    "f32",
    "--out",
    cliFile,
  );
  const steps: number[] = [];
  const result = await noLeak("sample", () =>
    sample({
      model: "tiny",
      prompt,
      seed: 3,
      steps: 2,
      positive,
      negative,
      device: "cpu",
      dtype: "f32",
      out: apiFile,
      onProgress: (s) => steps.push(s.index),
    }));
  const want = await Deno.readFile(cliFile);
  assert.deepEqual(await Deno.readFile(apiFile), want);
  assert.deepEqual(result.bytes, want);
  assert.equal(result.format, "png");
  assert.deepEqual(steps, [0, 1]);
  // An existing file is never replaced without force, and stays as it was.
  await assert.rejects(
    () => sample({ model: "tiny", prompt, seed: 4, steps: 2, positive, negative, out: apiFile }),
    /exists/,
  );
  assert.deepEqual(await Deno.readFile(apiFile), want);
});

/** The part of an eval record that names neither its folders, nor the process, nor the time. */
function comparable(record: Record<string, unknown>): Record<string, unknown> {
  const { model: _m, test: _t, provenance: _p, file: _f, seconds: _s, ...rest } = record;
  return rest;
}

Deno.test("train() and evaluate() give the eval record of dipsy train and dipsy eval", async () => {
  const real = join(ROOT, "shots"), synthetic = join(ROOT, "synthetic"), test = join(ROOT, "test");
  await drawDataset(real, 3, 0);
  await drawDataset(synthetic, 2, 7);
  await drawDataset(test, 2, 1);
  const cliRun = join(ROOT, "cli-train"), apiRun = join(ROOT, "api-train");
  const inputs = ["--real", real, "--synthetic", synthetic, "--device", "cpu"];
  await cli("train", ...inputs, "--out", cliRun, "--clip", "tiny", ...TINY_TRAIN_FLAGS);
  await cli("eval", "--model", cliRun, "--test", test, "--workers", "1");
  const cliEval = JSON.parse(readFileSync(join(cliRun, "eval.json"), "utf8"));

  let steps = 0;
  const trained = await noLeak("train", () =>
    train({
      real,
      synthetic,
      out: apiRun,
      device: "cpu",
      workers: 1,
      options: { clip: "tiny", epochs: 2, warmupEpochs: 1, batch: 8 },
      onProgress: () => steps++,
      ...QUIET,
    }));
  assert.equal(trained.complete, true);
  assert.equal(trained.epochsDone, 2);
  assert.ok(steps > 0, "no training progress reported");
  const cliTrain = JSON.parse(readFileSync(join(cliRun, "train.json"), "utf8"));
  assert.deepEqual(trained.record?.settings, cliTrain.settings);
  assert.deepEqual(
    trained.record?.history.map((h) => h.loss),
    cliTrain.history.map((h: { loss: number }) => h.loss),
  );

  let evaluated = 0;
  const result = await noLeak("evaluate", () =>
    evaluate({
      model: apiRun,
      test,
      workers: 1,
      onProgress: (p) => (evaluated = p.done),
    }));
  assert.equal(result.file, join(apiRun, "eval.json"));
  assert.equal(evaluated, result.total);
  assert.deepEqual(comparable({ ...result }), comparable(cliEval));
  assert.deepEqual(
    comparable(JSON.parse(readFileSync(result.file, "utf8"))),
    comparable(cliEval),
  );
});

Deno.test("similarity() saves the file of dipsy similarity", async () => {
  const cliFile = join(ROOT, "cli-similarity.json"), apiFile = join(ROOT, "api-similarity.json");
  await cli("similarity", "--data", DATA, "--clip", "tiny", "--device", "cpu", "--out", cliFile);
  const encoded: number[] = [];
  const result = await noLeak("similarity", () =>
    similarity({
      data: DATA,
      clip: "tiny",
      device: "cpu",
      out: apiFile,
      onProgress: (p) => encoded.push(p.done),
    }));
  assert.equal(result.computed, true);
  assert.deepEqual(encoded, [1, 2]);
  assert.deepEqual(await Deno.readFile(apiFile), await Deno.readFile(cliFile));
  assert.deepEqual(result.matrix, JSON.parse(readFileSync(cliFile, "utf8")).similarity);
});

Deno.test("run() writes the report of dipsy run", async () => {
  const shots = join(ROOT, "run-shots"), test = join(ROOT, "run-test");
  await drawDataset(shots, 2, 0);
  await drawDataset(test, 1, 1);
  const cliExp = join(ROOT, "cli-run"), apiExp = join(ROOT, "api-run");
  await cli(...tinyRunArgs(shots, test, cliExp));
  const result = await noLeak("run", () =>
    withOutput(() =>
      run({
        data: shots,
        test,
        out: apiExp,
        tiny: true,
        workers: 1,
        generation: { perClass: 2, steps: 2, width: 32, height: 32 },
        train: { epochs: 2, warmupEpochs: 1, batch: 8 },
      })
    ));
  assert.equal(result.result.code, 0, result.lines.join("\n"));
  const report = result.result.report!;
  const want = JSON.parse(readFileSync(join(cliExp, "report.json"), "utf8"));
  for (const key of ["accuracy", "perClass", "selection", "classifier", "classes"]) {
    assert.deepEqual(report[key], want[key], key);
  }
  const synthetic = (exp: string) => readTree(join(exp, "synthetic"));
  assert.deepEqual(images(await synthetic(apiExp)), images(await synthetic(cliExp)));
});

Deno.test("a misspelt setting is refused, naming it, before anything is written", async () => {
  const out = join(ROOT, "api-typo");
  await assert.rejects(
    () =>
      generate({ data: DATA, out, ...QUICK, perClas: 2 } as GenerateSettings & { data: string }),
    /perClas/,
  );
  await assert.rejects(() => Deno.stat(out), Deno.errors.NotFound);
});

globalThis.addEventListener("unload", () => Deno.removeSync(ROOT, { recursive: true }));
