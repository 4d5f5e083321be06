/**
 * Run configuration of the generation job: which models and plugins, with which options. Values
 * come in layers, later ones winning: built-in defaults, a named preset (one per row of the
 * paper's ablations), a JSON or YAML file, then command-line flags. Every ablation is thus a
 * configuration, never a code edit, and `--print-config` writes the resolved result back out as a
 * file that reproduces the run.
 *
 * Plugins are `{ name, options }`. In files a plugin is a name (`sampler: ddim`) or an object with
 * the name and its options side by side (`guidance: { name: dipsy, negativeScale: 4 }`). When a
 * later layer switches to another plugin, the earlier options that the new plugin also declares
 * are kept (switching `dipsy` to `single-ip` keeps `textScale`), the others are dropped.
 */
import { existsSync, statSync } from "node:fs";
import { dirname, isAbsolute, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import YAML from "yaml";
import { UserError } from "../ffi/errors.ts";
import {
  type Guidance,
  type Plugin,
  type PluginDef,
  type PluginKind,
  type Registry,
  registry,
  type Sampler,
  type SamplerPair,
  type SchedulerConfig,
  UnknownPluginError,
} from "./plugins.ts";
import * as s from "./schema.ts";

/** The Stable Diffusion 1.5 weights (diffusers layout) DIPSY uses. */
export const DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5";
/** IP-Adapter Plus for SD1.5, as `org/name/<file in the repo>`. */
export const DEFAULT_IP_ADAPTER = "h94/IP-Adapter/models/ip-adapter-plus_sd15.safetensors";
/** Its CLIP image encoder (OpenCLIP ViT-H/14), as `org/name/<folder in the repo>`. */
export const DEFAULT_IMAGE_ENCODER = "h94/IP-Adapter/models/image_encoder";
/** CLIP ViT-B/16 for class similarity; refs/pr/10 is the revision with safetensors weights. */
export const DEFAULT_CLIP = "openai/clip-vit-base-patch16@refs/pr/10";
/** The model name that selects the embedded tiny models (random weights, no files). */
export const TINY = "tiny";

/** A plugin as the configuration chooses it: its name and the options given for it. */
export interface PluginChoice {
  /** The registered name. */
  name: string;
  /** The options given (the plugin's schema fills in the rest). */
  options: Record<string, unknown>;
}

/** The weights' dtype; "auto": f16 on CUDA, f32 on the CPU. */
export type DTypeChoice = "auto" | "f32" | "f16" | "bf16";

/**
 * The run's plain settings, as RUN_FIELDS checks them and documents each (`dipsy generate --help`,
 * `configFieldDocs()`). Written out for the public API's documentation; the compiler holds it
 * equal to the schema (see SAME_AS_SCHEMA), so the two cannot drift.
 */
export interface RunSettings {
  /** The preset the settings start from. */
  preset: string;
  /** Few-shot images: `DIR/<class>/*`, or the DataDream layout. */
  data: string | null;
  /** Output folder. */
  out: string | null;
  /** SD1.5 diffusers folder or Hub id, or "tiny". */
  model: string;
  /** IP-Adapter file. */
  ipAdapter: string;
  /** The negative image's IP-Adapter file (null: ipAdapter). */
  negativeIpAdapter: string | null;
  /** The IP-Adapter's image encoder. */
  imageEncoder: string;
  /** CLIP for class similarity (null: the default, tiny with the tiny model). */
  clip: string | null;
  /** Seed of the tiny models' random weights. */
  modelSeed: number;
  /** "auto", "f32", "f16" or "bf16". */
  dtype: DTypeChoice;
  /** "auto", "cpu", "cuda" or "cuda:N". */
  device: string;
  /** Denoising steps. */
  steps: number;
  /** Image width in pixels (null: the model's). */
  width: number | null;
  /** Image height in pixels (null: the model's). */
  height: number | null;
  /** Images per class. */
  perClass: number;
  /** Run seed: the same seed gives the same images. */
  seed: number;
  /** Images per model call. */
  batch: number;
  /** Prompt template with `{class}`; "" is the empty prompt (null: the dataset's). */
  prompt: string | null;
  /** Dataset name: prompt template, DataDream folder, a benchmark's class names. */
  dataset: string | null;
  /** DataDream few-shot split when there are several. */
  fewshotSeed: string | number | null;
  /** The first k ranked shots of each class (null: all). */
  shots: number | null;
  /** The last n shots of each class, kept out of generation (a validation split). */
  holdout: number | null;
  /** Class similarity file (null: found or computed). */
  similarity: string | null;
  /** JPEG quality. */
  quality: number;
  /** Leave unreadable or broken shots out instead of stopping. */
  skipBad: boolean;
}

/** Everything a generation run is made of: the settings, defaults filled in, and the plugins. */
export type RunConfig = RunSettings & {
  /** DataDream layout: the few-shot split ("seed0", or a number read as its text). */
  fewshotSeed: string | null;
  /** How the UNet predictions of a step are combined (Eq. 9 by default). */
  guidance: PluginChoice;
  /** The diffusion scheduler. */
  sampler: PluginChoice;
  /** How each image's positive and negative references are chosen. */
  pairs: PluginChoice;
  /** Plugin modules loaded before anything is resolved (absolute paths). */
  plugins: string[];
};

const PLUGIN_KEYS = ["guidance", "sampler", "pairs"] as const;
/** The configuration keys that choose a plugin. */
export type PluginKey = typeof PLUGIN_KEYS[number];

// ---------------------------------------------------------------------------------------------
// Presets

/** One layer's choice of a plugin; without a name, options added to the current plugin. */
export type PluginLayer = Omit<PluginChoice, "name"> & { name?: string };

/** One source of values (a preset, a file, the command line), with the plugins it chooses. */
export type ConfigLayer =
  & {
    /** Where the values came from, for error messages. */
    source: string;
    /** The settings this layer gives, checked. */
    values: Partial<Omit<RunConfig, PluginKey | "plugins">>;
    /** Plugin files this layer loads. */
    plugins?: string[];
  }
  & Partial<Record<PluginKey, PluginLayer>>;

/** A named configuration: what it is, the paper's name for it, and the layer it applies. */
export type Preset = ReturnType<typeof preset>;

function preset(
  description: string,
  paper: string,
  guidance: string,
  pairs: string,
  augment: boolean,
  prompt: string | null = null,
) {
  return {
    description,
    paper,
    layer: {
      values: { prompt },
      guidance: { name: guidance, options: {} },
      pairs: { name: pairs, options: { augment } },
    },
  };
}

/**
 * The rows of the DIPSY paper's ablations. Each sets the guidance, the pair sampler (with its
 * augmentation switch) and the prompt, so that switching presets switches all three.
 */
export const PRESETS: Readonly<Record<string, Preset>> = {
  dipsy: preset(
    "dual IP-Adapter guidance (Eq. 9), negative class by CLIP similarity, augmented references",
    "DIPSY (full method)",
    "dipsy",
    "class-similarity",
    true,
  ),
  "no-negative": preset(
    "one IP-Adapter with the positive image only (Eq. 8), augmented references",
    "w/o negative guidance",
    "single-ip",
    "none",
    true,
  ),
  "uniform-negative": preset(
    "dual guidance, negative class drawn uniformly instead of by similarity",
    "w/o class similarity",
    "dipsy",
    "uniform",
    true,
  ),
  "no-augment": preset(
    "dual guidance with similarity negatives, references not augmented",
    "w/o augmentation",
    "dipsy",
    "class-similarity",
    false,
  ),
  "no-negative-no-augment": preset(
    "one IP-Adapter, positive only, references not augmented",
    "w/o negative, w/o augmentation",
    "single-ip",
    "none",
    false,
  ),
  "uniform-no-augment": preset(
    "dual guidance, uniform negative class, references not augmented",
    "w/o class similarity, w/o augmentation",
    "dipsy",
    "uniform",
    false,
  ),
  sd15: preset(
    "plain SD1.5 text-to-image with classifier-free guidance, no IP-Adapter loaded",
    "SD1.5 without adapters",
    "cfg",
    "none",
    false,
  ),
  "empty-prompt": preset(
    'DIPSY with the empty text prompt "" for every class',
    "empty text prompt",
    "dipsy",
    "class-similarity",
    true,
    "",
  ),
  "single-ip": preset(
    "one IP-Adapter (Eq. 8), the same configuration as no-negative",
    "single IP-Adapter",
    "single-ip",
    "none",
    true,
  ),
};

// ---------------------------------------------------------------------------------------------
// Field checks

/** Settings that cannot be used; every problem is listed (one alone fits on one line). */
export class ConfigError extends UserError {
  constructor(readonly problems: string[]) {
    super(
      problems.length === 1
        ? `configuration: ${problems[0]}`
        : `configuration: ${problems.length} problems\n` +
          problems.map((p) => `  - ${p}`).join("\n"),
    );
  }
}

/** Fields whose text is a path (relative to the file or the caller) or a model reference. */
const PATHS = new WeakSet<s.Schema<unknown>>(), REFS = new WeakSet<s.Schema<unknown>>();
const mark = <T>(set: WeakSet<s.Schema<unknown>>, field: s.Schema<T>) => (set.add(field), field);

const REF = { pattern: /\S/, patternText: "a folder, file or Hub id (not empty)" };
const ref = (description: string, value: string) =>
  mark(REFS, s.string({ ...REF, default: value, description }));
const nullableRef = (description: string) =>
  mark(REFS, s.nullable(s.string(REF), { default: null, description }));
const count = (description: string, value: number, min: number, max?: number) =>
  s.integer({ min, max, default: value, description });
const nullableCount = (description: string, min: number) =>
  s.nullable(s.integer({ min }), { default: null, description });
const text = (description: string) => s.nullable(s.string(), { default: null, description });
const path = (description: string) => mark(PATHS, text(description));

/** The run's settings besides its plugins: one declaration each (type, default, bounds, doc). */
export const RUN_FIELDS = s.options({
  preset: s.string({
    default: "dipsy",
    description: `named configuration (${Object.keys(PRESETS).join(", ")})`,
  }),
  data: path("few-shot input folder"),
  out: path("output folder"),
  model: ref("SD1.5 diffusers folder or Hub id, or tiny", DEFAULT_MODEL),
  // Also `org/name@revision:path`; unused by text-only guidance.
  ipAdapter: ref("IP-Adapter file, or org/name/file in a Hub repo", DEFAULT_IP_ADAPTER),
  negativeIpAdapter: nullableRef("the negative image's IP-Adapter file (default: ipAdapter)"),
  imageEncoder: ref("image encoder folder, or org/name/folder", DEFAULT_IMAGE_ENCODER),
  clip: nullableRef(
    `CLIP for class similarity, or tiny (default: ${DEFAULT_CLIP}, tiny with tiny)`,
  ),
  modelSeed: count("seed of the tiny models' random weights", 0, 0),
  dtype: s.choice<DTypeChoice>(
    ["auto", "f32", "f16", "bf16"],
    "auto",
    "auto (f16 on CUDA, f32 on CPU), f32, f16 or bf16",
  ),
  device: s.string({
    pattern: /^(auto|cpu|cuda(:\d+)?)$/,
    patternText: "auto, cpu, cuda or cuda:N",
    default: "auto",
    description: "auto, cpu, cuda or cuda:N",
  }),
  steps: count("denoising steps", 50, 1, 1000),
  width: nullableCount("image width in pixels (default: the model's)", 8),
  height: nullableCount("image height in pixels (default: the model's)", 8),
  perClass: count("images per class", 200, 1),
  seed: count("run seed", 0, 0),
  // Fixed, so that resumed and sharded runs give the same bytes.
  batch: count("images per model call", 4, 1),
  prompt: text('prompt template with {c}; "" for the empty prompt; null: the dataset\'s'),
  dataset: text("dataset name"),
  fewshotSeed: s.nullable(
    s.oneOf<string | number>([s.string(), s.integer({ min: 0 })], {
      expected: "a split name or number",
    }),
    { default: null, description: "DataDream few-shot split" },
  ),
  shots: nullableCount("first k ranked shots per class", 1),
  holdout: nullableCount("last n shots per class held out for validation", 0),
  similarity: path("class similarity file"),
  quality: count("JPEG quality", 95, 1, 100),
  skipBad: s.boolean({ default: false, description: "leave bad shots out" }),
});

type Schema = Required<s.Infer<typeof RUN_FIELDS>>;
/** A type error here: RunSettings and RUN_FIELDS disagree on a field. */
const SAME_AS_SCHEMA: [RunSettings, Schema] extends [Schema, RunSettings] ? true : never = true;
void SAME_AS_SCHEMA;

/** The built-in values of every setting (RUN_FIELDS' defaults and the default plugins). */
export const DEFAULTS: Readonly<RunConfig> = Object.freeze({
  ...s.defaultsOf(RUN_FIELDS),
  guidance: { name: "dipsy", options: {} },
  sampler: { name: "dpm-solver++", options: {} },
  pairs: { name: "class-similarity", options: {} },
  plugins: [],
}) as unknown as RunConfig;

/** The run's settings for help texts: name, type, default, description. */
export function configFieldDocs(): s.FieldDoc[] {
  return s.fieldDocs(RUN_FIELDS);
}

function expandPath(p: string, baseDir: string): string {
  if (p.startsWith("~/") || p === "~") {
    const home = Deno.env.get("HOME");
    if (home) return resolve(home, p.slice(2));
  }
  return isAbsolute(p) ? p : resolve(baseDir, p);
}

/** Model references stay verbatim (Hub ids) unless written as relative paths. */
function expandRef(p: string, baseDir: string): string {
  return /^\.\.?(\/|$)/.test(p) || p.startsWith("~") ? expandPath(p, baseDir) : p;
}

/** Parses a value given as text (command line, --set) for a field that is not a string. */
function fromText(text: string): unknown {
  try {
    return YAML.parse(text);
  } catch {
    return text;
  }
}

const show = (v: unknown): string => String(JSON.stringify(v) ?? v);

function isObject(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === "object" && !Array.isArray(v);
}

function pluginLayer(
  key: PluginKey,
  raw: unknown,
  problems: string[],
): PluginLayer | undefined {
  if (typeof raw === "string") {
    if (!raw.trim()) problems.push(`"${key}" must name a plugin`);
    return { name: raw.trim(), options: {} };
  }
  if (!isObject(raw)) {
    problems.push(`"${key}" must be a plugin name or { name, ...options }, got ${show(raw)}`);
    return undefined;
  }
  const { name, options, ...rest } = raw;
  if (name !== undefined && (typeof name !== "string" || !name.trim())) {
    problems.push(`"${key}.name" must be a plugin name, got ${show(name)}`);
    return undefined;
  }
  if (options !== undefined && !isObject(options)) {
    problems.push(`"${key}.options" must be an object, got ${show(options)}`);
    return undefined;
  }
  return { name: name as string | undefined, options: { ...(options ?? {}), ...rest } };
}

export interface ParseOptions {
  /** Relative paths are taken from here (a file's folder; the working folder for flags). */
  baseDir?: string;
  /** Values are text (command-line flags): numbers and booleans are parsed from it. */
  textual?: boolean;
  /** How messages name a key, e.g. by its command-line flag (default: the key in quotes). */
  labels?: Readonly<Record<string, string>>;
}

/** Checks one source of configuration values; every problem is reported at once. */
export function parseConfigObject(
  raw: unknown,
  source: string,
  opts: ParseOptions = {},
): ConfigLayer {
  const baseDir = opts.baseDir ?? Deno.cwd();
  if (!isObject(raw)) {
    throw new ConfigError([`${source}: expected an object of settings, got ${show(raw)}`]);
  }
  const problems: string[] = [];
  const layer: ConfigLayer = { source, values: {} };
  const fields: s.Shape = RUN_FIELDS.shape;
  const known = [...Object.keys(fields), ...PLUGIN_KEYS, "plugins"];
  for (const [key, value] of Object.entries(raw)) {
    if (value === undefined) continue;
    if ((PLUGIN_KEYS as readonly string[]).includes(key)) {
      const p = pluginLayer(key as PluginKey, value, problems);
      if (p) layer[key as PluginKey] = p;
    } else if (key === "plugins") {
      const list = typeof value === "string" ? [value] : value;
      if (!Array.isArray(list) || list.some((p) => typeof p !== "string" || !p)) {
        problems.push(`"plugins" must be a list of plugin file paths, got ${show(value)}`);
      } else {
        layer.plugins = list.map((p) => expandPath(p, baseDir));
      }
    } else if (Object.hasOwn(fields, key)) {
      const schema = fields[key].schema;
      const ctx: s.CheckContext = { issues: [], text: opts.textual ?? false };
      // An empty flag unsets a model reference or path ("--clip ''": the default).
      const empty = ctx.text && value === "" && schema.type.endsWith(" | null");
      let v = empty ? null : schema.check(value, key, ctx);
      const label = opts.labels?.[key] ?? `"${key}"`;
      problems.push(...ctx.issues.map((i) => `${label} ${i.message}`));
      if (ctx.issues.length) continue;
      if (typeof v === "string" && PATHS.has(schema)) v = v === "" ? null : expandPath(v, baseDir);
      if (typeof v === "string" && REFS.has(schema)) v = expandRef(v, baseDir);
      if (key === "fewshotSeed" && typeof v === "number") v = String(v);
      (layer.values as Record<string, unknown>)[key] = v;
    } else {
      problems.push(s.unknownKey(key, known, "setting"));
    }
  }
  if (problems.length) throw new ConfigError(problems.map((p) => `${source}: ${p}`));
  return layer;
}

/** Reads a JSON (.json) or YAML (.yaml, .yml, anything else) configuration file. */
export async function readConfigFile(path: string): Promise<ConfigLayer> {
  const abs = resolve(path), format = /\.json$/i.test(abs) ? "JSON" : "YAML";
  const text = await Deno.readTextFile(abs).catch((e) => {
    throw new ConfigError([`config file ${abs}: ${e instanceof Error ? e.message : e}`]);
  });
  let raw: unknown;
  try {
    raw = format === "JSON" ? JSON.parse(text) : YAML.parse(text);
  } catch (e) {
    throw new ConfigError([
      `config file ${abs}: not valid ${format} ` +
      `(${e instanceof Error ? e.message.split("\n")[0] : e})`,
    ]);
  }
  return parseConfigObject(raw ?? {}, `config file ${abs}`, { baseDir: dirname(abs) });
}

/**
 * `--set key=value` overrides: `steps=30`, `guidance.negativeScale=4`, `pairs.augment=false`,
 * `guidance.name=single-ip`. Values are read as YAML scalars (numbers, booleans, lists).
 */
export function parseSets(specs: readonly string[], source = "--set"): ConfigLayer {
  const raw: Record<string, unknown> = {};
  const problems: string[] = [];
  for (const spec of specs) {
    const eq = spec.indexOf("=");
    if (eq <= 0) {
      problems.push(`${source} ${JSON.stringify(spec)}: expected key=value`);
      continue;
    }
    const key = spec.slice(0, eq).trim(), text = spec.slice(eq + 1);
    const dot = key.indexOf(".");
    if (dot > 0) {
      const head = key.slice(0, dot), option = key.slice(dot + 1);
      if (!(PLUGIN_KEYS as readonly string[]).includes(head)) {
        problems.push(
          `${source} ${key}: only guidance.*, sampler.* and pairs.* take a dotted key`,
        );
        continue;
      }
      const obj = (raw[head] ??= {}) as Record<string, unknown>;
      obj[option] = option === "name" ? text : fromText(text);
    } else {
      raw[key] = Object.hasOwn(RUN_FIELDS.shape, key) ? text : fromText(text);
    }
  }
  if (problems.length) throw new ConfigError(problems);
  return parseConfigObject(raw, source, { textual: true });
}

// ---------------------------------------------------------------------------------------------
// Resolution

function mergePlugin(
  reg: Registry,
  key: PluginKey,
  current: PluginChoice,
  layer: PluginLayer,
): PluginChoice {
  if (!layer.name || layer.name === current.name) {
    return { name: current.name, options: { ...current.options, ...layer.options } };
  }
  const declared = reg.has(key, layer.name) ? reg.definition(key, layer.name).schema.shape : {};
  const kept = Object.fromEntries(
    Object.entries(current.options).filter(([k]) => Object.hasOwn(declared, k)),
  );
  return { name: layer.name, options: { ...kept, ...layer.options } };
}

/** The plugin files named by any layer, in order, each once. */
export function pluginFiles(layers: readonly ConfigLayer[]): string[] {
  return [...new Set(layers.flatMap((l) => l.plugins ?? []))];
}

/** Each plugin's options as it runs with them; those of a plugin that does not resolve are
 * left out and its problem added to `problems`. */
function resolvePlugins(
  config: RunConfig,
  reg: Registry,
  problems: string[],
): Record<PluginKey, Record<string, unknown>> {
  const settings = {} as Record<PluginKey, Record<string, unknown>>;
  for (const key of PLUGIN_KEYS) {
    try {
      settings[key] = reg.resolve(key, config[key].name, config[key].options);
    } catch (e) {
      if (!(e instanceof UserError)) throw e;
      problems.push(
        e instanceof UnknownPluginError ? `${e.message}; --plugin FILE adds more` : e.message,
      );
    }
  }
  return settings;
}

/**
 * Resolves layers (file first, then flags) over the defaults and the preset they choose. Plugin
 * names are checked against `reg`, so load plugin files first (`loadPluginFiles`).
 */
export function resolveConfig(layers: readonly ConfigLayer[], reg: Registry = registry): RunConfig {
  const problems: string[] = [];
  const presetName = layers.findLast((l) => l.values.preset !== undefined)?.values.preset ??
    DEFAULTS.preset;
  const chosen = PRESETS[presetName];
  if (!chosen) {
    throw new ConfigError([
      `unknown preset "${presetName}" (available: ${Object.keys(PRESETS).join(", ")})`,
    ]);
  }
  const all: ConfigLayer[] = [{ source: `preset ${presetName}`, ...chosen.layer }, ...layers];
  const config = structuredClone(DEFAULTS) as RunConfig;
  for (const layer of all) {
    Object.assign(config, layer.values);
    for (const key of PLUGIN_KEYS) {
      const p = layer[key];
      if (p) config[key] = mergePlugin(reg, key, config[key], p);
    }
  }
  config.preset = presetName;
  config.plugins = pluginFiles(layers);

  // A misspelt option would otherwise run with the default and be recorded as if it had been
  // applied: a sweep with one typo would silently produce wrong data.
  resolvePlugins(config, reg, problems);
  if (config.prompt !== null) {
    // "{class}" is the spelling users reach for first; "{c}" is the template language.
    config.prompt = config.prompt.replaceAll("{class}", "{c}");
    if (config.prompt !== "" && !config.prompt.includes("{c}")) {
      problems.push(
        `prompt "${config.prompt}" has no {c} (or {class}) for the class name; ` +
          `use "" for the empty prompt`,
      );
    }
  }
  if ((config.width === null) !== (config.height === null)) {
    problems.push("set both width and height (or --size), or neither");
  }
  if (problems.length) throw new ConfigError(problems);
  return config;
}

/** A plugin as records show it: its name and its resolved options. */
export interface PluginRecord {
  name: string;
  [option: string]: unknown;
}

/**
 * Builds the plugins of a resolved configuration once, from their resolved options: what
 * `generate`, the CLI and the server hand down instead of rebuilding them. A bad option is a
 * ConfigError naming it.
 */
export function resolveRun(config: RunConfig, reg: Registry = registry) {
  const problems: string[] = [];
  const settings = resolvePlugins(config, reg, problems);
  if (problems.length) throw new ConfigError(problems);
  const build = <P extends Plugin>(key: PluginKey): P => {
    try {
      return reg.create<P>(key, config[key].name, settings[key]);
    } catch (e) {
      throw e instanceof UserError ? new ConfigError([e.message]) : e;
    }
  };
  return {
    config,
    guidance: build<Guidance>("guidance"),
    pairs: build<SamplerPair>("pairs"),
    /** Each plugin as manifests record it: its name (the sampler's steps) and resolved options. */
    records: {
      guidance: { name: config.guidance.name, ...settings.guidance } as PluginRecord,
      sampler: { name: config.sampler.name, steps: config.steps, ...settings.sampler },
      pairs: { name: config.pairs.name, ...settings.pairs } as PluginRecord,
    },
    /** A fresh sampler (samplers keep multistep history) for the model's scheduler config. */
    sampler: (schedulerConfig: SchedulerConfig): Sampler =>
      reg.create<Sampler>("sampler", config.sampler.name, {
        ...settings.sampler,
        steps: config.steps,
        config: schedulerConfig,
      }),
    /**
     * A recorded plugin (an older run.json's, which left defaults out) with its options resolved
     * as this version resolves them; unchanged when they no longer resolve.
     */
    resolveRecord: (key: PluginKey, record: PluginRecord): PluginRecord => {
      const { name, ...options } = record;
      const top = key === "sampler" ? { steps: options.steps } : {};
      if (key === "sampler") delete options.steps;
      try {
        return { name, ...top, ...reg.resolve(key, name, options) };
      } catch (e) {
        if (e instanceof UserError) return record;
        throw e;
      }
    },
  };
}

/** A configuration with its plugins built once (see resolveRun). */
export type ResolvedRun = ReturnType<typeof resolveRun>;

/** The CLIP used for class similarity (the `clip` setting with its default filled in). */
export function similarityClip(config: RunConfig): string {
  return config.clip ?? (config.model === TINY ? TINY : DEFAULT_CLIP);
}

/** The resolved configuration as YAML, loadable with `--config` (data/out left out when unset). */
export function formatConfig(config: RunConfig): string {
  const plain: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(config)) {
    if (v === null && (k === "data" || k === "out" || k === "similarity")) continue;
    if (k === "plugins" && (v as string[]).length === 0) continue;
    if (PLUGIN_KEYS.includes(k as PluginKey)) {
      const p = v as PluginChoice;
      plain[k] = Object.keys(p.options).length ? { name: p.name, ...p.options } : p.name;
    } else {
      plain[k] = v;
    }
  }
  return YAML.stringify(plain);
}

