/** What the sweep tests share: the tiny 2 x 2 sweep, and the files its result consists of. */
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { readTree } from "./util.ts";

/**
 * The base experiment of the tiny sweep (2 classes x 2 images, 2 steps at 32x32, one epoch, a
 * held-out shot), its data and test folders as the file should name them.
 */
export function tinySweepBase(data: string, test: string): string[] {
  return [
    `data: ${data}`,
    `test: ${test}`,
    "model: tiny",
    "perClass: 2",
    "steps: 2",
    "size: 32",
    "batch: 2",
    "dtype: f32",
    "device: cpu",
    "holdout: 1",
    "classifier: { epochs: 1, warmupEpochs: 0, batch: 8 }",
  ];
}

/** Its axes: 2 negative scales x 2 learning rates. */
export const TINY_SWEEP_AXES = [
  "generate:",
  "  grid:",
  "    guidance.negativeScale: [2, 4]",
  "train:",
  "  grid:",
  "    lr: [0.0001, 0.001]",
];

/**
 * Each generation set's images and manifest (lines sorted: shards append in their own order),
 * and each cell's final adapter, by path.
 */
export async function sweepResults(out: string): Promise<Map<string, Uint8Array>> {
  const files = new Map<string, Uint8Array>();
  for (const set of readdirSync(join(out, "gen"))) {
    for (const [f, bytes] of await readTree(join(out, "gen", set))) {
      if (f.endsWith(".jpg")) files.set(`gen/${set}/${f}`, bytes);
    }
    const lines = readFileSync(join(out, "gen", set, "manifest.jsonl"), "utf8").split("\n");
    files.set(
      `gen/${set}/manifest`,
      new TextEncoder().encode(lines.filter(Boolean).sort().join("\n")),
    );
  }
  for (const cell of readdirSync(join(out, "cells"))) {
    for (const [f, bytes] of await readTree(join(out, "cells", cell, "train", "adapter"))) {
      files.set(`cells/${cell}/adapter/${f}`, bytes);
    }
  }
  return files;
}

/** The same paths with the same bytes. */
export function assertSameFiles(got: Map<string, Uint8Array>, want: Map<string, Uint8Array>) {
  assert.deepEqual([...got.keys()].sort(), [...want.keys()].sort(), "the same files");
  for (const [f, bytes] of want) assert.deepEqual(got.get(f), bytes, `${f}: the same bytes`);
}
