/**
 * Top-1 accuracy of a trained classifier on a test split, overall and per class, with the
 * recipe's test transform (resize, centre crop, normalise) prepared ahead by the image loader.
 */
import { fromHost, ops, scope } from "../../ffi/mod.ts";
import type { LabeledImage, TrainedClassifier } from "../../core/plugins.ts";
import { batchesOf } from "./data.ts";
import { ImageLoader, type LoaderOptions } from "./loader.ts";

export interface ClassAccuracy {
  class: string;
  correct: number;
  total: number;
  /** correct / total, or null for a class without test images. */
  accuracy: number | null;
}

export interface EvalResult {
  /** Fraction of test images classified correctly. */
  top1: number;
  correct: number;
  total: number;
  perClass: ClassAccuracy[];
  /** Mean of the per-class accuracies over classes with test images. */
  meanPerClass: number;
  seconds: number;
}

export interface EvalOptions {
  batch?: number;
  loader?: LoaderOptions;
  signal?: AbortSignal;
  onProgress?: (done: number, total: number) => void;
}

export async function evaluate(
  classifier: TrainedClassifier,
  images: readonly LabeledImage[],
  opts: EvalOptions = {},
): Promise<EvalResult> {
  const started = performance.now();
  const k = classifier.classNames.length;
  const correct = new Array<number>(k).fill(0), total = new Array<number>(k).fill(0);
  const size = classifier.inputSize;
  const batches = batchesOf(images.length, opts.batch ?? 64);
  using loader = new ImageLoader({ kind: "test", size }, opts.loader);
  let done = 0;
  const jobs = batches.map(([a, b]) => images.slice(a, b).map((im) => ({ path: im.path })));
  for await (const batch of loader.batches(jobs, opts.signal)) {
    const [a] = batches[batch.index];
    const predicted = scope(() => {
      const pixels = fromHost(batch.pixels, [batch.count, 3, size, size], "f32");
      const logits = classifier.predict(pixels);
      return Array.from(ops.argmax(logits, -1, false).toFloat64());
    });
    predicted.forEach((p, i) => {
      const y = images[a + i].label;
      total[y]++;
      if (p === y) correct[y]++;
    });
    done += batch.count;
    opts.onProgress?.(done, images.length);
  }
  if (opts.signal?.aborted) throw new Error("evaluation interrupted");
  const perClass = classifier.classNames.map((name, i) => ({
    class: name,
    correct: correct[i],
    total: total[i],
    accuracy: total[i] > 0 ? correct[i] / total[i] : null,
  }));
  const rated = perClass.filter((c) => c.accuracy !== null);
  const sumCorrect = correct.reduce((x, y) => x + y, 0);
  return {
    top1: images.length ? sumCorrect / images.length : 0,
    correct: sumCorrect,
    total: images.length,
    perClass,
    meanPerClass: rated.reduce((s, c) => s + c.accuracy!, 0) / Math.max(1, rated.length),
    seconds: (performance.now() - started) / 1000,
  };
}

/** A fixed-width table: overall top-1, then one row per class. */
export function formatEvalTable(result: EvalResult): string {
  const width = Math.max(5, ...result.perClass.map((c) => c.class.length));
  const pct = (v: number | null) => (v === null ? "    -" : `${(100 * v).toFixed(2).padStart(6)}%`);
  const lines = [
    `${"class".padEnd(width)}  ${"correct".padStart(7)}  ${"total".padStart(6)}  accuracy`,
    `${"-".repeat(width)}  -------  ------  --------`,
    ...result.perClass.map((c) =>
      `${c.class.padEnd(width)}  ${String(c.correct).padStart(7)}  ${
        String(c.total).padStart(6)
      }  ${pct(c.accuracy)}`
    ),
    `${"-".repeat(width)}  -------  ------  --------`,
    `${"top-1".padEnd(width)}  ${String(result.correct).padStart(7)}  ${
      String(result.total).padStart(6)
    }  ${pct(result.top1)}`,
    `${"mean per class".padEnd(width)}  ${"".padStart(7)}  ${"".padStart(6)}  ${
      pct(result.meanPerClass)
    }`,
  ];
  return lines.join("\n");
}
