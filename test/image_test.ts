/**
 * Images against Pillow 13 and transformers 5.23 (fixtures from test/reference/image_ref.py):
 * byte-exact resizing for every Pillow filter (on both the SIMD kernels and the TypeScript
 * passes, and for windows of the source or the output), CLIP preprocessing, decoding of many
 * modes and formats, errors for broken files, and the tensor conversions.
 */
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { SafetensorsFile } from "../ffi/mod.ts";
import {
  centerCrop,
  clipPreprocess,
  clipPreprocessHost,
  cropImage,
  decodeImage,
  encodeImage,
  ImageDecodeError,
  imageFromTensor,
  imageToTensor,
  readImage,
  resizeImage,
  type RgbImage,
  shortestEdgeSize,
  writeImage,
} from "../core/image.ts";
import { resample, RESAMPLE_FILTERS, type ResampleFilter } from "../core/resample.ts";
import { setKernels } from "../core/wasm.ts";
import { Rng } from "../core/rng.ts";
import { normalizeRgb } from "../core/normalize.ts";
import { fixture, noLeak, withTempDir } from "./util.ts";

const FIXTURES = fileURLToPath(new URL("./fixtures/image/", import.meta.url));

interface Cases {
  images: { name: string; file: string; width: number; height: number }[];
  resize: { image: string; filter: ResampleFilter; width: number; height: number; key: string }[];
  clip: {
    image: string;
    flavor: "transformers" | "torchvision";
    size: number;
    crop: number;
    key: string;
  }[];
  decode: { file: string; key: string; exif_transpose: boolean; mode: string; note: string }[];
  errors: { file: string; why: string }[];
  from_tensor: { input: string; key: string };
}

let loaded: { cases: Cases; file: SafetensorsFile } | undefined;
function load(): { cases: Cases; file: SafetensorsFile } {
  if (loaded) return loaded;
  loaded = {
    cases: JSON.parse(Deno.readTextFileSync(fixture("image/cases.json"))),
    file: SafetensorsFile.open(`${FIXTURES}expected.safetensors`),
  };
  return loaded;
}

function expectedArray(key: string): Uint8Array | Float32Array {
  using t = load().file.load(key);
  return t.toHost() as Uint8Array | Float32Array;
}

const images = new Map<string, RgbImage>();
async function input(name: string): Promise<RgbImage> {
  let img = images.get(name);
  if (!img) {
    const c = load().cases.images.find((i) => i.name === name);
    if (!c) throw new Error(`no fixture image ${name}`);
    img = await readImage(`${FIXTURES}${c.file}`);
    images.set(name, img);
  }
  return img;
}

/** Index and values of the first difference, or null. */
function firstDiff(got: ArrayLike<number>, want: ArrayLike<number>): string | null {
  if (got.length !== want.length) return `length ${got.length} != ${want.length}`;
  let count = 0;
  let first = -1;
  for (let i = 0; i < got.length; i++) {
    if (got[i] !== want[i]) {
      if (first < 0) first = i;
      count++;
    }
  }
  return first < 0
    ? null
    : `${count} values differ, first at ${first}: ${got[first]} != ${want[first]}`;
}

Deno.test("decoded PNG inputs have the sizes PIL saw", async () => {
  for (const c of load().cases.images) {
    const img = await input(c.name);
    assert.deepEqual([img.width, img.height], [c.width, c.height], c.name);
  }
});

const KERNELS = ["simd", "typescript"] as const;

for (const kernels of KERNELS) {
  Deno.test(`resize matches Pillow byte for byte (every filter, ${kernels} kernels)`, async () => {
    const { cases } = load();
    const failures: string[] = [];
    setKernels(kernels);
    try {
      for (const c of cases.resize) {
        const got = resizeImage(await input(c.image), c.width, c.height, c.filter);
        const diff = firstDiff(got.data, expectedArray(c.key));
        if (diff) failures.push(`${c.key}: ${diff}`);
      }
    } finally {
      setKernels("simd");
    }
    const exact = cases.resize.length - failures.length;
    console.log(`resize (${kernels}): ${exact}/${cases.resize.length} byte-exact`);
    assert.deepEqual(failures, []);
  });
}

