/**
 * Pillow-exact resampling of 8-bit images (`Image.resize((w, h), filter)` with the default box
 * and no `reducing_gap`).
 *
 * The algorithm is Pillow's separable convolution: for each output pixel along an axis, a filter
 * centred on the matching input position and widened by the downscale factor (so downscaling
 * antialiases), normalised to sum 1, then turned into 22-bit fixed-point integers. The image is
 * filtered horizontally first, then vertically, each pass rounding and clamping to 8 bits. Every
 * rounding step below mirrors Pillow's C code, so results agree with PIL byte for byte; CLIP
 * preprocessing parity depends on it (one grey level moves an embedding noticeably).
 *
 * Channels are filtered independently. Pillow premultiplies alpha before resizing RGBA images;
 * this module does not, so give it RGB or grayscale data only.
 */

export type ResampleFilter = "box" | "bilinear" | "hamming" | "bicubic" | "lanczos";

export const RESAMPLE_FILTERS: readonly ResampleFilter[] = [
  "box",
  "bilinear",
  "hamming",
  "bicubic",
  "lanczos",
];

/** An interleaved 8-bit image: `data[(y * width + x) * channels + c]`. */
export interface Raster8 {
  readonly width: number;
  readonly height: number;
  readonly channels: number;
  readonly data: Uint8Array;
}

interface Kernel {
  /** Half-width of the filter at scale 1, in input pixels. */
  support: number;
  weight(x: number): number;
}

function sinc(x: number): number {
  if (x === 0) return 1;
  const px = x * Math.PI;
  return Math.sin(px) / px;
}

// Pillow writes the Hamming constants as C floats; they are widened to double before use.
const HAMMING_A = Math.fround(0.54);
const HAMMING_B = Math.fround(0.46);

const KERNELS: Record<ResampleFilter, Kernel> = {
  box: { support: 0.5, weight: (x) => (x > -0.5 && x <= 0.5 ? 1 : 0) },
  bilinear: {
    support: 1,
    weight: (x) => {
      const a = Math.abs(x);
      return a < 1 ? 1 - a : 0;
    },
  },
  hamming: {
    support: 1,
    weight: (x) => {
      const a = Math.abs(x);
      if (a === 0) return 1;
      if (a >= 1) return 0;
      const px = a * Math.PI;
      return (Math.sin(px) / px) * (HAMMING_A + HAMMING_B * Math.cos(px));
    },
  },
  bicubic: {
    // Keys' cubic convolution with a = -0.5, in the same operation order as Pillow.
    support: 2,
    weight: (x) => {
      const a = Math.abs(x);
      if (a < 1) return (1.5 * a - 2.5) * a * a + 1;
      if (a < 2) return (((a - 5) * a + 8) * a - 4) * -0.5;
      return 0;
    },
  },
  lanczos: {
    support: 3,
    weight: (x) => (x >= -3 && x < 3 ? sinc(x) * sinc(x / 3) : 0),
  },
};

/**
 * Fixed-point precision of the coefficients: 8 bits for the pixel value and 2 spare bits for
 * filters whose negative lobes make partial sums overshoot, within a signed 32-bit accumulator.
 */
const PRECISION_BITS = 32 - 8 - 2;
const ONE = 1 << PRECISION_BITS;
const HALF = 1 << (PRECISION_BITS - 1);

/** Per output pixel: the first input index, the tap count and `ksize` fixed-point weights. */
interface Coefficients {
  ksize: number;
  first: Int32Array;
  count: Int32Array;
  weights: Int32Array;
}

function coefficients(inSize: number, outSize: number, kernel: Kernel): Coefficients {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = kernel.support * filterScale;
  const ksize = Math.ceil(support) * 2 + 1;
  const first = new Int32Array(outSize);
  const count = new Int32Array(outSize);
  const weights = new Int32Array(outSize * ksize);
  const inv = 1 / filterScale;
  const w = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    // C casts to int (truncation toward zero), and a negative start is clamped to 0 anyway.
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    let sum = 0;
    for (let x = 0; x < xmax; x++) {
      w[x] = kernel.weight((x + xmin - center + 0.5) * inv);
      sum += w[x];
    }
    for (let x = 0; x < xmax; x++) {
      const k = sum !== 0 ? w[x] / sum : w[x];
      // Round half away from zero, then truncate, as Pillow's int conversion does.
      weights[xx * ksize + x] = k < 0 ? Math.trunc(-0.5 + k * ONE) : Math.trunc(0.5 + k * ONE);
    }
    first[xx] = xmin;
    count[xx] = xmax;
  }
  return { ksize, first, count, weights };
}

