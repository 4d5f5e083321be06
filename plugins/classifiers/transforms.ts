/**
 * The classifier's training augmentation (spec section 7, DataDream's recipe), as torchvision
 * applies it to a PIL image:
 *
 *   RandAugment(2, 9, 31) -> RandomResizedCrop(224, scale (0.25, 1), BICUBIC) ->
 *   RandomHorizontalFlip(0.5) -> RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], 0.8) ->
 *   RandomGrayscale(0.2) -> RandomApply([GaussianBlur(23, (0.1, 2.0))], 0.2) ->
 *   RandomSolarize(128, 0.2)
 *
 * then ToTensor + Normalize (`toNormalizedFloat`). Drawing and applying are separate: every random
 * decision is drawn from our seeded `Rng` into a plain JSON record (`drawTrainTransform`), and
 * `applyTrainTransform` replays a record with Pillow-exact pixel operations (pil_ops.ts), so a run
 * can log, replay and check any augmented image. torchvision's distributions are kept (its
 * RandomResizedCrop sampler, ColorJitter's random order and factor ranges, RandAugment's
 * magnitude table); only the random numbers come from another generator.
 */
import { OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, type RgbImage } from "../../core/image.ts";
import { normalizeRgb } from "../../core/normalize.ts";
import type { Rng } from "../../core/rng.ts";
import {
  adjustBrightness,
  adjustContrast,
  adjustHue,
  adjustSaturation,
  adjustSharpness,
  affine,
  autocontrast,
  degrees,
  equalize,
  gaussianBlur,
  grayscale,
  hflip,
  posterize,
  resizedCrop,
  rotate,
  solarize,
} from "./pil_ops.ts";

export {
  adjustBrightness,
  adjustContrast,
  adjustHue,
  adjustSaturation,
  adjustSharpness,
  affine,
  type AffineParams,
  autocontrast,
  equalize,
  gaussianBlur,
  grayscale,
  hflip,
  inverseAffineMatrix,
  posterize,
  resizedCrop,
  rotate,
  solarize,
} from "./pil_ops.ts";

export interface TrainTransformOptions {
  /** Output side (default 224). */
  size?: number;
  /** RandomResizedCrop's area fraction range (default [0.25, 1]). */
  scale?: [number, number];
  /** RandAugment's number of ops, magnitude bin and number of bins; false: skip it. */
  randAugment?: { ops: number; magnitude: number; bins: number } | false;
  /** Horizontal flip probability (default 0.5). */
  flipP?: number;
  /** ColorJitter strengths, applied with probability p; false: skip it. */
  jitter?:
    | { brightness: number; contrast: number; saturation: number; hue: number; p: number }
    | false;
  /** RandomGrayscale probability (default 0.2). */
  grayscaleP?: number;
  /** GaussianBlur kernel size and sigma range, applied with probability p; false: skip it. */
  blur?: { kernel: number; sigma: [number, number]; p: number } | false;
  /** RandomSolarize threshold and probability; false: skip it. */
  solarize?: { threshold: number; p: number } | false;
}

function deepFreeze<T>(o: T): T {
  if (o && typeof o === "object") {
    for (const v of Object.values(o)) deepFreeze(v);
    Object.freeze(o);
  }
  return o;
}

/** The recipe of spec section 7. */
export const DATADREAM_TRAIN_TRANSFORM: Required<TrainTransformOptions> = deepFreeze({
  size: 224,
  scale: [0.25, 1],
  randAugment: { ops: 2, magnitude: 9, bins: 31 },
  flipP: 0.5,
  jitter: { brightness: 0.4, contrast: 0.4, saturation: 0.2, hue: 0.1, p: 0.8 },
  grayscaleP: 0.2,
  blur: { kernel: 23, sigma: [0.1, 2.0], p: 0.2 },
  solarize: { threshold: 128, p: 0.2 },
});

/** RandomResizedCrop's aspect-ratio range, torchvision's default. */
const CROP_RATIO: readonly [number, number] = [3 / 4, 4 / 3];

/** RandAugment's ops, in torchvision's `_augmentation_space` order (the index it draws). */
export const RANDAUGMENT_OPS = [
  "Identity",
  "ShearX",
  "ShearY",
  "TranslateX",
  "TranslateY",
  "Rotate",
  "Brightness",
  "Color",
  "Contrast",
  "Sharpness",
  "Posterize",
  "Solarize",
  "AutoContrast",
  "Equalize",
] as const;
export type RandAugmentOp = typeof RANDAUGMENT_OPS[number];

