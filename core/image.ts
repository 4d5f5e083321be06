/**
 * Images: decoding to 8-bit RGB the way the Python reference loads them
 * (`PIL.Image.open(p).convert("RGB")`), encoding, tensor conversion and CLIP preprocessing.
 *
 * Decoding uses sharp (libvips with libjpeg-turbo, libpng, libwebp), whose decoders agree with
 * Pillow's pixel for pixel, lossy JPEG and WebP included, once sharp's colour management is
 * switched off; BMP, which libvips does not read, is decoded as Pillow does it (bmp.ts). Conversion to RGB then follows Pillow's `convert("RGB")`:
 * - alpha is dropped, not composited (RGBA, LA, palette or colour-key transparency);
 * - grayscale and 1-bit images are replicated into three channels;
 * - CMYK (e.g. Adobe JPEG) uses Pillow's naive formula `R = (255 - K) * (1 - C / 255)`, no ICC;
 * - embedded ICC profiles are ignored; EXIF orientation is ignored unless `exifTranspose` is set;
 * - 16-bit RGB(A) keeps the high byte, as Pillow does.
 * One deliberate difference: Pillow saturates 16-bit grayscale ("I;16") to 255 for every value
 * above 255, which turns such images white; here they keep their high byte like 16-bit RGB does.
 *
 * Resizing is Pillow-exact (see resample.ts), so CLIP preprocessing matches transformers'
 * CLIPImageProcessor (PIL backend) to the last float32 bit.
 */
import type SharpType from "sharp";
import { fromHost, ops, type Tensor } from "../ffi/mod.ts";
import { UserError } from "../ffi/errors.ts";
import { normalizeRgb } from "./normalize.ts";
import { resample, type ResampleFilter, type ResampleOptions } from "./resample.ts";
import { decodeBmp, isBmp } from "./bmp.ts";

export {
  type PixelBox,
  RESAMPLE_FILTERS,
  type ResampleFilter,
  type ResampleOptions,
} from "./resample.ts";

/** An 8-bit RGB image, rows top to bottom, pixels interleaved: `data[(y * width + x) * 3 + c]`. */
export interface RgbImage {
  /** Pixels per row. */
  readonly width: number;
  /** Rows. */
  readonly height: number;
  /** width x height x 3 bytes. */
  readonly data: Uint8Array;
}

/** A file or buffer that is not a readable image: the user's to replace. */
export class ImageDecodeError extends UserError {
  /** `source`: the file (or what the bytes came from); `reason`: why decoding failed. */
  constructor(readonly source: string, reason: string) {
    super(`cannot decode image ${source}: ${reason}`);
  }
}

type Sharp = typeof SharpType;
let sharpModule: Promise<Sharp> | undefined;

/** sharp loads libvips (tens of MB), so only code that decodes or encodes pays for it. */
function loadSharp(): Promise<Sharp> {
  sharpModule ??= import("sharp").then((m) => m.default as Sharp);
  return sharpModule;
}

/** How images are decoded. */
export interface DecodeOptions {
  /** Rotate/flip by the EXIF orientation tag (Pillow's `ImageOps.exif_transpose`). Default false,
   * like the reference code, which never applies it. */
  exifTranspose?: boolean;
}

/** Checks that `data` holds a `width` x `height` RGB image. */
export function assertRgbImage(image: RgbImage, what = "image"): void {
  const { width, height, data } = image;
  if (!Number.isInteger(width) || !Number.isInteger(height) || width < 1 || height < 1) {
    throw new RangeError(`${what}: size must be positive integers, got ${width}x${height}`);
  }
  if (!(data instanceof Uint8Array) || data.length !== width * height * 3) {
    throw new RangeError(
      `${what}: data must be a Uint8Array of ${width * height * 3} bytes (HWC RGB), got ${
        data?.length ?? data
      }`,
    );
  }
}

/**
 * Decodes an encoded image (JPEG, PNG, WebP, BMP, GIF first frame, TIFF, AVIF, ...) to RGB.
 * `source` names the input in error messages (a path, a URL, an archive member).
 */
