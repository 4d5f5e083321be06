/**
 * safetensors files: the header (a small JSON) is parsed and validated here; tensor bytes are read
 * by the shim straight from the file into native memory, cast and moved on load. Pickle (`.bin`,
 * `.pt`, `.ckpt`) files are refused: unpickling runs arbitrary code.
 */
import { closeSync, fstatSync, openSync, readSync, renameSync, rmSync, writeSync } from "node:fs";
import { ERR, takeError } from "./call.ts";
import { type Device, deviceCode, type DType, dtypeCode, ELEMENT_SIZE } from "./dtype.ts";
import { UserError } from "./errors.ts";
import { lib } from "./lib.ts";
import { Tensor } from "./tensor.ts";

const S = lib().symbols;

const FILE_DTYPES: Record<string, DType> = {
  F64: "f64",
  F32: "f32",
  F16: "f16",
  BF16: "bf16",
  I64: "i64",
  I32: "i32",
  I16: "i16",
  I8: "i8",
  U8: "u8",
  BOOL: "bool",
};
const TO_FILE_DTYPE = Object.fromEntries(
  Object.entries(FILE_DTYPES).map(([k, v]) => [v, k]),
) as Record<DType, string>;

/** Headers larger than this are treated as corrupt rather than read into memory. */
const MAX_HEADER = 100 * 1024 * 1024;

/** One tensor's entry in a safetensors header. */
export interface TensorInfo {
  /** The element type of the data in the file. */
  dtype: DType;
  /** The size of each dimension. */
  shape: number[];
  /** Absolute byte offset of the data in the file. */
  offset: number;
  /** Bytes of data in the file. */
  nbytes: number;
}

/** A file that is not a readable safetensors file (or a pickle): the user's to replace. */
export class SafetensorsError extends UserError {
  constructor(readonly path: string, detail: string) {
    super(`${path}: ${detail}`);
  }
}

const PICKLE = /\.(bin|pt|pth|ckpt|pkl)$/i;

export function refusePickle(path: string): void {
  if (PICKLE.test(path)) {
    throw new SafetensorsError(
      path,
      "pickle checkpoints are not supported (loading them can run arbitrary code); " +
        "convert to .safetensors (e.g. with the safetensors Python package) and point at that",
    );
  }
}

/** An open safetensors file: its validated index, and tensors loaded on demand. */
export class SafetensorsFile {
  /** The index: every tensor's dtype, shape and place in the file, by name. */
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  /** The header's `__metadata__` strings. */
  readonly metadata: Record<string, string>;
  readonly #pathBytes: Uint8Array;

  private constructor(
    readonly path: string,
    tensors: Map<string, TensorInfo>,
    metadata: Record<string, string>,
  ) {
    this.tensors = tensors;
    this.metadata = metadata;
    this.#pathBytes = new TextEncoder().encode(path + "\0");
  }

  /** Reads and checks the header; refuses pickle checkpoints by name. */
  static open(path: string): SafetensorsFile {
    refusePickle(path);
    const { tensors, metadata } = readIndex(path);
    return new SafetensorsFile(path, tensors, metadata);
  }

  /** The tensor names, in header order. */
  keys(): string[] {
    return [...this.tensors.keys()];
  }

  /** Whether the file holds a tensor called `name`. */
  has(name: string): boolean {
    return this.tensors.has(name);
  }

  /** The entry of `name`; a SafetensorsError when there is none. */
  info(name: string): TensorInfo {
    const t = this.tensors.get(name);
    if (!t) throw new SafetensorsError(this.path, `no tensor named "${name}"`);
    return t;
  }

  /** Reads one tensor, cast to `dtype` (default: as stored) and placed on `device`. */
  load(name: string, opts: { dtype?: DType; device?: Device } = {}): Tensor {
    const t = this.info(name);
    const shape = Int32Array.from(t.shape);
    const p = S.dt_file_tensor(
      this.#pathBytes,
      BigInt(t.offset),
      BigInt(t.nbytes),
      dtypeCode(t.dtype),
      shape,
      shape.length,
      opts.dtype === undefined ? -1 : dtypeCode(opts.dtype),
      opts.device === undefined ? -1 : deviceCode(opts.device),
      ERR,
    );
    if (p === null) throw takeError(`load ${name}`);
    return new Tensor(p, `${this.path}:${name}`);
  }

  /** Loads every tensor (names sorted); the caller owns the result. */
  loadAll(opts: { dtype?: DType; device?: Device } = {}): Map<string, Tensor> {
    const out = new Map<string, Tensor>();
    for (const k of this.keys().sort()) out.set(k, this.load(k, opts));
    return out;
  }
}

function readExactly(fd: number, buf: Uint8Array, position: number): number {
  let done = 0;
  while (done < buf.length) {
    const n = readSync(fd, buf, done, buf.length - done, position + done);
    if (n === 0) break;
    done += n;
  }
  return done;
}

