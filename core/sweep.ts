/**
 * A sweep: one base experiment (the settings `run` takes) and two axes, generation settings and
 * training settings, each a grid (cartesian product) or a list. This module turns a sweep file
 * into a plan without running or writing anything: every cell resolved and validated, cell ids,
 * generation settings shared by several cells generated once, work units for shards, and the
 * ranked table of finished cells.
 *
 * Ids are a readable slug of the swept values and a hash of the resolved settings (a default
 * spelt out hashes as the default; the dtype "auto" stands for on the device is part of it), so
 * they are the same on every rerun of the same file, and a changed setting gets a new id (and a
 * new folder) instead of resuming a folder made with other settings.
 */
import { createHash } from "node:crypto";
import { dirname, resolve } from "node:path";
import YAML from "yaml";
import { UserError } from "../ffi/errors.ts";
import {
  ConfigError,
  type ConfigLayer,
  parseConfigObject,
  type PluginKey,
  resolveConfig,
  RUN_FIELDS,
  type RunConfig,
  TINY,
} from "./config.ts";
import { type Classifier, type PluginKind, type Registry, registry } from "./plugins.ts";
import type { Shard } from "./shard.ts";
import { closest } from "./suggest.ts";

/** A mistake in a sweep file: one line naming the file and the key. */
export class SweepError extends UserError {}

export const PLAN_FILE = "plan.json";
export const TABLE_FILE = "sweep.json";
export const CSV_FILE = "sweep.csv";
export const GEN_DIR = "gen";
export const CELLS_DIR = "cells";

/** Keys of a sweep file that are not generation settings. */
const SWEEP_KEYS = [
  "test",
  "val",
  "select",
  "perEpoch",
  "classifier",
  "generate",
  "train",
  "size",
] as const;

const PLUGIN_KEYS = ["guidance", "sampler", "pairs"] as const;

/**
 * Generation settings that stay one per sweep: they change the real data, the class similarity
 * (computed once) or only how the job runs (not its images, so they are not in the ids).
 */
const BASE_ONLY = [
  "data",
  "out",
  "dataset",
  "fewshotSeed",
  "shots",
  "holdout",
  "clip",
  "modelSeed",
  "similarity",
  "skipBad",
  "plugins",
  "device",
  "batch",
];

/** Settings that never enter a generation set's id: where it goes and how it runs. */
const NOT_HASHED = ["out", "device", "batch"] as const;

export type Settings = Record<string, unknown>;

export interface GenerationSet {
  /** Folder name under gen/: slug of the swept values + hash of the resolved configuration. */
  id: string;
  /** The swept values of the first entry that resolved to it. */
  settings: Settings;
  /** Resolved, with `out` set to SWEEP/gen/<id>. */
  config: RunConfig;
}

export interface TrainingSetting {
  id: string;
  settings: Settings;
  /** The classifier plugin and the options given (base + swept). */
  classifier: { name: string; options: Record<string, unknown> };
  /** Its resolved settings (defaults filled in), for the table and the id. */
  resolved: Readonly<Record<string, unknown>>;
}

export interface Cell {
  /** `<generation id>--<training id>`. */
  id: string;
  generation: GenerationSet;
  training: TrainingSetting;
  /** The cell's run folder, relative to the sweep folder. */
  run: string;
}

export interface SweepPlan {
  /** The sweep file (absolute). */
  file: string;
  /** The sweep folder (absolute). */
  out: string;
  /** Test images, validation folder (absolute), model selection rule, per-epoch evaluation. */
  test: string;
  val: string | null;
  select: string | null;
  perEpoch: boolean;
  /** The base generation configuration (no swept values; `out` unset; the dtype concrete). */
  base: RunConfig;
  /** The base's dtype, which the classifier follows unless it is given its own. */
  dtype: ConcreteDtype;
  /** Validation top-1 ranks the cells when there is a validation split, else test top-1. */
  metric: "val_top1" | "test_top1";
  /** The swept keys, generation's first, as the table names them. */
  swept: string[];
  /** Each swept key's axis and key (a key both axes sweep is named "generate.k", "train.k"). */
  columns: { name: string; axis: "generate" | "train"; key: string }[];
  generations: GenerationSet[];
  trainings: TrainingSetting[];
  /** Generation-major: the cells of one generation set are adjacent. */
  cells: Cell[];
}

