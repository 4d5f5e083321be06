/**
 * A custom SamplerPair plugin: the negative reference always comes from the class most similar
 * to the target (the "hardest" negative), instead of being drawn by similarity as DIPSY does.
 * The positive and negative shots and their augmentation are drawn at random, each from its own
 * stream derived from the run seed and (class, index), so a run is reproducible, resumable and
 * shardable, and any image can be regenerated alone.
 *
 * Load it with `--plugin docs/examples/my_pairs.ts --pairs hardest-negative`.
 */
import type {
  AugmentParams,
  PairChoice,
  PairContext,
  PluginDef,
  SamplerPair,
  ShotRef,
} from "../../core/plugins.ts";
import { derive } from "../../core/rng.ts";
import * as s from "../../core/schema.ts";
import { augmentParams } from "../../plugins/pairs/mod.ts";

export interface HardestNegativeOptions {
  augment: boolean;
}

/** The other class with the highest similarity to `k` (the lowest index on ties). */
function mostSimilar(similarity: readonly (readonly number[])[], k: number): number {
  let best = -1;
  for (let j = 0; j < similarity.length; j++) {
    if (j !== k && (best < 0 || similarity[k][j] > similarity[k][best])) best = j;
  }
  if (best < 0) throw new Error("a negative reference needs at least two classes");
  return best;
}

export const hardestNegative: PluginDef<SamplerPair, HardestNegativeOptions> = {
  kind: "pairs",
  name: "hardest-negative",
  description: "negative from the most similar other class; shots and augmentation at random",
  schema: s.options({
    augment: s.boolean({ default: true, description: "augment both reference images" }),
  }),
  create({ augment }) {
    return {
      kind: "pairs",
      name: "hardest-negative",
      needsSimilarity: true,
      choose(context: PairContext, classIndex: number, index: number): PairChoice {
        // One stream per decision, named by what it decides and for which image.
        const rng = (purpose: string) =>
          derive(context.seed, "hardest-negative", purpose, classIndex, index);
        const shot = (cls: number, purpose: string): ShotRef => ({
          classIndex: cls,
          shotIndex: rng(purpose).int(context.shotCounts[cls]),
        });
        const augmentOf = (ref: ShotRef, purpose: string): AugmentParams | null => {
          if (!augment) return null;
          const [width, height] = context.shotSizes[ref.classIndex][ref.shotIndex];
          return augmentParams(rng(purpose), width, height);
        };
        const positive = shot(classIndex, "positive");
        const negative = shot(mostSimilar(context.similarity!, classIndex), "negative");
        return {
          classIndex,
          index,
          positive,
          positiveAugment: augmentOf(positive, "augment/positive"),
          negative,
          negativeAugment: augmentOf(negative, "augment/negative"),
        };
      },
    };
  },
};

/** What `--plugin` registers. */
export const plugins = [hardestNegative];
