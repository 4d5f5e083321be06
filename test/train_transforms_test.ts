/**
 * The classifier's training augmentations against torchvision on PIL images (fixtures from
 * test/reference/train_transforms_ref.py): every functional op byte for byte over several sizes,
 * image kinds and parameters; RandAugment's magnitude table value for value; whole chains drawn by
 * torchvision's own transform classes, replayed from their recorded parameters; adjust_hue on
 * every RGB colour (test/reference/hue_ref.py). The ops run both on the SIMD kernels and on the
 * TypeScript loops. Then our drawing: determinism, the distributions of the decisions, and option
 * validation.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import type { RgbImage } from "../core/image.ts";
import { derive, Rng } from "../core/rng.ts";
import {
  adjustBrightness,
  adjustContrast,
  adjustHue,
  adjustSaturation,
  adjustSharpness,
  affine,
  type AffineParams,
  applyRandAugmentOp,
  applyTrainTransform,
  autocontrast,
  DATADREAM_TRAIN_TRANSFORM,
  drawTrainTransform,
  equalize,
  gaussianBlur,
  grayscale,
  hflip,
  posterize,
  type RandAugmentOp,
  randAugmentSpace,
  resizedCrop,
  rotate,
  solarize,
  toNormalizedFloat,
  trainTransform,
  type TrainTransformOptions,
  type TrainTransformParams,
} from "../plugins/classifiers/transforms.ts";
import { setKernels } from "../core/wasm.ts";
import { fixture } from "./util.ts";

const KERNELS = ["simd", "typescript"] as const;

/** Runs `fn` with the given kernels, then restores the default (SIMD). */
function withKernels<T>(kind: typeof KERNELS[number], fn: () => T): T {
  setKernels(kind);
  try {
    return fn();
  } finally {
    setKernels("simd");
  }
}

interface Entry {
  offset: number;
  length: number;
  width: number;
  height: number;
}
interface OpCase extends Entry {
  op: string;
  image: number;
  args: Record<string, unknown>;
}
interface SpaceCase {
  height: number;
  width: number;
  bins: number;
  magnitudes: Record<string, number[]>;
  signed: Record<string, boolean>;
}
interface ChainCase extends Entry {
  image: number;
  params: TrainTransformParams;
  config: string;
  normalized?: { offset: number; length: number };
}
interface Cases {
  images: Entry[];
  ops: OpCase[];
  space: SpaceCase[];
  chains: ChainCase[];
}

let loaded: { cases: Cases; blob: Uint8Array; floats: Float32Array } | undefined;
function load() {
  if (!loaded) {
    const dir = fixture("train_transforms", "cases.json", "data.bin", "normalized.bin");
    const raw = Deno.readFileSync(`${dir}/normalized.bin`);
    loaded = {
      cases: JSON.parse(Deno.readTextFileSync(`${dir}/cases.json`)),
      blob: Deno.readFileSync(`${dir}/data.bin`),
      floats: new Float32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4),
    };
  }
  return loaded;
}

function image(blob: Uint8Array, e: Entry): RgbImage {
  return { width: e.width, height: e.height, data: blob.subarray(e.offset, e.offset + e.length) };
}

/** The number of differing bytes, with the first mismatch described; "" when identical. */
function compare(got: RgbImage, want: RgbImage): string {
  if (got.width !== want.width || got.height !== want.height) {
    return `size ${got.width}x${got.height}, want ${want.width}x${want.height}`;
  }
  let diff = 0;
  let first = -1;
  for (let i = 0; i < want.data.length; i++) {
    if (got.data[i] !== want.data[i]) {
      diff++;
      if (first < 0) first = i;
    }
  }
  if (!diff) return "";
  const px = Math.floor(first / 3);
  return `${diff} of ${want.data.length} bytes differ, first at (${px % want.width}, ` +
    `${Math.floor(px / want.width)}) channel ${first % 3}: ${got.data[first]}, want ` +
    `${want.data[first]}`;
}

