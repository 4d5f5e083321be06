/**
 * The worst confusions of an evaluation and the test images behind them: the misclassified images
 * themselves from the predictions kept beside the eval record, or, for an evaluation that kept
 * none, example images of each class from the test folder the record names.
 */
import { existsSync } from "node:fs";
import { readImageFolder } from "../plugins/classifiers/data.ts";
import type { PredictionLine } from "../app/classify.ts";
import type { Problems } from "./read_run.ts";

export interface Confusion {
  /** Images of class `from` predicted as class `to`. */
  count: number;
  from: number;
  to: number;
}

/** The off-diagonal cells with images, most images first (then by true, predicted class). */
export function topConfusionPairs(confusion: readonly (readonly number[])[], top: number) {
  const pairs: Confusion[] = [];
  confusion.forEach((row, from) =>
    row.forEach((count, to) => {
      if (from !== to && count > 0) pairs.push({ count, from, to });
    })
  );
  pairs.sort((a, b) => b.count - a.count || a.from - b.from || a.to - b.to);
  return pairs.slice(0, top);
}

/** The images of class `label` predicted as `predicted`, in the predictions' order. */
export function misclassifiedAs(
  predictions: readonly PredictionLine[],
  label: string,
  predicted: string,
): PredictionLine[] {
  return predictions.filter((p) => p.label === label && p.predicted === predicted);
}

/**
 * Up to `per` test images of each class in `names`, from the test folder `test`; null, with a
 * problem, when the folder is gone or unreadable.
 */
export async function exampleImages(
  test: string | undefined,
  names: readonly string[],
  opts: { dataset?: string; problems: Problems; per?: number },
): Promise<Map<string, string[]> | null> {
  if (!test) return null;
  if (!existsSync(test)) {
    opts.problems.add(test, "the test folder is gone: confusions are shown without examples");
    return null;
  }
  try {
    const folder = await readImageFolder(test, { dataset: opts.dataset, skipBad: true });
    const wanted = new Set(names);
    const out = new Map<string, string[]>();
    for (const im of folder.images) {
      if (!wanted.has(im.className)) continue;
      const list = out.get(im.className) ?? [];
      if (list.length < (opts.per ?? 4)) list.push(im.path);
      out.set(im.className, list);
    }
    return out;
  } catch (e) {
    opts.problems.add(test, `test images unreadable (${(e as Error).message.split("\n")[0]})`);
    return null;
  }
}
