/**
 * `dipsy sweep FILE`: a grid or list of generation and training settings over one experiment
 * (core/sweep.ts makes the plan). The class similarity is computed once, each distinct
 * generation setting generates once into SWEEP/gen/<id>/, and each training setting trains and
 * is evaluated once per generated set in SWEEP/cells/<gen id>--<train id>/, an ordinary run
 * folder. Everything resumes where it stopped; work units (a generation set and its cells) are
 * spread over shards; the table of finished cells ends every invocation.
 */
import { existsSync, readFileSync } from "node:fs";
import { join, relative } from "node:path";
import { UserError } from "../ffi/errors.ts";
import { type RunConfig, TINY } from "../core/config.ts";
import { REPORT_FILE, writeAtomic, writeJsonAtomic } from "../core/output.ts";
import type { Shard } from "../core/shard.ts";
import {
  type Cell,
  type CellResult,
  CELLS_DIR,
  classifierClip,
  type ConcreteDtype,
  CSV_FILE,
  formatTable,
  GEN_DIR,
  PLAN_FILE,
  SweepError,
  type SweepPlan,
  type SweepTable,
  TABLE_FILE,
} from "../core/sweep.ts";
import { CliError, defineCommand, type Flags, withInterrupt } from "./command.ts";
import type { PreparedGenerate } from "./generate.ts";
import type { StageReport } from "./run.ts";
import type { Classifier } from "../core/plugins.ts";
import type { ImageFolder } from "../plugins/classifiers/data.ts";

const SECTIONS = {
  "options:": {
    out: { value: "DIR", help: 'sweep folder (default: the file\'s "out")' },
    device: { value: "D", help: "auto, cpu, cuda or cuda:N (default: the file's, else auto)" },
    workers: { value: "N", help: "image preparation threads for training and evaluation" },
    shard: {
      value: "I/N",
      help: "do work units I, I+N, ... (a unit is a generation set with its cells), I counting " +
        "from 0; also from SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX, as in `dipsy generate`",
    },
    "shard-count": {
      value: "N",
      help: "the shard count for JOB_COMPLETION_INDEX (with SLURM_ARRAY_TASK_ID: the task id " +
        "is then the shard index)",
    },
    table: { help: "only assemble the table from the cells finished so far" },
    plan: { help: "print the cells and their ids, write nothing" },
  },
} as const satisfies Record<string, Flags>;

const defined = defineCommand({
  synopsis: "sweep FILE [--out DIR] [options]",
  about: `Runs every cell of a sweep file: the base experiment (the settings \`dipsy run\` takes:
data, test, val or holdout, dataset, model, perClass, steps, size, classifier, ...) with a grid
or a list of generation settings (guidance.textScale, guidance.positiveScale,
guidance.negativeScale, guidance.adapterScale, preset, sampler, steps, ...) and of training
settings (lr, lambda, epochs, ...); see docs/sweep.md. Everything goes into OUT:
  OUT/plan.json          the cells, written first
  OUT/similarity.json    class similarity, computed once
  OUT/gen/<id>/          one \`dipsy generate\` output per distinct generation setting
  OUT/cells/<gen>--<tr>/ a run folder per cell: train/, eval.json, report.json
  OUT/sweep.json, .csv   the table of finished cells, best first (also printed)
  OUT/locks/             processes sharing OUT never work in one set or cell at once
Every cell is checked before anything is written. Run the same command again after an
interruption: finished sets and cells are skipped, partial ones resume. A cell that fails is
recorded with its reason and the sweep goes on (the exit code says so at the end).`,
  sections: SECTIONS,
  footer: "Ctrl-C stops after the step in flight; run the same command to resume.",
  run: () => Promise.resolve(0), // FILE comes first: `command.run` below parses the rest
});

/** A cell's last failure (removed when it succeeds). */
const FAILED_FILE = "failed.json";

