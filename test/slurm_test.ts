/**
 * Scale-out on the tiny models, each run compared byte for byte with one `generate` process:
 * - one node, several devices: `generate --devices cpu,cpu` (two worker processes);
 * - a real Slurm (test/slurm_cluster.ts): the job script of docs/cluster.md as a 4-task array,
 *   one task cancelled part-way and requeued, then the documented train + eval job submitted
 *   with an afterok dependency; `dipsy run --slurm` submitting, reporting on and
 *   resubmitting the whole experiment; and the sweep script as a 2-task array over a 2 x 2
 *   sweep, one task requeued part-way, with its `--table` job after the array, against one
 *   `sweep` process.
 * Tasks are caught part-way by the latch of `generate` (DIPSY_TEST_HOLD_AFTER_BATCH), never by
 * timing; waits poll Slurm's own state, with a bound. Without Slurm (or root) the Slurm tests
 * are listed as ignored, with the reason.
 */
import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync, readlinkSync } from "node:fs";
import { delimiter, dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parse as parseYaml } from "yaml";
import { expandTasks, type JobRecord, parseJobRecords } from "../cli/slurm.ts";
import { planChunks, resolveShard, shardChunks, workerShard } from "../core/shard.ts";
import { type Cluster, clusterUnavailable, startCluster } from "./slurm_cluster.ts";
import { assertSameFiles, sweepResults, TINY_SWEEP_AXES, tinySweepBase } from "./sweep_util.ts";
import { quickGenerateFlags, readTree, writeTinyDataset } from "./util.ts";

const REPO = fileURLToPath(new URL("..", import.meta.url));
const MAIN = join(REPO, "cli", "main.ts");
const GENERATE_SCRIPT = join(REPO, "docs", "cluster", "generate.sbatch");
const TRAIN_SCRIPT = join(REPO, "docs", "cluster", "train.sbatch");
const SWEEP_SCRIPT = join(REPO, "docs", "cluster", "sweep.sbatch");

const WHY_NOT = clusterUnavailable();
if (WHY_NOT) console.log(`slurm_test: the Slurm tests are skipped: ${WHY_NOT}`);

const ROOT = await Deno.makeTempDir({ prefix: "dipsy_slurm_test_" });
const DATA = join(ROOT, "data");
const TEST = join(ROOT, "test");
await writeTinyDataset(DATA);
await writeTinyDataset(TEST);
globalThis.addEventListener("unload", () => Deno.removeSync(ROOT, { recursive: true }));

/** 2 classes x 12 images in batches of 2: 12 batches, 3 for each of 4 shards. */
const GENERATE = [
  "--data",
  DATA,
  "--tiny",
  ...quickGenerateFlags(12, 7),
  "--dtype",
  "f32",
];
const TRAIN = [
  "--clip",
  "tiny",
  "--epochs",
  "1",
  "--warmup-epochs",
  "0",
  "--batch",
  "8",
  "--workers",
  "1",
  "--device",
  "cpu",
];

/**
 * The 2 x 2 sweep of test/sweep_test.ts (2 classes x 2 images, 2 steps at 32x32, one epoch, a
 * held-out shot), its paths relative to the file's folder as docs/sweep.md has them.
 */
const SWEEP = [...tinySweepBase("data", "test"), ...TINY_SWEEP_AXES];
const SWEEP_FLAGS = ["--workers", "1"];

/**
 * What the CLI and the jobs run with: one thread (thread counts change float rounding), and
 * this Deno first on PATH for the job scripts' `deno task`.
 */
const ENV = {
  OMP_NUM_THREADS: "1",
  PATH: [dirname(Deno.execPath()), Deno.env.get("PATH") ?? ""].join(delimiter),
  DIPSY_HOME: REPO,
};

async function dipsy(args: string[], env: Record<string, string> = {}) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, ...args],
    env: { ...ENV, ...env },
    stdin: "null",
  }).output();
  const text = (b: Uint8Array) => new TextDecoder().decode(b);
  return { code: out.code, stdout: text(out.stdout), stderr: text(out.stderr) };
}

