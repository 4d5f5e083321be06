/**
 * DIPSY's reference-image augmentation, applied with recorded parameters (see
 * plugins/pairs/augment.ts for how they are drawn). The official code (`manage.py`,
 * `_augment_image`) works on PIL images, so each step reproduces Pillow byte for byte:
 * 1. `transpose(FLIP_LEFT_RIGHT)` when `flip`;
 * 2. `crop((x, y, x + side, y + side))` when `crop` is set (coordinates in the flipped image);
 * 3. `rotate(angle)`: nearest neighbour, no expansion, black outside the source;
 * 4. centre crop of side `int(s / sqrt(2))` with s the longer side, at `(s - side) // 2`.
 * (torchvision's `F.rotate` on a PIL image calls the same `Image.rotate`, so this is also its
 * `RandomRotation` with default arguments.)
 */
import { cropImage, type RgbImage } from "./image.ts";
import type { AugmentParams } from "./plugins.ts";

/** Mirrors left to right (PIL `Image.transpose(FLIP_LEFT_RIGHT)`). */
export function flipHorizontal(image: RgbImage): RgbImage {
  const { width, height, data } = image;
  const out = new Uint8Array(data.length);
  for (let y = 0; y < height; y++) {
    const row = y * width * 3;
    for (let x = 0; x < width; x++) {
      const s = row + x * 3;
      const d = row + (width - 1 - x) * 3;
      out[d] = data[s];
      out[d + 1] = data[s + 1];
      out[d + 2] = data[s + 2];
    }
  }
  return { width, height, data: out };
}

/** Python's `x % m` for floats: the result takes the sign of m. */
function pyMod(x: number, m: number): number {
  const r = x % m;
  if (r === 0) return m < 0 ? -0 : 0;
  return (r < 0) !== (m < 0) ? r + m : r;
}

/**
 * Python's `round(x, 15)` for |x| <= 1: the nearest 15-decimal value, ties to even. `toFixed`
 * rounds exactly but ties away from zero; a tie at 15 decimals is an odd multiple of 2^-16.
 */
function pyRound15(x: number): number {
  const scaled = x * 65536;
  if (Number.isInteger(scaled) && scaled % 2 !== 0) {
    // 16 exact decimals ending in 5: keep the truncated digits, bumped if their last is odd.
    const digits = Math.abs(x).toFixed(16).slice(0, -1).replace(".", "");
    let n = BigInt(digits);
    if (n % 2n === 1n) n += 1n;
    return Math.sign(x) * Number(`${n}e-15`);
  }
  return Number(x.toFixed(15));
}

/** C's `(int)` of a double already known to be in range. */
const COORD = (v: number) => (v < 0 ? -1 : Math.trunc(v));

/**
 * Pillow's `Image.rotate(angle)` for an RGB image: counter-clockwise degrees about the centre,
 * nearest neighbour, same size, black where no source pixel maps. Follows Pillow's fast paths
 * (0, 180, and 90/270 for square images) and its affine engine with 16.16 fixed-point stepping.
 */
export function rotateNearest(image: RgbImage, angleDegrees: number): RgbImage {
  if (!Number.isFinite(angleDegrees)) throw new RangeError(`rotate: bad angle ${angleDegrees}`);
  const { width: w, height: h, data } = image;
  const angle = pyMod(angleDegrees, 360);
  if (angle === 0) return { width: w, height: h, data: data.slice() };
  if (angle === 180) return transposeRGB(image, (x, y) => [w - 1 - x, h - 1 - y], w, h);
  if ((angle === 90 || angle === 270) && w === h) {
    return angle === 90
      ? transposeRGB(image, (x, y) => [y, w - 1 - x], h, w)
      : transposeRGB(image, (x, y) => [h - 1 - y, x], h, w);
  }

  // The inverse map, output -> input, exactly as Image.rotate builds it.
  const rad = -(angle * (Math.PI / 180));
  const cos = pyRound15(Math.cos(rad));
  const sin = pyRound15(Math.sin(rad));
  const a = [cos, sin, 0, pyRound15(-Math.sin(rad)), cos, 0];
  const cx = w / 2;
  const cy = h / 2;
  a[2] = a[0] * -cx + a[1] * -cy + a[2] + cx;
  a[5] = a[3] * -cx + a[4] * -cy + a[5] + cy;
  return affineNearest(image, a);
}

/**
 * Pillow's ImagingTransformAffine with NEAREST into a same-size, black-filled output. `a` is the
 * inverse map (output -> input), as `Image.transform(size, AFFINE, a)` takes it.
 */
