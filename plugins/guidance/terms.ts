/**
 * Guidance as a sum of weighted differences of UNet predictions. Every formula of the DIPSY paper
 * (Eq. 8, Eq. 9, text CFG, the ablations) is a base prediction plus terms w * (a - b), so one
 * small evaluator serves them all and each plugin is only its table of terms.
 */
import { ops, scope, type Tensor } from "../../ffi/mod.ts";
import type { Conditioning, Guidance, GuidanceStep } from "../../core/plugins.ts";

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
export function formulaNeeds(f: Formula): Conditioning[] {
  const out = [f.base];
  for (const t of f.terms) {
    for (const c of [t.minus, t.plus]) if (!out.includes(c)) out.push(c);
  }
  return out;
}

/** base + sum(weight * (plus - minus)), accumulated left to right like the reference code. */
export function evaluate(f: Formula, preds: ReadonlyMap<Conditioning, Tensor>): Tensor {
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

export interface IntervalOption {
  /** Image terms apply for steps with index/total in [start, end); text CFG elsewhere. */
  interval?: [number, number];
}

function inInterval(step: GuidanceStep, interval?: [number, number]): boolean {
  if (!interval) return true;
  const at = step.index / step.total;
  return at >= interval[0] && at < interval[1];
}

export function checkWeight(name: string, v: unknown): number {
  if (typeof v !== "number" || !Number.isFinite(v)) {
    throw new Error(`option "${name}" must be a finite number, got ${JSON.stringify(v)}`);
  }
  return v;
}

export function checkInterval(v: unknown): [number, number] | undefined {
  if (v === undefined) return undefined;
  if (
    !Array.isArray(v) || v.length !== 2 || !v.every((x) => typeof x === "number") ||
    v[0] < 0 || v[1] > 1 || v[0] >= v[1]
  ) {
    throw new Error(`option "interval" must be [start, end] with 0 <= start < end <= 1`);
  }
  return [v[0], v[1]];
}

/**
 * A Guidance from a formula with image terms. Outside the optional interval the image terms are
 * dropped and the step is plain text CFG (the image predictions are then not computed at all).
 */
export function formulaGuidance(p: {
  name: string;
  formula: Formula;
  textScale: number;
  adapterScale: number;
  usesNegative: boolean;
  interval?: [number, number];
}): Guidance {
  const textOnly: Formula = {
    base: "uncond",
    terms: [{ weight: p.textScale, plus: "text", minus: "uncond" }],
  };
  const usesImages = formulaNeeds(p.formula).some((c) => c.includes("+"));
  const pick = (step: GuidanceStep) =>
    usesImages && !inInterval(step, p.interval) ? textOnly : p.formula;
  return {
    kind: "guidance",
    name: p.name,
    adapterScale: p.adapterScale,
    usesNegative: p.usesNegative,
    usesImages,
    needs: (step) => formulaNeeds(pick(step)),
    combine: (preds, step) => evaluate(pick(step), preds),
  };
}
