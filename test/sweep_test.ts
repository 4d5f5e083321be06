/**
 * `dipsy sweep` on the tiny models: the plan (grid and list expansion, shared generation sets,
 * stable ids), misspelt keys refused before anything is written, and a 2 x 2 sweep three ways:
 * uninterrupted; killed part-way through its first generation set and rerun; and as two shards
 * followed by `--table`. All three must end with the same table, images and adapters.
 *
 * Ids hash resolved settings: a default spelt out shares the default's set, and the dtype "auto"
 * stands for is part of every id. Two processes given one work unit: the second leaves it.
 *
 * The kill and the second process wait on the latch of `generate` (DIPSY_TEST_HOLD_AFTER_BATCH)
 * or on a line the process prints, never on timing.
 */
import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync, readlinkSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { main } from "../cli/main.ts";
import { hostname } from "node:os";
import { loadPlan } from "../cli/sweep.ts";
import { registry } from "../core/plugins.ts";
import {
  expandAxis,
  formatTable,
  planSweep,
  readSweepFile,
  settingsHash,
  slugOf,
  sweepTable,
  tableCsv,
} from "../core/sweep.ts";
import { modelGeometry } from "../app/models.ts";
import { assertSameFiles, sweepResults, TINY_SWEEP_AXES, tinySweepBase } from "./sweep_util.ts";
import { withOutput, writeTinyDataset } from "./util.ts";

const REPO = fileURLToPath(new URL("..", import.meta.url));
const MAIN = join(REPO, "cli", "main.ts");

const ROOT = await Deno.makeTempDir({ prefix: "dipsy_sweep_test_" });
const DATA = join(ROOT, "data");
const TEST = join(ROOT, "test");
await writeTinyDataset(DATA);
await writeTinyDataset(TEST);
globalThis.addEventListener("unload", () => Deno.removeSync(ROOT, { recursive: true }));

const BASE = tinySweepBase(DATA, TEST);
/** The 2 x 2 sweep the run tests share. */
const SWEEP = [...BASE, ...TINY_SWEEP_AXES];

async function sweepFile(name: string, lines: string[]): Promise<string> {
  const path = join(ROOT, name);
  await Deno.writeTextFile(path, lines.join("\n") + "\n");
  return path;
}

const ENV = { OMP_NUM_THREADS: "1" };

function dipsy(
  args: string[],
  env: Record<string, string> = {},
  output: "piped" | "null" = "piped",
) {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, ...args],
    env: { ...ENV, ...env },
    stdin: "null",
    stdout: output,
    stderr: output,
  });
}

async function sweep(file: string, out: string, ...flags: string[]) {
  const r = await dipsy(["sweep", file, "--out", out, "--workers", "1", ...flags]).output();
  const text = new TextDecoder().decode(r.stderr) + new TextDecoder().decode(r.stdout);
  return { code: r.code, text };
}

const table = (out: string) => JSON.parse(readFileSync(join(out, "sweep.json"), "utf8"));

