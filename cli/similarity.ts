/**
 * `dipsy similarity`: computes the class similarity matrix and saves it as `similarity.json`
 * beside the class folders, where `generate` finds it.
 */
import { dirname, join, resolve } from "node:path";
import { DEFAULT_CLIP, DEFAULTS, type RunConfig, TINY } from "../core/config.ts";
import type { Dataset } from "../core/dataset.ts";
import {
  computeSimilarity,
  describeSimilarity,
  isFile,
  readSimilarityFile,
  saveSimilarityFile,
  SIMILARITY_FILE,
  similarityMeta,
  staleSimilarity,
} from "../app/similarity.ts";
import { CliError, defineCommand, type Flags, type FlagValues } from "./command.ts";
import { shotsFlag } from "./train_flags.ts";

/** What `--top` and `--seed` leave out. */
const TOP = 3, SEED = 0;

const FLAGS = {
  data: { value: "DIR", help: "few-shot images: DIR/<class>/*.jpg, or the DataDream layout" },
  out: {
    value: "PATH",
    help: "where to save: a .json file, a .npz file (the official script's format: " +
      "similarity_matrix, class_names = folder names) or a folder (default: " +
      `DIR/${SIMILARITY_FILE} in the class root)`,
  },
  clip: {
    value: "REF",
    help: 'CLIP folder or Hub id, or "tiny" (random weights)',
    default: DEFAULT_CLIP,
  },
  dataset: {
    value: "NAME",
    help: "dataset name: DataDream layout, and a benchmark's class names",
  },
  "fewshot-seed": {
    value: "S",
    help: "DataDream few-shot split (seed0, ...) when there are several",
  },
  shots: {
    value: "K",
    help: "the first K shots of each class (by their rank from `dipsy fewshot`)",
  },
  "skip-bad": { help: "leave unreadable or broken images out instead of stopping" },
  top: { value: "K", help: "similar classes to print per class", default: TOP },
  force: { help: "recompute when the file exists (default: print the saved one)" },
  device: { value: "D", help: "auto, cpu, cuda, cuda:N", default: DEFAULTS.device },
  dtype: { value: "T", help: "auto, f32, f16, bf16", default: DEFAULTS.dtype },
  seed: { value: "N", help: "seed of the tiny CLIP's random weights", default: SEED },
} as const satisfies Flags;

export const command = defineCommand({
  summary: "compute and save the class similarity matrix",
  synopsis: "similarity --data DIR [options]",
  about:
    `Computes the class similarity matrix (cosine of the mean CLIP image embedding of each class's
shots, as the official calculate_similarity_matrix.py computes it) and saves it as
DIR/${SIMILARITY_FILE}, where generate finds it. Prints each class's most similar classes, with
the probability of drawing each as the negative (tau 0.4). A saved file made with another CLIP
than --clip is computed again.`,
  sections: { "options:": FLAGS },
  run: (values) => similarityCommand(values),
});

async function similarityCommand(values: FlagValues<typeof FLAGS>): Promise<number> {
  if (!values.data) throw new CliError(`--data is required (see --help)`);
  const top = Number(values.top ?? TOP);
  if (!Number.isInteger(top) || top < 1) throw new CliError("--top must be a positive integer");
  const seed = Number(values.seed ?? SEED);
  if (!Number.isSafeInteger(seed) || seed < 0) {
    throw new CliError(`--seed must be a non-negative integer, got "${values.seed}"`);
  }
  const shots = shotsFlag(values.shots);

  const { validateDataset } = await import("../core/dataset.ts");
  const { parseConfigObject } = await import("../core/config.ts");
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
    shots,
    skipBad: values["skip-bad"] ?? false,
    negatives: false,
  });
  for (const p of dataset.problems) console.error(`${p.severity}: ${p.path}: ${p.message}`);

  let path = values.out ? resolve(values.out) : join(dataset.root, SIMILARITY_FILE);
  if (values.out && !/\.(json|npz)$/i.test(path)) path = join(path, SIMILARITY_FILE);
  const names = dataset.classes.map((c) => c.name);
  const clip = values.clip ?? DEFAULT_CLIP;
  let matrix: number[][] | null = null;
  if (isFile(path) && !values.force) {
    const saved = await readSimilarityFile(path, dataset);
    const stale = staleSimilarity(saved.meta, clip, seed);
    if (stale) {
      console.error(`${path}: ${stale}; computing it again`);
    } else {
      matrix = saved.matrix;
      console.log(`${path} exists (--force recomputes it); its most similar classes:`);
    }
  }
  if (!matrix) {
    const { resolvePlacement } = await import("../app/models.ts");
    const placement = await resolvePlacement(config);
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
    const meta = similarityMeta(clip, { seed, data: dataset.root });
    const folders = dataset.classes.map((c) => c.folder);
    await saveSimilarityFile(path, names, matrix, meta, { folders });
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
