/**
 * One full DIPSY denoising step for one image (four predictions), ours vs the official loop
 * structure in diffusers, on the tiny preset (overhead bound) and on a mid-size SD1.5-shaped UNet
 * with the real Plus adapter dimensions (compute bound).
 *
 * Ours is the body of core/sampling.ts's loop, timed between its onStep callbacks: ONE UNet call
 * of batch 4 with per-sample adapter scales, the Eq. 9 combine and the DPM-Solver++ step. The
 * backbone here only replaces the encoders by precomputed text states and image tokens, which the
 * loop computes once per batch, before its first step. The reference
 * (bench/reference/dipsy_bench.py) runs the official three batch-2 UNet calls switched with
 * set_ip_adapter_scale, the combine and DPMSolverMultistepScheduler.step; it writes the weights and
 * inputs once under .cache/bench/dipsy/, both sides load those files, and our final latents are
 * checked against the reference's before anything is timed.
 *
 * `reference_s` is the official structure fed precomputed image tokens, so the ratio measures the
 * batching alone; `reference_official_s` is the official code as it stands, which also runs both
 * Plus resamplers inside every UNet call. The first step of every run (ours: also the setup) is
 * left out; the two sides alternate whole runs, so both see the same machine load. Medians of wall
 * time make the ratio; `ratio_cpu` (process CPU seconds, reference without resamplers) is the same
 * comparison with the neighbours' load taken out, meaningful when both sides run one thread
 * (OMP_NUM_THREADS=1; with more, CPU time also counts OpenMP's spinning).
 *
 * Last, stderr gets the time per image at full size (SD1.5, 512 px): from the mid-size step scaled
 * by FLOP counts, or, with DIPSY_BENCH_FULL=1, from a measured full-size UNet call (minutes).
 */
import { join } from "node:path";
import process from "node:process";
import { noGrad, ops, runtimeInfo, SafetensorsFile, scope, type Tensor } from "../ffi/mod.ts";
import { ROOT } from "../ffi/lib.ts";
import type { DiffusionBackbone, ImagePrompt } from "../core/backbone.ts";
import type { RgbImage } from "../core/image.ts";
import { type Guidance, registry, type Sampler } from "../core/plugins.ts";
import { sampleLatents } from "../core/sampling.ts";
import { registerDefaults } from "../plugins/defaults.ts";
import { SD15_SCHEDULER_CONFIG } from "../plugins/samplers/mod.ts";
import { IpAdapter, SD15_IP_PLUS } from "../plugins/sd15/ip_adapter.ts";
import { UNet2DConditionModel } from "../plugins/sd15/unet.ts";
import { SD15_UNET_CONFIG_JSON } from "../plugins/sd15/unet_config.ts";
import { type BenchResult, ReferenceProcess } from "./harness.ts";

registerDefaults();

const CACHE = join(ROOT, ".cache", "bench", "dipsy");
const SCRIPT = join(ROOT, "bench", "reference", "dipsy_bench.py");
const TOL = 1e-3;
/** DIPSY's step count, for the full-size estimate. */
const FULL_STEPS = 50;

/** Warm-up runs per side, then timed rounds (one run of each side per round). */
const PLAN: Record<string, { warmup: number; rounds: number }> = {
  tiny: { warmup: 1, rounds: 7 },
  // a mid-size step takes seconds: the left-out first step of each run is warm-up enough
  mid: { warmup: 0, rounds: 3 },
};

interface CaseInfo {
  steps: number;
  latent: number;
  noise_seed: number;
}

interface Ready {
  threads: number;
  guidance: Record<string, number>;
  cases: Record<string, CaseInfo>;
}

const PROMPT = "a photo of a cat";
// Stand-ins for the reference images: the backbone maps each to its precomputed tokens.
const POSITIVE: RgbImage = { width: 1, height: 1, data: new Uint8Array(3) };
const NEGATIVE: RgbImage = { width: 1, height: 1, data: new Uint8Array(3) };

/**
 * The benchmark's UNet and adapters behind the interface the sampling loop sees. The encoders
 * return the reference's precomputed states: they run once per batch, outside the timed steps.
 */
class StepBackbone implements DiffusionBackbone {
  readonly dtype = "f32";
  readonly device = "cpu";
  readonly latentChannels: number;
  readonly vaeScaleFactor = 8;
  readonly defaultSize: number;
  readonly schedulerConfig = SD15_SCHEDULER_CONFIG;
  readonly adapterCount = 2;
  readonly modelIds = {};
  readonly #tokens: Map<RgbImage, Tensor>;

