/**
 * `dipsy run --slurm`: the experiment as Slurm jobs. The first call checks everything `run`
 * checks, writes one job script per stage into OUT/slurm/ and submits the class similarity, an
 * array for the generation (task i does shard i) and the train + eval job, each depending on
 * the ones before it (afterok). Later calls with the same flags compare Slurm's view of those
 * jobs with the stages' output in OUT, print both, and resubmit what failed (with the stages
 * after it, whose dependencies can then never be met). Which jobs belong to the experiment is
 * kept in OUT/slurm.json.
 *
 * A stage is done when its output is complete on disk, whatever Slurm says: Slurm forgets
 * finished jobs after a few minutes (MinJobAge), and a stage run by hand counts as well.
 */
import { existsSync, readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { UserError } from "../ffi/errors.ts";
import { REPORT_FILE, writeJsonAtomic } from "../core/output.ts";
import { CliError, flagArgs, type Flags, intFlag } from "./command.ts";
import { dipsyArgs } from "./devices.ts";

/** What `--gpus-per-task` and `--array-size` leave out. */
export const SLURM_DEFAULTS = { gpusPerTask: 1, arraySize: 4 };

export const SLURM_TITLE = "Slurm (submit the stages as jobs instead of running them here):";

export const SLURM_FLAGS = {
  slurm: {
    help: "submit the class similarity, an array of generation tasks and the train + eval job " +
      "(afterok), and print their job ids; the same command again prints their state and " +
      "resubmits what failed (OUT/slurm.json)",
  },
  partition: { value: "P", help: "partition for every job" },
  "gpus-per-task": {
    value: "N",
    help: "GPUs for each job (0 asks for none)",
    default: SLURM_DEFAULTS.gpusPerTask,
  },
  "array-size": {
    value: "N",
    help: "generation tasks, one shard of the images each",
    default: SLURM_DEFAULTS.arraySize,
  },
  time: { value: "T", help: "time limit of each job, as sbatch --time (e.g. 4:00:00)" },
  sbatch: {
    value: "FLAG",
    multiple: true,
    help: "any other sbatch option, one per flag (repeatable), e.g. --sbatch=--account=proj " +
      "--sbatch=--cpus-per-task=8",
  },
} as const satisfies Flags;

/** A Slurm command failed, or is not there: printed as one line. */
export class SlurmError extends UserError {}

export const STATE_FILE = "slurm.json";
const STATE_FORMAT = "dipsy-run-slurm";
const STAGE_NAMES = ["similarity", "generate", "train"] as const;
type StageName = (typeof STAGE_NAMES)[number];

/** Runs a Slurm command; returns its stdout, or throws a SlurmError with its message. */
export async function slurmCommand(
  command: string,
  args: readonly string[],
  env?: Record<string, string>,
): Promise<string> {
  let result: Deno.CommandOutput;
  try {
    result = await new Deno.Command(command, { args: [...args], env, stdin: "null" }).output();
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new SlurmError(
        `${command} not found: --slurm needs Slurm's commands on PATH (run it where jobs are ` +
          "submitted, e.g. a login node)",
      );
    }
    throw e;
  }
  const text = new TextDecoder();
  if (!result.success) {
    const message = text.decode(result.stderr).trim().split("\n").filter((l) => l).pop() ??
      `exit code ${result.code}`;
    throw new SlurmError(`${command} ${args.join(" ")}: ${message}`);
  }
  return text.decode(result.stdout);
}

/** One line of `scontrol -o show job`: a job, an array task, or an array's pending tasks. */
export interface JobRecord {
  jobId: string;
  arrayJobId: string | null;
  /** The tasks this line stands for (a pending array's line covers several). */
  tasks: number[];
  state: string;
  reason: string;
  startTime: string;
  endTime: string;
  restarts: number;
}