/** The one-process run every other run is compared with, made once. */
let reference: Promise<Map<string, Uint8Array>> | null = null;
function referenceRun(): Promise<Map<string, Uint8Array>> {
  return reference ??= (async () => {
    const out = join(ROOT, "reference");
    const r = await dipsy(["generate", ...GENERATE, "--device", "cpu", "--out", out]);
    assert.equal(r.code, 0, r.stderr);
    return await readTree(out);
  })();
}

/** The same images, run.json and similarity copy, and the same manifest lines once each. */
function assertSameOutput(actual: Map<string, Uint8Array>, expected: Map<string, Uint8Array>) {
  const lines = (files: Map<string, Uint8Array>) =>
    new TextDecoder().decode(files.get("manifest.jsonl")).split("\n").filter((l) => l);
  const got = lines(actual), want = lines(expected);
  assert.equal(new Set(got).size, got.length, "a manifest line is there twice");
  assert.deepEqual([...got].sort(), [...want].sort(), "manifest lines");
  const others = (files: Map<string, Uint8Array>) =>
    [...files.keys()].filter((k) => k !== "manifest.jsonl").sort();
  assert.deepEqual(others(actual), others(expected), "files (temporary files left behind?)");
  assert.equal(others(expected).filter((k) => k.endsWith(".jpg")).length, want.length);
  for (const k of others(expected)) {
    assert.deepEqual(actual.get(k), expected.get(k), `${k} differs`);
  }
}

Deno.test("shards: worker shards split their shard exactly; a fixed count keeps Slurm ids", () => {
  const chunks = planChunks(3, 10, 2);
  for (const [n, k] of [[1, 2], [2, 2], [3, 4], [4, 3]]) {
    for (let i = 0; i < n; i++) {
      const shard = { index: i, count: n, source: "test" };
      const mine = shardChunks(chunks, shard).map((c) => c.id);
      const parts = Array.from(
        { length: k },
        (_, w) => shardChunks(chunks, workerShard(shard, w, k)).map((c) => c.id),
      );
      assert.deepEqual(parts.flat().sort((a, b) => a - b), mine, `shard ${i}/${n}, ${k} workers`);
      assert.equal(new Set(parts.flat()).size, mine.length, "workers overlap");
    }
  }
  // An array resubmitted for tasks 1 and 3 only: Slurm counts 2 tasks from 1, so task 3 would
  // be "shard 2 of 2"; the run's own count makes it shard 3 of 4 again.
  const resubmitted = {
    SLURM_ARRAY_TASK_ID: "3",
    SLURM_ARRAY_TASK_COUNT: "2",
    SLURM_ARRAY_TASK_MIN: "1",
  };
  assert.throws(
    () => resolveShard(undefined, undefined, resubmitted),
    /there is no shard 2 of 2: shards count from 0/,
  );
  assert.deepEqual(resolveShard(undefined, undefined, { ...resubmitted, DIPSY_SHARD_COUNT: "4" }), {
    index: 3,
    count: 4,
    source: "SLURM_ARRAY_TASK_ID",
  });
  assert.throws(
    () => resolveShard(undefined, 3, resubmitted),
    /SLURM_ARRAY_TASK_ID: there is no shard 3 of 3: shards count from 0 \(0\/3 to 2\/3\)/,
  );
});