export async function decodeImage(
  bytes: Uint8Array,
  source = "<buffer>",
  opts: DecodeOptions = {},
): Promise<RgbImage> {
  if (bytes.length === 0) throw new ImageDecodeError(source, "the file is empty");
  // libvips has no BMP loader.
  if (isBmp(bytes)) {
    try {
      return decodeBmp(bytes);
    } catch (e) {
      throw new ImageDecodeError(source, e instanceof Error ? e.message : String(e));
    }
  }
  const sharp = await loadSharp();
  // failOn "error" rejects truncated or broken data as Pillow does, but tolerates the benign
  // warnings (odd ICC chunks, extraneous bytes) that Pillow ignores too.
  const img = sharp(bytes, { ignoreIcc: true, failOn: "error" });
  let raw: { data: Uint8Array; info: { width: number; height: number; channels: number } };
  let cmyk = false;
  try {
    // Asking sharp for the colour space costs a round trip; the header answers for most files.
    if (mayBeCmyk(bytes)) cmyk = (await img.metadata()).space === "cmyk";
    // Keep the raw CMYK samples: sharp would otherwise convert them through an ICC profile.
    if (cmyk) img.pipelineColourspace("cmyk").toColourspace("cmyk");
    if (opts.exifTranspose) img.autoOrient();
    raw = await img.raw({ depth: "uchar" }).toBuffer({ resolveWithObject: true });
  } catch (e) {
    throw new ImageDecodeError(source, explainSharpError(e));
  }
  const { width, height, channels } = raw.info;
  const data = cmyk
    ? cmykToRgb(raw.data, width * height)
    : toRgb(raw.data, width * height, channels);
  return { width, height, data };
}

/**
 * False when the header shows that the image cannot be CMYK: PNG, GIF and WebP never are, and a
 * JPEG is when its frame has four components. True for anything else (ask the decoder).
 */
function mayBeCmyk(b: Uint8Array): boolean {
  const ascii = (at: number, s: string) =>
    b.length >= at + s.length && [...s].every((c, i) => b[at + i] === c.charCodeAt(0));
  if (ascii(1, "PNG") && b[0] === 0x89) return false;
  if (ascii(0, "GIF8") || (ascii(0, "RIFF") && ascii(8, "WEBP"))) return false;
  if (b[0] !== 0xff || b[1] !== 0xd8) return true;
  // JPEG markers up to the start of frame: FF, a code, then (for most) a 2-byte length.
  let i = 2;
  while (i + 9 < b.length) {
    if (b[i] !== 0xff) return true;
    const code = b[i + 1];
    if (code === 0xff) {
      i++; // fill byte
      continue;
    }
    if (code === 0x01 || (code >= 0xd0 && code <= 0xd8)) {
      i += 2; // no length
      continue;
    }
    // SOF0-SOF15, except DHT (C4), JPG (C8) and DAC (CC): precision, height, width, components.
    if (code >= 0xc0 && code <= 0xcf && code !== 0xc4 && code !== 0xc8 && code !== 0xcc) {
      return b[i + 9] === 4;
    }
    i += 2 + ((b[i + 2] << 8) | b[i + 3]);
  }
  return true;
}

function explainSharpError(e: unknown): string {
  const msg = e instanceof Error ? e.message : String(e);
  if (/unsupported image format/i.test(msg)) {
    return "not an image in a supported format (JPEG, PNG, WebP, BMP, GIF, TIFF, AVIF)";
  }
  return `corrupt or truncated data (${msg.trim()})`;
}

/** Reads and decodes an image file; every failure names the file. */
export async function readImage(path: string, opts: DecodeOptions = {}): Promise<RgbImage> {
  let bytes: Uint8Array;
  try {
    bytes = await Deno.readFile(path);
  } catch (e) {
    throw new ImageDecodeError(path, e instanceof Error ? e.message : String(e));
  }
  return await decodeImage(bytes, path, opts);
}

function toRgb(src: Uint8Array, pixels: number, channels: number): Uint8Array {
  if (channels === 3) {
    // sharp's Node Buffer may view a larger shared allocation: copied unless it owns its memory.
    const n = pixels * 3;
    const owned = src.byteOffset === 0 && src.buffer.byteLength === n;
    return owned ? new Uint8Array(src.buffer, 0, n) : new Uint8Array(src.subarray(0, n));
  }
  const out = new Uint8Array(pixels * 3);
  if (channels >= 3) {
    for (let i = 0, j = 0; i < pixels; i++, j += channels) {
      out[i * 3] = src[j];
      out[i * 3 + 1] = src[j + 1];
      out[i * 3 + 2] = src[j + 2];
    }
  } else {
    // Grayscale, with or without alpha.
    for (let i = 0, j = 0; i < pixels; i++, j += channels) {
      out[i * 3] = out[i * 3 + 1] = out[i * 3 + 2] = src[j];
    }
  }
  return out;
}