/** The 8-bit value of a fixed-point sum: arithmetic shift, then clamp to [0, 255]. */
function clip8(acc: number): number {
  // `>>` wraps like the C int accumulator; the sums never come close to overflowing.
  const v = acc >> PRECISION_BITS;
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

function horizontalPass(
  src: Raster8,
  rowStart: number,
  rows: number,
  outWidth: number,
  co: Coefficients,
): Uint8Array {
  const { width, channels: ch, data } = src;
  const out = new Uint8Array(outWidth * rows * ch);
  const { ksize, first, count, weights } = co;
  for (let y = 0; y < rows; y++) {
    const inRow = (y + rowStart) * width * ch;
    const outRow = y * outWidth * ch;
    if (ch === 3) {
      // RGB, the common case: the three channels share each tap's weight and address.
      for (let xx = 0; xx < outWidth; xx++) {
        let p = inRow + first[xx] * 3;
        const n = count[xx];
        const k0 = xx * ksize;
        let r = HALF, g = HALF, b = HALF;
        // int32 wrap-around arithmetic, as Pillow's C int accumulators.
        for (let x = 0; x < n; x++, p += 3) {
          const w = weights[k0 + x];
          r = (r + Math.imul(data[p], w)) | 0;
          g = (g + Math.imul(data[p + 1], w)) | 0;
          b = (b + Math.imul(data[p + 2], w)) | 0;
        }
        const o = outRow + xx * 3;
        out[o] = clip8(r);
        out[o + 1] = clip8(g);
        out[o + 2] = clip8(b);
      }
      continue;
    }
    for (let xx = 0; xx < outWidth; xx++) {
      const base = inRow + first[xx] * ch;
      const n = count[xx];
      const k0 = xx * ksize;
      for (let c = 0; c < ch; c++) {
        let acc = HALF;
        for (let x = 0; x < n; x++) acc += data[base + x * ch + c] * weights[k0 + x];
        out[outRow + xx * ch + c] = clip8(acc);
      }
    }
  }
  return out;
}

function verticalPass(
  src: Uint8Array,
  width: number,
  ch: number,
  rowOffset: number,
  outHeight: number,
  co: Coefficients,
): Uint8Array {
  const stride = width * ch;
  const out = new Uint8Array(outHeight * stride);
  const { ksize, first, count, weights } = co;
  // Whole input rows at a time, so memory is read in order; int32 wrap-around arithmetic, as
  // Pillow's C int accumulators.
  const acc = new Int32Array(stride);
  for (let yy = 0; yy < outHeight; yy++) {
    const base = (first[yy] - rowOffset) * stride;
    const n = count[yy];
    const k0 = yy * ksize;
    acc.fill(HALF);
    for (let y = 0; y < n; y++) {
      const w = weights[k0 + y];
      const row = base + y * stride;
      for (let i = 0; i < stride; i++) acc[i] = (acc[i] + Math.imul(src[row + i], w)) | 0;
    }
    const outRow = yy * stride;
    for (let i = 0; i < stride; i++) out[outRow + i] = clip8(acc[i]);
  }
  return out;
}

/**
 * Resizes an interleaved 8-bit image to `width` x `height` exactly as Pillow's
 * `Image.resize((width, height), filter)` does for "L" and "RGB" images.
 */
export function resample(
  src: Raster8,
  width: number,
  height: number,
  filter: ResampleFilter = "bicubic",
): Raster8 {
  const kernel = KERNELS[filter];
  if (!kernel) {
    throw new RangeError(
      `unknown resampling filter "${filter}" (expected one of ${RESAMPLE_FILTERS.join(", ")})`,
    );
  }
  for (const [what, v] of [["width", width], ["height", height]] as const) {
    if (!Number.isInteger(v) || v < 1) {
      throw new RangeError(`resample: output ${what} must be a positive integer, got ${v}`);
    }
  }
  const { width: w, height: h, channels: ch, data } = src;
  if (data.length !== w * h * ch) {
    throw new RangeError(`resample: ${data.length} bytes do not hold a ${w}x${h}x${ch} image`);
  }
  if (w === width && h === height) return { width, height, channels: ch, data: data.slice() };
  // Pillow 13 runs the vertical pass first when the image loses rows, and more than twice as many
  // rows as columns (seen in its ImagingResample). Each pass rounds to 8 bits, so the order shows.
  if (width !== w && h - height > 0 && h - height > 2 * (w - width)) {
    return resample(resample(src, w, height, filter), width, height, filter);
  }

  const vertical = coefficients(h, height, kernel);
  // The horizontal pass only needs the input rows that some output row reads.
  const rowStart = vertical.first[0];
  const rowEnd = vertical.first[height - 1] + vertical.count[height - 1];

  let cur = data;
  let curWidth = w;
  let rowOffset = 0;
  if (width !== w) {
    cur = horizontalPass(src, rowStart, rowEnd - rowStart, width, coefficients(w, width, kernel));
    curWidth = width;
    rowOffset = rowStart;
  }
  if (height !== h) cur = verticalPass(cur, curWidth, ch, rowOffset, height, vertical);
  return { width, height, channels: ch, data: cur };
}