function isObject(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === "object" && !Array.isArray(v);
}

function show(v: unknown): string {
  return JSON.stringify(v) ?? String(v);
}

/** The first problem of a configuration error (the others, counted), on one line. */
function firstProblem(e: unknown): string {
  if (e instanceof ConfigError) {
    const more = e.problems.length - 1;
    return e.problems[0] + (more > 0 ? ` (and ${more} more)` : "");
  }
  return e instanceof Error ? e.message.split("\n")[0] : String(e);
}

/** An error as a SweepError that starts with `where` (once). */
function atWhere(where: string, e: unknown): SweepError {
  if (e instanceof SweepError) return e;
  const p = firstProblem(e);
  return new SweepError(p.startsWith(where) ? p : `${where}: ${p}`);
}

/** Canonical JSON (object keys sorted), so equal settings hash equally. */
function canonical(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonical).join(",")}]`;
  if (isObject(v)) {
    const keys = Object.keys(v).filter((k) => v[k] !== undefined).sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(v[k])}`).join(",")}}`;
  }
  return JSON.stringify(v) ?? "null";
}

/** 8 hex digits of the SHA-256 of the canonical JSON. */
export function settingsHash(v: unknown): string {
  return createHash("sha256").update(canonical(v)).digest("hex").slice(0, 8);
}

/** "negativeScale2_lr0.001" from the swept values: readable, safe in paths and shells. */
export function slugOf(settings: Settings): string {
  const value = (v: unknown): string =>
    isObject(v) && typeof v.name === "string"
      ? v.name
      : typeof v === "object"
      ? show(v)
      : String(v);
  const slug = Object.entries(settings)
    .map(([k, v]) => `${k.split(".").at(-1)}${value(v)}`)
    .join("_")
    .replace(/[^A-Za-z0-9.+_-]+/g, "")
    .replace(/-+/g, "-")
    .slice(0, 48)
    .replace(/^[-.]+|[-.]+$/g, "");
  return slug || "base";
}

/** The entries of one axis: `{ grid: { key: [values] } }` or `{ list: [{...}, ...] }`. */
export function expandAxis(raw: unknown, where: string): Settings[] {
  if (raw === undefined || raw === null) return [{}];
  if (!isObject(raw)) {
    throw new SweepError(`${where} must be { grid: { key: [values] } } or { list: [{...}] }`);
  }
  for (const k of Object.keys(raw)) {
    if (k === "grid" || k === "list") continue;
    const guess = closest(k, ["grid", "list"]);
    throw new SweepError(
      `${where}: unknown key "${k}"${guess ? ` (did you mean "${guess}"?)` : ""}; ` +
        "an axis is a grid or a list",
    );
  }
  if (raw.grid !== undefined && raw.list !== undefined) {
    throw new SweepError(`${where}: give a grid or a list, not both`);
  }
  if (raw.list !== undefined) {
    if (!Array.isArray(raw.list) || raw.list.length === 0) {
      throw new SweepError(`${where}.list must be a non-empty list of settings objects`);
    }
    return raw.list.map((entry, i) => {
      if (!isObject(entry)) {
        throw new SweepError(
          `${where}.list[${i}] must be an object of settings, got ${show(entry)}`,
        );
      }
      return { ...entry };
    });
  }
  if (!isObject(raw.grid)) {
    throw new SweepError(`${where}.grid must be an object: { key: [values], ... }`);
  }
  let cells: Settings[] = [{}];
  for (const [key, values] of Object.entries(raw.grid)) {
    if (!Array.isArray(values) || values.length === 0) {
      throw new SweepError(
        `${where}.grid "${key}" must be a non-empty list of values, got ${show(values)}`,
      );
    }
    // The first key varies slowest, as in nested loops written in the file's order.
    cells = cells.flatMap((c) => values.map((v) => ({ ...c, [key]: v })));
  }
  return cells;
}

/** `size: N | "WxH"` as width and height. */
function sizeValues(v: unknown, where: string): { width: unknown; height: unknown } {
  if (typeof v === "number") return { width: v, height: v };
  const m = typeof v === "string" ? /^\s*(\d+)\s*(?:[x×]\s*(\d+))?\s*$/.exec(v) : null;
  if (!m) throw new SweepError(`${where}: "size" must be N or WxH, got ${show(v)}`);
  return { width: Number(m[1]), height: Number(m[2] ?? m[1]) };
}

/** Generation settings with dotted plugin options (`guidance.negativeScale`) as a raw layer. */
function generationObject(settings: Settings, where: string): Record<string, unknown> {
  const raw: Record<string, unknown> = {};
  const plugin = (head: string): Record<string, unknown> => {
    const current = raw[head];
    if (isObject(current)) return current;
    const obj: Record<string, unknown> = typeof current === "string" ? { name: current } : {};
    raw[head] = obj;
    return obj;
  };
  for (const [key, value] of Object.entries(settings)) {
    const dot = key.indexOf(".");
    if (dot > 0) {
      const head = key.slice(0, dot);
      if (!(PLUGIN_KEYS as readonly string[]).includes(head)) {
        const guess = closest(head, PLUGIN_KEYS);
        throw new SweepError(
          `${where}: unknown key "${key}"` +
            (guess ? ` (did you mean "${guess}${key.slice(dot)}"?)` : "") +
            "; only guidance.*, sampler.* and pairs.* take a dotted key",
        );
      }
      plugin(head)[key.slice(dot + 1)] = value;
    } else if (key === "size") {
      Object.assign(raw, sizeValues(value, where));
    } else if ((PLUGIN_KEYS as readonly string[]).includes(key) && isObject(raw[key])) {
      Object.assign(plugin(key), typeof value === "string" ? { name: value } : value);
    } else {
      raw[key] = value;
    }
  }
  return raw;
}

const GENERATION_KEYS = [
  ...Object.keys(RUN_FIELDS.shape),
  ...PLUGIN_KEYS,
  "plugins",
  "size",
];

/** A swept generation key that must stay one per sweep, or is unknown, named with the file. */
function checkGenerationKey(key: string, where: string): void {
  if (BASE_ONLY.includes(key)) {
    throw new SweepError(
      `${where}: "${key}" is a base setting (one value per sweep): it changes the real data, ` +
        "the class similarity or how the job runs; run one sweep per value",
    );
  }
  const dot = key.indexOf(".");
  if (dot > 0) {
    const head = key.slice(0, dot);
    if ((PLUGIN_KEYS as readonly string[]).includes(head)) return;
    const guess = closest(head, PLUGIN_KEYS);
    throw new SweepError(
      `${where}: unknown key "${key}"` +
        (guess ? ` (did you mean "${guess}${key.slice(dot)}"?)` : "") +
        "; only guidance.*, sampler.* and pairs.* take a dotted key",
    );
  }
  if (!GENERATION_KEYS.includes(key)) {
    const guess = closest(key, GENERATION_KEYS);
    throw new SweepError(
      `${where}: unknown generation key "${key}"${guess ? ` (did you mean "${guess}"?)` : ""}`,
    );
  }
}

/** The resolved value of a swept generation key, for the table. */
function generationValue(config: RunConfig, key: string, reg: Registry): unknown {
  if (key === "size") return config.width === null ? null : `${config.width}x${config.height}`;
  const dot = key.indexOf(".");
  const head = (dot > 0 ? key.slice(0, dot) : key) as (typeof PLUGIN_KEYS)[number];
  if ((PLUGIN_KEYS as readonly string[]).includes(head)) {
    const choice = config[head];
    const option = dot > 0 ? key.slice(dot + 1) : "name";
    if (option === "name") return choice.name;
    return reg.resolve(head as PluginKind, choice.name, choice.options)[option] ?? null;
  }
  return (config as unknown as Record<string, unknown>)[key] ?? null;
}

/**
 * A plugin's options as ids hash them: the options its preset gives it (those that
 * resolveConfig keeps when another plugin is chosen) and every other option whose resolved value
 * differs from its default. A default spelled out thus hashes as if left out, and settings that
 * spell out no default keep the ids they had when options were hashed as given.
 */
function hashedOptions(kind: PluginKey, config: RunConfig, reg: Registry): Record<string, unknown> {
  const { name, options } = config[kind];
  const preset =
    resolveConfig([{ source: "preset", values: { preset: config.preset } }], reg)[kind];
  const declared = new Set(Object.keys(reg.definition(kind, name).schema.shape));
  const kept = preset.name === name
    ? preset.options
    : Object.fromEntries(Object.entries(preset.options).filter(([k]) => declared.has(k)));
  const defaults = reg.resolve(kind, name, kept);
  return Object.fromEntries(
    Object.entries(reg.resolve(kind, name, options)).filter(([k, v]) =>
      k in kept || canonical(v) !== canonical(defaults[k])
    ),
  );
}

/**
 * The hash of a generation set: its resolved configuration without where it goes and how it
 * runs, plugin options as hashedOptions gives them, and a size equal to the model's default
 * hashed as the default.
 */
async function generationHash(
  config: RunConfig,
  reg: Registry,
  defaultSize?: (model: string) => Promise<number>,
): Promise<string> {
  const hashed: Record<string, unknown> = { ...config };
  for (const k of NOT_HASHED) delete hashed[k];
  for (const kind of PLUGIN_KEYS) {
    hashed[kind] = { name: config[kind].name, options: hashedOptions(kind, config, reg) };
  }
  if (config.width !== null && config.width === config.height && defaultSize) {
    if (config.width === await defaultSize(config.model)) hashed.width = hashed.height = null;
  }
  return settingsHash(hashed);
}

/** The resolved value of a swept training key (LoRA's rank, alpha and dropout sit in `lora`). */
function trainingValue(resolved: Readonly<Record<string, unknown>>, key: string): unknown {
  if (key in resolved) return resolved[key] ?? null;
  const lora = resolved.lora;
  return isObject(lora) && key in lora ? lora[key] : null;
}

/** A dtype as the weights are loaded: what "auto" stands for once the device is known. */
export type ConcreteDtype = Exclude<RunConfig["dtype"], "auto">;

export interface PlanOptions {
  /** `--out` (else the file's `out:`). */
  out?: string;
  /** `--device`, which overrides the file's (not part of any id). */
  device?: string;
  /**
   * The dtype "auto" stands for in the sweep folder `out` on `device`; asked only when a setting
   * leaves the dtype to "auto". The concrete dtype is part of every id.
   */
  autoDtype?: (device: string, out: string) => Promise<ConcreteDtype>;
  /** A model's default output size (from its config files), asked only when a size is given. */
  defaultSize?: (model: string) => Promise<number>;
  registry?: Registry;
}

/** Reads a sweep file (JSON for .json, else YAML) into its raw object. */
export async function readSweepFile(path: string): Promise<Record<string, unknown>> {
  const file = resolve(path);
  let text: string;
  try {
    text = await Deno.readTextFile(file);
  } catch (e) {
    throw new SweepError(`sweep file ${file}: ${e instanceof Error ? e.message : e}`);
  }
  const json = /\.json$/i.test(file);
  let raw: unknown;
  try {
    raw = json ? JSON.parse(text) : YAML.parse(text);
  } catch (e) {
    throw new SweepError(
      `sweep file ${file}: not valid ${json ? "JSON" : "YAML"} ` +
        `(${e instanceof Error ? e.message.split("\n")[0] : e})`,
    );
  }
  if (!isObject(raw)) throw new SweepError(`sweep file ${file}: expected an object of settings`);
  return raw;
}

/** The base layer's plugin files, to load before `planSweep` resolves plugin names. */
export function basePluginFiles(raw: Record<string, unknown>, file: string): string[] {
  const list = raw.plugins === undefined
    ? []
    : typeof raw.plugins === "string"
    ? [raw.plugins]
    : raw.plugins;
  if (!Array.isArray(list) || list.some((p) => typeof p !== "string")) {
    throw new SweepError(`sweep file ${file}: "plugins" must be a list of plugin file paths`);
  }
  return list.map((p) => resolve(dirname(file), p));
}

/**
 * Every cell of a sweep file resolved and validated: a misspelt key, a bad value or a
 * combination that does not resolve is a SweepError naming the file and the key (or the cell),
 * before anything is written.
 */
export async function planSweep(
  file: string,
  raw: Record<string, unknown>,
  opts: PlanOptions = {},
): Promise<SweepPlan> {
  const reg = opts.registry ?? registry;
  file = resolve(file);
  const baseDir = dirname(file);
  const known = [...GENERATION_KEYS, ...SWEEP_KEYS];
  for (const key of Object.keys(raw)) {
    if (known.includes(key)) continue;
    const guess = closest(key, known);
    throw new SweepError(
      `${file}: unknown key "${key}"${guess ? ` (did you mean "${guess}"?)` : ""}`,
    );
  }
  const path = (key: string): string | null => {
    const v = raw[key];
    if (v === undefined || v === null) return null;
    if (typeof v !== "string" || !v) throw new SweepError(`${file}: "${key}" must be a path`);
    return resolve(baseDir, v);
  };
  const test = path("test");
  if (!test) throw new SweepError(`${file}: "test" (the test images) is required`);
  const val = path("val");
  const out = opts.out !== undefined ? resolve(opts.out) : path("out");
  if (!out) throw new SweepError(`${file}: give the sweep folder with --out or "out:"`);
  const select = raw.select === undefined || raw.select === null ? null : String(raw.select);
  if (select !== null && !["last", "best-val", "best-test"].includes(select)) {
    throw new SweepError(
      `${file}: "select" must be last, best-val or best-test, got ${show(select)}`,
    );
  }
  if (raw.perEpoch !== undefined && typeof raw.perEpoch !== "boolean") {
    throw new SweepError(`${file}: "perEpoch" must be true or false`);
  }

  // The base generation layer: every key that is not the sweep's own.
  const baseRaw: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(raw)) {
    if (k === "out" || (SWEEP_KEYS as readonly string[]).includes(k)) continue;
    baseRaw[k] = v;
  }
  if (raw.size !== undefined) Object.assign(baseRaw, sizeValues(raw.size, file));
  if (opts.device !== undefined) baseRaw.device = opts.device;
  const layers: ConfigLayer[] = [];
  let base: RunConfig;
  try {
    layers.push(parseConfigObject(baseRaw, file, { baseDir }));
    base = resolveConfig(layers, reg);
  } catch (e) {
    throw atWhere(file, e);
  }
  if (!base.data) throw new SweepError(`${file}: "data" (the few-shot images) is required`);
  if (val !== null && base.holdout) {
    throw new SweepError(`${file}: give "val" (a folder) or "holdout" (shots), not both`);
  }
  // "auto" means f16 on CUDA and f32 on the CPU: resolved here, so that cells computed in
  // different precisions never share an id (the device is a base setting: one answer).
  let auto: Promise<ConcreteDtype> | undefined;
  const concrete = (dtype: RunConfig["dtype"]): Promise<ConcreteDtype> => {
    if (dtype !== "auto") return Promise.resolve(dtype);
    if (!opts.autoDtype) throw new Error("planSweep: a dtype is auto and no autoDtype was given");
    return auto ??= opts.autoDtype(base.device, out);
  };
  base = { ...base, dtype: await concrete(base.dtype) };
  const dtype = base.dtype as ConcreteDtype;

  // Generation: each key on its own first, so that a misspelt one is named as such.
  const genWhere = `${file}: generate`;
  const genEntries = expandAxis(raw.generate, genWhere);
  const resolveGeneration = (settings: Settings, where: string): RunConfig => {
    const layer = parseConfigObject(generationObject(settings, where), where, { baseDir });
    return resolveConfig([...layers, layer], reg);
  };
  const genKeys = [...new Set(genEntries.flatMap((e) => Object.keys(e)))];
  for (const key of genKeys) {
    checkGenerationKey(key, genWhere);
    const first = genEntries.find((e) => key in e)![key];
    const where = `${genWhere} "${key}"`;
    try {
      resolveGeneration({ [key]: first }, where);
    } catch (e) {
      throw atWhere(where, e);
    }
  }
  // Keyed by hash: entries that resolve alike share one set (the first one's slug names it).
  const generations = new Map<string, GenerationSet>();
  const genOf: GenerationSet[] = [];
  // Asked once per model, and only when a size is given.
  const sizes = new Map<string, Promise<number>>();
  const sizeOf = opts.defaultSize;
  const defaultSize = sizeOf && ((model: string): Promise<number> => {
    if (!sizes.has(model)) {
      sizes.set(
        model,
        sizeOf(model).catch((e) => {
          throw atWhere(`${file}: the default size of model "${model}"`, e);
        }),
      );
    }
    return sizes.get(model)!;
  });
  for (const settings of genEntries) {
    const where = `${genWhere} ${show(settings)}`;
    let config: RunConfig;
    try {
      config = resolveGeneration(settings, where);
    } catch (e) {
      throw atWhere(where, e);
    }
    config = { ...config, dtype: await concrete(config.dtype) };
    const hash = await generationHash(config, reg, defaultSize);
    const existing = generations.get(hash);
    if (existing) {
      genOf.push(existing);
      continue;
    }
    const id = `${slugOf(settings)}-${hash}`;
    const set = { id, settings, config: { ...config, out: resolve(out, GEN_DIR, id) } };
    generations.set(hash, set);
    genOf.push(set);
  }

  // Training: the classifier plugin's own validation, key by key, then every entry.
  const trainWhere = `${file}: train`;
  const classifierRaw = raw.classifier ?? {};
  const baseClassifier = typeof classifierRaw === "string"
    ? { name: classifierRaw, options: {} }
    : isObject(classifierRaw)
    ? (({ name, ...options }) => ({ name: String(name ?? "clip-lora"), options }))(classifierRaw)
    : null;
  if (!baseClassifier) {
    throw new SweepError(`${file}: "classifier" must be a plugin name or { name, ...options }`);
  }
  // As in `run`: the classifier follows the generation's dtype unless it is given its own.
  const withDtype = (options: Record<string, unknown>) =>
    options.dtype === undefined || options.dtype === "auto" ? { ...options, dtype } : options;
  baseClassifier.options = withDtype(baseClassifier.options);
  const create = (options: Record<string, unknown>, where: string): Classifier => {
    try {
      return reg.create<Classifier>("classifier", baseClassifier.name, options);
    } catch (e) {
      throw atWhere(where, e);
    }
  };
  create(baseClassifier.options, `${file}: classifier`);
  const trainEntries = expandAxis(raw.train, trainWhere);
  const trainKeys = [...new Set(trainEntries.flatMap((e) => Object.keys(e)))];
  for (const key of trainKeys) {
    const first = trainEntries.find((e) => key in e)![key];
    create(withDtype({ ...baseClassifier.options, [key]: first }), `${trainWhere} "${key}"`);
  }
  const trainings = new Map<string, TrainingSetting>();
  const trainOf: TrainingSetting[] = trainEntries.map((settings) => {
    const options = withDtype({ ...baseClassifier.options, ...settings });
    const classifier = create(options, `${trainWhere} ${show(settings)}`);
    // The evaluation belongs to the cell too: another test folder or rule is another cell.
    const hash = settingsHash({
      name: classifier.name,
      settings: classifier.settings,
      test,
      val,
      select,
      perEpoch: raw.perEpoch === true,
    });
    const existing = trainings.get(hash);
    if (existing) return existing;
    const id = `${slugOf(settings)}-${hash}`;
    const setting = {
      id,
      settings,
      classifier: { name: baseClassifier.name, options },
      resolved: classifier.settings,
    };
    trainings.set(hash, setting);
    return setting;
  });

  const gens = [...new Set(genOf)], trains = [...new Set(trainOf)];
  const cells = gens.flatMap((generation) =>
    trains.map((training) => {
      const id = `${generation.id}--${training.id}`;
      return { id, generation, training, run: `${CELLS_DIR}/${id}` };
    })
  );
  // A key both axes sweep (seed, say) is named by its axis.
  const both = genKeys.filter((k) => trainKeys.includes(k));
  const column = (axis: "generate" | "train") => (key: string) => ({
    name: both.includes(key) ? `${axis}.${key}` : key,
    axis,
    key,
  });
  const columns = [...genKeys.map(column("generate")), ...trainKeys.map(column("train"))];
  return {
    file,
    out,
    test,
    val,
    select,
    perEpoch: raw.perEpoch === true,
    base,
    dtype,
    metric: val !== null || (base.holdout ?? 0) > 0 ? "val_top1" : "test_top1",
    swept: columns.map((c) => c.name),
    columns,
    generations: gens,
    trainings: trains,
    cells,
  };
}

/** The swept values of a cell, by the table's names; a key an entry left out, resolved. */
export function cellSettings(plan: SweepPlan, cell: Cell, reg: Registry = registry): Settings {
  const out: Settings = {};
  for (const { name, axis, key } of plan.columns) {
    out[name] = axis === "generate"
      ? cell.generation.settings[key] ?? generationValue(cell.generation.config, key, reg)
      : cell.training.settings[key] ?? trainingValue(cell.training.resolved, key);
  }
  return out;
}

/** Work unit k (a generation set with its cells) belongs to shard k mod n. */
export function shardUnits(
  plan: SweepPlan,
  shard: Shard,
): { generation: GenerationSet; cells: Cell[] }[] {
  return plan.generations
    .map((generation) => ({
      generation,
      cells: plan.cells.filter((c) => c.generation === generation),
    }))
    .filter((_, k) => k % shard.count === shard.index);
}

/** What the plan file records: the cells and what each is. */
export function planRecord(plan: SweepPlan, reg: Registry = registry): Record<string, unknown> {
  return {
    format: "dipsy-sweep-plan",
    version: 1,
    sweep: plan.file,
    metric: plan.metric,
    dtype: plan.dtype,
    swept: plan.swept,
    test: plan.test,
    val: plan.val,
    select: plan.select,
    generation: plan.generations.map((g) => ({
      id: g.id,
      settings: g.settings,
      out: `${GEN_DIR}/${g.id}`,
      config: g.config,
    })),
    training: plan.trainings.map((t) => ({
      id: t.id,
      settings: t.settings,
      classifier: t.classifier.name,
      options: t.resolved,
    })),
    cells: plan.cells.map((c) => ({
      id: c.id,
      generation: c.generation.id,
      training: c.training.id,
      run: c.run,
      settings: cellSettings(plan, c, reg),
    })),
  };
}

/** A finished cell's figures (null: not measured, e.g. no validation split). */
export interface CellResult {
  val_top1: number | null;
  test_top1: number | null;
  test_top5: number | null;
  mean_per_class: number | null;
}

export interface SweepRow extends CellResult {
  rank: number;
  cell: string;
  run: string;
  settings: Settings;
}

export interface SweepTable {
  sweep: string;
  metric: SweepPlan["metric"];
  swept: string[];
  rows: SweepRow[];
  /** Cells without results, in plan order. */
  missing: string[];
  /** Cells whose last attempt failed, with the reason (also in `missing`). */
  failed: { cell: string; reason: string }[];
}

/**
 * The table of the finished cells, best first by the plan's metric; equal values keep the
 * plan's order, so the ranking is the same however the cells were spread over shards.
 */
export function sweepTable(
  plan: SweepPlan,
  results: ReadonlyMap<string, CellResult>,
  failures: ReadonlyMap<string, string> = new Map(),
  reg: Registry = registry,
): SweepTable {
  const done = plan.cells.filter((c) => results.has(c.id));
  const score = (c: Cell) => results.get(c.id)![plan.metric] ?? -Infinity;
  const order = done.map((c, i) => ({ c, i })).sort((a, b) => score(b.c) - score(a.c) || a.i - b.i);
  return {
    sweep: plan.file,
    metric: plan.metric,
    swept: plan.swept,
    rows: order.map(({ c }, k) => ({
      rank: k + 1,
      cell: c.id,
      run: c.run,
      settings: cellSettings(plan, c, reg),
      ...results.get(c.id)!,
    })),
    missing: plan.cells.filter((c) => !results.has(c.id)).map((c) => c.id),
    failed: plan.cells.filter((c) => failures.has(c.id) && !results.has(c.id))
      .map((c) => ({ cell: c.id, reason: failures.get(c.id)! })),
  };
}

const FIGURES = ["val_top1", "test_top1", "test_top5", "mean_per_class"] as const;

function cellText(v: unknown): string {
  if (v === null || v === undefined) return "";
  return typeof v === "object" ? show(v) : String(v);
}

/** The table's rows as text cells: rank, cell, run, the swept keys, the figures. */
function tableCells(table: SweepTable): string[][] {
  return [
    ["rank", "cell", "run", ...table.swept, ...FIGURES],
    ...table.rows.map((r) => [
      String(r.rank),
      r.cell,
      r.run,
      ...table.swept.map((k) => cellText(r.settings[k])),
      ...FIGURES.map((f) => cellText(r[f])),
    ]),
  ];
}

/** RFC 4180 CSV with the columns of the JSON table. */
export function tableCsv(table: SweepTable): string {
  const quote = (s: string) => (/[",\n\r]/.test(s) ? `"${s.replaceAll('"', '""')}"` : s);
  return tableCells(table).map((row) => row.map(quote).join(",")).join("\n") + "\n";
}

