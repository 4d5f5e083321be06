/**
 * Guidance plugins. The DIPSY paper's Eq. 9 is the default; the rest are its ablations and the
 * usual baselines. Weights are positive magnitudes: the negative image term is subtracted.
 */
import type { Guidance, PluginDef } from "../../core/plugins.ts";
import * as s from "../../core/schema.ts";
import { type Formula, formulaGuidance, INTERVAL } from "./terms.ts";

/** Resolved options; which of them a plugin reads depends on its schema. */
type Options = Required<s.Infer<typeof DUAL>>;

const weight = (description: string, value: number) => s.number({ description, default: value });

const textScale = weight("wT, text guidance weight", 7.5);
const positiveScale = weight("wP, positive image weight", 6);
const negativeScale = weight("wN, negative image weight (subtracted)", 6);
const adapterScale = s.number({
  min: 0,
  default: 0.6,
  description: "lambda, IP-Adapter scale when an image prompt is on",
});
const negativeAdapterScale = s.nullable(s.number({ min: 0 }), {
  default: null,
  description: "lambda of the negative image's adapter; null: the same as adapterScale",
});

const DUAL = s.options({
  textScale,
  positiveScale,
  negativeScale,
  adapterScale,
  negativeAdapterScale,
  interval: INTERVAL,
});

const T = "text", U = "uncond";

/** A guidance plugin that is its table of terms, made from its resolved options. */
function formulaPlugin(
  { formula, ...def }: Omit<PluginDef<Guidance, Options>, "kind" | "create"> & {
    formula: (o: Options) => Formula;
  },
): PluginDef<Guidance, Options> {
  return {
    kind: "guidance",
    ...def,
    create: (o) => formulaGuidance({ ...o, name: def.name, formula: formula(o) }),
  };
}

export const GUIDANCE_PLUGINS: PluginDef<Guidance, Options>[] = [
  formulaPlugin({
    name: "dipsy",
    description: "DIPSY Eq. 9: e0 + wT(ec - e0) + wP(ecp - ec) - wN(ecpn - ecp)",
    schema: DUAL,
    formula: (o) => ({
      base: U,
      terms: [
        { weight: o.textScale, plus: T, minus: U },
        { weight: o.positiveScale, plus: "text+pos", minus: T },
        { weight: -o.negativeScale, plus: "text+pos+neg", minus: "text+pos" },
      ],
    }),
  }),
  formulaPlugin({
    name: "single-ip",
    description: "Eq. 8, one image prompt: e0 + wT(ec - e0) + wP(ecp - ec)",
    schema: s.options({
      textScale,
      positiveScale: weight("wI, image weight", 6),
      adapterScale,
      interval: INTERVAL,
    }),
    formula: (o) => ({
      base: U,
      terms: [
        { weight: o.textScale, plus: T, minus: U },
        { weight: o.positiveScale, plus: "text+pos", minus: T },
      ],
    }),
  }),
  formulaPlugin({
    name: "cfg",
    description: "text classifier-free guidance, no image prompts: e0 + wT(ec - e0)",
    schema: s.options({ textScale }),
    formula: (o) => ({ base: U, terms: [{ weight: o.textScale, plus: T, minus: U }] }),
  }),
  formulaPlugin({
    name: "neg-text-relative",
    description: "ablation: negative taken relative to text: ... - wN(eps(c, i-) - ec)",
    schema: DUAL,
    formula: (o) => ({
      base: U,
      terms: [
        { weight: o.textScale, plus: T, minus: U },
        { weight: o.positiveScale, plus: "text+pos", minus: T },
        { weight: -o.negativeScale, plus: "text+neg", minus: T },
      ],
    }),
  }),
  formulaPlugin({
    name: "diffusers-style",
    description:
      "ablation: negative image in the unconditional branch, one scale: u + wT(c - u), u = eps('', i-), c = eps(c, i+)",
    schema: s.options({ textScale, adapterScale, negativeAdapterScale }),
    formula: (o) => ({
      base: "uncond+neg",
      terms: [{ weight: o.textScale, plus: "text+pos", minus: "uncond+neg" }],
    }),
  }),
];
