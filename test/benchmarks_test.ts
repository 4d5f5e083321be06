/**
 * The ten benchmarks' class lists (data/datasets/*.json): they load, have the benchmarks' class
 * counts, and `--dataset NAME` turns the datasets' folder names into the names prompts say; the
 * mapping file still wins.
 */
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import {
  benchmarkClass,
  benchmarkKey,
  BENCHMARKS,
  findBenchmark,
  loadBenchmark,
} from "../core/benchmarks.ts";
import { classifierTemplate, promptFor, promptTemplate, validateDataset } from "../core/dataset.ts";
import { withTempDir, writeNoiseImage } from "./util.ts";

// The benchmarks' published class counts (CoOp's Caltech-101 split leaves out the background
// and Faces_easy folders).
const COUNTS: Record<string, number> = {
  aircraft: 100,
  caltech: 100,
  cars: 196,
  dtd: 47,
  eurosat: 10,
  flowers: 102,
  food: 101,
  imagenet: 1000,
  pets: 37,
  sun: 397,
};

Deno.test("benchmarks: the ten lists load, with their class counts and unique names", () => {
  assert.deepEqual([...BENCHMARKS].sort(), Object.keys(COUNTS).sort());
  for (const key of BENCHMARKS) {
    const b = loadBenchmark(key);
    assert.equal(b.classes.length, COUNTS[key], key);
    assert.equal(new Set(b.classes).size, b.classes.length, `${key}: names repeat`);
    for (const [folder, name] of Object.entries(b.folders)) {
      assert.ok(b.classes.includes(name), `${key}: folder ${folder} maps to unknown ${name}`);
      assert.notEqual(folder, name);
    }
    assert.ok(b.prompt.includes("{c}"), key);
    assert.equal(benchmarkKey(key), key);
    for (const a of b.aliases) assert.equal(benchmarkKey(a), key, `${key}: alias ${a}`);
  }
  // DataDream's and DIPSY's folder names for them.
  for (
    const [name, key] of [
      ["fgvc_aircraft", "aircraft"],
      ["Stanford-Cars", "cars"],
      ["oxford_pets", "pets"],
      ["food101", "food"],
      ["sun397", "sun"],
      ["flowers102", "flowers"],
      ["caltech101", "caltech"],
      ["imagenet_100", "imagenet"],
    ]
  ) assert.equal(benchmarkKey(name), key, name);
  assert.equal(benchmarkKey("my_own_data"), undefined);
});

Deno.test("benchmarks: the datasets' folder names map to the class names", () => {
  const cases: [string, string, string][] = [
    ["imagenet", "n01440764", "tench"],
    ["imagenet", "n15075141", "toilet paper"],
    ["pets", "american_bulldog", "American Bulldog"],
    ["pets", "British_Shorthair", "British Shorthair"],
    ["pets", "Abyssinian", "Abyssinian"],
    ["flowers", "1", "pink primrose"],
    ["flowers", "102", "blackberry lily"],
    ["caltech", "Faces", "face"],
    ["caltech", "airplanes", "airplane"],
    ["caltech", "yin_yang", "yin_yang"],
    ["aircraft", "F-A-18", "F/A-18"],
    ["aircraft", "F-16A-B", "F-16A/B"],
    ["cars", "Ram C-V Cargo Van Minivan 2012", "Ram C/V Cargo Van Minivan 2012"],
    ["cars", "2012 Tesla Model S Sedan", "Tesla Model S Sedan 2012"],
    ["sun", "apartment_building_outdoor", "outdoor apartment_building"],
    ["eurosat", "Annual Crop Land", "AnnualCrop"],
    ["eurosat", "SeaLake", "SeaLake"],
    ["food", "apple_pie", "apple_pie"],
    ["dtd", "banded", "banded"],
  ];
  for (const [key, folder, name] of cases) {
    assert.equal(benchmarkClass(loadBenchmark(key), folder), name, `${key}/${folder}`);
  }
  assert.equal(benchmarkClass(loadBenchmark("caltech"), "BACKGROUND_Google"), null);
  assert.equal(benchmarkClass(loadBenchmark("pets"), "goldfish"), undefined);
});

Deno.test("benchmarks: prompt templates (DIPSY's manage.py) and classifier words (DataDream's)", () => {
  const prompts: Record<string, string> = {
    aircraft: "A photo of a {c} aircraft",
    eurosat: "A satellite photo of a {c}",
    sun: "A photo of a {c}",
    flowers: "A photo of a {c} flower",
    dtd: "A photo of a {c} texture",
    cars: "A photo of a {c} car",
    food: "A photo of a {c} food",
    pets: "A photo of a {c} pet",
    imagenet: "A photo of a {c}",
    caltech: "A photo of a {c}",
  };
  const words: Record<string, string> = {
    aircraft: "aircraft ",
    eurosat: "satellite ",
    sun: "scene ",
    flowers: "flower ",
    dtd: "texture ",
    cars: "car ",
    food: "food ",
    pets: "pet ",
    imagenet: "",
    caltech: "",
  };
  for (const key of BENCHMARKS) {
    assert.equal(promptTemplate(key), prompts[key], key);
    assert.equal(classifierTemplate(key), `a ${words[key]}photo of a {c}`, key);
  }
  assert.equal(findBenchmark("nothing"), undefined);
  assert.equal(promptTemplate("nothing"), "A photo of a {c}");
});

Deno.test("--dataset NAME: folders get the benchmark's names; classnames.json wins; unknowns warned", async () => {
  await withTempDir(async (dir) => {
    const root = join(dir, "train");
    const folders = ["n01440764", "n01443537", "n99999999", "n01484850"];
    for (const [i, f] of folders.entries()) {
      await writeNoiseImage(join(root, f, "a.png"), 20, 20, i);
    }
    writeFileSync(join(root, "classnames.json"), JSON.stringify({ n01484850: "white shark" }));
    const ds = await validateDataset(root, { dataset: "imagenet", negatives: false });
    assert.equal(ds.benchmark, "imagenet");
    assert.deepEqual(ds.classes.map((c) => c.name), [
      "tench",
      "goldfish",
      "white shark",
      "n99999999",
    ]);
    assert.match(
      ds.problems.map((p) => p.message).join("\n"),
      /1 folder\(s\) are not ImageNet classes and keep their names: "n99999999"/,
    );
    assert.equal(promptFor(promptTemplate(ds.dataset), ds.classes[0].name), "A photo of a tench");
    // Without --dataset the folders are the names.
    const plain = await validateDataset(root, { negatives: false });
    assert.deepEqual(plain.classes.map((c) => c.name), [
      "n01440764",
      "n01443537",
      "white shark",
      "n99999999",
    ]);

    // The DataDream layout names the dataset; a benchmark's left-out folders are left out.
    const cal = join(dir, "data", "caltech101", "real_train_fewshot", "seed0");
    for (const [i, f] of ["Faces", "BACKGROUND_Google", "Leopards", "ant"].entries()) {
      await writeNoiseImage(join(cal, f, "000_a.png"), 20, 20, i);
    }
    const c = await validateDataset(join(dir, "data"), { negatives: false });
    assert.deepEqual(c.classes.map((x) => [x.folder, x.name]), [
      ["Faces", "face"],
      ["Leopards", "leopard"],
      ["ant", "ant"],
    ]);
    assert.match(
      c.problems.find((p) => p.kind === "excluded")!.path,
      /BACKGROUND_Google$/,
    );
  });
});
