/**
 * The classifier flags `train` and `run` share, and their mapping onto classifier plugin options
 * (`--warmup-epochs 3` -> `warmupEpochs: "3"`; the plugin checks the values).
 */
import { CliError } from "./command.ts";

export const CLASSIFIER_FLAGS = {
  classifier: { type: "string" },
  clip: { type: "string" },
  epochs: { type: "string" },
  "warmup-epochs": { type: "string" },
  batch: { type: "string" },
  lr: { type: "string" },
  "min-lr": { type: "string" },
  "weight-decay": { type: "string" },
  lambda: { type: "string" },
  mode: { type: "string" },
  rank: { type: "string" },
  alpha: { type: "string" },
  "lora-dropout": { type: "string" },
  "target-modules": { type: "string" },
  towers: { type: "string" },
  "class-prompt": { type: "string" },
  "repeat-real": { type: "string" },
  "no-augment": { type: "boolean" },
  seed: { type: "string" },
  dtype: { type: "string" },
  set: { type: "string", multiple: true },
} as const;

export const CLASSIFIER_USAGE = `classifier options (defaults: DataDream's recipe):
  --classifier NAME    classifier plugin (default clip-lora)
  --clip REF           CLIP folder or Hub id (default openai/clip-vit-base-patch16); "tiny"
  --epochs N           training epochs (default 10)
  --warmup-epochs N    linear warm-up epochs (default 3)
  --batch N            images per step (default 64)
  --lr X               peak learning rate (default 1e-4)
  --min-lr X           warm-up start and cosine end (default 1e-8)
  --weight-decay X     AdamW weight decay (default 1e-4)
  --lambda X           weight of the real part of the loss (default 0.8)
  --mode M             mixed, real (real-only) or synthetic (synthetic-only); default mixed
  --rank N --alpha X --lora-dropout X   LoRA (default 16, 32, 0.1)
  --target-modules L   attention projections with LoRA (default q_proj,v_proj)
  --towers L           CLIP towers with LoRA (default text,vision)
  --class-prompt T     prompt per class, with {class} and optionally {word} (the dataset's
                       word, e.g. "pet "); default "a {word}photo of a {class}"
  --repeat-real N      repeats of the real shots per epoch (default: synthetic / real, floored)
  --no-augment         no training augmentation (the test transform only)
  --seed N             seed of shuffling, augmentation, dropout and the LoRA init (default 0)
  --dtype T            f32, bf16 or f16 weights (default: f16 on CUDA, f32 on CPU)
  --set KEY=VALUE      any classifier plugin option (repeatable)`;

const camel = (k: string) => k.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());

/** Plugin name and options from parsed flags. */
export function classifierOptions(
  values: Record<string, unknown>,
  extra: { dataset?: string; device?: string } = {},
): { name: string; options: Record<string, unknown> } {
  const options: Record<string, unknown> = {};
  for (const key of Object.keys(CLASSIFIER_FLAGS)) {
    const v = values[key];
    if (v === undefined || key === "classifier" || key === "set") continue;
    if (key === "no-augment") options.augment = !v;
    else if (key === "lora-dropout") options.dropout = v;
    else options[camel(key)] = v;
  }
  for (const spec of (values.set as string[] | undefined) ?? []) {
    const eq = spec.indexOf("=");
    if (eq <= 0) throw new CliError(`--set ${spec}: expected KEY=VALUE`);
    options[spec.slice(0, eq)] = spec.slice(eq + 1);
  }
  if (extra.dataset !== undefined && options.dataset === undefined) options.dataset = extra.dataset;
  if (options.dtype === undefined || options.dtype === "auto") {
    options.dtype = extra.device?.startsWith("cuda") ? "f16" : "f32";
  }
  return { name: (values.classifier as string | undefined) ?? "clip-lora", options };
}

/** A positive integer flag, or undefined. */
export function intFlag(value: string | undefined, flag: string): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) {
    throw new CliError(`${flag} must be a non-negative integer, got "${value}"`);
  }
  return n;
}
