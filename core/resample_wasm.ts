/**
 * The two passes of resample.ts (Pillow 13's ImagingResample) as WebAssembly SIMD kernels, for
 * the same bytes several times faster. Each keeps Pillow's int32 arithmetic: four int32 lanes multiply-accumulate the 8-bit
 * pixels with the 22-bit fixed-point weights (wrapping as C ints do), then shift and saturate to
 * 8 bits, which is Pillow's clip8. The horizontal pass keeps one pixel (up to four channels) in
 * the lanes of one vector; the vertical pass sixteen bytes of a row in four vectors.
 *
 * Both read up to 16 bytes past the pixels they use and write up to 16 bytes past the ones they
 * produce (the extra lanes are overwritten by later pixels, or land in an `Arena`'s padding).
 */
import { assemble, type Builder, type Code, KernelModule, op } from "./wasm.ts";

const PRECISION_BITS = 22;
const HALF = 1 << (PRECISION_BITS - 1);
/** Rows that the horizontal pass filters together. */
const ROWS = [0, 1, 2, 3];

/** `a += by` for an i32 local. */
const add = (b: Builder, a: string, by: Code) => b.set(a, b.get(a), by, op.i32_add);
const lt = (b: Builder, a: string, c: string) => [...b.get(a), ...b.get(c), ...op.i32_lt_s];
const positive = (b: Builder, a: string) => [...b.get(a), ...op.i32_const(0), ...op.i32_gt_s];
/** An i32 from `array[index]` of an Int32Array at `array` (a byte address). */
const at = (b: Builder, array: string, index: Code) => [
  ...b.get(array),
  ...index,
  ...op.i32_const(2),
  ...op.i32_shl,
  ...op.i32_add,
  ...op.i32_load(),
];
/** acc += widen(pixels) * weight, for one i32x4 accumulator. */
const mac = (b: Builder, acc: string, pixels: Code, weight: string) =>
  b.set(acc, b.get(acc), pixels, b.get(weight), op.i32x4_mul, op.i32x4_add);
/** (acc >> 22) as an i16x8 (both halves the same), ready to narrow to bytes. */
const shifted = (b: Builder, acc: string) => [
  ...b.get(acc),
  ...op.i32_const(PRECISION_BITS),
  ...op.i32x4_shr_s,
];

