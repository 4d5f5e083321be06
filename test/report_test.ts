/**
 * `dipsy report`: the report of a tiny `generate` output, of a tiny `run` experiment (of its
 * `train` folder, and of the same experiment in `dipsy demo`'s layout) and of a hand-made sweep
 * table. Every image the pages show is a file sharp
 * decodes; the heatmaps have one cell per class pair and the confusion cells are the eval
 * record's counts; nothing on the pages points outside the folder or to the network; a deleted
 * and a truncated image are listed as problems while the rest is still drawn.
 */
import assert from "node:assert/strict";
import {
  cpSync,
  existsSync,
  readdirSync,
  readFileSync,
  statSync,
  truncateSync,
  unlinkSync,
} from "node:fs";
import { dirname, join, resolve } from "node:path";
import sharp from "sharp";
import { main } from "../cli/main.ts";
import { drawDataset } from "../cli/demo.ts";
import { writeReport } from "../report/mod.ts";
import type { PredictionLine } from "../app/classify.ts";
import { quickGenerateFlags, tinyRunArgs, withOutput, withTempDir } from "./util.ts";

const readJson = (file: string) => JSON.parse(readFileSync(file, "utf8"));

/** The demo's classes, which drawDataset draws. */
const CLASSES = 4;

function unescapeHtml(s: string): string {
  return s.replace(
    /&(amp|lt|gt|quot|#39);/g,
    (_, e) => ({ amp: "&", lt: "<", gt: ">", quot: '"', "#39": "'" })[e as string]!,
  );
}

/** The files the `src` (or `href`) attributes of an HTML page point to. */
function linkedFiles(page: string, attr: "src" | "href"): string[] {
  const html = readFileSync(page, "utf8");
  const re = new RegExp(`\\s${attr}="([^"]*)"`, "g");
  return [...html.matchAll(re)].map((m) => {
    const url = unescapeHtml(m[1]);
    assert.ok(
      !/^[a-z]+:|^\/|^#/.test(url),
      `${page}: ${attr}="${url}" is not a relative file link`,
    );
    return resolve(dirname(page), decodeURIComponent(url.split("#")[0]));
  });
}

/** report.html and the contact sheet pages it links to. */
function pagesOf(html: string): string[] {
  const sheets = join(dirname(html), "report", "sheets");
  return [html, ...(existsSync(sheets) ? readdirSync(sheets).map((f) => join(sheets, f)) : [])];
}

/**
 * Every <img> of every page is a file that sharp decodes to a non-empty image (each file once),
 * and every link leads to a file.
 */
async function assertImagesLoad(html: string): Promise<number> {
  let n = 0;
  const decoded = new Set<string>();
  for (const page of pagesOf(html)) {
    for (const file of linkedFiles(page, "src")) {
      assert.ok(existsSync(file), `${page}: <img src> ${file} does not exist`);
      n++;
      if (decoded.has(file)) continue;
      const meta = await sharp(file).metadata();
      assert.ok((meta.width ?? 0) > 0 && (meta.height ?? 0) > 0, `${file}: empty image`);
      decoded.add(file);
    }
    for (const file of linkedFiles(page, "href")) {
      assert.ok(existsSync(file), `${page}: link to ${file}, which does not exist`);
    }
  }
  return n;
}

/** No page names a folder of this machine or a network address. */
function assertSelfContained(html: string, dir: string): void {
  for (const page of pagesOf(html)) {
    const text = readFileSync(page, "utf8");
    assert.ok(!text.includes(dir), `${page} holds the absolute path ${dir}`);
    assert.ok(!/https?:\/\//i.test(text), `${page} holds an http(s) URL`);
    assert.ok(!/file:\/\//i.test(text), `${page} holds a file URL`);
  }
}

/** The `aria-label`s of a heatmap's cells (the paths of its `cell_marks` group). */
function heatmapCells(svgFile: string): string[] {
  const svg = readFileSync(svgFile, "utf8");
  const group = /<g class="mark-rect role-mark cell_marks"[^>]*>(.*?)<\/g>/s.exec(svg);
  assert.ok(group, `${svgFile}: no cell_marks group`);
  return [...group[1].matchAll(/<path ([^>]*)>/g)].map((m) =>
    unescapeHtml(/aria-label="([^"]*)"/.exec(m[1])?.[1] ?? "")
  );
}

/** Each figure's SVG is non-empty and its PNG decodes with a non-zero size. */
async function assertFigures(figures: string[]): Promise<void> {
  assert.ok(figures.length > 0, "no figures");
  for (const f of figures) {
    assert.ok(statSync(f).size > 0, `${f}: empty`);
    if (f.endsWith(".png")) {
      const meta = await sharp(f).metadata();
      assert.ok((meta.width ?? 0) > 0 && (meta.height ?? 0) > 0, `${f}: zero size`);
      assert.ok(existsSync(f.replace(/\.png$/, ".svg")), `${f}: no SVG beside it`);
    }
  }
}

Deno.test("report of a run experiment (and of its train folder, and in the demo's layout)", async () => {
  await withTempDir(async (dir) => {
    const data = join(dir, "data"), test = join(dir, "test"), exp = join(dir, "exp");
    await drawDataset(data, 2, 0);
    await drawDataset(test, 1, 1);
    const flags = ["--device", "cpu", "--val-shots", "1", "--per-epoch"];
    const run = await withOutput(() => main(tinyRunArgs(data, test, exp, ...flags)));
    assert.equal(run.result, 0, run.lines.join("\n"));

    const { result: code, lines } = await withOutput(() => main(["report", exp]));
    assert.equal(code, 0, lines.join("\n"));
    const html = join(exp, "report.html");
    assert.ok(lines.includes(`report: ${html}`), lines.join("\n"));
    assert.ok(!lines.some((l) => /problem/.test(l)), lines.join("\n"));

    const images = await assertImagesLoad(html);
    // 4 classes x 2 images, each with two references, plus the figures and confusion examples.
    assert.ok(images >= CLASSES * 2 * 3, `only ${images} images on the pages`);
    assertSelfContained(html, dir);

    const figures = join(exp, "report", "figures");
    const similarity = heatmapCells(join(figures, "similarity.svg"));
    assert.equal(similarity.length, CLASSES * CLASSES, "one similarity cell per class pair");

    // The confusion cells are the eval record's matrix, cell for cell.
    const record = readJson(join(exp, "eval.json"));
    const names: string[] = record.perClass.map((c: { class: string }) => c.class);
    const drawn = heatmapCells(join(figures, "confusion-eval.svg")).map((label) => {
      const f = Object.fromEntries(label.split("; ").map((kv) => kv.split(": ")));
      return [names.indexOf(f["true"]), names.indexOf(f["predicted"]), Number(f["images"])];
    });
    assert.equal(drawn.length, CLASSES * CLASSES);
    const matrix = names.map(() => names.map(() => -1));
    for (const [i, j, n] of drawn) matrix[i][j] = n;
    assert.deepEqual(matrix, record.confusion);

    // The accuracy curves' points are the validation and per-epoch test results.
    const svg = readFileSync(join(figures, "accuracy-epochs.svg"), "utf8");
    const points = [...svg.matchAll(/aria-label="([^"]*)"[^>]*aria-roledescription="point"/g)]
      .map((m) => unescapeHtml(m[1])).sort();
    const validation = readJson(join(exp, "train", "validation.json"));
    const want = [
      ...validation.epochs.map((e: { epoch: number; top1: number }) => ["validation", e]),
      ...record.perEpoch.map((e: { epoch: number; top1: number }) => ["test", e]),
    ].map(([split, e]) =>
      `epoch: ${e.epoch}; accuracy: ${(100 * e.top1).toFixed(6)}%; series: ${split} top-1`
    ).sort();
    assert.equal(want.length, 4, "2 epochs of validation and of test");
    assert.deepEqual(points, want);

    const text = readFileSync(html, "utf8");
    for (const id of ["summary", "generated", "training", "eval", "configuration"]) {
      assert.ok(text.includes(`id="${id}"`), `no section ${id}`);
    }
    assert.ok(!text.includes('id="problems"'), "a complete run has no problems");

    // The classifier run alone, written elsewhere: the links still resolve from there.
    const elsewhere = join(dir, "train-report");
    const train = await writeReport(join(exp, "train"), { out: elsewhere });
    assert.equal(train.kind, "train");
    assert.equal(train.html, join(elsewhere, "report.html"));
    assert.deepEqual(train.problems, []);
    await assertFigures(train.figures);
    for (const name of ["loss", "lr", "throughput", "loss-steps", "lr-steps"]) {
      assert.ok(train.figures.includes(join(elsewhere, "report", "figures", `${name}.png`)), name);
    }
    // The per-step curves' points are the step history, step for step.
    const steps = readFileSync(join(exp, "train", "steps.jsonl"), "utf8").trim().split("\n")
      .map((l) => JSON.parse(l));
    assert.equal(steps.length, readJson(join(exp, "train", "train.json")).data.itersPerEpoch * 2);
    for (const field of ["loss", "lr"]) {
      const curve = readFileSync(
        join(elsewhere, "report", "figures", `${field}-steps.svg`),
        "utf8",
      );
      const drawn = [...curve.matchAll(/aria-label="([^"]*)"[^>]*aria-roledescription="point"/g)]
        .map((m) => unescapeHtml(m[1]));
      assert.deepEqual(drawn, steps.map((s) => `step ${s.step}: ${s[field]}`), field);
    }
    await assertImagesLoad(train.html);
    assertSelfContained(train.html, dir);

    // `dipsy demo`'s folder is the same experiment under other names, without report.json.
    const demo = join(dir, "demo");
    cpSync(data, join(demo, "data"), { recursive: true });
    cpSync(join(exp, "synthetic"), join(demo, "images"), { recursive: true });
    cpSync(join(exp, "train"), join(demo, "classifier"), { recursive: true });
    const d = await writeReport(demo);
    assert.equal(d.kind, "run");
    assert.deepEqual(d.problems, []);
    assert.equal(heatmapCells(join(demo, "report", "figures", "similarity.svg")).length, 16);
    const demoPage = readFileSync(d.html, "utf8");
    for (const id of ["generated", "training"]) assert.ok(demoPage.includes(`id="${id}"`), id);
    await assertImagesLoad(d.html);

    // The worst confusions show the misclassified images themselves: for each pair, exactly the
    // predictions of that (label, predicted). The run's own confusions first (there may be none),
    // then every prediction turned into a confusion, so that every class has one.
    const predictionsFile = join(exp, "predictions-eval.jsonl");
    const readPredictions = (): PredictionLine[] =>
      readFileSync(predictionsFile, "utf8").trim().split("\n").map((l) => JSON.parse(l));
    const assertShown = (page: string, predictions: PredictionLine[], pairs: number) => {
      const shown = [
        ...page.matchAll(/data-true="([^"]*)" data-predicted="([^"]*)">(.*?)<\/span>/g),
      ];
      assert.equal(shown.length, pairs, "one row per confusion pair");
      for (const [, label, predicted, images] of shown.map((m) => m.map(unescapeHtml))) {
        const files = [...images.matchAll(/<img [^>]*data-file="([^"]*)"/g)].map((m) => m[1]);
        const want = predictions.filter((p) => p.label === label && p.predicted === predicted)
          .map((p) => p.file);
        assert.ok(want.length > 0);
        assert.deepEqual(files, want, `${label} taken for ${predicted}`);
      }
    };
    const own = readPredictions();
    const pairs = new Set(own.filter((p) => !p.correct).map((p) => `${p.label}\t${p.predicted}`));
    assertShown(readFileSync(html, "utf8"), own, pairs.size);

    const turned = own.map((p) => {
      const predicted = names[(names.indexOf(p.label) + 1) % names.length];
      return { ...p, predicted, top5: [predicted], correct: false };
    });
    Deno.writeTextFileSync(predictionsFile, turned.map((p) => JSON.stringify(p)).join("\n"));
    const confusion = names.map(() => names.map(() => 0));
    for (const p of turned) confusion[names.indexOf(p.label)][names.indexOf(p.predicted)]++;
    Deno.writeTextFileSync(join(exp, "eval.json"), JSON.stringify({ ...record, confusion }));
    const mixed = await writeReport(exp);
    assert.deepEqual(mixed.problems, []);
    assertShown(readFileSync(mixed.html, "utf8"), turned, CLASSES);
    await assertImagesLoad(mixed.html);

    // Predictions left from another evaluation are called out, and the examples shown instead.
    Deno.writeTextFileSync(join(exp, "eval.json"), JSON.stringify(record));
    const stale = await writeReport(exp);
    assert.ok(
      stale.problems.some((p) =>
        p.startsWith("predictions-eval.jsonl: does not add up to the confusion matrix")
      ),
      stale.problems.join("\n"),
    );
    assert.ok(!readFileSync(stale.html, "utf8").includes("data-predicted="));
  });
});

Deno.test("report of a generate output; a deleted and a truncated image are problems, the rest renders", async () => {
  await withTempDir(async (dir) => {
    const data = join(dir, "data"), out = join(dir, "gen");
    await drawDataset(data, 2, 0);
    const args = ["generate", "--data", data, "--out", out, "--tiny", "--device", "cpu"];
    const gen = await withOutput(() => main([...args, ...quickGenerateFlags(3, 7)]));
    assert.equal(gen.result, 0, gen.lines.join("\n"));

    const first = await writeReport(out);
    assert.equal(first.kind, "generate");
    assert.deepEqual(first.problems, []);
    await assertFigures(first.figures);
    const images = await assertImagesLoad(first.html);
    // Every image with its two references, on the sheet pages and again on the strip.
    assert.ok(images >= 2 * CLASSES * 3 * 3, `only ${images} images`);
    assertSelfContained(first.html, dir);
    const sim = heatmapCells(join(out, "report", "figures", "similarity.svg"));
    assert.equal(sim.length, CLASSES * CLASSES);

    // One image deleted, one JPEG cut in half, a manifest line garbled.
    const manifestFile = join(out, "manifest.jsonl");
    const manifest = readFileSync(manifestFile, "utf8").trim().split("\n");
    const files = manifest.map((l) => JSON.parse(l).file as string);
    const [gone, cut] = [files[1], files[4]];
    unlinkSync(join(out, gone));
    truncateSync(join(out, cut), Math.floor(statSync(join(out, cut)).size / 2));
    Deno.writeTextFileSync(manifestFile, '{"class": "blue\n', { append: true });
    const second = await writeReport(out);
    const problems = second.problems.join("\n");
    assert.equal(second.problems.length, 3, problems);
    assert.ok(
      second.problems.includes(`manifest.jsonl: 1 unreadable line(s): ${files.length + 1}`),
      problems,
    );
    assert.ok(second.problems.some((p) => p.startsWith(`${gone}: missing`)), problems);
    assert.ok(second.problems.some((p) => p.startsWith(`${cut}: corrupt`)), problems);
    assert.ok(!problems.includes(dir), "problems name files relative to the report");
    const text = readFileSync(second.html, "utf8");
    assert.ok(text.includes('id="problems"') && text.includes(gone) && text.includes(cut));
    // The other images are still on the sheets, and nothing on the pages is broken.
    const sheets = pagesOf(second.html).slice(1).map((p) => readFileSync(p, "utf8")).join("");
    for (const f of files.filter((f) => f !== gone && f !== cut)) {
      assert.ok(sheets.includes(`data-file="${f}"><a `), `${f} is not shown`);
    }
    await assertImagesLoad(second.html);

    // The CLI prints the same problems and still succeeds.
    const { result: code, lines } = await withOutput(() => main(["report", out]));
    assert.equal(code, 0);
    assert.ok(lines.includes("3 problem(s):"), lines.join("\n"));

    // A similarity file that is not the one the run drew from is called out.
    const simFile = join(out, "similarity.json");
    const edited = readJson(simFile);
    edited.similarity[0][1] = edited.similarity[1][0] = 0.5;
    Deno.writeTextFileSync(simFile, JSON.stringify(edited));
    const third = await writeReport(out);
    assert.ok(
      third.problems.some((p) => p.startsWith("similarity.json: not the matrix this run drew")),
      third.problems.join("\n"),
    );
  });
});

Deno.test("report of a plain generate output shows the references from the folder run.json records", async () => {
  await withTempDir(async (dir) => {
    const data = join(dir, "data"), out = join(dir, "gen");
    await drawDataset(data, 2, 0);
    // Uniform pairs write no similarity file, so run.json is the only record of the folder.
    const args = ["generate", "--data", data, "--out", out, "--tiny", "--device", "cpu"];
    const gen = await withOutput(() =>
      main([...args, "--pairs", "uniform", ...quickGenerateFlags(2, 5)])
    );
    assert.equal(gen.result, 0, gen.lines.join("\n"));
    assert.ok(!existsSync(join(out, "similarity.json")));
    assert.equal(readJson(join(out, "run.json")).data, resolve(data));

    const r = await writeReport(out);
    assert.deepEqual(r.problems, []);
    const sheets = pagesOf(r.html).slice(1).map((p) => readFileSync(p, "utf8")).join("");
    const tiles = [...sheets.matchAll(/<div class="refs">(.*?)<\/div>/g)].map((m) => m[1]);
    assert.equal(tiles.length, CLASSES * 2);
    for (const refs of tiles) {
      assert.equal(
        [...refs.matchAll(/<img /g)].length,
        2,
        `a tile without both references: ${refs}`,
      );
    }
    assert.ok(!sheets.includes("not found"));
    await assertImagesLoad(r.html);

    // A recorded folder that has moved is named in the problem, and --data still finds it.
    const moved = join(dir, "moved");
    Deno.renameSync(data, moved);
    const lost = await writeReport(out);
    assert.ok(
      lost.problems.some((p) => p.includes(`${resolve(data)}, recorded in run.json`)),
      lost.problems.join("\n"),
    );
    assert.deepEqual((await writeReport(out, { data: moved })).problems, []);
  });
});

Deno.test("contact sheets are paged at 200 images per class", async () => {
  await withTempDir(async (dir) => {
    const data = join(dir, "data"), out = join(dir, "gen");
    await drawDataset(data, 2, 0);
    const args = ["generate", "--data", data, "--out", out, "--tiny", "--device", "cpu"];
    const gen = await withOutput(() => main([...args, ...quickGenerateFlags(1, 3)]));
    assert.equal(gen.result, 0, gen.lines.join("\n"));
    // One class grown to 401 images, copies of its one image, each listed in the manifest.
    const manifestFile = join(out, "manifest.jsonl");
    const first = JSON.parse(readFileSync(manifestFile, "utf8").split("\n")[0]);
    const folder = first.file.split("/")[0];
    const lines: string[] = [];
    for (let i = 1; i < 401; i++) {
      const file = `${folder}/${String(i).padStart(4, "0")}.jpg`;
      Deno.copyFileSync(join(out, first.file), join(out, file));
      lines.push(JSON.stringify({ ...first, index: i, file }));
    }
    Deno.writeTextFileSync(manifestFile, lines.join("\n") + "\n", { append: true });

    const r = await writeReport(out);
    assert.deepEqual(r.problems, []);
    const sheets = join(out, "report", "sheets");
    const pages = readdirSync(sheets).filter((f) => f.startsWith("c0-")).sort();
    assert.deepEqual(pages, ["c0-1.html", "c0-2.html", "c0-3.html"]);
    const tiles = pages.map((p) =>
      [...readFileSync(join(sheets, p), "utf8").matchAll(/class="tile"/g)].length
    );
    assert.deepEqual(tiles, [200, 200, 1]);
    assert.ok(existsSync(join(sheets, "c1-1.html")), "the other classes have their page");
    await assertImagesLoad(r.html);
  });
});

Deno.test("report of a sweep table: a sortable table and accuracy against each swept setting", async () => {
  await withTempDir(async (dir) => {
    const rows = [
      [1, 4, 1e-4, 0.9, 0.85],
      [2, 2, 1e-4, 0.8, 0.8],
      [3, 6, 1e-3, 0.7, null],
    ].map(([rank, scale, lr, val, test]) => ({
      rank,
      cell: `g${scale}--t${lr}`,
      run: `cells/g${scale}--t${lr}`,
      settings: { "guidance.negativeScale": scale, lr },
      val_top1: val,
      test_top1: test,
      test_top5: 1,
      mean_per_class: val,
    }));
    const sweep = {
      sweep: join(dir, "sweep.yaml"),
      metric: "val_top1",
      swept: ["guidance.negativeScale", "lr"],
      rows,
      missing: ["g8--t0.0001"],
      failed: [{ cell: "g8--t0.0001", reason: "out of memory" }],
    };
    Deno.writeTextFileSync(join(dir, "sweep.json"), JSON.stringify(sweep));
    // A cell with a report of its own is linked.
    Deno.mkdirSync(join(dir, rows[0].run), { recursive: true });
    Deno.writeTextFileSync(join(dir, rows[0].run, "report.html"), "<!doctype html>");

    const r = await writeReport(dir);
    assert.equal(r.kind, "sweep");
    assert.deepEqual(r.problems, []);
    await assertFigures(r.figures);
    assert.equal(r.figures.length, 2 * 2, "one plot (SVG + PNG) per swept setting");
    const text = readFileSync(r.html, "utf8");
    const table = /<table class="sortable" id="sweep-table">(.*?)<\/table>/s.exec(text);
    assert.ok(table, "no sortable table");
    assert.equal([...table[1].matchAll(/<tr>/g)].length, rows.length + 1, "header + one row each");
    assert.ok(text.includes("<script>") && text.includes("out of memory"));
    assert.ok(text.includes(`href="cells/g4--t0.0001/report.html"`));
    // Each plot has a point per measured (cell, metric): 3 validation, 2 test.
    for (const svg of r.figures.filter((f) => f.endsWith(".svg"))) {
      const marks = /<g class="mark-symbol role-mark point_marks"[^>]*>(.*?)<\/g>/s.exec(
        readFileSync(svg, "utf8"),
      );
      assert.ok(marks, `${svg}: no points`);
      assert.equal([...marks[1].matchAll(/<path /g)].length, 5, svg);
    }
    await assertImagesLoad(r.html);
    assertSelfContained(r.html, dir);
  });
});

Deno.test("report of a folder that is not a dipsy output: one line, exit 1", async () => {
  await withTempDir(async (dir) => {
    Deno.writeTextFileSync(join(dir, "notes.txt"), "hello");
    for (const path of [dir, join(dir, "nothing-here")]) {
      const { result, lines } = await withOutput(() => main(["report", path]));
      assert.equal(result, 1, lines.join("\n"));
      assert.equal(lines.length, 1, lines.join("\n"));
      assert.match(lines[0], /^dipsy report: /);
      assert.ok(lines[0].includes(path));
    }
    assert.deepEqual(readdirSync(dir), ["notes.txt"], "nothing written");
    // An output folder that cannot be made: one line too.
    Deno.writeTextFileSync(join(dir, "run.json"), "{");
    const blocked = await withOutput(() =>
      main(["report", dir, "--out", join(dir, "notes.txt", "x")])
    );
    assert.equal(blocked.result, 1, blocked.lines.join("\n"));
    assert.equal(blocked.lines.length, 1, blocked.lines.join("\n"));
    assert.match(blocked.lines[0], /^dipsy report: cannot write the report into /);
    const usage = await withOutput(() => main(["report"]));
    assert.equal(usage.result, 2);
  });
});
