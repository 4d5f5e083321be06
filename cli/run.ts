/**
 * `dipsy run`: the whole experiment in one command: class similarity -> synthetic images ->
 * classifier training -> evaluation, then a report. Each stage keeps its output in OUT and is
 * skipped when that output is complete, so an interrupted run continues where it stopped.
 */
import { existsSync, readFileSync, statSync } from "node:fs";
import { join, resolve } from "node:path";
import { DEFAULTS, formatConfig, type RunConfig, TINY } from "../core/config.ts";
import type { Dataset } from "../core/dataset.ts";
import { readManifest, REPORT_FILE, RunError, writeJsonAtomic } from "../core/output.ts";
import type { Classifier } from "../core/plugins.ts";
import type { EvalRecord, SelectRule } from "../app/classify.ts";
import type { RunJobOptions } from "../app/api.ts";
import type { ImageFolder } from "../plugins/classifiers/data.ts";
import { provenance } from "../core/provenance.ts";
import {
  type GenerateFlags,
  INPUT_FLAGS,
  MODEL_FLAGS,
  PLACEMENT_FLAGS,
  SETTING_FLAGS,
} from "./generate.ts";
import { CliError, defineCommand, type Flags, intFlag, renamed, withInterrupt } from "./command.ts";
import {
  CLASSIFIER_FLAGS,
  classifierOptions,
  SELECT_FLAGS,
  selectFlag,
  VALIDATION_FLAGS,
  VALIDATION_TITLE,
} from "./train_flags.ts";
import { SLURM_FLAGS, SLURM_TITLE, submitExperiment } from "./slurm.ts";
import { loadPlugins } from "./plugin_docs.ts";

/** Generation flags: generate's, with the names the classifier also has made explicit. */
const GENERATION_FLAGS: Flags = {
  ...renamed(SETTING_FLAGS, {}, [], {
    config: "generation settings from a JSON or YAML file (flags override it)",
    seed: "generation seed: the same seed gives the same images; the classifier's is " +
      "--train-seed",
    set: "any generation setting or plugin option (repeatable), as generate takes it; the " +
      "classifier's are --train-set",
    plugin: "load plugins from a module (repeatable; generation and classifier plugins); see " +
      "docs/plugins.md",
  }),
  "gen-batch": {
    value: "B",
    help: "images per model call; the classifier's --batch is images per training step",
    default: DEFAULTS.batch,
    field: "batch",
  },
  ...MODEL_FLAGS,
  ...renamed(PLACEMENT_FLAGS, {}, ["device"], {
    dtype: "auto (f16 on CUDA, f32 on CPU), f32, f16, bf16: generation's and the classifier's " +
      "weights",
    clip: "CLIP for the class similarity and the classifier (default: tiny with --tiny, else " +
      `${CLASSIFIER_FLAGS.clip.default})`,
  }),
};

/** The generate flags `run` hands on to generation under their own names. */
const GEN_KEYS = [...Object.keys(GENERATION_FLAGS), "data", "dataset", "fewshot-seed", "shots"]
  .filter((k) => k !== "gen-batch");

/** `--stage`: the stages a job of its own can run. */
export const STAGES = ["similarity", "generate", "train"] as const;
export type Stage = (typeof STAGES)[number];

/** One stage's line in a report. */
export interface StageReport {
  stage: string;
  status: "done" | "skipped" | "not needed";
  seconds: number;
}

/** What a report is made of, for `run` and for each cell of a sweep. */
export interface ReportParts {
  dataset: Dataset;
  /** The test folder. */
  test: string;
  out: string;
  /** Where in a sweep the run is. */
  sweep?: Record<string, string>;
  /** Generation as it ran: device and dtype resolved, not "auto". */
  generation: RunConfig;
  classifier: Classifier;
  device: string;
  stages: StageReport[];
  result: EvalRecord;
}

