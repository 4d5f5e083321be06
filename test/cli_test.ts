/**
 * The CLI's own surface: every command's --help against the flags it parses and the defaults it
 * runs with, misspelt flags and `--set` keys, classifier plugin files in train and eval, the
 * command list, shard numbering in messages, and relative paths under `deno task` (INIT_CWD).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { COMMANDS, usage } from "../cli/main.ts";
import {
  CliError,
  type Command,
  type DefinedCommand,
  type Flags,
  showDefault,
} from "../cli/command.ts";
import {
  DEFAULT_CLIP,
  DEFAULT_IMAGE_ENCODER,
  DEFAULT_IP_ADAPTER,
  DEFAULT_MODEL,
  DEFAULTS,
} from "../core/config.ts";
import { RunError } from "../core/output.ts";
import { resolveShard } from "../core/shard.ts";
import { UserError } from "../ffi/errors.ts";
import { EVAL_BATCH } from "../plugins/classifiers/evaluate.ts";
import {
  quietly,
  TINY_TRAIN_FLAGS,
  withOutput,
  withTempDir,
  writeNoiseImage,
  writeTinyDataset,
} from "./util.ts";

const MAX_LINE = 100;
const DEFAULTS_SHOWN = [DEFAULT_CLIP, DEFAULT_MODEL, DEFAULT_IP_ADAPTER, DEFAULT_IMAGE_ENCODER];
/** Hub ids of the default models, as they appear in a help text. */
const HUB_ID = /\b(?:openai|stable-diffusion-v1-5|h94)\/[^\s);,]*/g;
const EXAMPLE = new URL("../docs/examples/my_classifier.ts", import.meta.url).pathname;

const load = async (name: string) => (await COMMANDS[name][1]()).command;
const isDefined = (c: Command): c is DefinedCommand<Flags> => "declared" in c;

/**
 * The flag rows of a help text, each with its whole text (continuation lines joined): a row
 * starts at column 2 with `--name` (or `-h, --name`); continuations are indented further.
 */
function helpRows(text: string): Map<string, string> {
  const rows = new Map<string, string>();
  let current: string | null = null;
  for (const line of text.split("\n")) {
    const m = /^ {2}(?:-\w, )?--([a-z][a-z0-9-]*)/.exec(line);
    if (m) {
      current = m[1];
      rows.set(current, line.trim());
    } else if (current && /^ {4,}\S/.test(line)) {
      rows.set(current, `${rows.get(current)} ${line.trim()}`);
    } else {
      current = null;
    }
  }
  return rows;
}

/** The "(default X)" a help row shows, if any. */
const shownDefault = (row: string) => [...row.matchAll(/\(default ([^()]*)\)/g)].at(-1)?.[1];

for (const name of Object.keys(COMMANDS)) {
  Deno.test(`${name} --help lists exactly the flags it parses`, async () => {
    const command = await load(name);
    const { result, lines } = await withOutput(() => command.run(["--help"]));
    assert.equal(result, 0);
    assert.equal(lines.join("\n"), command.usage, "--help prints the command's usage");
    const text = command.usage;

    const offered = [...helpRows(text).keys()].sort();
    const parsed = Object.keys(command.flags)
      .filter((f) => isDefined(command) || f !== "help").sort();
    assert.deepEqual(offered.filter((f) => isDefined(command) || f !== "help"), parsed);

    for (const id of text.match(HUB_ID) ?? []) {
      assert.ok(
        DEFAULTS_SHOWN.includes(id),
        `${name} --help shows "${id}", not a default constant`,
      );
    }
    if ("clip" in command.flags) assert.ok(text.includes(DEFAULT_CLIP), "CLIP default shown");
    // (eval's --model is a training run, not a diffusion model.)
    if ("ip-adapter" in command.flags) {
      assert.ok(text.includes(DEFAULT_MODEL), "diffusion model default shown");
    }
    const long = text.split("\n").filter((l) => l.length > MAX_LINE);
    assert.deepEqual(long, [], `${name} --help lines over ${MAX_LINE} characters`);
  });

  Deno.test(`${name}: a misspelt flag is refused with a did-you-mean`, async () => {
    const command = await load(name);
    const flag = Object.keys(command.flags).filter((f) => f !== "help")
      .sort((a, b) => b.length - a.length)[0];
    if (!flag) {
      console.log(`skipped: ${name} takes no flag but --help`);
      return;
    }
    await assert.rejects(
      () => command.run([`--${flag.slice(0, -1)}`]),
      (e: unknown) =>
        e instanceof CliError &&
        e.message.includes(`unknown option --${flag.slice(0, -1)} (did you mean --${flag}?)`),
    );
  });
}

