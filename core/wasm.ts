/**
 * A minimal WebAssembly encoder for the few pixel kernels that plain TypeScript runs too slowly
 * (resampling, the 3x3 filter): functions of i32 parameters over one exported memory, written as
 * instruction lists and assembled into a module at load time. Only the instructions those
 * kernels use are here; WebAssembly's 128-bit SIMD does four int32 or float32 operations at once
 * with the same wrap-around and IEEE rounding as the scalar ones, so results stay bit-exact.
 */

/** Encoded instructions. */
export type Code = readonly number[];

function uleb(v: number): number[] {
  const out: number[] = [];
  do {
    let byte = v & 0x7f;
    v >>>= 7;
    if (v !== 0) byte |= 0x80;
    out.push(byte);
  } while (v !== 0);
  return out;
}

function sleb(v: number): number[] {
  const out: number[] = [];
  for (;;) {
    const byte = v & 0x7f;
    v >>= 7;
    if ((v === 0 && !(byte & 0x40)) || (v === -1 && byte & 0x40)) {
      out.push(byte);
      return out;
    }
    out.push(byte | 0x80);
  }
}

// Memory immediates: alignment hint 0 (valid for any access, and these are often unaligned).
const memarg = (offset: number): Code => [0, ...uleb(offset)];
const simd = (op: number, ...imm: Code): Code => [0xfd, ...uleb(op), ...imm];

/** The instructions, by their text-format names (dots become underscores). */
export const op = {
  i32_const: (v: number): Code => [0x41, ...sleb(v | 0)],
  f32_const: (v: number): Code => {
    const b = new Uint8Array(new Float32Array([v]).buffer);
    return [0x43, ...b];
  },
  /** [a, b, cond] -> cond ? a : b */
  select: [0x1b],
  i32_add: [0x6a],
  f32_mul: [0x94],
  i32_sub: [0x6b],
  i32_mul: [0x6c],
  i32_shl: [0x74],
  i32_eqz: [0x45],
  i32_lt_s: [0x48],
  i32_gt_s: [0x4a],
  i32_shr_u: [0x76],
  i32_and: [0x71],
  i32_load: (offset = 0): Code => [0x28, ...memarg(offset)],
  /** [dest, src, n] -> copies n bytes (bulk memory). */
  memory_copy: [0xfc, 10, 0, 0],
  i32_load8_u: (offset = 0): Code => [0x2d, ...memarg(offset)],
  i32_store: (offset = 0): Code => [0x36, ...memarg(offset)],
  i32_store8: (offset = 0): Code => [0x3a, ...memarg(offset)],
  v128_load: (offset = 0): Code => simd(0x00, ...memarg(offset)),
  v128_load8x8_u: (offset = 0): Code => simd(0x02, ...memarg(offset)),
  v128_load32_zero: (offset = 0): Code => simd(0x5c, ...memarg(offset)),
  v128_store: (offset = 0): Code => simd(0x0b, ...memarg(offset)),
  v128_store32_lane: (offset = 0): Code => simd(0x5a, ...memarg(offset), 0),
  /** Bytes of two vectors by constant lane indices (16 to 31 pick from the second). */
  i8x16_shuffle: (lanes: readonly number[]): Code => simd(0x0d, ...lanes),
  /** A v128 of sixteen bytes. */
  v128_const: (bytes: readonly number[]): Code => simd(0x0c, ...bytes),
  i32x4_splat: simd(0x11),
  i32x4_extract_lane: (lane: number): Code => simd(0x1b, lane),
  f32x4_splat: simd(0x13),
  i8x16_narrow_i16x8_u: simd(0x66),
  i16x8_narrow_i32x4_s: simd(0x85),
  i16x8_extend_low_i8x16_u: simd(0x89),
  i16x8_extend_high_i8x16_u: simd(0x8a),
  i32x4_extend_low_i16x8_u: simd(0xa9),
  i32x4_extend_high_i16x8_u: simd(0xaa),
  i32x4_shr_s: simd(0xac),
  i32x4_add: simd(0xae),
  i32x4_sub: simd(0xb1),
  i32x4_mul: simd(0xb5),
  i32x4_min_s: simd(0xb6),
  i32x4_max_s: simd(0xb8),
  f32x4_add: simd(0xe4),
  f32x4_sub: simd(0xe5),
  f32x4_mul: simd(0xe6),
  f32x4_div: simd(0xe7),
  f32x4_min: simd(0xe8),
  f32x4_max: simd(0xe9),
  i32x4_trunc_sat_f32x4_s: simd(0xf8),
  f32x4_convert_i32x4_s: simd(0xfa),
} as const;

