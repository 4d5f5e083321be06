/**
 * The ten benchmarks of the DIPSY and DataDream tables, shipped as data in data/datasets/: each
 * one's class names (the names DataDream's classifier and DIPSY's generation prompts say), the
 * dataset's usual folder names for them (ImageNet's WordNet ids, Pets' breed prefixes,
 * Flowers102's labels, ...), the generation prompt template and the classifier's prompt word.
 *
 * A file's `folders` maps folder names to class names; a folder that is itself a class name needs
 * no entry; `exclude` lists folders the benchmark leaves out (Caltech-101's background class).
 */
import { UserError } from "../ffi/errors.ts";

export interface Benchmark {
  /** The canonical key, also the file name (data/datasets/<name>.json). */
  name: string;
  title: string;
  /** Other names the dataset goes by (DataDream's and DIPSY's folder names among them). */
  aliases: string[];
  /** Generation prompt template, `{c}` the class name (DIPSY's manage.py). */
  prompt: string;
  /** The classifier's word in "a {word}photo of a {class}" (DataDream's). */
  classifierWord: string;
  /** Where the names come from. */
  source: string;
  classes: string[];
  folders: Record<string, string>;
  exclude?: string[];
}

export const BENCHMARKS = [
  "aircraft",
  "caltech",
  "cars",
  "dtd",
  "eurosat",
  "flowers",
  "food",
  "imagenet",
  "pets",
  "sun",
] as const;

const cache = new Map<string, Benchmark>();

function fileOf(name: string): URL {
  return new URL(`../data/datasets/${name}.json`, import.meta.url);
}

/** A benchmark by canonical key; its file is checked once, on first use. */
export function loadBenchmark(name: string): Benchmark {
  let b = cache.get(name);
  if (b) return b;
  const file = fileOf(name);
  try {
    b = JSON.parse(Deno.readTextFileSync(file)) as Benchmark;
  } catch (e) {
    throw new UserError(`${file.pathname}: ${e instanceof Error ? e.message : e}`);
  }
  const classes = new Set(b.classes);
  const bad = Object.entries(b.folders ?? {}).filter(([, c]) => !classes.has(c));
  if (
    b.name !== name || !Array.isArray(b.classes) || classes.size !== b.classes.length ||
    bad.length || typeof b.prompt !== "string" || !b.prompt.includes("{c}")
  ) {
    throw new UserError(`${file.pathname}: not a valid benchmark file (name, classes, folders)`);
  }
  cache.set(name, b);
  return b;
}

let aliases: Map<string, string> | undefined;

/** "Stanford-Cars" -> "stanford_cars": how names are compared. */
export function normalizeDatasetName(name: string): string {
  return name.trim().toLowerCase().replaceAll("-", "_");
}

/** The canonical key of a benchmark name or alias, or undefined for other datasets. */
export function benchmarkKey(name: string | undefined): string | undefined {
  if (name === undefined) return undefined;
  if (!aliases) {
    aliases = new Map();
    for (const key of BENCHMARKS) {
      aliases.set(key, key);
      for (const a of loadBenchmark(key).aliases) aliases.set(normalizeDatasetName(a), key);
    }
  }
  return aliases.get(normalizeDatasetName(name));
}

/** A benchmark by any of its names, or undefined. */
export function findBenchmark(name: string | undefined): Benchmark | undefined {
  const key = benchmarkKey(name);
  return key === undefined ? undefined : loadBenchmark(key);
}

/**
 * The class name of a folder: its entry, the folder itself when it is a class name, `null` for a
 * folder the benchmark leaves out, undefined when the benchmark does not know it.
 */
export function benchmarkClass(b: Benchmark, folder: string): string | null | undefined {
  if (b.exclude?.includes(folder)) return null;
  if (Object.hasOwn(b.folders, folder)) return b.folders[folder];
  return b.classes.includes(folder) ? folder : undefined;
}
