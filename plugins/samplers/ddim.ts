/**
 * DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", arXiv:2010.02502),
 * step for step as diffusers' DDIMScheduler: eta 0 is the deterministic sampler, eta 1 is
 * DDPM-like ancestral sampling with variance noise drawn from the caller's generator.
 */
import type { Sampler, SamplerOptions } from "../../core/plugins.ts";
import { type Generator, ops, scope, type Tensor } from "../../ffi/mod.ts";
import * as s from "../../core/schema.ts";
import {
  checkIndex,
  commonKeys,
  type ConfigSpec,
  f32,
  noiseSchedule,
  only,
  type Prediction,
  resolveConfig,
  type ScheduleConfig,
  spacedTimesteps,
  sqrtF32,
  tableValue,
  times,
} from "./schedule.ts";

export interface DdimConfig extends ScheduleConfig {
  clip_sample: boolean;
  clip_sample_range: number;
  set_alpha_to_one: boolean;
}

export const DDIM_KEYS: ConfigSpec = {
  ...commonKeys("leading"),
  clip_sample: s.boolean({ default: true }),
  clip_sample_range: s.number({ default: 1.0 }),
  set_alpha_to_one: s.boolean({ default: true }),
  thresholding: only(false),
};

/** DDIM's options that are not config keys. */
export const DDIM_OPTIONS = {
  eta: s.number({
    min: 0,
    default: 0,
    description: "stochasticity: 0 deterministic DDIM, 1 DDPM-like",
  }),
};

export class DdimSampler implements Sampler {
  readonly kind = "sampler";
  readonly name = "ddim";
  readonly timesteps: readonly number[];
  readonly initNoiseSigma = 1;
  readonly config: Readonly<DdimConfig>;
  readonly eta: number;
  readonly #alphasCumprod: Float32Array;
  readonly #finalAlphaCumprod: number;
  /** diffusers' previous timestep: always t - train // steps, whatever the spacing. */
  readonly #stride: number;

  constructor(options: SamplerOptions) {
    const { steps, config, extra } = resolveConfig<DdimConfig>(options, DDIM_KEYS, DDIM_OPTIONS);
    this.eta = extra.eta as number;
    this.config = config;
    this.#alphasCumprod = noiseSchedule(config).alphasCumprod;
    this.#finalAlphaCumprod = config.set_alpha_to_one ? 1 : this.#alphasCumprod[0];
    this.timesteps = Object.freeze(spacedTimesteps("ddim", config, steps));
    this.#stride = Math.floor(config.num_train_timesteps / steps);
  }

  scaleModelInput(sample: Tensor, _i: number): Tensor {
    return sample.share();
  }

  step(modelOutput: Tensor, i: number, sample: Tensor, generator?: Generator): Tensor {
    checkIndex(i, this.timesteps.length);
    const t = this.timesteps[i];
    if (t >= this.#alphasCumprod.length) {
      throw new RangeError(
        `timestep ${t} is outside the ${this.#alphasCumprod.length}-step noise schedule ` +
          `(steps_offset ${this.config.steps_offset} pushes "leading" spacing past the end)`,
      );
    }
    const prev = t - this.#stride;
    const alpha = this.#alphasCumprod[t];
    const alphaPrev = prev >= 0 ? this.#alphasCumprod[prev] : this.#finalAlphaCumprod;
    const beta = f32(1 - alpha);
    const betaPrev = f32(1 - alphaPrev);
    const variance = f32(f32(betaPrev / beta) * f32(1 - f32(alpha / alphaPrev)));
    const std = f32(f32(this.eta) * sqrtF32(variance));
    const direction = sqrtF32(f32(betaPrev - f32(std * std)));
    return scope(() => {
      const [x0, eps] = predict(this.config.prediction_type, modelOutput, sample, alpha, beta);
      const r = this.config.clip_sample_range;
      const x0c = this.config.clip_sample ? ops.clamp(x0, -r, r) : x0;
      const prevSample = times(sqrtF32(alphaPrev), x0c).add(times(direction, eps));
      if (!(this.eta > 0)) return prevSample;
      // diffusers draws randn_tensor(model_output.shape, dtype=model_output.dtype) from a CPU
      // generator on the CPU, then moves it to the model output's device.
      const noise = ops.randn(modelOutput.shape, modelOutput.dtype, "cpu", generator ?? null)
        .to(modelOutput.device);
      return prevSample.add(times(std, noise));
    });
  }

  /** The forward process q(x_t | x_0) at timestep index i (img2img's starting latents). */
  addNoise(original: Tensor, noise: Tensor, i: number): Tensor {
    checkIndex(i, this.timesteps.length);
    const alpha = this.#alphasCumprod[this.timesteps[i]];
    return scope(() => {
      const a = tableValue(alpha, original);
      const sqrtAlpha = ops.powScalar(a, 0.5);
      const sqrtBeta = ops.powScalar(ops.rsubScalar(a, 1), 0.5);
      return ops.mul(sqrtAlpha, original).add(ops.mul(sqrtBeta, noise));
    });
  }

  [Symbol.dispose](): void {}
}

/** (x0, epsilon) from the model output, in the order of operations diffusers uses. */
function predict(
  type: Prediction,
  out: Tensor,
  sample: Tensor,
  alpha: number,
  beta: number,
): [Tensor, Tensor] {
  const sa = sqrtF32(alpha), sb = sqrtF32(beta);
  switch (type) {
    case "epsilon":
      return [sample.sub(times(sb, out)).div(sa), out];
    case "sample":
      return [out, sample.sub(times(sa, out)).div(sb)];
    case "v_prediction":
      return [times(sa, sample).sub(times(sb, out)), times(sa, out).add(times(sb, sample))];
  }
}
