/**
 * The options of the `clip-lora` classifier, declared once: type, default, bounds and a one-line
 * doc each. `TrainSettings` (what decides the trained weights, recorded in train.json) is made
 * from them; options may arrive as command-line text (`--set rank=8`, `towers=text,vision`).
 */
import { RunError } from "../../core/output.ts";
import * as s from "../../core/schema.ts";
import { DEFAULT_CLIP } from "../../core/config.ts";
import { DEFAULT_LAMBDA } from "./clip_lora.ts";
import { DEFAULT_LORA } from "./lora.ts";
import type { TrainSettings } from "./trainer.ts";

const seed = (description: string) => s.integer({ min: 0, default: 0, description });
const nullableText = (description: string) =>
  s.nullable(s.string(), { default: null, description });

export const TRAIN_SCHEMA: s.ObjectSchema = s.options({
  clip: s.string({
    minLength: 1,
    default: DEFAULT_CLIP,
    description: "CLIP model: folder, Hub id, or tiny",
  }),
  modelSeed: seed("seed of a preset's random weights"),
  epochs: s.integer({ min: 1, default: 10, description: "training epochs" }),
  warmupEpochs: s.integer({ min: 0, default: 3, description: "epochs of linear warm-up" }),
  batch: s.integer({ min: 1, default: 64, description: "images per step" }),
  lr: s.number({ min: 0, exclusiveMin: true, default: 1e-4, description: "peak learning rate" }),
  minLr: s.number({ min: 0, default: 1e-8, description: "warm-up start and cosine end rate" }),
  weightDecay: s.number({ min: 0, default: 1e-4, description: "AdamW weight decay" }),
  lambda: s.number({
    min: 0,
    max: 1,
    default: DEFAULT_LAMBDA,
    description: "weight of the real part of the loss",
  }),
  mode: s.string({
    enum: ["mixed", "real", "synthetic"],
    default: "mixed",
    description: "mixed, real (real-only) or synthetic (synthetic-only)",
  }),
  rank: s.integer({ min: 1, default: DEFAULT_LORA.rank, description: "LoRA rank" }),
  alpha: s.number({ min: 0, default: DEFAULT_LORA.alpha, description: "LoRA alpha" }),
  dropout: s.number({ min: 0, max: 1, default: DEFAULT_LORA.dropout, description: "LoRA dropout" }),
  lora: s.nullable(
    s.object({
      rank: s.required(s.integer({ min: 1 })),
      alpha: s.required(s.number({ min: 0 })),
      dropout: s.required(s.number({ min: 0, max: 1 })),
    }),
    { default: null, description: "{ rank, alpha, dropout } at once (as train.json records it)" },
  ),
  targetModules: s.array(s.string({ minLength: 1 }), {
    minItems: 1,
    commaText: true,
    default: ["q_proj", "v_proj"],
    description: "attention projections with LoRA",
  }),
  towers: s.array(s.string({ enum: ["text", "vision"] }), {
    minItems: 1,
    commaText: true,
    default: ["text", "vision"],
    description: "CLIP towers with LoRA",
  }),
  classPrompt: nullableText("prompt template ({class}, {word}); null: DataDream's"),
  dataset: nullableText("dataset name, picks the prompt word"),
  repeatReal: s.nullable(
    s.oneOf<number | "auto">([s.integer({ min: 1 }), s.literal("auto")], {
      expected: 'a positive integer or "auto"',
    }),
    { default: null, description: "repeats of the real shots; null: synthetic/real, floored" },
  ),
  augment: s.boolean({ default: true, description: "the recipe's training augmentation" }),
  seed: seed("seed of shuffling, augmentation, dropout and LoRA init"),
  dtype: s.string({
    enum: ["f32", "bf16", "f16"],
    default: "f32",
    description: "weights dtype (LoRA stays f32)",
  }),
});

/** Settings from plugin options: checked, defaults filled in, LoRA options grouped. */
export function trainSettings(options: Record<string, unknown>): TrainSettings {
  const r = s.validate(TRAIN_SCHEMA, options, { text: true });
  if (!r.ok) throw new RunError(r.issues.map((i) => s.issueText(i, "option")).join("; "));
  const { rank, alpha, dropout, lora, repeatReal, ...rest } = r.value as Record<string, unknown>;
  const settings = {
    ...rest,
    lora: lora ?? { rank, alpha, dropout },
    repeatReal: repeatReal === "auto" ? null : repeatReal,
  } as unknown as TrainSettings;
  if (settings.warmupEpochs > settings.epochs) {
    throw new RunError(
      `warmupEpochs must be at most epochs (${settings.epochs}), got ${settings.warmupEpochs}`,
    );
  }
  if (settings.minLr > settings.lr) {
    throw new RunError(`minLr (${settings.minLr}) must be at most lr (${settings.lr})`);
  }
  return settings;
}

export const TRAIN_DEFAULTS: Readonly<TrainSettings> = Object.freeze(trainSettings({}));
