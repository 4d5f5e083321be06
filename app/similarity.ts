/**
 * The class similarity matrix the default pair sampler draws negatives from (mean CLIP ViT-B/16
 * image embedding per class, cosine between classes), and the similarity source `generate`
 * uses: a given file, the run's own copy, the data's, or computed on the spot. Shared by the
 * CLI and the HTTP endpoint.
 *
 * The matrix is the official `calculate_similarity_matrix.py`'s: images go through openai CLIP's
 * own transform (torchvision's Resize and CenterCrop on PIL images), whose crop offset rounds
 * where transformers' image processor floors it, so the two part on some non-square images.
 * Matrices move both ways: `.json` files are dipsy's, `.npz` files the official script's
 * (`similarity_matrix`, `class_names` = the class folders).
 */
import { readdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import type { Tensor } from "../ffi/mod.ts";
import type { Dataset } from "../core/dataset.ts";
import type { SimilaritySource } from "../core/generate.ts";
import { RunError, SIMILARITY_FILE, writeAtomic } from "../core/output.ts";
import { DEFAULT_CLIP, type RunConfig, similarityClip, TINY } from "../core/config.ts";
import type { Placement } from "./models.ts";
import { HF_MODEL_FILES, isFile, resolveFolderRef, resolvePlacement } from "./models.ts";

export { isFile, SIMILARITY_FILE };

/** How images are preprocessed before encoding, as recorded in the file's meta. */
const SIMILARITY_PREPROCESS = "openai-clip (torchvision Resize + CenterCrop on PIL)";

/** Shots encoded per forward pass. */
const ENCODE_BATCH = 16;

/** CLIP ViT-B/16 (or the tiny preset) image embeddings of every shot -> class similarity. */
export async function computeSimilarity(
  dataset: Dataset,
  clipRef: string,
  placement: Placement,
  opts: { seed?: number; onClass?: (done: number, total: number) => void } = {},
): Promise<number[][]> {
  const { noGrad, ops, scope } = await import("../ffi/mod.ts");
  const { clipPreprocess, readImage } = await import("../core/image.ts");
  const { loadClipVision } = await import("../plugins/clip/model.ts");
  const { classSimilarity } = await import("../plugins/pairs/mod.ts");

  const source = clipRef === TINY ? TINY : await resolveFolderRef(clipRef, HF_MODEL_FILES);
  const vision = loadClipVision(source, { ...placement, seed: opts.seed ?? 0 });
  const embeddings: Tensor[] = [];
  try {
    if (!vision.visualProjection) {
      throw new RunError(
        `${clipRef}: the CLIP model has no visual projection; class similarity uses projected ` +
          "image embeddings (a CLIPModel or CLIPVisionModelWithProjection folder)",
      );
    }
    const size = vision.config.imageSize;
    for (const [k, cls] of dataset.classes.entries()) {
      const parts: Tensor[] = [];
      for (let i = 0; i < cls.shots.length; i += ENCODE_BATCH) {
        const images = await Promise.all(
          cls.shots.slice(i, i + ENCODE_BATCH).map((s) => readImage(s.path)),
        );
        parts.push(noGrad(() =>
          scope(() => {
            const pixels = clipPreprocess(images, { size, flavor: "torchvision" });
            const px = ops.to(pixels, placement.dtype, placement.device);
            return ops.to(vision.forward(px).imageEmbeds!, "f32", "cpu");
          })
        ));
      }
      embeddings.push(parts.length === 1 ? parts[0] : ops.cat(parts, 0));
      if (parts.length > 1) { for (const p of parts) p.dispose(); }
      opts.onClass?.(k + 1, dataset.classes.length);
    }
    return classSimilarity(embeddings);
  } finally {
    for (const e of embeddings) e.dispose();
    vision.dispose();
  }
}

/** What a saved matrix records about how it was made. */
export function similarityMeta(
  clip: string,
  opts: { seed?: number; data?: string } = {},
): Record<string, unknown> {
  return {
    clip,
    ...(clip === TINY ? { seed: opts.seed ?? 0 } : {}),
    preprocess: SIMILARITY_PREPROCESS,
    ...(opts.data !== undefined ? { data: opts.data } : {}),
  };
}

/**
 * Why a saved matrix does not stand for one computed with `clip` (and, for the tiny CLIP, its
 * weight seed) now, or null. A file that does not say which CLIP made it is taken as it is.
 */
export function staleSimilarity(
  meta: Record<string, unknown> | undefined,
  clip: string,
  seed = 0,
): string | null {
  const made = meta?.clip;
  if (typeof made !== "string") return null;
  if (made !== clip) return `it was made with CLIP ${made}, not ${clip}`;
  if (clip === TINY && typeof meta?.seed === "number" && meta.seed !== seed) {
    return `it was made with the tiny CLIP of seed ${meta.seed}, not ${seed}`;
  }
  return null;
}

/**
 * Writes the file through a temporary name, so readers never see half of it. A path ending in
 * `.npz` gets the official script's format, whose class names are the folder names (`folders`,
 * in the order of `classNames`); anything else dipsy's JSON.
 */
export async function saveSimilarityFile(
  path: string,
  classNames: readonly string[],
  matrix: number[][],
  meta: Record<string, unknown>,
  opts: { folders?: readonly string[] } = {},
): Promise<void> {
  if (/\.npz$/i.test(path)) {
    const { writeNpz } = await import("../core/npz.ts");
    const names = opts.folders ?? classNames;
    if (names.length !== matrix.length) {
      throw new RangeError(`saveSimilarityFile: ${names.length} names, ${matrix.length} rows`);
    }
    const k = matrix.length;
    const npz = writeNpz({
      similarity_matrix: { shape: [k, k], data: matrix.flat() },
      class_names: { shape: [k], strings: names },
    });
    return await writeAtomic(path, npz);
  }
  const { saveSimilarity } = await import("../plugins/pairs/mod.ts");
  await writeAtomic(
    path,
    (tmp) => saveSimilarity(tmp, { classNames: [...classNames], similarity: matrix, meta }),
  );
}

/**
 * The class similarity kept in `file`: read when it was made with the configuration's CLIP (and,
 * for the tiny CLIP, its weight seed), else computed and saved there, saying why a saved file is
 * not taken.
 * `beforeCompute` runs before anything is computed: it may refuse (a stage that must not run) or
 * announce it.
 */
export async function similarityStage(
  file: string,
  dataset: Dataset,
  config: RunConfig,
  opts: {
    force?: boolean;
    log?: (message: string) => void;
    beforeCompute?: () => void;
    onClass?: (done: number, total: number) => void;
  } = {},
): Promise<{ matrix: number[][]; computed: boolean }> {
  const clip = similarityClip(config), seed = config.modelSeed;
  if (isFile(file) && !opts.force) {
    const saved = await readSimilarityFile(file, dataset);
    const stale = staleSimilarity(saved.meta, clip, seed);
    if (!stale) return { matrix: saved.matrix, computed: false };
    (opts.log ?? console.error)(`${file}: ${stale}; computing it again`);
  }
  opts.beforeCompute?.();
  const matrix = await computeSimilarity(dataset, clip, await resolvePlacement(config), {
    seed,
    onClass: opts.onClass,
  });
  await Deno.mkdir(dirname(file), { recursive: true });
  await keepSimilarity(file, dataset, matrix, config);
  return { matrix, computed: true };
}

/** Saves a matrix made for `dataset` with the configuration's CLIP, recording how it was made. */
function keepSimilarity(file: string, dataset: Dataset, matrix: number[][], config: RunConfig) {
  const meta = similarityMeta(similarityClip(config), {
    seed: config.modelSeed,
    data: dataset.root,
  });
  const names = dataset.classes.map((c) => c.name);
  return saveSimilarityFile(file, names, matrix, meta, {
    folders: dataset.classes.map((c) => c.folder),
  });
}

/**
 * Reads a similarity file (dipsy's `.json`, or the official `.npz`) for `dataset`, in its class
 * order. An `.npz` names classes by folder (or by class name); a different class list is an
 * error naming the missing and extra classes.
 */
export async function readSimilarityFile(
  path: string,
  dataset: Pick<Dataset, "classes">,
): Promise<{ matrix: number[][]; meta?: Record<string, unknown> }> {
  if (!/\.npz$/i.test(path)) {
    const { loadSimilarity } = await import("../plugins/pairs/mod.ts");
    try {
      const m = await loadSimilarity(path, dataset.classes.map((c) => c.name));
      return { matrix: m.similarity, meta: m.meta };
    } catch (e) {
      throw new RunError(e instanceof Error ? e.message : String(e), { cause: e });
    }
  }
  const { readNpz } = await import("../core/npz.ts");
  let arrays;
  try {
    arrays = readNpz(await Deno.readFile(path), path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new RunError(`${path}: no such file`);
    throw e;
  }
  const sim = arrays.get("similarity_matrix"), names = arrays.get("class_names");
  const k = names?.shape[0] ?? -1;
  if (
    sim?.kind !== "number" || names?.kind !== "string" || names.shape.length !== 1 ||
    sim.shape.length !== 2 || sim.shape[0] !== k || sim.shape[1] !== k
  ) {
    throw new RunError(
      `${path}: needs similarity_matrix [K, K] (numbers) and class_names [K] (strings), as ` +
        "calculate_similarity_matrix.py saves them",
    );
  }
  const index = new Map<string, number>();
  dataset.classes.forEach((c, i) => {
    index.set(c.folder, i);
    index.set(c.name, i);
  });
  const at = names.data.map((n) => index.get(n));
  const extra = names.data.filter((_, j) => at[j] === undefined);
  const covered = new Set(at);
  const missing = dataset.classes.filter((_, i) => !covered.has(i)).map((c) => c.folder);
  if (extra.length || missing.length || covered.size !== names.data.length) {
    const parts = [];
    if (missing.length) parts.push(`missing ${missing.map((c) => `"${c}"`).join(", ")}`);
    if (extra.length) parts.push(`not in the data: ${extra.map((c) => `"${c}"`).join(", ")}`);
    if (!parts.length) parts.push("a class is listed twice");
    throw new RunError(`${path}: its classes do not match the data (${parts.join("; ")})`);
  }
  const order = dataset.classes.map((_, i) => at.indexOf(i));
  const matrix = order.map((r) => order.map((c) => sim.data[r * k + c]));
  return { matrix };
}

/** The official script's file in a class root (`similarity_matrix_<dataset>_<seed>.npz`). */
function officialSimilarityFile(root: string): string | null {
  let names: string[];
  try {
    names = readdirSync(root).filter((n) => /^similarity_matrix_.*\.npz$/.test(n));
  } catch {
    return null;
  }
  return names.length === 1 ? join(root, names[0]) : null;
}

/**
 * Where `generate` gets the matrix: `--similarity FILE` (.json or .npz); else the output
 * folder's copy (the one a resumed run used); else `similarity.json` in the data's class root;
 * else the official script's `similarity_matrix_*.npz` there; else computed now. A saved file
 * made with another CLIP than the one asked for is said to be so and computed again. A copy
 * always goes into the output folder, so a run folder is self-contained.
 */
export function similaritySource(
  config: RunConfig,
  placement: Placement,
  log: (message: string) => void = (m) => console.error(m),
): SimilaritySource {
  const clip = similarityClip(config);
  return {
    async get(dataset, out) {
      if (config.similarity) {
        const from = resolve(config.similarity);
        const { matrix, meta } = await readSimilarityFile(from, dataset);
        const stale = staleSimilarity(meta, clip, config.modelSeed);
        if (stale) log(`note: ${from}: ${stale}; used as given (--similarity)`);
        return { matrix, from };
      }
      // The official script's file was made with openai CLIP ViT-B/16.
      const official = officialSimilarityFile(dataset.root);
      const candidates: { path: string; clip?: string }[] = [
        { path: join(out, SIMILARITY_FILE) },
        { path: join(dataset.root, SIMILARITY_FILE) },
        ...(official ? [{ path: official, clip: DEFAULT_CLIP }] : []),
      ];
      for (const c of candidates) {
        if (!isFile(c.path)) continue;
        const from = resolve(c.path);
        const { matrix, meta } = await readSimilarityFile(from, dataset);
        const stale = staleSimilarity(c.clip ? { clip: c.clip } : meta, clip, config.modelSeed);
        if (!stale) return { matrix, from };
        log(`${from}: ${stale}; computing the class similarity again`);
      }
      log(
        `no ${SIMILARITY_FILE} made with ${clip} in ${dataset.root} or ${out}: computing the ` +
          `class similarity (run \`dipsy similarity\` once to reuse it)`,
      );
      const matrix = await computeSimilarity(dataset, clip, placement, { seed: config.modelSeed });
      return { matrix, from: `computed with ${clip}` };
    },
    keep: (path, dataset, matrix) => keepSimilarity(path, dataset, matrix, config),
  };
}

/** "red circle: blue square 0.912 (p 0.41), ..." for every class. */
export async function describeSimilarity(
  names: readonly string[],
  matrix: number[][],
  top = 3,
): Promise<string[]> {
  const { negativeProbabilities, DEFAULT_TAU } = await import("../plugins/pairs/mod.ts");
  return names.map((name, k) => {
    if (names.length < 2) return `${name}: (no other class)`;
    const p = negativeProbabilities(matrix, k, DEFAULT_TAU);
    const others = names.map((_, j) => j).filter((j) => j !== k)
      .sort((a, b) => matrix[k][b] - matrix[k][a] || a - b)
      .slice(0, top);
    const list = others.map((j) => `${names[j]} ${matrix[k][j].toFixed(3)} (p ${p[j].toFixed(2)})`);
    return `${name}: ${list.join(", ")}`;
  });
}
