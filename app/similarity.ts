/**
 * The class similarity matrix the default pair sampler draws negatives from (mean CLIP ViT-B/16
 * image embedding per class, cosine between classes), and the similarity source `generate`
 * uses: a given file, the run's own copy, the data's, or computed on the spot. Shared by the
 * CLI and the HTTP endpoint.
 */
import { existsSync, statSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import type { Tensor } from "../ffi/mod.ts";
import type { Dataset } from "../core/dataset.ts";
import type { SimilaritySource } from "../core/generate.ts";
import { RunError, SIMILARITY_FILE } from "../core/output.ts";
import { type RunConfig, similarityClip, TINY } from "../core/config.ts";
import type { Placement } from "./models.ts";

export { SIMILARITY_FILE };

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
  const { resolveFolderRef } = await import("./models.ts");

  const source = clipRef === TINY ? TINY : await resolveFolderRef(clipRef, [
    "config.json",
    "model.safetensors",
  ]);
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
            const px = ops.to(clipPreprocess(images, { size }), placement.dtype, placement.device);
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

/** Writes the file through a temporary name, so readers never see half of it. */
export async function saveSimilarityFile(
  path: string,
  classNames: readonly string[],
  matrix: number[][],
  meta: Record<string, unknown>,
): Promise<void> {
  const { saveSimilarity } = await import("../plugins/pairs/mod.ts");
  const tmp = join(dirname(path), `.${basename(path)}.${crypto.randomUUID().slice(0, 8)}.tmp`);
  try {
    await saveSimilarity(tmp, { classNames: [...classNames], similarity: matrix, meta });
    await Deno.rename(tmp, path);
  } catch (e) {
    await Deno.remove(tmp).catch(() => {});
    throw e;
  }
}

export function isFile(p: string): boolean {
  return existsSync(p) && statSync(p).isFile();
}

/**
 * Where `generate` gets the matrix: `--similarity FILE`; else the output folder's copy (the one
 * a resumed run used); else `similarity.json` in the data's class root; else computed now.
 * A copy always goes into the output folder, so a run folder is self-contained.
 */
export function similaritySource(
  config: RunConfig,
  placement: Placement,
  log: (message: string) => void = (m) => console.error(m),
): SimilaritySource {
  return {
    async get(dataset, out) {
      const { loadSimilarity } = await import("../plugins/pairs/mod.ts");
      const names = dataset.classes.map((c) => c.name);
      const candidates = config.similarity
        ? [config.similarity]
        : [join(out, SIMILARITY_FILE), join(dataset.root, SIMILARITY_FILE)].filter(isFile);
      if (candidates.length) {
        const from = resolve(candidates[0]);
        try {
          const m = await loadSimilarity(from, names);
          return { matrix: m.similarity, from };
        } catch (e) {
          throw new RunError(e instanceof Error ? e.message : String(e), { cause: e });
        }
      }
      const clip = similarityClip(config);
      log(
        `no ${SIMILARITY_FILE} in ${dataset.root} or ${out}: computing the class similarity ` +
          `with ${clip} (run \`dipsy similarity\` once to reuse it)`,
      );
      const matrix = await computeSimilarity(dataset, clip, placement, { seed: config.modelSeed });
      return { matrix, from: `computed with ${clip}` };
    },
    async keep(path, dataset, matrix) {
      await saveSimilarityFile(path, dataset.classes.map((c) => c.name), matrix, {
        clip: similarityClip(config),
        data: dataset.root,
      });
    },
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
