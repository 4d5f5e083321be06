/**
 * Seconds per full-size DIPSY image on a GPU (512 px, 50 DPM-Solver++ steps, SD1.5 at its real
 * shapes with random weights made on the device, two IP-Adapter Plus, float16), ours at 1 and 8
 * images per batch, eager and with CUDA graphs, with the peak GPU memory of each; then diffusers
 * eager running the official three-call DIPSY loop on the same GPU (bench/reference/gpu_bench.py),
 * and the ratios. An image's time covers the whole batch: prompt and image encoding, the steps,
 * the VAE decode and the copy of the pixels to the host; the first batch of each kind is warm-up.
 *
 *   deno run -A bench/gpu_bench.ts            (bench/gpu.sh runs it on a GPU machine)
 *   deno run -A bench/gpu_bench.ts --smoke    tiny models on the CPU, 2 steps: checks the code
 *                                             of both sides, measures nothing
 *
 * One JSON line per figure on stdout. Targets (issue 10): at most 0.40 s per image at 8 images per
 * batch on an H100/H200-class GPU, and at most 0.5 of the official loop.
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import process from "node:process";
import {
  type Device,
  type DType,
  Generator,
  ops,
  runtimeInfo,
  scope,
  type Tensor,
} from "../ffi/mod.ts";
import { ROOT } from "../ffi/lib.ts";
import { cudaDevices, cudaMemoryStats, cudaResetPeakMemoryStats } from "../ffi/runtime.ts";
import type { RgbImage } from "../core/image.ts";
import type { Init, WeightSource } from "../core/weights.ts";
import { type Guidance, registry, type Sampler } from "../core/plugins.ts";
import { sampleLatents } from "../core/sampling.ts";
import { registerDefaults } from "../plugins/defaults.ts";
import type { ClipTextConfig, ClipVisionConfig } from "../plugins/clip/config.ts";
import { ClipTokenizer } from "../plugins/clip/tokenizer.ts";
import { Sd15Backbone } from "../plugins/sd15/backbone.ts";
import { SD15_IP_PLUS } from "../plugins/sd15/ip_adapter.ts";
import { sd15AttentionReport } from "../plugins/sd15/unet.ts";
import { SD15_UNET_CONFIG_JSON } from "../plugins/sd15/unet_config.ts";
import { SD15_VAE_CONFIG } from "../plugins/sd15/vae_config.ts";
import { referencePython } from "./harness.ts";

registerDefaults();

const TARGET_S_PER_IMAGE = 0.4;
const TARGET_RATIO = 0.5;

/** CLIP ViT-L/14's text tower (SD1.5's text_encoder), ids of the embedded byte-level tokenizer. */
const SD15_TEXT: ClipTextConfig = {
  vocabSize: 49408,
  hiddenSize: 768,
  intermediateSize: 3072,
  projectionDim: 768,
  numHiddenLayers: 12,
  numAttentionHeads: 12,
  maxPositionEmbeddings: 77,
  hiddenAct: "quick_gelu",
  layerNormEps: 1e-5,
  attentionDropout: 0,
  bosTokenId: 518,
  eosTokenId: 519,
  padTokenId: 519,
};

/** ViT-H/14, h94/IP-Adapter's models/image_encoder. */
const VIT_H_14: ClipVisionConfig = {
  hiddenSize: 1280,
  intermediateSize: 5120,
  projectionDim: 1024,
  numHiddenLayers: 32,
  numAttentionHeads: 16,
  numChannels: 3,
  imageSize: 224,
  patchSize: 14,
  hiddenAct: "gelu",
  layerNormEps: 1e-5,
  attentionDropout: 0,
};

/**
 * N(0, 0.02) weights drawn on the device by a device generator: SD1.5's 1.7 billion weights are
 * made in well under a second, where the CPU-drawn RandomSource would take most of a minute.
 */