Deno.test("a window of the output is that crop of Pillow's whole resize", async () => {
  const { cases } = load();
  const rng = new Rng(5);
  const failures: string[] = [];
  for (const c of cases.resize) {
    const img = await input(c.image);
    const want: RgbImage = {
      width: c.width,
      height: c.height,
      data: expectedArray(c.key) as Uint8Array,
    };
    for (let k = 0; k < 3; k++) {
      const left = rng.int(c.width), top = rng.int(c.height);
      const region = {
        left,
        top,
        width: 1 + rng.int(c.width - left),
        height: 1 + rng.int(c.height - top),
      };
      const got = resizeImage(img, c.width, c.height, c.filter, { region });
      const crop = cropImage(want, region.left, region.top, region.width, region.height);
      assert.deepEqual([got.width, got.height], [region.width, region.height]);
      const diff = firstDiff(got.data, crop.data);
      if (diff) failures.push(`${c.key} ${JSON.stringify(region)}: ${diff}`);
    }
  }
  assert.deepEqual(failures, []);
});

Deno.test("resampling a source window is resampling its crop; both kernels agree", () => {
  const rng = new Rng(9);
  for (let n = 0; n < 800; n++) {
    const w = 1 + rng.int(n < 400 ? 20 : 90), h = 1 + rng.int(n < 400 ? 20 : 90);
    const ch = 1 + rng.int(5);
    const data = new Uint8Array(w * h * ch);
    // Extremes and mid-tones: the negative lobes overshoot and clip on hard edges.
    for (let i = 0; i < data.length; i++) data[i] = rng.int(3) ? rng.int(256) : 255 * rng.int(2);
    const src = { width: w, height: h, channels: ch, data };
    const ow = 1 + rng.int(120), oh = 1 + rng.int(120);
    const filter = RESAMPLE_FILTERS[rng.int(RESAMPLE_FILTERS.length)];
    const left = rng.int(w), top = rng.int(h);
    const source = { left, top, width: 1 + rng.int(w - left), height: 1 + rng.int(h - top) };
    const rl = rng.int(ow), rt = rng.int(oh);
    const region = { left: rl, top: rt, width: 1 + rng.int(ow - rl), height: 1 + rng.int(oh - rt) };
    const what = `${w}x${h}x${ch} ${filter} -> ${ow}x${oh} ${JSON.stringify({ source, region })}`;

    const cropped = new Uint8Array(source.width * source.height * ch);
    for (let y = 0; y < source.height; y++) {
      const from = ((top + y) * w + left) * ch;
      cropped.set(data.subarray(from, from + source.width * ch), y * source.width * ch);
    }
    const crop = { width: source.width, height: source.height, channels: ch, data: cropped };
    const results = KERNELS.map((kernels) => {
      setKernels(kernels);
      try {
        return [
          resample(src, ow, oh, filter, { source, region }).data,
          resample(crop, ow, oh, filter, { region }).data,
        ];
      } finally {
        setKernels("simd");
      }
    }).flat();
    for (const r of results.slice(1)) assert.equal(firstDiff(r, results[0]), null, what);
  }
});

Deno.test("resample refuses windows outside the image", () => {
  const src = { width: 4, height: 3, channels: 3, data: new Uint8Array(36) };
  const bad = { left: 2, top: 0, width: 3, height: 2 };
  assert.throws(() => resample(src, 8, 8, "bicubic", { source: bad }), /source .* 4x3 image/);
  assert.throws(() => resample(src, 2, 2, "bicubic", { region: bad }), /region .* 2x2 image/);
  assert.throws(
    () => resample(src, 8, 8, "bicubic", { region: { left: 0, top: 0, width: 0, height: 1 } }),
    /region/,
  );
});

Deno.test("resample filters each channel alone (grayscale and RGB agree)", async () => {
  const rgb = await input("odd37x53");
  const gray = new Uint8Array(rgb.width * rgb.height);
  for (let i = 0; i < gray.length; i++) gray[i] = rgb.data[i * 3 + 1];
  const g = resample({ width: rgb.width, height: rgb.height, channels: 1, data: gray }, 20, 70);
  const c = resizeImage(rgb, 20, 70);
  for (let i = 0; i < g.data.length; i++) assert.equal(g.data[i], c.data[i * 3 + 1]);
});