Deno.test("sweep plan: grid and list expansion, shared generation sets, stable ids", async () => {
  assert.deepEqual(expandAxis({ grid: { a: [1, 2], b: ["x", "y", "z"] } }, "t"), [
    { a: 1, b: "x" },
    { a: 1, b: "y" },
    { a: 1, b: "z" },
    { a: 2, b: "x" },
    { a: 2, b: "y" },
    { a: 2, b: "z" },
  ]);
  assert.deepEqual(expandAxis({ list: [{ lr: 1 }, { lr: 2, lambda: 0.5 }] }, "t"), [
    { lr: 1 },
    { lr: 2, lambda: 0.5 },
  ]);
  assert.deepEqual(expandAxis(undefined, "t"), [{}], "no axis: one entry, the base");
  assert.equal(slugOf({ "guidance.negativeScale": 2, lr: 0.001 }), "negativeScale2_lr0.001");
  assert.equal(slugOf({}), "base");

  const lines = [
    ...BASE,
    "generate:",
    "  list:",
    "    - { guidance.negativeScale: 2 }",
    "    - { guidance.negativeScale: 4, sampler: ddim }",
    // The same settings as the first entry, spelt otherwise: one generation set for both.
    "    - { preset: dipsy, guidance: { negativeScale: 2 } }",
    "train:",
    "  list:",
    "    - { lr: 0.0001 }",
    "    - { lr: 0.001, lambda: 0.5 }",
  ];
  const file = await sweepFile("plan.yaml", lines);
  const out = join(ROOT, "plan-out");
  const plan = await loadPlan(file, { out });
  assert.equal(plan.generations.length, 2, "the third entry resolves like the first");
  assert.equal(plan.trainings.length, 2);
  assert.equal(plan.cells.length, 4);
  assert.equal(plan.metric, "val_top1", "holdout: ranked by validation");
  assert.deepEqual(plan.swept, [
    "guidance.negativeScale",
    "sampler",
    "preset",
    "guidance",
    "lr",
    "lambda",
  ]);
  const [g1, g2] = plan.generations;
  assert.match(g1.id, /^negativeScale2-[0-9a-f]{8}$/);
  assert.match(g2.id, /^negativeScale4_samplerddim-[0-9a-f]{8}$/);
  assert.equal(g1.config.out, join(out, "gen", g1.id));
  assert.equal(g1.config.guidance.options.negativeScale, 2);
  assert.equal(g2.config.sampler.name, "ddim");
  assert.deepEqual(
    plan.cells.map((c) => c.id),
    [g1, g2].flatMap((g) => plan.trainings.map((t) => `${g.id}--${t.id}`)),
  );
  assert.equal(plan.cells[0].run, `cells/${plan.cells[0].id}`);
  assert.ok(!existsSync(out), "planning writes nothing");

  // The same file gives the same ids; a changed setting changes only the ids it is part of.
  assert.deepEqual(
    (await loadPlan(file, { out })).cells.map((c) => c.id),
    plan.cells.map((c) => c.id),
  );
  const changed = await loadPlan(
    await sweepFile("plan2.yaml", lines.map((l) => l.replace("lr: 0.001,", "lr: 0.002,"))),
    { out },
  );
  assert.deepEqual(changed.generations.map((g) => g.id), plan.generations.map((g) => g.id));
  assert.equal(changed.trainings[0].id, plan.trainings[0].id);
  assert.notEqual(changed.trainings[1].id, plan.trainings[1].id);
  const more = await loadPlan(
    await sweepFile("plan3.yaml", lines.map((l) => l.replace("perClass: 2", "perClass: 3"))),
    { out },
  );
  for (const [i, g] of more.generations.entries()) {
    assert.notEqual(g.id, plan.generations[i].id, "perClass is part of every generation id");
  }
});

Deno.test("sweep plan: defaults spelt out hash as the defaults; settings that spell none keep their ids", async () => {
  const unsized = BASE.filter((l) => !l.startsWith("size:"));
  const defaults = registry.resolve("guidance", "dipsy", {});
  const { defaultSize } = await modelGeometry({ model: "tiny" });
  // JSON is YAML: the values come from the plugin's schema and the model's config.
  const list = (entries: unknown[]) => ["generate:", `  list: ${JSON.stringify(entries)}`];
  const spelt = await loadPlan(
    await sweepFile("spelt.yaml", [
      ...unsized,
      ...list([
        { "guidance.negativeScale": defaults.negativeScale },
        { "guidance.textScale": defaults.textScale },
        { guidance: "dipsy" },
        { size: defaultSize },
        { size: `${defaultSize}x${defaultSize}`, preset: "dipsy" },
      ]),
    ]),
    { out: join(ROOT, "spelt") },
  );
  assert.equal(spelt.generations.length, 1, "every entry resolves to the defaults: one set");
  assert.equal(spelt.cells.length, 1);
  const alone = await loadPlan(await sweepFile("alone.yaml", unsized), {
    out: join(ROOT, "spelt"),
  });
  const [set] = alone.generations;
  assert.equal(spelt.generations[0].id.split("-").at(-1), set.id.split("-").at(-1), "same hash");
  // A plan that spells out no default hashes its configuration as resolveConfig gives it.
  const { out: _out, device: _device, batch: _batch, ...hashed } = set.config;
  assert.equal(set.id, `base-${settingsHash(hashed)}`);

  const other = await loadPlan(
    await sweepFile("spelt-other.yaml", [
      ...unsized,
      ...list([
        { "guidance.negativeScale": (defaults.negativeScale as number) + 1 },
        { size: defaultSize * 2 },
        {},
      ]),
    ]),
    { out: join(ROOT, "spelt") },
  );
  assert.equal(other.generations.length, 3, "values other than the defaults: sets of their own");
  assert.equal(other.generations[2].id.split("-").at(-1), set.id.split("-").at(-1));
});

