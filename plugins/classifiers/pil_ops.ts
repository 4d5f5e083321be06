/**
 * The image operations of the classifier's training augmentations, reproducing what torchvision's
 * functional ops do to a PIL RGB image, byte for byte. torchvision hands PIL images to Pillow
 * (ImageEnhance, ImageOps, `convert`, `transform`), so each op follows Pillow's C code and its
 * float32 / float64 / integer arithmetic. `gaussianBlur` is the exception: torchvision blurs PIL
 * images through its tensor path, so it runs the same libtorch ops.
 *
 * Every function takes an `RgbImage` and returns a new one; inputs are never modified.
 */
import { affineNearest, flipHorizontal, rotateNearest } from "../../core/augment.ts";
import { assertRgbImage, cropImage, resizeImage, type RgbImage } from "../../core/image.ts";
import { fromHost, ops, scope } from "../../ffi/mod.ts";
import { pilKernels } from "./pil_kernels.ts";

const f32 = Math.fround;

/** Pillow's CLIP8 on an integer. */
const clip8 = (v: number) => (v <= 0 ? 0 : v < 256 ? v : 255);

function finite(name: string, v: number): void {
  if (typeof v !== "number" || !Number.isFinite(v)) {
    throw new RangeError(`${name}: expected a finite number, got ${v}`);
  }
}

function nonNegative(name: string, v: number): void {
  finite(name, v);
  if (v < 0) throw new RangeError(`${name}: must be >= 0, got ${v}`);
}

const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/**
 * `out[i] = tables[i % 3][data[i]]` (one table per channel; give the same one thrice for all),
 * four bytes per step through 32-bit words where the data allows (little-endian, aligned).
 */
function lookup(data: Uint8Array, tables: readonly Uint8Array[]): Uint8Array {
  const [t0, t1, t2] = tables;
  const out = new Uint8Array(data.length);
  let i = 0;
  if (LITTLE_ENDIAN && data.byteOffset % 4 === 0) {
    // Three words hold four pixels: channels 0120, 1201, 2012 from the low byte up.
    const words = Math.floor(data.length / 12) * 3;
    const src = new Uint32Array(data.buffer, data.byteOffset, words);
    const dst = new Uint32Array(out.buffer, 0, words);
    const map = (a: Uint8Array, b: Uint8Array, c: Uint8Array, d: Uint8Array, v: number) =>
      a[v & 255] | (b[(v >>> 8) & 255] << 8) | (c[(v >>> 16) & 255] << 16) | (d[v >>> 24] << 24);
    for (let k = 0; k < words; k += 3) {
      dst[k] = map(t0, t1, t2, t0, src[k]);
      dst[k + 1] = map(t1, t2, t0, t1, src[k + 1]);
      dst[k + 2] = map(t2, t0, t1, t2, src[k + 2]);
    }
    i = words * 4;
  }
  for (; i < data.length; i += 3) {
    out[i] = t0[data[i]];
    out[i + 1] = t1[data[i + 1]];
    out[i + 2] = t2[data[i + 2]];
  }
  return out;
}

/** A 256-entry `point` table, entries clipped to 0..255 as `Image.point` does. */
const pointTable = (lut: ArrayLike<number>) =>
  Uint8Array.from({ length: 256 }, (_, i) => clip8(lut[i]));

/** Applies a 256-entry table to every channel (`Image.point`). */
function pointAll(image: RgbImage, lut: ArrayLike<number>): RgbImage {
  const table = pointTable(lut);
  return {
    width: image.width,
    height: image.height,
    data: lookup(image.data, [table, table, table]),
  };
}

/** One 256-entry table per channel (the 768-entry `point` table of ImageOps on RGB). */
function pointPerChannel(image: RgbImage, luts: ArrayLike<number>[]): RgbImage {
  return {
    width: image.width,
    height: image.height,
    data: lookup(image.data, luts.map(pointTable)),
  };
}

/** Per-channel 256-bin histograms (`Image.histogram` of an RGB image). */
function histograms(image: RgbImage): Float64Array[] {
  const h = [new Float64Array(256), new Float64Array(256), new Float64Array(256)];
  const { data } = image;
  for (let i = 0; i < data.length; i += 3) {
    h[0][data[i]]++;
    h[1][data[i + 1]]++;
    h[2][data[i + 2]]++;
  }
  return h;
}

// ---------------------------------------------------------------------------------------------
// Blending (ImageEnhance)

