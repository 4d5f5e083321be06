/**
 * Windows BMP decoding to RGB, as Pillow 13's BmpImagePlugin reads a file and `convert("RGB")`
 * turns it into RGB. sharp (libvips) has no BMP loader, and the official DIPSY code accepts BMP
 * files, so the format is decoded here.
 *
 * What Pillow reads is read, and what it refuses is refused: the OS/2 12-byte header and the
 * Windows 40 to 124-byte headers; 1, 4 and 8-bit palettes (indices past the palette are black),
 * 16-bit 5-5-5 and 5-6-5 (each channel scaled with `v * 255 / max`, truncated), 24-bit and 32-bit
 * samples; uncompressed, RLE8, RLE4 and the bit-field layouts Pillow lists. Alpha is dropped, as
 * `convert("RGB")` drops it.
 */

export interface BmpInfo {
  width: number;
  height: number;
  bits: number;
  compression: number;
}

export class BmpError extends Error {}

const RAW = 0, RLE8 = 1, RLE4 = 2, BITFIELDS = 3;

/** The bit-field masks Pillow accepts, per bit depth (r, g, b[, a]). */
const SUPPORTED_MASKS: Record<number, number[][]> = {
  32: [
    [0xff0000, 0xff00, 0xff, 0x0],
    [0xff000000, 0xff0000, 0xff00, 0x0],
    [0xff000000, 0xff00, 0xff, 0x0],
    [0xff000000, 0xff0000, 0xff00, 0xff],
    [0xff, 0xff00, 0xff0000, 0xff000000],
    [0xff0000, 0xff00, 0xff, 0xff000000],
    [0xff000000, 0xff00, 0xff, 0xff0000],
    [0x0, 0x0, 0x0, 0x0],
  ],
  24: [[0xff0000, 0xff00, 0xff]],
  16: [[0xf800, 0x7e0, 0x1f], [0x7c00, 0x3e0, 0x1f]],
};

export function isBmp(bytes: Uint8Array): boolean {
  return bytes.length >= 2 && bytes[0] === 0x42 && bytes[1] === 0x4d; // "BM"
}

interface Parsed extends BmpInfo {
  /** Rows stored bottom-up (the usual case). */
  bottomUp: boolean;
  /** Where the pixel data starts. */
  offset: number;
  /** r, g, b masks for 16/24/32-bit data. */
  masks: [number, number, number];
  /** RGB per palette index (at least 256 entries). */
  palette: Uint8Array | null;
}

function parse(bytes: Uint8Array): Parsed {
  if (!isBmp(bytes)) throw new BmpError("not a BMP file");
  if (bytes.length < 26) throw new BmpError("truncated header");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const u16 = (at: number) => view.getUint16(at, true);
  const u32 = (at: number) => view.getUint32(at, true);
  let offset = u32(10);
  const headerSize = u32(14);
  let width: number, height: number, bits: number, compression: number, colors: number;
  let bottomUp = true, paletteEntry: number;
  let pos = 14 + headerSize;
  let masks: number[] | null = null;
  if (headerSize === 12) {
    width = u16(18);
    height = u16(20);
    bits = u16(24);
    compression = RAW;
    colors = 0;
    paletteEntry = 3;
  } else if ([40, 52, 56, 64, 108, 124].includes(headerSize)) {
    if (bytes.length < 14 + headerSize) throw new BmpError("truncated header");
    width = u32(18);
    // A top-down file stores a negative height; Pillow looks at its high byte.
    const h = u32(22);
    if (bytes[25] === 0xff) {
      bottomUp = false;
      height = 2 ** 32 - h;
    } else {
      height = h;
    }
    bits = u16(28);
    compression = u32(30);
    colors = u32(46);
    paletteEntry = 4;
    if (compression === BITFIELDS) {
      if (headerSize >= 52) {
        masks = [u32(54), u32(58), u32(62)];
        masks.push(headerSize >= 56 ? u32(66) : 0);
      } else {
        if (bytes.length < pos + 12) throw new BmpError("truncated bit-field masks");
        masks = [u32(pos), u32(pos + 4), u32(pos + 8), 0];
        pos += 12;
      }
    }
  } else {
    throw new BmpError(`unsupported BMP header type (${headerSize})`);
  }
  if (width < 1 || height < 1 || width * height > 2 ** 28) {
    throw new BmpError(`unsupported image size ${width}x${height}`);
  }
  if (!colors) colors = 2 ** bits;
  if (offset === 14 + headerSize && bits <= 8) offset += paletteEntry * colors;
  if (![1, 4, 8, 16, 24, 32].includes(bits)) {
    throw new BmpError(`unsupported BMP pixel depth (${bits})`);
  }

  let rgbMasks: [number, number, number] = [0xff0000, 0xff00, 0xff];
  if (bits === 16) rgbMasks = [0x7c00, 0x3e0, 0x1f];
  if (compression === BITFIELDS) {
    const wanted = bits === 32 ? masks! : masks!.slice(0, 3);
    const ok = (SUPPORTED_MASKS[bits] ?? []).some((m) => m.every((v, i) => v === wanted[i]));
    if (!ok) throw new BmpError("unsupported BMP bit-field layout");
    // All-zero masks read as BGRA.
    if (wanted.every((m) => m === 0)) rgbMasks = [0xff0000, 0xff00, 0xff];
    else rgbMasks = [masks![0], masks![1], masks![2]];
  } else if (compression === RLE8 || compression === RLE4) {
    if (bits !== (compression === RLE8 ? 8 : 4)) {
      throw new BmpError(`RLE${compression === RLE8 ? 8 : 4} data needs ${bits}-bit pixels`);
    }
  } else if (compression !== RAW) {
    throw new BmpError(`unsupported BMP compression (${compression})`);
  }

  let palette: Uint8Array | null = null;
  if (bits <= 8) {
    if (!(colors > 0 && colors <= 65536)) {
      throw new BmpError(`unsupported BMP palette size (${colors})`);
    }
    if (bytes.length < pos + paletteEntry * colors) throw new BmpError("truncated palette");
    // Indices past the palette are black.
    palette = new Uint8Array(Math.max(256, colors) * 3);
    for (let i = 0; i < colors; i++) {
      const at = pos + i * paletteEntry;
      palette[i * 3] = bytes[at + 2];
      palette[i * 3 + 1] = bytes[at + 1];
      palette[i * 3 + 2] = bytes[at];
    }
  }
  return { width, height, bits, compression, bottomUp, offset, masks: rgbMasks, palette };
}