Deno.test("scontrol's job records: array task ranges, states and reasons", () => {
  assert.deepEqual(expandTasks("0-3"), [0, 1, 2, 3]);
  assert.deepEqual(expandTasks("[1,5-6]"), [1, 5, 6]);
  assert.deepEqual(expandTasks("2-7%2"), [2, 3, 4, 5, 6, 7]);
  assert.deepEqual(expandTasks("0-6:3"), [0, 3, 6]);
  const records = parseJobRecords(
    "JobId=12 ArrayJobId=12 ArrayTaskId=2-3 JobName=dipsy generate JobState=PENDING " +
      "Reason=Dependency Dependency=afterok:11(unfulfilled) Restarts=0 StartTime=Unknown\n" +
      "JobId=14 ArrayJobId=12 ArrayTaskId=1 JobState=COMPLETED Reason=None Restarts=1 " +
      "StartTime=2026-01-02T03:04:05 EndTime=2026-01-02T03:04:09\n",
  );
  assert.deepEqual(records.map((r) => [r.jobId, r.tasks, r.state, r.reason, r.restarts]), [
    ["12", [2, 3], "PENDING", "Dependency", 0],
    ["14", [1], "COMPLETED", "None", 1],
  ]);
  assert.equal(records[1].endTime, "2026-01-02T03:04:09");
});

Deno.test("docs/cluster.md shows the job scripts the Slurm test runs, as they are", async () => {
  const doc = await Deno.readTextFile(join(REPO, "docs", "cluster.md"));
  for (const file of ["generate.sbatch", "train.sbatch", "sweep.sbatch", "generate-job.yaml"]) {
    const text = await Deno.readTextFile(join(REPO, "docs", "cluster", file));
    // The fenced block right after the link to the file.
    const at = doc.indexOf(`](cluster/${file})`);
    assert.ok(at >= 0, `docs/cluster.md links to cluster/${file}`);
    const block = /```[a-z]*\n([\s\S]*?)```/.exec(doc.slice(at));
    assert.equal(block?.[1], text, `the block after the link to cluster/${file} is the file`);
  }
  // The Kubernetes manifest (not run here) runs the command the array script runs.
  const job = parseYaml(
    await Deno.readTextFile(join(REPO, "docs", "cluster", "generate-job.yaml")),
  );
  assert.equal(job.spec.completionMode, "Indexed");
  const container = job.spec.template.spec.containers[0];
  assert.deepEqual(container.command, ["deno", "task", "dipsy", "generate"]);
  assert.ok(container.args.includes(`--shard-count=${job.spec.completions}`));
  assert.match(await Deno.readTextFile(GENERATE_SCRIPT), /\nexec deno task dipsy generate "\$@"\n/);
});

Deno.test("generate --devices cpu,cpu: two workers into one folder, the same bytes as one", async () => {
  // No similarity file: the class similarity is computed once, then handed to both workers.
  const data = join(ROOT, "data-without-similarity");
  await writeTinyDataset(data);
  await Deno.remove(join(data, "similarity.json"));
  const flags = [...GENERATE, "--data", data, "--per-class", "4"]; // the later flags win
  const one = join(ROOT, "one-device"), two = join(ROOT, "two-devices");
  const single = await dipsy(["generate", ...flags, "--device", "cpu", "--out", one]);
  assert.equal(single.code, 0, single.stderr);
  const r = await dipsy(["generate", ...flags, "--devices", "cpu,cpu", "--out", two]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /computing the class similarity/);
  assert.equal(r.stderr.match(/computing the class similarity/g)!.length, 1, "computed once");
  assert.match(r.stderr, /2 workers \(cpu, cpu\)/);
  assert.match(r.stderr, /\[0 cpu\] 4 image\(s\) to generate \(shard 0\/2\)/);
  assert.match(r.stderr, /\[1 cpu\] 4 image\(s\) to generate \(shard 1\/2\)/);
  const expected = await readTree(one);
  assert.ok(expected.has("similarity.json"));
  assertSameOutput(await readTree(two), expected);

  const out = join(ROOT, "refused-generate");
  const both = await dipsy(["generate", ...GENERATE, "--devices", "cpu", "--device", "cpu"]);
  assert.equal(both.code, 2);
  assert.match(both.stderr, /--device and --devices/);
  const bad = await dipsy(["generate", ...GENERATE, "--devices", "cpu,gpu:1", "--out", out]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--devices must be "all" or devices separated by commas/);
  const { runtimeInfo } = await import("../ffi/mod.ts");
  if (runtimeInfo().cuda_device_count === 0) {
    const none = await dipsy(["generate", ...GENERATE, "--devices", "all", "--out", out]);
    assert.equal(none.code, 2);
    assert.match(none.stderr, /--devices all: no CUDA device is visible/);
  }
  assert.ok(!existsSync(out), "a refused command wrote nothing");
});

