/**
 * DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
 * Diffusion Probabilistic Models", arXiv:2211.01095), step for step as diffusers'
 * DPMSolverMultistepScheduler with algorithm_type "dpmsolver++". It is the official DIPSY sampler.
 *
 * The solver works on data predictions x0; it keeps the last `solver_order` of them (the
 * multistep history), which this object owns and frees on dispose.
 */
import type { Sampler, SamplerOptions } from "../../core/plugins.ts";
import { keep, ops, scope, type Tensor } from "../../ffi/mod.ts";
import * as s from "../../core/schema.ts";
import {
  checkIndex,
  commonKeys,
  type ConfigSpec,
  expF32,
  f32,
  logF32,
  noiseSchedule,
  npInterpGrid,
  only,
  resolveConfig,
  type ScheduleConfig,
  spacedTimesteps,
  sqrtF32,
  tableValue,
  times,
  trainSigmas,
} from "./schedule.ts";

export interface DpmConfig extends ScheduleConfig {
  solver_order: 1 | 2 | 3;
  solver_type: "midpoint" | "heun";
  lower_order_final: boolean;
  euler_at_final: boolean;
  final_sigmas_type: "zero" | "sigma_min";
}

export const DPM_KEYS: ConfigSpec = {
  ...commonKeys("linspace"),
  solver_order: s.integer({ min: 1, max: 3, default: 2 }),
  algorithm_type: only("dpmsolver++"),
  solver_type: s.string({ enum: ["midpoint", "heun"], default: "midpoint" }),
  lower_order_final: s.boolean({ default: true }),
  euler_at_final: s.boolean({ default: false }),
  final_sigmas_type: s.string({ enum: ["zero", "sigma_min"], default: "zero" }),
  lambda_min_clipped: only(-Infinity),
  variance_type: only(null),
  thresholding: only(false),
  use_karras_sigmas: only(false),
  use_exponential_sigmas: only(false),
  use_beta_sigmas: only(false),
  use_lu_lambdas: only(false),
  use_flow_sigmas: only(false),
  use_dynamic_shifting: only(false),
};

/** alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) of one noise level, in float32. */
interface Level {
  alpha: number;
  sigma: number;
  lambda: number;
}

export class DpmSolverSampler implements Sampler {
  readonly kind = "sampler";
  readonly name = "dpm-solver++";
  readonly timesteps: readonly number[];
  readonly initNoiseSigma = 1;
  readonly config: Readonly<DpmConfig>;
  /** Noise level per step in sigma space, float32, with the final sigma appended. */
  readonly sigmas: readonly number[];
  readonly #levels: Level[];
  /** The last data predictions, oldest first. */
  #history: Tensor[] = [];
  #lowerOrderNums = 0;
  #next = 0;
  #disposed = false;

  constructor(options: SamplerOptions) {
    const { steps, config } = resolveConfig<DpmConfig>(options, DPM_KEYS);
    this.config = config;
    const train = trainSigmas(noiseSchedule(config).alphasCumprod);
    this.timesteps = Object.freeze(spacedTimesteps("dpm", config, steps));
    const last = config.final_sigmas_type === "zero" ? 0 : train[0];
    this.sigmas = Object.freeze([...this.timesteps.map((t) => f32(npInterpGrid(t, train))), last]);
    this.#levels = this.sigmas.map(level);
  }

  scaleModelInput(sample: Tensor, _i: number): Tensor {
    return sample.share();
  }

