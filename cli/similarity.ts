/**
 * `dipsy similarity`: the class similarity matrix the default pair sampler draws negatives from
 * (mean CLIP ViT-B/16 image embedding per class, cosine between classes), saved as
 * `similarity.json` beside the class folders, where `generate` finds it. Also the similarity
 * source `generate` uses: a given file, the run's own copy, the data's, or computed on the spot.
 */
import { existsSync, statSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { parseArgs } from "node:util";
import type { Tensor } from "../ffi/mod.ts";
import type { Dataset } from "../core/dataset.ts";
import type { SimilaritySource } from "../core/generate.ts";
import { RunError, SIMILARITY_FILE } from "../core/output.ts";
import { DEFAULT_CLIP, type RunConfig, similarityClip, TINY } from "../core/config.ts";
import { CliError, type Command } from "./command.ts";
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

function isFile(p: string): boolean {
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

const USAGE = `usage: deno task dipsy similarity --data DIR [options]

Computes the class similarity matrix (cosine of the mean CLIP image embedding of each class's
shots) and saves it as DIR/${SIMILARITY_FILE}, where generate finds it. Prints each class's most
similar classes, with the probability of drawing each as the negative (tau 0.4).

options:
  --data DIR           few-shot images: DIR/<class>/*.jpg, or the DataDream layout
  --out PATH           where to save (a .json file or a folder; default: the class root)
  --clip REF           CLIP folder or Hub id (default ${DEFAULT_CLIP}); "tiny": random weights
  --dataset NAME       dataset name (DataDream layout with several datasets)
  --fewshot-seed S     DataDream few-shot split (seed0, ...) when there are several
  --skip-bad           leave unreadable or broken images out instead of stopping
  --top K              similar classes to print per class (default 3)
  --force              recompute when the file exists (default: print the saved one)
  --device D           auto, cpu, cuda, cuda:N (default auto)
  --dtype T            auto, f32, f16, bf16 (default auto)
  --seed N             seed of the tiny CLIP's random weights (default 0)`;

export const command: Command = {
  summary: "compute and save the class similarity matrix",
  async run(args) {
    let values;
    try {
      ({ values } = parseArgs({
        args,
        options: {
          help: { type: "boolean", short: "h" },
          data: { type: "string" },
          out: { type: "string" },
          clip: { type: "string" },
          dataset: { type: "string" },
          "fewshot-seed": { type: "string" },
          "skip-bad": { type: "boolean" },
          top: { type: "string" },
          force: { type: "boolean" },
          device: { type: "string" },
          dtype: { type: "string" },
          seed: { type: "string" },
        },
      }));
    } catch (e) {
      throw new CliError(`${e instanceof Error ? e.message : e}\n\n${USAGE}`);
    }
    if (values.help) {
      console.log(USAGE);
      return 0;
    }
    try {
      return await similarityCommand(values);
    } catch (e) {
      const { isUserError } = await import("./models.ts");
      if (!(e instanceof CliError) && await isUserError(e)) {
        console.error(`dipsy similarity: ${(e as Error).message}`);
        return 1;
      }
      throw e;
    }
  },
};

interface SimilarityFlags {
  data?: string;
  out?: string;
  clip?: string;
  dataset?: string;
  "fewshot-seed"?: string;
  "skip-bad"?: boolean;
  top?: string;
  force?: boolean;
  device?: string;
  dtype?: string;
  seed?: string;
}

async function similarityCommand(values: SimilarityFlags): Promise<number> {
  if (!values.data) throw new CliError(`--data is required\n\n${USAGE}`);
  const top = Number(values.top ?? 3);
  if (!Number.isInteger(top) || top < 1) throw new CliError("--top must be a positive integer");
  const seed = Number(values.seed ?? 0);
  if (!Number.isSafeInteger(seed)) throw new CliError("--seed must be an integer");

  const { validateDataset } = await import("../core/dataset.ts");
  const { DEFAULTS, parseConfigObject } = await import("../core/config.ts");
  const layer = parseConfigObject(
    { device: values.device ?? DEFAULTS.device, dtype: values.dtype ?? DEFAULTS.dtype },
    "command line",
    { textual: true },
  );
  const config: RunConfig = { ...DEFAULTS, ...layer.values };
  if (!/^(auto|cpu|cuda(:\d+)?)$/.test(config.device)) {
    throw new CliError(`--device must be auto, cpu, cuda or cuda:N, got "${config.device}"`);
  }
  const dataset: Dataset = await validateDataset(values.data, {
    dataset: values.dataset,
    fewshotSeed: values["fewshot-seed"],
    skipBad: values["skip-bad"] ?? false,
    negatives: false,
  });
  for (const p of dataset.problems) console.error(`${p.severity}: ${p.path}: ${p.message}`);

  let path = values.out ? resolve(values.out) : join(dataset.root, SIMILARITY_FILE);
  if (values.out && !/\.json$/i.test(path)) path = join(path, SIMILARITY_FILE);
  const names = dataset.classes.map((c) => c.name);
  let matrix: number[][];
  if (isFile(path) && !values.force) {
    const { loadSimilarity } = await import("../plugins/pairs/mod.ts");
    matrix = (await loadSimilarity(path, names)).similarity;
    console.log(`${path} exists (--force recomputes it); its most similar classes:`);
  } else {
    const { resolvePlacement } = await import("./models.ts");
    const placement = await resolvePlacement(config);
    const clip = values.clip ?? DEFAULT_CLIP;
    const started = performance.now();
    matrix = await computeSimilarity(dataset, clip, placement, {
      seed,
      onClass: (done, total) => {
        if (Deno.stderr.isTerminal()) {
          Deno.stderr.writeSync(new TextEncoder().encode(`\rencoding classes ${done}/${total}`));
          if (done === total) Deno.stderr.writeSync(new TextEncoder().encode("\n"));
        }
      },
    });
    await Deno.mkdir(dirname(path), { recursive: true });
    await saveSimilarityFile(path, names, matrix, { clip, data: dataset.root });
    const secs = ((performance.now() - started) / 1000).toFixed(1);
    console.log(
      `class similarity of ${names.length} classes (${clip}, ${secs} s) saved to ${path}`,
    );
    if (clip === TINY) {
      console.log("(tiny CLIP has random weights: these similarities carry no meaning)");
    }
  }
  for (const line of await describeSimilarity(names, matrix, top)) console.log(`  ${line}`);
  return 0;
}
