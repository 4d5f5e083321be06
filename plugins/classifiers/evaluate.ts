/**
 * Evaluation of a trained classifier on a labelled split, with the recipe's test transform
 * (resize, centre crop, normalise) prepared ahead by the image loader: top-1 and top-5 accuracy,
 * per-class accuracy (recall), their mean over the classes that have images (scikit-learn's
 * balanced accuracy) and the confusion matrix (rows: true class, columns: predicted class).
 *
 * Ties are broken as scikit-learn breaks them: the prediction is the first highest score
 * (`argmax`), and in the top-k ranking a tied class with a higher index ranks first
 * (`top_k_accuracy_score`'s reversed stable sort).
 */
import { fromHost, ops, scope } from "../../ffi/mod.ts";
import type { LabeledImage, TrainedClassifier } from "../../core/plugins.ts";
import { batchesOf } from "./data.ts";
import { ImageLoader, type LoaderOptions } from "./loader.ts";

/** One class's accuracy. */
export interface ClassAccuracy {
  /** The class name. */
  class: string;
  /** Its images classified correctly. */
  correct: number;
  /** Its images evaluated. */
  total: number;
  /** correct / total, or null for a class without test images. */
  accuracy: number | null;
}

/** Everything computed from the predictions. */
export interface EvalMetrics {
  /** Fraction of images classified correctly. */
  top1: number;
  /** Fraction whose class is among the `topK` highest scores. */
  top5: number;
  /** The k of `top5`: 5, or the class count when there are fewer classes. */
  topK: number;
  /** Images classified correctly. */
  correct: number;
  /** Images evaluated. */
  total: number;
  /** Accuracy per class, in class order. */
  perClass: ClassAccuracy[];
  /** Mean of the per-class accuracies over classes with images. */
  meanPerClass: number;
  /** confusion[i][j]: images of class i predicted as class j. */
  confusion: number[][];
}

/** The metrics and how long the evaluation took. */
export interface EvalResult extends EvalMetrics {
  /** Wall-clock seconds. */
  seconds: number;
}

/** What the classifier made of one image. */
export interface ImagePrediction {
  /** The true class index. */
  label: number;
  /** The first highest score's class. */
  predicted: number;
  /**
   * The `topK` highest-scoring classes, highest first; equal scores in class order, so the first
   * is `predicted` (the top-k accuracy ranks ties as scikit-learn does, which may differ on ties).
   */
  top: number[];
}

/** Accumulates predictions batch by batch; `result()` gives the metrics. */
export class MetricsAccumulator {
  readonly #k: number;
  readonly #confusion: number[][];
  readonly #topK: number;
  #inTopK = 0;
  readonly #predictions: ImagePrediction[] | null;

