/**
 * One image from explicit inputs: a prompt, a seed, reference images and the guidance and sampler
 * to use. `dipsy sample` and the HTTP endpoint both run this, so the same inputs give the same
 * bytes through either.
 *
 * Checking is split from sampling so that callers can refuse bad input before loading a model or
 * queueing work: `prepareSample` needs only the plugin registry, `sampleImage` the loaded model.
 */
import { scope } from "../ffi/mod.ts";
import { UserError } from "../ffi/errors.ts";
import type { DiffusionBackbone } from "./backbone.ts";
import { imageFromTensor, type RgbImage } from "./image.ts";
import {
  type Guidance,
  type Registry,
  registry as defaultRegistry,
  type Sampler,
  type SchedulerConfig,
} from "./plugins.ts";
import { sampleLatents } from "./sampling.ts";
import { issueText, validate } from "./schema.ts";

export interface SampleSpec {
  prompt: string;
  /** Initial-noise seed (as `torch.Generator().manual_seed(seed)` on the CPU). */
  seed: number;
  guidance: string;
  guidanceOptions: Record<string, unknown>;
  sampler: string;
  /** The sampler's own options (e.g. `timestep_spacing`), besides the steps. */
  samplerOptions?: Record<string, unknown>;
  steps: number;
  /** Output size in pixels; null: the model's default. */
  width: number | null;
  height: number | null;
}

/**
 * Input the caller has to fix. `field` names the offending input: a SampleSpec key, "positive",
 * "negative", or `guidanceOptions.<option>`.
 */
export class SampleError extends UserError {
  constructor(readonly field: string, message: string) {
    super(message);
  }
}

/** Runs `fn`; what it throws becomes a SampleError naming `field`. */
function inField<T>(field: string, fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    throw new SampleError(field, e instanceof Error ? e.message : String(e));
  }
}

/**
 * Checks the plugin names and options and which reference images are needed (`given`: which
 * ones the caller has); builds the guidance. With `schedulerConfig` (when known) the sampler is
 * built once now, so that its errors come before any model work.
 */
export function prepareSample(
  spec: SampleSpec,
  given: { positive: boolean; negative: boolean },
  opts: { registry?: Registry; schedulerConfig?: SchedulerConfig } = {},
) {
  const reg = opts.registry ?? defaultRegistry;
  const def = inField("guidance", () => reg.definition("guidance", spec.guidance));
  const checked = validate(def.schema, spec.guidanceOptions);
  if (!checked.ok) {
    const issue = checked.issues[0];
    throw new SampleError(
      `guidanceOptions.${issue.field}`,
      `guidance "${spec.guidance}": ${issueText(issue, "option")}`,
    );
  }
  inField("sampler", () => reg.definition("sampler", spec.sampler));
  if (!Number.isSafeInteger(spec.steps) || spec.steps < 1) {
    throw new SampleError("steps", `steps must be a positive integer, got ${spec.steps}`);
  }
  if (!Number.isSafeInteger(spec.seed) || spec.seed < 0) {
    throw new SampleError("seed", `seed must be a non-negative integer, got ${spec.seed}`);
  }
  if (opts.schedulerConfig) createSampler(spec, opts.schedulerConfig, reg)[Symbol.dispose]();
  const guidance = inField(
    "guidanceOptions",
    () => reg.create<Guidance>("guidance", spec.guidance, spec.guidanceOptions),
  );
  if (guidance.usesImages && !given.positive) {
    throw new SampleError("positive", `guidance "${guidance.name}" needs a positive image`);
  }
  if (guidance.usesNegative && !given.negative) {
    throw new SampleError("negative", `guidance "${guidance.name}" needs a negative image`);
  }
  // Reference images that were given but that the guidance does not use.
  const ignored: ("positive" | "negative")[] = [];
  if (!guidance.usesImages && given.positive) ignored.push("positive");
  if (!guidance.usesNegative && given.negative) ignored.push("negative");
  // IP-Adapters the guidance needs: 2 with a negative image, 1 with a positive only, else 0.
  const adapters = guidance.usesImages ? (guidance.usesNegative ? 2 : 1) : 0;
  return { spec, guidance, adapters, ignored };
}

function createSampler(spec: SampleSpec, config: SchedulerConfig, reg: Registry): Sampler {
  return inField(
    "sampler",
    () =>
      reg.create<Sampler>("sampler", spec.sampler, {
        ...spec.samplerOptions,
        steps: spec.steps,
        config,
      }),
  );
}

/** The output size: the requested one, or the model's default; checked against the VAE. */
export function sampleSize(
  bb: Pick<DiffusionBackbone, "defaultSize" | "vaeScaleFactor">,
  spec: Pick<SampleSpec, "width" | "height">,
): { width: number; height: number } {
  const width = spec.width ?? bb.defaultSize, height = spec.height ?? bb.defaultSize;
  const f = bb.vaeScaleFactor;
  if (width % f || height % f) {
    throw new SampleError(
      width % f ? "width" : "height",
      `the size ${width}x${height} must be a multiple of ${f} in both directions`,
    );
  }
  return { width, height };
}

/**
 * Samples and decodes one image on a loaded model; with it, the final latents [1, C, h, w] in
 * the model's dtype and device, which the caller disposes.
 */
export function sampleImage(
  bb: DiffusionBackbone,
  prepared: ReturnType<typeof prepareSample>,
  refs: { positive: RgbImage | null; negative: RgbImage | null },
  opts: { registry?: Registry; onStep?: (index: number, total: number) => void } = {},
) {
  const { spec, guidance } = prepared;
  if (bb.adapterCount < prepared.adapters) {
    throw new SampleError(
      "guidance",
      `guidance "${guidance.name}" needs ${prepared.adapters} IP-Adapter(s); the model has ` +
        `${bb.adapterCount}`,
    );
  }
  const { width, height } = sampleSize(bb, spec);
  using sampler = createSampler(spec, bb.schedulerConfig, opts.registry ?? defaultRegistry);
  const latents = sampleLatents(bb, [{
    prompt: spec.prompt,
    seed: spec.seed,
    positive: guidance.usesImages ? refs.positive : null,
    negative: guidance.usesNegative ? refs.negative : null,
  }], { width, height, guidance, sampler, onStep: opts.onStep });
  try {
    const image = scope(() => imageFromTensor(bb.decode(latents)) as RgbImage[])[0];
    return { image, latents, width, height };
  } catch (e) {
    latents.dispose();
    throw e;
  }
}
