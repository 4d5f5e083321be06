/**
 * `dipsy similarity`: computes the class similarity matrix and saves it as `similarity.json`
 * beside the class folders, where `generate` finds it.
 */
import { DEFAULT_CLIP, type DTypeChoice, TINY } from "../core/config.ts";
import { describeSimilarity, SIMILARITY_FILE } from "../app/similarity.ts";
import { CliError, defineCommand, deviceFlag, type Flags, intFlag, renamed } from "./command.ts";
import { INPUT_FLAGS, PLACEMENT_FLAGS } from "./generate.ts";

/** What `--top` and `--seed` leave out. */
const TOP = 3, SEED = 0;

const FLAGS = {
  ...renamed(INPUT_FLAGS, {}, ["out", "similarity"], {
    dataset: "dataset name: DataDream layout, and a benchmark's class names",
    "skip-bad": "leave unreadable or broken images out instead of stopping",
  }),
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
  top: { value: "K", help: "similar classes to print per class", default: TOP },
  force: { help: "recompute when the file exists (default: print the saved one)" },
  ...renamed(PLACEMENT_FLAGS, {}, ["clip"]),
  seed: { value: "N", help: "seed of the tiny CLIP's random weights", default: SEED },
} as const satisfies Flags;

export const command = defineCommand({
  synopsis: "similarity --data DIR [options]",
  about:
    `Computes the class similarity matrix (cosine of the mean CLIP image embedding of each class's
shots, as the official calculate_similarity_matrix.py computes it) and saves it as
DIR/${SIMILARITY_FILE}, where generate finds it. Prints each class's most similar classes, with
the probability of drawing each as the negative (tau 0.4). A saved file made with another CLIP
than --clip is computed again.`,
  sections: { "options:": FLAGS },
  async run(values) {
    if (!values.data) throw new CliError(`--data is required (see --help)`);
    const top = intFlag(values.top, "--top", 1) ?? TOP;
    const { similarity } = await import("../app/api.ts");
    const clip = values.clip ?? DEFAULT_CLIP;
    const started = performance.now();
    const { file, classNames: names, matrix, computed } = await similarity({
      data: values.data,
      out: values.out,
      clip,
      dataset: values.dataset,
      fewshotSeed: values["fewshot-seed"],
      shots: intFlag(values.shots, "--shots", 1),
      skipBad: values["skip-bad"],
      force: values.force,
      device: deviceFlag(values.device),
      dtype: values.dtype as DTypeChoice | undefined,
      seed: intFlag(values.seed, "--seed") ?? SEED,
      onProgress: ({ done, total }) => {
        if (!Deno.stderr.isTerminal()) return;
        Deno.stderr.writeSync(new TextEncoder().encode(`\rencoding classes ${done}/${total}`));
        if (done === total) Deno.stderr.writeSync(new TextEncoder().encode("\n"));
      },
    });
    if (!computed) {
      console.log(`${file} exists (--force recomputes it); its most similar classes:`);
    } else {
      const secs = ((performance.now() - started) / 1000).toFixed(1);
      console.log(
        `class similarity of ${names.length} classes (${clip}, ${secs} s) saved to ${file}`,
      );
      if (clip === TINY) {
        console.log("(tiny CLIP has random weights: these similarities carry no meaning)");
      }
    }
    for (const line of await describeSimilarity(names, matrix, top)) console.log(`  ${line}`);
    return 0;
  },
});
