/**
 * WebAssembly SIMD kernels for the heaviest Pillow 13 operations of pil_ops.ts (the SMOOTH
 * filter, ImageEnhance's blend, the "L" conversion), with Pillow's exact arithmetic four lanes at
 * a time: float32 products and sums in the same order as its C code
 * (WebAssembly rounds each float32 operation as C does, with no fused multiply-add), and its
 * integer luma. Where they are not used (see `pilKernels`), pil_ops.ts runs the same arithmetic
 * in TypeScript.
 */
import { Arena, assemble, type Builder, type Code, KernelModule, op } from "../../core/wasm.ts";

const add = (b: Builder, a: string, by: Code) => b.set(a, b.get(a), by, op.i32_add);
const lt = (b: Builder, a: string, c: string) => [...b.get(a), ...b.get(c), ...op.i32_lt_s];
const QUARTERS = [0, 1, 2, 3];
/** Quarter q (4 bytes) of a 16-byte vector, widened to i32x4; `half` is its i16x8 half. */
const quarter = (half: Code, q: number): Code => [
  ...half,
  ...(q % 2 ? op.i32x4_extend_high_i16x8_u : op.i32x4_extend_low_i16x8_u),
];
const halfOf = (v: Code, q: number): Code => [
  ...v,
  ...(q < 2 ? op.i16x8_extend_low_i8x16_u : op.i16x8_extend_high_i8x16_u),
];
/** Four i32x4 of byte values (0..255 after truncation) narrowed with saturation into 16 bytes. */
const narrow = (b: Builder, q: readonly string[]): Code => [
  ...b.get(q[0]),
  ...b.get(q[1]),
  ...op.i16x8_narrow_i32x4_s,
  ...b.get(q[2]),
  ...b.get(q[3]),
  ...op.i16x8_narrow_i32x4_s,
  ...op.i8x16_narrow_i16x8_u,
];

// The 3x3 neighbours in Pillow's summation order: the row below, the middle row, the row above;
// in each, left, centre, right.
const NEIGHBOURS = [0, 1, 2, 3, 4, 5, 6, 7, 8];
const Z = 16; // a byte index that picks from the second (zero) vector of a shuffle

