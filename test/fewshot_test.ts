/**
 * `dipsy fewshot` and `--shots k`: nested splits (every k-shot set inside every larger one of the
 * same seed), the same files for the same command whatever order the source is listed in,
 * recorded sources and hashes, refusals before anything is written, rerun and kill safety; and
 * the validation split carved from the ranked shots.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { shotRank, validateDataset } from "../core/dataset.ts";
import {
  drawOrder,
  FEWSHOT_MANIFEST,
  type FewshotManifest,
  type FewshotOptions,
  parseCounts,
  writeFewshot,
} from "../core/fewshot.ts";
import { derive } from "../core/rng.ts";
import { main } from "../cli/main.ts";
import { readTree, withOutput, withTempDir, writeNoiseImage } from "./util.ts";

const CLASSES = ["cat", "dog", "fox"];

/** A full training set: 12 images per class (fox 20), named out of order. */
async function source(dir: string): Promise<string> {
  const root = join(dir, "full");
  for (const [k, c] of CLASSES.entries()) {
    const n = c === "fox" ? 20 : 12;
    for (let i = 0; i < n; i++) {
      const name = `${String((i * 7) % n).padStart(2, "0")}-${c}.png`;
      await writeNoiseImage(join(root, c, name), 20, 18, 100 * k + i);
    }
  }
  writeFileSync(join(root, "classnames.json"), JSON.stringify({ fox: "red fox" }));
  return root;
}

const manifestOf = (out: string, seed: number): FewshotManifest =>
  JSON.parse(
    readFileSync(join(out, "toy", "real_train_fewshot", `seed${seed}`, FEWSHOT_MANIFEST), "utf8"),
  );

Deno.test("fewshot: nested k-shot sets, deterministic, recorded with hashes", async () => {
  await withTempDir(async (dir) => {
    const full = await source(dir);
    const out = join(dir, "out");
    const opts = { source: full, out, dataset: "toy", shots: [1, 2, 4, 8], seeds: [0, 1] };
    const first = await writeFewshot(opts);
    assert.deepEqual(first.map((r) => r.status), ["written", "written"]);

    for (const seed of [0, 1]) {
      const m = manifestOf(out, seed);
      assert.deepEqual(m.shots, [1, 2, 4, 8]);
      const splitDir = join(out, "toy", "real_train_fewshot", `seed${seed}`);
      for (const c of m.classes) {
        // The draw is the project's RNG over the code-point-sorted files.
        const sorted = [...Array(c.available).keys()].map((i) => i);
        const order = derive(seed, "fewshot", c.folder).shuffle([...sorted]);
        const names = readdir(join(full, c.folder)).sort();
        assert.deepEqual(
          c.files.map((f) => f.source),
          order.slice(0, 8).map((i) => `${c.folder}/${names[i]}`),
        );
        assert.deepEqual(c.files.map((f) => f.rank), [0, 1, 2, 3, 4, 5, 6, 7]);
        for (const f of c.files) {
          const bytes = Deno.readFileSync(join(splitDir, c.folder, f.file));
          assert.equal(createHash("sha256").update(bytes).digest("hex"), f.sha256);
          assert.deepEqual(bytes, Deno.readFileSync(join(full, f.source)));
          assert.equal(f.file, `${String(f.rank).padStart(3, "0")}_${f.source.split("/")[1]}`);
        }
      }
      // Every k-shot set (read by --shots k) inside every larger one, of every class.
      let previous: Map<string, string[]> | null = null;
      for (const k of [1, 2, 4, 8]) {
        const ds = await validateDataset(splitDir, { shots: k, negatives: false });
        assert.equal(ds.shots, k);
        const sets = new Map(ds.classes.map((c) => [c.folder, c.shots.map((s) => s.file)]));
        for (const [folder, files] of sets) {
          assert.equal(files.length, k);
          assert.deepEqual(files.map(shotRank), [...Array(k).keys()]);
          if (previous) {
            const smaller = previous.get(folder)!;
            assert.deepEqual(files.slice(0, smaller.length), smaller);
            assert.ok(smaller.length < files.length);
          }
        }
        previous = sets;
      }
      // The source's class-name mapping comes along.
      const named = await validateDataset(splitDir, { negatives: false });
      assert.deepEqual(named.classes.map((c) => c.name), ["cat", "dog", "red fox"]);
    }
    assert.notDeepEqual(
      manifestOf(out, 0).classes[0].files.map((f) => f.source),
      manifestOf(out, 1).classes[0].files.map((f) => f.source),
    );

    // The same command again: up to date; into another folder: the same bytes.
    const again = await writeFewshot(opts);
    assert.deepEqual(again.map((r) => r.status), ["up to date", "up to date"]);
    const other = join(dir, "other");
    await writeFewshot({ ...opts, out: other });
    assert.deepEqual(await readTree(join(other, "toy")), await readTree(join(out, "toy")));

    // A list file of the same images, listed in another order, draws the same split.
    const lines = CLASSES.flatMap((c) => readdir(join(full, c)).map((f) => `${c}/${f}`)).reverse();
    writeFileSync(join(full, "train.txt"), lines.join("\n") + "\n");
    const listed = join(dir, "listed");
    await writeFewshot({ ...opts, source: join(full, "train.txt"), out: listed });
    const files = (o: string) =>
      manifestOf(o, 0).classes.map((c) => c.files.map((f) => [f.file, f.sha256]));
    assert.deepEqual(files(listed), files(out));

    // Adding a class draws nothing different for the others.
    for (let i = 0; i < 9; i++) await writeNoiseImage(join(full, "ant", `${i}.png`), 20, 18, i);
    const more = join(dir, "more");
    await writeFewshot({ ...opts, out: more });
    const withAnt = manifestOf(more, 0).classes;
    assert.deepEqual(withAnt.map((c) => c.folder), ["ant", ...CLASSES]);
    assert.deepEqual(withAnt.slice(1), manifestOf(out, 0).classes);
  });
});

