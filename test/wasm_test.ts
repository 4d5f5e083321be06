/**
 * The WebAssembly encoder behind the pixel kernels (core/wasm.ts): constants of every size and
 * sign, loops, f32 parameters and results, SIMD lanes, and the per-thread instance that lets a
 * memory grown for a large image go. The kernels themselves are tested against Pillow and
 * torchvision in image_test.ts and train_transforms_test.ts.
 */
import assert from "node:assert/strict";
import { Arena, assemble, KernelModule, op } from "../core/wasm.ts";

interface Exports {
  memory: WebAssembly.Memory;
  constant(): number;
  sum(n: number): number;
  scale(x: number): number;
  lanes(at: number): void;
}

const CONSTANTS = [
  0,
  1,
  -1,
  63,
  64,
  -64,
  -65,
  127,
  128,
  8191,
  8192,
  -8193,
  2 ** 31 - 1,
  -(2 ** 31),
];

function module(constant: number): Uint8Array<ArrayBuffer> {
  return assemble([
    { name: "constant", params: [], result: "i32", body: () => [op.i32_const(constant)] },
    {
      // 0 + 1 + ... + (n - 1)
      name: "sum",
      params: ["n"],
      result: "i32",
      locals: { i32: ["i", "s"] },
      body: (b) => [
        b.set("i", op.i32_const(0)),
        b.set("s", op.i32_const(0)),
        b.while(
          [...b.get("i"), ...b.get("n"), ...op.i32_lt_s],
          b.set("s", b.get("s"), b.get("i"), op.i32_add),
          b.set("i", b.get("i"), op.i32_const(1), op.i32_add),
        ),
        b.get("s"),
      ],
    },
    {
      name: "scale",
      params: ["x:f32"],
      result: "f32",
      body: (b) => [b.get("x"), op.f32_const(0.1), op.f32_mul],
    },
    {
      // Four bytes at `at` reversed in place: a shuffle of one vector.
      name: "lanes",
      params: ["at"],
      body: (b) => [
        b.get("at"),
        b.get("at"),
        op.v128_load(),
        b.get("at"),
        op.v128_load(),
        op.i8x16_shuffle([3, 2, 1, 0, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]),
        op.v128_store(),
      ],
    },
  ]);
}

Deno.test("wasm: constants, loops and SIMD lanes assemble and run", () => {
  for (const c of CONSTANTS) {
    const k = new KernelModule<Exports>(module(c)).exports;
    assert.ok(k, "this engine has WebAssembly SIMD");
    assert.equal(k.constant(), c);
  }
  const k = new KernelModule<Exports>(module(0)).exports!;
  assert.equal(k.sum(0), 0);
  assert.equal(k.sum(100), 4950);
  // float32 all the way: the argument, the constant and the product are rounded to float32.
  assert.equal(k.scale(3.3), Math.fround(Math.fround(3.3) * Math.fround(0.1)));
  const arena = new Arena(k.memory, [16]);
  const at = arena.put(new Uint8Array([1, 2, 3, 4, 5]));
  k.lanes(at);
  assert.deepEqual([...arena.take(at, 5)], [4, 3, 2, 1, 5]);
});

Deno.test("wasm: an instance whose memory grew past the limit is let go", () => {
  const kernels = new KernelModule<Exports>(module(0));
  const first = kernels.exports!;
  kernels.trim();
  assert.equal(kernels.exports, first, "a small memory is kept");
  new Arena(first.memory, [80 << 20]);
  kernels.trim();
  const second = kernels.exports!;
  assert.notEqual(second, first);
  assert.ok(second.memory.buffer.byteLength < 80 << 20);
});
