/**
 * `dipsy run`: the whole experiment in one command: class similarity -> synthetic images ->
 * classifier training -> evaluation, then a report. Each stage keeps its output in OUT and is
 * skipped when that output is complete, so an interrupted run continues where it stopped.
 */
import { existsSync, readFileSync, statSync } from "node:fs";
import { join, resolve } from "node:path";
import type { RunConfig } from "../core/config.ts";
import { RunError } from "../core/output.ts";
import { GENERATE_FLAGS, type GenerateFlags } from "./generate.ts";
import { CliError, type Command, parseFlags, reportUserErrors } from "./command.ts";
import { CLASSIFIER_FLAGS, CLASSIFIER_USAGE, classifierOptions, intFlag } from "./train_flags.ts";

export const REPORT_FILE = "report.json";

const USAGE = `usage: deno task dipsy run --data DIR --test DIR --out DIR [options]

similarity -> generate -> train -> eval in one command. Everything goes into OUT:
  OUT/similarity.json   class similarity (when the pair sampler uses it)
  OUT/synthetic/        generated images + manifest (as \`dipsy generate\`)
  OUT/train/            classifier run (as \`dipsy train\`)
  OUT/eval.json         accuracy on the test images (as \`dipsy eval\`)
  OUT/report.json       configuration, stage timings and accuracy (also printed)
A stage whose output is complete is skipped: run the same command again after an interruption.

input and output:
  --data DIR            few-shot images (the real training set): DIR/<class>/*, or DataDream's
  --test DIR            test images, one folder per class
  --out DIR             experiment folder
  --dataset NAME        dataset name (prompt templates, DataDream layout)
  --fewshot-seed S      DataDream few-shot split when there are several
  --device D            auto, cpu, cuda, cuda:N (default auto)
  --workers N           image preparation threads for training and evaluation

generation (as \`dipsy generate\`; see its --help):
  --config FILE  --preset NAME  --per-class N  --steps N  --size N|WxH  --prompt T
  --guidance NAME  --sampler NAME  --pairs NAME  --seed S  --gen-batch B  --set KEY=VALUE
  --model REF  --ip-adapter REF  --image-encoder REF  --tiny  --dtype T  --plugin FILE
  --clip REF            CLIP for the class similarity and the classifier

classifier: the train command's options, except that its seed is --train-seed, its batch
--batch, and --set is --train-set. ${
  CLASSIFIER_USAGE.split("\n").slice(1).join("\n").replace(/^ {2}--clip[^\n]*\n/m, "")
}`;

/** The generate command's flags that `run` takes as they are. */
const GEN_KEYS = [
  "config",
  "preset",
  "per-class",
  "steps",
  "size",
  "prompt",
  "guidance",
  "sampler",
  "pairs",
  "seed",
  "set",
  "model",
  "ip-adapter",
  "image-encoder",
  "tiny",
  "dtype",
  "plugin",
  "clip",
] as const;

const GEN_FLAGS = {
  ...Object.fromEntries(GEN_KEYS.map((k) => [k, GENERATE_FLAGS[k]])) as Pick<
    typeof GENERATE_FLAGS,
    (typeof GEN_KEYS)[number]
  >,
  "gen-batch": { type: "string" },
} as const;

/** The train command's classifier flags, with the ones generation also has renamed. */
const TRAIN_FLAGS = {
  ...Object.fromEntries(
    Object.entries(CLASSIFIER_FLAGS).filter(([k]) => !["clip", "seed", "set", "dtype"].includes(k)),
  ) as Omit<typeof CLASSIFIER_FLAGS, "clip" | "seed" | "set" | "dtype">,
  "train-seed": { type: "string" },
  "train-set": { type: "string", multiple: true },
} as const;

interface StageReport {
  stage: string;
  status: "done" | "skipped" | "not needed";
  seconds: number;
  output?: string;
}

