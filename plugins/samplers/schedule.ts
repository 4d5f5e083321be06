/**
 * What the samplers share: reading `scheduler_config.json`, resolving it the way diffusers'
 * `from_config` does, the noise schedule, and the timestep spacings.
 *
 * Parity is exact, not approximate. The schedule is built with the same float32 torch ops diffusers
 * uses (linspace, pow, cumprod), spacings repeat numpy's float64 arithmetic (including its
 * round-half-to-even), and per-step coefficients are computed in float32 as diffusers computes them
 * on 0-dim tensors: `+ - * /` with Math.fround (correctly rounded either way), and sqrt, log and exp
 * through torch itself, whose float32 results differ from correctly rounded ones in the last bit.
 */
import { statSync } from "node:fs";
import { join } from "node:path";
import type { SamplerOptions, SchedulerConfig } from "../../core/plugins.ts";
import { fromHost, ops, scalar, scope, type Tensor } from "../../ffi/mod.ts";
import { ConfigFileError, configObject, readModelConfig } from "../../core/json_config.ts";
import * as s from "../../core/schema.ts";

/** A `scheduler_config.json` that cannot be read. */
export class SchedulerConfigError extends ConfigFileError {}

// ---------------------------------------------------------------------------------------------
// scheduler_config.json

/** The config key diffusers uses to list keys that were absent from the file. */
const DEFAULTED = "_use_default_values";
/** Where a config came from, for error messages. */
const SOURCE = "_source";

/** The `scheduler/scheduler_config.json` that Stable Diffusion 1.5 ships (a PNDMScheduler config). */
export const SD15_SCHEDULER_JSON: Readonly<Record<string, unknown>> = Object.freeze({
  _class_name: "PNDMScheduler",
  _diffusers_version: "0.6.0",
  beta_end: 0.012,
  beta_schedule: "scaled_linear",
  beta_start: 0.00085,
  num_train_timesteps: 1000,
  set_alpha_to_one: false,
  skip_prk_steps: true,
  steps_offset: 1,
  trained_betas: null,
  clip_sample: false,
});

/**
 * Values for the keys `SchedulerConfig` requires, used when the file lacks them. They are listed
 * in `_use_default_values`, so each sampler replaces them with its own defaults, as diffusers'
 * `from_config` does (DDIM spaces "leading", Euler and DPM-Solver "linspace").
 */
const FILL_DEFAULTS = {
  num_train_timesteps: 1000,
  beta_start: 0.0001,
  beta_end: 0.02,
  beta_schedule: "linear",
  prediction_type: "epsilon",
  steps_offset: 0,
  set_alpha_to_one: true,
  clip_sample: true,
  timestep_spacing: "leading",
} as const;

/** A parsed `scheduler_config.json` object; `source` names it in errors. */
export function parseSchedulerConfig(
  json: unknown,
  source = "scheduler_config.json",
): SchedulerConfig {
  const raw = configObject(json, source, SchedulerConfigError);
  const defaulted = new Set<string>(
    Array.isArray(raw[DEFAULTED]) ? raw[DEFAULTED] as string[] : [],
  );
  const filled: Record<string, unknown> = { ...raw };
  for (const [key, value] of Object.entries(FILL_DEFAULTS)) {
    if (filled[key] === undefined) {
      filled[key] = value;
      defaulted.add(key);
    }
  }
  filled[DEFAULTED] = [...defaulted];
  filled[SOURCE] = source;
  return filled as SchedulerConfig;
}

// Python's json writes -Infinity (e.g. DPM-Solver's lambda_min_clipped), which JSON.parse rejects.
const NON_FINITE = /(:\s*)(-?Infinity|NaN)(\s*[,}\]])/g;
const NON_FINITE_TAG = "__dipsy_nonfinite__:";

/**
 * Reads `scheduler_config.json`, given the file, a `scheduler/` folder or a model folder that
 * holds one.
 */
