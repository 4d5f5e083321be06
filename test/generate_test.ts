/**
 * The dataset job on the tiny models: manifest contents, determinism (a second run, a shard
 * split, one image alone: identical bytes), resumption after SIGKILL, after Ctrl-C and after
 * a crash between writing an image and its manifest line, input checking before anything is
 * written, --skip-bad, and refusing to write into folders that are not this run's.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import type { DiffusionBackbone } from "../core/backbone.ts";
import { parseConfigObject, resolveConfig, type RunConfig } from "../core/config.ts";
import { DatasetError } from "../core/dataset.ts";
import {
  generate,
  type GenerateOptions,
  IncompatibleRunError,
  type ManifestEntry,
  readManifest,
  RunError,
  type Shard,
} from "../core/generate.ts";
import { imageSeed } from "../core/rng.ts";
import { setNumThreads } from "../ffi/mod.ts";
import { Sd15Backbone } from "../plugins/sd15/backbone.ts";
import { similaritySource } from "../app/similarity.ts";
import { registerDefaults } from "../plugins/defaults.ts";
import {
  quickGenerateFlags,
  readTree,
  TINY_DATASET_CLASSES,
  writeNoiseImage,
  writeTinyDataset,
} from "./util.ts";

registerDefaults();

// The tiny models gain nothing from threads, and busy-waiting OpenMP threads slow everything
// down many times over when other processes share the cores (as parallel test files do). The CLI
// subprocesses below get the same single thread, since thread counts can change float rounding.
setNumThreads(1);

const ROOT = await Deno.makeTempDir({ prefix: "dipsy_generate_test_" });
const DATA = join(ROOT, "data");
const CLASSES = TINY_DATASET_CLASSES;
const PER_CLASS = 3;
const MAIN = new URL("../cli/main.ts", import.meta.url).pathname;

await writeTinyDataset(DATA);

let shared: DiffusionBackbone | null = null;
const backbone = () => (shared ??= Sd15Backbone.tiny({ adapters: 2 }));

function config(out: string, extra: Record<string, unknown> = {}, data = DATA): RunConfig {
  return resolveConfig([
    parseConfigObject({
      data,
      out,
      model: "tiny",
      clip: "tiny",
      perClass: PER_CLASS,
      steps: 2,
      width: 32,
      height: 32,
      batch: 2,
      seed: 7,
      device: "cpu",
      dtype: "f32",
      ...extra,
    }, "test"),
  ]);
}

function run(
  out: string,
  opts: Partial<GenerateOptions> & { extra?: Record<string, unknown>; data?: string } = {},
) {
  const c = config(out, opts.extra, opts.data);
  return generate({
    config: c,
    similarity: similaritySource(c, { device: "cpu", dtype: "f32" }, () => {}),
    backbone,
    log: () => {},
    ...opts,
  });
}

/** Every file under `out` (relative path -> bytes), and the manifest lines. */
async function snapshot(out: string) {
  const files = await readTree(out);
  const text = new TextDecoder().decode(files.get("manifest.jsonl") ?? new Uint8Array());
  const lines = text.split("\n").filter((l) => l);
  return { files, lines };
}

function images(files: Map<string, Uint8Array>): Map<string, Uint8Array> {
  return new Map([...files].filter(([k]) => k.endsWith(".jpg")));
}

function assertSameImages(actual: Map<string, Uint8Array>, expected: Map<string, Uint8Array>) {
  const a = images(actual), e = images(expected);
  assert.deepEqual([...a.keys()].sort(), [...e.keys()].sort());
  for (const [k, v] of e) assert.deepEqual(a.get(k), v, `${k} differs`);
}

function assertCleanManifest(lines: string[], expected: string[]) {
  assert.equal(new Set(lines).size, lines.length, "duplicate manifest lines");
  assert.deepEqual([...lines].sort(), [...expected].sort());
}

