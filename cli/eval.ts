/**
 * `dipsy eval`: top-1, top-5, per-class accuracy and the confusion matrix of a trained run on a
 * test folder, for the epoch a selection rule picks.
 */
import type { EpochMetrics, EvalRecord } from "../app/classify.ts";
import { EVAL_BATCH } from "../plugins/classifiers/evaluate.ts";
import { CliError, defineCommand, deviceFlag, intFlag } from "./command.ts";
import { loadPlugins } from "./plugin_docs.ts";
import {
  CLASSIFIER_PLUGIN_FLAGS,
  listClassifiers,
  SELECT_FLAGS,
  selectFlag,
} from "./train_flags.ts";

export const command = defineCommand({
  synopsis: "eval --model RUN --test DIR [options]",
  about: `Evaluates the classifier trained in RUN (by train or run) on the test images in DIR
(DIR/<class>/*, class names as in training). Prints a table and writes RUN/eval.json: top-1,
top-5, per-class accuracy, their mean, the confusion matrix, and which epoch was evaluated and
how it was chosen. When RUN/eval.json holds another test folder's results, they are kept and
this one's go to RUN/eval-<DIR's name>.json.`,
  sections: {
    "options:": {
      model: { value: "RUN", help: "training run folder" },
      test: { value: "DIR", help: "test images, one folder per class" },
      out: {
        value: "FILE",
        help: "where to write the JSON (default: RUN/eval.json, or RUN/eval-<name>.json when " +
          "that holds another test folder's)",
      },
      dataset: {
        value: "NAME",
        help: "dataset name (DataDream layout, benchmark class names; default: the run's)",
      },
      batch: { value: "N", help: "images per forward", default: EVAL_BATCH },
      device: { value: "D", help: "auto, cpu, cuda, cuda:N (default: the training device)" },
      workers: { value: "N", help: "image preparation threads (default: cores - 1, at most 16)" },
      ...CLASSIFIER_PLUGIN_FLAGS,
    },
    "model selection:": SELECT_FLAGS,
  },
  async run(values) {
    if (values.list) return await listClassifiers(values.plugin);
    const { model, test } = values;
    if (!model || !test) {
      throw new CliError(`--model and --test are required (see --help)`);
    }
    const batch = intFlag(values.batch, "--batch", 1);
    const select = selectFlag(values.select);
    // The run's classifier may come from a plugin file: it is looked up by name.
    await loadPlugins(values.plugin);
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
});

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
  const tables = [
    [`validation (${r.validation?.from})`, r.validation?.epochs, "validation"],
    ["test, every epoch", r.perEpoch, "test"],
  ] as const;
  for (const [title, epochs, on] of tables) {
    if (!epochs) continue;
    const mark = r.selection.selectedOn === on ? r.selection.epoch : undefined;
    lines.push("", `${title}:`, formatEpochTable(epochs, mark));
  }
  lines.push(
    "",
    `evaluated: epoch ${r.selection.epoch} (--select ${r.selection.rule}: ${r.selection.selectedOn})`,
  );
  if (r.selection.warning) lines.push(`WARNING: ${r.selection.warning}`);
  return lines.join("\n");
}
