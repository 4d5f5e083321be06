/**
 * Few-shot input: finding the class folders, naming the classes, and checking every image before
 * any generation starts, so that a bad file fails the run in seconds rather than hours in.
 *
 * Layouts:
 * - `root/<class folder>/*.{jpg,jpeg,png,webp,bmp}` (extensions in any case);
 * - the DataDream / DIPSY layout `<data>/<dataset>/real_train_fewshot/<seed>/<class folder>/`.
 *   Any of `<data>`, `<data>/<dataset>`, `.../real_train_fewshot` or the seed folder itself may be
 *   given; the `dataset` and `fewshotSeed` options choose where there are several.
 *
 * Class order: folders sorted by name in Unicode code point order, which is Python's
 * `sorted(os.listdir(...))`, the order of the official DIPSY code; a class index is the position
 * in that list. Images within a class are sorted the same way; a shot index is the position there.
 * Hidden entries (names starting with ".", plus Thumbs.db and desktop.ini) are ignored silently.
 *
 * Class names are the folder names verbatim, except where a mapping renames them:
 * - `classnames.json` in the class root (for the DataDream layout, also looked for in
 *   `<data>/<dataset>/`), a JSON object from folder name to class name, e.g.
 *   `{ "F-A-18": "F/A-18" }`, for names that cannot be folder names; an entry for a folder that
 *   does not exist is an error (it is usually a typo);
 * - for the ten benchmarks (the `dataset` option, or the DataDream `<dataset>` folder), the
 *   shipped class list (core/benchmarks.ts): `n01440764` is "tench", `american_bulldog` is
 *   "American Bulldog". A folder the benchmark does not know keeps its name, with a warning.
 * The mapping file wins over the benchmark's list.
 *
 * Shots: `shots` takes the first k images of each class by the rank in their file names
 * (`000_<name>`, ...), the explicit order `dipsy fewshot` writes, so that nested k-shot sets are
 * read from the largest one; without ranks the first k would depend on nothing but file names.
 * `holdout` then keeps the last n of those out of `shots` (`heldOut`): a validation split.
 */
import { basename, dirname, join } from "node:path";
import type SharpType from "sharp";
import { UserError } from "../ffi/errors.ts";
import { decodeImage, ImageDecodeError } from "./image.ts";
import { bmpInfo, isBmp } from "./bmp.ts";
import {
  type Benchmark,
  benchmarkClass,
  benchmarkKey,
  findBenchmark,
  normalizeDatasetName,
} from "./benchmarks.ts";

/** The extensions the official DIPSY code reads (`manage.py` IMAGE_EXTENSIONS). */
export const IMAGE_EXTENSIONS: readonly string[] = [".jpg", ".jpeg", ".png", ".webp", ".bmp"];
export const MAPPING_FILE = "classnames.json";
export const FEWSHOT_DIR = "real_train_fewshot";

export interface Shot {
  /** Path of the image file (the class root joined with folder and file name). */
  path: string;
  /** File name within the class folder. */
  file: string;
  width: number;
  height: number;
}

export interface DatasetClass {
  /** Class name: the folder name, or its entry in the mapping file. */
  name: string;
  folder: string;
  shots: Shot[];
  /** `holdout`: the last shots of the class, kept out of `shots` for validation. */
  heldOut?: Shot[];
}

export type ProblemKind =
  | "layout" // the input folder cannot be used at all
  | "mapping" // the class-name mapping file is invalid
  | "no-classes"
  | "single-class" // negatives need a second class
  | "empty-class" // a class has no usable image
  | "unreadable" // the file cannot be read
  | "corrupt" // not decodable as an image
  | "too-small"
  | "not-an-image" // a file without an image extension, ignored
  | "subfolder" // a folder inside a class folder, ignored
  | "excluded" // a folder the benchmark leaves out (Caltech-101's background), ignored
  | "shots" // fewer shots than asked for, or no rank to take the first ones by
  | "converted"; // decodable but not 8-bit RGB: converted like PIL's convert("RGB")

