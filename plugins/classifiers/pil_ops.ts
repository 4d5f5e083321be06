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

/** Applies a 256-entry table to every channel (`Image.point`, which clips entries to 0..255). */
function pointAll(image: RgbImage, lut: ArrayLike<number>): RgbImage {
  const table = new Uint8Array(256);
  for (let i = 0; i < 256; i++) table[i] = clip8(lut[i]);
  const { data } = image;
  const out = new Uint8Array(data.length);
  for (let i = 0; i < data.length; i++) out[i] = table[data[i]];
  return { width: image.width, height: image.height, data: out };
}

/** One 256-entry table per channel (the 768-entry `point` table of ImageOps on RGB). */
function pointPerChannel(image: RgbImage, luts: ArrayLike<number>[]): RgbImage {
  const tables = luts.map((lut) => Uint8Array.from({ length: 256 }, (_, i) => clip8(lut[i])));
  const { data } = image;
  const out = new Uint8Array(data.length);
  for (let i = 0; i < data.length; i += 3) {
    out[i] = tables[0][data[i]];
    out[i + 1] = tables[1][data[i + 1]];
    out[i + 2] = tables[2][data[i + 2]];
  }
  return { width: image.width, height: image.height, data: out };
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
  const out = new Uint8Array(data.length);
  if (alpha === 1) {
    out.set(data);
    return { width: image.width, height: image.height, data: out };
  }
  // The result depends only on the (degenerate, pixel) byte pair: a table of the 256 (constant
  // degenerate) or 65536 pairs, filled once, then one lookup per byte.
  const blended = (a: number, v: number) => {
    if (alpha === 0) return a;
    const t = f32(a + f32(alpha * (v - a)));
    return alpha > 0 && alpha < 1 ? Math.trunc(t) : t <= 0 ? 0 : t >= 255 ? 255 : Math.trunc(t);
  };
  if (typeof degenerate === "number") {
    const table = new Uint8Array(256);
    for (let v = 0; v < 256; v++) table[v] = blended(degenerate, v);
    for (let i = 0; i < data.length; i++) out[i] = table[data[i]];
  } else {
    const step = degenerate.length === data.length ? 1 : 3;
    if (data.length < 65536) {
      // Fewer bytes than table entries: computing each directly is cheaper.
      for (let i = 0; i < data.length; i++) out[i] = blended(degenerate[(i / step) | 0], data[i]);
    } else {
      const table = new Uint8Array(65536);
      for (let a = 0; a < 256; a++) {
        for (let v = 0; v < 256; v++) table[(a << 8) | v] = blended(a, v);
      }
      for (let i = 0; i < data.length; i++) {
        out[i] = table[(degenerate[(i / step) | 0] << 8) | data[i]];
      }
    }
  }
  return { width: image.width, height: image.height, data: out };
}

/** The "L" value of every pixel (Pillow's rgb2l, ITU-R 601-2 in 16-bit fixed point). */
function luma(image: RgbImage): Uint8Array {
  const { data } = image;
  const out = new Uint8Array(data.length / 3);
  for (let p = 0, i = 0; p < out.length; p++, i += 3) {
    out[p] = (data[i] * 19595 + data[i + 1] * 38470 + data[i + 2] * 7471 + 0x8000) >> 16;
  }
  return out;
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
  const l = luma(image);
  let sum = 0;
  for (let i = 0; i < l.length; i++) sum += l[i];
  const mean = Math.trunc(sum / l.length + 0.5);
  return blend(image, mean, factor);
}

/** torchvision `adjust_saturation` on PIL: ImageEnhance.Color (blend with the "L" image). */
export function adjustSaturation(image: RgbImage, factor: number): RgbImage {
  assertRgbImage(image);
  nonNegative("adjustSaturation factor", factor);
  const l = luma(image);
  return blend(image, l, factor);
}

/**
 * Pillow's `filter(ImageFilter.SMOOTH)` (ImagingFilter3x3): kernel [1 1 1; 1 5 1; 1 1 1] / 13 in
 * float32, summed row by row (the row below first) onto 0.5, truncated; the border pixels are
 * copied, and an image smaller than 3x3 is returned as is.
 */