Deno.test("run --slurm: a bad Slurm flag, or no Slurm, is one line and writes nothing", async () => {
  const exp = join(ROOT, "refused");
  const run = ["run", "--data", DATA, "--test", TEST, "--out", exp, "--tiny", "--slurm"];
  const cases: [string[], Record<string, string>, number, RegExp][] = [
    [["--gpus-per-task", "-1"], {}, 2, /--gpus-per-task must be an integer of at least 0/],
    [["--array-size", "0"], {}, 2, /--array-size must be an integer of at least 1/],
    [["--sbatch", "account=x"], {}, 2, /--sbatch "account=x": give one sbatch option/],
    [["--stage", "train"], {}, 2, /--slurm submits every stage/],
    [[], { PATH: dirname(Deno.execPath()) }, 1, /sbatch not found: --slurm needs Slurm's/],
  ];
  for (const [extra, env, code, message] of cases) {
    const r = await dipsy([...run, ...extra], env);
    assert.equal(r.code, code, `${extra.join(" ")}: ${r.stderr}`);
    assert.match(r.stderr, message);
    assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
  }
  const stage = await dipsy(["run", "--data", DATA, "--test", TEST, "--out", exp, "--stage", "x"]);
  assert.equal(stage.code, 2);
  assert.match(stage.stderr, /--stage must be one of similarity, generate, train/);
  assert.ok(!existsSync(exp), "a refused command wrote nothing");
});

/**
 * Every cell of the sweep's plan finished, none failed: its report and evaluation, its adapter,
 * its link to its generation set, which holds every image once; no temporary file anywhere.
 */
function assertCompleteSweep(out: string) {
  const plan = JSON.parse(readFileSync(join(out, "plan.json"), "utf8"));
  assert.equal(plan.cells.length, 4);
  for (const cell of plan.cells) {
    const run = join(out, cell.run);
    for (const f of ["report.json", "eval.json", "train/adapter"]) {
      assert.ok(existsSync(join(run, f)), `${cell.run}: ${f}`);
    }
    assert.ok(!existsSync(join(run, "failed.json")), `${cell.run} failed`);
    assert.equal(readlinkSync(join(run, "synthetic")), `../../gen/${cell.generation}`);
  }
  for (const g of plan.generation) {
    const lines = readFileSync(join(out, g.out, "manifest.jsonl"), "utf8").split("\n");
    assert.equal(lines.filter(Boolean).length, 4, `${g.out}: 4 images, once each`);
  }
  const walk = (dir: string): string[] =>
    readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
      e.isDirectory() ? walk(join(dir, e.name)) : [join(dir, e.name)]
    );
  assert.deepEqual(walk(out).filter((f) => f.endsWith(".tmp")), [], "temporary files left");
}

