/**
 * `dipsy train`: fine-tunes the classifier on the real shots and the synthetic images, with a
 * checkpoint per epoch; running it again on the same folder resumes after the last checkpoint.
 */
import { CliError, defineCommand, deviceFlag, intFlag, withInterrupt } from "./command.ts";
import {
  CLASSIFIER_FLAGS,
  CLASSIFIER_PLUGIN_FLAGS,
  classifierOptions,
  listClassifiers,
  VALIDATION_FLAGS,
  VALIDATION_TITLE,
} from "./train_flags.ts";
import { PLACEMENT_FLAGS } from "./generate.ts";
import { loadPlugins } from "./plugin_docs.ts";

export const command = defineCommand({
  synopsis: "train --real DIR --synthetic DIR --out RUN [options]",
  about: `Trains the classifier (CLIP ViT-B/16 + LoRA by default) on real + synthetic images. Writes
RUN/checkpoints/epoch-NNN/ (peft LoRA adapter + optimizer state) after every epoch and
RUN/adapter/ (a peft adapter folder) at the end; RUN/train.json records settings and history.
With a validation split, every epoch is then evaluated on it (RUN/validation.json), for
\`eval --select best-val\`. Run the same command again after an interruption: it resumes after
the last finished epoch.`,
  sections: {
    "input:": {
      real: { value: "DIR", help: "real few-shot images: DIR/<class>/*, or the DataDream layout" },
      synthetic: {
        value: "DIR",
        help: "synthetic images: a generate output folder, or DIR/<class>/* (give one or both; " +
          "--mode real / synthetic uses one kind only)",
      },
      out: { value: "RUN", help: "run folder" },
      dataset: {
        value: "NAME",
        help: 'dataset name: DataDream layout, the prompt word ("pet ", ...) and for the ten ' +
          'benchmarks their class names (n01440764 -> "tench")',
      },
      "fewshot-seed": { value: "S", help: "DataDream few-shot split when there are several" },
      shots: {
        value: "K",
        help: "the first K real shots of each class, by rank (a `dipsy fewshot` split)",
      },
      "skip-bad": { help: "leave unreadable or broken images out instead of stopping" },
      device: PLACEMENT_FLAGS.device,
      workers: { value: "N", help: "image preparation threads (default: cores - 1, at most 16)" },
    },
    [VALIDATION_TITLE]: VALIDATION_FLAGS,
    "classifier options (defaults: DataDream's recipe):": {
      ...CLASSIFIER_FLAGS,
      ...CLASSIFIER_PLUGIN_FLAGS,
    },
  },
  async run(values) {
    if (values.list) return await listClassifiers(values.plugin);
    const out = values.out;
    if (!out) throw new CliError(`--out is required (see --help)`);
    if (!values.real && !values.synthetic) {
      throw new CliError(`give --real and/or --synthetic (see --help)`);
    }
    const workers = intFlag(values.workers, "--workers");
    const shots = intFlag(values.shots, "--shots", 1);
    const valShots = intFlag(values["val-shots"], "--val-shots", 1);
    // A mistyped plugin name or option is reported before any image is read.
    const registry = await loadPlugins(values.plugin);
    const chosen = classifierOptions(values);
    registry.create("classifier", chosen.name, chosen.options);
    const app = await import("../app/classify.ts");
    const data = await app.readTrainData({
      real: values.real,
      synthetic: values.synthetic,
      dataset: values.dataset,
      fewshotSeed: values["fewshot-seed"],
      shots,
      skipBad: values["skip-bad"],
      val: values.val,
      valShots,
    });
    const device = await app.resolveDevice(deviceFlag(values.device));
    const { name, options } = classifierOptions(values, { dataset: data.dataset, device });
    const classifier = await app.makeClassifier(name, options);
    console.error(
      `train: ${data.classNames.length} classes, ${data.real.length} real + ` +
        `${data.synthetic.length} synthetic images, ${name} on ${device}` +
        (data.validation.length
          ? `; ${data.validation.length} validation images (${data.validationFrom})`
          : ""),
    );
    const result = await withInterrupt((signal) =>
      app.trainStage(classifier, data, { out, device, workers, signal })
    );
    if (!result.complete) {
      console.error(`interrupted after epoch ${result.epochsDone}; run the same command to resume`);
      return 130;
    }
    console.log(`trained: ${out} (adapter in ${out}/adapter)`);
    if (result.validation) {
      const { formatEpochTable } = await import("./eval.ts");
      console.log(`\nvalidation (${result.validation.from}):`);
      console.log(formatEpochTable(result.validation.epochs, result.validation.best.epoch));
    }
    return 0;
  },
});