function noTemps(files: Map<string, Uint8Array>) {
  const temps = [...files.keys()].filter((k) => k.split("/").pop()!.endsWith(".tmp"));
  assert.deepEqual(temps, [], "temporary files left behind");
}

// The uninterrupted reference run every other run is compared with.
const REF = join(ROOT, "ref");
const refResult = await run(REF);
const reference = await snapshot(REF);

Deno.test("writes every image with a complete manifest line", async () => {
  assert.equal(refResult.written, CLASSES.length * PER_CLASS);
  assert.equal(refResult.interrupted, false);
  const { files, lines } = reference;
  assert.equal(images(files).size, 6);
  assert.ok(files.has("run.json") && files.has("similarity.json"));
  noTemps(files);
  const entries = lines.map((l) => JSON.parse(l) as ManifestEntry);
  assert.equal(entries.length, 6);
  for (const e of entries) {
    assert.equal(e.file, `${e.class}/${String(e.index).padStart(4, "0")}.jpg`);
    assert.equal(e.seed, imageSeed(7, e.classIndex, e.index));
    assert.equal(e.runSeed, 7);
    assert.equal(e.prompt, `A photo of a ${e.class}`);
    assert.equal(e.positive!.class, e.class);
    assert.ok(files.has(e.file));
    await Deno.stat(join(DATA, e.positive!.file));
    assert.notEqual(e.negative!.class, e.class);
    await Deno.stat(join(DATA, e.negative!.file));
    assert.ok(e.positive!.augment && typeof e.positive!.augment.angle === "number");
    assert.ok(e.positive!.augment.crop, "non-square shots are cropped");
    assert.deepEqual(e.guidance, {
      name: "dipsy",
      textScale: 7.5,
      positiveScale: 6,
      negativeScale: 6,
      adapterScale: 0.6,
      negativeAdapterScale: null,
      interval: null,
    });
    assert.equal(e.sampler.name, "dpm-solver++");
    assert.equal(e.sampler.steps, 2);
    assert.equal(e.pairs.name, "class-similarity");
    assert.deepEqual([e.width, e.height], [32, 32]);
    assert.deepEqual(e.models, { model: "tiny", modelSeed: "0" });
  }
  const m = await readManifest(REF);
  assert.equal(m.entries.size, 6);
  assert.deepEqual(m.badLines, []);
});

Deno.test("same seed, same bytes; one image regenerated alone is identical", async () => {
  const out = join(ROOT, "only");
  const r = await run(out, { only: ["red circle:1", "blue square:2"] });
  assert.equal(r.written, 2);
  const { files, lines } = await snapshot(out);
  assert.deepEqual([...images(files).keys()].sort(), [
    "blue square/0002.jpg",
    "red circle/0001.jpg",
  ]);
  for (const [k, v] of images(files)) assert.deepEqual(v, reference.files.get(k), k);
  for (const l of lines) assert.ok(reference.lines.includes(l), "the same manifest line");
  // The rest of the run continues in the same folder, and everything matches the reference.
  const rest = await run(out);
  assert.equal(rest.written, 4);
  assert.equal(rest.skipped, 2);
  const all = await snapshot(out);
  assertSameImages(all.files, reference.files);
  assertCleanManifest(all.lines, reference.lines);
});

Deno.test("shards 0/2 and 1/2 together equal the unsharded run", async () => {
  const out = join(ROOT, "shards");
  const shard = (index: number): Shard => ({ index, count: 2, source: "test" });
  const [a, b] = await Promise.all([run(out, { shard: shard(0) }), run(out, { shard: shard(1) })]);
  assert.equal(a.written + b.written, 6);
  assert.ok(a.written > 0 && b.written > 0);
  const { files, lines } = await snapshot(out);
  assertSameImages(files, reference.files);
  assertCleanManifest(lines, reference.lines);
});