Deno.test("sweep plan: the dtype auto stands for is part of every id; another one is refused", async () => {
  const auto = BASE.filter((l) => !l.startsWith("dtype:"));
  const out = join(ROOT, "dtype");
  const ids = (plan: { cells: { id: string }[] }) => plan.cells.map((c) => c.id);
  const file = await sweepFile("dtype-auto.yaml", [...auto, "train: { list: [{ lr: 0.001 }] }"]);
  const onCpu = await loadPlan(file, { out });
  assert.equal(onCpu.dtype, "f32", "auto on the CPU");
  assert.equal(onCpu.generations[0].config.dtype, "f32");
  assert.equal(onCpu.trainings[0].classifier.options.dtype, "f32", "the classifier follows");
  const f32 = await loadPlan(
    await sweepFile("dtype-f32.yaml", [
      ...auto,
      "dtype: f32",
      "train: { list: [{ lr: 0.001 }] }",
    ]),
    { out },
  );
  assert.deepEqual(ids(onCpu), ids(f32), "auto on the CPU is f32");
  const f16File = await sweepFile("dtype-f16.yaml", [
    ...auto,
    "dtype: f16",
    "train: { list: [{ lr: 0.001 }] }",
  ]);
  const f16 = await loadPlan(f16File, { out });
  assert.notEqual(f16.generations[0].id, onCpu.generations[0].id, "generation ids differ");
  assert.notEqual(f16.trainings[0].id, onCpu.trainings[0].id, "training ids differ");
  // On CUDA, auto is f16: the cells of f16 there, never those of f32 here.
  const onCuda = await planSweep(file, await readSweepFile(file), {
    out,
    autoDtype: () => Promise.resolve("f16"),
  });
  assert.deepEqual(ids(onCuda), ids(f16));

  // A sweep folder planned on CUDA: a process here would run it in f32, and is refused before
  // it writes anything; --plan and --table read the folder's dtype.
  await Deno.mkdir(out, { recursive: true });
  await Deno.writeTextFile(join(out, "plan.json"), JSON.stringify({ dtype: "f16" }));
  const refused = await withOutput(() => main(["sweep", file, "--out", out]));
  assert.equal(refused.result, 1);
  assert.equal(refused.lines.length, 1, refused.lines.join("\n"));
  assert.match(
    refused.lines[0],
    /plan\.json: this sweep runs in f16, and dtype auto on cpu is f32: .*"dtype: f16"/,
  );
  assert.deepEqual(readdirSync(out), ["plan.json"], "nothing written");
  const printed = await withOutput(() => main(["sweep", file, "--out", out, "--plan"]));
  assert.equal(printed.result, 0);
  for (const id of ids(f16)) assert.ok(printed.lines.some((l) => l.includes(id)), id);
});

