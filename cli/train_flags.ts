/**
 * The classifier flags `train` and `run` share, and their mapping onto classifier plugin options
 * (`--warmup-epochs 3` -> `warmupEpochs: "3"`; the plugin checks the values); the validation
 * split flags (train, run) and the model selection flags (eval, run).
 */
import { DEFAULT_CLIP } from "../core/config.ts";
import { CliError } from "./command.ts";
import type { SelectRule } from "../app/classify.ts";

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

/** Each classifier flag's help: flag, value name, text (continued lines after "\n"). */
const CLASSIFIER_HELP: [string, string, string][] = [
  ["classifier", "NAME", "classifier plugin (default clip-lora)"],
  ["clip", "REF", `CLIP folder or Hub id, or "tiny" (default\n${DEFAULT_CLIP})`],
  ["epochs", "N", "training epochs (default 10)"],
  [
    "warmup-epochs",
    "N",
    "linear warm-up epochs (default 3); as many as --epochs leaves no cosine\n" +
    "decay, only a rising rate (warned about)",
  ],
  ["batch", "N", "images per step (default 64)"],
  ["lr", "X", "peak learning rate (default 1e-4)"],
  ["min-lr", "X", "warm-up start and cosine end (default 1e-8)"],
  ["weight-decay", "X", "AdamW weight decay (default 1e-4)"],
  ["lambda", "X", "weight of the real part of the loss (default 0.8)"],
  ["mode", "M", "mixed, real (real-only) or synthetic (synthetic-only); default mixed"],
  ["rank", "N", "LoRA rank (default 16)"],
  ["alpha", "X", "LoRA alpha (default 32)"],
  ["lora-dropout", "X", "LoRA dropout (default 0.1)"],
  ["target-modules", "L", "attention projections with LoRA (default q_proj,v_proj)"],
  ["towers", "L", "CLIP towers with LoRA (default text,vision)"],
  [
    "class-prompt",
    "T",
    "prompt per class, with {class} and optionally {word} (the dataset's\n" +
    'word, e.g. "pet "); default "a {word}photo of a {class}"',
  ],
  ["repeat-real", "N", "repeats of the real shots per epoch (default: synthetic / real, floored)"],
  ["no-augment", "", "no training augmentation (the test transform only)"],
  ["seed", "N", "seed of shuffling, augmentation, dropout and the LoRA init (default 0)"],
  ["dtype", "T", "f32, bf16 or f16 weights (default: f16 on CUDA, f32 on CPU)"],
  ["set", "KEY=VALUE", "any classifier plugin option (repeatable)"],
];

/**
 * The classifier options' help under `title`. `rename` gives the flags a command spells
 * differently (run: --seed is --train-seed); `omit` leaves out those it describes elsewhere.
 */
export function classifierUsage(
  title = "classifier options (defaults: DataDream's recipe):",
  rename: Record<string, string> = {},
  omit: readonly string[] = [],
): string {
  const width = 21;
  const lines = [title];
  for (const [flag, value, text] of CLASSIFIER_HELP) {
    if (omit.includes(flag)) continue;
    const label = `--${rename[flag] ?? flag}${value ? ` ${value}` : ""}`;
    const [first, ...rest] = text.split("\n");
    lines.push(`  ${label.length < width - 1 ? label.padEnd(width) : `${label}  `}${first}`);
    for (const more of rest) lines.push(`  ${" ".repeat(width)}${more}`);
  }
  return lines.join("\n");
}

export const CLASSIFIER_USAGE = classifierUsage();

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

/** `--device`: auto (the default), cpu, cuda or cuda:N. */
export function deviceFlag(value: string | undefined): string {
  const device = value ?? "auto";
  if (!/^(auto|cpu|cuda(:\d+)?)$/.test(device)) {
    throw new CliError(`--device must be auto, cpu, cuda or cuda:N, got "${device}"`);
  }
  return device;
}

/** A non-negative integer flag, or undefined. */
export function intFlag(value: string | undefined, flag: string): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) {
    throw new CliError(`${flag} must be a non-negative integer, got "${value}"`);
  }
  return n;
}

export const VALIDATION_FLAGS = {
  val: { type: "string" },
  "val-shots": { type: "string" },
} as const;

export const VALIDATION_USAGE = `validation (for choosing the epoch; never the test set):
  --val DIR            validation images, one folder per class
  --val-shots N        or: the last N real shots of each class (by rank), kept out of training
                       (and out of generation, in run)
                       With either, every epoch is evaluated on it (RUN/validation.json).`;

export const SELECT_FLAGS = {
  select: { type: "string" },
  "per-epoch": { type: "boolean" },
} as const;

export const SELECT_USAGE = `model selection:
  --select RULE        which epoch's weights to evaluate: last, best-val (the highest top-1 on
                       the validation split), or best-test (the highest top-1 on the test set
                       itself, as DataDream reports: flagged as test-selected); default
                       best-val when the run has a validation split, else last
  --per-epoch          also evaluate every epoch on the test set (recorded in perEpoch)`;

/** `--select`: last, best-val or best-test. */
export function selectFlag(value: string | undefined): SelectRule | undefined {
  if (value === undefined) return undefined;
  if (value !== "last" && value !== "best-val" && value !== "best-test") {
    throw new CliError(`--select must be last, best-val or best-test, got "${value}"`);
  }
  return value;
}

/** `--shots K`: a positive integer, or undefined. */
export function shotsFlag(value: string | undefined, flag = "--shots"): number | undefined {
  const n = intFlag(value, flag);
  if (n === 0) throw new CliError(`${flag} must be at least 1`);
  return n;
}