function readdir(dir: string): string[] {
  return [...Deno.readDirSync(dir)].map((e) => e.name);
}

Deno.test("fewshot: refused before anything is written; reruns after a kill; --force", async () => {
  await withTempDir(async (dir) => {
    const full = await source(dir);
    const out = join(dir, "out");
    // The one split that the --force, rerun and deleted-file steps below all ask for.
    const twoShots = (more: Partial<FewshotOptions> = {}) =>
      writeFewshot({
        source: full,
        out,
        dataset: "toy",
        shots: [2],
        seeds: [0],
        skipBad: true,
        ...more,
      });

    // Fewer images than the largest shot count: one line per class, nothing written.
    await assert.rejects(
      () => writeFewshot({ source: full, out, dataset: "toy", shots: [4, 16], seeds: [0] }),
      /2 class\(es\) have fewer images than the largest shot count \(16\):\n {2}- class "cat": 12 image\(s\)\n {2}- class "dog": 12 image\(s\)/,
    );
    assert.equal(existsSync(out), false);

    // A broken image drawn: refused, or passed over with --skip-bad (the next one takes its rank).
    const order = drawOrder(readdir(join(full, "dog")).sort(), 0, "dog");
    writeFileSync(join(full, "dog", order[2]), "not an image");
    await assert.rejects(
      () => writeFewshot({ source: full, out, dataset: "toy", shots: [4], seeds: [0] }),
      /1 problem\(s\) with the drawn images:\n.*dog\/.*not a readable image[^]*--skip-bad/,
    );
    assert.equal(existsSync(out), false);
    const warnings: string[] = [];
    await writeFewshot({
      source: full,
      out,
      dataset: "toy",
      shots: [4],
      seeds: [0],
      skipBad: true,
      log: (l) => warnings.push(l),
    });
    assert.match(warnings.join("\n"), /passed over/);
    const dog = manifestOf(out, 0).classes.find((c) => c.folder === "dog")!;
    assert.deepEqual(
      dog.files.map((f) => f.source),
      [order[0], order[1], order[3], order[4]].map(
        (f) => `dog/${f}`,
      ),
    );

    // Another split in the seed folder is refused, then replaced with --force.
    const seedDir = join(out, "toy", "real_train_fewshot", "seed0");
    await assert.rejects(
      () => twoShots(),
      /seed0 holds another split \(shots 4 there, 2 asked for\); --force replaces it/,
    );
    const forced = await twoShots({ force: true });
    assert.deepEqual(forced.map((r) => r.status), ["replaced"]);
    assert.deepEqual(manifestOf(out, 0).shots, [2]);

    // A run killed while copying leaves only a hidden folder, which the next run clears.
    const splits = join(out, "toy", "real_train_fewshot");
    renameSync(seedDir, join(splits, ".seed0.tmp-deadbeef"));
    const resumed = await twoShots();
    assert.deepEqual(resumed.map((r) => r.status), ["written"]);
    assert.deepEqual(readdir(splits), ["seed0"]);
    // A deleted file is noticed.
    Deno.removeSync(join(seedDir, "cat", manifestOf(out, 0).classes[0].files[1].file));
    await assert.rejects(
      () => twoShots(),
      /cat\/001_.* is missing or changed/,
    );
  });
});

