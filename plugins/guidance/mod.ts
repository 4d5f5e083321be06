/**
 * Guidance plugins. The DIPSY paper's Eq. 9 is the default; the rest are its ablations and the
 * usual baselines. Weights are positive magnitudes: the negative image term is subtracted.
 */
import type { Guidance, PluginDef } from "../../core/plugins.ts";
import { registry } from "../../core/plugins.ts";
import { checkInterval, checkWeight, formulaGuidance } from "./terms.ts";

interface Options {
  textScale?: number;
  positiveScale?: number;
  negativeScale?: number;
  adapterScale?: number;
  interval?: [number, number];
}

const COMMON = {
  textScale: { description: "wT, text guidance weight", default: 7.5 },
  adapterScale: {
    description: "lambda, IP-Adapter scale when an image prompt is on",
    default: 0.6,
  },
  interval: {
    description: "[start, end] fractions of the steps where image terms apply (default: all)",
  },
};

function read(o: Options) {
  return {
    wT: checkWeight("textScale", o.textScale ?? 7.5),
    wP: checkWeight("positiveScale", o.positiveScale ?? 6),
    wN: checkWeight("negativeScale", o.negativeScale ?? 6),
    lambda: checkWeight("adapterScale", o.adapterScale ?? 0.6),
    interval: checkInterval(o.interval),
  };
}

const T = "text", U = "uncond";

export const dipsy: PluginDef<Guidance, Options> = {
  kind: "guidance",
  name: "dipsy",
  description: "DIPSY Eq. 9: e0 + wT(ec - e0) + wP(ecp - ec) - wN(ecpn - ecp)",
  options: {
    ...COMMON,
    positiveScale: { description: "wP, positive image weight", default: 6 },
    negativeScale: { description: "wN, negative image weight (subtracted)", default: 6 },
  },
  create(o) {
    const { wT, wP, wN, lambda, interval } = read(o);
    return formulaGuidance({
      name: "dipsy",
      textScale: wT,
      adapterScale: lambda,
      usesNegative: true,
      interval,
      formula: {
        base: U,
        terms: [
          { weight: wT, plus: T, minus: U },
          { weight: wP, plus: "text+pos", minus: T },
          { weight: -wN, plus: "text+pos+neg", minus: "text+pos" },
        ],
      },
    });
  },
};

export const singleIp: PluginDef<Guidance, Options> = {
  kind: "guidance",
  name: "single-ip",
  description: "Eq. 8, one image prompt: e0 + wT(ec - e0) + wP(ecp - ec)",
  options: { ...COMMON, positiveScale: { description: "wI, image weight", default: 6 } },
  create(o) {
    const { wT, wP, lambda, interval } = read(o);
    return formulaGuidance({
      name: "single-ip",
      textScale: wT,
      adapterScale: lambda,
      usesNegative: false,
      interval,
      formula: {
        base: U,
        terms: [{ weight: wT, plus: T, minus: U }, { weight: wP, plus: "text+pos", minus: T }],
      },
    });
  },
};

export const cfg: PluginDef<Guidance, Options> = {
  kind: "guidance",
  name: "cfg",
  description: "text classifier-free guidance, no image prompts: e0 + wT(ec - e0)",
  options: { textScale: COMMON.textScale },
  create(o) {
    const { wT } = read(o);
    return formulaGuidance({
      name: "cfg",
      textScale: wT,
      adapterScale: 0,
      usesNegative: false,
      formula: { base: U, terms: [{ weight: wT, plus: T, minus: U }] },
    });
  },
};

export const negativeVsText: PluginDef<Guidance, Options> = {
  kind: "guidance",
  name: "neg-text-relative",
  description: "ablation: negative taken relative to text: ... - wN(eps(c, i-) - ec)",
  options: dipsy.options,
  create(o) {
    const { wT, wP, wN, lambda, interval } = read(o);
    return formulaGuidance({
      name: "neg-text-relative",
      textScale: wT,
      adapterScale: lambda,
      usesNegative: true,
      interval,
      formula: {
        base: U,
        terms: [
          { weight: wT, plus: T, minus: U },
          { weight: wP, plus: "text+pos", minus: T },
          { weight: -wN, plus: "text+neg", minus: T },
        ],
      },
    });
  },
};

export const diffusersStyle: PluginDef<Guidance, Options> = {
  kind: "guidance",
  name: "diffusers-style",
  description:
    "ablation: negative image in the unconditional branch, one scale: u + wT(c - u), u = eps('', i-), c = eps(c, i+)",
  options: { textScale: COMMON.textScale, adapterScale: COMMON.adapterScale },
  create(o) {
    const { wT, lambda } = read(o);
    return formulaGuidance({
      name: "diffusers-style",
      textScale: wT,
      adapterScale: lambda,
      usesNegative: true,
      formula: {
        base: "uncond+neg",
        terms: [{ weight: wT, plus: "text+pos", minus: "uncond+neg" }],
      },
    });
  },
};

export const GUIDANCE_PLUGINS = [dipsy, singleIp, cfg, negativeVsText, diffusersStyle];

for (const def of GUIDANCE_PLUGINS) if (!registry.has(def.kind, def.name)) registry.register(def);