/** Writes OUT/REPORT_FILE: configuration, stage timings and accuracy. */
export async function writeRunReport(p: ReportParts): Promise<void> {
  const { dataset, result } = p;
  const report = {
    format: "dipsy-run-report",
    data: dataset.root,
    test: p.test,
    out: p.out,
    ...(p.sweep ? { sweep: p.sweep } : {}),
    classes: dataset.classes.length,
    shotsPerClass: dataset.classes.map((c) => c.shots.length),
    generation: p.generation,
    classifier: { name: p.classifier.name, ...p.classifier.settings },
    device: p.device,
    stages: p.stages,
    accuracy: {
      top1: result.top1,
      top5: result.top5,
      meanPerClass: result.meanPerClass,
      total: result.total,
    },
    selection: result.selection,
    perClass: result.perClass,
    provenance: await provenance(p.generation),
  };
  await writeJsonAtomic(join(p.out, REPORT_FILE), report);
}

export const command = defineCommand({
  synopsis: "run --data DIR --test DIR --out DIR [options]",
  about: `similarity -> generate -> train -> eval in one command. Everything goes into OUT:
  OUT/similarity.json   class similarity (when the pair sampler uses it)
  OUT/synthetic/        generated images + manifest (as \`dipsy generate\`)
  OUT/train/            classifier run (as \`dipsy train\`)
  OUT/eval.json         accuracy on the test images (as \`dipsy eval\`)
  OUT/report.json       configuration, stage timings and accuracy (also printed)
A stage whose output is complete is skipped: run the same command again after an interruption.`,
  sections: {
    "input and output:": {
      ...renamed(INPUT_FLAGS, {}, ["out", "skip-bad", "similarity"], {
        data: "few-shot images (the real training set): DIR/<class>/*, or DataDream's",
      }),
      test: { value: "DIR", help: "test images, one folder per class" },
      out: { value: "DIR", help: "experiment folder" },
      device: PLACEMENT_FLAGS.device,
      workers: {
        value: "N",
        help: "image preparation threads for training and evaluation (default: cores - 1, at " +
          "most 16)",
      },
    },
    "generation (as `dipsy generate`; see its --help):": GENERATION_FLAGS,
    "running:": {
      "print-config": {
        help: "print the resolved generation configuration as YAML (a --config file) and exit",
      },
      stage: {
        value: "NAME",
        help: "run one stage only: similarity, generate (sharded like `generate`: in a Slurm " +
          "array or Kubernetes indexed Job each task does its shard) or train (train, eval and " +
          "the report; the other stages must be complete)",
      },
    },
    "classifier (as `dipsy train`; --clip, --dtype and --plugin above):": renamed(
      CLASSIFIER_FLAGS,
      { seed: "train-seed", set: "train-set" },
      ["clip", "dtype"],
      {
        batch: "images per training step; generation's is --gen-batch",
        seed: "seed of shuffling, augmentation, dropout and the LoRA init; generation's is --seed",
        set: "any option of the classifier (repeatable; `train --list` lists them); " +
          "generation's are --set",
      },
    ),
    [VALIDATION_TITLE]: VALIDATION_FLAGS,
    "model selection:": SELECT_FLAGS,
    [SLURM_TITLE]: SLURM_FLAGS,
  },
  async run(values) {
    if (!values.data || !values.test || !values.out) {
      throw new CliError(`--data, --test and --out are required (see --help)`);
    }
    // A misspelt classifier option is refused before anything runs or is submitted.
    const early = classifierOptions(trainValues(values));
    (await loadPlugins(values.plugin as string[] | undefined))
      .create("classifier", early.name, early.options);
    if (values["print-config"]) {
      console.log(formatConfig(withHoldout(await experimentOf(values))).trimEnd());
      return 0;
    }
    const stage = values.stage as Stage | undefined;
    if (stage !== undefined && !STAGES.includes(stage)) {
      throw new CliError(`--stage must be one of ${STAGES.join(", ")}, got "${stage}"`);
    }
    if (values.slurm) {
      if (stage !== undefined) throw new CliError("--slurm submits every stage: leave --stage out");
      return await submitExperiment(
        values,
        async () => checkExperiment(await experimentOf(values)),
      );
    }
    const experiment = await experimentOf(values);
    return await withInterrupt((signal) => runExperiment({ ...experiment, stage, signal }));
  },
});

type Values = Record<string, string | boolean | string[] | undefined>;

/** The classifier's flags under the names `train` gives them. */
const trainValues = (v: Values) => ({ ...v, seed: v["train-seed"], set: v["train-set"] });