export interface DatasetProblem {
  /** "error" stops the run; "warning" is something left out; "note" is informational. */
  severity: "error" | "warning" | "note";
  kind: ProblemKind;
  /** The file or folder concerned. */
  path: string;
  message: string;
  /** Set when `skipBad` left this file out instead of failing. */
  skipped?: boolean;
}

export interface Dataset {
  /** The folder whose subfolders are the classes. */
  root: string;
  layout: "folders" | "datadream";
  /** Dataset name (`dataset` option, or the `<dataset>` folder of the DataDream layout). */
  dataset?: string;
  /** The few-shot split folder of the DataDream layout, e.g. "seed0". */
  fewshotSeed?: string;
  /** The mapping file that was applied, if any. */
  mappingFile?: string;
  /** The benchmark whose class names were applied (core/benchmarks.ts), if any. */
  benchmark?: string;
  /** `shots`: the first k ranked shots of each class were taken. */
  shots?: number;
  classes: DatasetClass[];
  /** Every warning and note (and, with `skipBad`, the errors it skipped). */
  problems: DatasetProblem[];
}

export interface DatasetOptions {
  /** Dataset name: picks `<data>/<name>` in the DataDream layout and the prompt template. */
  dataset?: string;
  /** DataDream layout: the split folder, "seed0" or just 0; needed when there are several. */
  fewshotSeed?: string | number;
  /** Take the first k shots of each class by their rank (`NNN_` file name prefix, written by
   * `dipsy fewshot`), so a k-shot set is read from a larger nested one. */
  shots?: number;
  /** Keep the last n shots of each class (in the order above) out of `shots`, in `heldOut`: a
   * validation split carved from the shots. */
  holdout?: number;
  /** Negatives need at least two classes (default true). */
  negatives?: boolean;
  /** Leave out unreadable, corrupt and too-small images instead of failing (default false). */
  skipBad?: boolean;
  /** Smallest accepted width and height in pixels (default 16). */
  minSize?: number;
  /** Decode every image completely, which catches truncated files (default true). false reads
   * the headers only. */
  decode?: boolean;
  /** Images checked concurrently (default 4). */
  concurrency?: number;
}

export class DatasetError extends UserError {
  constructor(readonly problems: DatasetProblem[], readonly root?: string) {
    super(formatProblems(problems, root));
  }
}

function formatProblems(problems: DatasetProblem[], root?: string): string {
  const errors = problems.filter((p) => p.severity === "error");
  const lines = errors.map((p) => `  - ${p.path}: ${p.message}`);
  const head = `few-shot dataset${root ? ` ${root}` : ""}: ${errors.length} problem${
    errors.length === 1 ? "" : "s"
  }`;
  const fileErrors = errors.some((p) => FILE_ERRORS.has(p.kind));
  const hint = fileErrors ? "\n(skipBad / --skip-bad leaves the bad image files out)" : "";
  return `${head}\n${lines.join("\n")}${hint}`;
}

/** Errors about single image files, which `skipBad` turns into warnings. */
const FILE_ERRORS: ReadonlySet<ProblemKind> = new Set(["unreadable", "corrupt", "too-small"]);

// ---------------------------------------------------------------------------------------------
// Prompts

/** The generation prompt of a dataset without its own (spec section 6); `{c}` is the class. */
export const DEFAULT_PROMPT_TEMPLATE = "A photo of a {c}";

/**
 * The canonical key of a dataset name: a benchmark's ("fgvc_aircraft" -> "aircraft", see
 * core/benchmarks.ts), else the name lower-cased with "-" as "_"; undefined stays so.
 */
export function datasetKey(name: string | undefined): string | undefined {
  if (name === undefined) return undefined;
  return benchmarkKey(name) ?? normalizeDatasetName(name);
}

/** The generation prompt template for a dataset (the default one for unknown names). */
export function promptTemplate(dataset?: string): string {
  return findBenchmark(dataset)?.prompt ?? DEFAULT_PROMPT_TEMPLATE;
}

