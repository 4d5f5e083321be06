/**
 * Few-shot input: both layouts, the class-name mapping file, class and file order, and every kind
 * of bad input in one dataset, all reported at once with file names; `skipBad`.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import sharp from "sharp";
import {
  classifierTemplate,
  compareCodePoints,
  DatasetError,
  datasetKey,
  type DatasetProblem,
  locateDataset,
  promptFor,
  promptTemplate,
  validateDataset,
} from "../core/dataset.ts";
import { encodeImage, type ImageFormat } from "../core/image.ts";
import { noiseImage, withTempDir, writeNoiseImage } from "./util.ts";

function writeRgb(path: string, width: number, height: number, format: ImageFormat = "png") {
  return writeNoiseImage(path, width, height, width * 31 + height, format);
}

/** Images in other modes, which decode but are converted to RGB. */
async function writeOddModes(dir: string) {
  const raw = noiseImage(24, 20);
  const base = () => sharp(raw.data, { raw: { width: 24, height: 20, channels: 3 } });
  await Deno.writeFile(join(dir, "gray.png"), await base().toColourspace("b-w").png().toBuffer());
  await Deno.writeFile(join(dir, "cmyk.jpg"), await base().toColourspace("cmyk").jpeg().toBuffer());
  await Deno.writeFile(join(dir, "rgba.png"), await base().ensureAlpha(0.5).png().toBuffer());
  await Deno.writeFile(join(dir, "g16.png"), await base().toColourspace("grey16").png().toBuffer());
}

/** A dataset with one instance of every problem the validator knows. */
async function badDataset(root: string) {
  const plane = join(root, "airplane");
  await writeRgb(join(plane, "a.png"), 32, 24);
  await writeRgb(join(plane, "b.jpg"), 24, 32, "jpeg");
  await writeRgb(join(plane, "c.webp"), 20, 20, "webp");
  await writeRgb(join(plane, "D.PNG"), 17, 40);
  await writeOddModes(plane);
  await Deno.writeTextFile(join(plane, ".DS_Store"), "hidden: ignored silently");
  await Deno.writeTextFile(join(plane, "notes.txt"), "not an image");
  await writeRgb(join(plane, "sub", "x.png"), 20, 20);
  await Deno.writeFile(
    join(plane, "corrupt.jpg"),
    new Uint8Array(300).map((_, i) => (i * 7) % 251),
  );
  const png = await encodeImage(noiseImage(40, 40), "png");
  await Deno.writeFile(join(plane, "trunc.png"), png.subarray(0, Math.floor(png.length * 0.6)));
  await Deno.writeFile(join(plane, "empty.jpg"), new Uint8Array());
  await writeRgb(join(plane, "tiny.png"), 8, 30);
  await Deno.symlink(join(root, "does-not-exist.jpg"), join(plane, "broken.jpg"));

  await writeRgb(join(root, "F-A-18", "1.jpg"), 30, 20, "jpeg");
  await writeRgb(join(root, "F-A-18", "0.png"), 20, 20);
  await Deno.mkdir(join(root, "empty class"));
  await Deno.writeTextFile(join(root, "empty class", "readme.md"), "nothing here");
  await writeRgb(join(root, "zebra", "z.webp"), 18, 18, "webp");
  await writeRgb(join(root, ".git", "objects", "x.png"), 20, 20);
  await Deno.writeTextFile(
    join(root, "similarity_matrix_x_seed0.npz"),
    "root files are not classes",
  );
  await Deno.writeTextFile(join(root, "classnames.json"), JSON.stringify({ "F-A-18": "F/A-18" }));
}

function byName(problems: DatasetProblem[]): Map<string, DatasetProblem> {
  return new Map(problems.map((p) => [p.path.slice(p.path.lastIndexOf("/") + 1), p]));
}