/** "0-3", "[1,5-6]", "2-7%2" (a throttle), "4" as task ids. */
export function expandTasks(spec: string): number[] {
  const tasks: number[] = [];
  for (const part of spec.replace(/^\[|\]$/g, "").replace(/%\d+$/, "").split(",")) {
    const m = /^(\d+)(?:-(\d+))?(?::(\d+))?$/.exec(part.trim());
    if (!m) continue;
    const from = Number(m[1]), to = Number(m[2] ?? m[1]), step = Number(m[3] ?? 1);
    for (let t = from; t <= to; t += step) tasks.push(t);
  }
  return tasks;
}

/** The records of `scontrol -o show job` output. */
export function parseJobRecords(text: string): JobRecord[] {
  return text.split("\n").filter((l) => /(^|\s)JobId=/.test(l)).map((line) => {
    const field = (key: string) => new RegExp(`(?:^|\\s)${key}=(\\S*)`).exec(line)?.[1] ?? "";
    const arrayJobId = field("ArrayJobId") || null;
    return {
      jobId: field("JobId"),
      arrayJobId,
      tasks: arrayJobId ? expandTasks(field("ArrayTaskId")) : [],
      state: field("JobState"),
      reason: field("Reason"),
      startTime: field("StartTime"),
      endTime: field("EndTime"),
      restarts: Number(field("Restarts") || 0),
    };
  });
}

/** What Slurm knows of a job or array (every task), or [] once it has forgotten the job. */
export async function showJob(id: string, env?: Record<string, string>): Promise<JobRecord[]> {
  try {
    return parseJobRecords(await slurmCommand("scontrol", ["-o", "show", "job", id], env));
  } catch (e) {
    if (e instanceof SlurmError && /invalid job id/i.test(e.message)) return [];
    throw e;
  }
}

const ACTIVE = new Set([
  "PENDING",
  "CONFIGURING",
  "RUNNING",
  "COMPLETING",
  "REQUEUED",
  "REQUEUE_FED",
  "REQUEUE_HOLD",
  "RESIZING",
  "SIGNALING",
  "STAGE_OUT",
  "SUSPENDED",
  "STOPPED",
]);

/** Pending or running, and able to start: a failed dependency never lets a job start. */
function isActive(state: string, reason: string): boolean {
  return ACTIVE.has(state) && reason !== "DependencyNeverSatisfied";
}

function describe(state: string, reason: string): string {
  return reason && reason !== "None" && state === "PENDING" ? `${state} (${reason})` : state;
}

// ---------------------------------------------------------------------------------------------
// Options and state

/** The Slurm flags, checked; `arraySize` stays undefined when not given. */
function slurmOptions(v: Record<string, unknown>) {
  const sbatch = (v.sbatch as string[] | undefined) ?? [];
  for (const flag of sbatch) {
    if (!flag.startsWith("-")) {
      throw new CliError(
        `--sbatch "${flag}": give one sbatch option per --sbatch, e.g. --sbatch=--account=proj`,
      );
    }
  }
  return {
    partition: v.partition as string | undefined,
    gpusPerTask: intFlag(v["gpus-per-task"] as string | undefined, "--gpus-per-task") ??
      SLURM_DEFAULTS.gpusPerTask,
    arraySize: intFlag(v["array-size"] as string | undefined, "--array-size", 1),
    time: v.time as string | undefined,
    sbatch,
  };
}

interface SlurmState {
  format: typeof STATE_FORMAT;
  /** The experiment's flags (every flag but the Slurm ones), in a fixed order. */
  args: string[];
  /** Where the jobs start, so that relative paths mean what they meant here. */
  cwd: string;
  arraySize: number;
  /** Whether the similarity stage has anything to do. */
  similarity: boolean;
  expectedImages: number;
  /** Every submission, oldest first. */
  jobs: { similarity: string[]; generate: { id: string; tasks: number[] }[]; train: string[] };
}

/** The flags that make the experiment, whatever the order they were given in. */
function experimentArgs(v: Record<string, unknown>): string[] {
  const skip = new Set(["help", "stage", ...Object.keys(SLURM_FLAGS)]);
  const sorted = Object.fromEntries(
    Object.entries(v).filter(([k]) => !skip.has(k)).sort(([a], [b]) => a < b ? -1 : 1),
  );
  return flagArgs(sorted as Parameters<typeof flagArgs>[0]);
}

