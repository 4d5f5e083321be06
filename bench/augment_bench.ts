/**
 * Image preparation for the classifier, one image at a time on one thread: decode + the recipe's
 * train transform + normalisation, and the test transform, against torchvision on PIL (what
 * DataDream's loader workers run). The loader runs this in worker threads ahead of the training
 * step; the per-image time tells how many workers keep a given step rate fed.
 */
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { ROOT } from "../ffi/lib.ts";
import { setNumThreads } from "../ffi/mod.ts";
import { encodeImage } from "../core/image.ts";
import { prepareImage } from "../plugins/classifiers/prepare.ts";
import { type BenchResult, runPythonReference } from "./harness.ts";

const DIR = join(ROOT, ".cache", "bench", "augment");
const IMAGES = 24;
const ROUNDS = 2;

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

async function oursPerImage(files: string[], kind: "train" | "test"): Promise<number> {
  const t0 = performance.now();
  for (const [i, path] of files.entries()) {
    await prepareImage({ path, seed: String(i) }, { kind, size: 224 });
  }
  return (performance.now() - t0) / 1000 / files.length;
}

export async function benchAugment(): Promise<BenchResult[]> {
  const files = await images();
  setNumThreads(1);
  const ours = { train: Infinity, test: Infinity }, ref = { train: Infinity, test: Infinity };
  await oursPerImage(files.slice(0, 4), "train"); // warm-up: module load, JIT
  for (let round = 0; round < ROUNDS; round++) {
    const r = await runPythonReference("bench/reference/augment_bench.py", [
      JSON.stringify({ files, rounds: 1 }),
    ]);
    ref.train = Math.min(ref.train, r.train);
    ref.test = Math.min(ref.test, r.test);
    ours.train = Math.min(ours.train, await oursPerImage(files, "train"));
    ours.test = Math.min(ours.test, await oursPerImage(files, "test"));
  }
  return [
    { bench: "augment_train_224", ours_s: ours.train, reference_s: ref.train },
    { bench: "augment_test_224", ours_s: ours.test, reference_s: ref.test },
  ];
}