export function readSchedulerConfig(path: string): SchedulerConfig {
  let file = path;
  try {
    if (statSync(path).isDirectory()) {
      const direct = join(path, "scheduler_config.json");
      file = isFile(direct) ? direct : join(path, "scheduler", "scheduler_config.json");
    }
  } catch { /* reported below */ }
  const json = readModelConfig(file, SchedulerConfigError, "scheduler config", {
    parse: (text) =>
      JSON.parse(
        text.replace(NON_FINITE, (_m, a, v, b) => `${a}"${NON_FINITE_TAG}${v}"${b}`),
        (_k, v) =>
          typeof v === "string" && v.startsWith(NON_FINITE_TAG)
            ? Number(v.slice(NON_FINITE_TAG.length))
            : v,
      ),
  });
  return parseSchedulerConfig(json, file);
}

function isFile(p: string): boolean {
  try {
    return statSync(p).isFile();
  } catch {
    return false;
  }
}

/** Stable Diffusion 1.5's scheduler config, as `readSchedulerConfig` returns it. */
export const SD15_SCHEDULER_CONFIG: SchedulerConfig = parseSchedulerConfig(
  SD15_SCHEDULER_JSON,
  "SD1.5 scheduler_config.json",
);

// ---------------------------------------------------------------------------------------------
// Resolving a config for one scheduler class (diffusers' from_config)

export type ConfigValue = number | boolean | string | null | readonly number[];

/**
 * The `__init__` arguments of a diffusers scheduler class, each with the class default. A value
 * this implementation does not run is refused by its schema, naming the key.
 */
export type ConfigSpec = Record<string, s.Schema<ConfigValue>>;

/** The schedule keys every sampler reads; `spacing` is the class's default timestep spacing. */
export function commonKeys(spacing: Spacing) {
  return {
    num_train_timesteps: s.integer({ min: 1, default: 1000 }),
    beta_start: s.number({ default: 0.0001 }),
    beta_end: s.number({ default: 0.02 }),
    beta_schedule: s.choice(BETA_SCHEDULES, "linear"),
    trained_betas: s.nullable(s.array(s.number()), { default: null }),
    prediction_type: s.choice(PREDICTION_TYPES, "epsilon"),
    timestep_spacing: s.choice(SPACINGS, spacing),
    steps_offset: s.integer({ min: 0, default: 0 }),
    rescale_betas_zero_snr: s.literal(false, { default: false }),
  };
}

/** A key the implementation supports one value of, which is also the class default. */
export const only = (value: string | number | boolean | null): s.Schema<ConfigValue> =>
  s.literal(value, { default: value });

export const BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"] as const;
export const PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"] as const;
export const SPACINGS = ["leading", "linspace", "trailing"] as const;
export type Spacing = (typeof SPACINGS)[number];
export type Prediction = (typeof PREDICTION_TYPES)[number];

/** The schedule part of a resolved config. */
export type ScheduleConfig = {
  [K in keyof ReturnType<typeof commonKeys>]: s.Infer<ReturnType<typeof commonKeys>[K]>;
};

export interface Resolved<C> {
  steps: number;
  config: C;
  /** Sampler options that are not config keys (e.g. DDIM's eta), defaults filled in. */
  extra: Record<string, unknown>;
}

/**
 * The options schema of a sampler plugin: every config key as an override without a default
 * (absent: the model's scheduler config decides), and the sampler's own options.
 */
export function samplerSchema(
  spec: ConfigSpec,
  own: Record<string, s.Schema<unknown>> = {},
  descriptions: Record<string, string> = {},
): s.ObjectSchema {
  const overrides = Object.fromEntries(
    Object.entries(spec).map(([k, v]) => {
      const description = descriptions[k] ?? "override of the scheduler config";
      const jsonSchema = () => {
        const { default: _, ...json } = v.jsonSchema();
        return { ...json, description };
      };
      return [k, { ...v, default: undefined, description, jsonSchema }];
    }),
  );
  return s.options({ ...overrides, ...own });
}

/**
 * Builds a scheduler's config from `SamplerOptions` as `Class.from_config(config, **overrides)`
 * would: class defaults, replaced by the keys the config file really holds (not those listed in
 * `_use_default_values`), replaced by options named like config keys. Keys the class does not
 * know are ignored in the config (diffusers warns) but rejected as options (likely typos).
 */