/** The classifier's class-prompt template for a dataset, e.g. "a pet photo of a {c}". */
export function classifierTemplate(dataset?: string): string {
  return `a ${findBenchmark(dataset)?.classifierWord ?? ""}photo of a {c}`;
}

/** Fills `{c}` in a template with the class name, verbatim. */
export function promptFor(template: string, className: string): string {
  if (!template.includes("{c}")) {
    throw new Error(`prompt template "${template}" has no {c} placeholder for the class name`);
  }
  return template.replaceAll("{c}", className);
}

// ---------------------------------------------------------------------------------------------
// Layout

/** Python's string order (by code point); JavaScript's default compares UTF-16 code units. */
export function compareCodePoints(a: string, b: string): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    let x = a.charCodeAt(i);
    let y = b.charCodeAt(i);
    if (x === y) continue;
    // Surrogates (astral characters) must sort after U+E000..U+FFFF.
    if (x >= 0xd800 && y >= 0xd800) {
      x = x >= 0xe000 ? x - 0x800 : x + 0x2000;
      y = y >= 0xe000 ? y - 0x800 : y + 0x2000;
    }
    return x - y;
  }
  return a.length - b.length;
}

/** Entries every reader ignores: dot files, Thumbs.db, desktop.ini. */
export function isHidden(name: string): boolean {
  return name.startsWith(".") || name === "Thumbs.db" || name === "desktop.ini";
}

function statOrNull(path: string): Deno.FileInfo | null {
  try {
    return Deno.statSync(path);
  } catch {
    return null;
  }
}

function isDir(path: string): boolean {
  return statOrNull(path)?.isDirectory ?? false;
}

/** Visible subfolders of `dir` (symlinks followed), in code point order. */
function subfolders(dir: string): string[] {
  const names: string[] = [];
  for (const e of Deno.readDirSync(dir)) {
    if (isHidden(e.name)) continue;
    if (e.isDirectory || (e.isSymlink && isDir(join(dir, e.name)))) names.push(e.name);
  }
  return names.sort(compareCodePoints);
}

export interface DatasetLocation {
  root: string;
  layout: "folders" | "datadream";
  dataset?: string;
  fewshotSeed?: string;
  /** Folder of the DataDream `<dataset>`, also searched for the mapping file. */
  datasetDir?: string;
}

function layoutError(path: string, message: string): DatasetError {
  return new DatasetError([{ severity: "error", kind: "layout", path, message }]);
}

/** Finds the class root of a few-shot dataset given any of the accepted folders. */
export function locateDataset(path: string, opts: DatasetOptions = {}): DatasetLocation {
  const info = statOrNull(path);
  if (!info) throw layoutError(path, "no such folder");
  if (!info.isDirectory) throw layoutError(path, "not a folder");

  // <data>/<dataset>/real_train_fewshot/<seed>: the class root itself.
  if (basename(dirname(path)) === FEWSHOT_DIR) {
    const fewshotSeed = basename(path);
    const wanted = opts.fewshotSeed;
    if (wanted !== undefined && String(wanted) !== fewshotSeed && `seed${wanted}` !== fewshotSeed) {
      throw layoutError(path, `this is split "${fewshotSeed}", but fewshotSeed is "${wanted}"`);
    }
    const datasetDir = dirname(dirname(path));
    return {
      root: path,
      layout: "datadream",
      dataset: opts.dataset ?? basename(datasetDir),
      fewshotSeed,
      datasetDir,
    };
  }
  if (basename(path) === FEWSHOT_DIR) return pickSeed(dirname(path), opts);
  if (isDir(join(path, FEWSHOT_DIR))) return pickSeed(path, opts);

  // <data>: one of its subfolders is the dataset.
  if (opts.dataset !== undefined && isDir(join(path, opts.dataset, FEWSHOT_DIR))) {
    return pickSeed(join(path, opts.dataset), opts);
  }
  const datasets = subfolders(path).filter((d) => isDir(join(path, d, FEWSHOT_DIR)));
  if (datasets.length > 0) {
    if (opts.dataset !== undefined) {
      throw layoutError(
        path,
        `no dataset "${opts.dataset}" here (with ${FEWSHOT_DIR}/): found ${datasets.join(", ")}`,
      );
    }
    if (datasets.length > 1) {
      throw layoutError(
        path,
        `holds several datasets (${datasets.join(", ")}): choose one with the dataset option`,
      );
    }
    return pickSeed(join(path, datasets[0]), opts);
  }
  return { root: path, layout: "folders", dataset: opts.dataset };
}