/** Waits until `file` has `n` lines (a held task writes one each time it is held). */
async function waitForLines(file: string, n: number, seconds: number, logs: string) {
  const until = Date.now() + seconds * 1000;
  const lines = () => existsSync(file) ? readFileSync(file, "utf8").split("\n").length - 1 : 0;
  while (lines() < n) {
    if (Date.now() > until) {
      throw new Error(`${file}: ${lines()} of ${n} lines after ${seconds} s\n${tail(logs)}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** The end of every log in `dir`, for failure messages. */
function tail(dir: string): string {
  if (!existsSync(dir)) return "";
  return [...Deno.readDirSync(dir)].map((e) => {
    const text = readFileSync(join(dir, e.name), "utf8").split("\n").slice(-15).join("\n");
    return `--- ${e.name}\n${text}`;
  }).join("\n");
}

/** Waits until a job has ended, one way or another; the logs go into the message if not. */
async function waitForEnd(cluster: Cluster, id: string, logs: string): Promise<JobRecord> {
  const ended = (r: JobRecord[]) => r.length > 0 && !RUNNING.includes(r[0].state);
  try {
    return (await cluster.waitFor(id, "ended", ended, 300))[0];
  } catch (e) {
    throw new Error(`${e instanceof Error ? e.message : e}\n${tail(logs)}`);
  }
}
const RUNNING = ["PENDING", "CONFIGURING", "RUNNING", "COMPLETING"];

const allDone = (tasks: number) => (r: JobRecord[]) =>
  r.flatMap((x) => x.state === "COMPLETED" ? x.tasks : []).length === tasks;
const inState = (state: string, reason?: string) => (r: JobRecord[]) =>
  r.length > 0 && r.every((x) => x.state === state && (!reason || x.reason === reason));

Deno.test({
  name: `slurm: the documented array with a task cancelled and requeued, then train + eval; ` +
    `run --slurm; the sweep array${WHY_NOT ? ` [skipped: ${WHY_NOT}]` : ""}`,
  ignore: WHY_NOT !== null,
  async fn(t) {
    const started = performance.now();
    const cluster = await startCluster();
    const env = { ...ENV, ...cluster.env };
    const logs = join(ROOT, "logs");
    await Deno.mkdir(logs);
    try {
      await t.step("generate.sbatch --array=0-3, task 2 cancelled and requeued", async () => {
        // Every shard but 2 is let through the latch at once; shard 2 is held after its first
        // batch, and again after the first batch of its rerun.
        const hold = join(ROOT, "hold");
        await Deno.mkdir(hold);
        for (const i of [0, 1, 3]) await Deno.writeTextFile(join(hold, `release-${i}`), "");
        const out = join(ROOT, "slurm-out");
        const array = await cluster.sbatch([
          "--array=0-3",
          `--output=${logs}/generate-%A_%a.log`,
          GENERATE_SCRIPT,
          ...GENERATE,
          "--device",
          "cpu",
          "--out",
          out,
        ], { ...env, DIPSY_TEST_HOLD_AFTER_BATCH: hold });
        const task2 = `${array}_2`;
        const held = join(hold, "held-2");
        await waitForLines(held, 1, 300, logs);
        const before = readFileSync(join(out, "manifest.jsonl"), "utf8");
        // Shard 2 has batches 2, 6 and 10: images 4 and 5 of the first class come first.
        assert.ok(before.includes('"file":"blue square/0004.jpg"'), "task 2's first batch is in");
        assert.ok(!before.includes('"file":"red circle/0000.jpg"'), "its second batch is not");

        await cluster.run("scancel", [task2]);
        await cluster.waitFor(task2, "cancelled", inState("CANCELLED"));
        await cluster.run("scontrol", ["requeue", task2]);
        await cluster.waitFor(task2, "pending", inState("PENDING"));
        // Slurm starts it again once the cancelled run's credential has expired (cred_expire,
        // 10 s on this cluster); forcing StartTime=now can beat that and get the launch refused
        // ("Job credential revoked").
        await waitForLines(held, 2, 300, logs);
        const [rerun] = await cluster.jobs(task2);
        assert.equal(rerun.restarts, 1);
        assert.equal(rerun.state, "RUNNING");

        // The whole array's afterok would never be met after a cancelled task, requeued or
        // not: Slurm keeps the cancel in the array's record. The tasks' own records are fine.
        const run = join(ROOT, "slurm-train");
        const tasks = [0, 1, 2, 3].map((i) => `${array}_${i}`).join(":");
        const train = await cluster.sbatch([
          `--dependency=afterok:${tasks}`,
          `--output=${logs}/train-%j.log`,
          TRAIN_SCRIPT,
          run,
          TEST,
          "--real",
          DATA,
          "--synthetic",
          out,
          ...TRAIN,
        ], env);
        // Task 2 is held, so the job cannot have started.
        await cluster.waitFor(train, "waiting on its dependency", inState("PENDING", "Dependency"));

        await Deno.writeTextFile(join(hold, "release-2"), "");
        const generated = await cluster.waitFor(array, "done", allDone(4), 300);
        const trained = await waitForEnd(cluster, train, logs);
        assert.equal(trained.state, "COMPLETED", tail(logs));
        for (const g of generated) assert.ok(trained.startTime >= g.endTime, "afterok held it");

        assertSameOutput(await readTree(out), await referenceRun());
        assert.ok(existsSync(join(run, "adapter")), "train wrote the adapter");
        const evaluated = JSON.parse(readFileSync(join(run, "eval.json"), "utf8"));
        assert.equal(evaluated.total, 4, "eval saw the 4 test images");
      });

      await t.step("run --slurm: submitted, the array cancelled, resubmitted, done", async () => {
        const exp = join(ROOT, "exp");
        const args = [
          "run",
          "--data",
          DATA,
          "--test",
          TEST,
          "--out",
          exp,
          "--tiny",
          "--per-class",
          "4",
          "--steps",
          "2",
          "--size",
          "32",
          "--gen-batch",
          "2",
          "--dtype",
          "f32",
          ...TRAIN,
          "--slurm",
          "--array-size",
          "2",
          "--time",
          "10:00",
        ];
        const state = () => JSON.parse(readFileSync(join(exp, "slurm.json"), "utf8"));
        // Submitted held, so that the array is surely cancelled before it starts.
        const first = await dipsy([...args, "--sbatch=--hold"], env);
        assert.equal(first.code, 0, first.stderr);
        assert.match(first.stdout, /submitted/);
        const { jobs } = state();
        const [similarity, array, train] = [jobs.similarity[0], jobs.generate[0].id, jobs.train[0]];
        assert.match(first.stdout, new RegExp(`similarity +job ${similarity}\\n`));
        assert.match(first.stdout, new RegExp(`generate +job ${array} \\(array 0,1\\)\\n`));
        assert.match(first.stdout, new RegExp(`train\\+eval +job ${train}\\n`));
        await cluster.run("scancel", [array]);
        await cluster.waitFor(array, "cancelled", inState("CANCELLED"));
        await cluster.run("scontrol", ["release", similarity]);

        const second = await dipsy(args, env);
        assert.equal(second.code, 0, second.stderr);
        assert.match(second.stdout, /generate +\d+ \(0,1\) +2 CANCELLED; 0\/8 images/);
        const again = state().jobs;
        assert.equal(again.generate.length, 2);
        assert.equal(again.train.length, 2);
        const [newArray, newTrain] = [again.generate[1].id, again.train[1]];
        assert.match(
          second.stdout,
          new RegExp(
            `resubmitted: generate tasks 0,1 as job ${newArray}; train\\+eval as job ${newTrain}`,
          ),
        );
        await cluster.waitFor(train, "cancelled", inState("CANCELLED"));
        const done = await waitForEnd(cluster, newTrain, join(exp, "slurm", "logs"));
        assert.equal(done.state, "COMPLETED", tail(join(exp, "slurm", "logs")));

        const third = await dipsy(args, env);
        assert.equal(third.code, 0, third.stderr);
        assert.match(third.stdout, /every stage is done/);
        assert.deepEqual(state().jobs, again, "nothing resubmitted");
        const report = JSON.parse(readFileSync(join(exp, "report.json"), "utf8"));
        assert.deepEqual(report.stages.map((s: { status: string }) => s.status), [
          "skipped",
          "skipped",
          "done",
          "done",
        ]);
        assert.equal(report.accuracy.total, 4);
      });

      await t.step("sweep.sbatch --array=0-1, task 1 requeued part-way, then --table", async () => {
        const file = join(ROOT, "sweep.yaml");
        await Deno.writeTextFile(file, SWEEP.join("\n") + "\n");
        const out = join(ROOT, "sweep-slurm");
        // The one-process sweep, run while the array's tasks run.
        const alone = join(ROOT, "sweep-alone");
        const reference = dipsy(["sweep", file, "--out", alone, ...SWEEP_FLAGS]);
        try {
          // Task 1 is held after the first of its set's two batches; task 0 goes through.
          const hold = join(ROOT, "sweep-hold");
          await Deno.mkdir(hold);
          await Deno.writeTextFile(join(hold, "release-0"), "");
          const array = await cluster.sbatch([
            "--array=0-1",
            `--output=${logs}/sweep-%A_%a.log`,
            SWEEP_SCRIPT,
            file,
            "--out",
            out,
            ...SWEEP_FLAGS,
          ], { ...env, DIPSY_TEST_HOLD_AFTER_BATCH: hold });
          const table = await cluster.sbatch([
            `--dependency=afterok:${array}`,
            `--output=${logs}/sweep-table-%j.log`,
            SWEEP_SCRIPT,
            file,
            "--out",
            out,
            "--table",
          ], env);
          const task1 = `${array}_1`;
          const held = join(hold, "held-1");
          await waitForLines(held, 1, 300, logs);
          await cluster.waitFor(table, "waiting on the array", inState("PENDING", "Dependency"));

          // Requeued while running: Slurm stops it and queues it again, which is no failure, so
          // the whole array's afterok still holds.
          const pid = Number(readFileSync(held, "utf8").trim());
          await cluster.run("scontrol", ["requeue", task1]);
          const until = Date.now() + 60_000;
          while (existsSync(`/proc/${pid}`)) {
            assert.ok(Date.now() < until, `the requeued task's process ${pid} is still running`);
            await new Promise((r) => setTimeout(r, 100));
          }
          await Deno.writeTextFile(join(hold, "release-1"), "");
          const done = await cluster.waitFor(array, "done", allDone(2), 300).catch((e) => {
            throw new Error(`${e.message}\n${tail(logs)}`);
          });
          const tabled = await waitForEnd(cluster, table, logs);
          assert.equal(tabled.state, "COMPLETED", tail(logs));
          for (const g of done) assert.ok(tabled.startTime >= g.endTime, "afterok held it");
          assert.deepEqual(
            (await cluster.jobs(task1)).map((r) => r.restarts),
            [1],
            "task 1 ran twice",
          );
          for (const i of [0, 1]) {
            const log = readFileSync(join(logs, `sweep-${array}_${i}.log`), "utf8");
            const units = `this process: 1 set\\(s\\), 2 cell\\(s\\) \\(shard ${i}/2\\)`;
            assert.equal(log.match(new RegExp(units, "g"))?.length, i + 1, log);
          }

          const one = await reference;
          assert.equal(one.code, 0, one.stderr);
          const got = JSON.parse(readFileSync(join(out, "sweep.json"), "utf8"));
          const want = JSON.parse(readFileSync(join(alone, "sweep.json"), "utf8"));
          assert.equal(got.rows.length, 4);
          assert.deepEqual(got, want, "the same table as one process");
          assert.equal(
            readFileSync(join(out, "sweep.csv"), "utf8"),
            readFileSync(join(alone, "sweep.csv"), "utf8"),
          );
          assertCompleteSweep(out);
          assertSameFiles(await sweepResults(out), await sweepResults(alone));
        } finally {
          // A failure above must not leave the one-process sweep running past the test.
          await reference;
        }
      });
    } finally {
      await cluster.stop();
      console.log(
        `  slurm: ${((performance.now() - started) / 1000).toFixed(0)} s with the cluster`,
      );
    }
  },
});