/**
 * `Image.blend(degenerate, image, factor)` (ImagingBlend): the factor is a C float, and
 * `in1 + alpha * (in2 - in1)` is evaluated in float32, truncated; outside [0, 1] it is clipped.
 * `degenerate` is the first image: one grey value, or one byte per pixel (an "L" image) or per
 * byte.
 */
function blend(image: RgbImage, degenerate: number | Uint8Array, factor: number): RgbImage {
  const alpha = f32(factor);
  const { data } = image;
  const done = (out: Uint8Array) => ({ width: image.width, height: image.height, data: out });
  if (alpha === 1) return done(data.slice());
  if (alpha === 0) {
    if (typeof degenerate !== "number") return done(degenerate.slice());
    return done(new Uint8Array(data.length).fill(degenerate));
  }
  // alpha * (v - a) takes one of 511 values: a table of them, then per byte one float32 sum.
  // Inside (0, 1) the sum lies between a and v, so storing it (which truncates) is Pillow's
  // (UINT8) cast; outside, it is clipped first.
  const scaled = new Float32Array(511);
  for (let d = -255; d <= 255; d++) scaled[d + 255] = alpha * d;
  const inside = alpha > 0 && alpha < 1;
  const blended = (a: number, v: number) => {
    const t = f32(a + scaled[v - a + 255]);
    return inside ? t : t <= 0 ? 0 : t >= 255 ? 255 : t;
  };
  if (typeof degenerate === "number") {
    const table = new Uint8Array(256);
    for (let v = 0; v < 256; v++) table[v] = blended(degenerate, v);
    return done(lookup(data, [table, table, table]));
  }
  const k = pilKernels(data.length);
  if (k) return done(k.blend(data, degenerate, alpha));
  const out = new Uint8Array(data.length);
  for (let i = 0; i < data.length; i++) out[i] = blended(degenerate[i], data[i]);
  return done(out);
}

/**
 * The "L" value of every pixel (Pillow's rgb2l, ITU-R 601-2 in 16-bit fixed point), each
 * written three times (that "L" image converted back to RGB), and the sum of the values.
 */
function luma(image: RgbImage): { rgb: Uint8Array; sum: number } {
  const k = pilKernels(image.data.length);
  if (k) return k.luma(image.data);
  const { data } = image;
  const rgb = new Uint8Array(data.length);
  let sum = 0;
  for (let i = 0; i < data.length; i += 3) {
    const l = (data[i] * 19595 + data[i + 1] * 38470 + data[i + 2] * 7471 + 0x8000) >> 16;
    rgb[i] = rgb[i + 1] = rgb[i + 2] = l;
    sum += l;
  }
  return { rgb, sum };
}

/** torchvision `adjust_brightness` on PIL: ImageEnhance.Brightness (blend with black). */
export function adjustBrightness(image: RgbImage, factor: number): RgbImage {
  assertRgbImage(image);
  nonNegative("adjustBrightness factor", factor);
  return blend(image, 0, factor);
}

/** torchvision `adjust_contrast` on PIL: ImageEnhance.Contrast (blend with the mean grey). */
export function adjustContrast(image: RgbImage, factor: number): RgbImage {
  assertRgbImage(image);
  nonNegative("adjustContrast factor", factor);
  // ImageStat's mean of the "L" image: an integer sum over the histogram, one float division.
  const mean = Math.trunc(luma(image).sum / (image.width * image.height) + 0.5);
  return blend(image, mean, factor);
}

/** torchvision `adjust_saturation` on PIL: ImageEnhance.Color (blend with the "L" image). */
export function adjustSaturation(image: RgbImage, factor: number): RgbImage {
  assertRgbImage(image);
  nonNegative("adjustSaturation factor", factor);
  return blend(image, luma(image).rgb, factor);
}

/**
 * Pillow's `filter(ImageFilter.SMOOTH)` (ImagingFilter3x3): kernel [1 1 1; 1 5 1; 1 1 1] / 13 in
 * float32, summed row by row (the row below first) onto 0.5, truncated; the border pixels are
 * copied, and an image smaller than 3x3 is returned as is.
 */