function pickSeed(datasetDir: string, opts: DatasetOptions): DatasetLocation {
  const splitsDir = join(datasetDir, FEWSHOT_DIR);
  const seeds = subfolders(splitsDir);
  if (seeds.length === 0) {
    throw layoutError(splitsDir, "has no few-shot split folders (seed0, ...)");
  }
  let seed: string;
  if (opts.fewshotSeed !== undefined) {
    const wanted = String(opts.fewshotSeed);
    const found = [wanted, `seed${wanted}`].find((s) => seeds.includes(s));
    if (!found) {
      throw layoutError(splitsDir, `no split "${wanted}": found ${seeds.join(", ")}`);
    }
    seed = found;
  } else if (seeds.length === 1) {
    seed = seeds[0];
  } else {
    throw layoutError(
      splitsDir,
      `holds several few-shot splits (${seeds.join(", ")}): choose one with fewshotSeed`,
    );
  }
  return {
    root: join(splitsDir, seed),
    layout: "datadream",
    dataset: opts.dataset ?? basename(datasetDir),
    fewshotSeed: seed,
    datasetDir,
  };
}

// ---------------------------------------------------------------------------------------------
// Class names

/**
 * The folder -> class name mapping: the mapping file's entries over the benchmark's names.
 * Problems are appended to `problems`; `excluded` collects folders the benchmark leaves out.
 */
function readMapping(
  location: DatasetLocation,
  folders: readonly string[],
  problems: DatasetProblem[],
  benchmark: Benchmark | undefined,
): { file?: string; names: Map<string, string>; excluded: Set<string> } {
  const names = new Map<string, string>();
  const excluded = new Set<string>();
  const fromFile = readMappingFile(location, folders, problems);
  if (benchmark) {
    const unknown: string[] = [];
    for (const folder of folders) {
      if (fromFile.names.has(folder)) continue;
      const name = benchmarkClass(benchmark, folder);
      if (name === null) {
        excluded.add(folder);
        problems.push({
          severity: "warning",
          kind: "excluded",
          path: join(location.root, folder),
          message:
            `not a class of the ${benchmark.title} benchmark (its split leaves it out): ignored`,
        });
      } else if (name === undefined) {
        unknown.push(folder);
      } else if (name !== folder) {
        names.set(folder, name);
      }
    }
    if (unknown.length) {
      const shown = unknown.slice(0, 5).map((f) => `"${f}"`).join(", ");
      problems.push({
        severity: "warning",
        kind: "mapping",
        path: location.root,
        message: `${unknown.length} folder(s) are not ${benchmark.title} classes and keep their ` +
          `names: ${shown}${unknown.length > 5 ? ", ..." : ""} (${MAPPING_FILE} can name them)`,
      });
    }
  }
  for (const [folder, name] of fromFile.names) names.set(folder, name);
  return { file: fromFile.file, names, excluded };
}

/** Reads the mapping file, if there is one; problems are appended to `problems`. */
function readMappingFile(
  location: DatasetLocation,
  folders: readonly string[],
  problems: DatasetProblem[],
): { file?: string; names: Map<string, string> } {
  const names = new Map<string, string>();
  const candidates = [join(location.root, MAPPING_FILE)];
  if (location.datasetDir) candidates.push(join(location.datasetDir, MAPPING_FILE));
  const file = candidates.find((f) => statOrNull(f)?.isFile);
  if (!file) return { names };

  const fail = (message: string) =>
    problems.push({ severity: "error", kind: "mapping", path: file, message });
  let parsed: unknown;
  try {
    parsed = JSON.parse(Deno.readTextFileSync(file));
  } catch (e) {
    fail(`cannot read the class-name mapping: ${e instanceof Error ? e.message : e}`);
    return { file, names };
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
    fail('must be a JSON object from folder name to class name, e.g. {"F-A-18": "F/A-18"}');
    return { file, names };
  }
  const known = new Set(folders);
  for (const [folder, name] of Object.entries(parsed)) {
    if (typeof name !== "string" || name.trim() === "") {
      fail(`the name for folder "${folder}" must be a non-empty string`);
    } else if (!known.has(folder)) {
      fail(`maps folder "${folder}", which is not a class folder of ${location.root}`);
    } else {
      names.set(folder, name);
    }
  }
  return { file, names };
}