const MODULE = assemble([
  {
    // Output pixel j of row y = sum over its taps of src[row y, first[j] + t] * weights[j, t].
    // Four rows at a time share each tap's weight; past the last row, the last row is redone.
    // Each pixel is stored as 4 bytes, the extra ones overwritten by the next pixel; the output
    // rows are `rowBytes` apart, at least 3 bytes more than a row needs, so that the last
    // pixel's extra bytes do not land on the next row (which is written at the same time).
    name: "horizontal",
    params: [
      "src",
      "stride",
      "rows",
      "ch",
      "out",
      "rowBytes",
      "width",
      "first",
      "count",
      "weights",
      "ksize",
    ],
    locals: {
      i32: [
        "y",
        "j",
        "row",
        "q",
        "p",
        "n",
        "k",
        "oj",
        ...ROWS.map((r) => `d${r}`),
        ...ROWS.map((r) => `e${r}`),
      ],
      v128: ["w", ...ROWS.map((r) => `a${r}`)],
    },
    body: (b) => [
      b.set("d0", op.i32_const(0)),
      b.set("e0", op.i32_const(0)),
      b.set("y", op.i32_const(0)),
      b.while(
        lt(b, "y", "rows"),
        b.set("row", b.get("src"), b.get("y"), b.get("stride"), op.i32_mul, op.i32_add),
        b.set("q", b.get("out"), b.get("y"), b.get("rowBytes"), op.i32_mul, op.i32_add),
        // Offsets of rows y + r from row y, in the input (d) and the output (e).
        ...ROWS.slice(1).flatMap((r) => {
          const more = [
            ...b.get("y"),
            ...op.i32_const(r),
            ...op.i32_add,
            ...b.get("rows"),
            ...op.i32_lt_s,
          ];
          return [
            b.set(
              `d${r}`,
              b.get("stride"),
              op.i32_const(r),
              op.i32_mul,
              b.get(`d${r - 1}`),
              more,
              op.select,
            ),
            b.set(
              `e${r}`,
              b.get("rowBytes"),
              op.i32_const(r),
              op.i32_mul,
              b.get(`e${r - 1}`),
              more,
              op.select,
            ),
          ];
        }),
        b.set("j", op.i32_const(0)),
        b.set("oj", op.i32_const(0)),
        b.while(
          lt(b, "j", "width"),
          b.set("p", b.get("row"), at(b, "first", b.get("j")), b.get("ch"), op.i32_mul, op.i32_add),
          b.set("n", at(b, "count", b.get("j"))),
          b.set(
            "k",
            b.get("weights"),
            b.get("j"),
            b.get("ksize"),
            op.i32_mul,
            op.i32_const(2),
            op.i32_shl,
            op.i32_add,
          ),
          ...ROWS.map((r) => b.set(`a${r}`, op.i32_const(HALF), op.i32x4_splat)),
          b.while(
            positive(b, "n"),
            b.set("w", b.get("k"), op.i32_load(), op.i32x4_splat),
            ...ROWS.map((r) =>
              mac(b, `a${r}`, [
                ...b.get("p"),
                ...b.get(`d${r}`),
                ...op.i32_add,
                ...op.v128_load8x8_u(),
                ...op.i32x4_extend_low_i16x8_u,
              ], "w")
            ),
            add(b, "p", b.get("ch")),
            add(b, "k", op.i32_const(4)),
            add(b, "n", op.i32_const(-1)),
          ),
          ...ROWS.flatMap((r) => [
            b.set(`a${r}`, shifted(b, `a${r}`), shifted(b, `a${r}`), op.i16x8_narrow_i32x4_s),
            b.get("q"),
            b.get(`e${r}`),
            op.i32_add,
            b.get("oj"),
            op.i32_add,
            b.get(`a${r}`),
            b.get(`a${r}`),
            op.i8x16_narrow_i16x8_u,
            op.v128_store32_lane(),
          ]),
          add(b, "oj", b.get("ch")),
          add(b, "j", op.i32_const(1)),
        ),
        add(b, "y", op.i32_const(ROWS.length)),
      ),
    ],
  },
  {
    // Output row i = sum over its taps of src[row first[i] + t] * weights[i, t], 16 bytes at a
    // time, each tap's row read in order.
    name: "vertical",
    params: ["src", "stride", "bytes", "out", "height", "first", "count", "weights", "ksize"],
    locals: {
      i32: ["i", "x", "base", "p", "n", "k", "kw"],
      v128: ["a0", "a1", "a2", "a3", "w", "lo", "hi"],
    },
    body: (b) => [
      b.set("i", op.i32_const(0)),
      b.while(
        lt(b, "i", "height"),
        b.set(
          "base",
          b.get("src"),
          at(b, "first", b.get("i")),
          b.get("stride"),
          op.i32_mul,
          op.i32_add,
        ),
        b.set(
          "kw",
          b.get("weights"),
          b.get("i"),
          b.get("ksize"),
          op.i32_mul,
          op.i32_const(2),
          op.i32_shl,
          op.i32_add,
        ),
        b.set("x", op.i32_const(0)),
        b.while(
          lt(b, "x", "bytes"),
          b.set("a0", op.i32_const(HALF), op.i32x4_splat),
          b.set("a1", b.get("a0")),
          b.set("a2", b.get("a0")),
          b.set("a3", b.get("a0")),
          b.set("p", b.get("base"), b.get("x"), op.i32_add),
          b.set("k", b.get("kw")),
          b.set("n", at(b, "count", b.get("i"))),
          b.while(
            positive(b, "n"),
            b.set("w", b.get("k"), op.i32_load(), op.i32x4_splat),
            b.set("lo", b.get("p"), op.v128_load8x8_u()),
            b.set("hi", b.get("p"), op.v128_load8x8_u(8)),
            mac(b, "a0", [...b.get("lo"), ...op.i32x4_extend_low_i16x8_u], "w"),
            mac(b, "a1", [...b.get("lo"), ...op.i32x4_extend_high_i16x8_u], "w"),
            mac(b, "a2", [...b.get("hi"), ...op.i32x4_extend_low_i16x8_u], "w"),
            mac(b, "a3", [...b.get("hi"), ...op.i32x4_extend_high_i16x8_u], "w"),
            add(b, "p", b.get("stride")),
            add(b, "k", op.i32_const(4)),
            add(b, "n", op.i32_const(-1)),
          ),
          b.get("out"),
          b.get("x"),
          op.i32_add,
          shifted(b, "a0"),
          shifted(b, "a1"),
          op.i16x8_narrow_i32x4_s,
          shifted(b, "a2"),
          shifted(b, "a3"),
          op.i16x8_narrow_i32x4_s,
          op.i8x16_narrow_i16x8_u,
          op.v128_store(),
          add(b, "x", op.i32_const(16)),
        ),
        add(b, "out", b.get("bytes")),
        add(b, "i", op.i32_const(1)),
      ),
    ],
  },
]);

export interface ResampleKernels {
  memory: WebAssembly.Memory;
  horizontal: (...args: number[]) => void;
  vertical: (...args: number[]) => void;
}

/** The kernels (`exports` is null where WebAssembly has no SIMD). */
export const resampleKernels = new KernelModule<ResampleKernels>(MODULE);