export const command: typeof defined = {
  ...defined,
  async run(args) {
    const positional = args[0] !== undefined && !args[0].startsWith("-");
    const file = positional ? args[0] : undefined;
    const rest = positional ? args.slice(1) : args;
    const values = defined.parse(rest);
    if (values.help) {
      console.log(defined.usage);
      return 0;
    }
    if (!file) throw new CliError("give the sweep file first: dipsy sweep FILE [options]");
    const { intFlag, deviceFlag } = await import("./command.ts");
    const workers = intFlag(values.workers, "--workers");
    const shardCount = intFlag(values["shard-count"], "--shard-count", 1);
    const plan = await loadPlan(file, {
      out: values.out,
      device: values.device === undefined ? undefined : deviceFlag(values.device),
      readOnly: values.plan || values.table,
    });
    if (values.plan) {
      printPlan(plan);
      return 0;
    }
    if (values.table) return await finish(plan, new Map());

    const { resolveShard } = await import("../core/shard.ts");
    const shard = resolveShard(values.shard, shardCount);
    return await withInterrupt((signal) => runSweep(plan, { shard, workers, signal }));
  },
};

/**
 * The plan of a sweep file, its plugin files loaded first. `readOnly` (--plan, --table): a
 * sweep folder's recorded dtype is taken whatever this process's device would give.
 */
export async function loadPlan(
  file: string,
  opts: { out?: string; device?: string; readOnly?: boolean } = {},
): Promise<SweepPlan> {
  const sweep = await import("../core/sweep.ts");
  const { loadDefaultPlugins } = await import("../app/plugins.ts");
  const { loadPluginFile } = await import("../core/config.ts");
  await loadDefaultPlugins();
  const raw = await sweep.readSweepFile(file);
  for (const p of sweep.basePluginFiles(raw, file)) await loadPluginFile(p);
  return await sweep.planSweep(file, raw, {
    out: opts.out,
    device: opts.device,
    autoDtype: (device, out) => autoDtype(device, out, opts.readOnly ?? false),
    defaultSize,
  });
}

/** The dtype OUT/plan.json was planned with; null when there is none (or none readable). */
function recordedDtype(out: string): ConcreteDtype | null {
  try {
    const { dtype } = JSON.parse(readFileSync(join(out, PLAN_FILE), "utf8"));
    return ["f32", "f16", "bf16"].includes(dtype) ? dtype : null;
  } catch {
    return null;
  }
}

/**
 * What dtype "auto" stands for in a sweep folder: the one its plan.json records, so that a sweep
 * keeps one precision in its table, else the device's (f16 on CUDA, f32 on the CPU). A process
 * whose device gives another is refused before it writes anything.
 */
async function autoDtype(device: string, out: string, readOnly: boolean): Promise<ConcreteDtype> {
  const recorded = recordedDtype(out);
  if (recorded && readOnly) return recorded;
  const { resolvePlacement } = await import("../app/models.ts");
  const placement = await resolvePlacement({ device, dtype: "auto" });
  if (recorded && recorded !== placement.dtype) {
    throw new SweepError(
      `${join(out, PLAN_FILE)}: this sweep runs in ${recorded}, and dtype auto on ` +
        `${placement.device} is ${placement.dtype}: run it where auto gives ${recorded}, write ` +
        `"dtype: ${recorded}" in the sweep file to go on with its cells here, or use another --out`,
    );
  }
  return placement.dtype;
}

/** A model's default output size, from its UNet and VAE config files (no weights). */
async function defaultSize(model: string): Promise<number> {
  const models = await import("../app/models.ts");
  const folder = model === TINY
    ? TINY
    : await models.resolveFolderRef(model, ["unet/config.json", "vae/config.json"]);
  return (await models.modelGeometry({ model: folder })).defaultSize;
}

function printPlan(plan: SweepPlan): void {
  console.log(
    `${plan.cells.length} cell(s): ${plan.generations.length} generation set(s) x ` +
      `${plan.trainings.length} training setting(s); ranked by ${plan.metric}; ${plan.dtype}`,
  );
  for (const g of plan.generations) {
    console.log(`  ${GEN_DIR}/${g.id}  ${JSON.stringify(g.settings)}`);
  }
  for (const t of plan.trainings) console.log(`  train ${t.id}  ${JSON.stringify(t.settings)}`);
  for (const c of plan.cells) console.log(`  ${c.run}`);
}

interface SweepOptions {
  shard: Shard;
  workers?: number;
  signal?: AbortSignal;
}

