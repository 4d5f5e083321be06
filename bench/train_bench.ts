/**
 * One DataDream training step of CLIP ViT-B/16 with LoRA (r16 / alpha 32 / dropout 0.1 on
 * q_proj and v_proj of both towers) at batch 8 on CPU: forward of both towers, the mixed loss,
 * backward, AdamW. bench/reference/train_bench.py writes the random weights and the images once
 * under .cache/bench/train_clip_b16/ and times transformers + peft; this side loads the same files.
 *
 * The reference stays up as a server and the two sides alternate single steps (after one warm-up
 * step each): a step takes seconds, and on a shared machine the load drifts over that time. A
 * second line repeats the race with one intra-op thread on both sides.
 */
import { join } from "node:path";
import {
  fromHost,
  manualSeed,
  ops,
  runtimeInfo,
  SafetensorsFile,
  scope,
  setNumThreads,
  type Tensor,
} from "../ffi/mod.ts";
import { ROOT } from "../ffi/lib.ts";
import { loadClipModel } from "../plugins/clip/model.ts";
import { ClipTokenizer } from "../plugins/clip/tokenizer.ts";
import { classPrompt, ClipLoraClassifier } from "../plugins/classifiers/clip_lora.ts";
import { type BenchResult, ReferenceProcess } from "./harness.ts";

const DIR = join(ROOT, ".cache", "bench", "train_clip_b16");
const SCRIPT = join(ROOT, "bench", "reference", "train_bench.py");

/** EuroSAT's ten classes: a realistic prompt count and length for the text tower. */
const CLASSES = [
  "annual crop land",
  "forest",
  "herbaceous vegetation land",
  "highway or road",
  "industrial buildings",
  "pasture land",
  "permanent crop land",
  "residential buildings",
  "river",
  "sea or lake",
];
const LABELS = [0, 3, 5, 9, 2, 7, 1, 4];
const SYNTHETIC = [false, true, true, false, true, true, true, false];

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1];

export async function benchTrain(): Promise<BenchResult[]> {
  const rounds = Number(Deno.env.get("DIPSY_BENCH_TRAIN_ROUNDS") ?? 5);
  const tokenizer = ClipTokenizer.byteLevel();
  const prompts = CLASSES.map((c) => classPrompt(c, { dataset: "eurosat" }));
  const enc = tokenizer.encodeBatch(prompts, { padding: "longest" });
  const [rows, len] = enc.shape;
  const ids = Array.from(
    { length: rows },
    (_, r) => Array.from(enc.ids.subarray(r * len, (r + 1) * len)),
  );
  await using ref = new ReferenceProcess(SCRIPT, [
    DIR,
    JSON.stringify({ ids, labels: LABELS, synthetic: SYNTHETIC.map(Number) }),
  ]);
  const ready = await ref.answer();
  const threads = runtimeInfo().num_threads;
  if (ready.threads !== threads) {
    throw new Error(`thread counts differ: reference ${ready.threads}, ours ${threads}`);
  }

  manualSeed(0);
  using clf = ClipLoraClassifier.create(loadClipModel(join(DIR, "clip")), tokenizer, {
    classNames: CLASSES,
    dataset: "eurosat",
    schedule: { itersPerEpoch: 1000 },
    ownsModel: true,
  });
  const pixels: Tensor = SafetensorsFile.open(join(DIR, "pixels.safetensors")).load("pixels");
  try {
    // Same weights, images and prompts: the untrained classifiers agree (lora_B starts at zero).
    scope(() => {
      const want = ready.logits as number[][];
      const ref = fromHost(want.flat(), [want.length, want[0].length]);
      const err = ops.maxAll(ops.abs(clf.predict(pixels).sub(ref))).item();
      const scale = ops.maxAll(ops.abs(ref)).item();
      if (!(err <= 1e-3 * Math.max(1, scale))) {
        throw new Error(`train bench: logits differ from the reference by ${err} (scale ${scale})`);
      }
    });
    const ours = () => clf.trainStep(pixels, LABELS, SYNTHETIC);
    const race = async (bench: string): Promise<BenchResult> => {
      (await ref.request({ op: "step", calls: 1 })).s as number;
      ours();
      const theirs: number[] = [], mine: number[] = [];
      for (let r = 0; r < rounds; r++) {
        theirs.push((await ref.request({ op: "step", calls: 1 })).s as number);
        const t0 = performance.now();
        ours();
        mine.push((performance.now() - t0) / 1000);
      }
      return { bench, ours_s: median(mine), reference_s: median(theirs) };
    };
    const results = [await race("train_step_clip_b16_lora_bs8")];
    // Single-threaded too: multi-threaded kernels on a busy machine wait on descheduled
    // threads, which can swamp the difference between the two stacks.
    if (threads > 1) {
      await ref.request({ op: "threads", n: 1 });
      setNumThreads(1);
      try {
        results.push(await race("train_step_clip_b16_lora_bs8_1thread"));
      } finally {
        setNumThreads(threads);
      }
    }
    return results;
  } finally {
    pixels.dispose();
  }
}