/**
 * The experiment: `run`'s job options with generation's configuration (into OUT/synthetic) and
 * the classifier (its options with the run's defaults) made of them, or of the command's flags.
 */
export type Experiment =
  & Omit<
    RunJobOptions,
    "config" | "classifier" | "generation" | "train" | "tiny" | "device"
  >
  & {
    config: RunConfig;
    classifier(run: { dataset?: string; device: string }): ReturnType<typeof classifierOptions>;
  };

/** The experiment of the flags; generation's configuration as `generate` reads its flags. */
async function experimentOf(v: Values): Promise<Experiment> {
  const out = resolve(v.out as string);
  const { configFromFlags } = await import("./generate.ts");
  const config = await configFromFlags({
    ...Object.fromEntries(GEN_KEYS.map((k) => [k, v[k]])),
    out: join(out, "synthetic"),
    device: v.device,
    batch: v["gen-batch"],
  } as GenerateFlags);
  return {
    data: v.data as string,
    test: v.test as string,
    out,
    dataset: v.dataset as string | undefined,
    fewshotSeed: v["fewshot-seed"] as string | undefined,
    val: v.val as string | undefined,
    valShots: intFlag(v["val-shots"] as string | undefined, "--val-shots", 1),
    select: v.select as SelectRule | undefined,
    perEpoch: v["per-epoch"] as boolean | undefined,
    workers: intFlag(v.workers as string | undefined, "--workers"),
    config,
    classifier: (run) =>
      classifierOptions({
        ...trainValues(v),
        clip: v.clip ?? (config.model === TINY ? TINY : undefined),
        dtype: v.dtype === "auto" ? undefined : v.dtype,
      }, run),
  };
}

/** Generation's configuration: validation shots are kept out of it, not to guide any image. */
const withHoldout = (e: Experiment): RunConfig =>
  e.valShots ? { ...e.config, holdout: e.valShots } : e.config;

/**
 * Refuses test or validation classes the few-shot set does not have: the classifier could never
 * predict them, so their accuracy would silently count as 0.
 */
export function checkEvalClasses(
  dataset: Dataset,
  test: ImageFolder,
  val: ImageFolder | null,
): void {
  const realNames = new Set(dataset.classes.map((c) => c.name));
  for (const [what, folder] of [["test", test], ["validation", val]] as const) {
    const unknown = folder?.classNames.filter((c) => !realNames.has(c));
    if (folder && unknown?.length) {
      throw new RunError(
        `${folder.path}: ${what} class(es) not in ${dataset.root}: ${
          unknown.map((c) => `"${c}"`).join(", ")
        }`,
      );
    }
  }
}

/**
 * Everything the stages read, checked before any stage runs or is submitted: a bad test folder
 * should not surface after hours of generation.
 */
async function checkExperiment(e: Experiment) {
  const app = await import("../app/classify.ts");
  const { readImageFolder } = await import("../plugins/classifiers/data.ts");
  const config = withHoldout(e);
  const test = await readImageFolder(e.test, { dataset: e.dataset });
  selectFlag(e.select);
  if (e.val !== undefined && e.valShots !== undefined) {
    throw new CliError("give --val or --val-shots, not both");
  }
  const val = e.val === undefined ? null : await readImageFolder(e.val, { dataset: e.dataset });
  const { prepareGenerate } = await import("./generate.ts");
  // The whole generation setup (models, size, plugins) too: nothing is written before it is.
  const prepared = await prepareGenerate(config);
  const { dataset } = prepared;
  checkEvalClasses(dataset, test, val);
  const device = await app.resolveDevice(config.device);
  const train = e.classifier({ dataset: config.dataset ?? dataset.dataset, device });
  const classifier = await app.makeClassifier(train.name, train.options);
  return {
    config,
    test,
    prepared,
    dataset,
    device,
    classifier,
    /** Whether the pair sampler draws negatives by class similarity. */
    usesSimilarity: prepared.run.pairs.needsSimilarity,
    /** Images of a complete generate stage. */
    expectedImages: dataset.classes.length * config.perClass,
  };
}