Deno.test("after a crash: lone files redone, lost files rewritten, finished ones untouched", async () => {
  const out = join(ROOT, "crash");
  await Deno.mkdir(out);
  for (const [k, v] of reference.files) {
    await Deno.mkdir(join(out, k, ".."), { recursive: true });
    await Deno.writeFile(join(out, k), v);
  }
  // "red circle/0002.jpg" was renamed into place but its line never written, and is damaged;
  // "blue square/0001.jpg" has its line but the file is gone; a temporary file is left over.
  const lone = "red circle/0002.jpg", lost = "blue square/0001.jpg";
  const lines = reference.lines.filter((l) => !l.includes(`"file":"${lone}"`));
  await Deno.writeTextFile(join(out, "manifest.jsonl"), lines.map((l) => `${l}\n`).join(""));
  await Deno.writeFile(join(out, lone), new Uint8Array([1, 2, 3]));
  await Deno.remove(join(out, lost));
  await Deno.writeFile(join(out, "red circle", ".0002.jpg.0123abcd.tmp"), new Uint8Array(10));
  const untouched = join(out, "blue square/0000.jpg");
  const before = (await Deno.stat(untouched)).mtime;

  const r = await run(out);
  assert.equal(r.written, 2);
  assert.equal(r.skipped, 4);
  const { files, lines: after } = await snapshot(out);
  noTemps(files);
  assertSameImages(files, reference.files);
  assertCleanManifest(after, reference.lines);
  assert.deepEqual((await Deno.stat(untouched)).mtime, before, "a finished image was rewritten");
});

Deno.test("an abort finishes and writes the batch in flight; rerunning completes the run", async () => {
  const out = join(ROOT, "abort");
  const controller = new AbortController();
  const first = await run(out, { signal: controller.signal, onImage: () => controller.abort() });
  assert.equal(first.interrupted, true);
  assert.equal(first.written, 2, "the whole first batch (2 images) is written");
  const partial = await snapshot(out);
  assert.equal(images(partial.files).size, 2);
  assert.equal(partial.lines.length, 2);
  const second = await run(out);
  assert.equal(second.written, 4);
  const { files, lines } = await snapshot(out);
  assertSameImages(files, reference.files);
  assertCleanManifest(lines, reference.lines);
});

function countLines(path: string): number {
  try {
    return Deno.readTextFileSync(path).split("\n").filter((l) => l).length;
  } catch {
    return 0;
  }
}

/**
 * Resolves as soon as the manifest has `n` lines: a file watcher reacts within a millisecond of
 * the write, so the signal lands while the next batch is still being computed.
 */
async function waitForLines(path: string, n: number, child: Deno.ChildProcess): Promise<void> {
  const dir = join(path, "..");
  await Deno.mkdir(dir, { recursive: true });
  using watcher = Deno.watchFs(dir, { recursive: false });
  let exited = false;
  child.status.then(() => exited = true);
  const deadline = Date.now() + 60_000;
  const poll = setInterval(() => {
    if (countLines(path) >= n || exited || Date.now() > deadline) watcher.close();
  }, 25);
  try {
    if (countLines(path) >= n) return;
    for await (const _ of watcher) {
      if (countLines(path) >= n) return;
    }
  } finally {
    clearInterval(poll);
  }
  if (countLines(path) >= n) return;
  throw new Error(exited ? "generate ended before the expected images landed" : "timed out");
}

