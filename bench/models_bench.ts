/**
 * Whole-model forwards against diffusers / transformers eager: the SD1.5 UNet (tiny: overhead
 * bound; mid-size: compute bound) with and without two IP-Adapter Plus, the Plus resampler, and
 * the CLIP vision tower. The reference script writes random weights and inputs once under
 * .cache/bench/models/; both sides load those same files and run with torch's default threads.
 * Before timing, each of our outputs is checked against the reference's, so a ratio always
 * compares the same computation.
 *
 * The reference stays up as a server and the two sides alternate timed rounds: on a shared
 * machine the load changes from second to second, and multi-threaded kernels suffer from it a lot,
 * so rounds taken far apart in time would compare the neighbours' jobs, not the two stacks.
 */
import { join } from "node:path";
import { IpAdapter } from "../plugins/sd15/ip_adapter.ts";
import { UNet2DConditionModel } from "../plugins/sd15/unet.ts";
import { loadClipVision } from "../plugins/clip/model.ts";
import { noGrad, ops, runtimeInfo, SafetensorsFile, scope, type Tensor } from "../ffi/mod.ts";
import { ROOT } from "../ffi/lib.ts";
import { type BenchResult, ReferenceProcess } from "./harness.ts";

const CACHE = join(ROOT, ".cache", "bench", "models");
const SCRIPT = join(ROOT, "bench", "reference", "models_bench.py");
const TOL = 1e-3;

/** Warm-up calls, timed rounds, calls per round: tiny cases take ~10 ms, mid-size ones ~1 s. */
interface Plan {
  warmup: number;
  rounds: number;
  calls: number;
}
const TINY: Plan = { warmup: 10, rounds: 9, calls: 10 };
const MID: Plan = { warmup: 2, rounds: 5, calls: 1 };
const PLAN: Record<string, Plan> = {
  unet_tiny: TINY,
  unet_tiny_ip2: TINY,
  unet_tiny_plus_resampler: TINY,
  clip_vision_tiny: TINY,
  unet_mid: MID,
  unet_mid_ip2: MID,
  unet_mid_plus_resampler: { warmup: 3, rounds: 7, calls: 3 },
  clip_vision_mid: MID,
};

function secondsPerCall(calls: number, fn: () => void): number {
  const t0 = performance.now();
  for (let i = 0; i < calls; i++) fn();
  return (performance.now() - t0) / 1000 / calls;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1];

/** Warms both sides up, then alternates their rounds; medians of the seconds per call. */
async function race(
  ref: ReferenceProcess,
  name: string,
  forward: () => unknown,
): Promise<BenchResult> {
  const { warmup, rounds, calls } = PLAN[name];
  const ours = () => scope(() => void forward());
  await ref.request({ op: "run", case: name, calls: warmup });
  secondsPerCall(warmup, ours);
  const theirs: number[] = [], mine: number[] = [];
  for (let r = 0; r < rounds; r++) {
    theirs.push((await ref.request({ op: "run", case: name, calls })).s as number);
    mine.push(secondsPerCall(calls, ours));
  }
  warnIfNoisy(name, "ours", mine);
  warnIfNoisy(name, "reference", theirs);
  return { bench: `model_${name}`, ours_s: median(mine), reference_s: median(theirs) };
}

/** Rounds of one side that spread this much mean the machine was busy: say so on stderr. */
function warnIfNoisy(name: string, side: string, runs: number[]): void {
  const lo = Math.min(...runs), hi = Math.max(...runs);
  if (hi > 1.5 * lo) {
    const ms = (s: number) => (s * 1000).toPrecision(3);
    console.error(
      `model_${name}: ${side} rounds range ${ms(lo)}-${ms(hi)} ms per call; the machine is ` +
        "busy and the ratio is unreliable",
    );
  }
}

function loadIO(dir: string): Map<string, Tensor> {
  return SafetensorsFile.open(join(dir, "io.safetensors")).loadAll();
}

/** Throws when ours and the reference differ beyond rounding: the timing would be meaningless. */
function checkSame(label: string, got: Tensor, want: Tensor): void {
  const [err, scale] = scope(() => [
    ops.maxAll(ops.abs(ops.sub(got, want))).item(),
    ops.maxAll(ops.abs(want)).item(),
  ]);
  if (!(err <= TOL * Math.max(1, scale))) {
    throw new Error(`${label}: output differs from the reference by ${err} (scale ${scale})`);
  }
}

async function benchUnet(
  ref: ReferenceProcess,
  name: "unet_tiny" | "unet_mid",
): Promise<BenchResult[]> {
  const dir = join(CACHE, name);
  const io = loadIO(dir);
  const get = (k: string) => io.get(k)!;
  using unet = UNet2DConditionModel.fromPretrained(join(dir, "unet"));
  using plus = IpAdapter.load(join(dir, "ip-adapter-plus.safetensors"), unet);
  await ref.request({ op: "load", group: name });
  const [x, t, text, image] = [get("sample"), get("timesteps"), get("text"), get("image")];
  using scales = ops.full([x.size(0), 2], 0.6, "f32", "cpu");
  const ip = { tokens: [get("tokens"), get("tokens")], scales };
  // noGrad takes synchronous functions, so each checked or timed forward gets its own
  noGrad(() => scope(() => checkSame(name, unet.forward(x, t, text), get("out"))));
  const out = [await race(ref, name, () => noGrad(() => unet.forward(x, t, text)))];
  unet.attachIpAdapters([plus, plus]);
  noGrad(() =>
    scope(() => {
      checkSame(`${name} Plus tokens`, plus.project(image), get("tokens"));
      checkSame(`${name}_ip2`, unet.forward(x, t, text, ip), get("out_ip2"));
    })
  );
  out.push(await race(ref, `${name}_ip2`, () => noGrad(() => unet.forward(x, t, text, ip))));
  out.push(await race(ref, `${name}_plus_resampler`, () => noGrad(() => plus.project(image))));
  unet.detachIpAdapters();
  for (const v of io.values()) v.dispose();
  return out;
}

async function benchClip(
  ref: ReferenceProcess,
  name: "clip_vision_tiny" | "clip_vision_mid",
): Promise<BenchResult> {
  const dir = join(CACHE, name);
  const io = loadIO(dir);
  const pixels = io.get("pixels")!;
  using model = loadClipVision(dir);
  await ref.request({ op: "load", group: name });
  noGrad(() =>
    scope(() => {
      const r = model.forward(pixels);
      checkSame(`${name} last_hidden_state`, r.lastHiddenState, io.get("last_hidden_state")!);
      checkSame(`${name} image_embeds`, r.imageEmbeds!, io.get("image_embeds")!);
    })
  );
  const result = await race(ref, name, () => noGrad(() => model.forward(pixels)));
  for (const v of io.values()) v.dispose();
  return result;
}

export async function benchModels(): Promise<BenchResult[]> {
  await using ref = new ReferenceProcess(SCRIPT, [CACHE]);
  const threads = runtimeInfo().num_threads;
  // The first answer, once the cached models exist: the reference's thread count.
  const theirs = (await ref.answer()).threads as number;
  if (theirs !== threads) {
    throw new Error(`thread counts differ: reference ${theirs}, ours ${threads}`);
  }
  return [
    ...await benchUnet(ref, "unet_tiny"),
    await benchClip(ref, "clip_vision_tiny"),
    ...await benchUnet(ref, "unet_mid"),
    await benchClip(ref, "clip_vision_mid"),
  ];
}