const num = (v: unknown) => v as number;
const OPS: Record<string, (img: RgbImage, a: Record<string, unknown>) => RgbImage> = {
  brightness: (img, a) => adjustBrightness(img, num(a.factor)),
  contrast: (img, a) => adjustContrast(img, num(a.factor)),
  saturation: (img, a) => adjustSaturation(img, num(a.factor)),
  sharpness: (img, a) => adjustSharpness(img, num(a.factor)),
  hue: (img, a) => adjustHue(img, num(a.factor)),
  grayscale: (img) => grayscale(img),
  solarize: (img, a) => solarize(img, num(a.threshold)),
  posterize: (img, a) => posterize(img, num(a.bits)),
  autocontrast: (img) => autocontrast(img),
  equalize: (img) => equalize(img),
  hflip: (img) => hflip(img),
  affine: (img, a) => affine(img, a as unknown as AffineParams),
  rotate: (img, a) => rotate(img, num(a.angle)),
  randaugment: (img, a) => applyRandAugmentOp(img, a.name as RandAugmentOp, num(a.magnitude)),
  blur: (img, a) => gaussianBlur(img, num(a.kernel), num(a.sigma)),
  resizedCrop: (img, a) =>
    resizedCrop(img, num(a.top), num(a.left), num(a.height), num(a.width), num(a.size)),
};

for (const op of Object.keys(OPS)) {
  for (const kernels of KERNELS) {
    Deno.test(`${op} matches torchvision on PIL byte for byte (${kernels})`, () =>
      withKernels(kernels, () => {
        const { cases, blob } = load();
        const mine = cases.ops.filter((c) => c.op === op);
        assert.ok(mine.length > 0, `no fixture cases for ${op}`);
        const failures: string[] = [];
        for (const c of mine) {
          const src = image(blob, cases.images[c.image]);
          const input = { ...src, data: src.data.slice() };
          const got = OPS[op](input, c.args);
          assert.deepEqual(input.data, src.data, `${op} modified its input`);
          const msg = compare(got, image(blob, c));
          if (msg) failures.push(`${src.width}x${src.height} ${JSON.stringify(c.args)}: ${msg}`);
        }
        assert.equal(
          failures.length,
          0,
          `${failures.length} of ${mine.length} ${op} cases differ:\n  ${failures.join("\n  ")}`,
        );
      }));
  }
}

Deno.test("randAugmentSpace equals torchvision's _augmentation_space (float32 linspace)", () => {
  const { cases } = load();
  for (const s of cases.space) {
    const mine = randAugmentSpace(s.bins, s.height, s.width);
    assert.deepEqual(Object.keys(mine), Object.keys(s.magnitudes), "op order");
    for (const [op, want] of Object.entries(s.magnitudes)) {
      const got = mine[op as RandAugmentOp];
      assert.equal(got.signed, s.signed[op], `${op} signed`);
      const bad = want.map((v, i) => [i, v, got.magnitudes[i]]).filter(([, v, g]) => v !== g);
      assert.equal(got.magnitudes.length, want.length, `${op} length`);
      assert.deepEqual(bad, [], `${op} bins=${s.bins} ${s.height}x${s.width}: [index, want, got]`);
    }
  }
});

for (const kernels of KERNELS) {
  Deno.test(`applyTrainTransform replays torchvision's own pipeline byte for byte (${kernels})`, () =>
    withKernels(kernels, () => {
      const { cases, blob, floats } = load();
      const failures: string[] = [];
      const seen = new Set<string>();
      for (const [n, c] of cases.chains.entries()) {
        const src = image(blob, cases.images[c.image]);
        const got = applyTrainTransform(src, c.params);
        const msg = compare(got, image(blob, c));
        if (msg) failures.push(`chain ${n} (${c.config}) ${JSON.stringify(c.params)}: ${msg}`);
        for (const s of c.params.randAugment) seen.add(s.op);
        if (c.params.blur) seen.add("blur");
        if (c.params.grayscale) seen.add("grayscale");
        if (c.params.solarize) seen.add("solarize");
        if (c.normalized) {
          const want = floats.subarray(
            c.normalized.offset,
            c.normalized.offset + c.normalized.length,
          );
          const x = toNormalizedFloat(got);
          assert.equal(x.length, want.length);
          let bad = 0;
          for (let i = 0; i < x.length; i++) if (!Object.is(x[i], want[i])) bad++;
          assert.equal(
            bad,
            0,
            `chain ${n}: ${bad} normalised values differ from ToTensor+Normalize`,
          );
        }
      }
      assert.equal(failures.length, 0, failures.join("\n"));
      for (const step of ["blur", "grayscale", "solarize"]) assert.ok(seen.has(step), step);
    }));
}