const VALTYPE = { i32: 0x7f, f32: 0x7d, v128: 0x7b } as const;
type ValType = keyof typeof VALTYPE;

/** What a function body is written with: named locals and structured loops. */
export interface Builder {
  /** local.get of a parameter or local. */
  get(name: string): Code;
  /** local.set: evaluates `value` (one value on the stack) into the local. */
  set(name: string, ...value: Code[]): Code;
  /** `while (cond) { body }`: `cond` leaves one i32. */
  while(cond: Code, ...body: Code[]): Code;
}

export interface FunctionSpec {
  name: string;
  /** Parameters in order, i32 unless typed as `name:f32`. */
  params: readonly string[];
  /** The result's type, if there is one (left on the stack at the end of the body). */
  result?: ValType;
  locals?: Partial<Record<ValType, readonly string[]>>;
  body: (b: Builder) => Code[];
}

function section(id: number, entries: Code[]): number[] {
  const content = [...uleb(entries.length), ...entries.flat()];
  return [id, ...uleb(content.length), ...content];
}

const name = (s: string): Code => {
  const b = new TextEncoder().encode(s);
  return [...uleb(b.length), ...b];
};

function functionBody(f: FunctionSpec): number[] {
  const index = new Map<string, number>();
  for (const p of f.params) index.set(p.split(":")[0], index.size);
  const groups: Code[] = [];
  for (const [type, names] of Object.entries(f.locals ?? {}) as [ValType, string[]][]) {
    if (!names.length) continue;
    for (const n of names) index.set(n, index.size);
    groups.push([...uleb(names.length), VALTYPE[type]]);
  }
  const local = (n: string) => {
    const i = index.get(n);
    if (i === undefined) throw new Error(`wasm ${f.name}: no local "${n}"`);
    return uleb(i);
  };
  const b: Builder = {
    get: (n) => [0x20, ...local(n)],
    set: (n, ...value) => [...value.flat(), 0x21, ...local(n)],
    // block { loop { br_if 1 (!cond); body; br 0 } }
    while: (cond, ...body) => [
      0x02,
      0x40,
      0x03,
      0x40,
      ...cond,
      0x45,
      0x0d,
      1,
      ...body.flat(),
      0x0c,
      0,
      0x0b,
      0x0b,
    ],
  };
  const code = [...uleb(groups.length), ...groups.flat(), ...f.body(b).flat(), 0x0b];
  return [...uleb(code.length), ...code];
}

/** A module exporting `memory` (initially `pages` x 64 KiB, growable) and the functions. */
export function assemble(functions: readonly FunctionSpec[], pages = 1): Uint8Array<ArrayBuffer> {
  const type = (p: string) => VALTYPE[(p.split(":")[1] ?? "i32") as ValType];
  const types = functions.map((f) => [
    0x60,
    ...uleb(f.params.length),
    ...f.params.map(type),
    ...(f.result ? [1, VALTYPE[f.result]] : [0]),
  ]);
  const bytes = [
    ...[0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00],
    ...section(1, types),
    ...section(3, functions.map((_, i) => uleb(i))),
    ...section(5, [[0x00, ...uleb(pages)]]),
    ...section(7, [
      [...name("memory"), 0x02, 0],
      ...functions.map((f, i) => [...name(f.name), 0x00, ...uleb(i)]),
    ]),
    ...section(10, functions.map(functionBody)),
  ];
  return new Uint8Array(bytes);
}

