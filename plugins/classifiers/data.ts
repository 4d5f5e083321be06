/**
 * The classifier's image sets: the real shots, the synthetic images and a test split, each a
 * list of (file, class) checked against one class list before any training starts, and
 * DataDream's epoch layout (real shots repeated, everything shuffled, fixed-size batches).
 *
 * Folders are read with the few-shot reader (`root/<class>/*`, the DataDream layout, the class
 * name mapping file). A folder written by `dipsy generate` is read from its manifest, which lists
 * only finished images and the class each was generated for.
 */
import { existsSync } from "node:fs";
import { join, resolve } from "node:path";
import { type DatasetOptions, validateDataset } from "../../core/dataset.ts";
import { MANIFEST, readManifest, RunError } from "../../core/output.ts";
import type { LabeledImage } from "../../core/plugins.ts";
import { derive, type Seed } from "../../core/rng.ts";

/** One folder of labelled images, before class indices are assigned. */
export interface ImageFolder {
  /** The folder as given. */
  path: string;
  /** Dataset name (DataDream layout), when the reader found one. */
  dataset?: string;
  /** Class names, in the folder's order. */
  classNames: string[];
  images: { path: string; className: string }[];
  /** `holdout`: the images kept out of `images` (the last of each class), for validation. */
  heldOut?: { path: string; className: string }[];
}

export interface ReadFolderOptions
  extends Pick<DatasetOptions, "dataset" | "fewshotSeed" | "shots" | "holdout"> {
  /** Leave unreadable or corrupt images out instead of failing. */
  skipBad?: boolean;
  /** Decode every image while checking (default false: headers only, fast on large sets). */
  decode?: boolean;
}

/** Reads a class-per-folder image set (or a `dipsy generate` output folder, by its manifest). */
export async function readImageFolder(
  path: string,
  opts: ReadFolderOptions = {},
): Promise<ImageFolder> {
  const root = resolve(path);
  if (existsSync(join(root, MANIFEST))) return await readGenerated(root);
  const ds = await validateDataset(root, {
    dataset: opts.dataset,
    fewshotSeed: opts.fewshotSeed,
    shots: opts.shots,
    holdout: opts.holdout,
    negatives: false,
    skipBad: opts.skipBad ?? false,
    decode: opts.decode ?? false,
  });
  return {
    path: root,
    dataset: ds.dataset,
    classNames: ds.classes.map((c) => c.name),
    images: ds.classes.flatMap((c) => c.shots.map((s) => ({ path: s.path, className: c.name }))),
    ...(opts.holdout
      ? {
        heldOut: ds.classes.flatMap((c) =>
          (c.heldOut ?? []).map((s) => ({ path: s.path, className: c.name }))
        ),
      }
      : {}),
  };
}

async function readGenerated(root: string): Promise<ImageFolder> {
  const { entries, badLines } = await readManifest(root);
  if (badLines.length > 0) {
    throw new RunError(
      `${join(root, MANIFEST)}: line(s) ${badLines.slice(0, 5).join(", ")} are not valid JSON ` +
        "(the generate run was cut off: run it again to finish and repair it)",
    );
  }
  const byClass = new Map<string, number>();
  const images: ImageFolder["images"] = [];
  const sorted = [...entries.values()].map((e) => e.entry).sort((a, b) =>
    a.classIndex - b.classIndex || a.index - b.index
  );
  for (const e of sorted) {
    const file = join(root, e.file);
    if (!existsSync(file)) continue; // listed before a crash cut its write; generate redoes it
    byClass.set(e.class, e.classIndex);
    images.push({ path: file, className: e.class });
  }
  if (images.length === 0) {
    throw new RunError(`${root}: the manifest lists no finished image`);
  }
  const classNames = [...byClass.entries()].sort((a, b) => a[1] - b[1]).map(([name]) => name);
  return { path: root, classNames, images };
}

/** Images per class name. */
export function countByClass(folder: ImageFolder): Map<string, number> {
  const counts = new Map<string, number>(folder.classNames.map((c) => [c, 0]));
  for (const im of folder.images) counts.set(im.className, (counts.get(im.className) ?? 0) + 1);
  return counts;
}