Deno.test("resize rejects bad sizes and filters", async () => {
  const img = await input("odd37x53");
  assert.throws(() => resizeImage(img, 0, 5), /positive integer/);
  assert.throws(() => resizeImage(img, 5, 2.5), /positive integer/);
  assert.throws(() => resizeImage(img, 5, 5, "nearest" as ResampleFilter), /unknown resampling/);
  assert.throws(
    () => resizeImage({ width: 2, height: 2, data: new Uint8Array(5) }, 1, 1),
    /12 bytes/,
  );
});

Deno.test("CLIP preprocessing matches transformers (PIL backend) and torchvision", async () => {
  const { cases } = load();
  let worst = 0;
  let worstKey = "";
  for (const c of cases.clip) {
    const got = clipPreprocessHost(await input(c.image), {
      size: c.size,
      cropSize: c.crop,
      flavor: c.flavor,
    });
    const want = expectedArray(c.key);
    assert.equal(got.length, want.length, c.key);
    for (let i = 0; i < got.length; i++) {
      const d = Math.abs(got[i] - want[i]);
      if (d > worst) [worst, worstKey] = [d, c.key];
    }
  }
  console.log(`CLIP preprocessing: ${cases.clip.length} cases, max abs err ${worst} ${worstKey}`);
  assert.ok(worst <= 1e-6, `max abs err ${worst} at ${worstKey}`);
});

Deno.test("normalizeRgb: float32 ToTensor + Normalize for every pixel count, both kernels", () => {
  const rng = new Rng(3);
  const mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225];
  for (const pixels of [1, 5, 15, 16, 17, 31, 32, 47, 100, 1000]) {
    const data = new Uint8Array(pixels * 3);
    for (let i = 0; i < data.length; i++) data[i] = i < 256 ? i : rng.int(256);
    for (const kernels of KERNELS) {
      setKernels(kernels);
      let got: Float32Array;
      try {
        got = normalizeRgb(data, mean, std);
      } finally {
        setKernels("simd");
      }
      for (let c = 0; c < 3; c++) {
        const m = Math.fround(mean[c]), s = Math.fround(std[c]);
        for (let p = 0; p < pixels; p++) {
          const want = Math.fround(Math.fround(Math.fround(data[p * 3 + c] / 255) - m) / s);
          const what = `${kernels}, ${pixels} pixels: [${c}, ${p}]`;
          assert.ok(Object.is(got[c * pixels + p], want), what);
        }
      }
    }
  }
});

Deno.test("the two CLIP flavours differ where their crop offsets do", async () => {
  // 227 wide: excess 3, transformers starts at 1, torchvision at round(1.5) = 2.
  const img = await input("odd227x224");
  const t = centerCrop(img, 224, 224, "transformers");
  const v = centerCrop(img, 224, 224, "torchvision");
  assert.deepEqual(t.data.subarray(0, 3), img.data.subarray(3, 6));
  assert.deepEqual(v.data.subarray(0, 3), img.data.subarray(6, 9));
  assert.deepEqual(shortestEdgeSize(500, 333, 224), { width: 336, height: 224 });
  assert.deepEqual(shortestEdgeSize(37, 53, 224), { width: 224, height: 320 });
});

Deno.test("centre crop pads small images with black like transformers", () => {
  const img: RgbImage = { width: 1, height: 2, data: new Uint8Array([1, 2, 3, 4, 5, 6]) };
  const out = centerCrop(img, 3, 3);
  // transformers puts the odd padding pixel before the image: offset ceil((3 - 1) / 2) = 1.
  const want = new Uint8Array(27);
  want.set([1, 2, 3], (1 * 3 + 1) * 3);
  want.set([4, 5, 6], (2 * 3 + 1) * 3);
  assert.deepEqual(out.data, want);
});

Deno.test("clipPreprocess batches into a [B, 3, 224, 224] f32 tensor without leaking", async () => {
  const a = await input("photo500x333");
  const b = await input("tiny1x1");
  noLeak("clipPreprocess", () => {
    using t = clipPreprocess([a, b]);
    assert.deepEqual(t.shape, [2, 3, 224, 224]);
    assert.equal(t.dtype, "f32");
    const host = t.toHost() as Float32Array;
    assert.deepEqual(host.subarray(0, 3 * 224 * 224), clipPreprocessHost(a));
    assert.deepEqual(host.subarray(3 * 224 * 224), clipPreprocessHost(b));
  });
});