function smooth(image: RgbImage): Uint8Array {
  const { width: w, height: h, data } = image;
  if (w < 3 || h < 3) return data.slice();
  const k = f32(1 / 13);
  const c = f32(5 / 13);
  const kernels = pilKernels(data.length);
  if (kernels) return kernels.smooth(data, w, h, k, c);
  const out = data.slice();
  // Each product is a byte times a float32 weight, rounded to float32: two 256-entry tables.
  const side = Float32Array.from({ length: 256 }, (_, v) => v * k);
  const centre = Float32Array.from({ length: 256 }, (_, v) => v * c);
  // A row's three side products sum to the same float whether the row lies above or below the
  // output pixel: each row's sums are computed once and kept while the three rows around an
  // output row are in use. Stores into a Float32Array round to float32, as each C float sum.
  const stride = w * 3;
  const n = (w - 2) * 3;
  const sides = [new Float32Array(n), new Float32Array(n), new Float32Array(n)];
  const sideSums = (y: number) => {
    const s = sides[y % 3];
    for (let j = 0, i = y * stride + 3; j < n; j++, i++) {
      s[j] = f32(side[data[i - 3]] + side[data[i]]) + side[data[i + 3]];
    }
  };
  sideSums(0);
  sideSums(1);
  for (let y = 1; y < h - 1; y++) {
    sideSums(y + 1);
    const below = sides[(y + 1) % 3], above = sides[(y - 1) % 3];
    for (let j = 0, i = y * stride + 3; j < n; j++, i++) {
      const mid = f32(f32(side[data[i - 3]] + centre[data[i]]) + side[data[i + 3]]);
      const ss = f32(f32(f32(0.5 + below[j]) + mid) + above[j]);
      // ss >= 0.5, and storing truncates.
      out[i] = ss >= 255 ? 255 : ss;
    }
  }
  return out;
}

/** torchvision `adjust_sharpness` on PIL: ImageEnhance.Sharpness (blend with SMOOTH). */
export function adjustSharpness(image: RgbImage, factor: number): RgbImage {
  assertRgbImage(image);
  nonNegative("adjustSharpness factor", factor);
  const soft = smooth(image);
  return blend(image, soft, factor);
}

// ---------------------------------------------------------------------------------------------
// Hue (the HSV round trip)

/** C's round() of a non-negative double: halves away from zero. */
function cRound(x: number): number {
  const r = Math.floor(x);
  return x - r >= 0.5 ? r + 1 : r;
}

/** hsv2rgb's per-hue-byte sector (floor(h * 6 / 255) mod 6) and float32 fraction. */
const HUE_SECTOR = Uint8Array.from({ length: 256 }, (_, h) => Math.floor((h * 6.0) / 255.0) % 6);
const HUE_FRACTION = Float32Array.from(
  { length: 256 },
  (_, h) => (h * 6.0) / 255.0 - Math.floor((h * 6.0) / 255.0),
);
/** hsv2rgb's float32 s / 255 per saturation byte. */
const SAT_FRACTION = Float32Array.from({ length: 256 }, (_, s) => s / 255.0);

/**
 * Pillow's rgb2hsv and hsv2rgb (Convert.c), whose float32 / double arithmetic the tables below
 * reproduce. rgb2hsv's hue depends only on which channel is the maximum (r, else g, else b) and
 * how far the other two lie below it (the larger distance is max - min), its saturation only on
 * max - min and max; hsv2rgb's lowest channel only on s and v. Filled once, on first use.
 */
interface HsvTables {
  /** [branch << 16 | distA << 8 | distB]: branch 0 (r max) distA = max - g, distB = max - b;
   * 1 (g max) max - r, max - b; 2 (b max) max - g, max - r. */
  hue: Uint8Array;
  /** [(max - min) << 8 | max] */
  saturation: Uint8Array;
  /** hsv2rgb's p = round(v * (1 - s / 255)): [s << 8 | v] */
  low: Uint8Array;
}

let tables: HsvTables | undefined;

function hsvTables(): HsvTables {
  if (tables) return tables;
  const hue = new Uint8Array(3 << 16);
  for (let branch = 0; branch < 3; branch++) {
    for (let a = 0; a < 256; a++) {
      for (let b = a === 0 ? 1 : 0; b < 256; b++) {
        const cr = Math.max(a, b);
        // C: float (max - x) / float cr, then the branch's sum (double constants, float result).
        const ca = f32(a / cr), cb = f32(b / cr);
        let hf = branch === 0 ? f32(cb - ca) : f32((branch === 1 ? 2.0 : 4.0) + ca - cb);
        hf = f32((hf / 6.0 + 1.0) % 1.0);
        hue[(branch << 16) | (a << 8) | b] = clip8(Math.trunc(hf * 255.0));
      }
    }
  }
  const saturation = new Uint8Array(1 << 16);
  for (let max = 1; max < 256; max++) {
    for (let cr = 1; cr <= max; cr++) {
      saturation[(cr << 8) | max] = clip8(Math.trunc(f32(cr / max) * 255.0));
    }
  }
  const low = new Uint8Array(1 << 16);
  for (let us = 0; us < 256; us++) {
    for (let v = 0; v < 256; v++) low[(us << 8) | v] = cRound(v * (1.0 - SAT_FRACTION[us]));
  }
  tables = { hue, saturation, low };
  return tables;
}