Deno.test("every bad input is reported at once, with file names", async () => {
  await withTempDir(async (root) => {
    await badDataset(root);
    const err = await validateDataset(root).then(
      () => assert.fail("validateDataset accepted a bad dataset"),
      (e) => e,
    );
    assert.ok(err instanceof DatasetError, String(err));
    const p = byName(err.problems);
    const expect: Record<string, [DatasetProblem["severity"], string]> = {
      "corrupt.jpg": ["error", "corrupt"],
      "trunc.png": ["error", "corrupt"],
      "empty.jpg": ["error", "corrupt"],
      "tiny.png": ["error", "too-small"],
      "broken.jpg": ["error", "unreadable"],
      "empty class": ["error", "empty-class"],
      "notes.txt": ["warning", "not-an-image"],
      "readme.md": ["warning", "not-an-image"],
      "sub": ["warning", "subfolder"],
      "gray.png": ["note", "converted"],
      "cmyk.jpg": ["note", "converted"],
      "rgba.png": ["note", "converted"],
      "g16.png": ["note", "converted"],
    };
    for (const [file, [severity, kind]] of Object.entries(expect)) {
      const got = p.get(file);
      assert.ok(got, `no problem reported for ${file}`);
      assert.equal(`${got.severity} ${got.kind}`, `${severity} ${kind}`, `${file}: ${got.message}`);
      if (severity === "error") assert.ok(err.message.includes(file), `message lacks ${file}`);
    }
    assert.equal(
      err.problems.length,
      Object.keys(expect).length,
      JSON.stringify(err.problems, null, 1),
    );
    assert.match(p.get("tiny.png")!.message, /8x30 px; at least 16 px/);
    assert.match(p.get("cmyk.jpg")!.message, /CMYK/);
    assert.match(p.get("rgba.png")!.message, /alpha/);
    assert.match(p.get("g16.png")!.message, /grayscale; 16-bit/);
    assert.match(err.message, /6 problems/);
    assert.match(err.message, /skip-bad/);
    console.log(err.message);
  });
});

Deno.test("skipBad leaves bad files out; classes and files are sorted by code point", async () => {
  await withTempDir(async (root) => {
    await badDataset(root);
    // An empty class cannot be skipped: it would change the class list.
    await assert.rejects(() => validateDataset(root, { skipBad: true }), /empty class/);
    await Deno.remove(join(root, "empty class"), { recursive: true });
    const ds = await validateDataset(root, { skipBad: true });
    assert.equal(ds.layout, "folders");
    assert.equal(ds.mappingFile, join(root, "classnames.json"));
    assert.deepEqual(ds.classes.map((c) => [c.folder, c.name]), [
      ["F-A-18", "F/A-18"],
      ["airplane", "airplane"],
      ["zebra", "zebra"],
    ]);
    assert.deepEqual(ds.classes[1].shots.map((s) => s.file), [
      "D.PNG",
      "a.png",
      "b.jpg",
      "c.webp",
      "cmyk.jpg",
      "g16.png",
      "gray.png",
      "rgba.png",
    ]);
    assert.deepEqual(ds.classes[0].shots.map((s) => [s.file, s.width, s.height]), [
      ["0.png", 20, 20],
      ["1.jpg", 30, 20],
    ]);
    assert.equal(ds.classes[1].shots[0].path, join(root, "airplane", "D.PNG"));
    const skipped = ds.problems.filter((p) => p.skipped).map((p) => p.path.split("/").at(-1));
    assert.deepEqual(skipped.sort(), [
      "broken.jpg",
      "corrupt.jpg",
      "empty.jpg",
      "tiny.png",
      "trunc.png",
    ]);
    assert.ok(ds.problems.every((p) => p.severity !== "error"));
    // Reading headers only is faster but cannot see a truncated file.
    const quick = await validateDataset(root, { skipBad: true, decode: false });
    assert.ok(quick.classes[1].shots.some((s) => s.file === "trunc.png"));
  });
});

Deno.test("class counts and the mapping file", async () => {
  await withTempDir(async (root) => {
    await writeRgb(join(root, "only", "a.png"), 20, 20);
    await assert.rejects(() => validateDataset(root), /only one class \("only"\)/);
    const single = await validateDataset(root, { negatives: false });
    assert.equal(single.classes.length, 1);

    await writeRgb(join(root, "other", "b.png"), 20, 20);
    const mapping = join(root, "classnames.json");
    await Deno.writeTextFile(mapping, JSON.stringify({ only: "other", typo: "x", other: 3 }));
    const err = await validateDataset(root).catch((e) => e);
    assert.ok(err instanceof DatasetError);
    const messages = err.problems.map((p: DatasetProblem) => p.message).join("\n");
    assert.match(messages, /maps folder "typo", which is not a class folder/);
    assert.match(messages, /name for folder "other" must be a non-empty string/);
    await Deno.writeTextFile(mapping, JSON.stringify({ only: "other" }));
    await assert.rejects(
      () => validateDataset(root),
      /class name "other" is also the name of folder/,
    );
    await Deno.writeTextFile(mapping, "{not json");
    await assert.rejects(() => validateDataset(root), /cannot read the class-name mapping/);
    await Deno.writeTextFile(mapping, '["a", "b"]');
    await assert.rejects(() => validateDataset(root), /must be a JSON object/);
  });
  await withTempDir(async (root) => {
    await assert.rejects(() => validateDataset(root), /no class folders/);
    await assert.rejects(() => validateDataset(join(root, "missing")), /no such folder/);
  });
});