// ---------------------------------------------------------------------------------------------
// Ranked shots

/** The rank in a file name written by `dipsy fewshot` ("003_x.jpg" -> 3), or null. */
export function shotRank(file: string): number | null {
  const m = /^(\d+)_/.exec(file);
  return m ? Number(m[1]) : null;
}

/**
 * The first `k` of a class folder's image files by rank; a problem (an error) instead when the
 * files carry no rank or there are fewer than k.
 */
function firstRanked(
  images: readonly string[],
  k: number,
  dir: string,
  className: string,
): { images: string[]; problem?: DatasetProblem } {
  const unranked = images.filter((f) => shotRank(f) === null);
  if (unranked.length) {
    return {
      images: [],
      problem: {
        severity: "error",
        kind: "shots",
        path: join(dir, unranked[0]),
        message: `shots needs ranked file names (000_<name>, as \`dipsy fewshot\` writes) to ` +
          `take the first ${k}; ${unranked.length} file(s) of class "${className}" have none`,
      },
    };
  }
  if (images.length < k) {
    return {
      images: [],
      problem: {
        severity: "error",
        kind: "shots",
        path: dir,
        message: `class "${className}" has ${images.length} shot(s); ${k} asked for`,
      },
    };
  }
  const ranked = [...images].sort((a, b) => shotRank(a)! - shotRank(b)! || compareCodePoints(a, b));
  return { images: ranked.slice(0, k) };
}

// ---------------------------------------------------------------------------------------------
// Images

type Sharp = typeof SharpType;
let sharpModule: Promise<Sharp> | undefined;

/** Header reading (sizes, colour space, bit depth) without decoding the pixels. */
function loadSharp(): Promise<Sharp> {
  sharpModule ??= import("sharp").then((m) => m.default as Sharp);
  return sharpModule;
}

export interface ImageCheck {
  shot?: Shot;
  problems: DatasetProblem[];
}

/** The first line of an error message, without details that repeat the path. */
function message(e: unknown, path: string): string {
  let m = (e instanceof Error ? e.message : String(e)).trim().split("\n")[0];
  if (e instanceof ImageDecodeError) m = m.replace(`cannot decode image ${path}: `, "");
  // Deno's file errors end in "(os error N): <syscall> '<path>'".
  return m.replace(/ \(os error \d+\).*$/, "");
}

