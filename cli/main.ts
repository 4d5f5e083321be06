/**
 * `deno task dipsy <command>`: one CLI, one module per command, loaded on demand so that `--help`
 * and argument errors never need the native library.
 */
import { UserError } from "../ffi/errors.ts";
import { CliError, type Command } from "./command.ts";

const COMMANDS: Record<string, () => Promise<{ command: Command }>> = {
  info: () => import("./info.ts"),
  demo: () => import("./demo.ts"),
  fewshot: () => import("./fewshot.ts"),
  similarity: () => import("./similarity.ts"),
  generate: () => import("./generate.ts"),
  sample: () => import("./sample.ts"),
  train: () => import("./train.ts"),
  eval: () => import("./eval.ts"),
  run: () => import("./run.ts"),
  serve: () => import("./serve.ts"),
};

function usage(): string {
  return [
    "usage: deno task dipsy <command> [options]",
    "",
    "commands:",
    "  info    libtorch / device information of this installation",
    "  demo    run the main job end to end on the embedded tiny models",
    "  fewshot     draw nested k-shot splits of a training set (seeded, recorded)",
    "  similarity  compute and save the class similarity matrix (reused by generate)",
    "  generate    generate the synthetic dataset (resumable, shardable, deterministic)",
    "  train   fine-tune the classifier (CLIP + LoRA) on real + synthetic images (resumable)",
    "  eval    top-1 and per-class accuracy of a trained classifier on a test folder",
    "  run     similarity -> generate -> train -> eval in one command, with a report",
    "  sample  generate one image from explicit reference images (for trying scales)",
    "  serve   serve sample and generate over HTTP (models stay loaded)",
    "",
    "`deno task dipsy <command> --help` shows a command's options.",
  ].join("\n");
}

export async function main(args: string[]): Promise<number> {
  const [name, ...rest] = args;
  if (!name || name === "--help" || name === "-h" || name === "help") {
    console.log(usage());
    return name ? 0 : 2;
  }
  const load = COMMANDS[name];
  if (!load) {
    console.error(`dipsy: unknown command "${name}"\n\n${usage()}`);
    return 2;
  }
  const { command } = await load();
  try {
    return await command.run(rest);
  } catch (e) {
    // Anything the user can fix is one line; anything else is a bug and keeps its stack.
    if (!(e instanceof UserError)) throw e;
    console.error(`dipsy ${name}: ${e.message}`);
    return e instanceof CliError ? 2 : 1;
  }
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