function readState(path: string): SlurmState | null {
  if (!existsSync(path)) return null;
  let state: SlurmState;
  try {
    state = JSON.parse(readFileSync(path, "utf8"));
  } catch (e) {
    throw new CliError(`${path}: unreadable (${e instanceof Error ? e.message : e})`);
  }
  if (state?.format !== STATE_FORMAT) throw new CliError(`${path}: not a dipsy run --slurm file`);
  return state;
}

/** A word for the shell, quoted. */
function shellQuote(s: string): string {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}

/** OUT/slurm/<stage>.sh: `dipsy run <the experiment's flags> --stage <stage>`. */
function stageScript(state: SlurmState, stage: StageName, out: string): string {
  const command = [Deno.execPath(), ...dipsyArgs(["run", ...state.args, `--stage=${stage}`])];
  return [
    "#!/bin/bash",
    `# The ${stage} stage of the experiment in ${out}, submitted by \`dipsy run --slurm\`.`,
    ...(stage === "generate"
      ? [
        "# Each array task does the shard of its task id, out of DIPSY_SHARD_COUNT, also when",
        "# only some tasks are resubmitted.",
      ]
      : []),
    "set -euo pipefail",
    `cd ${shellQuote(state.cwd)}`,
    ...(stage === "generate" ? [`export DIPSY_SHARD_COUNT=${state.arraySize}`] : []),
    `exec ${command.map(shellQuote).join(" ")}`,
    "",
  ].join("\n");
}

// ---------------------------------------------------------------------------------------------
// Survey: each stage from its output and Slurm's records

interface StageStatus {
  phase: "done" | "active" | "failed";
  /** Jobs or tasks still to come, which a later stage waits for. */
  active: string[];
  /** Jobs or tasks that can never start (a dependency failed): cancelled before resubmitting. */
  stuck: string[];
  /** Generation tasks to run again. */
  redo: number[];
  job: string;
  text: string;
}

/** A stage's status; the job lists it leaves out are empty. */
function stageStatus(
  phase: StageStatus["phase"],
  job: string,
  text: string,
  lists: Partial<Pick<StageStatus, "active" | "stuck" | "redo">> = {},
): StageStatus {
  return { phase, active: [], stuck: [], redo: [], job, text, ...lists };
}

async function jobStatus(ids: string[], done: boolean, doneText: string): Promise<StageStatus> {
  const id = ids.at(-1);
  if (done) return stageStatus("done", id ?? "-", doneText);
  if (id === undefined) return stageStatus("failed", "-", "not submitted");
  const [record] = await showJob(id);
  if (!record) return stageStatus("failed", id, "unknown to Slurm; output missing");
  const text = describe(record.state, record.reason);
  if (isActive(record.state, record.reason)) {
    return stageStatus("active", id, text, { active: [id] });
  }
  return stageStatus("failed", id, text, { stuck: ACTIVE.has(record.state) ? [id] : [] });
}

