/**
 * `deno task dipsy <command>`: one CLI, one module per command, loaded on demand so that `--help`
 * and argument errors never need the native library.
 */
import { resolve } from "node:path";
import { UserError } from "../ffi/errors.ts";
import { CliError, type Command } from "./command.ts";

/** Each command: its line in the command list, and its module. */
export const COMMANDS: Record<string, [string, () => Promise<{ command: Command }>]> = {
  info: ["libtorch / device information of this installation", () => import("./info.ts")],
  demo: ["run the main job end to end on the embedded tiny models", () => import("./demo.ts")],
  fewshot: [
    "draw nested k-shot splits of a training set (seeded, recorded)",
    () => import("./fewshot.ts"),
  ],
  similarity: [
    "compute and save the class similarity matrix (reused by generate)",
    () => import("./similarity.ts"),
  ],
  generate: [
    "generate the synthetic dataset (resumable, shardable, deterministic)",
    () => import("./generate.ts"),
  ],
  train: [
    "fine-tune the classifier (CLIP + LoRA) on real + synthetic images (resumable)",
    () => import("./train.ts"),
  ],
  eval: [
    "top-1 and per-class accuracy of a trained classifier on a test folder",
    () => import("./eval.ts"),
  ],
  run: [
    "similarity -> generate -> train -> eval in one command, with a report",
    () => import("./run.ts"),
  ],
  sweep: [
    "a grid or list of generation and training settings, ranked (resumable, shardable)",
    () => import("./sweep.ts"),
  ],
  report: [
    "figures and a self-contained report.html of a generate, train, run or sweep folder",
    () => import("./report.ts"),
  ],
  sample: [
    "generate one image from explicit reference images (for trying scales)",
    () => import("./sample.ts"),
  ],
  serve: ["serve sample and generate over HTTP (models stay loaded)", () => import("./serve.ts")],
  fetch: [
    "download the default models (or the given ones) into the Hugging Face cache",
    () => import("./fetch.ts"),
  ],
};

export function usage(): string {
  const width = Math.max(...Object.keys(COMMANDS).map((name) => name.length)) + 2;
  return [
    "usage: deno task dipsy <command> [options]",
    "",
    "commands:",
    ...Object.entries(COMMANDS).map(([name, [summary]]) => `  ${name.padEnd(width)}${summary}`),
    "",
    "`deno task dipsy <command> --help` shows a command's options.",
  ].join("\n");
}

/**
 * `deno task` runs in the folder of deno.json and records the caller's folder in INIT_CWD:
 * relative paths on the command line are meant from there. Module and native-library paths
 * come from import.meta.url; the native-library variables are pinned first, because the
 * bootstrap that ran before this process read them from the task's folder.
 */
export function enterCallerFolder(): void {
  const caller = Deno.env.get("INIT_CWD");
  if (!caller) return;
  try {
    if (!Deno.statSync(caller).isDirectory) return;
  } catch {
    return; // a stale INIT_CWD (a folder since removed) leaves the working folder as it is
  }
  for (const name of ["DIPSY_NATIVE_CACHE", "DIPSY_LIB"]) {
    const value = Deno.env.get(name);
    if (value) Deno.env.set(name, resolve(value));
  }
  Deno.chdir(caller);
}

export async function main(args: string[]): Promise<number> {
  const [name, ...rest] = args;
  if (!name || name === "--help" || name === "-h" || name === "help") {
    console.log(usage());
    return name ? 0 : 2;
  }
  const load = COMMANDS[name]?.[1];
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
  enterCallerFolder();
  Deno.exit(await main(Deno.args));
}
