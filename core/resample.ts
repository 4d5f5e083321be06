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

import { type ResampleKernels, resampleKernels } from "./resample_wasm.ts";
import { Arena } from "./wasm.ts";

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

/**
 * The filter taps of a run of consecutive output pixels `from`, `from + 1`, ...: for each, the
 * first input index, the tap count and `ksize` fixed-point weights.
 */
interface Coefficients {
  ksize: number;
  first: Int32Array;
  count: Int32Array;
  weights: Int32Array;
}

function coefficients(
  inSize: number,
  outSize: number,
  kernel: Kernel,
  from = 0,
  n = outSize,
): Coefficients {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = kernel.support * filterScale;
  const ksize = Math.ceil(support) * 2 + 1;
  const first = new Int32Array(n);
  const count = new Int32Array(n);
  const weights = new Int32Array(n * ksize);
  const inv = 1 / filterScale;
  const w = new Float64Array(ksize);
  for (let j = 0; j < n; j++) {
    const center = (from + j + 0.5) * scale;
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
      weights[j * ksize + x] = k < 0 ? Math.trunc(-0.5 + k * ONE) : Math.trunc(0.5 + k * ONE);
    }
    first[j] = xmin;
    count[j] = xmax;
  }
  return { ksize, first, count, weights };
}

/** Recently used coefficients: images of one size share them (at most `CACHED` are kept). */
const cache = new Map<string, Coefficients>();
const CACHED = 32;

function cachedCoefficients(
  inSize: number,
  outSize: number,
  filter: ResampleFilter,
  from: number,
  n: number,
): Coefficients {
  const key = `${filter} ${inSize} ${outSize} ${from} ${n}`;
  let co = cache.get(key);
  if (!co) {
    co = coefficients(inSize, outSize, KERNELS[filter], from, n);
    if (cache.size >= CACHED) cache.delete(cache.keys().next().value!);
    cache.set(key, co);
  }
  return co;
}

/** The input span [start, end) that a run of taps reads (starts and ends only grow along it). */
function span(co: Coefficients): [number, number] {
  const last = co.first.length - 1;
  return [co.first[0], co.first[last] + co.count[last]];
}

