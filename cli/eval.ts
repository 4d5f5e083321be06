/** `dipsy eval`: top-1 and per-class accuracy of a trained run on a test folder. */
import { CliError, type Command, parseFlags, reportUserErrors } from "./command.ts";
import { intFlag } from "./train_flags.ts";

const USAGE = `usage: deno task dipsy eval --model RUN --test DIR [options]

Evaluates the classifier trained in RUN (by train or run) on the test images in DIR
(DIR/<class>/*, class names as in training). Prints a table and writes RUN/eval.json.

options:
  --model RUN      training run folder
  --test DIR       test images, one folder per class
  --out FILE       where to write the JSON (default RUN/eval.json)
  --dataset NAME   dataset name (DataDream layout)
  --batch N        images per forward (default 64)
  --device D       auto, cpu, cuda, cuda:N (default: the training device)
  --workers N      image preparation threads (default: cores - 1, at most 16)`;

export const command: Command = {
  summary: "evaluate a trained classifier on a test folder",
  async run(args) {
    const values = parseFlags(args, {
      help: { type: "boolean", short: "h" },
      model: { type: "string" },
      test: { type: "string" },
      out: { type: "string" },
      dataset: { type: "string" },
      batch: { type: "string" },
      device: { type: "string" },
      workers: { type: "string" },
    }, USAGE);
    if (values.help) {
      console.log(USAGE);
      return 0;
    }
    const { model, test } = values;
    if (!model || !test) {
      throw new CliError(`--model and --test are required\n\n${USAGE}`);
    }
    const batch = intFlag(values.batch, "--batch");
    if (batch === 0) throw new CliError("--batch must be at least 1");
    return await reportUserErrors("eval", async () => {
      const { evalStage } = await import("../app/classify.ts");
      const { formatEvalTable } = await import("../plugins/classifiers/evaluate.ts");
      const result = await evalStage({
        model,
        test,
        out: values.out,
        dataset: values.dataset,
        batch,
        device: values.device,
        workers: intFlag(values.workers, "--workers"),
      });
      console.log(formatEvalTable(result));
      console.log(`\nwritten: ${result.file}`);
      return 0;
    });
  },
};