Deno.test("adjustHue matches torchvision on every RGB colour", () => {
  const dir = fixture("hue", "cases.json");
  const { side, cases } = JSON.parse(Deno.readTextFileSync(`${dir}/cases.json`)) as {
    side: number;
    cases: { factor: number; rows: string[] }[];
  };
  // Pixel (x, y): r = y >> 4, g = (y & 15) << 4 | x >> 8, b = x & 255 (see hue_ref.py).
  const data = new Uint8Array(side * side * 3);
  for (let y = 0, i = 0; y < side; y++) {
    for (let x = 0; x < side; x++, i += 3) {
      data[i] = y >> 4;
      data[i + 1] = ((y & 15) << 4) | (x >> 8);
      data[i + 2] = x & 255;
    }
  }
  const image = { width: side, height: side, data };
  const row = side * 3;
  for (const { factor, rows } of cases) {
    const out = adjustHue(image, factor).data;
    const bad: number[] = [];
    for (let y = 0; y < side; y++) {
      const digest = createHash("sha256").update(out.subarray(y * row, (y + 1) * row)).digest(
        "hex",
      );
      if (digest !== rows[y]) bad.push(y);
    }
    const where = bad.slice(0, 5).map((y) =>
      `r=${y >> 4} g=${(y & 15) << 4}..${((y & 15) << 4) + 15}`
    );
    assert.equal(
      bad.length,
      0,
      `factor ${factor}: ${bad.length} rows differ (${where.join("; ")})`,
    );
  }
});

Deno.test("the SIMD kernels and the TypeScript loops give the same bytes", () => {
  // Sizes around the kernels' 16-byte steps and the 3x3 filter's borders, many value ranges.
  const rng = new Rng(17);
  for (let n = 0; n < 120; n++) {
    const w = 1 + rng.int(n < 60 ? 12 : 70), h = 1 + rng.int(n < 60 ? 12 : 50);
    const img = noise(w, h, n);
    const factor = [0, 0.3, 1, 1.7, rng.uniform() * 3][n % 5];
    const ops: [string, (i: RgbImage) => RgbImage][] = [
      ["sharpness", (i) => adjustSharpness(i, factor)],
      ["saturation", (i) => adjustSaturation(i, factor)],
      ["contrast", (i) => adjustContrast(i, factor)],
      ["grayscale", (i) => grayscale(i)],
    ];
    for (const [name, op] of ops) {
      const a = withKernels("simd", () => op(img));
      const b = withKernels("typescript", () => op(img));
      assert.equal(compare(a, b), "", `${name} ${w}x${h} factor ${factor}`);
    }
  }
});

const noise = (w: number, h: number, seed: number): RgbImage => {
  const rng = new Rng(seed);
  const data = new Uint8Array(w * h * 3);
  for (let i = 0; i < data.length; i++) data[i] = rng.int(256);
  return { width: w, height: h, data };
};