export const command: Command = {
  summary: "similarity -> generate -> train -> eval, with a report",
  async run(args) {
    const values = parseFlags(args, {
      help: { type: "boolean", short: "h" },
      data: { type: "string" },
      test: { type: "string" },
      out: { type: "string" },
      dataset: { type: "string" },
      "fewshot-seed": { type: "string" },
      device: { type: "string" },
      workers: { type: "string" },
      ...GEN_FLAGS,
      ...TRAIN_FLAGS,
    }, USAGE);
    if (values.help) {
      console.log(USAGE);
      return 0;
    }
    if (!values.data || !values.test || !values.out) {
      throw new CliError(`--data, --test and --out are required\n\n${USAGE}`);
    }
    const controller = new AbortController();
    const onSigint = () => {
      if (controller.signal.aborted) Deno.exit(130);
      console.error("\nstopping after the step in flight (Ctrl-C again to quit at once)");
      controller.abort();
    };
    Deno.addSignalListener("SIGINT", onSigint);
    try {
      return await reportUserErrors("run", () => runExperiment(values, controller.signal));
    } finally {
      Deno.removeSignalListener("SIGINT", onSigint);
    }
  },
};

type Values = Record<string, string | boolean | string[] | undefined>;

/** The generation configuration from the flags (as `generate` reads them). */
async function generationConfig(v: Values, out: string): Promise<RunConfig> {
  const { configFromFlags } = await import("./generate.ts");
  return await configFromFlags({
    ...Object.fromEntries(GEN_KEYS.map((k) => [k, v[k]])),
    data: v.data,
    out: join(out, "synthetic"),
    dataset: v.dataset,
    "fewshot-seed": v["fewshot-seed"],
    device: v.device,
    batch: v["gen-batch"],
  } as GenerateFlags);
}

