/**
 * numpy's `.npy` and `.npz` files, enough to exchange arrays with Python: numbers (bool, int,
 * uint, float of any width numpy writes) and fixed-width strings (`<U`, `|S`), in C or Fortran
 * order, read from format versions 1 to 3. `.npz` is a zip of `.npy` members; numpy stores them
 * uncompressed (`np.savez`) or deflated (`np.savez_compressed`), and both are read. Object arrays
 * are pickles and are refused.
 *
 * Format: https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html
 */
import { crc32, inflateRawSync } from "node:zlib";
import { UserError } from "../ffi/errors.ts";

/** One array. Numbers come back as float64 values (int64 beyond 2^53 loses precision). */
export type NpyArray =
  | { kind: "number"; dtype: string; shape: number[]; data: Float64Array }
  | { kind: "string"; dtype: string; shape: number[]; data: string[] };

export class NpyError extends UserError {
  constructor(source: string, reason: string) {
    super(`${source}: ${reason}`);
  }
}

const MAGIC = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // \x93NUMPY

// ---------------------------------------------------------------------------------------------
// .npy

interface Header {
  descr: string;
  fortran: boolean;
  shape: number[];
}

/** The header dict is a Python literal; numpy writes it in one fixed shape, parsed here. */
function parseHeader(text: string, source: string): Header {
  const descr = /'descr'\s*:\s*'([^']*)'/.exec(text)?.[1];
  const fortran = /'fortran_order'\s*:\s*(True|False)/.exec(text)?.[1];
  const shape = /'shape'\s*:\s*\(([^)]*)\)/.exec(text)?.[1];
  if (descr === undefined || fortran === undefined || shape === undefined) {
    if (/'descr'\s*:\s*\[/.test(text)) {
      throw new NpyError(source, "structured arrays (record dtypes) are not supported");
    }
    throw new NpyError(source, `not a numpy array header: ${JSON.stringify(text.trim())}`);
  }
  const dims = shape.split(",").map((s) => s.trim()).filter((s) => s !== "").map(Number);
  if (dims.some((d) => !Number.isSafeInteger(d) || d < 0)) {
    throw new NpyError(source, `bad shape (${shape})`);
  }
  return { descr, fortran: fortran === "True", shape: dims };
}

/** Reads a number of `size` bytes at `at`; `little` gives the byte order. */
type NumberReader = (view: DataView, at: number, little: boolean) => number;

const NUMBER_READERS: Record<string, NumberReader> = {
  b1: (v, at) => v.getUint8(at),
  i1: (v, at) => v.getInt8(at),
  u1: (v, at) => v.getUint8(at),
  i2: (v, at, le) => v.getInt16(at, le),
  u2: (v, at, le) => v.getUint16(at, le),
  i4: (v, at, le) => v.getInt32(at, le),
  u4: (v, at, le) => v.getUint32(at, le),
  i8: (v, at, le) => Number(v.getBigInt64(at, le)),
  u8: (v, at, le) => Number(v.getBigUint64(at, le)),
  f2: (v, at, le) => halfToNumber(v.getUint16(at, le)),
  f4: (v, at, le) => v.getFloat32(at, le),
  f8: (v, at, le) => v.getFloat64(at, le),
};