Deno.test("trainTransform: same seed, same pixels; the record replays; output size", () => {
  const img = noise(61, 47, 3);
  for (let i = 0; i < 6; i++) {
    const a = trainTransform(img, derive(11, "tt", i));
    const b = trainTransform(img, derive(11, "tt", i));
    assert.equal(compare(a, b), "");
    assert.equal(a.width, 224);
    assert.equal(a.height, 224);
    const params = drawTrainTransform(derive(11, "tt", i), img.width, img.height);
    const replayed = applyTrainTransform(img, JSON.parse(JSON.stringify(params)));
    assert.equal(compare(replayed, a), "");
  }
  const p1 = drawTrainTransform(derive(11, "tt", 0), 61, 47);
  const p2 = drawTrainTransform(derive(11, "tt", 1), 61, 47);
  assert.notDeepEqual(p1, p2);
  const small = trainTransform(img, derive(1, "small"), { size: 32, blur: false });
  assert.equal(`${small.width}x${small.height}`, "32x32");
});

Deno.test("drawTrainTransform: the decisions follow torchvision's distributions", () => {
  const N = 2000;
  const [W, H] = [300, 200];
  const space = randAugmentSpace(31, H, W);
  const counts: Record<string, number> = {};
  let flips = 0, jitters = 0, grays = 0, blurs = 0, solarizes = 0, negative = 0, signed = 0;
  for (let n = 0; n < N; n++) {
    const p = drawTrainTransform(derive(7, "dist", n), W, H);
    assert.equal(p.size, 224);
    assert.equal(p.randAugment.length, 2);
    for (const { op, magnitude } of p.randAugment) {
      counts[op] = (counts[op] ?? 0) + 1;
      const table = space[op].magnitudes;
      assert.equal(Math.abs(magnitude), table.length > 1 ? table[9] : 0, op);
      if (space[op].signed) {
        signed++;
        if (magnitude < 0) negative++;
      }
    }
    const { top, left, height: h, width: w } = p.crop;
    assert.ok(top >= 0 && left >= 0 && top + h <= H && left + w <= W, JSON.stringify(p.crop));
    // The box sides are rounded, so the fraction and ratio hold up to half a pixel per side.
    assert.ok((w + 0.5) * (h + 0.5) >= 0.25 * W * H && w * h <= W * H, `area ${w}x${h}`);
    assert.ok((w + 0.5) / (h - 0.5) >= 3 / 4 && (w - 0.5) / (h + 0.5) <= 4 / 3, `ratio ${w}x${h}`);
    if (p.flip) flips++;
    if (p.jitter) {
      jitters++;
      assert.deepEqual(p.jitter.map((j) => j.op).sort(), [
        "brightness",
        "contrast",
        "hue",
        "saturation",
      ]);
      for (const { op, factor } of p.jitter) {
        const [lo, hi] = op === "hue" ? [-0.1, 0.1] : op === "saturation" ? [0.8, 1.2] : [0.6, 1.4];
        assert.ok(factor >= lo && factor < hi, `${op} ${factor}`);
      }
    }
    if (p.grayscale) grays++;
    if (p.blur) {
      blurs++;
      assert.equal(p.blur.kernel, 23);
      assert.ok(p.blur.sigma >= 0.1 && p.blur.sigma < 2.0);
    }
    if (p.solarize) {
      solarizes++;
      assert.equal(p.solarize.threshold, 128);
    }
  }
  // Binomial counts within 5 standard deviations.
  const near = (k: number, n: number, q: number, what: string) => {
    const sd = Math.sqrt(n * q * (1 - q));
    assert.ok(Math.abs(k - n * q) < 5 * sd, `${what}: ${k} of ${n}, expected about ${n * q}`);
  };
  near(flips, N, 0.5, "flips");
  near(jitters, N, 0.8, "jitter");
  near(grays, N, 0.2, "grayscale");
  near(blurs, N, 0.2, "blur");
  near(solarizes, N, 0.2, "solarize");
  near(negative, signed, 0.5, "negative magnitudes");
  assert.equal(Object.keys(counts).length, 14);
  for (const [op, k] of Object.entries(counts)) near(k, 2 * N, 1 / 14, `RandAugment ${op}`);

  // A strip far outside the ratio range: every try fails, and the fallback is the centred crop
  // at the nearest allowed ratio.
  const strip = drawTrainTransform(new Rng(1), 1000, 10, { randAugment: false });
  assert.deepEqual(strip.crop, { top: 0, left: 493, height: 10, width: 13 });
});