/** The 8-bit value of a fixed-point sum: arithmetic shift, then clamp to [0, 255]. */
function clip8(acc: number): number {
  // `>>` wraps like the C int accumulator; the sums never come close to overflowing.
  const v = acc >> PRECISION_BITS;
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

/**
 * Interleaved 8-bit pixels seen through an origin and a row stride: pixel (x, y) channel c is
 * `data[offset + y * stride + x * channels + c]`. The origin may lie before the data (a negative
 * offset) when the pixels held start at some x or y > 0.
 */
interface View {
  data: Uint8Array;
  offset: number;
  stride: number;
}

/** Filters `rows` rows along x: output pixel j of row y reads input x = first[j] ... */
function horizontalPass(src: View, rows: number, ch: number, co: Coefficients): Uint8Array {
  const { data, offset, stride } = src;
  const { ksize, first, count, weights } = co;
  const outWidth = first.length;
  const out = new Uint8Array(outWidth * rows * ch);
  for (let y = 0; y < rows; y++) {
    const inRow = offset + y * stride;
    const outRow = y * outWidth * ch;
    if (ch === 3) {
      // RGB, the common case: the three channels share each tap's weight and address.
      for (let j = 0; j < outWidth; j++) {
        let p = inRow + first[j] * 3;
        const n = count[j];
        const k0 = j * ksize;
        let r = HALF, g = HALF, b = HALF;
        // int32 wrap-around arithmetic, as Pillow's C int accumulators.
        for (let x = 0; x < n; x++, p += 3) {
          const w = weights[k0 + x];
          r = (r + Math.imul(data[p], w)) | 0;
          g = (g + Math.imul(data[p + 1], w)) | 0;
          b = (b + Math.imul(data[p + 2], w)) | 0;
        }
        const o = outRow + j * 3;
        out[o] = clip8(r);
        out[o + 1] = clip8(g);
        out[o + 2] = clip8(b);
      }
      continue;
    }
    for (let j = 0; j < outWidth; j++) {
      const base = inRow + first[j] * ch;
      const n = count[j];
      const k0 = j * ksize;
      for (let c = 0; c < ch; c++) {
        let acc = HALF;
        for (let x = 0; x < n; x++) {
          acc = (acc + Math.imul(data[base + x * ch + c], weights[k0 + x])) | 0;
        }
        out[outRow + j * ch + c] = clip8(acc);
      }
    }
  }
  return out;
}

/** Filters `cols` columns along y: output row i reads input rows first[i] ... */
function verticalPass(src: View, cols: number, ch: number, co: Coefficients): Uint8Array {
  const { data, offset, stride } = src;
  const { ksize, first, count, weights } = co;
  const outHeight = first.length;
  const bytes = cols * ch;
  const out = new Uint8Array(outHeight * bytes);
  // Whole input rows at a time, two taps per sweep, so memory is read in order and the sums
  // make half as many trips through `acc`; int32 wrap-around arithmetic, as Pillow's C int
  // accumulators (a sum of two products cannot leave the range that `| 0` wraps exactly).
  const acc = new Int32Array(bytes);
  for (let i = 0; i < outHeight; i++) {
    const base = offset + first[i] * stride;
    const n = count[i];
    const k0 = i * ksize;
    let t = 0;
    if (n >= 2) {
      const w0 = weights[k0], w1 = weights[k0 + 1];
      const r0 = base, r1 = base + stride;
      for (let x = 0; x < bytes; x++) {
        acc[x] = (HALF + Math.imul(data[r0 + x], w0) + Math.imul(data[r1 + x], w1)) | 0;
      }
      t = 2;
    } else {
      acc.fill(HALF);
    }
    for (; t + 1 < n; t += 2) {
      const w0 = weights[k0 + t], w1 = weights[k0 + t + 1];
      const r0 = base + t * stride, r1 = r0 + stride;
      for (let x = 0; x < bytes; x++) {
        acc[x] = (acc[x] + Math.imul(data[r0 + x], w0) + Math.imul(data[r1 + x], w1)) | 0;
      }
    }
    const outRow = i * bytes;
    if (t < n) {
      // The odd last tap, fused with the final rounding.
      const w = weights[k0 + t];
      const row = base + t * stride;
      for (let x = 0; x < bytes; x++) {
        out[outRow + x] = clip8((acc[x] + Math.imul(data[row + x], w)) | 0);
      }
    } else {
      for (let x = 0; x < bytes; x++) out[outRow + x] = clip8(acc[x]);
    }
  }
  return out;
}

/** A window of whole pixels. */
export interface PixelBox {
  readonly left: number;
  readonly top: number;
  readonly width: number;
  readonly height: number;
}

export interface ResampleOptions {
  /**
   * Resize this window of the source as if it had been cropped out first (Pillow's
   * `crop(box).resize(size)`: the filters stop at the window's edges; this is not the float
   * `box` of `Image.resize`, whose filters read past it). Default: the whole source.
   */
  source?: PixelBox;
  /**
   * Compute only this window of the output. Each output pixel depends only on the input pixels
   * under its own filter, so the result is exactly that crop of the full resize, made without
   * the pixels outside it (a resize followed by a centre crop). Default: the whole output.
   */
  region?: PixelBox;
}

function checkBox(what: string, box: PixelBox, width: number, height: number): void {
  const { left, top, width: w, height: h } = box;
  if (
    ![left, top, w, h].every(Number.isInteger) || left < 0 || top < 0 || w < 1 || h < 1 ||
    left + w > width || top + h > height
  ) {
    throw new RangeError(
      `resample: ${what} ${JSON.stringify(box)} does not lie in a ${width}x${height} image`,
    );
  }
}

/** Copies `rows` rows of `bytes` bytes out of a view. */
function copyRows(src: View, rows: number, bytes: number): Uint8Array {
  const out = new Uint8Array(rows * bytes);
  for (let y = 0; y < rows; y++) {
    const from = src.offset + y * src.stride;
    out.set(src.data.subarray(from, from + bytes), y * bytes);
  }
  return out;
}

/** Where the passes run. Views are in the source window's coordinates unless noted. */
interface Engine {
  /** The window's rows [y0, y1) and columns [x0, x1), viewed with the window's origin. */
  input(src: Raster8, box: PixelBox, ys: [number, number], xs: [number, number]): View;
  /** The pass over `rows` rows of `src` (which starts at its first row), as a fresh view. */
  horizontal(src: View, rows: number, ch: number, co: Coefficients): View;
  vertical(src: View, cols: number, ch: number, co: Coefficients): View;
  /** The pixels of a view as an array of their own. */
  output(src: View, rows: number, bytes: number): Uint8Array;
}

const typescriptEngine: Engine = {
  input: (src, box) => ({
    data: src.data,
    offset: (box.top * src.width + box.left) * src.channels,
    stride: src.width * src.channels,
  }),
  horizontal: (src, rows, ch, co) => ({
    data: horizontalPass(src, rows, ch, co),
    offset: 0,
    stride: co.first.length * ch,
  }),
  vertical: (src, cols, ch, co) => ({
    data: verticalPass(src, cols, ch, co),
    offset: 0,
    stride: cols * ch,
  }),
  output: (src, rows, bytes) =>
    src.offset === 0 && src.stride === bytes && src.data.length === rows * bytes
      ? src.data
      : copyRows(src, rows, bytes),
};

/** The SIMD horizontal pass's spare bytes at the end of each output row. */
const SIMD_ROW_SLACK = 4;

/** The SIMD kernels over one workspace holding buffers of the given byte sizes. */
function simdEngine(k: ResampleKernels, sizes: number[]): Engine {
  const ws = new Arena(k.memory, sizes);
  return {
    input(src, box, [y0, y1], [x0, x1]) {
      const ch = src.channels;
      const bytes = (x1 - x0) * ch;
      const at = ws.alloc((y1 - y0) * bytes);
      for (let y = y0; y < y1; y++) {
        const from = ((box.top + y) * src.width + box.left + x0) * ch;
        ws.bytes.set(src.data.subarray(from, from + bytes), at + (y - y0) * bytes);
      }
      return { data: ws.bytes, offset: at - y0 * bytes - x0 * ch, stride: bytes };
    },
    horizontal(src, rows, ch, co) {
      const width = co.first.length;
      const stride = width * ch + SIMD_ROW_SLACK;
      const out = ws.alloc(rows * stride);
      const first = ws.int32(co.first), count = ws.int32(co.count), w = ws.int32(co.weights);
      const args = [src.offset, src.stride, rows, ch, out, stride, width, first, count, w];
      k.horizontal(...args, co.ksize);
      return { data: ws.bytes, offset: out, stride };
    },
    vertical(src, cols, ch, co) {
      const height = co.first.length;
      const out = ws.alloc(height * cols * ch);
      const first = ws.int32(co.first), count = ws.int32(co.count), w = ws.int32(co.weights);
      k.vertical(src.offset, src.stride, cols * ch, out, height, first, count, w, co.ksize);
      return { data: ws.bytes, offset: out, stride: cols * ch };
    },
    output: (src, rows, bytes) =>
      src.stride === bytes
        ? src.data.slice(src.offset, src.offset + rows * bytes)
        : copyRows(src, rows, bytes),
  };
}

/**
 * Resizes an interleaved 8-bit image to `width` x `height` exactly as Pillow's
 * `Image.resize((width, height), filter)` does for "L" and "RGB" images; with `opts`, resizes a
 * window of the source and/or returns a window of the output (see `ResampleOptions`), byte for
 * byte what cropping before and after would give.
 */
export function resample(
  src: Raster8,
  width: number,
  height: number,
  filter: ResampleFilter = "bicubic",
  opts: ResampleOptions = {},
): Raster8 {
  if (!Object.hasOwn(KERNELS, filter)) {
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
  const box = opts.source ?? { left: 0, top: 0, width: w, height: h };
  const region = opts.region ?? { left: 0, top: 0, width, height };
  checkBox("source", box, w, h);
  checkBox("region", region, width, height);
  const rowBytes = region.width * ch;
  const result = (bytes: Uint8Array): Raster8 => ({
    width: region.width,
    height: region.height,
    channels: ch,
    data: bytes,
  });

  const horizontal = width !== box.width
    ? cachedCoefficients(box.width, width, filter, region.left, region.width)
    : undefined;
  const vertical = height !== box.height
    ? cachedCoefficients(box.height, height, filter, region.top, region.height)
    : undefined;
  // The input rows and columns that the kept output pixels read.
  const ys = vertical
    ? span(vertical)
    : [region.top, region.top + region.height] as [number, number];
  const xs = horizontal
    ? span(horizontal)
    : [region.left, region.left + region.width] as [number, number];
  // Pillow 13 runs the vertical pass first when the image loses rows, and more than twice as many
  // rows as columns (seen in its ImagingResample). Each pass rounds to 8 bits, so the order shows.
  const lost = box.height - height;
  const verticalFirst = horizontal && vertical && lost > 0 && lost > 2 * (box.width - width);

  if (!horizontal && !vertical) {
    // Same size: a copy of the kept window.
    const from = ((box.top + region.top) * w + box.left + region.left) * ch;
    return result(copyRows({ data, offset: from, stride: w * ch }, region.height, rowBytes));
  }
  // The TypeScript passes are the readable statement of what the kernels do (see setKernels).
  let simd = ch <= 4 ? resampleKernels.exports : null;
  let engine = typescriptEngine;
  if (simd) {
    const mid = !horizontal || !vertical
      ? 0
      : verticalFirst
      ? region.height * (xs[1] - xs[0]) * ch
      : (ys[1] - ys[0]) * (rowBytes + SIMD_ROW_SLACK);
    const taps = [horizontal, vertical].flatMap((co) =>
      co ? [co.first.byteLength, co.count.byteLength, co.weights.byteLength] : []
    );
    const input = (ys[1] - ys[0]) * (xs[1] - xs[0]) * ch;
    const out = region.height * (rowBytes + SIMD_ROW_SLACK);
    const sizes = [input, mid, out, ...taps];
    if (Arena.fits(sizes)) engine = simdEngine(simd, sizes);
    else simd = null;
  }
  const input = engine.input(src, box, ys, xs);
  const columns = (v: View, x: number): View => ({ ...v, offset: v.offset + x * ch });
  const rows = (v: View, y: number): View => ({ ...v, offset: v.offset + y * v.stride });

  let out: View;
  if (verticalFirst) {
    const mid = engine.vertical(columns(input, xs[0]), xs[1] - xs[0], ch, vertical!);
    out = engine.horizontal(columns(mid, 0 - xs[0]), region.height, ch, horizontal!);
  } else if (!horizontal) {
    out = engine.vertical(columns(input, region.left), region.width, ch, vertical!);
  } else {
    out = engine.horizontal(rows(input, ys[0]), ys[1] - ys[0], ch, horizontal);
    if (vertical) out = engine.vertical(rows(out, 0 - ys[0]), region.width, ch, vertical);
  }
  const bytes = engine.output(out, region.height, rowBytes);
  if (simd) resampleKernels.trim();
  return result(bytes);
}
