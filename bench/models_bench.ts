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
 * so rounds taken far apart in time would compare the neighbours' jobs, not the two stacks. Each
 * line also carries both sides' process CPU seconds (`ratio_cpu`, see ModelResult).
 *
 * Also counted, not timed: the FFI calls of one UNet forward (op calls, frees, shape reads), by a
 * wrapper around the bindings, for the tiny UNet and for the full-size SD1.5 UNet with two Plus
 * adapters (random weights of the real shapes; counted on an 8x8 latent, since the count depends
 * on the architecture, not on the resolution). A GPU pays host time for each call.
 */
import { join } from "node:path";
import process from "node:process";
import { IpAdapter, SD15_IP_PLUS } from "../plugins/sd15/ip_adapter.ts";
import { type IpInput, UNet2DConditionModel } from "../plugins/sd15/unet.ts";
import { SD15_UNET_CONFIG_JSON } from "../plugins/sd15/unet_config.ts";
import type { PlusProjectionConfig } from "../plugins/sd15/ip_projection.ts";
import { loadClipVision } from "../plugins/clip/model.ts";
import { noGrad, ops, runtimeInfo, SafetensorsFile, scope, type Tensor } from "../ffi/mod.ts";
import { countFfiCalls } from "../ffi/call.ts";
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

/** A counted figure: FFI calls of one UNet forward, by kind. */
export interface CountedFigure {
  bench: string;
  value: number;
  unit: "ffi_calls";
  ops: number;
  views: number;
  frees: number;
  meta: number;
  /** The most calls allowed (issue 10: at most 1,000 for the full-size UNet with two adapters). */
  target?: number;
}

/** The FFI calls of one warmed-up forward. */
function countForward(
  bench: string,
  unet: UNet2DConditionModel,
  inputs: { x: Tensor; t: Tensor; text: Tensor; ip?: IpInput },
  target?: number,
): CountedFigure {
  const forward = () =>
    noGrad(() => scope(() => void unet.forward(inputs.x, inputs.t, inputs.text, inputs.ip)));
  forward();
  const { calls } = countFfiCalls(forward);
  return {
    bench,
    value: calls.total,
    unit: "ffi_calls",
    ops: calls.ops,
    views: calls.views,
    frees: calls.frees,
    meta: calls.meta,
    ...(target === undefined ? {} : { target }),
  };
}

/** The full-size SD1.5 UNet (random weights, 3.4 GB in f32) with two Plus adapters. */
function countFullSize(): CountedFigure[] {
  using unet = UNet2DConditionModel.random(SD15_UNET_CONFIG_JSON, 0);
  using plus = IpAdapter.random(SD15_IP_PLUS, unet, 1);
  return scope(() => {
    const cross = SD15_IP_PLUS.crossDim;
    const x = ops.randn([1, 4, 8, 8], "f32", "cpu", null);
    const t = ops.full([1], 500, "f32", "cpu");
    const text = ops.randn([1, 77, cross], "f32", "cpu", null);
    const tokens = ops.randn(
      [1, (SD15_IP_PLUS as PlusProjectionConfig).queries, cross],
      "f32",
      "cpu",
      null,
    );
    const plain = countForward("model_unet_sd15_ffi_calls", unet, { x, t, text });
    unet.attachIpAdapters([plus, plus]);
    const ip = { tokens: [tokens, tokens], scales: ops.full([1, 2], 0.6, "f32", "cpu") };
    const withIp = countForward("model_unet_sd15_ip2_ffi_calls", unet, { x, t, text, ip }, 1000);
    unet.detachIpAdapters();
    return [plain, withIp];
  });
}

/** Wall and process CPU seconds per call. */
function secondsPerCall(calls: number, fn: () => void): { wall: number; cpu: number } {
  const t0 = performance.now(), c0 = process.cpuUsage();
  for (let i = 0; i < calls; i++) fn();
  const { user, system } = process.cpuUsage(c0);
  return { wall: (performance.now() - t0) / 1000 / calls, cpu: (user + system) / 1e6 / calls };
}

/**
 * A timed model benchmark. `ratio_cpu` compares process CPU seconds instead of wall time: the
 * same comparison with the neighbours' load taken out, meaningful when both sides run one thread
 * (OMP_NUM_THREADS=1; with more, CPU time also counts OpenMP's spinning).
 */
interface ModelResult extends BenchResult {
  ours_cpu_s: number;
  reference_cpu_s: number;
  ratio_cpu: number;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1];