/** Pillow's CMYK -> RGB: `255 - K - C * (255 - K) / 255`, with its integer rounding. */
function cmykToRgb(src: Uint8Array, pixels: number): Uint8Array {
  const out = new Uint8Array(pixels * 3);
  for (let i = 0; i < pixels; i++) {
    const nk = 255 - src[i * 4 + 3];
    for (let c = 0; c < 3; c++) {
      const t = src[i * 4 + c] * nk + 128;
      out[i * 3 + c] = nk - (((t >> 8) + t) >> 8);
    }
  }
  return out;
}

/** The encodings images are written in. */
export type ImageFormat = "png" | "jpeg" | "webp";

/** Encoder settings. */
export interface EncodeOptions {
  /** JPEG/WebP quality 1-100 (default 95). Ignored for PNG, which is lossless. */
  quality?: number;
  /** WebP only: lossless encoding (default false). */
  lossless?: boolean;
}

/** Encodes an RGB image as PNG, JPEG (4:2:0 chroma) or WebP. */
export async function encodeImage(
  image: RgbImage,
  format: ImageFormat,
  opts: EncodeOptions = {},
): Promise<Uint8Array> {
  assertRgbImage(image);
  const quality = opts.quality ?? 95;
  if (!Number.isInteger(quality) || quality < 1 || quality > 100) {
    throw new RangeError(`encodeImage: quality must be an integer in 1..100, got ${quality}`);
  }
  const sharp = await loadSharp();
  const img = sharp(image.data, { raw: { width: image.width, height: image.height, channels: 3 } });
  switch (format) {
    case "png":
      img.png();
      break;
    case "jpeg":
      img.jpeg({ quality });
      break;
    case "webp":
      img.webp({ quality, lossless: opts.lossless ?? false });
      break;
    default:
      throw new RangeError(`encodeImage: unknown format "${format}" (png, jpeg or webp)`);
  }
  return new Uint8Array(await img.toBuffer());
}

/** The image formats by file extension (lower case, without the dot). */
export const IMAGE_EXTENSIONS: Readonly<Record<string, ImageFormat>> = Object.freeze(
  // No prototype: a name like "x.constructor" must not find an inherited property.
  Object.assign(Object.create(null), { png: "png", jpg: "jpeg", jpeg: "jpeg", webp: "webp" }),
);

/** Writes an image; the format comes from the extension (.png, .jpg/.jpeg, .webp). */
export async function writeImage(
  path: string,
  image: RgbImage,
  opts: EncodeOptions = {},
): Promise<void> {
  const ext = path.slice(path.lastIndexOf(".") + 1).toLowerCase();
  const format = IMAGE_EXTENSIONS[ext];
  if (!format) {
    throw new RangeError(`writeImage ${path}: unknown extension (use .png, .jpg, .jpeg or .webp)`);
  }
  await Deno.writeFile(path, await encodeImage(image, format, opts));
}

// ---------------------------------------------------------------------------------------------
// Geometry

/**
 * Pillow-exact `Image.resize((width, height), filter)`; the filter defaults to bicubic. `opts`
 * resizes a window of the image and/or keeps a window of the result (see `ResampleOptions`).
 */
export function resizeImage(
  image: RgbImage,
  width: number,
  height: number,
  filter: ResampleFilter = "bicubic",
  opts: ResampleOptions = {},
): RgbImage {
  assertRgbImage(image);
  const out = resample({ ...image, channels: 3 }, width, height, filter, opts);
  return { width: out.width, height: out.height, data: out.data };
}

/**
 * The size that makes the shorter side `size` and keeps the aspect ratio, truncating the longer
 * side like transformers' `get_resize_output_image_size(default_to_square=False)` and
 * torchvision's `Resize(int)`.
 */
export function shortestEdgeSize(
  width: number,
  height: number,
  size: number,
): { width: number; height: number } {
  if (width <= height) return { width: size, height: Math.trunc((size * height) / width) };
  return { width: Math.trunc((size * width) / height), height: size };
}

/**
 * Copies a `width` x `height` window whose top-left corner is at (`left`, `top`) in the source;
 * pixels outside the source are black (how both libraries pad an image smaller than the crop).
 */