let simdKernels = true;

/**
 * Chooses the SIMD kernels (the default, where WebAssembly has SIMD) or the TypeScript loops
 * that state the same arithmetic readably, for every kernel module; both give the same bytes.
 */
export function setKernels(kind: "simd" | "typescript"): void {
  simdKernels = kind === "simd";
}

/** Memory an instance keeps between calls; a larger one is let go after its call. */
const KEEP_BYTES = 64 << 20;

/** A module's one instance per thread, made on first use. */
export class KernelModule<T extends { memory: WebAssembly.Memory }> {
  readonly #bytes: Uint8Array<ArrayBuffer>;
  #module: WebAssembly.Module | null | undefined;
  #exports: T | undefined;

  constructor(bytes: Uint8Array<ArrayBuffer>) {
    this.#bytes = bytes;
  }

  /** The exports; null where the engine refuses the module (no SIMD) or TypeScript was chosen. */
  get exports(): T | null {
    if (!simdKernels) return null;
    if (this.#exports) return this.#exports;
    if (this.#module === undefined) {
      try {
        this.#module = new WebAssembly.Module(this.#bytes);
      } catch {
        this.#module = null;
      }
    }
    if (!this.#module) return null;
    this.#exports = new WebAssembly.Instance(this.#module).exports as unknown as T;
    return this.#exports;
  }

  /**
   * Call after using the exports: a memory that grew for a large image (memories never shrink)
   * goes with its instance, and the next call starts a fresh one.
   */
  trim(): void {
    if (this.#exports && this.#exports.memory.buffer.byteLength > KEEP_BYTES) {
      this.#exports = undefined;
    }
  }
}

/** Spare bytes after every arena buffer: kernels may read and write up to 16 bytes past one. */
const PAD = 16;
const ARENA_LIMIT = 1 << 30;

/**
 * Buffers in a kernel module's memory for one call, laid out one after another (16-byte aligned,
 * each followed by padding). The memory grows once, up front, so that the views stay valid.
 */
export class Arena {
  #next = 0;
  readonly bytes: Uint8Array;
  readonly ints: Int32Array;

  /**
   * Whether buffers of these byte sizes fit in one memory (1 GiB here, well inside what
   * WebAssembly memories reach); for larger images the callers keep to TypeScript.
   */
  static fits(sizes: readonly number[]): boolean {
    return Arena.#total(sizes) <= ARENA_LIMIT;
  }

  static #total(sizes: readonly number[]): number {
    return sizes.reduce((s, n) => s + Arena.#span(n), 0);
  }

  /** Room for buffers of these byte sizes. */
  constructor(memory: WebAssembly.Memory, sizes: readonly number[]) {
    const total = Arena.#total(sizes);
    const have = memory.buffer.byteLength;
    if (total > have) memory.grow(Math.ceil((total - have) / 65536));
    this.bytes = new Uint8Array(memory.buffer);
    this.ints = new Int32Array(memory.buffer);
  }

  static #span(n: number): number {
    return Math.ceil(n / 16) * 16 + PAD;
  }

  /** The address of the next `n`-byte buffer. */
  alloc(n: number): number {
    const at = this.#next;
    this.#next += Arena.#span(n);
    return at;
  }

  /** Copies bytes in; returns their address. */
  put(values: Uint8Array): number {
    const at = this.alloc(values.length);
    this.bytes.set(values, at);
    return at;
  }

  /** Copies an Int32Array in; returns its address. */
  int32(values: Int32Array): number {
    const at = this.alloc(values.byteLength);
    this.ints.set(values, at >> 2);
    return at;
  }

  /** A copy of `n` bytes at `at`. */
  take(at: number, n: number): Uint8Array {
    return this.bytes.slice(at, at + n);
  }
}