/** Everything a cell reads, checked before anything is written. */
interface Checked {
  prepared: Map<string, PreparedGenerate>;
  classifiers: Map<string, Classifier>;
  device: string;
  test: ImageFolder;
}

async function check(plan: SweepPlan): Promise<Checked> {
  const { prepareGenerate } = await import("./generate.ts");
  const experiment = await import("./run.ts");
  const app = await import("../app/classify.ts");
  const { readImageFolder } = await import("../plugins/classifiers/data.ts");
  const quiet = () => {};
  const prepared = new Map<string, PreparedGenerate>();
  for (const g of plan.generations) {
    // The sweep spreads whole sets over shards: each set is generated by one process.
    prepared.set(g.id, await prepareGenerate(g.config, { shard: "0/1", log: quiet }));
  }
  const first = prepared.get(plan.generations[0].id)!;
  for (const p of first.dataset.problems) console.error(`${p.severity}: ${p.path}: ${p.message}`);
  const { dataset } = first;
  const folderOptions = { dataset: plan.base.dataset ?? undefined };
  const test = await readImageFolder(plan.test, folderOptions);
  experiment.checkEvalClasses(
    dataset,
    test,
    plan.val ? await readImageFolder(plan.val, folderOptions) : null,
  );
  const device = await app.resolveDevice(first.config.device);
  const classifiers = new Map<string, Classifier>();
  for (const t of plan.trainings) {
    // The dtype is the plan's (part of the training id).
    const options: Record<string, unknown> = { ...t.classifier.options };
    options.clip ??= classifierClip(plan.base);
    options.dataset ??= plan.base.dataset ?? dataset.dataset;
    classifiers.set(t.id, await app.makeClassifier(t.classifier.name, options));
  }
  return { prepared, classifiers, device, test };
}

async function runSweep(plan: SweepPlan, opts: SweepOptions): Promise<number> {
  const { planRecord, shardUnits } = await import("../core/sweep.ts");
  const checked = await check(plan);
  await Deno.mkdir(plan.out, { recursive: true });
  await writeJsonAtomic(join(plan.out, PLAN_FILE), planRecord(plan));

  const units = shardUnits(plan, opts.shard);
  const cells = units.reduce((n, u) => n + u.cells.length, 0);
  const where = opts.shard.count > 1 ? ` (shard ${opts.shard.index}/${opts.shard.count})` : "";
  console.error(
    `sweep ${plan.file}: ${plan.cells.length} cell(s), ${plan.generations.length} generation ` +
      `set(s) x ${plan.trainings.length} training setting(s); this process: ${units.length} ` +
      `set(s), ${cells} cell(s)${where}, into ${plan.out}`,
  );
  const similarity = units.length ? await similarityFile(plan, checked) : null;

  const { HOLD_AFTER_BATCH, holdAfterFirstBatch } = await import("./generate.ts");
  const hold = Deno.env.get(HOLD_AFTER_BATCH);
  // One latch for the whole process: it holds once, after the first batch this process writes.
  const beforeBatch = hold ? holdAfterFirstBatch(hold, opts.shard) : undefined;
  const failures = new Map<string, string>();
  let k = 0, left = 0;
  for (const unit of units) {
    const g = unit.generation;
    const prepared = checked.prepared.get(g.id)!;
    const config: RunConfig = {
      ...prepared.config,
      similarity: similarity && prepared.run.pairs.needsSimilarity
        ? similarity
        : g.config.similarity,
    };
    // A requeued task or an edited sweep file can give one unit to two processes: the one
    // that holds a folder's lock works in it, the other leaves it (its cells stay missing here).
    const setLock = await tryLock(plan.out, `gen-${g.id}`);
    if ("heldBy" in setLock) {
      k += unit.cells.length;
      left += unit.cells.length;
      console.error(
        `${GEN_DIR}/${g.id}: locked by ${setLock.heldBy}, skipped with its ` +
          `${unit.cells.length} cell(s)`,
      );
      continue;
    }
    let reason: string | null = null;
    try {
      const code = await generateSet(plan, { ...prepared, config }, opts.signal, beforeBatch);
      if (code === 130) return interrupted();
      if (code !== 0) reason = `generation stopped with exit code ${code}`;
    } catch (e) {
      if (opts.signal?.aborted) return interrupted();
      reason = failureReason(e);
    } finally {
      setLock.release();
    }
    for (const cell of unit.cells) {
      k++;
      const label = `[${k}/${cells}] ${cell.id}`;
      const cellLock = await tryLock(plan.out, `cell-${cell.id}`);
      if ("heldBy" in cellLock) {
        left++;
        console.error(`${label}: locked by ${cellLock.heldBy}, skipped`);
        continue;
      }
      try {
        const ok = await cellStep(plan, cell, label, reason, checked, config, opts, failures);
        if (!ok) return interrupted();
      } finally {
        cellLock.release();
      }
    }
  }
  if (left) {
    console.error(`${left} cell(s) left to the process(es) holding their lock (missing here)`);
  }
  const code = await finish(plan, failures);
  return failures.size ? 1 : code;
}