Deno.test("killed with SIGKILL, then stopped with Ctrl-C, then resumed: same as uninterrupted", async () => {
  const out = join(ROOT, "killed");
  const args = [
    "run",
    "-A",
    MAIN,
    "generate",
    "--data",
    DATA,
    "--out",
    out,
    "--tiny",
    ...quickGenerateFlags(PER_CLASS, 7),
    "--device",
    "cpu",
    "--dtype",
    "f32",
  ];
  const spawn = () =>
    new Deno.Command(Deno.execPath(), {
      args,
      stdout: "piped",
      stderr: "piped",
      env: { OMP_NUM_THREADS: "1" },
    }).spawn();
  const manifest = join(out, "manifest.jsonl");

  const killed = spawn();
  await waitForLines(manifest, 1, killed);
  killed.kill("SIGKILL");
  await killed.output();
  const afterKill = await snapshot(out);
  assert.ok(afterKill.lines.length < 6, "the kill came too late to test anything");

  const interrupted = spawn();
  await waitForLines(manifest, afterKill.lines.length + 1, interrupted);
  interrupted.kill("SIGINT");
  const res = await interrupted.output();
  const stderr = new TextDecoder().decode(res.stderr);
  const afterInt = await snapshot(out);
  if (afterInt.lines.length < 6) {
    assert.equal(res.code, 130, stderr);
    assert.match(stderr, /Run the same command again to resume/);
  }
  noTemps(afterInt.files);
  // Every image on disk after a clean stop has its line, and whole batches were written.
  for (const f of images(afterInt.files).keys()) {
    assert.ok(afterInt.lines.some((l) => l.includes(`"file":"${f}"`)), `${f} has no line`);
  }

  const last = await run(out);
  assert.equal(last.interrupted, false);
  const { files, lines } = await snapshot(out);
  noTemps(files);
  assertSameImages(files, reference.files);
  assertCleanManifest(lines, reference.lines);
});

Deno.test("bad input: every problem listed with file names, nothing written", async () => {
  const data = join(ROOT, "bad");
  await writeNoiseImage(join(data, "cat", "good.png"), 32, 32, 1);
  await Deno.writeFile(join(data, "cat", "broken.jpg"), new Uint8Array(200).fill(7));
  await writeNoiseImage(join(data, "dog", "good.png"), 32, 32, 2);
  await writeNoiseImage(join(data, "dog", "tiny.png"), 8, 8, 3);
  await Deno.writeFile(join(data, "dog", "empty.png"), new Uint8Array());
  const out = join(ROOT, "bad_out");
  await assert.rejects(
    () => run(out, { data }),
    (e: unknown) => {
      assert.ok(e instanceof DatasetError);
      for (const f of ["broken.jpg", "tiny.png", "empty.png"]) {
        assert.match(e.message, new RegExp(f));
      }
      assert.equal(e.problems.filter((p) => p.severity === "error").length, 3);
      return true;
    },
  );
  await assert.rejects(() => Deno.stat(out), Deno.errors.NotFound);

  // --skip-bad: the run goes on with the good shots only.
  const r = await run(out, { data, extra: { skipBad: true, perClass: 1, pairs: "uniform" } });
  assert.equal(r.written, 2);
  const { lines } = await snapshot(out);
  for (const l of lines) {
    const e = JSON.parse(l) as ManifestEntry;
    assert.equal(e.positive!.file.split("/").pop(), "good.png");
    assert.equal(e.negative!.file.split("/").pop(), "good.png");
  }
});

Deno.test("refuses to resume with another configuration or into a foreign folder", async () => {
  const before = await snapshot(REF);
  await assert.rejects(
    () => run(REF, { extra: { seed: 8, guidance: { name: "dipsy", negativeScale: 4 } } }),
    (e: unknown) => {
      assert.ok(e instanceof IncompatibleRunError, String(e));
      assert.match(e.message, /seed: 7 \(run.json\) vs 8 \(now\)/);
      assert.match(e.message, /guidance.negativeScale: 6 \(run.json\) vs 4 \(now\)/);
      return true;
    },
  );
  await assert.rejects(() => run(REF, { extra: { preset: "no-augment" } }), /pairs.augment/);
  // A bigger perClass extends the run (a note, not an error); nothing else changes here.
  const after = await snapshot(REF);
  assert.deepEqual(after.files, before.files);

  const foreign = join(ROOT, "foreign");
  await Deno.mkdir(foreign);
  await Deno.writeTextFile(join(foreign, "notes.txt"), "mine");
  await assert.rejects(
    () => run(foreign),
    (e: unknown) => e instanceof RunError && /not empty/.test(e.message),
  );
  assert.equal(await Deno.readTextFile(join(foreign, "notes.txt")), "mine");
  assert.deepEqual([...Deno.readDirSync(foreign)].map((e) => e.name), ["notes.txt"]);

  await assert.rejects(() => run(join(DATA, "generated")), /inside the few-shot data/);
  await assert.rejects(() => Deno.stat(join(DATA, "generated")), Deno.errors.NotFound);
});