async function generateStatus(state: SlurmState, out: string): Promise<StageStatus> {
  const { finishedImages } = await import("./run.ts");
  const images = await finishedImages(join(out, "synthetic"));
  const total = state.expectedImages;
  const imageText = `${Math.min(images, total)}/${total} images`;
  const last = state.jobs.generate.at(-1);
  const job = last ? `${last.id} (${last.tasks.join(",")})` : "-";
  if (images >= total) return stageStatus("done", job, `done: ${imageText}`);
  if (!last) return stageStatus("failed", job, "not submitted", { redo: allTasks(state) });

  // Each task as its latest submission has it.
  const tasks = new Map<number, { job: string; state: string; reason: string }>();
  for (const sub of state.jobs.generate) {
    for (const t of sub.tasks) tasks.set(t, { job: sub.id, state: "UNKNOWN", reason: "" });
    for (const r of await showJob(sub.id)) {
      for (const t of r.tasks) {
        if (sub.tasks.includes(t)) tasks.set(t, { job: sub.id, state: r.state, reason: r.reason });
      }
    }
  }
  const active: string[] = [], stuck: string[] = [], redo: number[] = [];
  const counts = new Map<string, number>();
  for (const [t, s] of [...tasks].sort(([a], [b]) => a - b)) {
    const label = describe(s.state, s.reason);
    counts.set(label, (counts.get(label) ?? 0) + 1);
    if (isActive(s.state, s.reason)) active.push(`${s.job}_${t}`);
    else if (s.state !== "COMPLETED") {
      redo.push(t);
      if (ACTIVE.has(s.state)) stuck.push(`${s.job}_${t}`);
    }
  }
  // Every task succeeded and images are still missing (removed since?): all of them again.
  if (!active.length && !redo.length) redo.push(...allTasks(state));
  const summary = [...counts].map(([label, n]) => `${n} ${label}`).join(", ");
  const text = `${summary}; ${imageText}`;
  return stageStatus(redo.length ? "failed" : "active", job, text, { active, stuck, redo });
}

function allTasks(state: SlurmState): number[] {
  return Array.from({ length: state.arraySize }, (_, i) => i);
}

// ---------------------------------------------------------------------------------------------
// The command

/**
 * `dipsy run --slurm`: submits the experiment's stages, or reports on them and resubmits what
 * failed. `check` runs every check `run` makes (on the first call only: later calls must not
 * wait for model files to be looked up just to print a state).
 */