/** Reads and checks one image file (size, decodability); what a dataset check does per file. */
export async function checkImage(
  path: string,
  file: string,
  opts: Required<Pick<DatasetOptions, "minSize" | "decode">>,
): Promise<ImageCheck> {
  const problems: DatasetProblem[] = [];
  const error = (kind: ProblemKind, msg: string): ImageCheck => ({
    problems: [{ severity: "error", kind, path, message: msg }],
  });
  let bytes: Uint8Array;
  try {
    bytes = await Deno.readFile(path);
  } catch (e) {
    return error("unreadable", `cannot read the file (${message(e, path)})`);
  }
  if (bytes.length === 0) return error("corrupt", "the file is empty");

  let meta: Partial<Awaited<ReturnType<ReturnType<Sharp>["metadata"]>>>;
  try {
    if (isBmp(bytes)) {
      // libvips reads no BMP; palettes and alpha become RGB like any other image's.
      const info = bmpInfo(bytes);
      meta = { width: info.width, height: info.height, channels: 3 };
    } else {
      const sharp = await loadSharp();
      meta = await sharp(bytes, { failOn: "error" }).metadata();
    }
  } catch (e) {
    return error("corrupt", `not a readable image (${message(e, path)})`);
  }
  let { width, height } = meta;
  if (opts.decode) {
    try {
      ({ width, height } = await decodeImage(bytes, path));
    } catch (e) {
      return error("corrupt", `cannot decode the image: ${message(e, path)}`);
    }
  }
  if (!width || !height) return error("corrupt", "the image has no size");
  if (width < opts.minSize || height < opts.minSize) {
    return error(
      "too-small",
      `too small (${width}x${height} px; at least ${opts.minSize} px on each side)`,
    );
  }

  const conversions: string[] = [];
  if (meta.space === "cmyk") conversions.push("CMYK (PIL's formula; ICC profile ignored)");
  else if (meta.space === "b-w" || meta.space === "grey16" || (meta.channels ?? 3) < 3) {
    conversions.push("grayscale");
  }
  if (meta.hasAlpha) conversions.push("alpha channel dropped");
  if (meta.depth && meta.depth !== "uchar" && meta.depth !== "char") {
    conversions.push(`${meta.bitsPerSample ?? 16}-bit samples reduced to 8-bit`);
  }
  if (conversions.length) {
    problems.push({
      severity: "note",
      kind: "converted",
      path,
      message: `converted to RGB: ${conversions.join("; ")}`,
    });
  }
  return { shot: { path, file, width, height }, problems };
}

/** Runs `fn` over `items` with at most `limit` in flight, keeping the input order. */
export async function mapLimit<T, R>(
  items: readonly T[],
  limit: number,
  fn: (item: T) => Promise<R>,
): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]);
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limit, items.length)) }, worker));
  return out;
}

export function hasImageExtension(name: string): boolean {
  const dot = name.lastIndexOf(".");
  return dot > 0 && IMAGE_EXTENSIONS.includes(name.slice(dot).toLowerCase());
}

// ---------------------------------------------------------------------------------------------
// Validation

/**
 * Finds the classes and checks every image; reports every problem at once. Throws a
 * `DatasetError` listing all errors (with file names) unless there are none left; warnings and
 * notes come back in `problems`.
 */