export function resolveConfig<C>(
  options: SamplerOptions,
  spec: ConfigSpec,
  own: Record<string, s.Schema<unknown>> = {},
): Resolved<C> {
  const { steps, config, ...rest } = options;
  if (config === null || typeof config !== "object") {
    throw new Error('option "config" must be a scheduler config (see readSchedulerConfig)');
  }
  const source = typeof config[SOURCE] === "string" ? config[SOURCE] as string : "scheduler config";
  const defaulted = new Set(Array.isArray(config[DEFAULTED]) ? config[DEFAULTED] as string[] : []);
  const checked = s.validate(samplerSchema(spec, own), rest);
  if (!checked.ok) throw new Error(checked.issues.map((i) => s.issueText(i, "option")).join("; "));
  const given = checked.value as Record<string, unknown>;
  const extra = Object.fromEntries(Object.keys(own).map((k) => [k, given[k]]));
  const problems: string[] = [];
  const out: Record<string, ConfigValue> = {};
  for (const [key, rule] of Object.entries(spec)) {
    if (given[key] !== undefined) {
      out[key] = given[key] as ConfigValue;
    } else if (config[key] !== undefined && !defaulted.has(key)) {
      const ctx: s.CheckContext = { issues: [], text: false };
      out[key] = rule.check(config[key], key, ctx) as ConfigValue;
      problems.push(...ctx.issues.map((i) => `${source}: "${key}" ${i.message}`));
    } else {
      out[key] = rule.default as ConfigValue;
    }
  }
  if (problems.length) throw new Error(problems.join("; "));
  const train = out.num_train_timesteps as number;
  if (typeof steps !== "number" || !Number.isInteger(steps) || steps < 1 || steps > train) {
    throw new Error(
      `option "steps" must be an integer from 1 to num_train_timesteps (${train}), got ${
        JSON.stringify(steps)
      }`,
    );
  }
  const betas = out.trained_betas;
  if (Array.isArray(betas) && betas.length !== train) {
    throw new Error(
      `${source}: "trained_betas" has ${betas.length} values, num_train_timesteps is ${train}`,
    );
  }
  return { steps, config: out as C, extra };
}

// ---------------------------------------------------------------------------------------------
// Noise schedule

/** betas and their cumulative alpha product, float32, as diffusers' scheduler constructors. */
export function noiseSchedule(
  c: ScheduleConfig,
): { betas: Float32Array; alphasCumprod: Float32Array } {
  const n = c.num_train_timesteps;
  return scope(() => {
    let betas: Tensor;
    if (c.trained_betas) {
      betas = fromHost(c.trained_betas, [n], "f32");
    } else if (c.beta_schedule === "linear") {
      betas = ops.linspace(c.beta_start, c.beta_end, n, "f32", "cpu");
    } else if (c.beta_schedule === "scaled_linear") {
      const root = ops.linspace(Math.sqrt(c.beta_start), Math.sqrt(c.beta_end), n, "f32", "cpu");
      betas = ops.powScalar(root, 2);
    } else {
      betas = fromHost(cosineBetas(n), [n], "f32");
    }
    const alphasCumprod = ops.cumprod(ops.rsubScalar(betas, 1), 0);
    return {
      betas: betas.toHost() as Float32Array,
      alphasCumprod: alphasCumprod.toHost() as Float32Array,
    };
  });
}

/** The "squaredcos_cap_v2" betas (Nichol & Dhariwal 2021), in float64 like diffusers. */
function cosineBetas(n: number, maxBeta = 0.999): number[] {
  const alphaBar = (t: number) => Math.cos((t + 0.008) / 1.008 * Math.PI / 2) ** 2;
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    out.push(Math.min(1 - alphaBar((i + 1) / n) / alphaBar(i / n), maxBeta));
  }
  return out;
}

/** sqrt((1 - a) / a) in float32: the noise level of each training timestep in sigma space. */
export function trainSigmas(alphasCumprod: Float32Array): Float32Array {
  return scope(() => {
    const a = fromHost(alphasCumprod, [alphasCumprod.length], "f32");
    return ops.powScalar(ops.rsubScalar(a, 1).div(a), 0.5).toHost() as Float32Array;
  });
}

// ---------------------------------------------------------------------------------------------
// Timestep spacing (numpy's float64 arithmetic)

/**
 * The timesteps each diffusers class computes in `set_timesteps`, which differ in detail:
 * DDIM rounds n evenly spaced points; Euler keeps them as float32; DPM-Solver spaces n + 1 points
 * and drops the last, and its "leading" ratio divides by n + 1.
 */