export async function submitExperiment(
  values: Record<string, unknown>,
  check: () => Promise<{
    usesSimilarity: boolean;
    expectedImages: number;
    config: { similarity: string | null };
  }>,
): Promise<number> {
  const opts = slurmOptions(values);
  await slurmCommand("sbatch", ["--version"]);
  const out = resolve(values.out as string);
  const statePath = join(out, STATE_FILE);
  const args = experimentArgs(values);
  let state = readState(statePath);
  const fresh = state === null;
  if (state) {
    if (state.args.join("\n") !== args.join("\n")) {
      const differs = [...args.filter((a) => !state!.args.includes(a))].concat(
        state.args.filter((a) => !args.includes(a)).map((a) => `(no ${a.split("=")[0]})`),
      );
      throw new CliError(
        `${statePath}: the experiment was submitted with other flags (${differs.join(" ")}); ` +
          "give the same flags, or another --out",
      );
    }
    if (opts.arraySize !== undefined && opts.arraySize !== state.arraySize) {
      throw new CliError(
        `--array-size ${opts.arraySize}: the experiment in ${out} was submitted as ` +
          `${state.arraySize} shards, which cannot change while it runs`,
      );
    }
  } else {
    const checked = await check();
    state = {
      format: STATE_FORMAT,
      args,
      cwd: Deno.cwd(),
      arraySize: opts.arraySize ?? SLURM_DEFAULTS.arraySize,
      similarity: checked.usesSimilarity && !checked.config.similarity,
      expectedImages: checked.expectedImages,
      jobs: { similarity: [], generate: [], train: [] },
    };
    await Deno.mkdir(join(out, "slurm", "logs"), { recursive: true });
    for (const stage of STAGE_NAMES) {
      await Deno.writeTextFile(join(out, "slurm", `${stage}.sh`), stageScript(state, stage, out), {
        mode: 0o755,
      });
    }
  }
  const st: SlurmState = state;

  const similarity = !st.similarity ? stageStatus("done", "-", "not needed") : await jobStatus(
    st.jobs.similarity,
    existsSync(join(out, "similarity.json")),
    "done: similarity.json",
  );
  const generate = await generateStatus(st, out);
  const train = await jobStatus(
    st.jobs.train,
    existsSync(join(out, REPORT_FILE)),
    `done: ${REPORT_FILE}`,
  );
  const statuses: [string, StageStatus][] = [
    ["similarity", similarity],
    ["generate", generate],
    ["train+eval", train],
  ];
  if (!fresh) {
    console.log("stage       job            state");
    for (const [name, s] of statuses) {
      console.log(`${name.padEnd(10)}  ${s.job.padEnd(13)}  ${s.text}`);
    }
  }

  const submit = async (stage: StageName, deps: string[], array?: number[]) => {
    const sbatch = [
      "--parsable",
      `--job-name=dipsy-${stage}`,
      `--output=${join(out, "slurm", "logs", array ? `${stage}-%A_%a.log` : `${stage}-%j.log`)}`,
      "--requeue",
      "--open-mode=append",
      `--chdir=${st.cwd}`,
      ...(opts.partition ? [`--partition=${opts.partition}`] : []),
      ...(opts.time ? [`--time=${opts.time}`] : []),
      ...(opts.gpusPerTask > 0 ? ["--ntasks=1", `--gpus-per-task=${opts.gpusPerTask}`] : []),
      ...(deps.length ? [`--dependency=afterok:${deps.join(":")}`] : []),
      ...(array ? [`--array=${array.join(",")}`] : []),
      ...opts.sbatch,
      join(out, "slurm", `${stage}.sh`),
    ];
    const id = (await slurmCommand("sbatch", sbatch)).trim().split(";")[0];
    if (!/^\d+$/.test(id)) throw new SlurmError(`sbatch printed "${id}" instead of a job id`);
    if (array) st.jobs.generate.push({ id, tasks: array });
    else st.jobs[stage as "similarity" | "train"].push(id);
    await writeJsonAtomic(statePath, st);
    return id;
  };
  const cancel = async (ids: string[]) => {
    if (ids.length) await slurmCommand("scancel", ids);
  };

  // Resubmitting a stage leaves the later stages waiting on a job that failed: they go too.
  const actions: string[] = [];
  let changed = false;
  let simDeps = similarity.active;
  if (similarity.phase === "failed") {
    await cancel(similarity.stuck);
    simDeps = [await submit("similarity", [])];
    actions.push(`similarity as job ${simDeps[0]}`);
    changed = true;
  }
  let genDeps = generate.active;
  if (generate.phase !== "done" && (generate.phase === "failed" || changed)) {
    const redo = changed ? allTasks(st).filter((t) => !isFinished(generate, t)) : generate.redo;
    await cancel(changed ? [...generate.active, ...generate.stuck] : generate.stuck);
    const keep = changed ? [] : generate.active;
    const id = await submit("generate", simDeps, redo);
    genDeps = [id, ...keep];
    actions.push(`generate tasks ${redo.join(",")} as job ${id}`);
    changed = true;
  }
  if (train.phase === "failed" || (train.phase === "active" && changed)) {
    await cancel([...train.active, ...train.stuck]);
    const deps = [...simDeps, ...genDeps];
    const id = await submit("train", deps);
    actions.push(`train+eval as job ${id}` + (deps.length ? ` (after ${deps.join(", ")})` : ""));
  }

  if (fresh && actions.length) {
    const array = st.jobs.generate.at(-1);
    const jobs = [
      st.jobs.similarity.at(-1),
      array && `${array.id} (array ${array.tasks.join(",")})`,
      st.jobs.train.at(-1),
    ];
    console.log(`submitted; the jobs are listed in ${statePath}:`);
    statuses.forEach(([name, s], i) => {
      console.log(`  ${name.padEnd(10)}  ${s.phase === "done" ? s.text : `job ${jobs[i]}`}`);
    });
    console.log("Run the same command again for their state, or to resubmit what failed.");
  } else if (actions.length) {
    console.log(`resubmitted: ${actions.join("; ")}`);
  } else if (train.phase === "done") {
    console.log(`every stage is done: ${join(out, REPORT_FILE)}`);
  } else {
    console.log("nothing failed; run the same command again later");
  }
  return 0;
}

/** Whether a generation task is neither running nor to be redone (it succeeded). */
function isFinished(status: StageStatus, task: number): boolean {
  return !status.redo.includes(task) && !status.active.some((a) => a.endsWith(`_${task}`));
}