/**
 * A plugin record as the writer before the option schemas wrote it: guidance and pair options
 * without a default (now `null`) left out, and only the sampler options given (none here).
 */
function oldPluginRecord(key: string, record: Record<string, unknown>): Record<string, unknown> {
  if (key === "sampler") return { name: record.name, steps: record.steps };
  return Object.fromEntries(Object.entries(record).filter(([, v]) => v !== null));
}

function asOldWriter(value: Record<string, unknown>): Record<string, unknown> {
  const out = { ...value };
  for (const key of ["guidance", "sampler", "pairs"]) {
    out[key] = oldPluginRecord(key, value[key] as Record<string, unknown>);
  }
  return out;
}

Deno.test("a folder from before the resolved records resumes; a real difference is refused", async () => {
  const out = join(ROOT, "old_writer");
  const extra = { sampler: "ddim", perClass: 1 };
  assert.equal((await run(out, { extra })).written, CLASSES.length);
  const made = await snapshot(out);
  const recordPath = join(out, "run.json");
  const record = JSON.parse(await Deno.readTextFile(recordPath));
  assert.equal(record.output.sampler.eta, 0, "the resolved record lists DDIM's eta");
  assert.ok(Object.values(record.output.guidance).includes(null), "a defaulted null option");
  const { adapters: _, ...old } = { ...record, output: asOldWriter(record.output) };
  await Deno.writeTextFile(recordPath, `${JSON.stringify(old, null, 2)}\n`);
  // One image lost with its line; the others' lines as the old writer wrote them.
  const lost = "red circle/0000.jpg";
  await Deno.remove(join(out, lost));
  const lines = made.lines.filter((l) => !l.includes(`"file":"${lost}"`))
    .map((l) => JSON.stringify(asOldWriter(JSON.parse(l))));
  await Deno.writeTextFile(join(out, "manifest.jsonl"), lines.map((l) => `${l}\n`).join(""));

  const resumed = await run(out, { extra });
  assert.equal(resumed.written, 1);
  assert.equal(resumed.skipped, CLASSES.length - 1);
  const after = await snapshot(out);
  assertSameImages(after.files, made.files);
  assert.deepEqual(JSON.parse(await Deno.readTextFile(recordPath)), old, "run.json kept as it was");

  await assert.rejects(
    () => run(out, { extra: { ...extra, sampler: { name: "ddim", eta: 0.5 } } }),
    (e: unknown) => {
      assert.ok(e instanceof IncompatibleRunError, String(e));
      assert.match(e.message, /sampler\.eta: 0 \(run.json\) vs 0\.5 \(now\)/);
      assert.equal(e.differences.length, 1, e.message);
      return true;
    },
  );
  assert.deepEqual((await snapshot(out)).files, after.files);
});

Deno.test("guidance that needs a negative with a pair sampler that gives none is refused early", async () => {
  const out = join(ROOT, "mismatch");
  await assert.rejects(
    () => run(out, { extra: { guidance: "dipsy", pairs: "none" } }),
    /needs a negative reference image/,
  );
  await assert.rejects(() => Deno.stat(out), Deno.errors.NotFound);
});

globalThis.addEventListener("unload", () => {
  shared?.[Symbol.dispose]();
  try {
    Deno.removeSync(ROOT, { recursive: true });
  } catch { /* already gone */ }
});
