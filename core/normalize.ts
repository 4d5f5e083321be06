/**
 * 8-bit RGB pixels to a model's float32 input, channel-major: x = v / 255, then (x - mean) / std,
 * each step rounded to float32. That is torchvision's `ToTensor()` + `Normalize(mean, std)`, and
 * also transformers' CLIPImageProcessor (it rescales by the double 1/255, which rounds to the
 * same float32 for every byte). A WebAssembly SIMD kernel does sixteen pixels per step with the
 * same IEEE float32 operations; without SIMD, a TypeScript loop reads one table per channel.
 */
import { Arena, assemble, type Builder, type Code, KernelModule, op } from "./wasm.ts";

const add = (b: Builder, a: string, by: Code) => b.set(a, b.get(a), by, op.i32_add);

/** Lanes of three vectors (48 bytes, 16 pixels) that hold channel c, in two shuffles. */
function channel(b: Builder, c: number): Code {
  const first = Array.from({ length: 16 }, (_, i) => Math.min(3 * i + c, 31));
  const second = Array.from({ length: 16 }, (_, i) => (3 * i + c < 32 ? i : 3 * i + c - 16));
  return [
    ...b.get("v0"),
    ...b.get("v1"),
    ...op.i8x16_shuffle(first),
    ...b.get("v2"),
    ...op.i8x16_shuffle(second),
  ];
}

const MODULE = assemble([
  {
    // `pixels` (a multiple of 16) RGB pixels at `src` to three float32 planes at `out`.
    name: "normalize",
    params: ["src", "out", "pixels", "m0:f32", "m1:f32", "m2:f32", "s0:f32", "s1:f32", "s2:f32"],
    locals: { i32: ["p", "plane"], v128: ["v0", "v1", "v2", "x", "h", "k"] },
    body: (b) => [
      b.set("k", op.f32_const(255), op.f32x4_splat),
      b.set("plane", b.get("pixels"), op.i32_const(2), op.i32_shl),
      b.set("p", op.i32_const(0)),
      b.while(
        [...b.get("p"), ...b.get("pixels"), ...op.i32_lt_s],
        b.set("v0", b.get("src"), op.v128_load()),
        b.set("v1", b.get("src"), op.v128_load(16)),
        b.set("v2", b.get("src"), op.v128_load(32)),
        ...[0, 1, 2].flatMap((c) => [
          b.set("x", channel(b, c)),
          ...[0, 1, 2, 3].flatMap((q) => [
            ...(q % 2 === 0
              ? [b.set(
                "h",
                b.get("x"),
                q < 2 ? op.i16x8_extend_low_i8x16_u : op.i16x8_extend_high_i8x16_u,
              )]
              : []),
            // out[c * plane + p + 4q ...] = (v / 255 - m) / s, float32 at each step.
            b.get("out"),
            b.get("plane"),
            op.i32_const(c),
            op.i32_mul,
            op.i32_add,
            b.get("p"),
            op.i32_const(2),
            op.i32_shl,
            op.i32_add,
            b.get("h"),
            q % 2 ? op.i32x4_extend_high_i16x8_u : op.i32x4_extend_low_i16x8_u,
            op.f32x4_convert_i32x4_s,
            b.get("k"),
            op.f32x4_div,
            b.get(`m${c}`),
            op.f32x4_splat,
            op.f32x4_sub,
            b.get(`s${c}`),
            op.f32x4_splat,
            op.f32x4_div,
            op.v128_store(16 * q),
          ]),
        ]),
        add(b, "src", op.i32_const(48)),
        add(b, "p", op.i32_const(16)),
      ),
    ],
  },
]);

interface Exports {
  memory: WebAssembly.Memory;
  normalize(src: number, out: number, pixels: number, ...meanStd: number[]): void;
}

const kernels = new KernelModule<Exports>(MODULE);

/** [3, pixels] float32 of `data` (`pixels` RGB pixels), normalised per channel. */
export function normalizeRgb(
  data: Uint8Array,
  mean: readonly number[],
  std: readonly number[],
): Float32Array {
  const pixels = data.length / 3;
  const m = mean.map(Math.fround), s = std.map(Math.fround);
  // The kernel runs on whole steps of 16 pixels: the last one reads past the pixels (into the
  // arena's spare bytes) and its extra results are dropped.
  const steps = Math.ceil(pixels / 16) * 16;
  const kernel = kernels.exports;
  if (kernel && pixels > 0 && Arena.fits([steps * 3, steps * 12])) {
    const arena = new Arena(kernel.memory, [steps * 3, steps * 12]);
    const src = arena.put(data), dst = arena.alloc(steps * 12);
    kernel.normalize(src, dst, steps, ...m, ...s);
    let out: Float32Array;
    if (steps === pixels) {
      out = new Float32Array(arena.bytes.buffer.slice(dst, dst + 12 * pixels));
    } else {
      out = new Float32Array(3 * pixels);
      const planes = new Float32Array(arena.bytes.buffer, dst, 3 * steps);
      for (let c = 0; c < 3; c++) {
        out.set(planes.subarray(c * steps, c * steps + pixels), c * pixels);
      }
    }
    kernels.trim();
    return out;
  }
  const out = new Float32Array(3 * pixels);
  const [t0, t1, t2] = [0, 1, 2].map((c) => {
    const table = new Float32Array(256);
    for (let v = 0; v < 256; v++) table[v] = Math.fround(Math.fround(v / 255) - m[c]) / s[c];
    return table;
  });
  for (let p = 0, i = 0; p < pixels; p++, i += 3) {
    out[p] = t0[data[i]];
    out[pixels + p] = t1[data[i + 1]];
    out[2 * pixels + p] = t2[data[i + 2]];
  }
  return out;
}
