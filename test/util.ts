/**
 * Helpers shared by the test files: fixture paths that fail (never skip) when a fixture was not
 * generated, reference tensors and tolerance checks, handle-leak checks, scratch folders, a quiet
 * console, deterministic input images and datasets, and the description of the dipsy fixture.
 */
import assert from "node:assert/strict";
import { copyFileSync, existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { type DType, memory, SafetensorsFile, saveSafetensors, type Tensor } from "../ffi/mod.ts";
import { encodeImage, type ImageFormat, type RgbImage } from "../core/image.ts";
import { saveSimilarityFile } from "../app/similarity.ts";

/** test/fixtures/: test/reference/NAME_ref.py writes test/fixtures/NAME/. */
export const FIXTURES = fileURLToPath(new URL("./fixtures/", import.meta.url));

/** What to run when test/fixtures/NAME/ is missing or stale. */
export function howToGenerate(name: string): string {
  return "run `deno task test`, which generates the fixtures, or " +
    `\`.venv/bin/python test/reference/${name}_ref.py test/fixtures/${name}/\``;
}

/**
 * The path of test/fixtures/`dir` (e.g. "vae/tiny"), once it exists and holds `files`: a
 * fixture that was not generated fails the test (never skips it) and says how to generate it.
 */
export function fixture(dir: string, ...files: string[]): string {
  const path = join(FIXTURES, dir);
  for (const p of files.length ? files.map((f) => join(path, f)) : [path]) {
    if (!existsSync(p)) {
      throw new Error(`missing fixture ${p}: ${howToGenerate(dir.split("/")[0])}`);
    }
  }
  return path;
}

/** The reference inputs and outputs in `dir`/io.safetensors; the caller disposes them. */
export function loadIO(dir: string, options: { dtype?: DType } = {}): Map<string, Tensor> {
  return SafetensorsFile.open(join(dir, "io.safetensors")).loadAll(options);
}

/** Disposes every tensor of the maps. */
export function disposeAll(...maps: Map<string, Tensor>[]): void {
  for (const m of maps) for (const t of m.values()) t.dispose();
}

/**
 * max |got - want| and the reference's scale max |want|, exact (in float64 on the host, whatever
 * the dtypes); the shapes must match.
 */
export function maxAbsError(got: Tensor, want: Tensor, label = "tensor"): {
  err: number;
  scale: number;
} {
  assert.deepEqual([...got.shape], [...want.shape], `${label}: shape`);
  const a = got.toFloat64(), b = want.toFloat64();
  let err = 0, scale = 0;
  for (let i = 0; i < b.length; i++) {
    err = Math.max(err, Math.abs(a[i] - b[i]));
    scale = Math.max(scale, Math.abs(b[i]));
  }
  return { err, scale };
}

/**
 * Asserts that `got` matches the reference `want`: max |got - want| <= tol * max(1, max |want|),
 * relative to the reference's scale (at least 1), or with `absolute`, max |got - want| <= tol.
 * Logs the error; returns it.
 */
export function assertClose(
  label: string,
  got: Tensor,
  want: Tensor,
  tol: number,
  { absolute = false } = {},
): number {
  const { err, scale } = maxAbsError(got, want, label);
  console.log(`  ${label}: max abs err ${err.toExponential(2)} (output scale ${scale.toFixed(3)})`);
  if (absolute) assert.ok(err <= tol, `${label}: max abs err ${err} > ${tol}`);
  else {
    assert.ok(
      err <= tol * Math.max(1, scale),
      `${label}: max abs err ${err} > ${tol} x max(1, output scale ${scale})`,
    );
  }
  return err;
}

/** Runs `fn` and asserts that it leaves no native tensor handle behind; returns its result. */
export function noLeak<T>(label: string, fn: () => T): T {
  const before = memory().handles;
  const result = fn();
  assert.equal(memory().handles, before, `${label}: tensor handles leaked`);
  return result;
}

/** Runs `fn` on a new temporary folder, removed afterwards whatever happens. */
export async function withTempDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "dipsy-test-" });
  try {
    return await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** withTempDir for synchronous `fn`. */
export function withTempDirSync<T>(fn: (dir: string) => T): T {
  const dir = Deno.makeTempDirSync({ prefix: "dipsy-test-" });
  try {
    return fn(dir);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
}

/**
 * A scratch copy of the model folder `src` (config.json and the weights file `weights`) with the
 * config and/or the weights edited; the caller removes it.
 */
export function scratchModel(
  src: string,
  weights: string,
  edit: {
    config?: (c: Record<string, unknown>) => void;
    weights?: (w: Map<string, Tensor>) => void;
  },
): string {
  const dir = Deno.makeTempDirSync({ prefix: "dipsy-scratch-" });
  if (edit.config) {
    const config = JSON.parse(readFileSync(join(src, "config.json"), "utf8"));
    edit.config(config);
    writeFileSync(join(dir, "config.json"), JSON.stringify(config, null, 2));
  } else {
    copyFileSync(join(src, "config.json"), join(dir, "config.json"));
  }
  if (edit.weights) {
    const w = SafetensorsFile.open(join(src, weights)).loadAll();
    edit.weights(w);
    saveSafetensors(join(dir, weights), w);
    disposeAll(w);
  } else {
    copyFileSync(join(src, weights), join(dir, weights));
  }
  return dir;
}

/**
 * Runs `fn` with console.log and console.error captured, so that a command's chatter does not
 * bury the test report; with `echo`, the captured lines are printed afterwards under "  | ".
 */
export async function quietly<T>(fn: () => Promise<T>, { echo = false } = {}): Promise<T> {
  const log = console.log, err = console.error;
  const lines: string[] = [];
  console.log = console.error = (...a: unknown[]) => lines.push(a.join(" "));
  try {
    return await fn();
  } finally {
    console.log = log;
    console.error = err;
    if (echo) { for (const l of lines) log(`  | ${l}`); }
  }
}

/** Runs `fn` with console.log and console.error captured; returns its result and the lines. */
export async function withOutput<T>(fn: () => Promise<T>): Promise<{ result: T; lines: string[] }> {
  const log = console.log, err = console.error;
  const lines: string[] = [];
  console.log = console.error = (...a: unknown[]) => lines.push(a.join(" "));
  try {
    return { result: await fn(), lines };
  } finally {
    console.log = log;
    console.error = err;
  }
}

/** An image of deterministic noise (a linear congruential generator started at `seed`). */
export function noiseImage(width: number, height: number, seed = 1): RgbImage {
  const data = new Uint8Array(width * height * 3);
  let s = seed;
  for (let i = 0; i < data.length; i++) {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    data[i] = s >>> 24;
  }
  return { width, height, data };
}

/** Writes a noiseImage to `path` (creating its folder) in `format`. */
export async function writeNoiseImage(
  path: string,
  width: number,
  height: number,
  seed: number,
  format: ImageFormat = "png",
): Promise<void> {
  await Deno.mkdir(join(path, ".."), { recursive: true });
  await Deno.writeFile(path, await encodeImage(noiseImage(width, height, seed), format));
}

/** The classes of writeTinyDataset. */
export const TINY_DATASET_CLASSES = ["blue square", "red circle"];

/**
 * A few-shot dataset for runs on the tiny models: two shots per class, non-square, so crops are
 * drawn; a fixed similarity file, so runs in this process and in CLI subprocesses use the same
 * matrix without computing one.
 */
export async function writeTinyDataset(dir: string): Promise<void> {
  for (const [k, name] of TINY_DATASET_CLASSES.entries()) {
    for (let i = 0; i < 2; i++) {
      await writeNoiseImage(join(dir, name, `${i}.png`), 40 + 4 * i, 36, 10 * k + i);
    }
  }
  const similarity = [[1, 0.5], [0.5, 1]];
  await saveSimilarityFile(join(dir, "similarity.json"), TINY_DATASET_CLASSES, similarity, {});
}

/**
 * `dipsy generate` flags that keep a run on the tiny models to seconds: `perClass` images per
 * class, 2 steps at 32x32, in batches of 2, from `seed`.
 */
export function quickGenerateFlags(perClass: number, seed: number): string[] {
  return [
    "--per-class",
    String(perClass),
    "--steps",
    "2",
    "--size",
    "32",
    "--batch",
    "2",
    "--seed",
    String(seed),
  ];
}

/**
 * Training flags that keep a run on the tiny models to seconds: 2 epochs (1 of warm-up) in
 * batches of 8 on one loader worker.
 */
export const TINY_TRAIN_FLAGS = [
  "--epochs",
  "2",
  "--warmup-epochs",
  "1",
  "--batch",
  "8",
  "--workers",
  "1",
];

/**
 * `dipsy run` on `data` and `test` into `out`, with every stage on the tiny models kept to
 * seconds: 2 images per class, 2 steps at 32x32, then TINY_TRAIN_FLAGS. `flags` come last, so
 * they may override any of these.
 */
export function tinyRunArgs(data: string, test: string, out: string, ...flags: string[]): string[] {
  return [
    "run",
    "--data",
    data,
    "--test",
    test,
    "--out",
    out,
    "--tiny",
    "--per-class",
    "2",
    "--steps",
    "2",
    "--size",
    "32",
    ...TINY_TRAIN_FLAGS,
    ...flags,
  ];
}

/** Every file under `dir`, by path relative to it ("a/b.jpg") -> bytes. */
export async function readTree(dir: string): Promise<Map<string, Uint8Array>> {
  const files = new Map<string, Uint8Array>();
  const walk = async (d: string, rel: string) => {
    for await (const e of Deno.readDir(d)) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory) await walk(join(d, e.name), r);
      else files.set(r, await Deno.readFile(join(d, e.name)));
    }
  };
  await walk(dir, "");
  return files;
}