/** The table aligned in columns, figures as percentages, the run folder left out. */
export function formatTable(table: SweepTable): string {
  const pct = (v: number | null) => (v === null ? "-" : (100 * v).toFixed(2));
  const rows = [
    ["rank", ...table.swept, ...FIGURES, "cell"],
    ...table.rows.map((r) => [
      String(r.rank),
      ...table.swept.map((k) => cellText(r.settings[k])),
      ...FIGURES.map((f) => pct(r[f])),
      r.cell,
    ]),
  ];
  const widths = rows[0].map((_, j) => Math.max(...rows.map((r) => r[j].length)));
  const numeric = (j: number) => j === 0 || (j > table.swept.length && j < rows[0].length - 1);
  const lines = rows.map((r) =>
    r.map((s, j) => (numeric(j) ? s.padStart(widths[j]) : s.padEnd(widths[j]))).join("  ")
      .trimEnd()
  );
  const by = table.metric === "val_top1"
    ? "ranked by validation top-1"
    : "ranked by test top-1 (no validation split)";
  return [`${by}; accuracies in %`, ...lines].join("\n");
}

/** The default CLIP of a sweep's classifier: the generation's, or tiny with the tiny models. */
export function classifierClip(config: RunConfig): string | undefined {
  return config.clip ?? (config.model === TINY ? TINY : undefined);
}
