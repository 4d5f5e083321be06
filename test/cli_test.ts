/**
 * The CLI's own surface: every command's --help against the flags it declares and the defaults
 * in core/config.ts, the command list, shard numbering in messages, and relative paths under
 * `deno task` (INIT_CWD).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { COMMANDS, usage } from "../cli/main.ts";
import {
  DEFAULT_CLIP,
  DEFAULT_IMAGE_ENCODER,
  DEFAULT_IP_ADAPTER,
  DEFAULT_MODEL,
} from "../core/config.ts";
import { RunError } from "../core/output.ts";
import { resolveShard } from "../core/shard.ts";
import { withOutput, withTempDir } from "./util.ts";

const MAX_LINE = 100;
const DEFAULTS = [DEFAULT_CLIP, DEFAULT_MODEL, DEFAULT_IP_ADAPTER, DEFAULT_IMAGE_ENCODER];
/** Hub ids of the default models, as they appear in a help text. */
const HUB_ID = /\b(?:openai|stable-diffusion-v1-5|h94)\/[^\s);,]*/g;

/**
 * The `--flag`s a help text offers: those quoted as another program's (`eval --select ...`,
 * `sbatch --array=...`) and values of a flag (`--sbatch=--account=proj`) belong to others.
 */
function offeredFlags(text: string, self: string): Set<string> {
  const otherCommand = (span: string) => {
    const first = span.replace(/^dipsy /, "").split(" ")[0];
    return first !== self && /^[a-z]/.test(first);
  };
  const own = text.replace(/`([^`]*)`/g, (all, span: string) => (otherCommand(span) ? "" : all));
  return new Set([...own.matchAll(/(?<![=\w-])--([a-z][a-z0-9-]*)/g)].map((m) => m[1]));
}

for (const [name, [, load]] of Object.entries(COMMANDS)) {
  Deno.test(`${name} --help matches its flags and the defaults`, async () => {
    const { command } = await load();
    const { result, lines } = await withOutput(() => command.run(["--help"]));
    assert.equal(result, 0);
    assert.equal(lines.join("\n"), command.usage, "--help prints the command's usage");
    const text = command.usage;

    const declared = Object.keys(command.flags);
    const offered = offeredFlags(text, name);
    // --help itself is how the text is reached.
    const missing = declared.filter((f) => f !== "help" && !offered.has(f));
    assert.deepEqual(missing, [], `declared but not in ${name} --help`);
    const unknown = [...offered].filter((f) => !declared.includes(f));
    assert.deepEqual(unknown, [], `in ${name} --help but not declared`);

    for (const id of text.match(HUB_ID) ?? []) {
      assert.ok(DEFAULTS.includes(id), `${name} --help shows "${id}", not a default constant`);
    }
    if ("clip" in command.flags) assert.ok(text.includes(DEFAULT_CLIP), "CLIP default shown");
    // (eval's --model is a training run, not a diffusion model.)
    if ("ip-adapter" in command.flags) {
      assert.ok(text.includes(DEFAULT_MODEL), "diffusion model default shown");
    }

    const long = text.split("\n").filter((l) => l.length > MAX_LINE);
    assert.deepEqual(long, [], `${name} --help lines over ${MAX_LINE} characters`);
  });
}

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