export function spacedTimesteps(
  family: "ddim" | "euler" | "dpm",
  c: Pick<ScheduleConfig, "timestep_spacing" | "num_train_timesteps" | "steps_offset">,
  steps: number,
): number[] {
  const train = c.num_train_timesteps;
  const points = family === "dpm" ? steps + 1 : steps;
  let ts: number[];
  switch (c.timestep_spacing) {
    case "linspace": {
      ts = npLinspace(0, train - 1, points).reverse();
      if (family !== "euler") ts = ts.map(roundHalfEven);
      break;
    }
    case "leading": {
      const ratio = Math.floor(train / points);
      ts = Array.from({ length: points }, (_, i) => i * ratio).reverse();
      ts = ts.map((t) => t + c.steps_offset);
      break;
    }
    case "trailing": {
      ts = npArange(train, 0, -train / steps).map((t) => roundHalfEven(t) - 1);
      break;
    }
  }
  if (family === "dpm") ts = ts.slice(0, steps);
  return family === "euler" ? ts.map(f32) : ts;
}

/** numpy.linspace with endpoint: i * step + start, and the last point exactly `stop`. */
export function npLinspace(start: number, stop: number, num: number): number[] {
  if (num === 1) return [start];
  const step = (stop - start) / (num - 1);
  const out = Array.from({ length: num }, (_, i) => i * step + start);
  out[num - 1] = stop;
  return out;
}

/** numpy.arange for floats: length ceil((stop - start) / step), then start + i * delta. */
export function npArange(start: number, stop: number, step: number): number[] {
  const length = Math.max(0, Math.ceil((stop - start) / step));
  if (length === 0) return [];
  const delta = (start + step) - start;
  return Array.from(
    { length },
    (_, i) => i === 0 ? start : i === 1 ? start + step : start + i * delta,
  );
}

/** numpy.round: halves go to the even neighbour. */
export function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** numpy.interp at x over the grid 0, 1, ..., ys.length - 1 (float64). */
export function npInterpGrid(x: number, ys: ArrayLike<number>): number {
  const last = ys.length - 1;
  if (x <= 0) return ys[0];
  if (x >= last) return ys[last];
  const j = Math.floor(x);
  if (j === x) return ys[j];
  const slope = (ys[j + 1] - ys[j]) / 1;
  return slope * (x - j) + ys[j];
}

// ---------------------------------------------------------------------------------------------
// float32 scalars, as diffusers computes them on 0-dim tensors

export const f32: (x: number) => number = Math.fround;

// Only sqrt, log and exp go through torch: libtorch's float32 sqrt (MKL) is not correctly rounded,
// unlike + - * / and reciprocal, which Math.fround reproduces exactly.

/** torch.log of a float32 0-dim CPU tensor. */
export function logF32(x: number): number {
  return scope(() => ops.log(scalar(x)).item());
}

/** torch.exp of a float32 0-dim CPU tensor. */
export function expF32(x: number): number {
  return scope(() => ops.exp(scalar(x)).item());
}

/** `x ** 0.5` of a float32 0-dim CPU tensor. */
export function sqrtF32(x: number): number {
  return scope(() => ops.powScalar(scalar(x), 0.5).item());
}

/**
 * `c * x` with c a float32 0-dim CPU tensor written first, as diffusers writes most step formulas.
 * The position matters for half tensors on the CPU, whose kernels round a leading scalar to half
 * but keep a trailing one in float32; `x.mul(c)` and `x.div(c)` are the trailing forms.
 */
export function times(c: number, x: Tensor): Tensor {
  return ops.mul(scalar(c), x);
}

/**
 * A schedule value as diffusers' `add_noise` holds it: gathered from a table cast to the sample's
 * dtype and device, shaped to broadcast over a batch.
 */
export function tableValue(v: number, like: Tensor): Tensor {
  return ops.full(like.shape.map(() => 1), v, like.dtype, like.device);
}

/** The step index check every sampler does. */
export function checkIndex(i: number, steps: number, what = "step"): void {
  if (!Number.isInteger(i) || i < 0 || i >= steps) {
    throw new RangeError(`${what} index ${i} is outside 0..${steps - 1}`);
  }
}