Deno.test("DataDream layout: <data>/<dataset>/real_train_fewshot/<seed>/<class>", async () => {
  await withTempDir(async (data) => {
    const splits = join(data, "fgvc_aircraft", "real_train_fewshot");
    for (const seed of ["seed0", "seed1"]) {
      await writeRgb(join(splits, seed, "707-320", "a.jpg"), 20, 20, "jpeg");
      await writeRgb(join(splits, seed, "F-A-18", "a.jpg"), 20, 20, "jpeg");
    }
    await Deno.writeTextFile(
      join(data, "fgvc_aircraft", "classnames.json"),
      JSON.stringify({ "F-A-18": "F/A-18" }),
    );
    // Several splits: the choice must be explicit.
    await assert.rejects(() => validateDataset(data), /several few-shot splits \(seed0, seed1\)/);
    for (
      const [path, opts] of [
        [data, { fewshotSeed: 1 }],
        [data, { dataset: "fgvc_aircraft", fewshotSeed: "seed1" }],
        [join(data, "fgvc_aircraft"), { fewshotSeed: "1" }],
        [splits, { fewshotSeed: 1 }],
        [join(splits, "seed1"), {}],
      ] as const
    ) {
      const ds = await validateDataset(path, opts);
      assert.equal(ds.layout, "datadream");
      assert.equal(ds.root, join(splits, "seed1"), `${path} ${JSON.stringify(opts)}`);
      assert.equal(ds.dataset, "fgvc_aircraft");
      assert.equal(ds.fewshotSeed, "seed1");
      assert.deepEqual(ds.classes.map((c) => c.name), ["707-320", "F/A-18"]);
      assert.equal(
        promptFor(promptTemplate(ds.dataset), ds.classes[1].name),
        "A photo of a F/A-18 aircraft",
      );
    }
    await assert.rejects(() => validateDataset(data, { fewshotSeed: 5 }), /no split "5"/);
    await assert.rejects(() => validateDataset(data, { dataset: "dtd" }), /no dataset "dtd"/);
    await writeRgb(join(data, "dtd", "real_train_fewshot", "seed0", "x", "a.png"), 20, 20);
    assert.throws(() => locateDataset(data, { fewshotSeed: 0 }), /several datasets/);
    assert.equal(locateDataset(data, { dataset: "dtd" }).fewshotSeed, "seed0");
  });
});

Deno.test("prompt templates and classifier words per dataset", () => {
  assert.equal(promptFor(promptTemplate("eurosat"), "Forest"), "A satellite photo of a Forest");
  assert.equal(promptFor(promptTemplate("flowers102"), "rose"), "A photo of a rose flower");
  assert.equal(promptFor(promptTemplate("dtd"), "banded"), "A photo of a banded texture");
  assert.equal(promptFor(promptTemplate("cars"), "Audi A4"), "A photo of a Audi A4 car");
  assert.equal(promptFor(promptTemplate("food101"), "pizza"), "A photo of a pizza food");
  assert.equal(promptFor(promptTemplate("pets"), "pug"), "A photo of a pug pet");
  assert.equal(promptFor(promptTemplate("sun397"), "abbey"), "A photo of a abbey");
  assert.equal(promptFor(promptTemplate(undefined), "x"), "A photo of a x");
  assert.equal(promptFor(classifierTemplate("sun397"), "abbey"), "a scene photo of a abbey");
  assert.equal(
    promptFor(classifierTemplate("fgvc_aircraft"), "F/A-18"),
    "a aircraft photo of a F/A-18",
  );
  assert.equal(promptFor(classifierTemplate("caltech101"), "ant"), "a photo of a ant");
  assert.equal(promptFor(classifierTemplate(undefined), "ant"), "a photo of a ant");
  assert.equal(datasetKey("Stanford-Cars"), "cars");
  assert.throws(() => promptFor("A photo", "x"), /no \{c\}/);
  // Python orders strings by code point; UTF-16 code units put U+1F600 before U+FF21.
  const names = ["\u{1F600}", "\uFF21", "b", "B", "a b"];
  assert.deepEqual(names.sort(compareCodePoints), ["B", "a b", "b", "\uFF21", "\u{1F600}"]);
});