/**
 * One cell, under its lock: its generation set's failure recorded, or skipped when complete, or
 * trained and evaluated (a failure recorded); false when interrupted.
 */
async function cellStep(
  plan: SweepPlan,
  cell: Cell,
  label: string,
  generationFailure: string | null,
  checked: Checked,
  config: RunConfig,
  opts: SweepOptions,
  failures: Map<string, string>,
): Promise<boolean> {
  // Said, kept for the table, and recorded in the cell's folder.
  const fail = async (reason: string) => {
    console.error(`${label}: failed: ${reason}`);
    failures.set(cell.id, reason);
    await Deno.mkdir(join(plan.out, cell.run), { recursive: true });
    await writeJsonAtomic(join(plan.out, cell.run, FAILED_FILE), { cell: cell.id, reason });
  };
  if (generationFailure !== null) {
    await fail(`generation set ${cell.generation.id}: ${generationFailure}`);
    return true;
  }
  if (isComplete(join(plan.out, cell.run))) {
    console.error(`${label}: complete, skipped`);
    return true;
  }
  console.error(`${label}: train and evaluate`);
  const t0 = performance.now();
  try {
    const result = await runCell(plan, cell, checked, config, opts);
    if (result === null) return false;
    const secs = ((performance.now() - t0) / 1000).toFixed(1);
    const pct = (v: number | null) => (v === null ? "-" : `${(100 * v).toFixed(2)}%`);
    console.error(
      `${label}: done in ${secs} s: val top-1 ${pct(result.val_top1)}, test top-1 ` +
        `${pct(result.test_top1)}`,
    );
  } catch (e) {
    // Stopped by Ctrl-C part-way through a step: not a failure of the cell.
    if (opts.signal?.aborted) return false;
    await fail(failureReason(e));
  }
  return true;
}

/** Lock files, one per work folder and one for the class similarity. */
const LOCK_DIR = "locks";

interface Lock {
  release(): void;
}

async function openLock(out: string, name: string): Promise<[Deno.FsFile, string]> {
  await Deno.mkdir(join(out, LOCK_DIR), { recursive: true });
  const path = join(out, LOCK_DIR, `${name}.lock`);
  // Never truncated before it is held: it says who holds it.
  return [await Deno.open(path, { read: true, write: true, create: true }), path];
}

/** Who holds a lock, as its holder wrote it. */
function holderOf(path: string): string {
  let text = "";
  try {
    text = readFileSync(path, "utf8").trim();
  } catch { /* unreadable: just another process */ }
  const [pid, host] = text.split(" ");
  return pid ? `pid ${pid}${host ? ` on ${host}` : ""}` : "another process";
}

async function own(file: Deno.FsFile): Promise<Lock> {
  await file.truncate(0);
  await file.write(new TextEncoder().encode(`${Deno.pid} ${Deno.hostname()}\n`));
  return { release: () => file.close() };
}

/**
 * OUT/locks/<name>.lock, taken without waiting: an exclusive flock(2) (Deno.FsFile.tryLock) that
 * the system drops when its process ends, however it ends, so a lock is never stale. When another
 * process holds it, says which.
 */
async function tryLock(out: string, name: string): Promise<Lock | { heldBy: string }> {
  const [file, path] = await openLock(out, name);
  if (await file.tryLock(true)) return await own(file);
  file.close();
  return { heldBy: holderOf(path) };
}

