/** What two sweep tests compare: the files a sweep's result consists of, byte for byte. */
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { readTree } from "./util.ts";

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