function listNames(names: readonly string[], max = 8): string {
  const shown = names.slice(0, max).map((n) => JSON.stringify(n)).join(", ");
  return names.length > max ? `${shown} and ${names.length - max} more` : shown;
}

/**
 * The class list training uses: the real set's, which the synthetic set must match exactly
 * (a class missing from either side would be learnt from one kind of data only, silently).
 */
export function trainingClasses(real: ImageFolder | null, synthetic: ImageFolder | null): string[] {
  const sets = [real, synthetic].filter((s): s is ImageFolder => s !== null);
  if (sets.length === 0) throw new RunError("no training images: give real and/or synthetic");
  for (const s of sets) {
    const empty = [...countByClass(s)].filter(([, n]) => n === 0).map(([c]) => c);
    if (empty.length) {
      throw new RunError(`${s.path}: class(es) without images: ${listNames(empty)}`);
    }
  }
  const classes = sets[0].classNames;
  if (real && synthetic) {
    const a = new Set(real.classNames), b = new Set(synthetic.classNames);
    const onlyReal = real.classNames.filter((c) => !b.has(c));
    const onlySyn = synthetic.classNames.filter((c) => !a.has(c));
    if (onlyReal.length || onlySyn.length) {
      const parts = [];
      if (onlyReal.length) parts.push(`only in the real set: ${listNames(onlyReal)}`);
      if (onlySyn.length) parts.push(`only in the synthetic set: ${listNames(onlySyn)}`);
      throw new RunError(
        `the real (${real.path}) and synthetic (${synthetic.path}) sets have different ` +
          `classes: ${parts.join("; ")}`,
      );
    }
  }
  if (classes.length < 2) throw new RunError(`${sets[0].path}: a classifier needs two classes`);
  return [...classes];
}

/** Labels a folder's images with indices into `classNames`; unknown classes are an error. */
export function labelImages(
  folder: ImageFolder,
  classNames: readonly string[],
  synthetic: boolean,
  what = "the model",
): LabeledImage[] {
  const index = new Map(classNames.map((c, i) => [c, i]));
  const unknown = folder.classNames.filter((c) => !index.has(c));
  if (unknown.length) {
    throw new RunError(
      `${folder.path}: class(es) unknown to ${what}: ${listNames(unknown)} ` +
        `(it knows ${listNames(classNames as string[])})`,
    );
  }
  return folder.images.map((im) => ({
    path: im.path,
    label: index.get(im.className)!,
    synthetic,
  }));
}

/**
 * DataDream's repeat count of the real shots: the synthetic images per real shot, floored
 * (`round(M // N)` in its code), at least 1.
 */
export function realRepeats(real: number, synthetic: number): number {
  if (real === 0) return 0;
  return Math.max(1, Math.floor(synthetic / real));
}

/** One epoch's training list: the real shots `repeats` times, then the synthetic images. */
export function epochItems(
  real: readonly LabeledImage[],
  synthetic: readonly LabeledImage[],
  repeats: number,
): LabeledImage[] {
  const items: LabeledImage[] = [];
  for (let r = 0; r < repeats; r++) items.push(...real);
  items.push(...synthetic);
  return items;
}

/** A permutation of 0..n-1 (Fisher-Yates) that depends only on (seed, epoch). */
export function epochOrder(n: number, seed: Seed, epoch: number): Uint32Array {
  const order = new Uint32Array(n);
  for (let i = 0; i < n; i++) order[i] = i;
  const rng = derive(seed, "shuffle", epoch);
  for (let i = n - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    const t = order[i];
    order[i] = order[j];
    order[j] = t;
  }
  return order;
}

/** Batches of positions (the last may be smaller, as PyTorch's DataLoader without drop_last). */
export function batchesOf(n: number, batch: number): [number, number][] {
  if (!Number.isInteger(batch) || batch < 1) {
    throw new RangeError(`batch size must be a positive integer, got ${batch}`);
  }
  const out: [number, number][] = [];
  for (let i = 0; i < n; i += batch) out.push([i, Math.min(n, i + batch)]);
  return out;
}