/** The settings of the default classifier when no classifier flag is given. */
async function classifierDefaults(): Promise<Record<string, unknown>> {
  const { classifierOptions } = await import("../cli/train_flags.ts");
  const { makeClassifier } = await import("../app/classify.ts");
  const { name, options } = classifierOptions({});
  const settings = (await makeClassifier(name, options)).settings as Record<string, unknown>;
  const lora = (settings.lora ?? {}) as Record<string, unknown>;
  return { classifier: name, ...lora, ...settings };
}

/** What a command runs with for each flag left out, found without reading its help. */
const RESOLVED: Record<string, (flags: Flags) => Promise<(flag: string) => unknown>> = {
  async generate(flags) {
    const { configFromFlags } = await import("../cli/generate.ts");
    const config = await configFromFlags({ data: "d", out: "o" }) as unknown as Record<
      string,
      unknown
    >;
    return (flag) => {
      const v = config[flags[flag].field!];
      return (v as { name?: string })?.name ?? v;
    };
  },
  async run(flags) {
    const generation = await RESOLVED.generate(flags);
    const classifier = await classifierDefaults();
    const { SLURM_DEFAULTS } = await import("../cli/slurm.ts");
    const slurm: Record<string, unknown> = {
      "gpus-per-task": SLURM_DEFAULTS.gpusPerTask,
      "array-size": SLURM_DEFAULTS.arraySize,
    };
    const { CLASSIFIER_FLAGS } = await import("../cli/train_flags.ts");
    return (flag) => {
      if (flag in slurm) return slurm[flag];
      // run's --clip and --dtype are generation's, which hands them to the classifier.
      const own = flag === "train-seed" ? "seed" : flag;
      if (own in CLASSIFIER_FLAGS && !["clip", "dtype"].includes(own)) {
        return classifier[CLASSIFIER_FLAGS[own].field ?? own];
      }
      return generation(flag);
    };
  },
  async train(flags) {
    const classifier = await classifierDefaults();
    const { deviceFlag } = await import("../cli/command.ts");
    return (flag) =>
      flag === "device" ? deviceFlag(undefined) : classifier[flags[flag].field ?? flag];
  },
  eval() {
    return Promise.resolve((flag) => (flag === "batch" ? EVAL_BATCH : undefined));
  },
  async sample() {
    const { parseSampleArgs } = await import("../cli/sample.ts");
    const a = parseSampleArgs(["--prompt", "a", "--seed", "1", "--out", "x.png"])!;
    // No --device or --dtype: chosen as generate's "auto" chooses them.
    const resolved: Record<string, unknown> = {
      ...a,
      "ip-adapter": a.ipAdapter ?? DEFAULT_IP_ADAPTER,
      "image-encoder": a.imageEncoder ?? DEFAULT_IMAGE_ENCODER,
      device: a.device ?? DEFAULTS.device,
      dtype: a.dtype ?? DEFAULTS.dtype,
    };
    return (flag) => resolved[flag];
  },
  async serve(flags) {
    const { parseServeArgs } = await import("../cli/serve.ts");
    const s = parseServeArgs([])!;
    const server: Record<string, unknown> = {
      host: s.hostname,
      port: s.port,
      queue: s.queue,
      "max-body-mb": s.maxBodyBytes >> 20,
      "max-image-mb": s.maxImageBytes >> 20,
    };
    // The model settings are handed to the configuration, whose defaults apply.
    const config = DEFAULTS as unknown as Record<string, unknown>;
    return (flag) => server[flag] ?? config[flags[flag].field!];
  },
};

for (const [name, resolve] of Object.entries(RESOLVED)) {
  Deno.test(`${name} --help shows the defaults ${name} runs with`, async () => {
    const command = await load(name);
    assert.ok(isDefined(command));
    const actual = await resolve(command.declared);
    const shown = [...helpRows(command.usage)].flatMap(([flag, row]) => {
      const d = shownDefault(row);
      return d === undefined ? [] : [[flag, d]];
    });
    assert.ok(shown.length > 0, `${name} --help shows no default`);
    for (const [flag, text] of shown) {
      const value = actual(flag);
      assert.notEqual(value, undefined, `${name} --${flag}: no resolved default to compare with`);
      assert.equal(text, showDefault(value), `${name} --${flag}`);
    }
  });
}

/** Rejects with a one-line UserError whose message matches every pattern. */
async function refused(fn: () => Promise<unknown>, ...says: RegExp[]): Promise<void> {
  await assert.rejects(fn, (e: unknown) => {
    assert.ok(e instanceof UserError, `not a user error: ${e}`);
    for (const re of says) assert.match(e.message, re);
    return true;
  });
}