class DeviceRandomSource implements WeightSource {
  constructor(
    readonly gen: Generator,
    readonly dtype: DType,
    readonly device: Device,
    readonly prefix = "",
  ) {}
  get(_name: string, shape: readonly number[], init: Init = "normal"): Tensor {
    if (init === "zeros") return ops.zeros(shape, this.dtype, this.device);
    if (init === "ones") return ops.ones(shape, this.dtype, this.device);
    const t = ops.randn(shape, this.dtype, this.device, this.gen);
    ops.mulScalar_(t, 0.02);
    return t;
  }
  has(): boolean {
    return true;
  }
  sub(prefix: string): WeightSource {
    const p = this.prefix ? `${this.prefix}.${prefix}` : prefix;
    return new DeviceRandomSource(this.gen, this.dtype, this.device, p);
  }
  assertAllUsed(): void {}
}

interface Plan {
  device: Device;
  steps: number;
  size: number;
  /** Images per batch, and the batches timed after one warm-up batch. */
  batches: [number, number][];
  build(cudaGraphs: boolean): Sd15Backbone;
  referenceArgs: string[];
}

function gpuPlan(): Plan {
  const device: Device = "cuda";
  return {
    device,
    steps: 50,
    size: 512,
    batches: [[1, 3], [8, 1]],
    build(cudaGraphs) {
      const gens: Generator[] = [];
      try {
        return Sd15Backbone.random({
          unet: { ...SD15_UNET_CONFIG_JSON },
          vae: SD15_VAE_CONFIG,
          text: SD15_TEXT,
          vision: VIT_H_14,
          ipAdapter: SD15_IP_PLUS,
          tokenizer: ClipTokenizer.byteLevel(),
        }, {
          device,
          dtype: "f16",
          cudaGraphs,
          name: "SD1.5 shapes, random weights",
          source: (seed, dtype, dev) => {
            const g = new Generator(seed, dev);
            gens.push(g);
            return new DeviceRandomSource(g, dtype, dev);
          },
        });
      } finally {
        for (const g of gens) g.dispose();
      }
    },
    referenceArgs: ["1", "8"],
  };
}

function smokePlan(): Plan {
  return {
    device: "cpu",
    steps: 2,
    size: 32,
    batches: [[1, 1], [2, 1]],
    build: (cudaGraphs) => Sd15Backbone.tiny({ cudaGraphs, onGraphFallback: () => {} }),
    referenceArgs: ["--smoke", "1", "2"],
  };
}

function noiseImage(size: number, seed: number): RgbImage {
  const data = new Uint8Array(size * size * 3);
  let s = seed >>> 0;
  for (let i = 0; i < data.length; i++) {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    data[i] = s >>> 24;
  }
  return { width: size, height: size, data };
}

/** Seconds for one batch of n images: encoders, steps, decode, pixels on the host. */
function runBatch(bb: Sd15Backbone, plan: Plan, n: number, seed: number): number {
  const guidance = registry.create<Guidance>("guidance", "dipsy", {});
  using sampler = registry.create<Sampler>("sampler", "dpm-solver++", {
    steps: plan.steps,
    config: bb.schedulerConfig,
  });
  const reqs = Array.from({ length: n }, (_, i) => ({
    prompt: `a photo of a class ${i % 3}`,
    seed: seed * 100 + i,
    positive: noiseImage(224, seed * 100 + i),
    negative: noiseImage(224, seed * 100 + i + 50),
  }));
  const t0 = performance.now();
  const latents = sampleLatents(bb, reqs, {
    width: plan.size,
    height: plan.size,
    guidance,
    sampler,
  });
  try {
    scope(() => bb.decode(latents).toHost());
  } finally {
    latents.dispose();
  }
  return (performance.now() - t0) / 1000;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1];

function emit(line: Record<string, unknown>): void {
  console.log(JSON.stringify(line));
}

interface Ours {
  n: number;
  graphs: boolean;
  sPerImage: number;
}