// ---------------------------------------------------------------------------------------------
// The end-to-end fixture of test/reference/dipsy_ref.py (cases.json, io.safetensors, the models)

export interface DipsyRequest {
  prompt: string;
  seed: number;
  positive?: string;
  negative?: string;
}

export interface DipsyCase {
  name: string;
  guidance: string;
  options: Record<string, number>;
  sampler: string;
  ip_adapter: string | null;
  /** IP-Adapters the reference attached (2 for DIPSY, 1 for Eq. 8, 0 for text CFG). */
  adapters: number;
  steps: number;
  width: number;
  height: number;
  requests: DipsyRequest[];
}

export interface DipsyFixture {
  dir: string;
  model: string;
  imageEncoder: string;
  cases: DipsyCase[];
}

/** The description of test/fixtures/dipsy/ (test/reference/dipsy_ref.py), checked to exist. */
export function dipsyFixture(): DipsyFixture {
  const dir = fixture("dipsy", "cases.json", "io.safetensors");
  const raw = JSON.parse(readFileSync(join(dir, "cases.json"), "utf8"));
  return {
    dir,
    model: join(dir, raw.model),
    imageEncoder: join(dir, raw.image_encoder),
    cases: raw.cases,
  };
}

/** The case called `name` in the dipsy fixture. */
export function dipsyCase(fx: DipsyFixture, name: string): DipsyCase {
  const c = fx.cases.find((x) => x.name === name);
  if (!c) throw new Error(`fixture ${fx.dir} has no case "${name}"`);
  return c;
}