/** Warms both sides up, then alternates their rounds; medians of the seconds per call. */
async function race(
  ref: ReferenceProcess,
  name: string,
  forward: () => unknown,
): Promise<ModelResult> {
  const { warmup, rounds, calls } = PLAN[name];
  const ours = () => scope(() => void forward());
  await ref.request({ op: "run", case: name, calls: warmup });
  secondsPerCall(warmup, ours);
  const theirs: number[] = [],
    mine: number[] = [],
    theirsCpu: number[] = [],
    mineCpu: number[] = [];
  for (let r = 0; r < rounds; r++) {
    const answer = await ref.request<{ s: number; cpu_s: number }>({
      op: "run",
      case: name,
      calls,
    });
    theirs.push(answer.s);
    theirsCpu.push(answer.cpu_s);
    const { wall, cpu } = secondsPerCall(calls, ours);
    mine.push(wall);
    mineCpu.push(cpu);
  }
  warnIfNoisy(name, "ours", mine);
  warnIfNoisy(name, "reference", theirs);
  const [oursCpu, referenceCpu] = [median(mineCpu), median(theirsCpu)];
  return {
    bench: `model_${name}`,
    ours_s: median(mine),
    reference_s: median(theirs),
    ours_cpu_s: oursCpu,
    reference_cpu_s: referenceCpu,
    ratio_cpu: oursCpu / referenceCpu,
  };
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
  wanted: (bench: string) => boolean,
): Promise<(BenchResult | CountedFigure)[]> {
  const dir = join(CACHE, name);
  const io = loadIO(dir);
  const get = (k: string) => io.get(k)!;
  using unet = UNet2DConditionModel.fromPretrained(join(dir, "unet"));
  using plus = IpAdapter.load(join(dir, "ip-adapter-plus.safetensors"), unet);
  await ref.request({ op: "load", group: name });
  const [x, t, text, image] = [get("sample"), get("timesteps"), get("text"), get("image")];
  using scales = ops.full([x.size(0), 2], 0.6, "f32", "cpu");
  const ip = { tokens: [get("tokens"), get("tokens")], scales };
  const out: (BenchResult | CountedFigure)[] = [];
  // noGrad takes synchronous functions, so each checked or timed forward gets its own
  noGrad(() => scope(() => checkSame(name, unet.forward(x, t, text), get("out"))));
  if (wanted(`model_${name}`)) {
    out.push(await race(ref, name, () => noGrad(() => unet.forward(x, t, text))));
  }
  if (name === "unet_tiny") out.push(countForward(`model_${name}_ffi_calls`, unet, { x, t, text }));
  unet.attachIpAdapters([plus, plus]);
  noGrad(() =>
    scope(() => {
      checkSame(`${name} Plus tokens`, plus.project(image), get("tokens"));
      checkSame(`${name}_ip2`, unet.forward(x, t, text, ip), get("out_ip2"));
    })
  );
  if (wanted(`model_${name}_ip2`)) {
    out.push(await race(ref, `${name}_ip2`, () => noGrad(() => unet.forward(x, t, text, ip))));
  }
  if (name === "unet_tiny") {
    out.push(countForward(`model_${name}_ip2_ffi_calls`, unet, { x, t, text, ip }));
  }
  if (wanted(`model_${name}_plus_resampler`)) {
    out.push(await race(ref, `${name}_plus_resampler`, () => noGrad(() => plus.project(image))));
  }
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

/**
 * `only` (the `--only` of bench/main.ts) skips the groups none of whose benchmarks it selects.
 */
export async function benchModels(only?: string): Promise<(BenchResult | CountedFigure)[]> {
  // a group runs when `only` selects one of its benchmarks (prefix either way) or this suite
  const wanted = (bench: string) =>
    !only || "model".startsWith(only) || bench.startsWith(only) || only.startsWith(bench);
  await using ref = new ReferenceProcess(SCRIPT, [CACHE]);
  const threads = runtimeInfo().num_threads;
  // The first answer, once the cached models exist: the reference's thread count.
  const theirs = (await ref.answer()).threads as number;
  if (theirs !== threads) {
    throw new Error(`thread counts differ: reference ${theirs}, ours ${threads}`);
  }
  const out: (BenchResult | CountedFigure)[] = [];
  if (wanted("model_unet_tiny")) out.push(...await benchUnet(ref, "unet_tiny", wanted));
  if (wanted("model_clip_vision_tiny")) out.push(await benchClip(ref, "clip_vision_tiny"));
  if (wanted("model_unet_mid")) out.push(...await benchUnet(ref, "unet_mid", wanted));
  if (wanted("model_clip_vision_mid")) out.push(await benchClip(ref, "clip_vision_mid"));
  if (wanted("model_unet_sd15")) out.push(...countFullSize());
  return out;
}
