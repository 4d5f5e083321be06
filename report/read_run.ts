/**
 * Reading what dipsy wrote into a folder, for the report: which kind of output it is, and its
 * records. A record that is missing or unreadable is not an error here: it becomes one line in
 * `problems`, and the report shows whatever else is there.
 */
import { existsSync, readdirSync, statSync } from "node:fs";
import { join, relative } from "node:path";
import { UserError } from "../ffi/errors.ts";
import {
  MANIFEST,
  type ManifestEntry,
  readManifest,
  RUN_RECORD,
  type RunRecord,
  SIMILARITY_FILE,
} from "../core/output.ts";
import type { TrainRecord } from "../plugins/classifiers/trainer.ts";
import { readStepHistory, type StepRecord } from "../plugins/classifiers/steps.ts";
import {
  type EvalRecord,
  type PredictionLine,
  predictionsFileFor,
  type ValidationRecord,
} from "../app/classify.ts";

/** The kinds of dipsy output a report is made of. */
export type ReportKind = "generate" | "train" | "run" | "sweep";

/** PATH holds none of the records dipsy writes. */
export class NotDipsyOutputError extends UserError {}

export const SWEEP_RECORD = "sweep.json";
export const EXPERIMENT_RECORD = "report.json";
export const TRAIN_RECORD_FILE = "train.json";

/** Collects the problems of one report, each named by its path relative to the report. */
export class Problems {
  readonly lines: string[] = [];
  constructor(readonly base: string) {}
  /** `file` relative to the report folder. */
  rel(file: string): string {
    return relative(this.base, file).replaceAll("\\", "/") || ".";
  }
  add(file: string, what: string): void {
    this.lines.push(`${this.rel(file)}: ${what}`);
  }
}

const isFile = (p: string) => existsSync(p) && statSync(p).isFile();

/**
 * Where an experiment keeps its generated set and its classifier run: `dipsy run`'s folders, and
 * `dipsy demo`'s, which is the same experiment under other names.
 */
export const EXPERIMENT_LAYOUTS = [
  { synthetic: "synthetic", train: "train" },
  { synthetic: "images", train: "classifier" },
] as const;

/** The layout of the experiment in `dir`, or null when it is not one. */
export function experimentLayout(dir: string): (typeof EXPERIMENT_LAYOUTS)[number] | null {
  const [run, demo] = EXPERIMENT_LAYOUTS;
  if (
    isFile(join(dir, EXPERIMENT_RECORD)) || isFile(join(dir, run.synthetic, RUN_RECORD)) ||
    isFile(join(dir, run.train, TRAIN_RECORD_FILE))
  ) return run;
  if (
    isFile(join(dir, demo.synthetic, RUN_RECORD)) &&
    isFile(join(dir, demo.train, TRAIN_RECORD_FILE))
  ) {
    return demo;
  }
  return null;
}

/** What kind of output `dir` is; a folder that is none of them is a one-line error. */
export function detectKind(dir: string): ReportKind {
  if (!existsSync(dir)) throw new NotDipsyOutputError(`${dir}: no such folder`);
  if (!statSync(dir).isDirectory()) {
    throw new NotDipsyOutputError(
      `${dir}: not a folder (give the output folder of a dipsy command)`,
    );
  }
  if (isFile(join(dir, SWEEP_RECORD))) return "sweep";
  if (experimentLayout(dir)) return "run";
  if (isFile(join(dir, TRAIN_RECORD_FILE))) return "train";
  if (isFile(join(dir, RUN_RECORD)) || isFile(join(dir, MANIFEST))) return "generate";
  throw new NotDipsyOutputError(
    `${dir}: not a dipsy output folder (no ${RUN_RECORD}, ${TRAIN_RECORD_FILE}, ` +
      `${EXPERIMENT_RECORD} or ${SWEEP_RECORD})`,
  );
}

/** A JSON record, or null with a problem when it is missing (if `required`) or unreadable. */
export function readJson<T>(
  file: string,
  problems: Problems,
  opts: { required?: boolean; format?: string } = {},
): T | null {
  let text: string;
  try {
    text = Deno.readTextFileSync(file);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      if (opts.required) problems.add(file, "missing");
    } else problems.add(file, `unreadable (${(e as Error).message})`);
    return null;
  }
  try {
    const value = JSON.parse(text);
    if (value === null || typeof value !== "object") throw new Error("not a JSON object");
    if (opts.format !== undefined && value.format !== opts.format) {
      throw new Error(`format ${JSON.stringify(value.format)}, expected "${opts.format}"`);
    }
    return value as T;
  } catch (e) {
    problems.add(file, `corrupt record (${(e as Error).message})`);
    return null;
  }
}

// ---------------------------------------------------------------------------------------------
// A `generate` output

export interface SimilarityData {
  file: string;
  classNames: string[];
  matrix: number[][];
  meta: Record<string, unknown>;
}