/** Runs the experiment's stages (or its one `stage`); returns the exit code. */
export async function runExperiment(e: Experiment): Promise<number> {
  const { out, stage: only, signal, workers, select, perEpoch } = e;
  const stages: StageReport[] = [];
  const timed = async <T>(stage: string, fn: () => Promise<[StageReport["status"], T]>) => {
    console.error(`\n== ${stage}`);
    const t0 = performance.now();
    const [status, value] = await fn();
    stages.push({ stage, status, seconds: (performance.now() - t0) / 1000 });
    return value;
  };
  const checked = await checkExperiment(e);
  const { config, test, prepared, dataset, device, classifier } = checked;
  const app = await import("../app/classify.ts");
  if (only !== "generate" && prepared.shard.count > 1) {
    throw new CliError(
      `${prepared.shard.source} makes this process shard ${prepared.shard.index}/` +
        `${prepared.shard.count}: the other stages need the whole set; give --stage generate ` +
        "to the tasks of a job array",
    );
  }
  // A stage that this invocation does not run must have finished already.
  const unfinished = (stage: Stage, what: string) =>
    new RunError(`${what} is not complete: run the ${stage} stage first (--stage ${stage})`);
  const { runPrepared } = await import("./generate.ts");

  await Deno.mkdir(out, { recursive: true });

  // 1. Class similarity, when the pair sampler draws negatives by it.
  const simPath = join(out, "similarity.json");
  await timed("similarity", async () => {
    if (!checked.usesSimilarity) return ["not needed", null];
    if (config.similarity) return ["skipped", null];
    const { similarityStage } = await import("../app/similarity.ts");
    const { computed } = await similarityStage(simPath, dataset, config, {
      beforeCompute: () => {
        if (only !== undefined && only !== "similarity") throw unfinished("similarity", simPath);
      },
    });
    return [computed ? "done" : "skipped", null];
  });
  if (only === "similarity") return 0;
  const generation: RunConfig = {
    ...prepared.config,
    similarity: config.similarity ?? (existsSync(simPath) ? simPath : null),
  };

  // 2. Synthetic images (generate resumes by itself; complete means every image is there).
  const synthetic = join(out, "synthetic");
  const code = await timed("generate", async () => {
    const before = await finishedImages(synthetic);
    if (before >= checked.expectedImages) return ["skipped", 0];
    if (only === "train") throw unfinished("generate", synthetic);
    return ["done", await runPrepared({ ...prepared, config: generation }, { signal })];
  });
  if (code !== 0 || only === "generate") return code;

  // 3. Classifier.
  const trainDir = join(out, "train");
  const data = await app.readTrainData({
    real: e.data,
    synthetic,
    dataset: e.dataset,
    fewshotSeed: e.fewshotSeed,
    shots: config.shots ?? undefined,
    skipBad: config.skipBad,
    val: e.val,
    valShots: config.holdout ?? undefined,
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

  // 4. Evaluation (redone when the model or its validation is newer, or the selection differs).
  const evalFile = join(out, "eval.json");
  const result = await timed("eval", async () => {
    const prior = existsSync(evalFile) ? JSON.parse(readFileSync(evalFile, "utf8")) : null;
    const newer = (f: string) => existsSync(f) && statSync(f).mtimeMs > statSync(evalFile).mtimeMs;
    const fresh = prior?.selection && prior.test === resolve(e.test) &&
      !newer(join(trainDir, "train.json")) &&
      !newer(join(trainDir, app.VALIDATION_RECORD)) &&
      (select === undefined || prior.selection.rule === select) &&
      (!perEpoch || prior.perEpoch);
    if (fresh) return ["skipped", prior as EvalRecord];
    return [
      "done",
      await app.evalStage({
        model: trainDir,
        test: e.test,
        out: evalFile,
        workers,
        select,
        perEpoch,
        signal,
      }),
    ];
  });

  await writeRunReport({
    dataset,
    test: test.path,
    out,
    generation,
    classifier,
    device,
    stages,
    result,
  });
  const { formatEvalRecord } = await import("./eval.ts");
  console.log(formatReport(stages));
  console.log();
  console.log(await formatEvalRecord(result));
  console.log(`\nreport: ${join(out, REPORT_FILE)}`);
  if (result.selection.warning) console.error(`warning: ${result.selection.warning}`);
  return 0;
}

/** Images of a generate output folder that are listed in its manifest and on disk. */
export async function finishedImages(dir: string): Promise<number> {
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