const MODULE = assemble([
  {
    // ImagingFilter3x3 with SMOOTH's weights: `side` for the eight neighbours, `centre` for the
    // pixel. Interior rows only; 16 output bytes per step into `tmp`, then the row's interior
    // bytes are copied to `out`, which holds the input's bytes elsewhere (the copied border).
    name: "smooth",
    params: ["src", "out", "tmp", "width", "height", "side:f32", "centre:f32"],
    locals: {
      i32: ["y", "j", "n", "stride", "row", "a"],
      v128: [
        "k",
        "c",
        ...NEIGHBOURS.map((i) => `v${i}`),
        ...NEIGHBOURS.map((i) => `h${i}`),
        ...QUARTERS.map((q) => `s${q}`),
      ],
    },
    body: (b) => {
      const weight = (i: number) => (i === 4 ? "c" : "k");
      const sum = (q: number): Code[] => {
        // byte * weight, as float32.
        const term = (i: number) => [
          ...quarter(b.get(`h${i}`), q),
          ...op.f32x4_convert_i32x4_s,
          ...b.get(weight(i)),
          ...op.f32x4_mul,
        ];
        const row = (r: number) => [
          ...term(3 * r),
          ...term(3 * r + 1),
          ...op.f32x4_add,
          ...term(3 * r + 2),
          ...op.f32x4_add,
        ];
        return [
          b.set(
            `s${q}`,
            op.f32_const(0.5),
            op.f32x4_splat,
            row(0),
            op.f32x4_add,
            row(1),
            op.f32x4_add,
            row(2),
            op.f32x4_add,
            op.i32x4_trunc_sat_f32x4_s,
          ),
        ];
      };
      // Neighbour i of the 16 bytes at `a`: row below (i < 3), middle, above; offset -3, 0, +3.
      const address = (i: number): Code => [
        ...b.get("a"),
        ...(Math.floor(i / 3) === 1 ? [] : [
          ...b.get("stride"),
          ...(Math.floor(i / 3) === 0 ? op.i32_add : op.i32_sub),
        ]),
      ];
      const offset = (i: number) => 3 + ((i % 3) - 1) * 3; // from the row's interior start - 3
      return [
        b.set("k", b.get("side"), op.f32x4_splat),
        b.set("c", b.get("centre"), op.f32x4_splat),
        b.set("stride", b.get("width"), op.i32_const(3), op.i32_mul),
        b.set("n", b.get("width"), op.i32_const(2), op.i32_sub, op.i32_const(3), op.i32_mul),
        b.set("y", op.i32_const(1)),
        b.while(
          [
            ...b.get("y"),
            ...b.get("height"),
            ...op.i32_const(1),
            ...op.i32_sub,
            ...op.i32_lt_s,
          ],
          b.set("row", b.get("src"), b.get("y"), b.get("stride"), op.i32_mul, op.i32_add),
          b.set("j", op.i32_const(0)),
          b.while(
            lt(b, "j", "n"),
            // `a` is the byte left of the first output byte's left neighbour: row + j.
            b.set("a", b.get("row"), b.get("j"), op.i32_add),
            ...NEIGHBOURS.map((i) => b.set(`v${i}`, address(i), op.v128_load(offset(i)))),
            ...[0, 1].flatMap((half) => [
              ...NEIGHBOURS.map((i) => b.set(`h${i}`, halfOf(b.get(`v${i}`), 2 * half))),
              ...sum(2 * half),
              ...sum(2 * half + 1),
            ]),
            b.get("tmp"),
            b.get("j"),
            op.i32_add,
            narrow(b, QUARTERS.map((q) => `s${q}`)),
            op.v128_store(),
            add(b, "j", op.i32_const(16)),
          ),
          b.get("out"),
          b.get("y"),
          b.get("stride"),
          op.i32_mul,
          op.i32_add,
          op.i32_const(3),
          op.i32_add,
          b.get("tmp"),
          b.get("n"),
          op.memory_copy,
          add(b, "y", op.i32_const(1)),
        ),
      ];
    },
  },
  {
    // ImagingBlend: out = (uint8) (a + alpha * (v - a)) in float32, a from `degenerate`, v from
    // `image`, both per byte. Truncation saturates at 0 and 255, which is Pillow's clipping
    // outside [0, 1] and changes nothing inside it (the result then lies between a and v).
    name: "blend",
    params: ["image", "degenerate", "out", "n", "alpha:f32"],
    locals: {
      i32: ["i"],
      v128: ["al", "vi", "vd", "hi", "hd", ...QUARTERS.map((q) => `r${q}`)],
    },
    body: (b) => [
      b.set("al", b.get("alpha"), op.f32x4_splat),
      b.set("i", op.i32_const(0)),
      b.while(
        lt(b, "i", "n"),
        b.set("vi", b.get("image"), b.get("i"), op.i32_add, op.v128_load()),
        b.set("vd", b.get("degenerate"), b.get("i"), op.i32_add, op.v128_load()),
        ...[0, 1].flatMap((half) => [
          b.set("hi", halfOf(b.get("vi"), 2 * half)),
          b.set("hd", halfOf(b.get("vd"), 2 * half)),
          ...[0, 1].map((part) => {
            const q = 2 * half + part;
            const a = [...quarter(b.get("hd"), q), ...op.f32x4_convert_i32x4_s];
            const v = [...quarter(b.get("hi"), q), ...op.f32x4_convert_i32x4_s];
            return b.set(
              `r${q}`,
              a,
              b.get("al"),
              v,
              a,
              op.f32x4_sub,
              op.f32x4_mul,
              op.f32x4_add,
              op.i32x4_trunc_sat_f32x4_s,
            );
          }),
        ]),
        b.get("out"),
        b.get("i"),
        op.i32_add,
        narrow(b, QUARTERS.map((q) => `r${q}`)),
        op.v128_store(),
        add(b, "i", op.i32_const(16)),
      ),
    ],
  },
  {
    // rgb2l (ITU-R 601-2 luma in 16.16 fixed point) of `pixels` pixels, a multiple of 4: each
    // luma byte written three times (an "L" image converted back to RGB); returns their sum.
    name: "luma",
    params: ["image", "out", "pixels"],
    result: "i32",
    locals: { i32: ["p", "i"], v128: ["v", "l", "sum", "zero"] },
    body: (b) => {
      // The 4 pixels' channel c as i32x4: bytes c, c + 3, c + 6, c + 9, zero-extended.
      const channel = (c: number) =>
        op.i8x16_shuffle([c, Z, Z, Z, c + 3, Z, Z, Z, c + 6, Z, Z, Z, c + 9, Z, Z, Z]);
      const term = (c: number, w: number) => [
        ...b.get("v"),
        ...b.get("zero"),
        ...channel(c),
        ...op.i32_const(w),
        ...op.i32x4_splat,
        ...op.i32x4_mul,
      ];
      return [
        b.set("zero", op.i32_const(0), op.i32x4_splat),
        b.set("sum", b.get("zero")),
        b.set("p", op.i32_const(0)),
        b.set("i", op.i32_const(0)),
        b.while(
          lt(b, "p", "pixels"),
          b.set("v", b.get("image"), b.get("i"), op.i32_add, op.v128_load()),
          b.set(
            "l",
            term(0, 19595),
            term(1, 38470),
            op.i32x4_add,
            term(2, 7471),
            op.i32x4_add,
            op.i32_const(0x8000),
            op.i32x4_splat,
            op.i32x4_add,
            op.i32_const(16),
            op.i32x4_shr_s,
          ),
          b.set("sum", b.get("sum"), b.get("l"), op.i32x4_add),
          b.get("out"),
          b.get("i"),
          op.i32_add,
          b.get("l"),
          b.get("zero"),
          op.i8x16_shuffle([0, 0, 0, 4, 4, 4, 8, 8, 8, 12, 12, 12, Z, Z, Z, Z]),
          op.v128_store(),
          add(b, "p", op.i32_const(4)),
          add(b, "i", op.i32_const(12)),
        ),
        ...QUARTERS.map((q) => [...b.get("sum"), ...op.i32x4_extract_lane(q)]),
        op.i32_add,
        op.i32_add,
        op.i32_add,
      ];
    },
  },
]);

