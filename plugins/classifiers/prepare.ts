/**
 * Turning one image file into the classifier's input: decode, then either the recipe's random
 * training transform (seeded per image and epoch, so any worker produces the same pixels) or
 * the deterministic test transform, then normalisation to float32 CHW.
 */
import {
  clipPreprocessHost,
  OPENAI_CLIP_MEAN,
  OPENAI_CLIP_STD,
  readImage,
  type RgbImage,
} from "../../core/image.ts";
import { Rng } from "../../core/rng.ts";
import { toNormalizedFloat, trainTransform, type TrainTransformOptions } from "./transforms.ts";

export interface PrepareSpec {
  /** "train": the recipe's random augmentation; "test": resize, centre crop. */
  kind: "train" | "test";
  /** Side of the square input the model takes. */
  size: number;
  mean?: readonly number[];
  std?: readonly number[];
  /** Training transform options (default: the DataDream recipe at `size`); false: none, only
   * the test transform. */
  augment?: TrainTransformOptions | false;
}

/** One job: the file and, for training, the seed of its random transform (decimal string). */
export interface PrepareJob {
  path: string;
  seed?: string;
}

/** [3, size, size] float32 pixels of one image. */
export async function prepareImage(job: PrepareJob, spec: PrepareSpec): Promise<Float32Array> {
  return transformImage(await readImage(job.path), job, spec);
}

/** The second half of `prepareImage`: the transform and normalisation of a decoded image. */
export function transformImage(image: RgbImage, job: PrepareJob, spec: PrepareSpec): Float32Array {
  const mean = spec.mean ?? OPENAI_CLIP_MEAN, std = spec.std ?? OPENAI_CLIP_STD;
  if (spec.kind === "train" && spec.augment !== false) {
    if (job.seed === undefined) throw new Error(`${job.path}: a training image needs a seed`);
    const rng = new Rng(BigInt(job.seed));
    const out = trainTransform(image, rng, { ...spec.augment, size: spec.size });
    return toNormalizedFloat(out, mean, std);
  }
  // torchvision's Resize + CenterCrop, which DataDream's test transform uses.
  return clipPreprocessHost(image, { size: spec.size, mean, std, flavor: "torchvision" });
}