export type JitterOp = "brightness" | "contrast" | "saturation" | "hue";
const JITTER_OPS: readonly JitterOp[] = ["brightness", "contrast", "saturation", "hue"];

/** Every random decision of one application, as plain JSON (so a run can log/replay it). */
export type TrainTransformParams = {
  /** Output side. */
  size: number;
  /** RandAugment's ops in order, each with its signed magnitude as applied (empty: none). */
  randAugment: { op: RandAugmentOp; magnitude: number }[];
  /** The crop box in the (same-sized) RandAugment output, resized to `size` x `size`. */
  crop: { top: number; left: number; height: number; width: number };
  flip: boolean;
  /** ColorJitter's adjustments in the order applied, or null when it was not applied. */
  jitter: { op: JitterOp; factor: number }[] | null;
  grayscale: boolean;
  blur: { kernel: number; sigma: number } | null;
  solarize: { threshold: number } | null;
};

// ---------------------------------------------------------------------------------------------
// Options

const OPTION_KEYS = Object.keys(DATADREAM_TRAIN_TRANSFORM);

function fail(msg: string): never {
  throw new RangeError(`train transform: ${msg}`);
}

function checkNumber(name: string, v: unknown, lo: number, hi: number): void {
  if (typeof v !== "number" || !Number.isFinite(v) || v < lo || v > hi) {
    fail(`${name} must be a number in [${lo}, ${hi}], got ${String(v)}`);
  }
}

function checkInt(name: string, v: unknown, lo: number, hi = Number.MAX_SAFE_INTEGER): void {
  if (!Number.isInteger(v) || (v as number) < lo || (v as number) > hi) {
    fail(`${name} must be an integer in [${lo}, ${hi}], got ${String(v)}`);
  }
}

function checkObject(name: string, v: unknown, keys: string[]): Record<string, unknown> {
  if (!v || typeof v !== "object" || Array.isArray(v)) fail(`${name} must be an object or false`);
  const o = v as Record<string, unknown>;
  for (const k of Object.keys(o)) if (!keys.includes(k)) fail(`${name}: unknown field "${k}"`);
  for (const k of keys) if (!(k in o)) fail(`${name}: missing field "${k}"`);
  return o;
}

function checkRange(name: string, v: unknown, lo: number, hi: number): void {
  if (!Array.isArray(v) || v.length !== 2) fail(`${name} must be a [min, max] pair`);
  checkNumber(`${name}[0]`, v[0], lo, hi);
  checkNumber(`${name}[1]`, v[1], lo, hi);
  if (v[0] > v[1]) fail(`${name}: min ${v[0]} is above max ${v[1]}`);
}

/** The options with defaults filled in, validated (RangeError on anything out of range). */
export function resolveTrainTransformOptions(
  opts: TrainTransformOptions = {},
): Required<TrainTransformOptions> {
  if (!opts || typeof opts !== "object") fail("options must be an object");
  for (const k of Object.keys(opts)) {
    if (!OPTION_KEYS.includes(k)) fail(`unknown option "${k}"`);
  }
  const o = { ...DATADREAM_TRAIN_TRANSFORM } as Required<TrainTransformOptions>;
  for (const [k, v] of Object.entries(opts)) {
    if (v !== undefined) (o as Record<string, unknown>)[k] = v;
  }
  checkInt("size", o.size, 1, 1 << 15);
  checkRange("scale", o.scale, Number.MIN_VALUE, Number.MAX_VALUE);
  if (o.scale[0] <= 0) fail(`scale must be positive, got [${o.scale}]`);
  if (o.randAugment !== false) {
    const r = checkObject("randAugment", o.randAugment, ["ops", "magnitude", "bins"]);
    checkInt("randAugment.ops", r.ops, 0, 1000);
    checkInt("randAugment.bins", r.bins, 2, 1 << 20);
    checkInt("randAugment.magnitude", r.magnitude, 0, (r.bins as number) - 1);
  }
  checkNumber("flipP", o.flipP, 0, 1);
  if (o.jitter !== false) {
    const j = checkObject("jitter", o.jitter, ["brightness", "contrast", "saturation", "hue", "p"]);
    for (const k of ["brightness", "contrast", "saturation"]) {
      checkNumber(`jitter.${k}`, j[k], 0, Number.MAX_VALUE);
    }
    checkNumber("jitter.hue", j.hue, 0, 0.5);
    checkNumber("jitter.p", j.p, 0, 1);
  }
  checkNumber("grayscaleP", o.grayscaleP, 0, 1);
  if (o.blur !== false) {
    const b = checkObject("blur", o.blur, ["kernel", "sigma", "p"]);
    checkInt("blur.kernel", b.kernel, 1, 1 << 15);
    if ((b.kernel as number) % 2 === 0) fail(`blur.kernel must be odd, got ${b.kernel}`);
    checkRange("blur.sigma", b.sigma, Number.MIN_VALUE, Number.MAX_VALUE);
    checkNumber("blur.p", b.p, 0, 1);
  }
  if (o.solarize !== false) {
    const s = checkObject("solarize", o.solarize, ["threshold", "p"]);
    checkNumber("solarize.threshold", s.threshold, -Number.MAX_VALUE, Number.MAX_VALUE);
    checkNumber("solarize.p", s.p, 0, 1);
  }
  return o;
}

