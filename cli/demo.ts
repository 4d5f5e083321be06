/**
 * `dipsy demo`: the main job end to end on the embedded tiny models, in seconds on a CPU. It
 * draws a small few-shot set of coloured shapes, computes the class similarity with a tiny CLIP,
 * and generates a few images per class with a tiny SD1.5 + dual IP-Adapter. The tiny models have
 * random weights, so the images are noise; the run exercises everything else for real.
 */
import { existsSync } from "node:fs";
import { join, resolve } from "node:path";
import type { RgbImage } from "../core/image.ts";
import { derive, type Rng } from "../core/rng.ts";
import { UserError } from "../ffi/errors.ts";
import { defineCommand } from "./command.ts";

type Rgb = [number, number, number];

interface ShapeClass {
  name: string;
  color: Rgb;
  /** Whether pixel (x, y) of a w x h image belongs to the shape, given random parameters. */
  inside: (x: number, y: number, p: { cx: number; cy: number; r: number; a: number }) => boolean;
}

const CLASSES: ShapeClass[] = [
  {
    name: "red circle",
    color: [220, 40, 40],
    inside: (x, y, p) => (x - p.cx) ** 2 + (y - p.cy) ** 2 <= p.r ** 2,
  },
  {
    name: "blue square",
    color: [40, 70, 220],
    inside: (x, y, p) => Math.abs(x - p.cx) <= p.r * 0.85 && Math.abs(y - p.cy) <= p.r * 0.85,
  },
  {
    name: "green triangle",
    color: [40, 170, 60],
    inside: (x, y, p) => {
      const top = p.cy - p.r, bottom = p.cy + p.r * 0.8;
      if (y < top || y > bottom) return false;
      const half = ((y - top) / (bottom - top)) * p.r;
      return Math.abs(x - p.cx) <= half;
    },
  },
  {
    name: "yellow stripes",
    color: [235, 205, 30],
    inside: (x, y, p) => {
      const t = x * Math.cos(p.a) + y * Math.sin(p.a);
      return ((t % 10) + 10) % 10 < 5;
    },
  },
];

/** One shot: a random-sized canvas (48-64 px a side), a tinted background and the shape. */
export function drawShot(cls: ShapeClass, rng: Rng): RgbImage {
  const width = 48 + rng.int(17), height = 48 + rng.int(17);
  const bg: Rgb = [170 + rng.int(70), 170 + rng.int(70), 170 + rng.int(70)];
  const p = {
    cx: width * rng.range(0.35, 0.65),
    cy: height * rng.range(0.35, 0.65),
    r: Math.min(width, height) * rng.range(0.2, 0.32),
    a: rng.range(0, Math.PI),
  };
  const data = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const c = cls.inside(x + 0.5, y + 0.5, p) ? cls.color : bg;
      for (let k = 0; k < 3; k++) {
        data[(y * width + x) * 3 + k] = Math.max(0, Math.min(255, c[k] + rng.int(21) - 10));
      }
    }
  }
  return { width, height, data };
}

/** Draws `shots` images per class into `dir/<class>/<n>.png` (files already there are kept). */
export async function drawDataset(dir: string, shots: number, seed = 0): Promise<number> {
  const { writeImage } = await import("../core/image.ts");
  let written = 0;
  for (const [k, cls] of CLASSES.entries()) {
    const folder = join(dir, cls.name);
    await Deno.mkdir(folder, { recursive: true });
    for (let i = 0; i < shots; i++) {
      const path = join(folder, `${i}.png`);
      if (existsSync(path)) continue;
      await writeImage(path, drawShot(cls, derive(seed, "demo", k, i)));
      written++;
    }
  }
  return written;
}

/** The demo's defaults: small enough to finish in seconds on a CPU. */
const DEMO = { out: "out/demo", perClass: 2, steps: 4, epochs: 10 };

