/**
 * The output folder of the dataset job: file names, the manifest (one JSON line per image), the
 * run record (run.json: what decides the images' contents, so that a resumed or sharded run can
 * be checked against it) and atomic writes.
 */
import { basename, dirname, join, relative } from "node:path";
import { UserError } from "../ffi/errors.ts";
import type { AugmentParams } from "./plugins.ts";
import type { Provenance } from "./provenance.ts";

export const MANIFEST = "manifest.jsonl";
export const RUN_RECORD = "run.json";
export const SIMILARITY_FILE = "similarity.json";
/** An experiment's record (`dipsy run`, a sweep cell): configuration, stage timings, accuracy. */
export const REPORT_FILE = "report.json";
/** The `format` of run.json. */
export const RECORD_FORMAT = "dipsy-generate-run";
/** The `version` of run.json's layout. */
export const RECORD_VERSION = 1;

/** A problem with the job's input, options or output folder: the user's to fix. */
export class RunError extends UserError {}

/** `<index>.jpg`, zero-padded to 4 digits so that file listings sort in index order. */
export function imageFileName(index: number): string {
  return `${String(index).padStart(4, "0")}.jpg`;
}

// ---------------------------------------------------------------------------------------------
// Manifest

/** A reference image of a manifest line: which shot, and how it was augmented. */
export interface ShotRecord {
  /** Its class name. */
  class: string;
  /** Path relative to the dataset's class root. */
  file: string;
  /** Its index among the class's shots. */
  shot: number;
  /** The flip, crop (x, y, side) and rotation applied to it; null: used as it is. */
  augment: AugmentParams | null;
}

/** One manifest line. */
export interface ManifestEntry {
  /** The target class's name. */
  class: string;
  /** Its index in the dataset's class order. */
  classIndex: number;
  /** The image's index within its class. */
  index: number;
  /** The image, relative to the output folder. */
  file: string;
  /** Seed of the initial noise. */
  seed: number;
  /** The run seed it derives from. */
  runSeed: number;
  /** The text prompt. */
  prompt: string;
  /** The positive reference image; null for text-only guidance. */
  positive: ShotRecord | null;
  /** The negative reference image; null without negative guidance. */
  negative: ShotRecord | null;
  /** The pair plugin and its options. */
  pairs: { name: string; [option: string]: unknown };
  /** The sampler, its steps and the options given. */
  sampler: { name: string; steps: number; [option: string]: unknown };
  /** The guidance plugin and its options. */
  guidance: { name: string; [option: string]: unknown };
  /** Image width in pixels. */
  width: number;
  /** Image height in pixels. */
  height: number;
  /** Model identifiers (portable: Hub ids, not local paths). */
  models: Record<string, string>;
}

export interface ManifestContents {
  /** The last line per image file (a line may repeat after a manual repair; the last wins). */
  entries: Map<string, { entry: ManifestEntry; line: string }>;
  /** Lines that are not valid JSON (e.g. cut by a crash), with their 1-based line numbers. */
  badLines: number[];
}