// ---------------------------------------------------------------------------------------------
// RandAugment's magnitudes

/** fround(a * b + c) with one rounding, as a fused multiply-add; a * b must be exact in f64. */
function fmaF32(a: number, b: number, c: number): number {
  const p = a * b;
  const s = p + c;
  const bb = s - p;
  const err = (p - (s - bb)) + (c - bb);
  const r = Math.fround(s);
  if (err === 0) return r;
  // fround(s) rounds s, not s + err: they differ only when s is halfway between two floats.
  const diff = s - r;
  const other = r + 2 * diff;
  if (diff !== 0 && Math.fround(other) === other && Math.sign(err) === Math.sign(diff)) {
    return other;
  }
  return r;
}

/**
 * `torch.linspace(start, end, steps)` in float32 on the CPU: the first half counts up from start,
 * the second half down from end, each `start + step * i` a fused multiply-add (libtorch's AVX2 /
 * AVX-512 kernels are compiled with FMA contraction, and the values differ from plain float32
 * arithmetic in the last bit).
 */
export function linspaceF32(start: number, end: number, steps: number): number[] {
  const s = Math.fround(start);
  const e = Math.fround(end);
  if (steps === 1) return [s];
  const step = Math.fround(Math.fround(e - s) / (steps - 1));
  const half = Math.floor(steps / 2);
  return Array.from(
    { length: steps },
    (_, i) => (i < half ? fmaF32(step, i, s) : fmaF32(-step, steps - i - 1, e)),
  );
}

/** Python's round() / torch.round: halves to even. */
function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/**
 * torchvision RandAugment's `_augmentation_space(bins, (height, width))`: each op's magnitudes
 * (float32 values, as the doubles `.item()` gives) and whether a random sign applies.
 */
export function randAugmentSpace(
  bins: number,
  height: number,
  width: number,
): Record<RandAugmentOp, { magnitudes: number[]; signed: boolean }> {
  checkInt("randAugment.bins", bins, 2, 1 << 20);
  const lin = (end: number) => linspaceF32(0, end, bins);
  const d = Math.fround((bins - 1) / 4);
  const posterize = Array.from(
    { length: bins },
    (_, i) => 8 - roundHalfEven(Math.fround(i / d)),
  );
  return {
    Identity: { magnitudes: [0], signed: false },
    ShearX: { magnitudes: lin(0.3), signed: true },
    ShearY: { magnitudes: lin(0.3), signed: true },
    TranslateX: { magnitudes: lin((150.0 / 331.0) * width), signed: true },
    TranslateY: { magnitudes: lin((150.0 / 331.0) * height), signed: true },
    Rotate: { magnitudes: lin(30.0), signed: true },
    Brightness: { magnitudes: lin(0.9), signed: true },
    Color: { magnitudes: lin(0.9), signed: true },
    Contrast: { magnitudes: lin(0.9), signed: true },
    Sharpness: { magnitudes: lin(0.9), signed: true },
    Posterize: { magnitudes: posterize, signed: false },
    Solarize: { magnitudes: linspaceF32(255.0, 0.0, bins), signed: false },
    AutoContrast: { magnitudes: [0], signed: false },
    Equalize: { magnitudes: [0], signed: false },
  };
}