function smooth(image: RgbImage): Uint8Array {
  const { width: w, height: h, data } = image;
  const out = data.slice();
  if (w < 3 || h < 3) return out;
  const k = f32(1 / 13);
  const c = f32(5 / 13);
  const row = (i: number, mid: number) =>
    f32(f32(f32(data[i - 3] * k) + f32(data[i] * mid)) + f32(data[i + 3] * k));
  const stride = w * 3;
  for (let y = 1; y < h - 1; y++) {
    for (let x = 1; x < w - 1; x++) {
      for (let ch = 0; ch < 3; ch++) {
        const i = y * stride + x * 3 + ch;
        let ss = f32(0.5);
        ss = f32(ss + row(i + stride, k));
        ss = f32(ss + row(i, c));
        ss = f32(ss + row(i - stride, k));
        out[i] = ss <= 0 ? 0 : ss >= 255 ? 255 : Math.trunc(ss);
      }
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

/** C's round(): halves away from zero. */
function cRound(x: number): number {
  const r = Math.floor(x);
  return x - r >= 0.5 ? r + 1 : r;
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
  const { data } = image;
  const out = new Uint8Array(data.length);
  for (let i = 0; i < data.length; i += 3) {
    const r = data[i], g = data[i + 1], b = data[i + 2];
    // rgb2hsv
    const maxc = Math.max(r, g, b);
    const minc = Math.min(r, g, b);
    let uh = 0, us = 0;
    if (minc !== maxc) {
      const cr = maxc - minc;
      const s = f32(cr / maxc);
      const rc = f32((maxc - r) / cr);
      const gc = f32((maxc - g) / cr);
      const bc = f32((maxc - b) / cr);
      let hf: number;
      if (r === maxc) hf = f32(bc - gc);
      else if (g === maxc) hf = f32(2.0 + rc - bc);
      else hf = f32(4.0 + gc - rc);
      hf = f32((hf / 6.0 + 1.0) % 1.0);
      uh = clip8(Math.trunc(hf * 255.0));
      us = clip8(Math.trunc(s * 255.0));
    }
    const v = maxc;
    const h = (uh + shift) & 255;
    // hsv2rgb
    if (us === 0) {
      out[i] = out[i + 1] = out[i + 2] = v;
      continue;
    }
    const hi = Math.floor((h * 6.0) / 255.0);
    const f = f32((h * 6.0) / 255.0 - hi);
    const fs = f32(us / 255.0);
    const p = clip8(cRound(v * (1.0 - fs)));
    const q = clip8(cRound(v * (1.0 - f32(fs * f))));
    const t = clip8(cRound(v * (1.0 - fs * (1.0 - f))));
    let r2: number, g2: number, b2: number;
    switch (hi % 6) {
      case 0:
        r2 = v, g2 = t, b2 = p;
        break;
      case 1:
        r2 = q, g2 = v, b2 = p;
        break;
      case 2:
        r2 = p, g2 = v, b2 = t;
        break;
      case 3:
        r2 = p, g2 = q, b2 = v;
        break;
      case 4:
        r2 = t, g2 = p, b2 = v;
        break;
      default:
        r2 = v, g2 = p, b2 = q;
    }
    out[i] = r2;
    out[i + 1] = g2;
    out[i + 2] = b2;
  }
  return { width: image.width, height: image.height, data: out };
}

// ---------------------------------------------------------------------------------------------
// Lookup-table ops (ImageOps) and grayscale

/** torchvision `rgb_to_grayscale(img, 3)` on PIL: the "L" conversion, copied to three channels. */
export function grayscale(image: RgbImage): RgbImage {
  assertRgbImage(image);
  const l = luma(image);
  const out = new Uint8Array(l.length * 3);
  for (let p = 0; p < l.length; p++) out[p * 3] = out[p * 3 + 1] = out[p * 3 + 2] = l[p];
  return { width: image.width, height: image.height, data: out };
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
  return resizeImage(cropImage(image, left, top, width, height), size, size, "bicubic");
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
