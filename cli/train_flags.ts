/**
 * The classifier flags `train` and `run` share, drawn from the classifier plugin's documented
 * options, and their mapping onto those options (`--warmup-epochs 3` -> `warmupEpochs: "3"`; the
 * plugin checks the values); the validation split flags (train, run) and the model selection
 * flags (eval, run).
 */
import type { SelectRule } from "../app/classify.ts";
import { DEFAULT_CLASS_PROMPT } from "../plugins/classifiers/clip_lora.ts";
import { CliError, fieldFlags, type Flags, renamed } from "./command.ts";
import { loadPlugins, pluginList } from "./plugin_docs.ts";

/** The classifier `--classifier` leaves out. */
export const DEFAULT_CLASSIFIER = "clip-lora";

const registry = await loadPlugins();

/** The classifier flags, their help and defaults from the default classifier's options. */
export const CLASSIFIER_FLAGS: Flags = {
  classifier: {
    value: "NAME",
    help: "classifier plugin (`dipsy train --list` lists them)",
    default: DEFAULT_CLASSIFIER,
  },
  ...renamed(
    fieldFlags(registry.docs("classifier", DEFAULT_CLASSIFIER), {
      clip: { value: "REF", help: 'CLIP folder or Hub id, or "tiny"' },
      epochs: "N",
      warmupEpochs: {
        value: "N",
        help: "linear warm-up epochs; as many as --epochs leaves no cosine decay, only a rising " +
          "rate (warned about)",
      },
      batch: "N",
      lr: "X",
      minLr: "X",
      weightDecay: "X",
      lambda: "X",
      mode: "M",
      rank: "N",
      alpha: "X",
      dropout: "X",
      targetModules: "L",
      towers: "L",
      classPrompt: {
        value: "T",
        help: `prompt per class, with {class} and optionally {word} (the dataset's word, e.g. ` +
          `"pet "); default "${DEFAULT_CLASS_PROMPT}"`,
      },
      repeatReal: {
        value: "N",
        help: "repeats of the real shots per epoch (default: synthetic / real, floored)",
      },
      seed: "N",
    }),
    { dropout: "lora-dropout" },
  ),
  "no-augment": { help: "no training augmentation (the test transform only)", field: "augment" },
  dtype: {
    value: "T",
    help: "f32, bf16 or f16 weights (default: f16 on CUDA, f32 on CPU)",
    field: "dtype",
  },
  set: {
    value: "KEY=VALUE",
    multiple: true,
    help: "any option of the classifier (repeatable; `train --list` lists them)",
  },
};

/** `--plugin` and `--list` for the commands that build a classifier. */
export const CLASSIFIER_PLUGIN_FLAGS = {
  plugin: {
    value: "FILE",
    multiple: true,
    help: "load classifier plugins from a module (repeatable); see docs/plugins.md",
  },
  list: { help: "list the classifier plugins and their options, and exit" },
} as const satisfies Flags;

/** Plugin name and options from parsed flags. */
export function classifierOptions(
  values: Record<string, unknown>,
  extra: { dataset?: string; device?: string } = {},
): { name: string; options: Record<string, unknown> } {
  const options: Record<string, unknown> = {};
  for (const [key, flag] of Object.entries(CLASSIFIER_FLAGS)) {
    const v = values[key];
    if (v === undefined || !flag.field) continue;
    options[flag.field] = key === "no-augment" ? !v : v;
  }
  for (const spec of (values.set as string[] | undefined) ?? []) {
    const eq = spec.indexOf("=");
    if (eq <= 0) throw new CliError(`--set ${spec}: expected KEY=VALUE`);
    options[spec.slice(0, eq)] = spec.slice(eq + 1);
  }
  const name = (values.classifier as string | undefined) ?? DEFAULT_CLASSIFIER;
  return { name, options: withRunDefaults(options, extra) };
}

/**
 * Classifier options with the defaults that depend on the run filled in: the dataset's name, and
 * the dtype for the device ("auto": f16 on CUDA, f32 on the CPU).
 */
export function withRunDefaults(
  options: Record<string, unknown>,
  extra: { dataset?: string; device?: string },
): Record<string, unknown> {
  const out = { ...options };
  if (extra.dataset !== undefined && out.dataset === undefined) out.dataset = extra.dataset;
  if (out.dtype === undefined || out.dtype === "auto") {
    out.dtype = extra.device?.startsWith("cuda") ? "f16" : "f32";
  }
  return out;
}

export const VALIDATION_FLAGS = {
  val: { value: "DIR", help: "validation images, one folder per class" },
  "val-shots": {
    value: "N",
    help: "or: the last N real shots of each class (by rank), kept out of training (and out of " +
      "generation, in run). With either, every epoch is evaluated on it (RUN/validation.json).",
  },
} as const satisfies Flags;

export const VALIDATION_TITLE = "validation (for choosing the epoch; never the test set):";

export const SELECT_FLAGS = {
  select: {
    value: "RULE",
    help: "which epoch's weights to evaluate: last, best-val (the highest top-1 on the " +
      "validation split), or best-test (the highest top-1 on the test set itself, as DataDream " +
      "reports: flagged as test-selected); default best-val when the run has a validation " +
      "split, else last",
  },
  "per-epoch": { help: "also evaluate every epoch on the test set (recorded in perEpoch)" },
} as const satisfies Flags;

/** `--select`: last, best-val or best-test. */
export function selectFlag(value: string | undefined): SelectRule | undefined {
  if (value === undefined) return undefined;
  if (value !== "last" && value !== "best-val" && value !== "best-test") {
    throw new CliError(`--select must be last, best-val or best-test, got "${value}"`);
  }
  return value;
}

/** `--list` of train and eval: prints the classifier plugins (of `--plugin` files too); code 0. */
export async function listClassifiers(files: readonly string[] = []): Promise<number> {
  console.log(pluginList(await loadPlugins(files), ["classifier"]));
  return 0;
}