Deno.test("sweep table: ranked by validation top-1, ties in plan order; CSV and text alike", async () => {
  const lines = [...BASE, ...TINY_SWEEP_AXES];
  const plan = await loadPlan(await sweepFile("rank.yaml", lines), { out: join(ROOT, "rank") });
  const [a, b, c, d] = plan.cells.map((cell) => cell.id);
  const result = (val: number | null, test: number) => ({
    val_top1: val,
    test_top1: test,
    test_top5: 1,
    mean_per_class: test,
  });
  // b and d tie on validation (d has the better test top-1: validation alone decides); c is
  // not finished; a failed before.
  const results = new Map([[b, result(0.75, 0.5)], [d, result(0.75, 0.9)], [a, result(0.5, 1)]]);
  const table = sweepTable(plan, results, new Map([[c, "out of memory"]]));
  assert.equal(table.metric, "val_top1");
  assert.deepEqual(table.rows.map((r) => [r.rank, r.cell]), [[1, b], [2, d], [3, a]]);
  assert.deepEqual(table.rows[0].settings, { "guidance.negativeScale": 2, lr: 0.001 });
  assert.equal(table.rows[0].run, `cells/${b}`);
  assert.deepEqual(table.missing, [c]);
  assert.deepEqual(table.failed, [{ cell: c, reason: "out of memory" }]);
  const csv = tableCsv(table).trim().split("\n");
  assert.equal(csv[1], `1,${b},cells/${b},2,0.001,0.75,0.5,1,0.5`);
  const text = formatTable(table).split("\n");
  assert.match(text[0], /ranked by validation top-1/);
  assert.match(text[2], new RegExp(`^ +1  2 +0\\.001 +75\\.00 +50\\.00 +100\\.00 +50\\.00  ${b}$`));

  // Without a validation split the test set ranks, and the table says so.
  const noVal = await loadPlan(
    await sweepFile("rank-test.yaml", lines.filter((l) => !l.startsWith("holdout"))),
    { out: join(ROOT, "rank") },
  );
  const ids = noVal.cells.map((cell) => cell.id);
  const byTest = sweepTable(
    noVal,
    new Map([[ids[0], result(null, 0.25)], [ids[1], result(null, 0.5)]]),
  );
  assert.equal(byTest.metric, "test_top1");
  assert.deepEqual(byTest.rows.map((r) => r.cell), [ids[1], ids[0]]);
  assert.match(formatTable(byTest), /ranked by test top-1 \(no validation split\)/);
});

Deno.test("sweep: a misspelt key anywhere is refused before anything is written", async () => {
  const cases: [string, string[], RegExp][] = [
    [
      "generation option",
      [...BASE, "generate: { grid: { guidance.negativeScal: [2, 4] } }"],
      /generate "guidance\.negativeScal": .*"negativeScal".*did you mean "?negativeScale\b/,
    ],
    [
      "generation setting",
      [...BASE, "generate: { list: [{ stpes: 3 }] }"],
      /generate: unknown generation key "stpes" \(did you mean "steps"\?\)/,
    ],
    [
      "plugin key",
      [...BASE, "generate: { grid: { guidence.negativeScale: [2] } }"],
      /unknown key "guidence\.negativeScale" \(did you mean "guidance\.negativeScale"\?\)/,
    ],
    ["training key", [...BASE, "train: { grid: { lrr: [0.1] } }"], /train "lrr": .*"lrr"/],
    ["base key", [...BASE, "perClas: 3"], /unknown key "perClas" \(did you mean "perClass"\?\)/],
    [
      "base-only key swept",
      [...BASE, "generate: { grid: { shots: [1, 2] } }"],
      /generate: "shots" is a base setting/,
    ],
  ];
  for (const [what, lines, message] of cases) {
    const file = await sweepFile(`bad-${what.replaceAll(" ", "-")}.yaml`, lines);
    const out = join(ROOT, `bad-out-${what.replaceAll(" ", "-")}`);
    const { result, lines: printed } = await withOutput(() => main(["sweep", file, "--out", out]));
    assert.equal(result, 1, `${what}: refused`);
    assert.equal(printed.length, 1, `${what}: one line, got ${printed.join("\n")}`);
    assert.ok(printed[0].includes(file), `${what}: names the file: ${printed[0]}`);
    assert.match(printed[0], message, what);
    assert.ok(!existsSync(out), `${what}: nothing written`);
  }
});

