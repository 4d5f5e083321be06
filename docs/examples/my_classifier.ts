/**
 * A custom Classifier plugin: DataDream's CLIP + LoRA recipe (the built-in `clip-lora`) under a
 * name of its own, as a starting point for a classifier of your own. It takes the recipe's
 * options (its schema), and the run folders it trains record its name, by which `eval` finds it
 * again: give `eval` the same `--plugin`.
 *
 *   deno task dipsy train --plugin docs/examples/my_classifier.ts --classifier my-clip-lora ...
 *   deno task dipsy eval --plugin docs/examples/my_classifier.ts --model RUN --test DIR
 */
import type { Classifier, PluginDef } from "../../core/plugins.ts";
import { clipLoraClassifier, TRAIN_SCHEMA } from "../../plugins/classifiers/mod.ts";

export const myClipLora: PluginDef<Classifier, Record<string, unknown>> = {
  kind: "classifier",
  name: "my-clip-lora",
  description: "DataDream's CLIP + LoRA recipe under a name of its own",
  schema: TRAIN_SCHEMA,
  // Flags arrive as text ("--epochs 2"): numbers, booleans and lists are read from it.
  text: true,
  create(options) {
    return { ...clipLoraClassifier(options), name: "my-clip-lora" };
  },
};

/** What `--plugin` registers. */
export const plugins = [myClipLora];