export function cropImage(
  image: RgbImage,
  left: number,
  top: number,
  width: number,
  height: number,
): RgbImage {
  assertRgbImage(image);
  const out = new Uint8Array(width * height * 3);
  const x0 = Math.max(0, -left);
  const x1 = Math.min(width, image.width - left);
  if (x1 > x0) {
    for (let y = 0; y < height; y++) {
      const sy = y + top;
      if (sy < 0 || sy >= image.height) continue;
      const from = (sy * image.width + left + x0) * 3;
      out.set(image.data.subarray(from, from + (x1 - x0) * 3), (y * width + x0) * 3);
    }
  }
  return { width, height, data: out };
}

/** Python's `round()`: halves go to the even neighbour. */
function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/**
 * Where a centred crop starts along one axis, as a (possibly negative) source offset.
 * transformers floors `(size - crop) / 2`; torchvision rounds it half-to-even, and when it has to
 * pad it puts the odd pixel of padding after the image rather than before.
 */
function centerOffset(size: number, crop: number, flavor: PreprocessFlavor): number {
  if (flavor === "transformers") return Math.floor((size - crop) / 2);
  return size >= crop ? roundHalfEven((size - crop) / 2) : -Math.floor((crop - size) / 2);
}

/** Centre crop (zero-padded when the image is smaller), with transformers' offset by default. */
export function centerCrop(
  image: RgbImage,
  width: number,
  height: number,
  flavor: PreprocessFlavor = "transformers",
): RgbImage {
  const left = centerOffset(image.width, width, flavor);
  const top = centerOffset(image.height, height, flavor);
  return cropImage(image, left, top, width, height);
}

// ---------------------------------------------------------------------------------------------
// Tensors

/** Float [3, H, W] (one image) or [B, 3, H, W] (a list of equal-sized images) in [0, 1]. */
export function imageToTensor(image: RgbImage): Tensor;
export function imageToTensor(images: readonly RgbImage[]): Tensor;
export function imageToTensor(input: RgbImage | readonly RgbImage[]): Tensor {
  const list = Array.isArray(input) ? input : [input as RgbImage];
  if (list.length === 0) throw new RangeError("imageToTensor: no images");
  const { width, height } = list[0];
  const plane = width * height;
  const out = new Float32Array(list.length * 3 * plane);
  list.forEach((img, b) => {
    assertRgbImage(img, `imageToTensor: image ${b}`);
    if (img.width !== width || img.height !== height) {
      throw new RangeError(
        `imageToTensor: image ${b} is ${img.width}x${img.height}, image 0 is ${width}x${height}`,
      );
    }
    // float32 division, like torchvision's to_tensor.
    for (let i = 0; i < plane; i++) {
      for (let c = 0; c < 3; c++) out[(b * 3 + c) * plane + i] = img.data[i * 3 + c] / 255;
    }
  });
  const shape = [3, height, width];
  return fromHost(out, Array.isArray(input) ? [list.length, ...shape] : shape, "f32");
}

export interface FromTensorOptions {
  /** "round" (default): diffusers' `numpy_to_pil`, `(x * 255).round()` with halves to even;
   * "truncate": torchvision's `to_pil_image`, `(x * 255).byte()`. Values are clamped to [0, 1]. */
  rounding?: "round" | "truncate";
}

/** RGB images from a float [3, H, W] or [B, 3, H, W] tensor in [0, 1] (any dtype or device). */
export function imageFromTensor(t: Tensor, opts?: FromTensorOptions): RgbImage | RgbImage[] {
  const shape = t.shape;
  if ((shape.length !== 3 && shape.length !== 4) || shape[shape.length - 3] !== 3) {
    throw new RangeError(
      `imageFromTensor: expected a [3, H, W] or [B, 3, H, W] tensor, got [${shape.join(", ")}]`,
    );
  }
  let host: Float32Array;
  if (t.dtype === "f32" && t.device === "cpu") {
    host = t.toHost() as Float32Array;
  } else {
    using c = ops.to(t, "f32", "cpu");
    host = c.toHost() as Float32Array;
  }
  const truncate = opts?.rounding === "truncate";
  const [height, width] = shape.slice(-2);
  const plane = width * height;
  const batch = shape.length === 4 ? shape[0] : 1;
  const images: RgbImage[] = [];
  for (let b = 0; b < batch; b++) {
    const data = new Uint8Array(plane * 3);
    for (let c = 0; c < 3; c++) {
      const base = (b * 3 + c) * plane;
      for (let i = 0; i < plane; i++) {
        const x = host[base + i];
        // NaN compares false everywhere and ends up 0.
        const v = x > 0 ? (x < 1 ? Math.fround(x * 255) : 255) : 0;
        data[i * 3 + c] = truncate ? Math.trunc(v) : roundHalfEven(v);
      }
    }
    images.push({ width, height, data });
  }
  return shape.length === 4 ? images : images[0];
}