function readIndex(
  path: string,
): { tensors: Map<string, TensorInfo>; metadata: Record<string, string> } {
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch (e) {
    throw new SafetensorsError(path, `cannot open (${(e as Error).message})`);
  }
  try {
    const size = fstatSync(fd).size;
    const fail = (detail: string): never => {
      throw new SafetensorsError(path, `not a valid safetensors file: ${detail}`);
    };
    if (size < 8) fail(`only ${size} bytes, shorter than the 8-byte header length`);
    const lenBuf = new Uint8Array(8);
    readExactly(fd, lenBuf, 0);
    const claimed = new DataView(lenBuf.buffer).getBigUint64(0, true);
    if (claimed > BigInt(MAX_HEADER)) {
      fail(`header length ${claimed} is implausible (the file has ${size} bytes)`);
    }
    const headerLen = Number(claimed);
    if (8 + headerLen > size) {
      fail(`header of ${headerLen} bytes runs past the end (file has ${size})`);
    }
    const headerBuf = new Uint8Array(headerLen);
    readExactly(fd, headerBuf, 8);
    let header: Record<string, unknown>;
    try {
      header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(headerBuf));
    } catch (e) {
      return fail(`header is not JSON (${(e as Error).message})`);
    }
    if (header === null || typeof header !== "object" || Array.isArray(header)) {
      fail("header is not a JSON object");
    }
    const dataStart = 8 + headerLen;
    const dataLen = size - dataStart;
    const tensors = new Map<string, TensorInfo>();
    let metadata: Record<string, string> = {};
    const spans: [number, number, string][] = [];
    for (const [name, raw] of Object.entries(header)) {
      if (name === "__metadata__") {
        metadata = (raw ?? {}) as Record<string, string>;
        continue;
      }
      const e = raw as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
      const dtype = typeof e?.dtype === "string" ? FILE_DTYPES[e.dtype] : undefined;
      if (!dtype) fail(`tensor "${name}" has unsupported dtype ${JSON.stringify(e?.dtype)}`);
      const shape = e.shape;
      if (!Array.isArray(shape) || !shape.every((d) => Number.isInteger(d) && d >= 0)) {
        fail(`tensor "${name}" has a bad shape ${JSON.stringify(shape)}`);
      }
      const offs = e.data_offsets;
      if (
        !Array.isArray(offs) || offs.length !== 2 ||
        !offs.every((o) => Number.isInteger(o) && o >= 0) || offs[1] < offs[0]
      ) {
        fail(`tensor "${name}" has bad data_offsets ${JSON.stringify(offs)}`);
      }
      const [begin, end] = offs as [number, number];
      const numel = (shape as number[]).reduce((a, b) => a * b, 1);
      const want = numel * ELEMENT_SIZE[dtype!];
      if (end - begin !== want) {
        fail(`tensor "${name}" spans ${end - begin} bytes but ${dtype} [${shape}] needs ${want}`);
      }
      if (end > dataLen) {
        fail(`tensor "${name}" ends at byte ${end} of a ${dataLen}-byte data section (truncated?)`);
      }
      spans.push([begin, end, name]);
      tensors.set(name, {
        dtype: dtype!,
        shape: shape as number[],
        offset: dataStart + begin,
        nbytes: want,
      });
    }
    spans.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    for (let i = 1; i < spans.length; i++) {
      if (spans[i][0] < spans[i - 1][1]) {
        fail(`tensors "${spans[i - 1][2]}" and "${spans[i][2]}" overlap`);
      }
    }
    return { tensors, metadata };
  } finally {
    closeSync(fd);
  }
}

/**
 * Writes tensors to a safetensors file. The file appears atomically (temp file + rename), so a
 * crash never leaves a half-written file under the final name.
 */
export function saveSafetensors(
  path: string,
  tensors: Record<string, Tensor> | Map<string, Tensor>,
  metadata?: Record<string, string>,
): void {
  const entries = tensors instanceof Map ? [...tensors.entries()] : Object.entries(tensors);
  entries.sort((a, b) => a[0].localeCompare(b[0]));
  const header: Record<string, unknown> = {};
  if (metadata) header.__metadata__ = metadata;
  let offset = 0;
  for (const [name, t] of entries) {
    const nbytes = t.numel * ELEMENT_SIZE[t.dtype];
    header[name] = {
      dtype: TO_FILE_DTYPE[t.dtype],
      shape: [...t.shape],
      data_offsets: [offset, offset + nbytes],
    };
    offset += nbytes;
  }
  let json = JSON.stringify(header);
  // Pad with spaces so the data section starts 8-byte aligned, as the reference writer does.
  json += " ".repeat((8 - ((8 + new TextEncoder().encode(json).length) % 8)) % 8);
  const headerBytes = new TextEncoder().encode(json);
  const tmp = `${path}.tmp-${Deno.pid}`;
  const fd = openSync(tmp, "w");
  try {
    const len = new Uint8Array(8);
    new DataView(len.buffer).setBigUint64(0, BigInt(headerBytes.length), true);
    writeAll(fd, len);
    writeAll(fd, headerBytes);
    for (const [, t] of entries) {
      const host = t.toHost();
      writeAll(fd, new Uint8Array(host.buffer, host.byteOffset, host.byteLength));
    }
    closeSync(fd);
  } catch (e) {
    try {
      closeSync(fd);
    } catch { /* already closed */ }
    rmSync(tmp, { force: true });
    throw e;
  }
  renameSync(tmp, path);
}

function writeAll(fd: number, bytes: Uint8Array): void {
  let done = 0;
  while (done < bytes.length) done += writeSync(fd, bytes, done, bytes.length - done);
}