Deno.test("options: defaults, switches and RangeErrors", () => {
  assert.equal(DATADREAM_TRAIN_TRANSFORM.size, 224);
  assert.ok(Object.isFrozen(DATADREAM_TRAIN_TRANSFORM));
  const off = drawTrainTransform(new Rng(3), 50, 40, {
    randAugment: false,
    jitter: false,
    blur: false,
    solarize: false,
    flipP: 0,
    grayscaleP: 0,
    scale: [1, 1],
  });
  assert.deepEqual(off.randAugment, []);
  assert.equal(off.jitter, null);
  assert.equal(off.blur, null);
  assert.equal(off.solarize, null);
  assert.equal(off.flip, false);
  assert.equal(off.grayscale, false);
  const all = drawTrainTransform(new Rng(3), 50, 40, {
    jitter: { brightness: 0, contrast: 0.5, saturation: 0, hue: 0.2, p: 1 },
    blur: { kernel: 5, sigma: [1, 1], p: 1 },
    solarize: { threshold: 99, p: 1 },
    grayscaleP: 1,
    flipP: 1,
    randAugment: { ops: 3, magnitude: 0, bins: 5 },
  });
  assert.deepEqual(all.jitter?.map((j) => j.op).sort(), ["contrast", "hue"]);
  assert.deepEqual(all.blur, { kernel: 5, sigma: 1 });
  assert.deepEqual(all.solarize, { threshold: 99 });
  assert.ok(all.flip && all.grayscale);
  assert.equal(all.randAugment.length, 3);

  const bad: [TrainTransformOptions, RegExp][] = [
    [{ size: 0 }, /size/],
    [{ size: 22.5 }, /size/],
    [{ scale: [0.5, 0.2] }, /scale/],
    [{ scale: [0, 1] }, /scale/],
    [{ flipP: 1.5 }, /flipP/],
    [{ grayscaleP: -0.1 }, /grayscaleP/],
    [{ randAugment: { ops: 2, magnitude: 31, bins: 31 } }, /magnitude/],
    [{ randAugment: { ops: -1, magnitude: 9, bins: 31 } }, /ops/],
    [{ jitter: { brightness: -1, contrast: 0, saturation: 0, hue: 0, p: 1 } }, /brightness/],
    [{ jitter: { brightness: 0, contrast: 0, saturation: 0, hue: 0.6, p: 1 } }, /hue/],
    [{ blur: { kernel: 4, sigma: [0.1, 2], p: 0.2 } }, /odd/],
    [{ blur: { kernel: 5, sigma: [0, 2], p: 0.2 } }, /sigma/],
    [{ solarize: { threshold: NaN, p: 0.2 } }, /threshold/],
    [{ sise: 3 } as unknown as TrainTransformOptions, /unknown option "sise"/],
  ];
  for (const [opts, re] of bad) {
    assert.throws(() => drawTrainTransform(new Rng(1), 10, 10, opts), RangeError);
    assert.throws(() => drawTrainTransform(new Rng(1), 10, 10, opts), re, JSON.stringify(opts));
  }
  const img = noise(20, 20, 1);
  const params = drawTrainTransform(new Rng(1), 20, 20, { randAugment: false });
  assert.throws(
    () => applyTrainTransform(img, { ...params, crop: { top: 5, left: 0, height: 16, width: 4 } }),
    /does not fit/,
  );
  assert.throws(() => adjustHue(img, 0.6), RangeError);
  assert.throws(() => posterize(img, 0), RangeError);
  assert.throws(() => gaussianBlur(img, 41, 1), /too small/);
  assert.throws(() => gaussianBlur(img, 4, 1), RangeError);
  assert.throws(() => toNormalizedFloat(img, [0.5, 0.5]), RangeError);
});