// ---------------------------------------------------------------------------------------------
// CLIP preprocessing

export const OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073] as const;
export const OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711] as const;

/**
 * Whose arithmetic to reproduce. "transformers": CLIPImageProcessor with the PIL backend
 * (`CLIPImageProcessorPil`; the slow `CLIPImageProcessor` of transformers 4), used by DIPSY and
 * the IP-Adapter image encoder. "torchvision": `Resize(size, BICUBIC), CenterCrop(size),
 * ToTensor(), Normalize(mean, std)` on PIL images, the OpenAI CLIP / open_clip transform.
 * They differ only in the crop offset when the excess is odd: transformers' float64 `x * (1/255)`
 * and torchvision's float32 `x / 255` round to the same float32 for every 8-bit x.
 */
export type PreprocessFlavor = "transformers" | "torchvision";

export interface ClipPreprocessOptions {
  /** Shorter side after resizing (default 224). */
  size?: number;
  /** Side of the square centre crop (default `size`). */
  cropSize?: number;
  mean?: readonly number[];
  std?: readonly number[];
  /** Default "bicubic". */
  resample?: ResampleFilter;
  /** Default "transformers". */
  flavor?: PreprocessFlavor;
}

/** One image preprocessed into a [3, crop, crop] float32 array (channel-major). */
export function clipPreprocessHost(
  image: RgbImage,
  opts: ClipPreprocessOptions = {},
): Float32Array {
  const size = opts.size ?? 224;
  const crop = opts.cropSize ?? size;
  const mean = opts.mean ?? OPENAI_CLIP_MEAN;
  const std = opts.std ?? OPENAI_CLIP_STD;
  if (mean.length !== 3 || std.length !== 3) {
    throw new RangeError("clipPreprocess: mean and std need one value per RGB channel");
  }
  const { data } = resizeCentreCrop(image, size, crop, opts.resample ?? "bicubic", opts.flavor);
  // transformers rescales by the double 1/255 and casts to float32, torchvision divides in
  // float32: the same value for every byte. Both normalise in float32 with float32 constants.
  return normalizeRgb(data, mean, std);
}

/**
 * The shortest-edge resize to `size` followed by a centre crop of `crop` x `crop`, resampling
 * only the pixels that the crop keeps (the same bytes as resizing everything, then cropping).
 */
export function resizeCentreCrop(
  image: RgbImage,
  size: number,
  crop: number,
  filter: ResampleFilter = "bicubic",
  flavor: PreprocessFlavor = "transformers",
): RgbImage {
  const target = shortestEdgeSize(image.width, image.height, size);
  const left = centerOffset(target.width, crop, flavor);
  const top = centerOffset(target.height, crop, flavor);
  // The part of the crop window that lies on the resized image; the rest is black padding.
  const x0 = Math.max(0, left), x1 = Math.min(target.width, left + crop);
  const y0 = Math.max(0, top), y1 = Math.min(target.height, top + crop);
  const region = { left: x0, top: y0, width: x1 - x0, height: y1 - y0 };
  const kept = resizeImage(image, target.width, target.height, filter, { region });
  if (region.width === crop && region.height === crop) return kept;
  return cropImage(kept, left - x0, top - y0, crop, crop);
}

/** CLIP pixel values for a batch of images: a CPU float32 tensor [B, 3, crop, crop]. */
export function clipPreprocess(
  images: RgbImage | readonly RgbImage[],
  opts: ClipPreprocessOptions = {},
): Tensor {
  const list = Array.isArray(images) ? images : [images as RgbImage];
  if (list.length === 0) throw new RangeError("clipPreprocess: no images");
  const crop = opts.cropSize ?? opts.size ?? 224;
  const plane = 3 * crop * crop;
  const out = new Float32Array(list.length * plane);
  list.forEach((img, b) => out.set(clipPreprocessHost(img, opts), b * plane));
  return fromHost(out, [list.length, 3, crop, crop], "f32");
}