function benchOurs(plan: Plan): Ours[] {
  const out: Ours[] = [];
  for (const graphs of [false, true]) {
    using bb = plan.build(graphs);
    for (const [n, timed] of plan.batches) {
      const onGpu = plan.device !== "cpu";
      if (onGpu) cudaResetPeakMemoryStats();
      const runs: number[] = [];
      for (let r = 0; r <= timed; r++) runs.push(runBatch(bb, plan, n, 1 + r) / n);
      const sPerImage = median(runs.slice(1));
      const mode = graphs ? "graphs" : "eager";
      const fallback = bb.unetGraphs?.failure ?? null;
      emit({
        bench: `gpu_dipsy_${plan.size}px_${n}img_${mode}`,
        s_per_image: sPerImage,
        images_per_batch: n,
        cuda_graphs: graphs && fallback === null,
        ...(fallback ? { graph_fallback: fallback } : {}),
        steps: plan.steps,
        runs,
      });
      if (onGpu) {
        emit({
          bench: `gpu_peak_memory_${n}img_${mode}`,
          peak_allocated_bytes: cudaMemoryStats().peak_allocated_bytes,
        });
      }
      out.push({ n, graphs, sPerImage });
    }
  }
  return out;
}

/** The official loop's seconds per image, per images-per-batch, from the Python reference. */
async function benchOfficial(plan: Plan): Promise<Map<number, number>> {
  const python = Deno.env.get("DIPSY_GPU_PYTHON") ?? referencePython();
  const out = await new Deno.Command(python, {
    args: [join(ROOT, "bench", "reference", "gpu_bench.py"), ...plan.referenceArgs],
    stdout: "piped",
    stderr: "inherit",
  }).output();
  if (out.code !== 0) throw new Error(`bench/reference/gpu_bench.py failed (exit ${out.code})`);
  const times = new Map<number, number>();
  for (const line of new TextDecoder().decode(out.stdout).split("\n").filter(Boolean)) {
    const r = JSON.parse(line);
    if ("images" in r) {
      times.set(r.images, r.s_per_image);
      emit({
        bench: `gpu_official_${plan.size}px_${r.images}img_diffusers_eager`,
        s_per_image: r.s_per_image,
        images_per_batch: r.images,
        runs: r.runs,
      });
    } else if ("peak_bytes" in r) {
      emit({ bench: "gpu_official_peak_memory", peak_allocated_bytes: r.peak_bytes });
    }
  }
  return times;
}

async function main(): Promise<number> {
  const { values } = parseArgs({ args: Deno.args, options: { smoke: { type: "boolean" } } });
  const info = runtimeInfo();
  if (!values.smoke && !info.cuda_available) {
    console.error(
      `bench/gpu_bench.ts needs a CUDA device; this libtorch (${info.torch_version}, ` +
        `${info.built_with_cuda ? "built with CUDA" : "CPU only"}) sees none`,
    );
    return 2;
  }
  const plan = values.smoke ? smokePlan() : gpuPlan();
  const [gpu] = cudaDevices();
  emit({
    bench: "gpu_device",
    device: gpu?.name ?? "cpu",
    capability: gpu?.capability ?? null,
    torch_version: info.torch_version,
    attention_f16: plan.device === "cpu" ? null : sd15AttentionReport("cuda", "f16").kernels,
  });
  const ours = benchOurs(plan);
  const official = await benchOfficial(plan);
  for (const [n] of plan.batches) {
    const best = Math.min(...ours.filter((o) => o.n === n).map((o) => o.sPerImage));
    const ref = official.get(n);
    if (ref === undefined) continue;
    emit({
      bench: `gpu_dipsy_vs_official_${n}img`,
      ours_s: best,
      reference_s: ref,
      ratio: best / ref,
      target_ratio: TARGET_RATIO,
    });
  }
  const big = ours.filter((o) => o.n >= 8);
  if (big.length) {
    const best = Math.min(...big.map((o) => o.sPerImage));
    emit({
      bench: "gpu_dipsy_target_8img",
      s_per_image: best,
      target_s: TARGET_S_PER_IMAGE,
      met: best <= TARGET_S_PER_IMAGE,
    });
  }
  return 0;
}

process.exitCode = await main();