Deno.test("sweep 2 x 2: uninterrupted, killed and rerun, and as two shards: one table", async (t) => {
  const file = await sweepFile("sweep.yaml", SWEEP);
  const reference = join(ROOT, "reference");
  await t.step("uninterrupted", async () => {
    const r = await sweep(file, reference);
    assert.equal(r.code, 0, r.text);
    const got = table(reference);
    assert.equal(got.metric, "val_top1");
    assert.deepEqual(got.swept, ["guidance.negativeScale", "lr"]);
    assert.equal(got.rows.length, 4);
    assert.deepEqual(got.missing, []);
    assert.deepEqual(got.rows.map((r: { rank: number }) => r.rank), [1, 2, 3, 4]);
    for (const row of got.rows) {
      assert.ok(existsSync(join(reference, row.run, "report.json")), `${row.run} is a run folder`);
      for (const f of ["val_top1", "test_top1", "test_top5", "mean_per_class"]) {
        assert.equal(typeof row[f], "number", `${row.cell}: ${f}`);
      }
    }
    const values = got.rows.map((r: { settings: Record<string, number> }) => r.settings);
    assert.deepEqual(
      new Set(values.map((s: Record<string, number>) => JSON.stringify(s))),
      new Set(
        [2, 4].flatMap((n) =>
          [1e-4, 1e-3].map((lr) => JSON.stringify({ "guidance.negativeScale": n, lr }))
        ),
      ),
    );
    // The two training settings of a generation set read one set, generated once.
    const sets = readdirSync(join(reference, "gen"));
    assert.equal(sets.length, 2);
    for (const set of sets) {
      const manifest = readFileSync(join(reference, "gen", set, "manifest.jsonl"), "utf8");
      assert.equal(manifest.split("\n").filter(Boolean).length, 4, `${set}: 4 images, once each`);
      const cells = readdirSync(join(reference, "cells")).filter((c) => c.startsWith(`${set}--`));
      assert.equal(cells.length, 2);
      for (const c of cells) {
        assert.equal(readlinkSync(join(reference, "cells", c, "synthetic")), `../../gen/${set}`);
      }
    }
    assert.ok(existsSync(join(reference, "plan.json")));
    assert.ok(existsSync(join(reference, "similarity.json")), "similarity computed once, kept");
    const csv = readFileSync(join(reference, "sweep.csv"), "utf8").trim().split("\n");
    assert.equal(
      csv[0],
      "rank,cell,run,guidance.negativeScale,lr,val_top1,test_top1,test_top5,mean_per_class",
    );
    assert.equal(csv.length, 5);
  });
  const want = await sweepResults(reference);

  await t.step("killed part-way through and rerun", async () => {
    const out = join(ROOT, "killed");
    const hold = join(ROOT, "hold");
    await Deno.mkdir(hold);
    const child = dipsy(
      ["sweep", file, "--out", out, "--workers", "1"],
      { DIPSY_TEST_HOLD_AFTER_BATCH: hold },
      "null",
    ).spawn();
    let exited = false;
    const status = child.status.then((s) => {
      exited = true;
      return s;
    });
    // The latch's signal: the process has written its first batch and waits.
    const held = join(hold, "held-0");
    while (!existsSync(held) && !exited) await new Promise((r) => setTimeout(r, 50));
    assert.ok(!exited, "the sweep reached the latch");
    child.kill("SIGKILL");
    await status;
    const sets = readdirSync(join(out, "gen"));
    assert.equal(sets.length, 1, "killed in the first generation set");
    const lines = readFileSync(join(out, "gen", sets[0], "manifest.jsonl"), "utf8").split("\n");
    assert.equal(lines.filter(Boolean).length, 2, "one batch of two images was written");
    assert.ok(!existsSync(join(out, "cells")), "no cell started");

    const r = await sweep(file, out);
    assert.equal(r.code, 0, r.text);
    assert.deepEqual(table(out), table(reference));
    assertSameFiles(await sweepResults(out), want);

    const again = await sweep(file, out);
    assert.equal(again.code, 0, again.text);
    assert.equal(
      again.text.match(/: complete(?: \(\d+ images\))?, skipped/g)?.length,
      6,
      "2 sets and 4 cells skipped",
    );
    assert.deepEqual(table(out), table(reference));
  });

  await t.step("two shards, then --table", async () => {
    const out = join(ROOT, "sharded");
    const first = await sweep(file, out, "--shard", "0/2");
    assert.equal(first.code, 0, first.text);
    assert.equal(readdirSync(join(out, "gen")).length, 1, "shard 0 did one generation set");
    assert.equal(table(out).rows.length, 2);
    assert.equal(table(out).missing.length, 2);
    assert.match(first.text, /2 of 4 cell\(s\) finished, 2 missing/);
    const second = await sweep(file, out, "--shard", "1/2");
    assert.equal(second.code, 0, second.text);
    const final = await sweep(file, out, "--table");
    assert.equal(final.code, 0, final.text);
    assert.deepEqual(table(out), table(reference));
    assertSameFiles(await sweepResults(out), want);
  });
});