  /** Must be called for i = 0, 1, 2, ... in order: each step extends the multistep history. */
  step(modelOutput: Tensor, i: number, sample: Tensor): Tensor {
    if (this.#disposed) throw new Error("dpm-solver++ sampler used after dispose");
    const n = this.timesteps.length;
    checkIndex(i, n);
    if (i !== this.#next) {
      throw new Error(`dpm-solver++ steps run in order: expected step ${this.#next}, got ${i}`);
    }
    const c = this.config;
    const finalStep = i === n - 1 &&
      (c.euler_at_final || (c.lower_order_final && n < 15) || c.final_sigmas_type === "zero");
    const secondToLast = i === n - 2 && c.lower_order_final && n < 15;

    const x0 = keep(scope(() => this.#dataPrediction(modelOutput, i, sample)));
    this.#history.push(x0);
    if (this.#history.length > c.solver_order) this.#history.shift()!.dispose();

    const result = scope(() => {
      const x = sample.to("f32");
      let out: Tensor;
      if (c.solver_order === 1 || this.#lowerOrderNums < 1 || finalStep) {
        out = this.#firstOrder(x, i);
      } else if (c.solver_order === 2 || this.#lowerOrderNums < 2 || secondToLast) {
        out = this.#secondOrder(x, i);
      } else {
        out = this.#thirdOrder(x, i);
      }
      // diffusers casts to the dtype of the converted model output (the data prediction).
      return out.to(x0.dtype);
    });
    if (this.#lowerOrderNums < c.solver_order) this.#lowerOrderNums++;
    this.#next++;
    return result;
  }

  /** x0 predicted from the model output at step i (in the dtypes the caller gave). */
  #dataPrediction(out: Tensor, i: number, sample: Tensor): Tensor {
    const { alpha, sigma } = this.#levels[i];
    switch (this.config.prediction_type) {
      case "epsilon":
        return sample.sub(times(sigma, out)).div(alpha);
      case "v_prediction":
        return times(alpha, sample).sub(times(sigma, out));
      case "sample":
        return out.share();
    }
  }

  #firstOrder(x: Tensor, i: number): Tensor {
    const t = this.#levels[i + 1], s = this.#levels[i];
    const h = f32(t.lambda - s.lambda);
    const expm1 = f32(expF32(f32(-h)) - 1);
    const m0 = this.#history[this.#history.length - 1];
    return times(f32(t.sigma / s.sigma), x).sub(times(f32(t.alpha * expm1), m0));
  }

  #secondOrder(x: Tensor, i: number): Tensor {
    const t = this.#levels[i + 1], s0 = this.#levels[i], s1 = this.#levels[i - 1];
    const hist = this.#history;
    const m0 = hist[hist.length - 1], m1 = hist[hist.length - 2];
    const h = f32(t.lambda - s0.lambda);
    const h0 = f32(s0.lambda - s1.lambda);
    const r0 = f32(h0 / h);
    const d1 = times(f32(1 / r0), m0.sub(m1));
    const expm1 = f32(expF32(f32(-h)) - 1);
    const c1 = f32(t.alpha * expm1);
    const base = times(f32(t.sigma / s0.sigma), x).sub(times(c1, m0));
    if (this.config.solver_type === "midpoint") return base.sub(times(f32(0.5 * c1), d1));
    return base.add(times(f32(t.alpha * f32(f32(expm1 / h) + 1)), d1));
  }

  #thirdOrder(x: Tensor, i: number): Tensor {
    const t = this.#levels[i + 1], s0 = this.#levels[i];
    const s1 = this.#levels[i - 1], s2 = this.#levels[i - 2];
    const hist = this.#history;
    const [m2, m1, m0] = hist.slice(-3);
    const h = f32(t.lambda - s0.lambda);
    const h0 = f32(s0.lambda - s1.lambda);
    const h1 = f32(s1.lambda - s2.lambda);
    const r0 = f32(h0 / h), r1 = f32(h1 / h);
    const d10 = times(f32(1 / r0), m0.sub(m1));
    const d11 = times(f32(1 / r1), m1.sub(m2));
    const d1 = d10.add(times(f32(r0 / f32(r0 + r1)), d10.sub(d11)));
    const d2 = times(f32(1 / f32(r0 + r1)), d10.sub(d11));
    const expm1 = f32(expF32(f32(-h)) - 1);
    const c1 = f32(t.alpha * f32(f32(expm1 / h) + 1));
    const c2 = f32(t.alpha * f32(f32(f32(expm1 + h) / f32(h * h)) - 0.5));
    return times(f32(t.sigma / s0.sigma), x).sub(times(f32(t.alpha * expm1), m0))
      .add(times(c1, d1)).sub(times(c2, d2));
  }

  /** img2img's starting latents at step index i: alpha_i x0 + sigma_i noise. */
  addNoise(original: Tensor, noise: Tensor, i: number): Tensor {
    checkIndex(i, this.timesteps.length);
    return scope(() => {
      // diffusers derives alpha and sigma here from sigma cast to the sample's dtype and device.
      const s = tableValue(this.sigmas[i], original);
      const alpha = ops.reciprocal(ops.powScalar(ops.powScalar(s, 2).add(1), 0.5));
      return ops.mul(alpha, original).add(ops.mul(ops.mul(s, alpha), noise));
    });
  }

  /** Frees the multistep history. */
  [Symbol.dispose](): void {
    for (const t of this.#history) t.dispose();
    this.#history = [];
    this.#disposed = true;
  }
}

/** diffusers' _sigma_to_alpha_sigma_t and lambda_t, as float32 0-dim tensor arithmetic. */
function level(sigmaK: number): Level {
  const alpha = f32(1 / sqrtF32(f32(f32(sigmaK * sigmaK) + 1)));
  const sigma = f32(sigmaK * alpha);
  return { alpha, sigma, lambda: f32(logF32(alpha) - logF32(sigma)) };
}
