/**
 * Class similarity as the official calculate_similarity_matrix.py computes it (fixtures from
 * test/reference/similarity_ref.py: openai CLIP's torchvision transform on PIL images, a tiny
 * CLIP, numpy's mean, sklearn's cosine): preprocessed pixels exact on square and non-square
 * images, the matrix within float32 rounding; the .npz files both ways; saved matrices made by
 * another CLIP recomputed; BMP files decoded as Pillow decodes them.
 */
import assert from "node:assert/strict";
import { copyFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { SafetensorsFile, type Tensor } from "../ffi/mod.ts";
import { validateDataset } from "../core/dataset.ts";
import { clipPreprocessHost, readImage } from "../core/image.ts";
import { bmpInfo, decodeBmp } from "../core/bmp.ts";
import { readNpz, writeNpz } from "../core/npz.ts";
import { DEFAULT_CLIP, DEFAULTS, type RunConfig, TINY } from "../core/config.ts";
import {
  computeSimilarity,
  readSimilarityFile,
  saveSimilarityFile,
  SIMILARITY_FILE,
  similarityMeta,
  similaritySource,
  staleSimilarity,
} from "../app/similarity.ts";
import { main } from "../cli/main.ts";
import { fixture, quietly, withOutput, withTempDir } from "./util.ts";

interface Cases {
  classes: string[];
  images: { class: string; file: string; width: number; height: number }[];
  similarity: number[][];
  bmp: { name: string; mode: string }[];
  bmp_errors: { name: string; error: string }[];
  compressed: Record<string, { shape: number[]; data: (number | string)[] }>;
}

const DIR = fixture("similarity", "cases.json", "expected.safetensors", "clip/config.json");
const cases: Cases = JSON.parse(readFileSync(join(DIR, "cases.json"), "utf8"));
const expected = SafetensorsFile.open(join(DIR, "expected.safetensors"));
const CPU = { device: "cpu", dtype: "f32" } as const;

function host(key: string): Float32Array | Uint8Array {
  using t: Tensor = expected.load(key);
  return t.toHost() as Float32Array | Uint8Array;
}

function maxDiff(a: number[][], b: number[][]): number {
  let m = 0;
  a.forEach((r, i) => r.forEach((v, j) => (m = Math.max(m, Math.abs(v - b[i][j])))));
  return m;
}

Deno.test("similarity: the official preprocessing, pixel for pixel, on square and non-square images", async () => {
  let rounded = 0;
  for (const im of cases.images) {
    const img = await readImage(join(DIR, "data", im.class, im.file));
    const want = host(`pixels/${im.class}/${im.file}`);
    const got = clipPreprocessHost(img, { size: 224, flavor: "torchvision" });
    assert.deepEqual(got, want, `${im.class}/${im.file} (${im.width}x${im.height})`);
    // transformers floors the crop offset: one pixel off wherever the excess is 3 mod 4.
    const floored = clipPreprocessHost(img, { size: 224, flavor: "transformers" });
    if (floored.some((v, i) => v !== want[i])) rounded++;
  }
  console.log(`${cases.images.length} images exact; ${rounded} of them would be a pixel off`);
  assert.ok(rounded >= 4, "the fixture must have images where the two crops part");
});

Deno.test("similarity: the matrix equals calculate_similarity_matrix.py's (the .npz it saved)", async () => {
  const dataset = await validateDataset(join(DIR, "data"), { negatives: false });
  assert.deepEqual(dataset.classes.map((c) => c.folder), cases.classes);
  const clip = join(DIR, "clip");
  const matrix = await computeSimilarity(dataset, clip, CPU);
  const official = await readSimilarityFile(join(DIR, "official.npz"), dataset);
  assert.deepEqual(official.matrix, cases.similarity);
  const err = maxDiff(matrix, official.matrix);
  console.log(`max |dipsy - official| ${err.toExponential(2)} (the official matrix is float32)`);
  assert.ok(err < 1e-6, `similarity off by ${err}`);

  // The transformers crop gives another matrix, well outside that tolerance.
  const { loadClipVision } = await import("../plugins/clip/model.ts");
  const { classSimilarity } = await import("../plugins/pairs/mod.ts");
  const { clipPreprocess } = await import("../core/image.ts");
  const { noGrad } = await import("../ffi/mod.ts");
  const vision = loadClipVision(clip, CPU);
  const embeds: Tensor[] = [];
  try {
    for (const c of dataset.classes) {
      const images = await Promise.all(c.shots.map((s) => readImage(s.path)));
      embeds.push(noGrad(() => {
        using px = clipPreprocess(images, { size: 224, flavor: "transformers" });
        return vision.forward(px).imageEmbeds!;
      }));
    }
    const floored = classSimilarity(embeds);
    const apart = maxDiff(floored, official.matrix);
    console.log(`with the transformers crop it would be ${apart.toExponential(2)} off`);
    assert.ok(apart > 100 * err && apart > 1e-5);
  } finally {
    for (const e of embeds) e.dispose();
    vision.dispose();
  }
});

Deno.test("similarity: per-image embeddings match the reference encoder", async () => {
  const { loadClipVision } = await import("../plugins/clip/model.ts");
  const { noGrad, fromHost } = await import("../ffi/mod.ts");
  const vision = loadClipVision(join(DIR, "clip"), CPU);
  try {
    let worst = 0;
    for (const im of cases.images) {
      const px = host(`pixels/${im.class}/${im.file}`) as Float32Array;
      const want = host(`embeds/${im.class}/${im.file}`) as Float32Array;
      const got = noGrad(() => {
        using x = fromHost(px, [1, 3, 224, 224], "f32");
        using e = vision.forward(x).imageEmbeds!;
        return e.toFloat64();
      });
      want.forEach((v, i) => (worst = Math.max(worst, Math.abs(v - got[i]))));
    }
    console.log(`embeddings: max abs err ${worst.toExponential(2)}`);
    assert.ok(worst < 1e-4);
  } finally {
    vision.dispose();
  }
});

Deno.test("npz: numpy's savez and savez_compressed files read; written files read back", async () => {
  const arrays = readNpz(await Deno.readFile(join(DIR, "compressed.npz")), "compressed.npz");
  assert.deepEqual([...arrays.keys()].sort(), Object.keys(cases.compressed).sort());
  for (const [name, want] of Object.entries(cases.compressed)) {
    const got = arrays.get(name)!;
    assert.deepEqual(got.shape, want.shape, name);
    assert.deepEqual(Array.from(got.data as ArrayLike<number | string>), want.data, name);
  }
  const official = readNpz(await Deno.readFile(join(DIR, "official.npz")));
  assert.deepEqual(official.get("class_names")!.data, cases.classes);
  assert.equal(official.get("similarity_matrix")!.dtype, "<f4");

  const matrix = [[1, 0.25, -1 / 3], [0.25, 1, 0.5], [-1 / 3, 0.5, 1]];
  const bytes = writeNpz({
    similarity_matrix: { shape: [3, 3], data: matrix.flat() },
    class_names: { shape: [3], strings: ["F-A-18", "Ł\u00f3d\u017a", "\u{1F600}"] },
  });
  const back = readNpz(bytes);
  assert.deepEqual(Array.from(back.get("similarity_matrix")!.data as Float64Array), matrix.flat());
  assert.deepEqual(back.get("class_names")!.data, ["F-A-18", "Ł\u00f3d\u017a", "\u{1F600}"]);
  assert.throws(() => readNpz(bytes.subarray(0, 40), "cut.npz"), /cut\.npz: not a zip/);
});

Deno.test("npz written here loads in numpy (the .venv's Python)", async () => {
  const python = join(Deno.cwd(), ".venv", "bin", "python");
  if (!existsSync(python)) {
    console.log(`skipped: no ${python} (the reference venv; deno task test makes it)`);
    return;
  }
  await withTempDir(async (dir) => {
    const file = join(dir, "m.npz");
    await saveSimilarityFile(file, ["a", "b"], [[1, 0.5], [0.5, 1]], {}, { folders: ["x", "y"] });
    const out = new Deno.Command(python, {
      args: [
        "-c",
        "import numpy as np, sys, json; d = np.load(sys.argv[1]); print(json.dumps(" +
        "[d['similarity_matrix'].tolist(), d['class_names'].tolist()]))",
        file,
      ],
      stdout: "piped",
      stderr: "piped",
    }).outputSync();
    assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
    assert.deepEqual(JSON.parse(new TextDecoder().decode(out.stdout)), [
      [[1, 0.5], [0.5, 1]],
      ["x", "y"],
    ]);
  });
});

Deno.test("similarity files: the official .npz used by generate; another CLIP's file recomputed", async () => {
  await withTempDir(async (dir) => {
    const data = join(dir, "data");
    for (const im of cases.images) {
      mkdirSync(join(data, im.class), { recursive: true });
      copyFileSync(join(DIR, "data", im.class, im.file), join(data, im.class, im.file));
    }
    const dataset = await validateDataset(data, { negatives: false });
    const clip = join(DIR, "clip");
    const config: RunConfig = { ...DEFAULTS, data, clip };
    const logs: string[] = [];
    const source = similaritySource(config, CPU, (m) => logs.push(m));

    // The official script's file beside the classes stands for openai CLIP ViT-B/16.
    copyFileSync(join(DIR, "official.npz"), join(data, "similarity_matrix_tiny_seed16.npz"));
    const fromOfficial = await similaritySource({ ...config, clip: DEFAULT_CLIP }, CPU).get(
      dataset,
      join(dir, "out"),
    );
    assert.deepEqual(fromOfficial.matrix, cases.similarity);
    assert.match(fromOfficial.from, /similarity_matrix_tiny_seed16\.npz$/);

    // A similarity.json made with the tiny CLIP is not taken for the folder CLIP's.
    await saveSimilarityFile(
      join(data, SIMILARITY_FILE),
      dataset.classes.map((c) => c.name),
      [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
      similarityMeta(TINY, { seed: 0 }),
    );
    const got = await source.get(dataset, join(dir, "out"));
    assert.match(
      logs.join("\n"),
      /made with CLIP tiny, not .*clip; computing the class similarity again/,
    );
    assert.ok(maxDiff(got.matrix, cases.similarity) < 1e-6);
    assert.equal(staleSimilarity({ clip: TINY, seed: 1 }, TINY, 0)?.includes("seed 1"), true);
    assert.equal(staleSimilarity({}, TINY, 0), null);

    // dipsy similarity: the same refusal to reuse, and .npz out and back in.
    const npz = join(dir, "sim.npz");
    const r = await quietly(() =>
      main(["similarity", "--data", data, "--clip", clip, "--device", "cpu", "--out", npz])
    );
    assert.equal(r, 0);
    const written = readNpz(await Deno.readFile(npz));
    assert.deepEqual(written.get("class_names")!.data, cases.classes);
    const again = await readSimilarityFile(npz, dataset);
    assert.ok(maxDiff(again.matrix, cases.similarity) < 1e-6);
    const { result: code, lines } = await withOutput(() =>
      main(["similarity", "--data", data, "--clip", clip, "--device", "cpu"])
    );
    assert.equal(code, 0);
    assert.match(lines.join("\n"), /made with CLIP tiny.*computing it again/);
    const saved = JSON.parse(readFileSync(join(data, SIMILARITY_FILE), "utf8"));
    assert.equal(saved.meta.clip, clip);
    assert.match(saved.meta.preprocess, /openai-clip/);

    // An .npz of other classes names what does not match.
    writeFileSync(
      join(dir, "bad.npz"),
      writeNpz({
        similarity_matrix: { shape: [1, 1], data: [1] },
        class_names: { shape: [1], strings: ["zebra"] },
      }),
    );
    await assert.rejects(
      () => readSimilarityFile(join(dir, "bad.npz"), dataset),
      /bad\.npz: its classes do not match the data \(missing "a_square", .*not in the data: "zebra"\)/,
    );
  });
});

Deno.test("BMP: every layout Pillow reads decodes to its convert('RGB'), byte for byte", async () => {
  const failures: string[] = [];
  for (const c of cases.bmp) {
    const bytes = await Deno.readFile(join(DIR, "bmp", `${c.name}.bmp`));
    const img = decodeBmp(bytes);
    const want = host(`bmp/${c.name}`) as Uint8Array;
    const info = bmpInfo(bytes);
    assert.equal(info.width * info.height * 3, want.length, c.name);
    if (img.data.some((v, i) => v !== want[i])) failures.push(`${c.name} (PIL mode ${c.mode})`);
    // The same through the generic decoder.
    assert.deepEqual((await readImage(join(DIR, "bmp", `${c.name}.bmp`))).data, img.data);
  }
  console.log(`${cases.bmp.length - failures.length}/${cases.bmp.length} BMP files exact`);
  assert.deepEqual(failures, []);
});

Deno.test("BMP: what Pillow refuses is refused, naming the file; a dataset takes .bmp shots", async () => {
  for (const c of cases.bmp_errors) {
    const path = join(DIR, "bmp", `${c.name}.bmp`);
    await assert.rejects(() => readImage(path), (e: Error) => {
      assert.ok(e.message.startsWith(`cannot decode image ${path}: `), e.message);
      return true;
    }, `${c.name}: Pillow says ${c.error}`);
  }
  const ds = await validateDataset(join(DIR, "data"), { negatives: false });
  const bmps = ds.classes.flatMap((c) => c.shots).filter((s) => s.file.endsWith(".bmp"));
  assert.deepEqual(bmps.map((s) => [s.file, s.width, s.height]), [
    ["small.bmp", 97, 64],
    ["tall79.bmp", 224, 303],
  ]);
});
