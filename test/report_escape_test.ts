/**
 * Records are data, never markup: a `dipsy run` experiment and a sweep table whose record fields
 * (numbers included) hold markup, reported; every field reaches the pages escaped, and no page
 * holds the markup itself.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { main } from "../cli/main.ts";
import { drawDataset } from "../cli/demo.ts";
import { writeReport } from "../report/mod.ts";
import { tinyRunArgs, withOutput, withTempDir } from "./util.ts";

/** The markup put in a field, named after it. */
const mark = (field: string) => `<img src=x data-f="${field}" onerror=alert(1)>`;
const escaped = (field: string) => `&lt;img src=x data-f=&quot;${field}&quot; onerror=alert(1)&gt;`;

/** Sets `path` (dotted) of a JSON record to its field's markup. */
function poison(file: string, paths: string[]): void {
  const record = JSON.parse(readFileSync(file, "utf8"));
  for (const path of paths) {
    const keys = path.split(".");
    let o = record;
    for (const k of keys.slice(0, -1)) o = o[k];
    assert.ok(keys.at(-1)! in o, `${file}: no field ${path}`);
    o[keys.at(-1)!] = mark(`${file.split("/").at(-1)}:${path}`);
  }
  Deno.writeTextFileSync(file, JSON.stringify(record));
}

/** report.html and every page it links to under report/. */
function pages(dir: string): string {
  const sheets = join(dir, "report", "sheets");
  let all = readFileSync(join(dir, "report.html"), "utf8");
  try {
    for (const e of Deno.readDirSync(sheets)) all += readFileSync(join(sheets, e.name), "utf8");
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  return all;
}

function assertEscaped(text: string, fields: string[]): void {
  assert.ok(!text.includes("<img src=x"), "markup from a record reached a page as markup");
  const missing = fields.filter((f) => !text.includes(escaped(f)));
  assert.deepEqual(missing, [], "fields not on the pages");
}

Deno.test("report: every record field reaches the pages escaped", async () => {
  await withTempDir(async (dir) => {
    const data = join(dir, "data"), test = join(dir, "test"), exp = join(dir, "exp");
    await drawDataset(data, 2, 0);
    await drawDataset(test, 1, 1);
    const run = await withOutput(() => main(tinyRunArgs(data, test, exp, "--device", "cpu")));
    assert.equal(run.result, 0, run.lines.join("\n"));

    const fields: Record<string, string[]> = {
      "report.json": ["classes", "accuracy.total", "device"],
      "train/train.json": [
        "status",
        "epochsDone",
        "settings.epochs",
        "data.real",
        "data.synthetic",
        "data.perEpoch",
        "data.itersPerEpoch",
        "device",
        "history.0.skippedSteps",
      ],
      "eval.json": ["total", "selection.epoch", "topK"],
      "synthetic/run.json": ["settings.perClass"],
    };
    for (const [file, paths] of Object.entries(fields)) poison(join(exp, file), paths);
    // Every manifest line's index.
    const manifest = join(exp, "synthetic", "manifest.jsonl");
    const lines = readFileSync(manifest, "utf8").trim().split("\n").map((l) => JSON.parse(l));
    Deno.writeTextFileSync(
      manifest,
      lines.map((l, i) => JSON.stringify({ ...l, index: mark(`index ${i}`) })).join("\n") + "\n",
    );

    // Three more test sets whose names make the same figure name: both figures keep file-safe names.
    for (const name of ["eval-x y.json", "eval-x+y.json", "eval-x-y.json"]) {
      Deno.copyFileSync(join(exp, "eval.json"), join(exp, name));
    }

    const report = await writeReport(exp);
    const names = report.figures.map((f) => f.split("/").at(-1)!);
    assert.deepEqual(names.filter((n) => !/^[\w.-]+$/.test(n)), [], "figure file names");
    assert.equal(new Set(names).size, names.length, "one file per figure");
    assert.ok(names.includes("per-class-eval-x-y-2.svg"), names.join(" "));
    assertEscaped(pages(exp), [
      ...Object.entries(fields).flatMap(([f, ps]) => ps.map((p) => `${f.split("/").at(-1)}:${p}`)),
      ...lines.map((_, i) => `index ${i}`),
    ]);
  });
});

Deno.test("report: a sweep table's fields reach the page escaped", async () => {
  await withTempDir(async (dir) => {
    const rows = [1, 2].map((rank) => ({
      rank: rank === 1 ? mark("rank") : rank,
      cell: mark(`cell ${rank}`),
      settings: { lr: mark(`lr ${rank}`) },
      val_top1: 0.5,
      test_top1: 0.5,
      test_top5: 1,
      mean_per_class: 0.5,
    }));
    Deno.writeTextFileSync(
      join(dir, "sweep.json"),
      JSON.stringify({
        metric: mark("metric"),
        swept: ["lr"],
        rows,
        missing: [mark("missing")],
        failed: [{ cell: mark("missing"), reason: mark("reason") }],
      }),
    );
    await writeReport(dir);
    assertEscaped(pages(dir), ["rank", "cell 1", "cell 2", "lr 1", "metric", "missing", "reason"]);
  });
});