export function affineNearest(image: RgbImage, a: readonly number[]): RgbImage {
  const { width: w, height: h, data } = image;
  const out = new Uint8Array(w * h * 3);
  const copy = (o: number, xin: number, yin: number) => {
    const s = (yin * w + xin) * 3;
    out[o] = data[s];
    out[o + 1] = data[s + 1];
    out[o + 2] = data[s + 2];
  };

  if (a[1] === 0 && a[3] === 0) {
    // ImagingScaleAffine: pure scaling (here: a rotation by a negligible angle).
    let xo = a[2] + a[0] * 0.5;
    let yo = a[5] + a[4] * 0.5;
    const xin = new Int32Array(w).fill(-1);
    for (let x = 0; x < w; x++, xo += a[0]) {
      const v = COORD(xo);
      if (v >= 0 && v < w) xin[x] = v;
    }
    for (let y = 0; y < h; y++, yo += a[4]) {
      const yi = COORD(yo);
      if (yi < 0 || yi >= h) continue;
      for (let x = 0; x < w; x++) if (xin[x] >= 0) copy((y * w + x) * 3, xin[x], yi);
    }
    return { width: w, height: h, data: out };
  }

  const fits = (x: number, y: number) =>
    Math.abs(x * a[0] + y * a[1] + a[2]) < 32768 && Math.abs(x * a[3] + y * a[4] + a[5]) < 32768;
  if (fits(0, 0) && fits(w, h) && fits(0, h) && fits(w, 0)) {
    // affine_fixed: 16.16 fixed point, int32 arithmetic as in C.
    const fix = (v: number) => Math.floor(v * 65536.0 + 0.5) | 0;
    const a0 = fix(a[0]);
    const a1 = fix(a[1]);
    const a3 = fix(a[3]);
    const a4 = fix(a[4]);
    let a2 = fix(a[2] + a[0] * 0.5 + a[1] * 0.5);
    let a5 = fix(a[5] + a[3] * 0.5 + a[4] * 0.5);
    for (let y = 0; y < h; y++) {
      let xx = a2;
      let yy = a5;
      for (let x = 0; x < w; x++) {
        const xin = xx >> 16;
        if (xin >= 0 && xin < w) {
          const yin = yy >> 16;
          if (yin >= 0 && yin < h) copy((y * w + x) * 3, xin, yin);
        }
        xx = (xx + a0) | 0;
        yy = (yy + a3) | 0;
      }
      a2 = (a2 + a1) | 0;
      a5 = (a5 + a4) | 0;
    }
    return { width: w, height: h, data: out };
  }

  // Floating-point stepping, for images too large for 16.16 fixed point.
  let xo = a[2] + a[1] * 0.5 + a[0] * 0.5;
  let yo = a[5] + a[4] * 0.5 + a[3] * 0.5;
  for (let y = 0; y < h; y++, xo += a[1], yo += a[4]) {
    let xx = xo;
    let yy = yo;
    for (let x = 0; x < w; x++, xx += a[0], yy += a[3]) {
      const xin = COORD(xx);
      if (xin < 0 || xin >= w) continue;
      const yin = COORD(yy);
      if (yin >= 0 && yin < h) copy((y * w + x) * 3, xin, yin);
    }
  }
  return { width: w, height: h, data: out };
}

/** A pixel permutation into an `ow` x `oh` image: `to(x, y)` is where source (x, y) lands. */
function transposeRGB(
  image: RgbImage,
  to: (x: number, y: number) => [number, number],
  ow: number,
  oh: number,
): RgbImage {
  const { width: w, height: h, data } = image;
  const out = new Uint8Array(ow * oh * 3);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const [dx, dy] = to(x, y);
      const s = (y * w + x) * 3;
      const d = (dy * ow + dx) * 3;
      out[d] = data[s];
      out[d + 1] = data[s + 1];
      out[d + 2] = data[s + 2];
    }
  }
  return { width: ow, height: oh, data: out };
}

/** The final crop box [left, top, side] for an image of this size (`side` >= 1). */
export function finalCropBox(width: number, height: number): [number, number, number] {
  const side = Math.trunc(Math.max(width, height) / Math.SQRT2);
  if (side < 1) throw new RangeError(`augment: a ${width}x${height} image is too small`);
  return [Math.floor((width - side) / 2), Math.floor((height - side) / 2), side];
}

/** The size of the augmented image for a source of this size. */
export function augmentedSize(width: number, height: number, params: AugmentParams): number {
  const [w, h] = params.crop ? [params.crop[2], params.crop[2]] : [width, height];
  return finalCropBox(w, h)[2];
}

/** Applies the augmentation; returns a new image (square, side `augmentedSize`). */
export function applyAugment(image: RgbImage, params: AugmentParams): RgbImage {
  let img = params.flip ? flipHorizontal(image) : image;
  if (params.crop) {
    const [x, y, side] = params.crop;
    if (
      ![x, y, side].every(Number.isInteger) || side < 1 || x < 0 || y < 0 ||
      x + side > img.width || y + side > img.height
    ) {
      throw new RangeError(
        `augment: crop [${params.crop.join(", ")}] does not fit a ${img.width}x${img.height} image`,
      );
    }
    img = cropImage(img, x, y, side, side);
  }
  img = rotateNearest(img, params.angle);
  const [left, top, side] = finalCropBox(img.width, img.height);
  return cropImage(img, left, top, side, side);
}