/** Reads `<out>/manifest.jsonl`; a missing file is an empty manifest. */
export async function readManifest(
  out: string,
  keep?: (file: string) => boolean,
): Promise<ManifestContents> {
  const entries = new Map<string, { entry: ManifestEntry; line: string }>();
  const badLines: number[] = [];
  let text = "";
  try {
    text = await Deno.readTextFile(join(out, MANIFEST));
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  const lines = text.split("\n");
  // A last line without its newline is being written by another shard, or was cut by a crash.
  if (!text.endsWith("\n")) lines.pop();
  lines.forEach((line, i) => {
    if (!line.trim()) return;
    try {
      const entry = JSON.parse(line) as ManifestEntry;
      if (typeof entry?.file !== "string") throw new Error("no file");
      if (!keep || keep(entry.file)) entries.set(entry.file, { entry, line });
    } catch {
      badLines.push(i + 1);
    }
  });
  return { entries, badLines };
}

/** Appends one line in a single O_APPEND write, so concurrent writers never interleave. */
export async function appendLine(path: string, line: string): Promise<void> {
  const bytes = new TextEncoder().encode(`${line}\n`);
  using f = await Deno.open(path, { append: true, create: true });
  const n = await f.write(bytes);
  // Regular files take a short write only when the disk is full.
  if (n !== bytes.length) {
    throw new Error(`${path}: wrote ${n} of ${bytes.length} bytes of a manifest line (disk full?)`);
  }
}

// ---------------------------------------------------------------------------------------------
// Run record

/** One IP-Adapter slot of a run: the reference image it conditions, its file and its scale. */
export interface AdapterRecord {
  /** The reference image the slot conditions. */
  image: "positive" | "negative";
  /** As the configuration names it (a Hub path stays portable across machines). */
  file: string;
  /** The scale (lambda) it runs at wherever its image is on. */
  scale: number;
}

/** What run.json holds: everything that decides the images' contents. */
export interface RunRecord {
  /** Always RECORD_FORMAT. */
  format: typeof RECORD_FORMAT;
  /** The record layout's version. */
  version: typeof RECORD_VERSION;
  /** Must match for a run to be resumed or extended. */
  output: Record<string, unknown>;
  /** The classes and shots (file, width, height) the pairs are drawn from; must match. */
  dataset: { classes: { name: string; folder: string; shots: string[] }[] };
  /** May change between sessions (with a note). */
  settings: { batch: number; perClass: number; device: string; clip: string | null };
  /**
   * The adapter slots as used, for readers; never compared, as they follow from `output.models`
   * and `output.guidance`, which are (so a run made before they were recorded still resumes).
   */
  adapters?: AdapterRecord[];
  /**
   * The few-shot class root (absolute) that the shots and the manifest's reference files are
   * relative to, as the session that created run.json found it; never compared, so a moved
   * dataset still resumes.
   */
  data?: string;
  /** Who made the run (of the session that created run.json); never compared. */
  provenance?: Provenance;
}

export class IncompatibleRunError extends RunError {
  constructor(readonly out: string, readonly differences: string[]) {
    super(
      `${out} holds a run with another configuration; resuming into it would mix ` +
        `different images:\n${differences.map((d) => `  - ${d}`).join("\n")}\n` +
        "Use a new --out folder, or the previous settings (see its run.json).",
    );
  }
}

function flatten(value: unknown, prefix: string, out: Map<string, string>): void {
  if (value !== null && typeof value === "object" && !Array.isArray(value)) {
    for (const [k, v] of Object.entries(value)) flatten(v, prefix ? `${prefix}.${k}` : k, out);
  } else {
    out.set(prefix, JSON.stringify(value));
  }
}

/** Differences that change images (errors) and settings that changed harmlessly (notes). */
export function compareRecords(
  previous: RunRecord,
  current: RunRecord,
): { differences: string[]; notes: string[] } {
  const differences: string[] = [];
  const a = new Map<string, string>(), b = new Map<string, string>();
  flatten(previous.output, "", a);
  flatten(current.output, "", b);
  for (const key of [...new Set([...a.keys(), ...b.keys()])].sort()) {
    const x = a.get(key) ?? "(unset)", y = b.get(key) ?? "(unset)";
    if (x !== y) differences.push(`${key}: ${x} (run.json) vs ${y} (now)`);
  }
  const before = previous.dataset?.classes ?? [];
  const now = current.dataset.classes;
  const had = before.map((c) => c.name), has = now.map((c) => c.name);
  if (had.join("\u0000") !== has.join("\u0000")) {
    const gone = had.filter((c) => !has.includes(c)), added = has.filter((c) => !had.includes(c));
    differences.push(
      "dataset classes differ" + (gone.length ? `; missing now: ${gone.join(", ")}` : "") +
        (added.length ? `; new: ${added.join(", ")}` : "") +
        (!gone.length && !added.length ? " in order" : ""),
    );
  } else {
    now.forEach((c, i) => {
      if (before[i].shots.join("\n") !== c.shots.join("\n")) {
        differences.push(`dataset: the shots of class "${c.name}" differ (files or sizes)`);
      }
    });
  }
  const s0: Partial<RunRecord["settings"]> = previous.settings ?? {}, s1 = current.settings;
  const batchNote = ": images not yet made come from other batch compositions and may differ " +
    "in floating-point rounding from an uninterrupted run";
  const notes = (["perClass", "batch", "device"] as const).filter((k) => s0[k] !== s1[k])
    .map((k) => `${k} ${s0[k]} -> ${s1[k]}${k === "batch" ? batchNote : ""}`);
  return { differences, notes };
}

function isTemp(name: string): boolean {
  return name.startsWith(".") && name.endsWith(".tmp");
}

export function listOrNull(dir: string): Deno.DirEntry[] | null {
  try {
    return [...Deno.readDirSync(dir)];
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    throw e;
  }
}

function isInside(child: string, parent: string): boolean {
  const rel = relative(parent, child);
  return rel === "" || (!rel.startsWith("..") && !rel.startsWith("/"));
}

/**
 * A fresh hidden name beside `path` ending in .tmp: output-folder checks and dataset readers pass
 * over a leftover one.
 */
function tempPath(path: string): string {
  return join(dirname(path), `.${basename(path)}.${crypto.randomUUID().slice(0, 8)}.tmp`);
}

/**
 * Writes `path` (bytes, text, or what `data` writes to the temporary file) through a temporary
 * file and a rename, so readers never see part of it. `tmp` is fresh unless a file's one writer
 * names a fixed one, which the next write overwrites should a kill leave it behind.
 */
export async function writeAtomic(
  path: string,
  data: Uint8Array | string | ((tmp: string) => Promise<void>),
  tmp = tempPath(path),
): Promise<void> {
  try {
    if (typeof data === "function") await data(tmp);
    else if (typeof data === "string") await Deno.writeTextFile(tmp, data);
    else await Deno.writeFile(tmp, data);
    await Deno.rename(tmp, path);
  } catch (e) {
    await Deno.remove(tmp).catch(() => {});
    throw e;
  }
}

/** `value` as indented JSON with a final newline, written as writeAtomic does. */
export function writeJsonAtomic(path: string, value: unknown, tmp?: string): Promise<void> {
  return writeAtomic(path, `${JSON.stringify(value, null, 2)}\n`, tmp);
}

async function readRecord(path: string): Promise<RunRecord | null> {
  try {
    return JSON.parse(await Deno.readTextFile(path)) as RunRecord;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    throw new RunError(`${path}: unreadable run record (${e instanceof Error ? e.message : e})`);
  }
}

/** Brings an older run.json to the current layout before it is compared (defaults filled in). */
export type UpgradeRecord = (previous: RunRecord) => RunRecord;

function compareWith(
  out: string,
  previous: RunRecord,
  record: RunRecord,
  upgrade: UpgradeRecord = (r) => r,
): string[] {
  if (previous.format !== RECORD_FORMAT) {
    throw new RunError(`${join(out, RUN_RECORD)}: not a dipsy generate run record`);
  }
  const { differences, notes } = compareRecords(upgrade(previous), record);
  if (differences.length) throw new IncompatibleRunError(out, differences);
  return notes;
}

/**
 * Checks `record` against the run.json in `out`, if there is one, without writing anything:
 * an incompatible folder is refused before a model loads. Returns the notes.
 */
export async function checkRecord(
  out: string,
  record: RunRecord,
  upgrade?: UpgradeRecord,
): Promise<string[]> {
  const previous = await readRecord(join(out, RUN_RECORD));
  return previous ? compareWith(out, previous, record, upgrade) : [];
}

/** Creates run.json, or checks the one there; safe when several shards start at once. */
export async function claimRecord(
  out: string,
  record: RunRecord,
  upgrade?: UpgradeRecord,
): Promise<{ created: boolean; notes: string[] }> {
  const path = join(out, RUN_RECORD);
  const text = `${JSON.stringify(record, null, 2)}\n`;
  let previous = await readRecord(path);
  if (!previous) {
    const tmp = tempPath(path);
    await Deno.writeTextFile(tmp, text);
    try {
      // A hard link fails when the file exists: the first shard to get here wins, the others
      // compare with what it wrote.
      await Deno.link(tmp, path);
      return { created: true, notes: [] };
    } catch (e) {
      if (!(e instanceof Deno.errors.AlreadyExists)) {
        // Filesystems without hard links: rename (last writer wins; shards write the same).
        await Deno.rename(tmp, path);
        return { created: true, notes: [] };
      }
      previous = await readRecord(path);
      if (!previous) throw new RunError(`${path}: vanished while this run claimed it`);
    } finally {
      await Deno.remove(tmp).catch(() => {});
    }
  }
  return { created: false, notes: compareWith(out, previous, record, upgrade) };
}

/**
 * Refuses an output folder inside the data or one that holds anything but an earlier run (read
 * only: nothing is created).
 */
export function checkOutputFolder(out: string, dataRoot: string): "missing" | "usable" {
  if (isInside(out, dataRoot)) {
    throw new RunError(
      `the output folder ${out} is inside the few-shot data ${dataRoot}: generated images ` +
        "would be read as classes; choose an output folder outside it",
    );
  }
  const entries = listOrNull(out);
  if (entries === null) return "missing";
  const visible = entries.filter((e) => !isTemp(e.name));
  if (visible.length && !visible.some((e) => e.name === RUN_RECORD)) {
    throw new RunError(
      `${out} is not empty and holds no ${RUN_RECORD}, so it is not a dipsy output folder; ` +
        "nothing was written. Choose a new or empty --out folder.",
    );
  }
  return "usable";
}
