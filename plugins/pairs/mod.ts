/**
 * Pair samplers: for image `index` of target class `classIndex`, the positive reference (a shot
 * of the target class), the negative reference (a shot of another class, or none) and their
 * augmentation parameters (DIPSY section 3.3; spec section 6).
 *
 * - `class-similarity` (default): negative class ~ P(.|target) from CLIP class similarity.
 * - `uniform`: negative class uniform over the other classes (ablation).
 * - `none`: no negative (single IP-Adapter ablation).
 *
 * Each decision draws from its own stream, derived from the run seed and (decision, class, index):
 * choices do not depend on the order images are made in, and the positive reference and its
 * augmentation are the same under every plugin, so ablations differ only where they should.
 */
import type {
  PairChoice,
  PairContext,
  PluginDef,
  SamplerPair,
  ShotRef,
} from "../../core/plugins.ts";
import { derive } from "../../core/rng.ts";
import * as s from "../../core/schema.ts";
import { augmentParams } from "./augment.ts";
import { DEFAULT_TAU, negativeProbabilities } from "./similarity.ts";

export { augmentParams } from "./augment.ts";
export {
  classSimilarity,
  DEFAULT_TAU,
  loadSimilarity,
  negativeProbabilities,
  saveSimilarity,
} from "./similarity.ts";

/** Resolved options (`tau` is read by class-similarity only). */
type PairsOptions = Required<s.Infer<typeof SIMILARITY_OPTIONS>>;

/** Stream labels; part of the reproducibility contract, so never rename them. */
const STREAMS = {
  positive: "pairs/positive",
  negativeClass: "pairs/negative-class",
  negativeShot: "pairs/negative-shot",
  positiveAugment: "augment/positive",
  negativeAugment: "augment/negative",
} as const;

type NegativeClass = (context: PairContext, classIndex: number, index: number) => number;

function checkContext(context: PairContext, classIndex: number, index: number): void {
  const k = context.classNames.length;
  if (context.shotCounts.length !== k || context.shotSizes.length !== k) {
    throw new RangeError(
      `pair context: ${k} class names, ${context.shotCounts.length} shot counts and ` +
        `${context.shotSizes.length} size lists must agree`,
    );
  }
  if (!Number.isInteger(classIndex) || classIndex < 0 || classIndex >= k) {
    throw new RangeError(`class index ${classIndex} is not in [0, ${k})`);
  }
  if (!Number.isSafeInteger(index) || index < 0) {
    throw new RangeError(`image index must be a non-negative integer, got ${index}`);
  }
  if (!Number.isSafeInteger(context.seed)) {
    throw new RangeError(`the run seed must be a safe integer, got ${context.seed}`);
  }
}

function pickShot(
  context: PairContext,
  classIndex: number,
  stream: string,
  index: number,
  target: number,
): ShotRef {
  const count = context.shotCounts[classIndex];
  if (!Number.isInteger(count) || count < 1) {
    throw new RangeError(`class ${classIndex} ("${context.classNames[classIndex]}") has no shots`);
  }
  if (context.shotSizes[classIndex].length !== count) {
    throw new RangeError(
      `class ${classIndex}: ${count} shots but ${context.shotSizes[classIndex].length} sizes`,
    );
  }
  // The stream is named by the target class, so the negative shot too is fixed by (target, index).
  const shotIndex = derive(context.seed, stream, target, index).int(count);
  return { classIndex, shotIndex };
}

function createPairSampler(
  name: string,
  augment: boolean,
  needsSimilarity: boolean,
  negativeClass: NegativeClass | null,
): SamplerPair {
  return {
    kind: "pairs",
    name,
    needsSimilarity,
    choose(context: PairContext, classIndex: number, index: number): PairChoice {
      checkContext(context, classIndex, index);
      const positive = pickShot(context, classIndex, STREAMS.positive, index, classIndex);
      const augmented = (shot: ShotRef, stream: string) => {
        if (!augment) return null;
        const [width, height] = context.shotSizes[shot.classIndex][shot.shotIndex];
        return augmentParams(derive(context.seed, stream, classIndex, index), width, height);
      };
      const j = negativeClass?.(context, classIndex, index);
      const negative = j === undefined
        ? null
        : pickShot(context, j, STREAMS.negativeShot, index, classIndex);
      const positiveAugment = augmented(positive, STREAMS.positiveAugment);
      const negativeAugment = negative && augmented(negative, STREAMS.negativeAugment);
      return { classIndex, index, positive, positiveAugment, negative, negativeAugment };
    },
  };
}

function needTwoClasses(context: PairContext): number {
  const k = context.classNames.length;
  if (k < 2) {
    throw new RangeError(
      `a negative reference needs at least two classes, got ${k} (use the "none" pairs plugin)`,
    );
  }
  return k;
}

/** P(.|k) rows, computed once per similarity matrix and class. */
const probabilityCache = new WeakMap<object, Map<string, number[]>>();

function probabilities(context: PairContext, classIndex: number, tau: number): number[] {
  const s = context.similarity;
  const k = context.classNames.length;
  if (!s) {
    throw new Error("needs the class similarity matrix (PairContext.similarity), which is missing");
  }
  if (s.length !== k) {
    throw new RangeError(`the similarity matrix has ${s.length} rows for ${k} classes`);
  }
  let rows = probabilityCache.get(s);
  if (!rows) probabilityCache.set(s, rows = new Map());
  const key = `${classIndex}:${tau}`;
  let p = rows.get(key);
  if (!p) rows.set(key, p = negativeProbabilities(s, classIndex, tau));
  return p;
}

const augment = s.boolean({
  default: true,
  description: "flip, random square crop, rotation in +-20 degrees and centre crop of both " +
    "reference images",
});
const tau = s.number({
  min: 0,
  exclusiveMin: true,
  default: DEFAULT_TAU,
  description: "softmax temperature over class similarities",
});
const SIMILARITY_OPTIONS = s.options({ augment, tau });

export const PAIRS_PLUGINS: PluginDef<SamplerPair, PairsOptions>[] = [
  {
    kind: "pairs",
    name: "class-similarity",
    description: "negative class drawn by CLIP class similarity, softmax(S / tau) without the " +
      "target (DIPSY default)",
    schema: SIMILARITY_OPTIONS,
    create: (o) =>
      createPairSampler("class-similarity", o.augment, true, (context, classIndex, index) => {
        needTwoClasses(context);
        const p = probabilities(context, classIndex, o.tau);
        return derive(context.seed, STREAMS.negativeClass, classIndex, index).choice(p);
      }),
  },
  {
    kind: "pairs",
    name: "uniform",
    description: "negative class uniform over the other classes (ablation)",
    schema: s.options({ augment }),
    create: (o) =>
      createPairSampler("uniform", o.augment, false, (context, classIndex, index) => {
        const k = needTwoClasses(context);
        const j = derive(context.seed, STREAMS.negativeClass, classIndex, index).int(k - 1);
        return j >= classIndex ? j + 1 : j;
      }),
  },
  {
    kind: "pairs",
    name: "none",
    description: "no negative reference (single IP-Adapter ablation)",
    schema: s.options({ augment }),
    create: (o) => createPairSampler("none", o.augment, false, null),
  },
];
