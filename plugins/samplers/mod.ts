/**
 * Sampler plugins: diffusion schedulers that match diffusers' classes of the same name step for
 * step. "dpm-solver++" is the default (the official DIPSY setting); "ddim" is DataDream's.
 *
 * Every sampler takes `{ steps, config }` (config from `readSchedulerConfig`, resolved as
 * `Class.from_config(config)` resolves it) and any scheduler_config.json key as an override,
 * e.g. `{ timestep_spacing: "trailing" }`.
 */
import type { PluginDef, Sampler, SamplerOptions } from "../../core/plugins.ts";
import { registry } from "../../core/plugins.ts";
import { DdimSampler } from "./ddim.ts";
import { DpmSolverSampler } from "./dpm_solver.ts";
import { EulerSampler } from "./euler.ts";

export { DDIM_KEYS, DdimSampler } from "./ddim.ts";
export { DPM_KEYS, DpmSolverSampler } from "./dpm_solver.ts";
export { EULER_KEYS, EulerSampler } from "./euler.ts";
export {
  parseSchedulerConfig,
  readSchedulerConfig,
  SD15_SCHEDULER_CONFIG,
  SD15_SCHEDULER_JSON,
} from "./schedule.ts";

export const DEFAULT_SAMPLER = "dpm-solver++";

type Options = PluginDef["options"];

const COMMON: Options = {
  steps: { description: "number of denoising steps (DIPSY: 50)" },
  config: {
    description:
      "scheduler config (scheduler/scheduler_config.json), read as diffusers' from_config",
  },
  timestep_spacing: {
    description:
      "override: leading | linspace | trailing (from_config of the SD1.5 config: linspace for dpm-solver++ and euler, leading for ddim)",
  },
  prediction_type: { description: "override: epsilon | v_prediction | sample", default: "epsilon" },
};

export const dpmSolver: PluginDef<Sampler, SamplerOptions> = {
  kind: "sampler",
  name: "dpm-solver++",
  description:
    "DPM-Solver++ multistep (diffusers DPMSolverMultistepScheduler), the official DIPSY sampler",
  options: {
    ...COMMON,
    solver_order: { description: "1, 2 or 3", default: 2 },
    solver_type: { description: "midpoint | heun", default: "midpoint" },
    lower_order_final: {
      description: "lower-order steps at the end when steps < 15",
      default: true,
    },
    euler_at_final: { description: "first-order last step", default: false },
    final_sigmas_type: { description: "zero | sigma_min", default: "zero" },
  },
  create: (o) => new DpmSolverSampler(o),
};

export const ddim: PluginDef<Sampler, SamplerOptions> = {
  kind: "sampler",
  name: "ddim",
  description:
    "DDIM (diffusers DDIMScheduler); eta > 0 draws variance noise from the step's generator",
  options: {
    ...COMMON,
    eta: { description: "stochasticity: 0 deterministic DDIM, 1 DDPM-like", default: 0 },
    clip_sample: { description: "clamp the predicted x0", default: "from config" },
    set_alpha_to_one: {
      description: "alpha product after the last step is 1",
      default: "from config",
    },
  },
  create: (o) => new DdimSampler(o),
};

export const euler: PluginDef<Sampler, SamplerOptions> = {
  kind: "sampler",
  name: "euler",
  description: "Euler in sigma space (diffusers EulerDiscreteScheduler, no churn)",
  options: {
    ...COMMON,
    final_sigmas_type: { description: "zero | sigma_min", default: "zero" },
  },
  create: (o) => new EulerSampler(o),
};

export const SAMPLER_PLUGINS = [dpmSolver, ddim, euler];

for (const def of SAMPLER_PLUGINS) if (!registry.has(def.kind, def.name)) registry.register(def);
