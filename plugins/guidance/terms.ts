/**
 * Guidance as a sum of weighted differences of UNet predictions. Every formula of the DIPSY paper
 * (Eq. 8, Eq. 9, text CFG, the ablations) is a base prediction plus terms w * (a - b), so one
 * small evaluator serves them all and each plugin is only its table of terms.
 */
import { ops, scope, type Tensor } from "../../ffi/mod.ts";
import type { Conditioning, Guidance, GuidanceStep } from "../../core/plugins.ts";
import * as s from "../../core/schema.ts";

export interface Term {
  weight: number;
  plus: Conditioning;
  minus: Conditioning;
}

export interface Formula {
  base: Conditioning;
  terms: Term[];
}

/** The conditionings a formula reads, base first, each once. */
function formulaNeeds(f: Formula): Conditioning[] {
  const out = [f.base];
  for (const t of f.terms) {
    for (const c of [t.minus, t.plus]) if (!out.includes(c)) out.push(c);
  }
  return out;
}

/** base + sum(weight * (plus - minus)), accumulated left to right like the reference code. */
function evaluate(f: Formula, preds: ReadonlyMap<Conditioning, Tensor>): Tensor {
  const get = (c: Conditioning) => {
    const t = preds.get(c);
    if (!t) throw new Error(`the prediction "${c}" was not computed`);
    return t;
  };
  return scope(() => {
    let acc = get(f.base);
    for (const term of f.terms) {
      if (term.weight === 0) continue;
      acc = ops.addScaled(acc, ops.sub(get(term.plus), get(term.minus)), term.weight);
    }
    return acc === get(f.base) ? acc.clone() : acc;
  });
}

/** Image terms apply for steps with index/total in [start, end); text CFG elsewhere. */
export const INTERVAL: s.Schema<[number, number] | null> = s.nullable(
  s.refine(
    s.array(s.number({ min: 0, max: 1 }), { minItems: 2, maxItems: 2 }),
    ([start, end]) => start < end ? null : "must be [start, end] with start < end",
  ) as s.Schema<[number, number]>,
  {
    default: null,
    description: "[start, end] fractions of the steps where image terms apply; null: all",
  },
);

function inInterval(step: GuidanceStep, interval: [number, number] | null | undefined): boolean {
  if (!interval) return true;
  const at = step.index / step.total;
  return at >= interval[0] && at < interval[1];
}

/**
 * A Guidance from a formula with image terms. Outside the optional interval the image terms are
 * dropped and the step is plain text CFG (the image predictions are then not computed at all).
 */
export function formulaGuidance(p: {
  name: string;
  formula: Formula;
  textScale: number;
  /** Absent for text-only guidance, whose image prompts are never on. */
  adapterScale?: number;
  negativeAdapterScale?: number | null;
  interval?: [number, number] | null;
}): Guidance {
  const textOnly: Formula = {
    base: "uncond",
    terms: [{ weight: p.textScale, plus: "text", minus: "uncond" }],
  };
  const needs = formulaNeeds(p.formula);
  const usesImages = needs.some((c) => c.includes("+"));
  const usesNegative = needs.some((c) => c.includes("+neg"));
  const pick = (step: GuidanceStep) =>
    usesImages && !inInterval(step, p.interval) ? textOnly : p.formula;
  return {
    kind: "guidance",
    name: p.name,
    adapterScale: p.adapterScale ?? 0,
    negativeAdapterScale: usesNegative ? p.negativeAdapterScale ?? null : null,
    usesNegative,
    usesImages,
    needs: (step) => formulaNeeds(pick(step)),
    combine: (preds, step) => evaluate(pick(step), preds),
  };
}