export interface GenerateData {
  dir: string;
  record: RunRecord | null;
  /** Class names in the run's order (run.json, else the manifest's class indices). */
  classes: string[];
  /** Manifest entries by class, in index order. */
  entries: ManifestEntry[][];
  similarity: SimilarityData | null;
  /** Image files in class folders that the manifest does not list. */
  unlisted: string[];
}

export function readSimilarityRecord(file: string, problems: Problems): SimilarityData | null {
  const raw = readJson<{ classNames?: unknown; similarity?: unknown; meta?: unknown }>(
    file,
    problems,
    { format: "dipsy-class-similarity" },
  );
  if (!raw) return null;
  const names = raw.classNames, matrix = raw.similarity;
  const square = Array.isArray(names) && Array.isArray(matrix) &&
    matrix.length === names.length &&
    matrix.every((r) =>
      Array.isArray(r) && r.length === names.length && r.every((v) => Number.isFinite(v))
    );
  if (!square) {
    problems.add(file, "corrupt record (not a square matrix with one row per class)");
    return null;
  }
  return {
    file,
    classNames: names as string[],
    matrix: matrix as number[][],
    meta: (raw.meta ?? {}) as Record<string, unknown>,
  };
}

export async function readGenerate(dir: string, problems: Problems): Promise<GenerateData> {
  const record = readJson<RunRecord>(join(dir, RUN_RECORD), problems, {
    required: true,
    format: "dipsy-generate-run",
  });
  const manifestFile = join(dir, MANIFEST);
  if (!isFile(manifestFile)) problems.add(manifestFile, "missing (no image is listed)");
  const { entries, badLines } = await readManifest(dir);
  if (badLines.length) {
    problems.add(
      manifestFile,
      `${badLines.length} unreadable line(s): ${badLines.slice(0, 10).join(", ")}` +
        (badLines.length > 10 ? ", ..." : ""),
    );
  }
  const all = [...entries.values()].map((e) => e.entry);
  let classes = record?.dataset?.classes?.map((c) => c.name) ?? [];
  if (!classes.length) {
    const byIndex = new Map<number, string>();
    for (const e of all) byIndex.set(e.classIndex, e.class);
    classes = [...byIndex].sort((a, b) => a[0] - b[0]).map(([, name]) => name);
  }
  const index = new Map(classes.map((c, i) => [c, i]));
  const perClass = classes.map(() => [] as ManifestEntry[]);
  for (const e of all) {
    const k = index.get(e.class);
    if (k === undefined) problems.add(join(dir, e.file), `class "${e.class}" is not in run.json`);
    else perClass[k].push(e);
  }
  for (const list of perClass) list.sort((a, b) => a.index - b.index);

  const listed = new Set(all.map((e) => e.file));
  const unlisted: string[] = [];
  for (const c of record?.dataset?.classes ?? []) {
    const folder = join(dir, c.folder);
    if (!existsSync(folder)) continue;
    for (const name of readdirSync(folder).sort()) {
      const file = `${c.folder}/${name}`;
      if (/\.jpe?g$/i.test(name) && !name.startsWith(".") && !listed.has(file)) {
        unlisted.push(file);
      }
    }
  }
  for (const f of unlisted) problems.add(join(dir, f), "not listed in manifest.jsonl");

  const simFile = join(dir, SIMILARITY_FILE);
  const similarity = existsSync(simFile) ? readSimilarityRecord(simFile, problems) : null;
  return { dir, record, classes, entries: perClass, similarity, unlisted };
}

/**
 * The class root the manifest's reference files are relative to: the first candidate that
 * holds the run's shots: the caller's, then what recorded it (the experiment record, run.json,
 * the similarity file); a recorded folder may have moved since.
 */
export function findShotsRoot(
  data: GenerateData,
  candidates: readonly (string | undefined | null)[],
): string | null {
  const first = data.entries.flat().find((e) => e.positive)?.positive?.file;
  for (const c of candidates) {
    if (!c) continue;
    if (first ? isFile(join(c, first)) : existsSync(c)) return c;
  }
  return null;
}

// ---------------------------------------------------------------------------------------------
// A `train` (and `eval`) run

export interface TrainData {
  dir: string;
  record: TrainRecord | null;
  validation: ValidationRecord | null;
  /** The per-step history (empty for a run trained before it was kept). */
  steps: StepRecord[];
  /** eval.json and eval-<test>.json, by file name. */
  evals: EvalData[];
}

/** An eval record and, when they are there and its own, its per-image predictions. */
export interface EvalData {
  file: string;
  record: EvalRecord;
  predictions: PredictionLine[] | null;
}

export function readTrain(dir: string, problems: Problems): TrainData {
  const record = readJson<TrainRecord>(join(dir, TRAIN_RECORD_FILE), problems, {
    required: true,
    format: "dipsy-train-run",
  });
  const validation = readJson<ValidationRecord>(join(dir, "validation.json"), problems, {
    format: "dipsy-validation",
  });
  const evals = readEvals(dir, problems);
  let steps: StepRecord[] = [];
  try {
    steps = readStepHistory(dir);
  } catch (e) {
    problems.add(join(dir, "steps.jsonl"), `unreadable (${(e as Error).message})`);
  }
  return { dir, record, validation, steps, evals };
}