Deno.test("--shots k: ranked files only, enough of them; a validation split held out", async () => {
  await withTempDir(async (dir) => {
    const full = await source(dir);
    // Unranked files: refused, one line naming a file.
    await assert.rejects(
      () => validateDataset(full, { shots: 2, negatives: false }),
      /cat\/00-cat\.png: shots needs ranked file names \(000_<name>.*12 file\(s\) of class "cat" have none/,
    );
    const out = join(dir, "out");
    await writeFewshot({ source: full, out, dataset: "toy", shots: [8], seeds: [3] });
    const seedDir = join(out, "toy", "real_train_fewshot", "seed3");
    await assert.rejects(
      () => validateDataset(seedDir, { shots: 9, negatives: false }),
      /class "cat" has 8 shot\(s\); 9 asked for/,
    );
    // From <out>: the DataDream layout finds the split.
    const ds = await validateDataset(out, { shots: 6, holdout: 2, negatives: false });
    for (const c of ds.classes) {
      assert.deepEqual(c.shots.map((s) => shotRank(s.file)), [0, 1, 2, 3]);
      assert.deepEqual(c.heldOut!.map((s) => shotRank(s.file)), [4, 5]);
    }
    await assert.rejects(
      () => validateDataset(seedDir, { shots: 2, holdout: 2, negatives: false }),
      /holding 2 out for validation leaves none to train on/,
    );
  });
});

Deno.test("fewshot CLI: one-line errors; the split it writes feeds similarity --shots", async () => {
  await withTempDir(async (dir) => {
    const full = await source(dir);
    const out = join(dir, "out");
    const lines: string[] = [];
    const run = async (args: string[]) => {
      const { result, lines: out } = await withOutput(() => main(args));
      lines.push(...out);
      return result;
    };
    assert.equal(await run(["fewshot", "--from", full, "--out", out]), 2);
    assert.match(lines.at(-1)!, /^dipsy fewshot: --from, --out and --dataset are required/);
    const bad = ["fewshot", "--from", full, "--out", out, "--dataset", "toy", "--shots", "1,x"];
    assert.equal(await run(bad), 1);
    assert.match(lines.at(-1)!, /--shots must be a comma list of integers >= 1/);
    assert.equal(
      await run(["fewshot", "--from", join(dir, "nope"), "--out", out, "--dataset", "t"]),
      1,
    );
    assert.match(lines.at(-1)!, /nope: no such folder or list file$/);
    assert.equal(existsSync(out), false);

    const ok = ["fewshot", "--from", full, "--out", out, "--dataset", "toy", "--shots", "2,4"];
    assert.equal(await run([...ok, "--seeds", "0"]), 0);
    assert.match(lines.join("\n"), /seed 0: written/);
    mkdirSync(join(dir, "x"));
    const code = await run([
      "similarity",
      "--data",
      out,
      "--shots",
      "2",
      "--clip",
      "tiny",
      "--device",
      "cpu",
      "--out",
      join(dir, "x", "s.json"),
    ]);
    assert.equal(code, 0, lines.join("\n"));
    const saved = JSON.parse(readFileSync(join(dir, "x", "s.json"), "utf8"));
    assert.deepEqual(saved.classNames, ["cat", "dog", "red fox"]);
  });
});

Deno.test("parseCounts: sorted, unique, bounded", () => {
  assert.deepEqual(parseCounts("16, 1,4,4,2,8", "--shots"), [1, 2, 4, 8, 16]);
  assert.deepEqual(parseCounts("0,2", "--seeds", 0), [0, 2]);
  assert.throws(() => parseCounts("0", "--shots"), /--shots must be a comma list of integers >= 1/);
  assert.throws(() => parseCounts("", "--seeds", 0), /--seeds/);
});