async function runExperiment(v: Values, signal: AbortSignal): Promise<number> {
  const out = resolve(v.out as string);
  const stages: StageReport[] = [];
  const workers = intFlag(v.workers as string | undefined, "--workers");
  const timed = async <T>(stage: string, fn: () => Promise<[StageReport["status"], T]>) => {
    console.error(`\n== ${stage}`);
    const t0 = performance.now();
    const [status, value] = await fn();
    stages.push({ stage, status, seconds: (performance.now() - t0) / 1000 });
    return value;
  };

  // Everything the stages read is checked first: a bad test folder should not surface after
  // hours of generation.
  const app = await import("../app/classify.ts");
  const { readImageFolder } = await import("../plugins/classifiers/data.ts");
  const config = await generationConfig(v, out);
  const test = await readImageFolder(v.test as string, { dataset: v.dataset as string });
  const { validateInput } = await import("../core/generate.ts");
  const { registry } = await import("../core/plugins.ts");
  const dataset = await validateInput(config, registry);
  const realNames = new Set(dataset.classes.map((c) => c.name));
  const unknown = test.classNames.filter((c) => !realNames.has(c));
  if (unknown.length) {
    throw new RunError(
      `${test.path}: test class(es) not in ${dataset.root}: ${
        unknown.map((c) => `"${c}"`).join(", ")
      }`,
    );
  }
  const device = await app.resolveDevice(config.device);
  const train = classifierOptions(
    {
      ...v,
      clip: v.clip ?? (config.model === "tiny" ? "tiny" : undefined),
      seed: v["train-seed"],
      set: v["train-set"],
      dtype: v.dtype === "auto" ? undefined : v.dtype,
    },
    { dataset: config.dataset ?? dataset.dataset, device },
  );
  const classifier = await app.makeClassifier(train.name, train.options);

  await Deno.mkdir(out, { recursive: true });

  // 1. Class similarity, when the pair sampler draws negatives by it.
  const simPath = join(out, "similarity.json");
  const pairs = registry.create<import("../core/plugins.ts").SamplerPair>(
    "pairs",
    config.pairs.name,
    config.pairs.options,
  );
  await timed("similarity", async () => {
    if (!pairs.needsSimilarity) return ["not needed", null];
    if (config.similarity || existsSync(simPath)) return ["skipped", null];
    const sim = await import("../app/similarity.ts");
    const { resolvePlacement } = await import("../app/models.ts");
    const { similarityClip } = await import("../core/config.ts");
    const clip = similarityClip(config);
    const matrix = await sim.computeSimilarity(dataset, clip, await resolvePlacement(config), {
      seed: config.modelSeed,
    });
    const names = dataset.classes.map((c) => c.name);
    await sim.saveSimilarityFile(simPath, names, matrix, { clip, data: dataset.root });
    return ["done", null];
  });
  const genConfig: RunConfig = {
    ...config,
    similarity: config.similarity ?? (existsSync(simPath) ? simPath : null),
  };

  // 2. Synthetic images (generate resumes by itself; complete means every image is there).
  const synthetic = join(out, "synthetic");
  const code = await timed("generate", async () => {
    const expected = dataset.classes.length * genConfig.perClass;
    const before = await finishedImages(synthetic);
    if (before >= expected) return ["skipped", 0];
    const { runGenerate } = await import("./generate.ts");
    return ["done", await runGenerate(genConfig, { signal })];
  });
  if (code !== 0) return code;

  // 3. Classifier.
  const trainDir = join(out, "train");
  const data = await app.readTrainData({
    real: v.data as string,
    synthetic,
    dataset: v.dataset as string | undefined,
    fewshotSeed: v["fewshot-seed"] as string | undefined,
    skipBad: config.skipBad,
  });
  const trained = await timed("train", async () => {
    const { readTrainRecord } = await import("../plugins/classifiers/mod.ts");
    // A finished run is still handed to the trainer, which checks its settings and data match.
    const finished = readTrainRecord(trainDir)?.status === "complete";
    const r = await app.trainStage(classifier, data, { out: trainDir, device, workers, signal });
    return [finished ? "skipped" : "done", r];
  });
  if (!trained.complete) {
    console.error(`interrupted after epoch ${trained.epochsDone}; run the same command to resume`);
    return 130;
  }

  // 4. Evaluation (redone when the model is newer than the last evaluation).
  const evalFile = join(out, "eval.json");
  const result = await timed("eval", async () => {
    const fresh = existsSync(evalFile) &&
      statSync(evalFile).mtimeMs >= statSync(join(trainDir, "train.json")).mtimeMs;
    if (fresh) return ["skipped", JSON.parse(readFileSync(evalFile, "utf8"))];
    return [
      "done",
      await app.evalStage({
        model: trainDir,
        test: v.test as string,
        out: evalFile,
        workers,
        signal,
      }),
    ];
  });

  const report = {
    format: "dipsy-run-report",
    data: dataset.root,
    test: test.path,
    out,
    classes: dataset.classes.length,
    shotsPerClass: dataset.classes.map((c) => c.shots.length),
    generation: genConfig,
    classifier: { name: classifier.name, ...classifier.settings },
    device,
    stages,
    accuracy: { top1: result.top1, meanPerClass: result.meanPerClass, total: result.total },
    perClass: result.perClass,
  };
  const { writeAtomic } = await import("../core/output.ts");
  await writeAtomic(
    join(out, REPORT_FILE),
    new TextEncoder().encode(JSON.stringify(report, null, 2) + "\n"),
  );
  const { formatEvalTable } = await import("../plugins/classifiers/evaluate.ts");
  console.log(formatReport(stages));
  console.log();
  console.log(formatEvalTable(result));
  console.log(`\nreport: ${join(out, REPORT_FILE)}`);
  return 0;
}

/** Images of a generate output folder that are listed in its manifest and on disk. */
async function finishedImages(dir: string): Promise<number> {
  const { readManifest } = await import("../core/output.ts");
  if (!existsSync(dir)) return 0;
  const { entries } = await readManifest(dir);
  let n = 0;
  for (const file of entries.keys()) if (existsSync(join(dir, file))) n++;
  return n;
}

function formatReport(stages: StageReport[]): string {
  return [
    "stage       status        time",
    ...stages.map((s) =>
      `${s.stage.padEnd(10)}  ${s.status.padEnd(10)}  ${s.seconds.toFixed(1).padStart(6)} s`
    ),
  ].join("\n");
}
