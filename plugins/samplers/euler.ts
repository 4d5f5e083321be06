/**
 * Euler's method on the probability-flow ODE in sigma space (Karras et al. 2022, "Elucidating the
 * Design Space of Diffusion-Based Generative Models", arXiv:2206.00364, Algorithm 2 without churn),
 * step for step as diffusers' EulerDiscreteScheduler with its default s_churn = 0.
 */
import type { Sampler, SamplerOptions } from "../../core/plugins.ts";
import { ops, scope, type Tensor } from "../../ffi/mod.ts";
import * as s from "../../core/schema.ts";
import {
  checkIndex,
  commonKeys,
  type ConfigSpec,
  f32,
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

export interface EulerConfig extends ScheduleConfig {
  final_sigmas_type: "zero" | "sigma_min";
}

export const EULER_KEYS: ConfigSpec = {
  ...commonKeys("linspace"),
  final_sigmas_type: s.string({ enum: ["zero", "sigma_min"], default: "zero" }),
  interpolation_type: only("linear"),
  use_karras_sigmas: only(false),
  use_exponential_sigmas: only(false),
  use_beta_sigmas: only(false),
  timestep_type: only("discrete"),
};

export class EulerSampler implements Sampler {
  readonly kind = "sampler";
  readonly name = "euler";
  /** Float timesteps (float32 values) for linspace spacing, as diffusers hands them to the UNet. */
  readonly timesteps: readonly number[];
  readonly initNoiseSigma: number;
  readonly config: Readonly<EulerConfig>;
  /** Noise level per step, float32, with the final sigma appended. */
  readonly sigmas: readonly number[];

  constructor(options: SamplerOptions) {
    const { steps, config } = resolveConfig<EulerConfig>(options, EULER_KEYS);
    this.config = config;
    const train = trainSigmas(noiseSchedule(config).alphasCumprod);
    this.timesteps = Object.freeze(spacedTimesteps("euler", config, steps));
    const last = config.final_sigmas_type === "zero" ? 0 : train[0];
    this.sigmas = Object.freeze([...this.timesteps.map((t) => f32(npInterpGrid(t, train))), last]);
    const max = Math.max(...this.sigmas);
    this.initNoiseSigma = config.timestep_spacing === "leading"
      ? sqrtF32(f32(f32(max * max) + 1))
      : max;
  }

  /** x / sqrt(sigma^2 + 1): the UNet expects inputs of unit variance. */
  scaleModelInput(sample: Tensor, i: number): Tensor {
    checkIndex(i, this.timesteps.length);
    const s = this.sigmas[i];
    return sample.div(sqrtF32(f32(f32(s * s) + 1)));
  }

  step(modelOutput: Tensor, i: number, sample: Tensor): Tensor {
    checkIndex(i, this.timesteps.length);
    const sigma = this.sigmas[i];
    const dt = f32(this.sigmas[i + 1] - sigma);
    return scope(() => {
      const x = sample.to("f32");
      let x0: Tensor;
      switch (this.config.prediction_type) {
        case "epsilon":
          x0 = x.sub(times(sigma, modelOutput));
          break;
        case "v_prediction": {
          const s2p1 = f32(f32(sigma * sigma) + 1);
          x0 = modelOutput.mul(f32(-sigma / sqrtF32(s2p1))).add(x.div(s2p1));
          break;
        }
        case "sample":
          x0 = modelOutput;
      }
      const derivative = x.sub(x0).div(sigma);
      return x.add(derivative.mul(dt)).to(modelOutput.dtype);
    });
  }

  /** img2img's starting latents at step index i: x0 + sigma_i * noise. */
  addNoise(original: Tensor, noise: Tensor, i: number): Tensor {
    checkIndex(i, this.timesteps.length);
    return scope(() => original.add(ops.mul(noise, tableValue(this.sigmas[i], original))));
  }

  [Symbol.dispose](): void {}
}