function halfToNumber(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/** C-order position of each element stored in Fortran order. */
function fortranToC(shape: number[]): (fortranIndex: number) => number {
  const n = shape.length;
  const cStrides = new Array<number>(n);
  let s = 1;
  for (let d = n - 1; d >= 0; d--) {
    cStrides[d] = s;
    s *= shape[d];
  }
  return (f) => {
    let c = 0;
    for (let d = 0; d < n; d++) {
      c += (f % shape[d]) * cStrides[d];
      f = Math.floor(f / shape[d]);
    }
    return c;
  };
}

/** Decodes one `.npy` file; `source` names it in errors. */
export function readNpy(bytes: Uint8Array, source = "<npy>"): NpyArray {
  if (bytes.length < 10 || MAGIC.some((b, i) => bytes[i] !== b)) {
    throw new NpyError(source, "not a .npy file (no \\x93NUMPY magic)");
  }
  const major = bytes[6];
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let headerLen: number, start: number;
  if (major === 1) {
    headerLen = view.getUint16(8, true);
    start = 10;
  } else if (major === 2 || major === 3) {
    headerLen = view.getUint32(8, true);
    start = 12;
  } else {
    throw new NpyError(source, `unsupported .npy format version ${major}.${bytes[7]}`);
  }
  if (start + headerLen > bytes.length) throw new NpyError(source, "truncated header");
  const text = new TextDecoder(major === 3 ? "utf-8" : "latin1").decode(
    bytes.subarray(start, start + headerLen),
  );
  const header = parseHeader(text, source);
  const m = /^([<>|=])([a-zA-Z])(\d+)$/.exec(header.descr);
  if (!m) {
    throw new NpyError(
      source,
      header.descr.includes("O")
        ? "object arrays (pickled Python objects) are not read; save strings as np.array(list)"
        : `unsupported dtype ${header.descr}`,
    );
  }
  const [, order, letter, width] = m;
  const little = order !== ">";
  const count = header.shape.reduce((a, b) => a * b, 1);
  const dataStart = start + headerLen;
  const place = header.fortran && header.shape.length > 1
    ? fortranToC(header.shape)
    : (i: number) => i;

  if (letter === "U" || letter === "S") {
    const chars = Number(width);
    const size = letter === "U" ? 4 * chars : chars;
    if (dataStart + count * size > bytes.length) throw new NpyError(source, "truncated data");
    const data = new Array<string>(count);
    for (let i = 0; i < count; i++) {
      const at = dataStart + i * size;
      let s = "";
      if (letter === "U") {
        const points: number[] = [];
        for (let j = 0; j < chars; j++) points.push(view.getUint32(at + 4 * j, little));
        while (points.length && points[points.length - 1] === 0) points.pop();
        s = String.fromCodePoint(...points);
      } else {
        let end = at + chars;
        while (end > at && bytes[end - 1] === 0) end--;
        s = new TextDecoder("latin1").decode(bytes.subarray(at, end));
      }
      data[place(i)] = s;
    }
    return { kind: "string", dtype: header.descr, shape: header.shape, data };
  }

  const key = `${letter}${width}`;
  const read = NUMBER_READERS[key];
  if (!read) throw new NpyError(source, `unsupported dtype ${header.descr}`);
  const size = Number(width);
  if (dataStart + count * size > bytes.length) throw new NpyError(source, "truncated data");
  const data = new Float64Array(count);
  for (let i = 0; i < count; i++) data[place(i)] = read(view, dataStart + i * size, little);
  return { kind: "number", dtype: header.descr, shape: header.shape, data };
}

/** Values to write: float64 (default) or float32 numbers, or strings (as numpy's `<U`). */
export type NpyInput =
  | { shape: number[]; data: ArrayLike<number>; dtype?: "<f8" | "<f4" }
  | { shape: number[]; strings: readonly string[] };

/** Encodes one array as a version 1.0 `.npy` file, C order, little-endian. */
export function writeNpy(array: NpyInput): Uint8Array {
  const count = array.shape.reduce((a, b) => a * b, 1);
  let descr: string, body: Uint8Array;
  if ("strings" in array) {
    if (array.strings.length !== count) {
      throw new RangeError(`writeNpy: ${array.strings.length} strings for shape ${array.shape}`);
    }
    const points = array.strings.map((s) => Array.from(s, (c) => c.codePointAt(0)!));
    const chars = Math.max(1, ...points.map((p) => p.length));
    descr = `<U${chars}`;
    body = new Uint8Array(count * chars * 4);
    const view = new DataView(body.buffer);
    points.forEach((p, i) => p.forEach((c, j) => view.setUint32((i * chars + j) * 4, c, true)));
  } else {
    if (array.data.length !== count) {
      throw new RangeError(`writeNpy: ${array.data.length} values for shape ${array.shape}`);
    }
    descr = array.dtype ?? "<f8";
    const size = descr === "<f4" ? 4 : 8;
    body = new Uint8Array(count * size);
    const view = new DataView(body.buffer);
    for (let i = 0; i < count; i++) {
      if (size === 4) view.setFloat32(i * 4, array.data[i], true);
      else view.setFloat64(i * 8, array.data[i], true);
    }
  }
  const dims = array.shape.length === 1 ? `${array.shape[0]},` : array.shape.join(", ");
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': (${dims}), }`;
  // numpy pads the header with spaces so that the data starts on a 64-byte boundary.
  const pad = 64 - ((10 + header.length + 1) % 64);
  header += " ".repeat(pad % 64) + "\n";
  if (header.length > 0xffff) throw new RangeError("writeNpy: header too long for format 1.0");
  const out = new Uint8Array(10 + header.length + body.length);
  out.set(MAGIC, 0);
  out[6] = 1;
  out[7] = 0;
  new DataView(out.buffer).setUint16(8, header.length, true);
  out.set(new TextEncoder().encode(header), 10);
  out.set(body, 10 + header.length);
  return out;
}

// ---------------------------------------------------------------------------------------------
// .npz (zip)

const SIG_LOCAL = 0x04034b50;
const SIG_CENTRAL = 0x02014b50;
const SIG_END = 0x06054b50;
const SIG_END64 = 0x06064b50;
const SIG_LOCATOR64 = 0x07064b50;

interface ZipMember {
  name: string;
  method: number;
  crc: number;
  compressed: number;
  size: number;
  offset: number;
}

function zipMembers(bytes: Uint8Array, source: string): ZipMember[] {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let end = -1;
  for (let i = bytes.length - 22; i >= Math.max(0, bytes.length - 22 - 0xffff); i--) {
    if (view.getUint32(i, true) === SIG_END) {
      end = i;
      break;
    }
  }
  if (end < 0) throw new NpyError(source, "not a zip archive (.npz files are zips of .npy files)");
  let entries = view.getUint16(end + 10, true);
  let cdOffset = view.getUint32(end + 16, true);
  if (
    (entries === 0xffff || cdOffset === 0xffffffff) && end >= 20 &&
    view.getUint32(end - 20, true) === SIG_LOCATOR64
  ) {
    const at = Number(view.getBigUint64(end - 12, true));
    if (view.getUint32(at, true) !== SIG_END64) throw new NpyError(source, "bad zip64 record");
    entries = Number(view.getBigUint64(at + 32, true));
    cdOffset = Number(view.getBigUint64(at + 48, true));
  }
  const members: ZipMember[] = [];
  let p = cdOffset;
  for (let n = 0; n < entries; n++) {
    if (p + 46 > bytes.length || view.getUint32(p, true) !== SIG_CENTRAL) {
      throw new NpyError(source, "corrupt zip central directory");
    }
    const nameLen = view.getUint16(p + 28, true);
    const extraLen = view.getUint16(p + 30, true);
    const commentLen = view.getUint16(p + 32, true);
    const m: ZipMember = {
      name: new TextDecoder().decode(bytes.subarray(p + 46, p + 46 + nameLen)),
      method: view.getUint16(p + 10, true),
      crc: view.getUint32(p + 16, true),
      compressed: view.getUint32(p + 20, true),
      size: view.getUint32(p + 24, true),
      offset: view.getUint32(p + 42, true),
    };
    // Zip64: the fields that overflowed are in the 0x0001 extra block, in this order.
    let e = p + 46 + nameLen;
    const extraEnd = e + extraLen;
    while (e + 4 <= extraEnd) {
      const id = view.getUint16(e, true), len = view.getUint16(e + 2, true);
      if (id === 0x0001) {
        let q = e + 4;
        const next = () => {
          const v = Number(view.getBigUint64(q, true));
          q += 8;
          return v;
        };
        if (m.size === 0xffffffff) m.size = next();
        if (m.compressed === 0xffffffff) m.compressed = next();
        if (m.offset === 0xffffffff) m.offset = next();
      }
      e += 4 + len;
    }
    members.push(m);
    p = extraEnd + commentLen;
  }
  return members;
}

function memberData(bytes: Uint8Array, m: ZipMember, source: string): Uint8Array {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (view.getUint32(m.offset, true) !== SIG_LOCAL) {
    throw new NpyError(source, `corrupt zip entry ${m.name}`);
  }
  const start = m.offset + 30 + view.getUint16(m.offset + 26, true) +
    view.getUint16(m.offset + 28, true);
  const raw = bytes.subarray(start, start + m.compressed);
  let data: Uint8Array;
  if (m.method === 0) data = raw;
  else if (m.method === 8) data = new Uint8Array(inflateRawSync(raw));
  else throw new NpyError(source, `${m.name}: unsupported zip compression method ${m.method}`);
  if (data.length !== m.size || (crc32(data) >>> 0) !== m.crc) {
    throw new NpyError(source, `${m.name}: corrupt data (size or CRC mismatch)`);
  }
  return data;
}

/** The arrays of an `.npz` file by name (the member name without ".npy"). */
export function readNpz(bytes: Uint8Array, source = "<npz>"): Map<string, NpyArray> {
  const out = new Map<string, NpyArray>();
  for (const m of zipMembers(bytes, source)) {
    if (!m.name.endsWith(".npy")) continue;
    const name = m.name.slice(0, -4);
    out.set(name, readNpy(memberData(bytes, m, source), `${source}: ${name}`));
  }
  return out;
}

/** An `.npz` file (uncompressed members, as `np.savez` writes them). */
export function writeNpz(arrays: Record<string, NpyInput>): Uint8Array {
  const encoder = new TextEncoder();
  const locals: Uint8Array[] = [];
  const centrals: Uint8Array[] = [];
  let offset = 0;
  for (const [key, array] of Object.entries(arrays)) {
    const name = encoder.encode(`${key}.npy`);
    const data = writeNpy(array);
    const crc = crc32(data) >>> 0;
    const local = new Uint8Array(30 + name.length + data.length);
    const lv = new DataView(local.buffer);
    lv.setUint32(0, SIG_LOCAL, true);
    lv.setUint16(4, 20, true); // version needed: 2.0
    lv.setUint16(8, 0, true); // stored
    lv.setUint16(10, 0, true); // time 00:00
    lv.setUint16(12, 0x21, true); // date 1980-01-01
    lv.setUint32(14, crc, true);
    lv.setUint32(18, data.length, true);
    lv.setUint32(22, data.length, true);
    lv.setUint16(26, name.length, true);
    local.set(name, 30);
    local.set(data, 30 + name.length);
    const central = new Uint8Array(46 + name.length);
    const cv = new DataView(central.buffer);
    cv.setUint32(0, SIG_CENTRAL, true);
    cv.setUint16(4, 20, true);
    cv.setUint16(6, 20, true);
    cv.setUint16(12, 0, true);
    cv.setUint16(14, 0x21, true);
    cv.setUint32(16, crc, true);
    cv.setUint32(20, data.length, true);
    cv.setUint32(24, data.length, true);
    cv.setUint16(28, name.length, true);
    cv.setUint32(42, offset, true);
    central.set(name, 46);
    if (offset + local.length > 0xffffffff) throw new RangeError("writeNpz: over 4 GB");
    locals.push(local);
    centrals.push(central);
    offset += local.length;
  }
  const cdSize = centrals.reduce((s, c) => s + c.length, 0);
  const end = new Uint8Array(22);
  const ev = new DataView(end.buffer);
  ev.setUint32(0, SIG_END, true);
  ev.setUint16(8, centrals.length, true);
  ev.setUint16(10, centrals.length, true);
  ev.setUint32(12, cdSize, true);
  ev.setUint32(16, offset, true);
  const out = new Uint8Array(offset + cdSize + 22);
  let p = 0;
  for (const part of [...locals, ...centrals, end]) {
    out.set(part, p);
    p += part.length;
  }
  return out;
}