export const command = defineCommand({
  synopsis: "demo [--out DIR] [--per-class N] [--steps N] [--epochs N]",
  about:
    `Runs the main job end to end on the embedded tiny models: draws a few-shot set of 4 shape classes
(4 shots each) into DIR/data, computes the class similarity (tiny CLIP), generates N images
per class (tiny SD1.5 with dual IP-Adapter guidance) into DIR/images, trains the classifier
(tiny CLIP + LoRA) on both into DIR/classifier and evaluates it on DIR/test. The tiny models
have random weights: the generated images are noise.`,
  sections: {
    "options:": {
      out: { value: "DIR", help: "the demo's folder", default: DEMO.out },
      "per-class": { value: "N", help: "generated images per class", default: DEMO.perClass },
      steps: { value: "N", help: "denoising steps", default: DEMO.steps },
      epochs: { value: "N", help: "classifier training epochs", default: DEMO.epochs },
    },
  },
  async run(values) {
    // The tiny models are too small to gain from threads, and idle OpenMP threads busy-waiting
    // make them many times slower on a machine whose cores are shared.
    const { setNumThreads } = await import("../ffi/mod.ts");
    setNumThreads(1);
    const root = resolve(values.out ?? DEMO.out);
    const data = join(root, "data"), images = join(root, "images");
    const started = performance.now();

    const drawn = await drawDataset(data, 4);
    console.log(
      `few-shot data: ${CLASSES.length} classes x 4 shots in ${data}` +
        (drawn ? "" : " (already drawn)"),
    );

    const { validateDataset } = await import("../core/dataset.ts");
    const { resolvePlacement } = await import("../app/models.ts");
    const { computeSimilarity, describeSimilarity, saveSimilarityFile, SIMILARITY_FILE } =
      await import("../app/similarity.ts");
    const { runGenerate } = await import("./generate.ts");
    const { loadDefaultPlugins } = await import("../app/plugins.ts");
    const cfg = await import("../core/config.ts");

    await loadDefaultPlugins();
    const config = cfg.resolveConfig([
      cfg.parseConfigObject(
        {
          data,
          out: images,
          model: "tiny",
          clip: "tiny",
          perClass: values["per-class"] ?? String(DEMO.perClass),
          steps: values.steps ?? String(DEMO.steps),
          width: "32",
          height: "32",
          batch: "4",
          seed: "0",
        },
        "demo",
        { textual: true, labels: { perClass: "--per-class", steps: "--steps" } },
      ),
    ]);

    const dataset = await validateDataset(data, { negatives: true });
    const placement = await resolvePlacement(config);
    const simPath = join(dataset.root, SIMILARITY_FILE);
    const names = dataset.classes.map((c) => c.name);
    const matrix = await computeSimilarity(dataset, "tiny", placement);
    await saveSimilarityFile(simPath, names, matrix, { clip: "tiny", data: dataset.root });
    console.log(
      `class similarity saved to ${simPath}; most similar classes (tiny CLIP has random ` +
        "weights, so they are all alike):",
    );
    for (const line of await describeSimilarity(names, matrix)) console.log(`  ${line}`);

    const controller = new AbortController();
    const onSigint = () => controller.abort();
    Deno.addSignalListener("SIGINT", onSigint);
    let accuracy: number | null;
    try {
      const code = await runGenerate(config, { signal: controller.signal });
      if (code !== 0) return code;
      accuracy = await trainAndEvaluate(root, data, images, values.epochs, controller.signal);
    } catch (e) {
      if (!(e instanceof UserError)) throw e;
      console.error(`dipsy demo: ${(e as Error).message}`);
      console.error(`(an earlier demo with other options used ${root}: delete it or use --out)`);
      return 1;
    } finally {
      Deno.removeSignalListener("SIGINT", onSigint);
    }
    if (accuracy === null) return 130;

    const { writeReport } = await import("../report/mod.ts");
    const report = await writeReport(root);
    for (const problem of report.problems) console.error(`report: ${problem}`);

    const secs = ((performance.now() - started) / 1000).toFixed(1);
    console.log(`
demo finished in ${secs} s.
  images:     ${images}/<class>/<index>.jpg
  manifest:   ${images}/manifest.jsonl (one line per image: seed, references, augmentation, ...)
  classifier: ${join(root, "classifier")} (train.json, per-epoch checkpoints, adapter/ for peft)
  accuracy:   ${(100 * accuracy).toFixed(1)}% top-1 on ${join(root, "test")} (chance: 25%)
  report:     ${report.html} (figures and contact sheets; open it in a browser)

The tiny models have random weights, so the generated images are noise. The demo checks the
pipeline (similarity, pair sampling, dual IP-Adapter guidance, resumable output, the classifier
recipe with its augmentations, checkpoints and evaluation), not image quality; the tiny
classifier learns the shapes' colours from the real shots.

For real images, use Stable Diffusion 1.5 with IP-Adapter Plus (the defaults; the first run
downloads about 7 GB into the Hugging Face cache, or use local folders with --model,
--ip-adapter and --image-encoder). A CUDA GPU is strongly recommended:
  deno task dipsy similarity --data ${data}
  deno task dipsy generate --data ${data} --out ${join(root, "real")} --per-class 200
  deno task dipsy train --real ${data} --synthetic ${join(root, "real")} --out ${
      join(root, "clip-lora")
    }
or all stages at once: deno task dipsy run --data DIR --test DIR --out DIR`);
    return 0;
  },
});

/**
 * The classifier stages on the tiny CLIP: trained on the shots and the generated images, then
 * evaluated on shapes drawn with another seed. Returns top-1, or null when interrupted.
 */
async function trainAndEvaluate(
  root: string,
  data: string,
  images: string,
  epochs: string | undefined,
  signal: AbortSignal,
): Promise<number | null> {
  const test = join(root, "test");
  await drawDataset(test, 8, 1);
  const app = await import("../app/classify.ts");
  const trainData = await app.readTrainData({ real: data, synthetic: images });
  const classifier = await app.makeClassifier("clip-lora", {
    clip: "tiny",
    epochs: epochs ?? DEMO.epochs,
    warmupEpochs: 1,
    batch: 16,
    // Two generated images per class would make DataDream's repeat count 1: too few steps for
    // the tiny model to learn through the recipe's strong augmentations.
    repeatReal: 16,
    // A tiny random model learns in a few dozen steps only with a far larger rate than 1e-4.
    lr: 3e-2,
    minLr: 1e-5,
    rank: 8,
    alpha: 16,
  });
  const out = join(root, "classifier");
  console.log(`\nclassifier: tiny CLIP + LoRA, DataDream's recipe, into ${out}`);
  const trained = await app.trainStage(classifier, trainData, { out, device: "cpu", signal });
  if (!trained.complete) return null;
  const result = await app.evalStage({ model: out, test, signal });
  const { formatEvalTable } = await import("../plugins/classifiers/evaluate.ts");
  console.log(formatEvalTable(result));
  return result.top1;
}