Deno.test("a misspelt --set key is refused naming the valid keys: sample, generate, run, train", async () => {
  await withTempDir(async (dir) => {
    const data = join(dir, "data");
    await writeTinyDataset(data);
    await writeNoiseImage(join(dir, "p.png"), 16, 16, 1);
    await writeNoiseImage(join(dir, "n.png"), 16, 16, 2);
    const sample = await load("sample");
    const sampleArgs = [
      ...["--tiny", "--prompt", "a cat", "--seed", "1", "--steps", "1", "--device", "cpu"],
      ...["--positive", join(dir, "p.png"), "--negative", join(dir, "n.png")],
      ...["--out", join(dir, "x.png")],
    ];
    await refused(
      () => quietly(() => sample.run([...sampleArgs, "--set", "guidance.negativScale=4"])),
      /--set guidance\.negativScale/,
      /negativeScale/,
      /textScale/,
    );
    await refused(
      () => quietly(() => sample.run([...sampleArgs, "--set", "sampler.timestep_spacin=trailing"])),
      /timestep_spacin\b/,
      /timestep_spacing/,
    );
    await refused(
      () => quietly(() => sample.run([...sampleArgs, "--set", "steps=3"])),
      /--set steps: sample takes guidance\.KEY=V and sampler\.KEY=V/,
    );

    const generate = await load("generate");
    const gen = ["--data", data, "--out", join(dir, "gen"), "--tiny", "--print-config"];
    await refused(
      () => generate.run([...gen, "--set", "guidance.negativScale=4"]),
      /negativScale/,
      /negativeScale/,
      /textScale/,
    );
    await refused(() => generate.run([...gen, "--set", "perClas=3"]), /perClas\b/, /perClass/);

    const run = await load("run");
    const runArgs = ["--data", data, "--test", data, "--out", join(dir, "run"), "--tiny"];
    await refused(
      () => run.run([...runArgs, "--print-config", "--set", "guidance.negativScale=4"]),
      /negativScale/,
      /negativeScale/,
    );
    await refused(() => run.run([...runArgs, "--train-set", "rnak=4"]), /rnak/, /rank/, /lambda/);

    const train = await load("train");
    await refused(
      () => train.run(["--real", data, "--out", join(dir, "train"), "--set", "rnak=4"]),
      /rnak/,
      /rank/,
      /lambda/,
    );
    for (const out of ["gen", "run", "train", "x.png"]) {
      assert.ok(!(await exists(join(dir, out))), `a refused command wrote ${out}`);
    }
  });
});

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch {
    return false;
  }
}

Deno.test("docs/plugins.md includes the example classifier plugin verbatim", async () => {
  const doc = await Deno.readTextFile(new URL("../docs/plugins.md", import.meta.url));
  const marker = "<!-- file: docs/examples/my_classifier.ts -->";
  const at = doc.indexOf(marker);
  assert.ok(at >= 0, `docs/plugins.md has no ${marker}`);
  const m = /^\s*```ts\n([\s\S]*?)\n```/.exec(doc.slice(at + marker.length));
  assert.ok(m, `no ts code block after ${marker}`);
  assert.equal(`${m[1]}\n`, await Deno.readTextFile(EXAMPLE));
});