Deno.test("decoding matches PIL's convert('RGB') for every mode and format", async () => {
  const { cases } = load();
  const failures: string[] = [];
  for (const c of cases.decode) {
    const img = await readImage(`${FIXTURES}${c.file}`, { exifTranspose: c.exif_transpose });
    const want = expectedArray(c.key);
    const diff = firstDiff(img.data, want);
    if (diff) failures.push(`${c.key} (PIL mode ${c.mode}, ${img.width}x${img.height}): ${diff}`);
  }
  console.log(`decode: ${cases.decode.length - failures.length}/${cases.decode.length} exact`);
  assert.deepEqual(failures, []);
});

Deno.test("EXIF orientation is ignored unless asked for", async () => {
  const plain = await readImage(`${FIXTURES}files/exif6.png`);
  const turned = await readImage(`${FIXTURES}files/exif6.png`, { exifTranspose: true });
  assert.deepEqual([plain.width, plain.height], [61, 43]);
  assert.deepEqual([turned.width, turned.height], [43, 61]);
});

Deno.test("broken and non-image files raise an error naming the file", async () => {
  const { cases } = load();
  assert.ok(cases.errors.length >= 5);
  for (const c of cases.errors) {
    const path = `${FIXTURES}${c.file}`;
    await assert.rejects(readImage(path), (e: unknown) => {
      assert.ok(e instanceof ImageDecodeError, `${c.file}: ${e}`);
      assert.ok(e.message.includes(path), e.message);
      return true;
    });
  }
  await assert.rejects(readImage(`${FIXTURES}files/notes.txt`), /not an image in a supported/);
  await assert.rejects(readImage(`${FIXTURES}files/empty.jpg`), /empty/);
  await assert.rejects(readImage(`${FIXTURES}files/truncated.png`), /corrupt or truncated/);
  await assert.rejects(readImage(`${FIXTURES}files/no-such-file.png`), /no-such-file\.png/);
  await assert.rejects(decodeImage(new Uint8Array([1, 2, 3]), "shots/cat/3.jpg"), /cat\/3\.jpg/);
});

Deno.test("imageFromTensor rounds like diffusers' numpy_to_pil; imageToTensor inverts it", () => {
  const { cases, file } = load();
  noLeak("imageFromTensor", () => {
    using x = file.load(cases.from_tensor.input);
    const got = imageFromTensor(x) as RgbImage[];
    const want = expectedArray(cases.from_tensor.key);
    assert.equal(got.length, 2);
    const per = want.length / 2;
    for (let b = 0; b < 2; b++) {
      const diff = firstDiff(got[b].data, want.subarray(b * per, (b + 1) * per));
      assert.equal(diff, null, `image ${b}: ${diff}`);
    }
    const trunc = imageFromTensor(x, { rounding: "truncate" }) as RgbImage[];
    const host = x.toHost() as Float32Array;
    assert.equal(trunc[0].data[0], Math.trunc(Math.fround(host[0] * 255)));

    using back = imageToTensor(got);
    assert.deepEqual(back.shape, [2, 3, 5, 7]);
    const again = imageFromTensor(back) as RgbImage[];
    assert.deepEqual(again[1].data, got[1].data);
    using one = imageToTensor(got[0]);
    assert.deepEqual(one.shape, [3, 5, 7]);
    assert.deepEqual((imageFromTensor(one) as RgbImage).data, got[0].data);
  });
});

Deno.test("encoding: PNG and lossless WebP round-trip exactly, JPEG closely", async () => {
  const img = await input("odd37x53");
  for (const [format, opts] of [["png", {}], ["webp", { lossless: true }]] as const) {
    const back = await decodeImage(await encodeImage(img, format, opts));
    assert.deepEqual(back.data, img.data, format);
  }
  const smooth = resizeImage(img, 64, 64, "bilinear");
  const jpeg = await decodeImage(await encodeImage(smooth, "jpeg", { quality: 95 }));
  let err = 0;
  for (let i = 0; i < smooth.data.length; i++) err += Math.abs(jpeg.data[i] - smooth.data[i]);
  assert.ok(err / smooth.data.length < 6, `JPEG mean abs err ${err / smooth.data.length}`);
  await assert.rejects(encodeImage(img, "jpeg", { quality: 0 }), /quality/);

  await withTempDir(async (dir) => {
    await writeImage(`${dir}/a.PNG`, img);
    assert.deepEqual((await readImage(`${dir}/a.PNG`)).data, img.data);
    await assert.rejects(writeImage(`${dir}/a.bmp`, img), /extension/);
  });
});
