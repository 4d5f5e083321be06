/**
 * Image preparation for the classifier against torchvision on PIL (what DataDream's loader
 * workers run): decode + the recipe's train transform + normalisation, and the test transform.
 *
 * Per worker: one image at a time on one thread each side. The reference stays up as a server
 * and the two sides take turns file by file, so both see the same machine load; each file counts
 * with its best of seven rounds (after the digest pass below, which warms both up). Both sides apply the same augmentations: the reference
 * records what torchvision's classes draw for file i (seed i), and this side draws its own (their
 * cost counts) but applies the recorded ones. The outputs are checked identical by digest.
 *
 * With all cores: the worker loader (its default of cores - 1 workers) against a
 * multiprocessing pool of as many processes, both kept warm, over the same samples (each side
 * drawing its own augmentations per sample seed), best of three alternating rounds; reported
 * per image and as images per second.
 */
import { existsSync, mkdirSync } from "node:fs";
import { createHash } from "node:crypto";
import { join } from "node:path";
import { ROOT } from "../ffi/lib.ts";
import { setNumThreads } from "../ffi/mod.ts";
import { encodeImage, readImage } from "../core/image.ts";
import { Rng } from "../core/rng.ts";
import { defaultWorkers, ImageLoader } from "../plugins/classifiers/loader.ts";
import { prepareImage, type PrepareJob } from "../plugins/classifiers/prepare.ts";
import {
  applyTrainTransform,
  drawTrainTransform,
  toNormalizedFloat,
  type TrainTransformParams,
} from "../plugins/classifiers/transforms.ts";
import { type BenchResult, ReferenceProcess } from "./harness.ts";

const DIR = join(ROOT, ".cache", "bench", "augment");
const SCRIPT = join(ROOT, "bench", "reference", "augment_bench.py");
const IMAGES = 24;
const ROUNDS = 7;
const KINDS = ["train", "test"] as const;
type Kind = typeof KINDS[number];

/** Photo-sized JPEGs (500x375, like most of the datasets' images) with smooth and noisy parts. */
async function images(): Promise<string[]> {
  mkdirSync(DIR, { recursive: true });
  const paths: string[] = [];
  for (let i = 0; i < IMAGES; i++) {
    const path = join(DIR, `${i}.jpg`);
    paths.push(path);
    if (existsSync(path)) continue;
    const w = 500, h = 375, data = new Uint8Array(w * h * 3);
    let s = i + 1;
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        s = (Math.imul(s, 1103515245) + 12345) >>> 0;
        const noise = (s >>> 27) - 16;
        for (let c = 0; c < 3; c++) {
          const v = ((x * (c + 1)) / 4 + (y * (i + 2)) / 6 + noise) & 255;
          data[(y * w + x) * 3 + c] = v;
        }
      }
    }
    await Deno.writeFile(path, await encodeImage({ width: w, height: h, data }, "jpeg"));
  }
  return paths;
}

/** File i as the loader prepares it, but with the reference's augmentation decisions. */
async function prepare(kind: Kind, path: string, i: number, record: TrainTransformParams) {
  if (kind === "test") return await prepareImage({ path }, { kind, size: 224 });
  const image = await readImage(path);
  drawTrainTransform(new Rng(BigInt(i)), image.width, image.height);
  return toNormalizedFloat(applyTrainTransform(image, record));
}

async function oursSeconds(kind: Kind, path: string, i: number, record: TrainTransformParams) {
  const t0 = performance.now();
  await prepare(kind, path, i, record);
  return (performance.now() - t0) / 1000;
}

const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;

/** `jobs` samples (file j % files, seed j) in batches of two per worker. */
function jobList(files: string[], workers: number, jobs: number): PrepareJob[][] {
  const batch = 2 * workers;
  return Array.from(
    { length: Math.ceil(jobs / batch) },
    (_, b) =>
      Array.from({ length: Math.min(batch, jobs - b * batch) }, (_, k) => {
        const j = b * batch + k;
        return { path: files[j % files.length], seed: String(j) };
      }),
  );
}

/** Seconds for a list of batches through a (warm) loader, consuming each batch at once. */
async function oursPooled(loader: ImageLoader, list: PrepareJob[][]): Promise<number> {
  const t0 = performance.now();
  for await (const _ of loader.batches(list)) { /* consumed */ }
  return (performance.now() - t0) / 1000;
}

export async function benchAugment(): Promise<BenchResult[]> {
  const files = await images();
  setNumThreads(1);
  await using ref = new ReferenceProcess(SCRIPT, [JSON.stringify({ files })]);
  const { records } = await ref.answer<{ records: TrainTransformParams[] }>();

  for (const kind of KINDS) {
    const want = (await ref.request<{ sha256: string[] }>({ op: "digest", kind })).sha256;
    for (const [i, path] of files.entries()) {
      const x = await prepare(kind, path, i, records[i]);
      const got = createHash("sha256").update(new Uint8Array(x.buffer)).digest("hex");
      if (got !== want[i]) throw new Error(`augment bench: ${kind} output of ${path} differs`);
    }
  }

  // The two sides take turns file by file, so that both meet the same load.
  const results: BenchResult[] = [];
  for (const kind of KINDS) {
    const ours = files.map(() => Infinity), theirs = files.map(() => Infinity);
    for (let round = 0; round < ROUNDS; round++) {
      for (const [i, path] of files.entries()) {
        const r = await ref.request<{ s: number }>({ op: "time", kind, file: i });
        theirs[i] = Math.min(theirs[i], r.s);
        ours[i] = Math.min(ours[i], await oursSeconds(kind, path, i, records[i]));
      }
    }
    results.push({ bench: `augment_${kind}_224`, ours_s: mean(ours), reference_s: mean(theirs) });
  }

  const workers = defaultWorkers();
  const jobs = Math.max(96, 16 * workers);
  const list = jobList(files, workers, jobs);
  for (const kind of KINDS) {
    using loader = new ImageLoader({ kind, size: 224 }, { workers, prefetch: 2 });
    await oursPooled(loader, list.slice(0, 2)); // warm-up: every worker started and has run
    let ours = Infinity, theirs = Infinity;
    for (let round = 0; round < 3; round++) {
      const r = await ref.request<{ s: number }>({ op: "pool", kind, workers, jobs });
      theirs = Math.min(theirs, r.s);
      ours = Math.min(ours, await oursPooled(loader, list));
    }
    const r = {
      bench: `augment_${kind}_224_${workers}_workers`,
      ours_s: ours / jobs,
      reference_s: theirs / jobs,
      ours_images_per_s: jobs / ours,
      reference_images_per_s: jobs / theirs,
    };
    results.push(r);
  }
  return results;
}