  /** With `keep`, each image's prediction is kept too (see `predictions()`). */
  constructor(readonly classNames: readonly string[], topK = 5, keep = false) {
    this.#predictions = keep ? [] : null;
    this.#k = classNames.length;
    if (this.#k < 1) throw new RangeError("MetricsAccumulator: no classes");
    this.#topK = Math.min(topK, this.#k);
    this.#confusion = Array.from({ length: this.#k }, () => new Array<number>(this.#k).fill(0));
  }

  /** Scores [n, K] in row-major order and the n true labels. */
  add(scores: ArrayLike<number>, labels: readonly number[]): void {
    const k = this.#k;
    if (scores.length !== labels.length * k) {
      throw new RangeError(
        `MetricsAccumulator: ${scores.length} scores for ${labels.length} x ${k}`,
      );
    }
    labels.forEach((y, i) => {
      if (!Number.isInteger(y) || y < 0 || y >= k) {
        throw new RangeError(`MetricsAccumulator: label ${y} is not a class index`);
      }
      const row = i * k;
      let best = 0;
      for (let j = 1; j < k; j++) if (scores[row + j] > scores[row + best]) best = j;
      this.#confusion[y][best]++;
      const sy = scores[row + y];
      let above = 0;
      for (let j = 0; j < k; j++) {
        const s = scores[row + j];
        if (s > sy || (s === sy && j > y)) above++;
      }
      if (above < this.#topK) this.#inTopK++;
      if (this.#predictions) {
        const top = Array.from({ length: k }, (_, j) => j)
          .sort((a, b) => scores[row + b] - scores[row + a] || a - b).slice(0, this.#topK);
        this.#predictions.push({ label: y, predicted: best, top });
      }
    });
  }

  /** Each image's prediction, in the order added (empty unless constructed with `keep`). */
  predictions(): ImagePrediction[] {
    return [...(this.#predictions ?? [])];
  }

  result(): EvalMetrics {
    const perClass = this.classNames.map((name, i) => {
      const total = this.#confusion[i].reduce((a, b) => a + b, 0);
      const correct = this.#confusion[i][i];
      return { class: name, correct, total, accuracy: total > 0 ? correct / total : null };
    });
    const total = perClass.reduce((s, c) => s + c.total, 0);
    const correct = perClass.reduce((s, c) => s + c.correct, 0);
    const rated = perClass.filter((c) => c.accuracy !== null);
    return {
      top1: total ? correct / total : 0,
      top5: total ? this.#inTopK / total : 0,
      topK: this.#topK,
      correct,
      total,
      perClass,
      meanPerClass: rated.reduce((s, c) => s + c.accuracy!, 0) / Math.max(1, rated.length),
      confusion: this.#confusion.map((r) => [...r]),
    };
  }
}

/** Images per forward when evaluating, unless told otherwise. */
export const EVAL_BATCH = 64;

export interface EvalOptions {
  batch?: number;
  loader?: LoaderOptions;
  signal?: AbortSignal;
  onProgress?: (done: number, total: number) => void;
  /** Receives each image's prediction, in the order of `images`. */
  predictions?: ImagePrediction[];
}

export async function evaluate(
  classifier: TrainedClassifier,
  images: readonly LabeledImage[],
  opts: EvalOptions = {},
): Promise<EvalResult> {
  const started = performance.now();
  const k = classifier.classNames.length;
  const metrics = new MetricsAccumulator(classifier.classNames, 5, !!opts.predictions);
  const size = classifier.inputSize;
  const batches = batchesOf(images.length, opts.batch ?? EVAL_BATCH);
  using loader = new ImageLoader({ kind: "test", size }, opts.loader);
  let done = 0;
  const jobs = batches.map(([a, b]) => images.slice(a, b).map((im) => ({ path: im.path })));
  for await (const batch of loader.batches(jobs, opts.signal)) {
    const [a] = batches[batch.index];
    const scores = scope(() => {
      const pixels = fromHost(batch.pixels, [batch.count, 3, size, size], "f32");
      return ops.to(classifier.predict(pixels), "f32", "cpu").toFloat64();
    });
    if (scores.length !== batch.count * k) {
      throw new Error(`the classifier gave ${scores.length} scores for ${batch.count} x ${k}`);
    }
    metrics.add(scores, images.slice(a, a + batch.count).map((im) => im.label));
    done += batch.count;
    opts.onProgress?.(done, images.length);
  }
  if (opts.signal?.aborted) throw new Error("evaluation interrupted");
  opts.predictions?.push(...metrics.predictions());
  return { ...metrics.result(), seconds: (performance.now() - started) / 1000 };
}

const pct = (v: number | null) => (v === null ? "      -" : `${(100 * v).toFixed(2).padStart(6)}%`);

/** A fixed-width table: one row per class, then top-1, top-k and the mean per class. */
export function formatEvalTable(result: EvalMetrics): string {
  const width = Math.max(14, ...result.perClass.map((c) => c.class.length));
  const rule = `${"-".repeat(width)}  -------  ------  --------`;
  const row = (label: string, correct: string, total: string, acc: number | null) =>
    `${label.padEnd(width)}  ${correct.padStart(7)}  ${total.padStart(6)}  ${pct(acc)}`;
  const lines = [
    `${"class".padEnd(width)}  ${"correct".padStart(7)}  ${"total".padStart(6)}  accuracy`,
    rule,
    ...result.perClass.map((c) => row(c.class, String(c.correct), String(c.total), c.accuracy)),
    rule,
    row("top-1", String(result.correct), String(result.total), result.top1),
    row(`top-${result.topK}`, "", "", result.top5),
    row("mean per class", "", "", result.meanPerClass),
  ];
  return lines.join("\n");
}

/** The most frequent confusions ("true -> predicted: n"), at most `top`. */
export function topConfusions(result: EvalMetrics, top = 5): string[] {
  const pairs: [number, number, number][] = [];
  result.confusion.forEach((r, i) =>
    r.forEach((n, j) => i !== j && n > 0 && pairs.push([n, i, j]))
  );
  pairs.sort((a, b) => b[0] - a[0] || a[1] - b[1] || a[2] - b[2]);
  const names = result.perClass.map((c) => c.class);
  return pairs.slice(0, top).map(([n, i, j]) => `${names[i]} -> ${names[j]}: ${n}`);
}