export async function validateDataset(path: string, opts: DatasetOptions = {}): Promise<Dataset> {
  const minSize = opts.minSize ?? 16;
  const decode = opts.decode ?? true;
  const skipBad = opts.skipBad ?? false;
  const negatives = opts.negatives ?? true;
  if (!Number.isInteger(minSize) || minSize < 1) {
    throw new RangeError(`minSize must be a positive integer, got ${minSize}`);
  }

  const { shots, holdout } = opts;
  if (shots !== undefined && (!Number.isInteger(shots) || shots < 1)) {
    throw new RangeError(`shots must be a positive integer, got ${shots}`);
  }
  if (holdout !== undefined && (!Number.isInteger(holdout) || holdout < 0)) {
    throw new RangeError(`holdout must be a non-negative integer, got ${holdout}`);
  }
  const location = locateDataset(path, opts);
  const { root } = location;
  const problems: DatasetProblem[] = [];
  const benchmark = findBenchmark(location.dataset);
  const all = subfolders(root);
  const mapping = readMapping(location, all, problems, benchmark);
  const folders = all.filter((f) => !mapping.excluded.has(f));

  // Gather every candidate file first, so one pool checks all images of all classes.
  const perClass = folders.map((folder) => {
    const dir = join(root, folder);
    const images: string[] = [];
    let entries: Deno.DirEntry[] = [];
    let listed = true;
    try {
      entries = [...Deno.readDirSync(dir)].sort((a, b) => compareCodePoints(a.name, b.name));
    } catch (e) {
      problems.push({
        severity: "error",
        kind: "unreadable",
        path: dir,
        message: `cannot list the class folder (${message(e, dir)})`,
      });
      listed = false;
    }
    for (const e of entries) {
      if (isHidden(e.name)) continue;
      const file = join(dir, e.name);
      if (e.isDirectory || (e.isSymlink && isDir(file))) {
        problems.push({
          severity: "warning",
          kind: "subfolder",
          path: file,
          message: "a folder inside a class folder: ignored (classes are one level deep)",
        });
      } else if (!hasImageExtension(e.name)) {
        problems.push({
          severity: "warning",
          kind: "not-an-image",
          path: file,
          message: `not an image file name (${IMAGE_EXTENSIONS.join(", ")}): ignored`,
        });
      } else {
        images.push(e.name);
      }
    }
    if (shots !== undefined && listed) {
      const picked = firstRanked(images, shots, dir, mapping.names.get(folder) ?? folder);
      if (picked.problem) problems.push(picked.problem);
      return { folder, dir, images: picked.images, listed: !picked.problem };
    }
    return { folder, dir, images, listed };
  });

  const jobs = perClass.flatMap((c, ci) => c.images.map((file) => ({ ci, file })));
  const checks = await mapLimit(
    jobs,
    opts.concurrency ?? 4,
    (j) => checkImage(join(perClass[j.ci].dir, j.file), j.file, { minSize, decode }),
  );

  const classes: DatasetClass[] = perClass.map((c) => ({
    name: mapping.names.get(c.folder) ?? c.folder,
    folder: c.folder,
    shots: [],
  }));
  jobs.forEach((j, i) => {
    const check = checks[i];
    for (const p of check.problems) {
      if (p.severity === "error" && skipBad && FILE_ERRORS.has(p.kind)) {
        problems.push({
          ...p,
          severity: "warning",
          message: `${p.message}: skipped`,
          skipped: true,
        });
      } else {
        problems.push(p);
      }
    }
    if (check.shot) classes[j.ci].shots.push(check.shot);
  });

  perClass.forEach((c, ci) => {
    const cls = classes[ci];
    if (cls.shots.length > 0 && holdout) {
      if (cls.shots.length <= holdout) {
        problems.push({
          severity: "error",
          kind: "shots",
          path: c.dir,
          message: `class "${cls.name}" has ${cls.shots.length} shot(s): holding ${holdout} out ` +
            "for validation leaves none to train on",
        });
      }
      cls.heldOut = cls.shots.splice(Math.max(1, cls.shots.length - holdout));
      return;
    }
    if (cls.shots.length > 0 || !c.listed) return;
    const message = c.images.length === 0
      ? `class "${cls.name}" has no images (${IMAGE_EXTENSIONS.join(", ")})`
      : `class "${cls.name}" has no usable images (all ${c.images.length} are bad)`;
    problems.push({ severity: "error", kind: "empty-class", path: c.dir, message });
  });

  const byName = new Map<string, string>();
  for (const c of classes) {
    const other = byName.get(c.name);
    if (other !== undefined) {
      problems.push({
        severity: "error",
        kind: "mapping",
        path: join(root, c.folder),
        message: `class name "${c.name}" is also the name of folder "${other}"`,
      });
    }
    byName.set(c.name, c.folder);
  }

  if (classes.length === 0) {
    problems.push({
      severity: "error",
      kind: "no-classes",
      path: root,
      message: "no class folders (expected <root>/<class>/<images>)",
    });
  } else if (classes.length === 1 && negatives) {
    problems.push({
      severity: "error",
      kind: "single-class",
      path: root,
      message: `only one class ("${classes[0].name}"): negative references need at least two ` +
        `(use the "none" pairs plugin for single-class generation)`,
    });
  }

  // One listing in path order, whatever order the checks finished in.
  problems.sort((a, b) => compareCodePoints(a.path, b.path));
  if (problems.some((p) => p.severity === "error")) throw new DatasetError(problems, root);
  return {
    root,
    layout: location.layout,
    dataset: location.dataset,
    fewshotSeed: location.fewshotSeed,
    mappingFile: mapping.file,
    ...(benchmark ? { benchmark: benchmark.name } : {}),
    ...(shots !== undefined ? { shots } : {}),
    classes,
    problems,
  };
}
