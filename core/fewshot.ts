/**
 * Nested few-shot splits drawn from a full training set, in the layout `generate` and the
 * official code read: `<out>/<dataset>/real_train_fewshot/seed<N>/<class>/<rank>_<file>`.
 *
 * Per seed and class, the class's files (sorted by code point) are shuffled by a stream of the
 * project's RNG named by the seed and the class folder (core/rng.ts); the largest shot count K
 * of them are copied, each under its rank (`000_`, `001_`, ...). The k-shot set of a seed is its
 * first k ranks, so every smaller set is a subset of every larger one, and `--shots k` reads it
 * (core/dataset.ts). Nothing depends on the order a file system lists files in, nor on the other
 * classes, so adding a class changes no other class's draw.
 *
 * `fewshot.json` in each seed folder records the source of every file and its sha256. A seed
 * folder is built under a hidden temporary name and renamed into place when complete, so a
 * killed run leaves no half split, and running the same command again finds it up to date.
 */
import { createHash } from "node:crypto";
import { basename, dirname, isAbsolute, join, relative, resolve } from "node:path";
import { UserError } from "../ffi/errors.ts";
import {
  checkImage,
  compareCodePoints,
  FEWSHOT_DIR,
  hasImageExtension,
  IMAGE_EXTENSIONS,
  isHidden,
  mapLimit,
  MAPPING_FILE,
} from "./dataset.ts";
import { writeAtomic } from "./output.ts";
import { derive } from "./rng.ts";

export const FEWSHOT_MANIFEST = "fewshot.json";
export const FEWSHOT_FORMAT = "dipsy-fewshot";

export class FewshotError extends UserError {}

export interface FewshotOptions {
  /** The full training set: a folder of class folders, or a list file (see `readSource`). */
  source: string;
  /** Output root: the split goes to `<out>/<dataset>/real_train_fewshot/seed<N>/`. */
  out: string;
  /** Dataset folder name. */
  dataset: string;
  /** Shot counts; the largest decides how many files each class gets. */
  shots: readonly number[];
  seeds: readonly number[];
  /** Draw past unreadable or broken images instead of stopping. */
  skipBad?: boolean;
  /** Replace a seed folder that holds another split. */
  force?: boolean;
  /** Images checked concurrently (default 4). */
  concurrency?: number;
  log?: (line: string) => void;
}

export interface FewshotFile {
  rank: number;
  /** File name in the split: `<rank>_<source file name>`. */
  file: string;
  /** The source file, relative to the source root (or as listed). */
  source: string;
  sha256: string;
  bytes: number;
}

export interface FewshotManifest {
  format: typeof FEWSHOT_FORMAT;
  version: 1;
  dataset: string;
  seed: number;
  shots: number[];
  /** The source as given (absolute), and whether it was a folder or a list file. */
  source: { path: string; kind: "folders" | "list" };
  draw: string;
  classes: { folder: string; available: number; files: FewshotFile[] }[];
}

export interface SeedResult {
  seed: number;
  dir: string;
  status: "written" | "up to date" | "replaced";
}

interface SourceClass {
  folder: string;
  /** Source files: absolute path and the name recorded for it, sorted by that name. */
  files: { path: string; name: string }[];
}

interface Source {
  root: string;
  kind: "folders" | "list";
  classes: SourceClass[];
  /** classnames.json of a class-folder source, copied beside the split. */
  mappingFile?: string;
}

const DRAW = "per class: core/rng.ts derive(seed, 'fewshot', class folder).shuffle() of its " +
  "files sorted by code point; rank r is the r-th of that order";

// ---------------------------------------------------------------------------------------------
// Source

function folderProblem(name: string): string | null {
  if (name === "" || name === "." || name === "..") return "an empty or relative name";
  if (/[/\\\0]/.test(name)) return 'a "/", "\\" or NUL character';
  if (isHidden(name)) return "a hidden name";
  return null;
}

/**
 * The full training set. A folder: its visible subfolders are the classes and their image files
 * the candidates. A list file: one image per line, `path<TAB>class folder` or just `path` (the
 * class is then the parent folder's name); paths relative to the list file; blank lines and
 * lines starting with "#" are skipped.
 */