/**
 * torchvision `adjust_hue` on PIL: convert to Pillow's 8-bit HSV (rgb2hsv), add
 * `int32(factor * 255)` to the hue byte with uint8 wrap-around, convert back (hsv2rgb). The
 * conversions mix C float and double exactly as Convert.c does. The round trip is lossy, so a
 * factor of 0 still changes some pixels, as in torchvision.
 */
export function adjustHue(image: RgbImage, factor: number): RgbImage {
  assertRgbImage(image);
  finite("adjustHue factor", factor);
  if (factor < -0.5 || factor > 0.5) {
    throw new RangeError(`adjustHue: factor must be in [-0.5, 0.5], got ${factor}`);
  }
  const shift = Math.trunc(factor * 255);
  const { hue, saturation, low } = hsvTables();
  const { data } = image;
  const out = new Uint8Array(data.length);
  for (let i = 0; i < data.length; i += 3) {
    const r = data[i], g = data[i + 1], b = data[i + 2];
    const v = r > g ? (r > b ? r : b) : (g > b ? g : b);
    const min = r < g ? (r < b ? r : b) : (g < b ? g : b);
    // A grey (or a saturation byte of 0) comes back as its value on all three channels.
    const us = v === min ? 0 : saturation[((v - min) << 8) | v];
    if (us === 0) {
      out[i] = out[i + 1] = out[i + 2] = v;
      continue;
    }
    const uh = r === v
      ? hue[((v - g) << 8) | (v - b)]
      : g === v
      ? hue[(1 << 16) | ((v - r) << 8) | (v - b)]
      : hue[(2 << 16) | ((v - g) << 8) | (v - r)];
    const h = (uh + shift) & 255;
    // hsv2rgb: C float fractions, double products, round(); each result lies in [0, v]. Every
    // sector uses v, p and one of q (odd sectors, falling) or t (even sectors, rising).
    const sector = HUE_SECTOR[h];
    const fs = SAT_FRACTION[us];
    const f = HUE_FRACTION[h];
    const p = low[(us << 8) | v];
    const x = sector & 1 ? v * (1.0 - f32(fs * f)) : v * (1.0 - fs * (1.0 - f));
    const floor = Math.floor(x);
    const qt = x - floor >= 0.5 ? floor + 1 : floor; // C round(), inlined
    switch (sector) {
      case 0:
        out[i] = v, out[i + 1] = qt, out[i + 2] = p;
        break;
      case 1:
        out[i] = qt, out[i + 1] = v, out[i + 2] = p;
        break;
      case 2:
        out[i] = p, out[i + 1] = v, out[i + 2] = qt;
        break;
      case 3:
        out[i] = p, out[i + 1] = qt, out[i + 2] = v;
        break;
      case 4:
        out[i] = qt, out[i + 1] = p, out[i + 2] = v;
        break;
      default:
        out[i] = v, out[i + 1] = p, out[i + 2] = qt;
    }
  }
  return { width: image.width, height: image.height, data: out };
}

// ---------------------------------------------------------------------------------------------
// Lookup-table ops (ImageOps) and grayscale

/** torchvision `rgb_to_grayscale(img, 3)` on PIL: the "L" conversion, copied to three channels. */
export function grayscale(image: RgbImage): RgbImage {
  assertRgbImage(image);
  return { width: image.width, height: image.height, data: luma(image).rgb };
}

/** torchvision `solarize` on PIL (ImageOps.solarize): values >= threshold become 255 - value. */
export function solarize(image: RgbImage, threshold: number): RgbImage {
  assertRgbImage(image);
  finite("solarize threshold", threshold);
  return pointAll(image, Array.from({ length: 256 }, (_, i) => (i < threshold ? i : 255 - i)));
}