Deno.test("train --plugin trains with a classifier plugin file, eval --plugin evaluates it, --list lists it", async () => {
  const { setNumThreads } = await import("../ffi/mod.ts");
  setNumThreads(1);
  const train = await load("train"), evaluate = await load("eval");
  const listed = async (command: Command) => {
    const { result, lines } = await withOutput(() => command.run(["--list", "--plugin", EXAMPLE]));
    assert.equal(result, 0);
    return lines.join("\n");
  };
  for (const command of [train, evaluate]) {
    const text = await listed(command);
    assert.match(text, /^ {2}my-clip-lora +DataDream's CLIP \+ LoRA recipe under a name/m);
    assert.match(text, /^ {2}clip-lora /m);
    assert.match(text, /^ {6}rank: LoRA rank \(default 16\)$/m);
  }
  await withTempDir(async (dir) => {
    const data = join(dir, "data"), out = join(dir, "run");
    await writeTinyDataset(data);
    const args = [
      ...["--plugin", EXAMPLE, "--classifier", "my-clip-lora", "--clip", "tiny"],
      ...["--real", data, "--mode", "real", "--out", out, "--device", "cpu", ...TINY_TRAIN_FLAGS],
    ];
    assert.equal(await quietly(() => train.run(args)), 0);
    const record = JSON.parse(await Deno.readTextFile(join(out, "classifier.json")));
    assert.equal(record.name, "my-clip-lora");
    assert.equal(record.settings.epochs, 2, "the plugin got the flags as options");

    const test = ["--model", out, "--test", data, "--device", "cpu", "--workers", "1"];
    assert.equal(await quietly(() => evaluate.run([...test, "--plugin", EXAMPLE])), 0);
    const result = JSON.parse(await Deno.readTextFile(join(out, "eval.json")));
    assert.equal(result.total, 4, "every test image evaluated");
    assert.equal(result.selection.epoch, 2);
  });
});

Deno.test("sample and generate spell the shared settings alike; the old sample flags warn", async () => {
  const { parseSampleArgs } = await import("../cli/sample.ts");
  const base = ["--prompt", "a", "--seed", "1", "--out", "x.png"];
  const now = parseSampleArgs([
    ...base,
    ...["--size", "48x32", "--tiny", "--set", "guidance.textScale=5"],
    ...["--set", "sampler.timestep_spacing=trailing", "--set", "guidance.interval=[0.2,0.8]"],
  ])!;
  assert.deepEqual([now.width, now.height, now.model], [48, 32, "tiny"]);
  assert.deepEqual(now.guidanceOptions, { textScale: 5, interval: [0.2, 0.8] });
  assert.deepEqual(now.samplerOptions, { timestep_spacing: "trailing" });
  const { result: old, lines } = await withOutput(() =>
    Promise.resolve(
      parseSampleArgs([
        ...base,
        ...["--width", "48", "--height", "32", "--guidance-opt", "textScale=5"],
      ])!,
    )
  );
  assert.deepEqual([old.width, old.height, old.guidanceOptions], [48, 32, { textScale: 5 }]);
  assert.deepEqual(lines, [
    "warning: --guidance-opt is deprecated; use --set guidance.K=V",
    "warning: --width is deprecated; use --size WxH",
    "warning: --height is deprecated; use --size WxH",
  ]);
  await quietly(() =>
    Promise.resolve(
      assert.throws(() => parseSampleArgs([...base, "--size", "32", "--width", "16"]), CliError),
    )
  );
});

Deno.test("dipsy --help lists every command, summaries in one column", () => {
  const rows = usage().split("\n").filter((l) => /^ {2}\S+ {2,}\S/.test(l));
  assert.deepEqual(rows.map((l) => l.trim().split(/\s+/)[0]), Object.keys(COMMANDS));
  const columns = new Set(rows.map((l) => l.search(/(?<=\S {2,})\S/)));
  assert.equal(columns.size, 1, `summaries start in columns ${[...columns].join(", ")}`);
});

Deno.test("a shard past the count says shards count from 0", () => {
  assert.deepEqual(resolveShard("1/2", undefined, {}), { index: 1, count: 2, source: "--shard" });
  assert.throws(
    () => resolveShard("2/2", undefined, {}),
    (e: unknown) =>
      e instanceof RunError && /count from 0/.test(e.message) && /0\/2 and 1\/2/.test(e.message),
  );
  assert.throws(
    () => resolveShard(undefined, undefined, { SLURM_ARRAY_TASK_ID: "4", DIPSY_SHARD_COUNT: "4" }),
    (e: unknown) => e instanceof RunError && /0\/4 to 3\/4/.test(e.message),
  );
});

Deno.test("relative paths are read from INIT_CWD, the folder `deno task` was called from", async () => {
  await withTempDir(async (dir) => {
    const caller = join(dir, "caller"), elsewhere = join(dir, "elsewhere");
    await Deno.mkdir(caller);
    await Deno.mkdir(elsewhere);
    await Deno.writeTextFile(join(caller, "gen.yaml"), "perClass: 7\n");
    const config = new URL("../deno.json", import.meta.url).pathname;
    const main = new URL("../cli/main.ts", import.meta.url).pathname;
    const args = ["run", "-A", "--config", config, main, "generate", "--config", "gen.yaml"];
    const cli = (env: Record<string, string>) =>
      new Deno.Command(Deno.execPath(), {
        args: [...args, "--data", "shots", "--out", "o", "--print-config"],
        cwd: elsewhere,
        env,
        stdin: "null",
      }).output();
    const dec = new TextDecoder();

    const from = await cli({ INIT_CWD: caller });
    assert.equal(from.code, 0, dec.decode(from.stderr));
    const printed = dec.decode(from.stdout);
    assert.match(printed, /^perClass: 7$/m);
    assert.match(printed, new RegExp(`^data: ${join(caller, "shots")}$`, "m"));

    // Without INIT_CWD (a plain `deno run`), the process's own folder.
    const plain = await cli({ INIT_CWD: "" });
    assert.equal(plain.code, 1);
    assert.match(dec.decode(plain.stderr), /gen\.yaml/);
  });
});
