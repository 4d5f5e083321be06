/**
 * Sampler plugins: diffusion schedulers that match diffusers' classes of the same name step for
 * step. "dpm-solver++" is the default (the official DIPSY setting); "ddim" is DataDream's.
 *
 * Every sampler is built from `{ steps, config }` (config from `readSchedulerConfig`, resolved as
 * `Class.from_config(config)` resolves it), which the host supplies, and takes any of its
 * scheduler_config.json keys as an option that overrides the file, e.g.
 * `{ timestep_spacing: "trailing" }`.
 */
import type { PluginDef, Sampler, SamplerOptions } from "../../core/plugins.ts";
import { DDIM_KEYS, DDIM_OPTIONS, DdimSampler } from "./ddim.ts";
import { DPM_KEYS, DpmSolverSampler } from "./dpm_solver.ts";
import { EULER_KEYS, EulerSampler } from "./euler.ts";
import { samplerSchema } from "./schedule.ts";

export { DDIM_KEYS } from "./ddim.ts";
export { DpmSolverSampler } from "./dpm_solver.ts";
export { EulerSampler } from "./euler.ts";
export { parseSchedulerConfig, readSchedulerConfig, SD15_SCHEDULER_CONFIG } from "./schedule.ts";

export const DEFAULT_SAMPLER = "dpm-solver++";

/** What the host passes besides the options: the step count and the model's scheduler config. */
const SAMPLER_RUNTIME = ["steps", "config"] as const;

/** Help lines of the overrides users reach for; the others say "override". */
const DESCRIPTIONS: Record<string, string> = {
  timestep_spacing: "leading | linspace | trailing; default: the scheduler config's, as " +
    "from_config reads it (linspace for dpm-solver++ and euler, leading for ddim on SD1.5)",
  prediction_type: "epsilon | v_prediction | sample; default: the scheduler config's",
  solver_order: "1, 2 or 3 (default 2)",
  solver_type: "midpoint | heun (default midpoint)",
  lower_order_final: "lower-order steps at the end when steps < 15 (default true)",
  euler_at_final: "first-order last step (default false)",
  final_sigmas_type: "zero | sigma_min (default zero)",
  clip_sample: "clamp the predicted x0; default: the scheduler config's",
  set_alpha_to_one: "alpha product after the last step is 1; default: the scheduler config's",
};

const dpmSolver: PluginDef<Sampler, SamplerOptions> = {
  kind: "sampler",
  name: "dpm-solver++",
  description:
    "DPM-Solver++ multistep (diffusers DPMSolverMultistepScheduler), the official DIPSY sampler",
  schema: samplerSchema(DPM_KEYS, {}, DESCRIPTIONS),
  runtime: SAMPLER_RUNTIME,
  create: (o) => new DpmSolverSampler(o),
};

const ddim: PluginDef<Sampler, SamplerOptions> = {
  kind: "sampler",
  name: "ddim",
  description:
    "DDIM (diffusers DDIMScheduler); eta > 0 draws variance noise from the step's generator",
  schema: samplerSchema(DDIM_KEYS, DDIM_OPTIONS, DESCRIPTIONS),
  runtime: SAMPLER_RUNTIME,
  create: (o) => new DdimSampler(o),
};

const euler: PluginDef<Sampler, SamplerOptions> = {
  kind: "sampler",
  name: "euler",
  description: "Euler in sigma space (diffusers EulerDiscreteScheduler, no churn)",
  schema: samplerSchema(EULER_KEYS, {}, DESCRIPTIONS),
  runtime: SAMPLER_RUNTIME,
  create: (o) => new EulerSampler(o),
};

export const SAMPLER_PLUGINS: PluginDef<Sampler, SamplerOptions>[] = [dpmSolver, ddim, euler];