/** The eval records of a folder (eval.json first). */
export function readEvals(dir: string, problems: Problems): TrainData["evals"] {
  const names = existsSync(dir)
    ? readdirSync(dir).filter((n) => /^eval(-.+)?\.json$/.test(n)).sort((a, b) =>
      a === "eval.json" ? -1 : b === "eval.json" ? 1 : a < b ? -1 : 1
    )
    : [];
  const out: TrainData["evals"] = [];
  for (const name of names) {
    const record = readJson<EvalRecord>(join(dir, name), problems);
    if (!record) continue;
    if (!Array.isArray(record.confusion) || !Array.isArray(record.perClass)) {
      problems.add(join(dir, name), "corrupt record (no confusion matrix or per-class results)");
      continue;
    }
    out.push({
      file: name,
      record,
      predictions: readPredictions(join(dir, name), record, problems),
    });
  }
  return out;
}

/**
 * The predictions beside an eval record, or null: missing (an evaluation made before they were
 * kept), unreadable, or not adding up to the record's confusion matrix (left from another
 * evaluation), each but the first with a problem.
 */
export function readPredictions(
  evalFile: string,
  record: EvalRecord,
  problems: Problems,
): PredictionLine[] | null {
  const file = predictionsFileFor(evalFile);
  let text: string;
  try {
    text = Deno.readTextFileSync(file);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) {
      problems.add(file, `unreadable (${(e as Error).message})`);
    }
    return null;
  }
  const names = record.perClass.map((c) => c.class);
  const index = new Map(names.map((c, i) => [c, i]));
  const tally = names.map(() => names.map(() => 0));
  const lines: PredictionLine[] = [];
  for (const [i, line] of text.split("\n").entries()) {
    if (!line.trim()) continue;
    let p: PredictionLine;
    try {
      p = JSON.parse(line);
    } catch {
      problems.add(file, `line ${i + 1} is not JSON: the misclassified images are not shown`);
      return null;
    }
    const from = index.get(p?.label), to = index.get(p?.predicted);
    if (typeof p?.file !== "string" || from === undefined || to === undefined) {
      problems.add(file, `line ${i + 1} is not a prediction of the record's classes`);
      return null;
    }
    tally[from][to]++;
    lines.push(p);
  }
  if (JSON.stringify(tally) !== JSON.stringify(record.confusion)) {
    problems.add(
      file,
      "does not add up to the confusion matrix of its eval record (left from another " +
        "evaluation?): the misclassified images are not shown",
    );
    return null;
  }
  return lines;
}

// ---------------------------------------------------------------------------------------------
// A `run` experiment

/** What `dipsy run` writes as report.json. */
export interface ExperimentRecord {
  format: "dipsy-run-report";
  data: string;
  test: string;
  out: string;
  classes: number;
  shotsPerClass: number[];
  generation: Record<string, unknown>;
  classifier: Record<string, unknown>;
  device: string;
  stages: { stage: string; status: string; seconds: number; output?: string }[];
  accuracy: { top1: number; top5: number; meanPerClass: number; total: number };
  selection: Record<string, unknown>;
  provenance?: Record<string, unknown>;
}

// ---------------------------------------------------------------------------------------------
// A sweep

export interface SweepRow {
  rank: number;
  cell: string;
  run: string;
  settings: Record<string, unknown>;
  val_top1: number | null;
  test_top1: number | null;
  test_top5: number | null;
  mean_per_class: number | null;
}

export interface SweepRecord {
  sweep: string;
  metric: string;
  swept: string[];
  rows: SweepRow[];
  missing: string[];
  /** Cells whose last attempt failed, with the reason. */
  failed: { cell: string; reason: string }[];
}

export function readSweep(dir: string, problems: Problems): SweepRecord | null {
  const file = join(dir, SWEEP_RECORD);
  const raw = readJson<Partial<SweepRecord>>(file, problems, { required: true });
  if (!raw) return null;
  if (!Array.isArray(raw.rows) || !Array.isArray(raw.swept)) {
    problems.add(file, "corrupt record (no rows or swept settings)");
    return null;
  }
  const rows = raw.rows.filter((r, i) => {
    const ok = r && typeof r === "object" && typeof r.cell === "string" &&
      r.settings !== null && typeof r.settings === "object";
    if (!ok) problems.add(file, `row ${i + 1} is malformed`);
    return ok;
  });
  return {
    sweep: String(raw.sweep ?? ""),
    metric: String(raw.metric ?? ""),
    swept: raw.swept.map(String),
    rows,
    missing: Array.isArray(raw.missing) ? raw.missing.map(String) : [],
    failed: Array.isArray(raw.failed)
      ? raw.failed.filter((f) => f && typeof f.cell === "string")
        .map((f) => ({ cell: f.cell, reason: String(f.reason ?? "") }))
      : [],
  };
}