/** A child's stderr as it comes: `until` resolves once a pattern has appeared in it. */
function watch(child: Deno.ChildProcess) {
  let text = "";
  const waiters: { pattern: RegExp; resolve: () => void }[] = [];
  const decoder = new TextDecoder();
  const done = (async () => {
    for await (const chunk of child.stderr) {
      text += decoder.decode(chunk, { stream: true });
      for (const w of waiters.splice(0)) {
        if (w.pattern.test(text)) w.resolve();
        else waiters.push(w);
      }
    }
  })();
  const stdout = new Response(child.stdout).text();
  return {
    until: (pattern: RegExp) =>
      new Promise<void>((resolve, reject) => {
        if (pattern.test(text)) return resolve();
        waiters.push({ pattern, resolve });
        done.then(() => reject(new Error(`ended without ${pattern}:\n${text}`)));
      }),
    async end() {
      const { code } = await child.status;
      await done;
      return { code, text: text + await stdout };
    },
  };
}

const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/** Takes OUT/locks/<name>.lock as a sweep process would, writing this process as its holder. */
async function holdLock(out: string, name: string): Promise<Deno.FsFile> {
  await Deno.mkdir(join(out, "locks"), { recursive: true });
  const file = await Deno.open(join(out, "locks", `${name}.lock`), {
    read: true,
    write: true,
    create: true,
  });
  assert.ok(await file.tryLock(true), `${name}: free`);
  await file.write(new TextEncoder().encode(`${Deno.pid} ${hostname()}\n`));
  return file;
}