/** The same lock, waited for (saying so). */
async function waitLock(out: string, name: string, what: string): Promise<Lock> {
  const [file, path] = await openLock(out, name);
  if (!(await file.tryLock(true))) {
    console.error(`${what}: ${holderOf(path)} is computing it; waiting`);
    await file.lock(true);
  }
  return await own(file);
}

function interrupted(): number {
  console.error("stopped; run the same command to resume");
  return 130;
}

/** One line for the record; a bug keeps its stack on stderr. */
function failureReason(e: unknown): string {
  if (!(e instanceof UserError)) console.error(e);
  return (e instanceof Error ? e.message : String(e)).split("\n")[0];
}

/**
 * SWEEP/similarity.json, computed once for every set whose pair sampler uses it (and reused
 * while it was made with the CLIP asked for); null when the base names a file or none needs it.
 */
async function similarityFile(plan: SweepPlan, checked: Checked): Promise<string | null> {
  if (plan.base.similarity) return null;
  if (![...checked.prepared.values()].some((p) => p.run.pairs.needsSimilarity)) return null;
  const { similarityStage } = await import("../app/similarity.ts");
  const { similarityClip } = await import("../core/config.ts");
  const path = join(plan.out, "similarity.json");
  const { dataset, config } = checked.prepared.get(plan.generations[0].id)!;
  const clip = similarityClip(config);
  // Shards that start together: one computes it, the others wait and then read it.
  const lock = await waitLock(plan.out, "similarity", path);
  try {
    await similarityStage(path, dataset, config, {
      beforeCompute: () => console.error(`class similarity with ${clip}`),
    });
    return path;
  } finally {
    lock.release();
  }
}

/** Generates a set unless every image is there; returns generate's exit code. */
async function generateSet(
  plan: SweepPlan,
  prepared: PreparedGenerate,
  signal?: AbortSignal,
  beforeBatch?: () => Promise<void>,
): Promise<number> {
  const { runPrepared } = await import("./generate.ts");
  const experiment = await import("./run.ts");
  const out = prepared.config.out!;
  const expected = prepared.dataset.classes.length * prepared.config.perClass;
  const label = `${GEN_DIR}/${relative(join(plan.out, GEN_DIR), out)}`;
  if (await experiment.finishedImages(out) >= expected) {
    console.error(`${label}: complete (${expected} images), skipped`);
    return 0;
  }
  console.error(`${label}: generating`);
  return await runPrepared(prepared, {
    signal,
    beforeBatch,
    progress: Deno.stderr.isTerminal(),
  });
}

/** Trains and evaluates one cell; null when interrupted. */
async function runCell(
  plan: SweepPlan,
  cell: Cell,
  checked: Checked,
  config: RunConfig,
  opts: SweepOptions,
): Promise<CellResult | null> {
  const app = await import("../app/classify.ts");
  const experiment = await import("./run.ts");
  const dir = join(plan.out, cell.run);
  const synthetic = cell.generation.config.out!;
  await Deno.mkdir(dir, { recursive: true });
  // The cell reads like a `run` folder: its synthetic images are the shared set.
  const link = join(dir, "synthetic");
  if (!existsSync(link)) await Deno.symlink(relative(dir, synthetic), link, { type: "dir" });

  const classifier = checked.classifiers.get(cell.training.id)!;
  const progress = Deno.stderr.isTerminal();
  const stages: StageReport[] = [];
  const data = await app.readTrainData({
    real: plan.base.data!,
    synthetic,
    dataset: plan.base.dataset ?? undefined,
    fewshotSeed: plan.base.fewshotSeed ?? undefined,
    shots: plan.base.shots ?? undefined,
    skipBad: plan.base.skipBad,
    val: plan.val ?? undefined,
    valShots: plan.base.holdout ?? undefined,
  });
  let t0 = performance.now();
  const trained = await app.trainStage(classifier, data, {
    out: join(dir, "train"),
    device: checked.device,
    workers: opts.workers,
    signal: opts.signal,
    progress,
  });
  if (!trained.complete) return null;
  stages.push({ stage: "train", status: "done", seconds: (performance.now() - t0) / 1000 });
  t0 = performance.now();
  const result = await app.evalStage({
    model: join(dir, "train"),
    test: plan.test,
    out: join(dir, app.EVAL_RECORD),
    workers: opts.workers,
    select: (plan.select ?? undefined) as import("../app/classify.ts").SelectRule | undefined,
    perEpoch: plan.perEpoch,
    signal: opts.signal,
    progress,
  });
  stages.push({ stage: "eval", status: "done", seconds: (performance.now() - t0) / 1000 });
  // Written last: a cell is complete when its report exists.
  await experiment.writeRunReport({
    dataset: checked.prepared.get(cell.generation.id)!.dataset,
    test: checked.test.path,
    out: dir,
    sweep: {
      file: plan.file,
      cell: cell.id,
      generation: cell.generation.id,
      training: cell.training.id,
    },
    generation: config,
    classifier,
    device: checked.device,
    stages,
    result,
  });
  if (existsSync(join(dir, FAILED_FILE))) await Deno.remove(join(dir, FAILED_FILE));
  return cellResult(result);
}