/** Size and depth from the header, without decoding the pixels. */
export function bmpInfo(bytes: Uint8Array): BmpInfo {
  const { width, height, bits, compression } = parse(bytes);
  return { width, height, bits, compression };
}

/** How Pillow widens a masked channel to 8 bits: `v * 255 / max`, truncated. */
function channel(pixel: number, mask: number): number {
  if (mask === 0) return 0;
  let shift = 0;
  while (((mask >>> shift) & 1) === 0) shift++;
  const max = mask >>> shift;
  const v = (pixel & mask) >>> shift;
  return max === 255 ? v : Math.trunc((v * 255) / max);
}

/** Palette indices of an RLE8/RLE4 stream, rows in file order (Pillow's BmpRleDecoder). */
function decodeRle(bytes: Uint8Array, p: Parsed): Uint8Array {
  const { width, height } = p;
  const rle4 = p.compression === RLE4;
  const total = width * height;
  const out = new Uint8Array(total);
  let n = 0, x = 0, pos = p.offset;
  while (n < total) {
    if (pos + 2 > bytes.length) break;
    let count = bytes[pos];
    const value = bytes[pos + 1];
    pos += 2;
    if (count) {
      if (x + count > width) count = Math.max(0, width - x);
      for (let i = 0; i < count && n < total; i++) {
        out[n++] = rle4 ? (i % 2 === 0 ? value >> 4 : value & 0x0f) : value;
      }
      x += count;
    } else if (value === 0) {
      while (n % width !== 0) out[n++] = 0; // end of line
      x = 0;
    } else if (value === 1) {
      break; // end of bitmap
    } else if (value === 2) {
      if (pos + 2 > bytes.length) break;
      const skip = Math.min(total - n, bytes[pos] + bytes[pos + 1] * width);
      pos += 2;
      n += skip; // zeros
      x = n % width;
    } else {
      const wanted = Math.min(total - n, value);
      const byteCount = rle4 ? (wanted + 1) >> 1 : wanted;
      const avail = Math.min(byteCount, bytes.length - pos);
      if (rle4) {
        for (let i = 0; i < avail; i++) {
          out[n++] = bytes[pos + i] >> 4;
          if (i * 2 + 1 < wanted) out[n++] = bytes[pos + i] & 0x0f;
        }
      } else {
        out.set(bytes.subarray(pos, pos + avail), n);
        n += avail;
      }
      pos += avail;
      if (avail < byteCount || n === total) break;
      x += value;
      if (pos % 2 !== 0) pos++; // runs are padded to 16 bits
    }
  }
  if (n < total) throw new BmpError("not enough image data (truncated RLE stream)");
  return out;
}

/** Decodes a BMP file to interleaved 8-bit RGB. */
export function decodeBmp(bytes: Uint8Array): { width: number; height: number; data: Uint8Array } {
  const p = parse(bytes);
  const { width, height, bits } = p;
  const out = new Uint8Array(width * height * 3);
  const rowOf = (r: number) => (p.bottomUp ? height - 1 - r : r);

  if (p.compression === RLE8 || p.compression === RLE4) {
    const indices = decodeRle(bytes, p);
    const pal = p.palette!;
    for (let r = 0; r < height; r++) {
      const dst = rowOf(r) * width * 3;
      for (let x = 0; x < width; x++) {
        const i = indices[r * width + x] * 3;
        out[dst + x * 3] = pal[i];
        out[dst + x * 3 + 1] = pal[i + 1];
        out[dst + x * 3 + 2] = pal[i + 2];
      }
    }
    return { width, height, data: out };
  }

  const stride = ((width * bits + 31) >> 3) & ~3;
  if (p.offset + stride * (height - 1) + Math.ceil((width * bits) / 8) > bytes.length) {
    throw new BmpError("image file is truncated");
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const [rm, gm, bm] = p.masks;
  for (let r = 0; r < height; r++) {
    const src = p.offset + r * stride;
    const dst = rowOf(r) * width * 3;
    for (let x = 0; x < width; x++) {
      const o = dst + x * 3;
      if (bits <= 8) {
        const perByte = 8 / bits;
        const byte = bytes[src + Math.floor(x / perByte)];
        const shift = 8 - bits * ((x % perByte) + 1);
        const i = ((byte >> shift) & ((1 << bits) - 1)) * 3;
        out[o] = p.palette![i];
        out[o + 1] = p.palette![i + 1];
        out[o + 2] = p.palette![i + 2];
      } else {
        const at = src + x * (bits / 8);
        const pixel = bits === 16
          ? view.getUint16(at, true)
          : bits === 24
          ? bytes[at] | (bytes[at + 1] << 8) | (bytes[at + 2] << 16)
          : view.getUint32(at, true);
        out[o] = channel(pixel, rm);
        out[o + 1] = channel(pixel, gm);
        out[o + 2] = channel(pixel, bm);
      }
    }
  }
  return { width, height, data: out };
}
