/**
 * Random parameters of DIPSY's reference-image augmentation (`manage.py`, `_augment_image`),
 * drawn here so they are recorded per image; core/augment.ts applies them. In order: horizontal
 * flip with p = 0.5; for a non-square image, a square crop of side min(W, H) at a uniform position
 * (in the flipped image); a rotation by U(-20, 20) degrees. The final centre crop has no random
 * part and follows from the size.
 */
import type { AugmentParams } from "../../core/plugins.ts";
import type { Rng } from "../../core/rng.ts";

/** The rotation range of the official code, in degrees either way. */
export const MAX_ROTATION = 20;

export function augmentParams(rng: Rng, width: number, height: number): AugmentParams {
  if (!Number.isInteger(width) || !Number.isInteger(height) || width < 1 || height < 1) {
    throw new RangeError(`augmentParams: bad image size ${width}x${height}`);
  }
  const flip = rng.uniform() < 0.5;
  let crop: AugmentParams["crop"] = null;
  if (width !== height) {
    const side = Math.min(width, height);
    // Both offsets are drawn, as in the official code; the one along the short side is always 0.
    const x = rng.int(width - side + 1);
    const y = rng.int(height - side + 1);
    crop = [x, y, side];
  }
  const angle = rng.range(-MAX_ROTATION, MAX_ROTATION);
  return { flip, crop, angle };
}