/** The table's figures from an evaluation record. */
function cellResult(record: import("../app/classify.ts").EvalRecord): CellResult {
  const epoch = record.selection.epoch;
  const val = record.validation?.epochs.find((e) => e.epoch === epoch)?.top1;
  return {
    val_top1: val ?? null,
    test_top1: record.top1,
    test_top5: record.top5 ?? null,
    mean_per_class: record.meanPerClass ?? null,
  };
}

/** A cell is complete once its report is written (last) beside its evaluation. */
function isComplete(dir: string): boolean {
  return existsSync(join(dir, REPORT_FILE)) && existsSync(join(dir, "eval.json"));
}

/** The finished cells' figures and the recorded failures of the others. */
function collect(plan: SweepPlan): {
  results: Map<string, CellResult>;
  failures: Map<string, string>;
} {
  const results = new Map<string, CellResult>();
  const failures = new Map<string, string>();
  for (const cell of plan.cells) {
    const dir = join(plan.out, cell.run);
    if (isComplete(dir)) {
      const file = join(dir, "eval.json");
      try {
        results.set(cell.id, cellResult(JSON.parse(readFileSync(file, "utf8"))));
      } catch (e) {
        failures.set(cell.id, `${file}: ${(e as Error).message.split("\n")[0]}`);
      }
    } else if (existsSync(join(dir, FAILED_FILE))) {
      let reason = "failed (unreadable record)";
      try {
        reason = String(JSON.parse(readFileSync(join(dir, FAILED_FILE), "utf8")).reason);
      } catch { /* the table still lists the cell as failed */ }
      failures.set(cell.id, reason);
    }
  }
  return { results, failures };
}

/** Writes sweep.json and sweep.csv from every finished cell and prints the table. */
async function finish(plan: SweepPlan, failures: Map<string, string>): Promise<number> {
  const { sweepTable, tableCsv } = await import("../core/sweep.ts");
  const found = collect(plan);
  for (const [id, why] of failures) found.failures.set(id, why);
  const table: SweepTable = sweepTable(plan, found.results, found.failures);
  await Deno.mkdir(plan.out, { recursive: true });
  await writeJsonAtomic(join(plan.out, TABLE_FILE), table);
  await writeAtomic(join(plan.out, CSV_FILE), tableCsv(table));
  console.log(formatTable(table));
  const known = new Set(plan.cells.map((c) => c.id));
  const others = (() => {
    try {
      return [...Deno.readDirSync(join(plan.out, CELLS_DIR))].filter((e) => !known.has(e.name));
    } catch {
      return [];
    }
  })();
  const missing = table.missing.length;
  console.log(
    `\n${table.rows.length} of ${plan.cells.length} cell(s) finished` +
      (missing ? `, ${missing} missing (${table.failed.length} failed)` : "") +
      `; table: ${join(plan.out, TABLE_FILE)}, ${join(plan.out, CSV_FILE)}`,
  );
  for (const f of table.failed) console.log(`failed: ${f.cell}: ${f.reason}`);
  if (others.length) {
    console.log(
      `note: ${others.length} folder(s) in ${join(plan.out, CELLS_DIR)} belong to no cell of ` +
        "this plan (settings since changed); they are left as they are",
    );
  }
  return 0;
}