/** One RandAugment op with its signed magnitude, as torchvision's `_apply_op` (NEAREST, fill 0). */
export function applyRandAugmentOp(
  image: RgbImage,
  op: RandAugmentOp,
  magnitude: number,
): RgbImage {
  if (typeof magnitude !== "number" || !Number.isFinite(magnitude)) {
    throw new RangeError(`RandAugment ${op}: bad magnitude ${magnitude}`);
  }
  const none = [0, 0] as const;
  switch (op) {
    case "Identity":
      return image;
    case "ShearX":
      return affine(image, {
        angle: 0,
        translate: none,
        scale: 1,
        shear: [degrees(Math.atan(magnitude)), 0],
        center: [0, 0],
      });
    case "ShearY":
      return affine(image, {
        angle: 0,
        translate: none,
        scale: 1,
        shear: [0, degrees(Math.atan(magnitude))],
        center: [0, 0],
      });
    case "TranslateX":
      return affine(image, {
        angle: 0,
        translate: [Math.trunc(magnitude), 0],
        scale: 1,
        shear: none,
      });
    case "TranslateY":
      return affine(image, {
        angle: 0,
        translate: [0, Math.trunc(magnitude)],
        scale: 1,
        shear: none,
      });
    case "Rotate":
      return rotate(image, magnitude);
    case "Brightness":
      return adjustBrightness(image, 1.0 + magnitude);
    case "Color":
      return adjustSaturation(image, 1.0 + magnitude);
    case "Contrast":
      return adjustContrast(image, 1.0 + magnitude);
    case "Sharpness":
      return adjustSharpness(image, 1.0 + magnitude);
    case "Posterize":
      return posterize(image, Math.trunc(magnitude));
    case "Solarize":
      return solarize(image, magnitude);
    case "AutoContrast":
      return autocontrast(image);
    case "Equalize":
      return equalize(image);
    default:
      throw new RangeError(`RandAugment: unknown op ${String(op)}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Drawing

/**
 * torchvision's `RandomResizedCrop.get_params`: up to 10 tries of a uniform area fraction and a
 * log-uniform aspect ratio, then a centred crop clamped to the ratio range.
 */
function drawCrop(
  rng: Rng,
  width: number,
  height: number,
  scale: readonly [number, number],
): TrainTransformParams["crop"] {
  const area = height * width;
  const logRatio = [Math.log(CROP_RATIO[0]), Math.log(CROP_RATIO[1])];
  for (let t = 0; t < 10; t++) {
    const target = area * rng.range(scale[0], scale[1]);
    const aspect = Math.exp(rng.range(logRatio[0], logRatio[1]));
    const w = roundHalfEven(Math.sqrt(target * aspect));
    const h = roundHalfEven(Math.sqrt(target / aspect));
    if (w > 0 && w <= width && h > 0 && h <= height) {
      return { top: rng.int(height - h + 1), left: rng.int(width - w + 1), height: h, width: w };
    }
  }
  const inRatio = width / height;
  let w = width, h = height;
  if (inRatio < CROP_RATIO[0]) h = roundHalfEven(w / CROP_RATIO[0]);
  else if (inRatio > CROP_RATIO[1]) w = roundHalfEven(h * CROP_RATIO[1]);
  return {
    top: Math.floor((height - h) / 2),
    left: Math.floor((width - w) / 2),
    height: h,
    width: w,
  };
}

/** torchvision's RandomApply: it skips when `p < rand`, so it applies when rand <= p. */
const applies = (rng: Rng, p: number) => !(p < rng.uniform());

/** Draws every decision of one application for a `width` x `height` input image. */
export function drawTrainTransform(
  rng: Rng,
  width: number,
  height: number,
  opts?: TrainTransformOptions,
): TrainTransformParams {
  const o = resolveTrainTransformOptions(opts);
  checkInt("image width", width, 1);
  checkInt("image height", height, 1);

  const randAugment: TrainTransformParams["randAugment"] = [];
  if (o.randAugment) {
    // RandAugment's ops keep the image size, so every op sees the input's size.
    const space = randAugmentSpace(o.randAugment.bins, height, width);
    for (let k = 0; k < o.randAugment.ops; k++) {
      const op = RANDAUGMENT_OPS[rng.int(RANDAUGMENT_OPS.length)];
      const { magnitudes, signed } = space[op];
      let magnitude = magnitudes.length > 1 ? magnitudes[o.randAugment.magnitude] : 0;
      if (signed && rng.int(2)) magnitude *= -1;
      randAugment.push({ op, magnitude });
    }
  }

  const crop = drawCrop(rng, width, height, o.scale);
  const flip = rng.uniform() < o.flipP;

  let jitter: TrainTransformParams["jitter"] = null;
  if (o.jitter && applies(rng, o.jitter.p)) {
    const j = o.jitter;
    // ColorJitter.get_params: a random order, then each enabled factor in a fixed order.
    const order = [0, 1, 2, 3];
    for (let i = order.length - 1; i > 0; i--) {
      const r = rng.int(i + 1);
      [order[i], order[r]] = [order[r], order[i]];
    }
    const ranges: ([number, number] | null)[] = [j.brightness, j.contrast, j.saturation].map(
      (v) => (v === 0 ? null : [Math.max(0, 1 - v), 1 + v]),
    );
    ranges.push(j.hue === 0 ? null : [-j.hue, j.hue]);
    const factors = ranges.map((r) => (r ? rng.range(r[0], r[1]) : null));
    jitter = order.filter((k) => factors[k] !== null).map((k) => ({
      op: JITTER_OPS[k],
      factor: factors[k] as number,
    }));
  }

  const gray = rng.uniform() < o.grayscaleP;
  let blur: TrainTransformParams["blur"] = null;
  if (o.blur && applies(rng, o.blur.p)) {
    blur = { kernel: o.blur.kernel, sigma: rng.range(o.blur.sigma[0], o.blur.sigma[1]) };
  }
  let sol: TrainTransformParams["solarize"] = null;
  if (o.solarize && rng.uniform() < o.solarize.p) sol = { threshold: o.solarize.threshold };

  return { size: o.size, randAugment, crop, flip, jitter, grayscale: gray, blur, solarize: sol };
}

// ---------------------------------------------------------------------------------------------
// Applying

const JITTER_FN: Record<JitterOp, (image: RgbImage, factor: number) => RgbImage> = {
  brightness: adjustBrightness,
  contrast: adjustContrast,
  saturation: adjustSaturation,
  hue: adjustHue,
};

/** Replays a drawn record on an image; returns a `params.size` x `params.size` image. */
export function applyTrainTransform(image: RgbImage, params: TrainTransformParams): RgbImage {
  checkInt("params.size", params.size, 1, 1 << 15);
  let img = image;
  for (const { op, magnitude } of params.randAugment) {
    if (!RANDAUGMENT_OPS.includes(op)) fail(`unknown RandAugment op ${String(op)}`);
    img = applyRandAugmentOp(img, op, magnitude);
  }
  const { top, left, height, width } = params.crop;
  if (
    ![top, left, height, width].every(Number.isInteger) || top < 0 || left < 0 || height < 1 ||
    width < 1 || top + height > img.height || left + width > img.width
  ) {
    fail(
      `crop ${JSON.stringify(params.crop)} does not fit a ${img.width}x${img.height} image`,
    );
  }
  img = resizedCrop(img, top, left, height, width, params.size);
  if (params.flip) img = hflip(img);
  for (const { op, factor } of params.jitter ?? []) {
    const fn = JITTER_FN[op];
    if (!fn) fail(`unknown jitter op ${String(op)}`);
    img = fn(img, factor);
  }
  if (params.grayscale) img = grayscale(img);
  if (params.blur) img = gaussianBlur(img, params.blur.kernel, params.blur.sigma);
  if (params.solarize) img = solarize(img, params.solarize.threshold);
  return img;
}

/** Draws and applies one random training transform. */
export function trainTransform(
  image: RgbImage,
  rng: Rng,
  opts?: TrainTransformOptions,
): RgbImage {
  return applyTrainTransform(image, drawTrainTransform(rng, image.width, image.height, opts));
}

/**
 * torchvision's `ToTensor()` + `Normalize(mean, std)`: float32 [3, H, W], channel-major,
 * x = v / 255 in float32, then (x - mean) / std in float32. Defaults: OpenAI CLIP's mean and std.
 */
export function toNormalizedFloat(
  image: RgbImage,
  mean: readonly number[] = OPENAI_CLIP_MEAN,
  std: readonly number[] = OPENAI_CLIP_STD,
): Float32Array {
  if (mean.length !== 3 || std.length !== 3) {
    throw new RangeError("toNormalizedFloat: mean and std need one value per RGB channel");
  }
  if (std.some((s) => !Number.isFinite(s) || s === 0) || mean.some((m) => !Number.isFinite(m))) {
    throw new RangeError("toNormalizedFloat: mean must be finite and std finite and non-zero");
  }
  const plane = image.width * image.height;
  if (image.data.length !== plane * 3) {
    throw new RangeError(
      `toNormalizedFloat: ${image.data.length} bytes for a ${image.width}x${image.height} image`,
    );
  }
  return normalizeRgb(image.data, mean, std);
}
