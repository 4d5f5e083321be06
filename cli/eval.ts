/**
 * `dipsy eval`: top-1, top-5, per-class accuracy and the confusion matrix of a trained run on a
 * test folder, for the epoch a selection rule picks.
 */
import type { EpochMetrics, EvalRecord } from "../app/classify.ts";
import { CliError, type Command, parseFlags } from "./command.ts";
import { deviceFlag, intFlag, SELECT_FLAGS, SELECT_USAGE, selectFlag } from "./train_flags.ts";

const USAGE = `usage: deno task dipsy eval --model RUN --test DIR [options]

Evaluates the classifier trained in RUN (by train or run) on the test images in DIR
(DIR/<class>/*, class names as in training). Prints a table and writes RUN/eval.json: top-1,
top-5, per-class accuracy, their mean, the confusion matrix, and which epoch was evaluated and
how it was chosen. When RUN/eval.json holds another test folder's results, they are kept and
this one's go to RUN/eval-<DIR's name>.json.

options:
  --model RUN      training run folder
  --test DIR       test images, one folder per class
  --out FILE       where to write the JSON (default RUN/eval.json or RUN/eval-<name>.json)
  --dataset NAME   dataset name (DataDream layout, benchmark class names; default: the run's)
  --batch N        images per forward (default 64)
  --device D       auto, cpu, cuda, cuda:N (default: the training device)
  --workers N      image preparation threads (default: cores - 1, at most 16)

${SELECT_USAGE}`;

const FLAGS = {
  help: { type: "boolean", short: "h" },
  model: { type: "string" },
  test: { type: "string" },
  out: { type: "string" },
  dataset: { type: "string" },
  batch: { type: "string" },
  device: { type: "string" },
  workers: { type: "string" },
  ...SELECT_FLAGS,
} as const;

export const command: Command = {
  summary: "evaluate a trained classifier on a test folder",
  usage: USAGE,
  flags: FLAGS,
  async run(args) {
    const values = parseFlags(args, FLAGS);
    if (values.help) {
      console.log(USAGE);
      return 0;
    }
    const { model, test } = values;
    if (!model || !test) {
      throw new CliError(`--model and --test are required (see --help)`);
    }
    const batch = intFlag(values.batch, "--batch");
    if (batch === 0) throw new CliError("--batch must be at least 1");
    const select = selectFlag(values.select);
    const { evalStage } = await import("../app/classify.ts");
    const result = await evalStage({
      model,
      test,
      out: values.out,
      dataset: values.dataset,
      batch,
      device: values.device === undefined ? undefined : deviceFlag(values.device),
      workers: intFlag(values.workers, "--workers"),
      select,
      perEpoch: values["per-epoch"],
    });
    console.log(await formatEvalRecord(result));
    console.log(`\nwritten: ${result.file}`);
    if (result.selection.warning) console.error(`warning: ${result.selection.warning}`);
    return 0;
  },
};

/** Epoch, top-1, top-k and mean per class; `mark` flags the selected epoch. */
export function formatEpochTable(epochs: readonly EpochMetrics[], mark?: number): string {
  const pct = (v: number) => `${(100 * v).toFixed(2).padStart(6)}%`;
  return [
    "epoch    top-1    top-5  mean/class",
    ...epochs.map((e) =>
      `${String(e.epoch).padStart(5)}  ${pct(e.top1)}  ${pct(e.top5)}     ${pct(e.meanPerClass)}` +
      (e.epoch === mark ? "  <- selected" : "")
    ),
  ].join("\n");
}

/** The table, the most frequent confusions and the selection, with its warning if any. */
export async function formatEvalRecord(r: EvalRecord): Promise<string> {
  const { formatEvalTable, topConfusions } = await import("../plugins/classifiers/evaluate.ts");
  const lines = [formatEvalTable(r)];
  const confusions = topConfusions(r);
  if (confusions.length) {
    lines.push(
      "",
      "most confused (true -> predicted):",
      ...confusions.map((c) => `  ${c}`),
    );
  }
  if (r.validation) {
    lines.push("", `validation (${r.validation.from}):`);
    lines.push(
      formatEpochTable(
        r.validation.epochs,
        r.selection.selectedOn === "validation" ? r.selection.epoch : undefined,
      ),
    );
  }
  if (r.perEpoch) {
    lines.push("", "test, every epoch:");
    lines.push(
      formatEpochTable(
        r.perEpoch,
        r.selection.selectedOn === "test" ? r.selection.epoch : undefined,
      ),
    );
  }
  lines.push(
    "",
    `evaluated: epoch ${r.selection.epoch} (--select ${r.selection.rule}: ${r.selection.selectedOn})`,
  );
  if (r.selection.warning) lines.push(`WARNING: ${r.selection.warning}`);
  return lines.join("\n");
}