Deno.test("sweep: two processes given one unit; the second leaves what the first holds", async (t) => {
  const file = await sweepFile("locks.yaml", [
    ...BASE,
    "train: { list: [{ lr: 0.0001 }, { lr: 0.001 }] }",
  ]);
  const out = join(ROOT, "locks");
  const plan = await loadPlan(file, { out });
  const [set] = plan.generations;
  const host = escape(hostname());

  await t.step("a generation set being generated", async () => {
    const hold = join(ROOT, "hold-locks");
    await Deno.mkdir(hold);
    const first = dipsy(
      ["sweep", file, "--out", out, "--workers", "1"],
      { DIPSY_TEST_HOLD_AFTER_BATCH: hold },
      "null",
    ).spawn();
    let exited = false;
    const status = first.status.then((s) => {
      exited = true;
      return s;
    });
    // The latch's signal: the first process has written a batch of the set, and holds it.
    while (!existsSync(join(hold, "held-0")) && !exited) {
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.ok(!exited, "the first process reached the latch");
    try {
      const second = await sweep(file, out);
      assert.equal(second.code, 0, second.text);
      assert.match(
        second.text,
        new RegExp(`gen/${set.id}: locked by pid ${first.pid} on ${host}, skipped with its 2 cell`),
      );
      assert.match(second.text, /0 of 2 cell\(s\) finished, 2 missing \(0 failed\)/);
      const manifest = readFileSync(join(out, "gen", set.id, "manifest.jsonl"), "utf8");
      assert.equal(manifest.split("\n").filter(Boolean).length, 2, "only the first one's batch");
      assert.ok(!existsSync(join(out, "cells")), "the second trained nothing");
    } finally {
      // Released even when a check fails, so that the first process ends.
      await Deno.writeTextFile(join(hold, "release-0"), "");
    }
    assert.equal((await status).code, 0);
    assert.equal(table(out).rows.length, 2);
    assert.deepEqual(table(out).missing, []);
  });

  await t.step("a cell being trained, and the class similarity being computed", async () => {
    const other = join(ROOT, "locks-2");
    const [held, free] = plan.cells;
    const locks = [await holdLock(other, "similarity"), await holdLock(other, `cell-${held.id}`)];
    try {
      const child = watch(
        dipsy(["sweep", file, "--out", other, "--workers", "1"]).spawn(),
      );
      // It waits for the similarity: given one now, it reads it instead of computing it.
      await child.until(/similarity\.json: pid \d+ .*is computing it; waiting/);
      await Deno.copyFile(join(out, "similarity.json"), join(other, "similarity.json"));
      locks.shift()!.close();
      const r = await child.end();
      assert.equal(r.code, 0, r.text);
      assert.match(r.text, new RegExp(`similarity\\.json: pid ${Deno.pid} on ${host} is`));
      assert.doesNotMatch(r.text, /class similarity with/, "not computed again");
      assert.match(
        r.text,
        new RegExp(`\\[1/2\\] ${held.id}: locked by pid ${Deno.pid} on ${host}, skipped`),
      );
      assert.match(r.text, /1 cell\(s\) left to the process\(es\) holding their lock/);
      assert.deepEqual(table(other).rows.map((row: { cell: string }) => row.cell), [free.id]);
      assert.deepEqual(table(other).missing, [held.id]);
    } finally {
      for (const lock of locks) lock.close();
    }
    // Released, the cell is trained by the next run, and the table is the first step's.
    const again = await sweep(file, other);
    assert.equal(again.code, 0, again.text);
    assert.deepEqual(table(other).rows, table(out).rows);
  });
});

Deno.test("sweep: a failing cell is recorded with its reason and the others go on", async () => {
  const file = await sweepFile("failing.yaml", [
    ...BASE,
    "train: { list: [{ lr: 0.0001 }, { lr: 0.001 }] }",
  ]);
  const out = join(ROOT, "failing");
  const [bad, good] = (await loadPlan(file, { out })).cells;
  // A broken training record where the first cell trains: that cell cannot start.
  await Deno.mkdir(join(out, bad.run, "train"), { recursive: true });
  await Deno.writeTextFile(join(out, bad.run, "train", "train.json"), "{ not json");
  const r = await sweep(file, out);
  assert.equal(r.code, 1, "a failed cell makes the exit code non-zero");
  assert.match(r.text, new RegExp(`${bad.id}: failed: .*train\\.json is not valid JSON`));
  const t = table(out);
  assert.deepEqual(t.rows.map((row: { cell: string }) => row.cell), [good.id], "the other ran");
  assert.deepEqual(t.missing, [bad.id]);
  assert.equal(t.failed.length, 1);
  assert.match(t.failed[0].reason, /train\.json is not valid JSON/);
  assert.ok(existsSync(join(out, bad.run, "failed.json")));

  // Fixed, the same command runs the failed cell alone, and its failure record goes.
  await Deno.remove(join(out, bad.run, "train"), { recursive: true });
  const again = await sweep(file, out);
  assert.equal(again.code, 0, again.text);
  assert.equal(table(out).rows.length, 2);
  assert.deepEqual(table(out).failed, []);
  assert.ok(!existsSync(join(out, bad.run, "failed.json")));
  assert.match(again.text, new RegExp(`${good.id}: complete, skipped`));
});

Deno.test("docs: the sweep file of docs/sweep.md plans; cluster.md shows sweep.sbatch as it is", async () => {
  const doc = await Deno.readTextFile(join(REPO, "docs", "sweep.md"));
  const example = /```yaml\n([\s\S]*?)```/.exec(doc)?.[1];
  assert.ok(example, "docs/sweep.md has a YAML example");
  const file = await sweepFile("doc.yaml", [example.replace("dataset: pets", "model: tiny")]);
  const plan = await loadPlan(file);
  assert.equal(plan.generations.length, 6, "2 text scales x 3 negative scales");
  assert.equal(plan.trainings.length, 2);
  assert.equal(plan.cells.length, 12);
  assert.deepEqual(plan.swept, ["guidance.textScale", "guidance.negativeScale", "lr", "lambda"]);
  assert.equal(plan.metric, "val_top1");
  assert.equal(plan.out, join(ROOT, "sweeps", "pets"), "out: relative to the file");

  const cluster = await Deno.readTextFile(join(REPO, "docs", "cluster.md"));
  const script = await Deno.readTextFile(join(REPO, "docs", "cluster", "sweep.sbatch"));
  const at = cluster.indexOf("](cluster/sweep.sbatch)");
  assert.ok(at >= 0, "docs/cluster.md links to cluster/sweep.sbatch");
  assert.equal(/```[a-z]*\n([\s\S]*?)```/.exec(cluster.slice(at))?.[1], script);
  assert.match(script, /\nexec deno task dipsy sweep "\$@"\n$/);
});