export function readSource(path: string): Source {
  const root = resolve(path);
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(root);
  } catch {
    throw new FewshotError(`${path}: no such folder or list file`);
  }
  if (info.isDirectory) return readFolders(root);
  return readList(root);
}

function readFolders(root: string): Source {
  const classes: SourceClass[] = [];
  for (const e of [...Deno.readDirSync(root)].sort((a, b) => compareCodePoints(a.name, b.name))) {
    if (isHidden(e.name)) continue;
    const dir = join(root, e.name);
    const isDir = e.isDirectory || (e.isSymlink && Deno.statSync(dir).isDirectory);
    if (!isDir) continue;
    const files = [...Deno.readDirSync(dir)]
      .filter((f) => !isHidden(f.name) && hasImageExtension(f.name) && !f.isDirectory)
      .map((f) => ({ path: join(dir, f.name), name: `${e.name}/${f.name}` }))
      .sort((a, b) => compareCodePoints(a.name, b.name));
    classes.push({ folder: e.name, files });
  }
  if (classes.length === 0) {
    throw new FewshotError(`${root}: no class folders (expected <root>/<class>/<images>)`);
  }
  let mappingFile: string | undefined = join(root, MAPPING_FILE);
  try {
    if (!Deno.statSync(mappingFile).isFile) mappingFile = undefined;
  } catch {
    mappingFile = undefined;
  }
  return { root, kind: "folders", classes, mappingFile };
}

function readList(file: string): Source {
  const base = dirname(file);
  const byClass = new Map<string, SourceClass>();
  const seen = new Set<string>();
  const problems: string[] = [];
  Deno.readTextFileSync(file).split(/\r?\n/).forEach((raw, i) => {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) return;
    const tab = raw.indexOf("\t");
    const entry = (tab >= 0 ? raw.slice(0, tab) : raw).trim();
    const path = isAbsolute(entry) ? entry : resolve(base, entry);
    const folder = tab >= 0 ? raw.slice(tab + 1).trim() : basename(dirname(path));
    const bad = folderProblem(folder);
    if (bad) {
      problems.push(`line ${i + 1}: class folder "${folder}" has ${bad}`);
      return;
    }
    if (!hasImageExtension(path)) {
      problems.push(`line ${i + 1}: ${entry} is not an image file name (${IMAGE_EXTENSIONS})`);
      return;
    }
    if (seen.has(path)) {
      problems.push(`line ${i + 1}: ${entry} is listed twice`);
      return;
    }
    seen.add(path);
    let c = byClass.get(folder);
    if (!c) byClass.set(folder, c = { folder, files: [] });
    c.files.push({ path, name: relative(base, path) });
  });
  if (problems.length) {
    throw new FewshotError(
      `${file}: ${problems.length} problem(s)\n${
        problems.slice(0, 20).map((p) => `  - ${p}`).join("\n")
      }`,
    );
  }
  const classes = [...byClass.values()].sort((a, b) => compareCodePoints(a.folder, b.folder));
  for (const c of classes) c.files.sort((a, b) => compareCodePoints(a.name, b.name));
  if (classes.length === 0) throw new FewshotError(`${file}: lists no images`);
  return { root: file, kind: "list", classes };
}

// ---------------------------------------------------------------------------------------------
// Drawing

/** Checks a comma list of positive integers ("1,2,4,8,16"); sorted, without repeats. */
export function parseCounts(text: string, what: string, min = 1): number[] {
  const parts = text.split(",").map((p) => p.trim()).filter((p) => p !== "");
  const values = parts.map(Number);
  if (!parts.length || values.some((v) => !Number.isSafeInteger(v) || v < min)) {
    throw new FewshotError(
      `${what} must be a comma list of integers >= ${min} (e.g. "1,2,4,8,16"), got "${text}"`,
    );
  }
  return [...new Set(values)].sort((a, b) => a - b);
}

/** The class's files in the order of `seed`; ranks are positions in it. */
export function drawOrder<T>(files: readonly T[], seed: number, folder: string): T[] {
  return derive(seed, "fewshot", folder).shuffle([...files]);
}

function rankWidth(k: number): number {
  return Math.max(3, String(k - 1).length);
}

