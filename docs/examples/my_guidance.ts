/**
 * A custom Guidance plugin: DIPSY's Eq. 9 with the negative image weight ramped up over the
 * steps, from 0 at the first step to `negativeScale` at the last. Early steps lay out the image
 * from the text and the positive reference alone; the repulsion from the negative class grows as
 * the details form.
 *
 *   eps = e0 + wT (ec - e0) + wP (ecp - ec) - wN(t) (ecpn - ecp),  wN(t) = wN * t / (T - 1)
 *
 * Load it with `--plugin docs/examples/my_guidance.ts --guidance ramped-negative`.
 */
import { ops, scope, type Tensor } from "../../ffi/mod.ts";
import type { Conditioning, Guidance, GuidanceStep, PluginDef } from "../../core/plugins.ts";
import * as s from "../../core/schema.ts";

export interface RampedNegativeOptions {
  textScale: number;
  positiveScale: number;
  negativeScale: number;
  adapterScale: number;
}

const weight = (description: string, value: number) =>
  s.number({ min: 0, default: value, description });

/** The four predictions of Eq. 9; the host runs them as one batched UNet call per step. */
const NEEDS: readonly Conditioning[] = ["uncond", "text", "text+pos", "text+pos+neg"];

export const rampedNegative: PluginDef<Guidance, RampedNegativeOptions> = {
  kind: "guidance",
  name: "ramped-negative",
  description: "Eq. 9 with the negative weight growing linearly from 0 to negativeScale",
  schema: s.options({
    textScale: weight("wT, text guidance weight", 7.5),
    positiveScale: weight("wP, positive image weight", 6),
    negativeScale: weight("wN at the last step (0 at the first)", 6),
    adapterScale: weight("lambda, IP-Adapter scale of image prompts", 0.6),
  }),
  // The options arrive checked, with the defaults filled in.
  create({ textScale: wT, positiveScale: wP, negativeScale: wN, adapterScale }) {
    return {
      kind: "guidance",
      name: "ramped-negative",
      adapterScale,
      usesNegative: true,
      usesImages: true,
      needs: () => NEEDS,
      combine(preds: ReadonlyMap<Conditioning, Tensor>, step: GuidanceStep): Tensor {
        const get = (c: Conditioning) => preds.get(c)!;
        const wNow = step.total > 1 ? (wN * step.index) / (step.total - 1) : wN;
        // scope() frees the intermediates; the returned tensor is fresh, the inputs untouched.
        return scope(() => {
          let eps = ops.addScaled(get("uncond"), ops.sub(get("text"), get("uncond")), wT);
          eps = ops.addScaled(eps, ops.sub(get("text+pos"), get("text")), wP);
          return ops.addScaled(eps, ops.sub(get("text+pos+neg"), get("text+pos")), -wNow);
        });
      },
    };
  },
};

/** What `--plugin` registers. */
export const plugins = [rampedNegative];
