/**
 * Reference-image augmentation against Pillow (fixtures from test/reference/augment_ref.py):
 * rotation byte for byte over Pillow's fast paths and its fixed-point affine engine, and the whole
 * flip / square crop / rotate / centre crop chain of the official code.
 */
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import {
  applyAugment,
  augmentedSize,
  finalCropBox,
  flipHorizontal,
  rotateNearest,
} from "../core/augment.ts";
import type { RgbImage } from "../core/image.ts";
import type { AugmentParams } from "../core/plugins.ts";
import { augmentParams } from "../plugins/pairs/augment.ts";
import { derive } from "../core/rng.ts";
import { fixture } from "./util.ts";

const FIXTURES = fileURLToPath(new URL("./fixtures/augment/", import.meta.url));

interface Entry {
  offset: number;
  length: number;
  width: number;
  height: number;
}
interface Cases {
  images: Entry[];
  rotate: (Entry & { image: number; angle: number })[];
  augment: (Entry & { image: number; flip: boolean; crop: AugmentParams["crop"]; angle: number })[];
}

function load(): { cases: Cases; blob: Uint8Array } {
  return {
    cases: JSON.parse(Deno.readTextFileSync(fixture("augment/cases.json"))),
    blob: Deno.readFileSync(`${FIXTURES}data.bin`),
  };
}

function image(blob: Uint8Array, e: Entry): RgbImage {
  return { width: e.width, height: e.height, data: blob.subarray(e.offset, e.offset + e.length) };
}

function assertSameImage(got: RgbImage, want: RgbImage, what: string): void {
  assert.equal(`${got.width}x${got.height}`, `${want.width}x${want.height}`, `${what}: size`);
  let diff = 0;
  let first = -1;
  for (let i = 0; i < want.data.length; i++) {
    if (got.data[i] !== want.data[i]) {
      diff++;
      if (first < 0) first = i;
    }
  }
  if (diff) {
    const px = Math.floor(first / 3);
    throw new Error(
      `${what}: ${diff} bytes differ from Pillow, first at pixel (${px % want.width}, ` +
        `${Math.floor(px / want.width)})`,
    );
  }
}

Deno.test("rotateNearest matches PIL Image.rotate(angle) byte for byte", () => {
  const { cases, blob } = load();
  for (const c of cases.rotate) {
    const src = image(blob, cases.images[c.image]);
    const got = rotateNearest(src, c.angle);
    assertSameImage(got, image(blob, c), `rotate ${src.width}x${src.height} by ${c.angle}`);
  }
  console.log(`${cases.rotate.length} rotations identical to Pillow`);
});

Deno.test("applyAugment matches the official PIL augmentation byte for byte", () => {
  const { cases, blob } = load();
  for (const c of cases.augment) {
    const src = image(blob, cases.images[c.image]);
    const params: AugmentParams = { flip: c.flip, crop: c.crop, angle: c.angle };
    const got = applyAugment(src, params);
    assertSameImage(
      got,
      image(blob, c),
      `augment ${src.width}x${src.height} ${JSON.stringify(params)}`,
    );
    assert.equal(augmentedSize(src.width, src.height, params), got.width);
    assert.equal(got.width, got.height);
  }
  console.log(`${cases.augment.length} augmentations identical to Pillow`);
});

Deno.test("augment helpers: flip, crop box, bad parameters", () => {
  const img: RgbImage = { width: 3, height: 1, data: new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8, 9]) };
  assert.deepEqual([...flipHorizontal(img).data], [7, 8, 9, 4, 5, 6, 1, 2, 3]);
  // floor(s / sqrt(2)) and floor division for the offset, as in the official code.
  assert.deepEqual(finalCropBox(100, 100), [15, 15, 70]);
  assert.deepEqual(finalCropBox(16, 16), [2, 2, 11]);
  assert.throws(() => finalCropBox(1, 1), /too small/);
  const rgb = (w: number, h: number): RgbImage => ({
    width: w,
    height: h,
    data: new Uint8Array(w * h * 3),
  });
  assert.throws(
    () => applyAugment(rgb(10, 8), { flip: false, crop: [3, 0, 8], angle: 0 }),
    /does not fit/,
  );
  assert.throws(() => rotateNearest(rgb(4, 4), NaN), /bad angle/);
});

Deno.test("augmentParams: ranges, square crop of side min(W, H), determinism", () => {
  let flips = 0;
  for (let i = 0; i < 2000; i++) {
    const [w, h] = i % 2 ? [64, 48] : [30, 90];
    const p = augmentParams(derive(5, "augment-test", i), w, h);
    assert.ok(p.angle >= -20 && p.angle < 20, `angle ${p.angle}`);
    assert.ok(p.crop);
    const [x, y, s] = p.crop;
    assert.equal(s, Math.min(w, h));
    assert.ok(x >= 0 && y >= 0 && x + s <= w && y + s <= h);
    assert.ok(x === 0 || y === 0);
    if (p.flip) flips++;
    assert.deepEqual(augmentParams(derive(5, "augment-test", i), w, h), p);
  }
  assert.ok(Math.abs(flips / 2000 - 0.5) < 0.05, `flip rate ${flips / 2000}`);
  assert.equal(augmentParams(derive(1, "x"), 40, 40).crop, null);
});