interface Exports {
  memory: WebAssembly.Memory;
  smooth(src: number, out: number, tmp: number, w: number, h: number, k: number, c: number): void;
  blend(image: number, degenerate: number, out: number, n: number, alpha: number): void;
  luma(image: number, out: number, pixels: number): number;
}

/** The kernels, on RGB bytes; each call copies its inputs into the module's memory and back. */
export interface PilKernels {
  /** SMOOTH's interior pixels over a copy of `data` (a w x h RGB image, w, h >= 3). */
  smooth(data: Uint8Array, width: number, height: number, side: number, centre: number): Uint8Array;
  /** blend with one degenerate byte per image byte. */
  blend(data: Uint8Array, degenerate: Uint8Array, alpha: number): Uint8Array;
  /** The luma of every pixel, three times over (an "L" image as RGB), and the sum of the lumas. */
  luma(data: Uint8Array): { rgb: Uint8Array; sum: number };
}

const module = new KernelModule<Exports>(MODULE);
/** Runs `fn` on the exports and lets an overgrown memory go afterwards. */
function run<R>(fn: (k: Exports) => R): R {
  try {
    return fn(module.exports!);
  } finally {
    module.trim();
  }
}

const KERNELS: PilKernels = {
  smooth: (data, width, height, side, centre) =>
    run((k) => {
      const arena = new Arena(k.memory, [data.length, data.length, width * 3]);
      const src = arena.put(data), out = arena.put(data), tmp = arena.alloc(width * 3);
      k.smooth(src, out, tmp, width, height, side, centre);
      return arena.take(out, data.length);
    }),
  blend: (data, degenerate, alpha) =>
    run((k) => {
      const arena = new Arena(k.memory, [data.length, data.length, data.length]);
      const image = arena.put(data), deg = arena.put(degenerate), out = arena.alloc(data.length);
      k.blend(image, deg, out, data.length, alpha);
      return arena.take(out, data.length);
    }),
  luma: (data) =>
    run((k) => {
      const pixels = data.length / 3;
      const arena = new Arena(k.memory, [data.length, data.length]);
      const image = arena.put(data), out = arena.alloc(data.length);
      const simd = pixels & ~3;
      let sum = k.luma(image, out, simd);
      const rgb = arena.take(out, data.length);
      // The last pixels (fewer than four) one by one.
      for (let p = simd, i = simd * 3; p < pixels; p++, i += 3) {
        const l = (data[i] * 19595 + data[i + 1] * 38470 + data[i + 2] * 7471 + 0x8000) >> 16;
        rgb[i] = rgb[i + 1] = rgb[i + 2] = l;
        sum += l;
      }
      return { rgb, sum };
    }),
};

/**
 * The kernels for images of `bytes` bytes, unless TypeScript was chosen (core/wasm.ts's
 * `setKernels`), WebAssembly lacks SIMD or the image is too large for their memory.
 */
export function pilKernels(bytes: number): PilKernels | null {
  if (!Arena.fits([bytes, bytes, bytes])) return null;
  return module.exports ? KERNELS : null;
}