  constructor(
    readonly unet: UNet2DConditionModel,
    readonly plus: IpAdapter,
    readonly io: Map<string, Tensor>,
    latent: number,
  ) {
    unet.attachIpAdapters([plus, plus]);
    this.latentChannels = unet.config.inChannels;
    this.defaultSize = latent * this.vaeScaleFactor;
    this.#tokens = new Map([[POSITIVE, this.#io("tokens_pos")], [
      NEGATIVE,
      this.#io("tokens_neg"),
    ]]);
  }

  #io(name: string): Tensor {
    const t = this.io.get(name);
    if (!t) throw new Error(`${CACHE}: io.safetensors has no "${name}"`);
    return t;
  }

  encodePrompts(prompts: readonly string[]): Tensor {
    return ops.cat(prompts.map((p) => this.#io(p === "" ? "uncond" : "text")), 0);
  }

  encodeImages(images: readonly RgbImage[]): Tensor {
    return ops.cat(images.map((i) => this.#tokens.get(i)!), 0);
  }

  predictNoise(latents: Tensor, timestep: number, text: Tensor, ip: ImagePrompt | null): Tensor {
    return noGrad(() => this.unet.forward(latents, timestep, text, ip));
  }

  decode(): Tensor {
    throw new Error("the step benchmark never decodes");
  }

  [Symbol.dispose](): void {
    this.unet.detachIpAdapters();
    this.unet.dispose();
    this.plus.dispose();
    for (const t of this.io.values()) t.dispose();
  }
}

/** Wall and CPU seconds of each timed step. */
interface Steps {
  wall: number[];
  cpu: number[];
}

/** One image through `info.steps` steps: the times of each step but the first, final latents. */
function runOurs(
  bb: StepBackbone,
  guidance: Guidance,
  info: CaseInfo,
): Steps & { latents: Tensor } {
  using sampler = registry.create<Sampler>("sampler", "dpm-solver++", {
    steps: info.steps,
    config: bb.schedulerConfig,
  });
  const wall: number[] = [], cpu: number[] = [];
  const latents = noGrad(() =>
    sampleLatents(bb, [{
      prompt: PROMPT,
      positive: POSITIVE,
      negative: NEGATIVE,
      seed: info.noise_seed,
    }], {
      width: bb.defaultSize,
      height: bb.defaultSize,
      guidance,
      sampler,
      onStep: () => {
        wall.push(performance.now() / 1000);
        const { user, system } = process.cpuUsage();
        cpu.push((user + system) / 1e6);
      },
    })
  );
  const diffs = (xs: number[]) => xs.slice(1).map((x, i) => x - xs[i]);
  return { wall: diffs(wall), cpu: diffs(cpu), latents };
}

/** Throws when ours and the reference differ beyond rounding: the timing would be meaningless. */
function checkSame(label: string, got: Tensor, want: Tensor): void {
  const [err, scale] = scope(() => [
    ops.maxAll(ops.abs(ops.sub(got, want))).item(),
    ops.maxAll(ops.abs(want)).item(),
  ]);
  if (!(err <= TOL * Math.max(1, scale))) {
    throw new Error(`${label}: final latents differ from the reference by ${err} (scale ${scale})`);
  }
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1];

/** Medians of the wall and CPU seconds per step, ours and the reference's two variants. */
interface StepTimes {
  ours: number;
  tokens: number;
  official: number;
  oursCpu: number;
  tokensCpu: number;
}

async function benchCase(ref: ReferenceProcess, ready: Ready, name: string): Promise<StepTimes> {
  const info = ready.cases[name];
  const dir = join(CACHE, name);
  const unet = UNet2DConditionModel.fromPretrained(join(dir, "unet"));
  using bb = new StepBackbone(
    unet,
    IpAdapter.load(join(dir, "ip-adapter-plus.safetensors"), unet),
    SafetensorsFile.open(join(dir, "io.safetensors")).loadAll(),
    info.latent,
  );
  const guidance = registry.create<Guidance>("guidance", "dipsy", ready.guidance);
  await ref.request({ op: "load", case: name });
  {
    using latents = runOurs(bb, guidance, info).latents;
    checkSame(`dipsy_step_${name}`, latents, bb.io.get("latents")!);
  }
  const ours: Steps = { wall: [], cpu: [] };
  const tokens: Steps = { wall: [], cpu: [] };
  const official: Steps = { wall: [], cpu: [] };
  const refRun = async (variant: string): Promise<Steps> => {
    const r = await ref.request<{ step_s: number[]; step_cpu_s: number[] }>({ op: "run", variant });
    return { wall: r.step_s.slice(1), cpu: r.step_cpu_s.slice(1) };
  };
  const add = (to: Steps, from: Steps) => (to.wall.push(...from.wall), to.cpu.push(...from.cpu));
  const { warmup, rounds } = PLAN[name];
  for (let r = -warmup; r < rounds; r++) {
    const o = await refRun("official"), t = await refRun("tokens");
    const run = runOurs(bb, guidance, info);
    run.latents.dispose();
    if (r < 0) continue;
    add(official, o);
    add(tokens, t);
    add(ours, run);
  }
  return {
    ours: median(ours.wall),
    tokens: median(tokens.wall),
    official: median(official.wall),
    oursCpu: median(ours.cpu),
    tokensCpu: median(tokens.cpu),
  };
}

interface DipsyResult extends BenchResult {
  reference_official_s: number;
  ratio_official: number;
  ours_cpu_s: number;
  reference_cpu_s: number;
  ratio_cpu: number;
}

function result(name: string, t: StepTimes): DipsyResult {
  return {
    bench: `dipsy_step_${name}`,
    ours_s: t.ours,
    reference_s: t.tokens,
    reference_official_s: t.official,
    ratio_official: t.ours / t.official,
    ours_cpu_s: t.oursCpu,
    reference_cpu_s: t.tokensCpu,
    ratio_cpu: t.oursCpu / t.tokensCpu,
  };
}

/** Ours: one SD1.5 UNet call of batch 4 at a 64x64 latent with two Plus adapters, random weights. */
function measureFullUnet(): number {
  using unet = UNet2DConditionModel.random({ ...SD15_UNET_CONFIG_JSON }, 0);
  using plus = IpAdapter.random(SD15_IP_PLUS, unet, 1);
  unet.attachIpAdapters([plus, plus]);
  const call = () =>
    noGrad(() =>
      scope(() => {
        const x = ops.randn([4, 4, 64, 64], "f32", "cpu", null);
        const text = ops.randn([4, 77, 768], "f32", "cpu", null);
        const tokens = ops.randn([4, 16, 768], "f32", "cpu", null);
        const scales = ops.full([4, 2], 0.6, "f32", "cpu");
        void unet.forward(x, 500, text, { tokens: [tokens, tokens], scales });
      })
    );
  call();
  const t0 = performance.now();
  call();
  unet.detachIpAdapters();
  return (performance.now() - t0) / 1000;
}

interface Flops {
  unet_mid_b4: number;
  unet_full_b4: number;
  encode: number;
  decode: number;
}

/** time_per_image ≈ steps × t_step + t_encode + t_decode at 512 px, on stderr. */
function printFullSize(mid: StepTimes, flops: Flops, threads: number): void {
  const s = (x: number) => `${x.toFixed(x < 10 ? 2 : 0)} s`;
  const tf = (x: number) => `${(x / 1e12).toFixed(3)} TFLOP`;
  // FLOP/s our loop sustains on a mid-size step; encoders and decoder are estimated at that rate
  const rate = flops.unet_mid_b4 / mid.ours;
  const scale = flops.unet_full_b4 / flops.unet_mid_b4;
  const measured = Deno.env.get("DIPSY_BENCH_FULL") === "1" ? measureFullUnet() : null;
  const step = measured ?? mid.ours * scale;
  const encode = flops.encode / rate, decode = flops.decode / rate;
  const lines = [
    `dipsy step at full size (SD1.5, 512 px, 64x64 latent; CPU, ${threads} threads):`,
    `  time_per_image ≈ steps × t_step + t_encode + t_decode`,
    measured !== null
      ? `  t_step ≈ ${s(step)}: one measured UNet call, batch 4, two Plus adapters`
      : `  t_step ≈ t_step(mid) × F_unet(full) / F_unet(mid) = ${s(mid.ours)} × ` +
        `${tf(flops.unet_full_b4)} / ${tf(flops.unet_mid_b4)} = ${s(step)}` +
        ` (DIPSY_BENCH_FULL=1 measures it)`,
    `  t_encode ≈ ${tf(flops.encode)} / ${(rate / 1e9).toFixed(1)} GFLOP/s = ${s(encode)}` +
    `  (CLIP L/14 text x2 prompts, ViT-H/14 + Plus x2 images)`,
    `  t_decode ≈ ${tf(flops.decode)} / ${(rate / 1e9).toFixed(1)} GFLOP/s = ${s(decode)}` +
    `  (VAE decoder, 512 px)`,
    `  ${FULL_STEPS} steps: ours ≈ ${FULL_STEPS} × ${s(step)} + ${s(encode)} + ${s(decode)} = ` +
    `${s(FULL_STEPS * step + encode + decode)} per image; the official loop's step costs ` +
    `${(mid.tokens / mid.ours).toFixed(2)}x ours (${(mid.official / mid.ours).toFixed(2)}x with ` +
    `its per-call resamplers): ≈ ${s(FULL_STEPS * step * mid.tokens / mid.ours + encode + decode)}`,
  ];
  console.error(lines.join("\n"));
}

export async function benchDipsy(): Promise<BenchResult[]> {
  const threads = runtimeInfo().num_threads;
  await using ref = new ReferenceProcess(SCRIPT, [CACHE, String(threads)]);
  const ready = await ref.answer<Ready>();
  if (ready.threads !== threads) {
    throw new Error(`thread counts differ: reference ${ready.threads}, ours ${threads}`);
  }
  const tiny = await benchCase(ref, ready, "tiny");
  const mid = await benchCase(ref, ready, "mid");
  printFullSize(mid, await ref.request<Flops>({ op: "flops" }), threads);
  return [result("tiny", tiny), result("mid", mid)];
}