// ---------------------------------------------------------------------------------------------
// Plugin files

const PLUGIN_KINDS: readonly PluginKind[] = ["sampler", "guidance", "pairs", "classifier"];
const loaded = new Map<string, PluginDef[]>();

function checkDef(d: unknown, where: string): PluginDef {
  const def = d as PluginDef;
  if (
    !isObject(d) || !PLUGIN_KINDS.includes(def.kind) || typeof def.name !== "string" ||
    !def.name || typeof def.create !== "function" || !isObject(def.schema?.shape)
  ) {
    throw new ConfigError([
      `${where}: every entry of "plugins" must be { kind (${PLUGIN_KINDS.join(", ")}), name, ` +
      `description, schema (an options schema of core/schema.ts), create(options) }`,
    ]);
  }
  return def;
}

/**
 * Imports a plugin module. It registers its plugins itself (`registry.register(def)`) or exports
 * them (`export const plugins: PluginDef[]`), which are then registered here. Returns the
 * plugins the file added. Loading the same file twice is harmless.
 */
export async function loadPluginFile(path: string, reg: Registry = registry): Promise<PluginDef[]> {
  const abs = resolve(path);
  const seen = loaded.get(abs);
  if (seen) return seen;
  if (!existsSync(abs) || !statSync(abs).isFile()) {
    throw new ConfigError([`plugin file ${abs} does not exist`]);
  }
  const before = new Set(reg.list());
  const mod: Record<string, unknown> = await import(pathToFileURL(abs).href).catch((e) => {
    throw new ConfigError([
      `plugin file ${abs}: cannot load it: ${e instanceof Error ? e.message : e}`,
    ]);
  });
  for (const d of [mod.plugins ?? mod.default ?? []].flat()) {
    const def = checkDef(d, `plugin file ${abs}`);
    if (reg.list(def.kind).includes(def)) continue;
    if (reg.has(def.kind, def.name)) {
      throw new ConfigError([
        `plugin file ${abs}: a ${def.kind} plugin named "${def.name}" exists already; ` +
        "give yours another name",
      ]);
    }
    reg.register(def);
  }
  const added = reg.list().filter((d) => !before.has(d));
  if (added.length === 0) {
    throw new ConfigError([
      `plugin file ${abs} added no plugin: export \`plugins: PluginDef[]\` or call ` +
      "registry.register(def) from the project's core/plugins.ts",
    ]);
  }
  loaded.set(abs, added);
  return added;
}

/** Loads every plugin file of the layers, in order. */
export async function loadPluginFiles(
  layers: readonly ConfigLayer[],
  reg: Registry = registry,
): Promise<PluginDef[]> {
  const out: PluginDef[] = [];
  for (const f of pluginFiles(layers)) out.push(...await loadPluginFile(f, reg));
  return out;
}