/** torchvision `posterize` on PIL (ImageOps.posterize): keeps the top `bits` bits, 1 to 8. */
export function posterize(image: RgbImage, bits: number): RgbImage {
  assertRgbImage(image);
  if (!Number.isInteger(bits) || bits < 1 || bits > 8) {
    throw new RangeError(`posterize: bits must be an integer in [1, 8], got ${bits}`);
  }
  const mask = ~((1 << (8 - bits)) - 1);
  return pointAll(image, Array.from({ length: 256 }, (_, i) => i & mask));
}

/** torchvision `autocontrast` on PIL (ImageOps.autocontrast, no cutoff): per channel. */
export function autocontrast(image: RgbImage): RgbImage {
  assertRgbImage(image);
  const luts = histograms(image).map((h) => {
    let lo = 0;
    while (lo < 255 && !h[lo]) lo++;
    let hi = 255;
    while (hi > 0 && !h[hi]) hi--;
    if (hi <= lo) return Array.from({ length: 256 }, (_, i) => i);
    const scale = 255.0 / (hi - lo);
    const offset = -lo * scale;
    return Array.from({ length: 256 }, (_, i) => clip8(Math.trunc(i * scale + offset)));
  });
  return pointPerChannel(image, luts);
}

/** torchvision `equalize` on PIL (ImageOps.equalize): per channel, Pillow's integer steps. */
export function equalize(image: RgbImage): RgbImage {
  assertRgbImage(image);
  const luts = histograms(image).map((h) => {
    const used = Array.from(h).filter((c) => c > 0);
    const identity = Array.from({ length: 256 }, (_, i) => i);
    if (used.length <= 1) return identity;
    const total = used.reduce((a, b) => a + b, 0);
    const step = Math.floor((total - used[used.length - 1]) / 255);
    if (!step) return identity;
    let n = Math.floor(step / 2);
    const lut: number[] = [];
    for (let i = 0; i < 256; i++) {
      lut.push(Math.floor(n / step));
      n += h[i];
    }
    return lut;
  });
  return pointPerChannel(image, luts);
}

// ---------------------------------------------------------------------------------------------
// Geometry

/** Horizontal mirror (torchvision `hflip` on PIL). */
export const hflip = (image: RgbImage): RgbImage => flipHorizontal(image);

/** torchvision `rotate(img, angle)` on PIL: Image.rotate, NEAREST, same size, black outside. */
export function rotate(image: RgbImage, angle: number): RgbImage {
  assertRgbImage(image);
  finite("rotate angle", angle);
  return rotateNearest(image, angle);
}

export interface AffineParams {
  /** Degrees, clockwise. */
  angle: number;
  /** Integer pixels, [x, y]. */
  translate: readonly [number, number];
  scale: number;
  /** Degrees, [x, y]. */
  shear: readonly [number, number];
  /** Pixel coordinates from the top-left corner; default the image centre (w / 2, h / 2). */
  center?: readonly [number, number];
}

// CPython's math.radians / math.degrees multiply by these constants.
const DEG_TO_RAD = Math.PI / 180.0;
const RAD_TO_DEG = 180.0 / Math.PI;
export const degrees = (x: number) => x * RAD_TO_DEG;

/**
 * torchvision's `_get_inverse_affine_matrix` (the map from output to input pixel that Pillow
 * takes), with the same float64 operations in the same order.
 */
export function inverseAffineMatrix(
  center: readonly [number, number],
  angle: number,
  translate: readonly [number, number],
  scale: number,
  shear: readonly [number, number],
): number[] {
  const rot = angle * DEG_TO_RAD;
  const sx = shear[0] * DEG_TO_RAD;
  const sy = shear[1] * DEG_TO_RAD;
  const [cx, cy] = center;
  const [tx, ty] = translate;
  const a = Math.cos(rot - sy) / Math.cos(sy);
  const b = (-Math.cos(rot - sy) * Math.tan(sx)) / Math.cos(sy) - Math.sin(rot);
  const c = Math.sin(rot - sy) / Math.cos(sy);
  const d = (-Math.sin(rot - sy) * Math.tan(sx)) / Math.cos(sy) + Math.cos(rot);
  const m = [d, -b, 0.0, -c, a, 0.0].map((x) => x / scale);
  m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty);
  m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty);
  m[2] += cx;
  m[5] += cy;
  return m;
}

/**
 * torchvision `affine` on PIL with NEAREST and fill 0: `Image.transform(AFFINE)` with the
 * inverse matrix. RandAugment's shears pass `center: [0, 0]`; its translations use the default.
 */