function sha256(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

interface Checked {
  ok: boolean;
  message?: string;
  sha256?: string;
  bytes?: number;
}

/**
 * Writes the splits. Every problem (a class with fewer images than the largest shot count, a
 * bad image drawn) is reported before any seed folder is written.
 */
export async function writeFewshot(opts: FewshotOptions): Promise<SeedResult[]> {
  const log = opts.log ?? (() => {});
  const bad = folderProblem(opts.dataset);
  if (bad) throw new FewshotError(`dataset name "${opts.dataset}" has ${bad}`);
  if (!opts.shots.length || !opts.seeds.length) throw new FewshotError("no shots or no seeds");
  const k = Math.max(...opts.shots);
  const source = readSource(opts.source);

  const short = source.classes.filter((c) => c.files.length < k);
  if (short.length) {
    const lines = short.slice(0, 20).map((c) =>
      `  - class "${c.folder}": ${c.files.length} image(s)`
    );
    throw new FewshotError(
      `${source.root}: ${short.length} class(es) have fewer images than the largest shot count ` +
        `(${k}):\n${lines.join("\n")}${short.length > 20 ? "\n  ..." : ""}`,
    );
  }

  // Every file any seed draws is checked once; with skipBad a bad one is passed over.
  const checks = new Map<string, Promise<Checked>>();
  const check = (path: string): Promise<Checked> => {
    let p = checks.get(path);
    if (!p) {
      p = (async () => {
        const c = await checkImage(path, basename(path), { minSize: 16, decode: true });
        const error = c.problems.find((q) => q.severity === "error");
        if (error) return { ok: false, message: error.message };
        const bytes = await Deno.readFile(path);
        return { ok: true, sha256: sha256(bytes), bytes: bytes.length };
      })();
      checks.set(path, p);
    }
    return p;
  };

  const manifests: FewshotManifest[] = [];
  const problems: string[] = [];
  for (const seed of opts.seeds) {
    const classes: FewshotManifest["classes"] = [];
    for (const c of source.classes) {
      const order = drawOrder(c.files, seed, c.folder);
      const files: FewshotFile[] = [];
      // Ranks stay consecutive: a skipped file hands its rank to the next one drawn.
      let next = 0;
      while (files.length < k && next < order.length) {
        const batch = order.slice(next, next + k - files.length);
        next += batch.length;
        const results = await mapLimit(batch, opts.concurrency ?? 4, (f) => check(f.path));
        results.forEach((r, j) => {
          if (files.length >= k) return;
          if (!r.ok) {
            if (!opts.skipBad) problems.push(`${batch[j].path}: ${r.message}`);
            else log(`warning: ${batch[j].path}: ${r.message}: passed over`);
            return;
          }
          const rank = files.length;
          files.push({
            rank,
            file: `${String(rank).padStart(rankWidth(k), "0")}_${basename(batch[j].path)}`,
            source: batch[j].name,
            sha256: r.sha256!,
            bytes: r.bytes!,
          });
        });
        if (!opts.skipBad && problems.length) break;
      }
      if (files.length < k && (opts.skipBad || !problems.length)) {
        problems.push(
          `class "${c.folder}": only ${files.length} usable image(s) of ${c.files.length}; ` +
            `${k} needed`,
        );
      }
      classes.push({ folder: c.folder, available: c.files.length, files });
    }
    manifests.push({
      format: FEWSHOT_FORMAT,
      version: 1,
      dataset: opts.dataset,
      seed,
      shots: [...opts.shots],
      source: { path: source.root, kind: source.kind },
      draw: DRAW,
      classes,
    });
  }
  if (problems.length) {
    const unique = [...new Set(problems)];
    throw new FewshotError(
      `${unique.length} problem(s) with the drawn images:\n` +
        unique.slice(0, 20).map((p) => `  - ${p}`).join("\n") +
        (unique.length > 20 ? "\n  ..." : "") +
        (opts.skipBad ? "" : "\n(--skip-bad passes over bad images and draws the next ones)"),
    );
  }

  const datasetDir = join(resolve(opts.out), opts.dataset);
  const splits = join(datasetDir, FEWSHOT_DIR);
  // Refuse a folder holding another split before writing anything.
  const plans = manifests.map((m) => {
    const dir = join(splits, `seed${m.seed}`);
    const state = existingState(dir, m);
    if (state.kind === "other" && !opts.force) {
      throw new FewshotError(
        `${dir} holds another split (${state.why}); --force replaces it, or choose another --out`,
      );
    }
    return { manifest: m, dir, state };
  });
  if (source.mappingFile) await copyMapping(source.mappingFile, datasetDir, opts.force ?? false);

  const results: SeedResult[] = [];
  for (const { manifest, dir, state } of plans) {
    if (state.kind === "same") {
      results.push({ seed: manifest.seed, dir, status: "up to date" });
      continue;
    }
    await writeSeed(source, manifest, dir);
    results.push({
      seed: manifest.seed,
      dir,
      status: state.kind === "missing" ? "written" : "replaced",
    });
  }
  return results;
}

type State = { kind: "missing" } | { kind: "same" } | { kind: "other"; why: string };

/** Whether `dir` already holds exactly this split (its manifest and every file, by size). */
function existingState(dir: string, m: FewshotManifest): State {
  let text: string;
  try {
    text = Deno.readTextFileSync(join(dir, FEWSHOT_MANIFEST));
  } catch {
    try {
      Deno.statSync(dir);
    } catch {
      return { kind: "missing" };
    }
    return { kind: "other", why: `no ${FEWSHOT_MANIFEST}` };
  }
  let old: FewshotManifest;
  try {
    old = JSON.parse(text);
  } catch {
    return { kind: "other", why: `${FEWSHOT_MANIFEST} is not valid JSON` };
  }
  const keyOf = (x: FewshotManifest) => JSON.stringify({ ...x, source: null });
  if (keyOf(old) !== keyOf(m)) {
    const why = JSON.stringify(old.shots) !== JSON.stringify(m.shots)
      ? `shots ${old.shots} there, ${m.shots} asked for`
      : "other source files or hashes";
    return { kind: "other", why };
  }
  for (const c of m.classes) {
    for (const f of c.files) {
      try {
        if (Deno.statSync(join(dir, c.folder, f.file)).size !== f.bytes) throw new Error();
      } catch {
        return { kind: "other", why: `${c.folder}/${f.file} is missing or changed` };
      }
    }
  }
  return { kind: "same" };
}

async function writeSeed(source: Source, m: FewshotManifest, dir: string): Promise<void> {
  const parent = dirname(dir);
  await Deno.mkdir(parent, { recursive: true });
  // Leftovers of a killed run of this seed.
  for (const e of Deno.readDirSync(parent)) {
    if (e.name.startsWith(`.${basename(dir)}.tmp-`)) {
      await Deno.remove(join(parent, e.name), { recursive: true });
    }
  }
  const tmp = join(parent, `.${basename(dir)}.tmp-${crypto.randomUUID().slice(0, 8)}`);
  const byFolder = new Map(source.classes.map((c) => [c.folder, c]));
  try {
    for (const c of m.classes) {
      const target = join(tmp, c.folder);
      await Deno.mkdir(target, { recursive: true });
      const paths = new Map(byFolder.get(c.folder)!.files.map((f) => [f.name, f.path]));
      for (const f of c.files) await Deno.copyFile(paths.get(f.source)!, join(target, f.file));
    }
    await Deno.writeTextFile(join(tmp, FEWSHOT_MANIFEST), JSON.stringify(m, null, 1) + "\n");
    const old = `${tmp}.old`;
    let replaced = false;
    try {
      await Deno.rename(dir, old);
      replaced = true;
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
    }
    await Deno.rename(tmp, dir);
    if (replaced) await Deno.remove(old, { recursive: true });
  } catch (e) {
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
    throw e;
  }
}

async function copyMapping(file: string, datasetDir: string, force: boolean): Promise<void> {
  const target = join(datasetDir, MAPPING_FILE);
  const text = await Deno.readTextFile(file);
  try {
    if ((await Deno.readTextFile(target)) === text) return;
    if (!force) {
      throw new FewshotError(`${target} differs from ${file}; --force replaces it`);
    }
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  await Deno.mkdir(datasetDir, { recursive: true });
  await writeAtomic(target, text);
}