export function affine(image: RgbImage, p: AffineParams): RgbImage {
  assertRgbImage(image);
  for (const [k, v] of Object.entries({ angle: p.angle, scale: p.scale })) finite(`affine ${k}`, v);
  if (!(p.scale > 0)) throw new RangeError(`affine: scale must be positive, got ${p.scale}`);
  if (p.translate.length !== 2 || !p.translate.every(Number.isInteger)) {
    throw new RangeError(`affine: translate must be two integers, got [${p.translate}]`);
  }
  if (p.shear.length !== 2) throw new RangeError("affine: shear must be [x, y] degrees");
  p.shear.forEach((s) => finite("affine shear", s));
  const center = p.center ?? [image.width * 0.5, image.height * 0.5];
  const m = inverseAffineMatrix(center, p.angle, p.translate, p.scale, p.shear);
  return affineNearest(image, m);
}

/**
 * torchvision `resized_crop` on PIL: `crop((left, top, left + width, top + height))`, then
 * `resize((size, size), BICUBIC)`.
 */
export function resizedCrop(
  image: RgbImage,
  top: number,
  left: number,
  height: number,
  width: number,
  size: number,
): RgbImage {
  assertRgbImage(image);
  if (![top, left, height, width, size].every(Number.isInteger) || height < 1 || width < 1) {
    throw new RangeError(
      `resizedCrop: bad box top=${top} left=${left} height=${height} width=${width}`,
    );
  }
  if (size < 1) throw new RangeError(`resizedCrop: size must be a positive integer, got ${size}`);
  const source = { left, top, width, height };
  if (left < 0 || top < 0 || left + width > image.width || top + height > image.height) {
    // A box past the edges: PIL's crop pads it with black first.
    return resizeImage(cropImage(image, left, top, width, height), size, size, "bicubic");
  }
  // Resizing a window of the image in place is resizing its crop.
  return resizeImage(image, size, size, "bicubic", { source });
}

// ---------------------------------------------------------------------------------------------
// Gaussian blur

/**
 * torchvision `gaussian_blur(img, [k, k], [sigma, sigma])` on PIL, which converts to a uint8
 * tensor and back: float32 kernel (linspace, exp, normalised, outer product), reflect padding,
 * a depthwise conv2d, round half to even, uint8. It runs on the same libtorch ops, laid out as
 * torchvision lays them out (an HWC buffer permuted to CHW), because the convolution's float32
 * summation order is libtorch's (oneDNN's) and cannot be reproduced reliably in plain
 * TypeScript. Needs each side larger than k / 2 (reflect padding).
 */
export function gaussianBlur(image: RgbImage, kernel: number, sigma: number): RgbImage {
  assertRgbImage(image);
  if (!Number.isInteger(kernel) || kernel < 1 || kernel % 2 === 0) {
    throw new RangeError(`gaussianBlur: kernel must be an odd positive integer, got ${kernel}`);
  }
  finite("gaussianBlur sigma", sigma);
  if (!(sigma > 0)) throw new RangeError(`gaussianBlur: sigma must be positive, got ${sigma}`);
  const { width: w, height: h } = image;
  const half = (kernel - 1) / 2;
  if (half >= w || half >= h) {
    throw new RangeError(`gaussianBlur: a ${w}x${h} image is too small for a ${kernel} kernel`);
  }
  const data = scope(() => {
    const x = ops.linspace(-half, half, kernel, "f32", "cpu");
    const pdf = ops.exp(ops.mulScalar(ops.powScalar(ops.divScalar(x, sigma), 2), -0.5));
    const k1 = ops.div(pdf, ops.sumAll(pdf));
    const k2 = ops.mm(ops.unsqueeze(k1, 1), ops.unsqueeze(k1, 0));
    const weight = ops.expand(k2, [3, 1, kernel, kernel]);
    const hwc = fromHost(image.data, [h, w, 3], "u8");
    const img = ops.to(ops.unsqueeze(ops.permute(hwc, [2, 0, 1]), 0), "f32", undefined);
    const padded = ops.pad(img, [half, half, half, half], 1, 0);
    const blurred = ops.conv2d(padded, weight, null, [1, 1], [0, 0], [1, 1], 3);
    const u8 = ops.to(ops.round(blurred), "u8", undefined);
    return ops.contiguous(ops.permute(ops.squeeze(u8, 0), [1, 2, 0])).toHost() as Uint8Array;
  });
  return { width: w, height: h, data: new Uint8Array(data) };
}
