/**
 * Mistakes a user can make on the command line, each run in a `dipsy` subprocess: bad model files
 * (a pickle UNet, truncated or corrupt safetensors, a tensor of the wrong shape, a folder without
 * unet/config.json) through `sample` and `generate`, and bad flags and values. Every one must end
 * in one line naming the file or the flag, never a stack trace, and must leave nothing behind
 * that would block the corrected command.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { ops, SafetensorsFile, saveSafetensors } from "../ffi/mod.ts";
import { CliError, parseFlags } from "../cli/command.ts";
import { dipsyFixture, disposeAll, writeTinyDataset } from "./util.ts";

const MAIN = new URL("../cli/main.ts", import.meta.url).pathname;
const ROOT = await Deno.makeTempDir({ prefix: "dipsy_user_errors_test_" });
const DATA = join(ROOT, "data");
const FX = dipsyFixture();
const IP_ADAPTER = join(FX.dir, "ip-adapter-plus_tiny.safetensors");
const UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors";

await writeTinyDataset(DATA);

/**
 * A copy of the fixture's SD1.5 folder whose unet/ is edited by `spoil`; the other parts are
 * links to the fixture's, which nothing here writes to.
 */
async function spoiledModel(name: string, spoil: (dir: string) => void): Promise<string> {
  const dir = join(ROOT, "models", name);
  await Deno.mkdir(join(dir, "unet"), { recursive: true });
  for (const part of ["vae", "text_encoder", "tokenizer", "scheduler"]) {
    await Deno.symlink(join(FX.model, part), join(dir, part));
  }
  for (const f of ["config.json", "diffusion_pytorch_model.safetensors"]) {
    await Deno.copyFile(join(FX.model, "unet", f), join(dir, "unet", f));
  }
  spoil(dir);
  return dir;
}

/** Rewrites the 8-byte header length and the header of a safetensors file. */
function rewriteHeader(path: string, length: bigint, header?: string): void {
  const bytes = Deno.readFileSync(path);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const oldLength = Number(view.getBigUint64(0, true));
  view.setBigUint64(0, length, true);
  if (header !== undefined) {
    // Same length as the old header, so the data section stays where it was.
    bytes.set(new TextEncoder().encode(header.padEnd(oldLength, " ")), 8);
  }
  Deno.writeFileSync(path, bytes);
}

interface BadModel {
  name: string;
  /** For file names. */
  slug: string;
  /** What the error line must say (with the file it names). */
  says: RegExp;
  dir: string;
}

const BAD_MODELS: BadModel[] = [];
async function badModel(name: string, says: RegExp, spoil: (dir: string) => void) {
  const slug = name.replace(/[^a-z0-9]+/gi, "-");
  BAD_MODELS.push({ name, slug, says, dir: await spoiledModel(slug, spoil) });
}
await badModel("pickle UNet", /unet\/diffusion_pytorch_model\.bin: pickle checkpoints/, (d) => {
  Deno.renameSync(join(d, UNET_WEIGHTS), join(d, "unet", "diffusion_pytorch_model.bin"));
});
await badModel(
  "truncated safetensors",
  /diffusion_pytorch_model\.safetensors: .*truncated/,
  (d) => {
    const path = join(d, UNET_WEIGHTS);
    Deno.truncateSync(path, Math.floor(Deno.statSync(path).size / 2));
  },
);
await badModel(
  "header not JSON",
  /diffusion_pytorch_model\.safetensors: .*header is not JSON/,
  (d) => {
    const path = join(d, UNET_WEIGHTS);
    const length = new DataView(Deno.readFileSync(path).buffer).getBigUint64(0, true);
    rewriteHeader(path, length, "{not json");
  },
);
await badModel(
  "header claims 2^60 bytes",
  /diffusion_pytorch_model\.safetensors: .*header length 1152921504606846976/,
  (d) => rewriteHeader(join(d, UNET_WEIGHTS), 1n << 60n),
);
await badModel(
  "tensor of the wrong shape",
  /diffusion_pytorch_model\.safetensors: key "conv_in\.weight" has shape \[31, 4, 3, 3\]/,
  (d) => {
    const path = join(d, UNET_WEIGHTS);
    const weights = SafetensorsFile.open(path).loadAll();
    const right = weights.get("conv_in.weight")!;
    weights.set("conv_in.weight", ops.narrow(right, 0, 0, right.size(0) - 1));
    right.dispose();
    saveSafetensors(path, weights);
    disposeAll(weights);
  },
);
await badModel("no unet/config.json", /unet\/config\.json: not found/, (d) => {
  Deno.removeSync(join(d, "unet", "config.json"));
});

interface Outcome {
  code: number;
  stderr: string;
}

async function dipsy(args: string[]): Promise<Outcome> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, ...args],
    stdout: "piped",
    stderr: "piped",
    env: { OMP_NUM_THREADS: "1", NO_COLOR: "1", HF_HUB_OFFLINE: "1" },
  }).output();
  return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
}

/**
 * The command failed with `code` and one error line that matches `says`, its last line; the
 * lines before it (only `generate` has any) are progress messages, never a stack.
 */
function assertOneLine(label: string, command: string, r: Outcome, code: number, says: RegExp) {
  const shown = `${label}:\n${r.stderr}`;
  assert.equal(r.code, code, shown);
  assert.doesNotMatch(r.stderr, /^\s+at /m, `${shown}\n(a stack trace)`);
  assert.doesNotMatch(r.stderr, /Uncaught/, shown);
  const lines = r.stderr.trimEnd().split("\n");
  const errors = lines.filter((l) => l.startsWith(`dipsy ${command}: `));
  assert.equal(errors.length, 1, `${shown}\n(expected one error line)`);
  assert.equal(lines.at(-1), errors[0], `${shown}\n(the error must be the last line)`);
  assert.match(errors[0], says, shown);
}

/** Runs `cases` two at a time (subprocesses are the cost of this file). */
async function inPairs<T>(cases: T[], run: (c: T) => Promise<void>): Promise<void> {
  for (let i = 0; i < cases.length; i += 2) await Promise.all(cases.slice(i, i + 2).map(run));
}

Deno.test("sample: every bad model file gives one line naming it, no stack", async () => {
  await inPairs(BAD_MODELS, async (m) => {
    const out = join(ROOT, `sample-${m.slug}.png`);
    const r = await dipsy([
      "sample",
      ...["--model", m.dir, "--ip-adapter", IP_ADAPTER, "--image-encoder", FX.imageEncoder],
      ...["--positive", join(FX.dir, "images/a.png"), "--negative", join(FX.dir, "images/b.png")],
      ...["--prompt", "a cat", "--seed", "1", "--steps", "1", "--device", "cpu", "--out", out],
    ]);
    assertOneLine(m.name, "sample", r, 1, m.says);
    assert.ok(r.stderr.includes(m.dir), `${m.name}: the message names the file`);
    assert.equal(r.stderr.trim().split("\n").length, 1, `${m.name}: ${r.stderr}`);
    assert.ok(!existsSync(out), `${m.name}: nothing written`);
  });
});

Deno.test("generate: every bad model file gives one line naming it and writes nothing", async () => {
  await inPairs(BAD_MODELS, async (m) => {
    const out = join(ROOT, `generate-${m.slug}`);
    const r = await dipsy([
      "generate",
      ...["--data", DATA, "--out", out, "--per-class", "1", "--steps", "1", "--device", "cpu"],
      ...["--model", m.dir, "--ip-adapter", IP_ADAPTER, "--image-encoder", FX.imageEncoder],
    ]);
    assertOneLine(m.name, "generate", r, 1, m.says);
    assert.ok(r.stderr.includes(m.dir), `${m.name}: the message names the file`);
    assert.ok(!existsSync(out), `${m.name}: the refused run left ${out} behind`);
  });
});

Deno.test("bad flags and values: one line naming the flag or field, no stack", async () => {
  const gen = (out: string) => ["generate", "--data", DATA, "--out", join(ROOT, out), "--tiny"];
  const cases: { args: string[]; code: number; says: RegExp }[] = [
    { args: [...gen("seed"), "--seed=-1"], code: 1, says: /--seed must be at least 0, got -1/ },
    {
      args: [...gen("per-class"), "--per-class", "-1"],
      code: 1,
      says: /--per-class must be at least 1, got -1/,
    },
    {
      args: [...gen("typo"), "--per-clas", "3"],
      code: 2,
      says: /unknown option --per-clas \(did you mean --per-class\?\)/,
    },
    {
      args: [...gen("option"), "--set", "guidance.negativScale=4"],
      code: 1,
      says: /guidance plugin "dipsy": unknown option "negativScale" \(did you mean negativeScale\?/,
    },
    {
      args: ["sample", "--prompt", "a cat", "--out", join(ROOT, "x.png"), "--seed=-1"],
      code: 2,
      says: /--seed must be an integer of at least 0, got "-1"/,
    },
    {
      args: ["train", "--real", DATA, "--out", join(ROOT, "train"), "--classifier", "foo"],
      code: 1,
      says: /unknown classifier plugin "foo" \(available: [^)]*clip-lora/,
    },
  ];
  await inPairs(cases, async (c) => {
    const r = await dipsy(c.args);
    assertOneLine(c.args.join(" "), c.args[0], r, c.code, c.says);
    assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
  });
  for (const out of ["seed", "per-class", "typo", "option", "train"]) {
    assert.ok(!existsSync(join(ROOT, out)), `a refused command created ${out}`);
  }
});

Deno.test("generate --size 13 is refused before anything is written; --size 16 then runs", async () => {
  const out = join(ROOT, "size");
  const args = (size: string) => [
    "generate",
    ...["--data", DATA, "--out", out, "--tiny", "--size", size, "--per-class", "1"],
    ...["--steps", "1", "--batch", "1", "--device", "cpu"],
  ];
  const refused = await dipsy(args("13"));
  assertOneLine("--size 13", "generate", refused, 1, /13x13: "width" and "height" \(--size\)/);
  assert.ok(!existsSync(out), "the refused run wrote into its folder");
  const corrected = await dipsy(args("16"));
  assert.equal(corrected.code, 0, corrected.stderr);
  const manifest = Deno.readTextFileSync(join(out, "manifest.jsonl")).trim().split("\n");
  assert.equal(manifest.length, 2, "one image for each of the two classes");
  assert.ok(manifest.every((l) => JSON.parse(l).width === 16));
});

Deno.test("parseFlags: negative numbers are values; parser mistakes are one line", () => {
  const options = {
    seed: { type: "string" },
    force: { type: "boolean" },
    set: { type: "string", multiple: true },
  } as const;
  assert.deepEqual({ ...parseFlags(["--seed", "-1", "--set", "-0.5"], options) }, {
    seed: "-1",
    set: ["-0.5"],
  });
  const bad: [string[], RegExp][] = [
    [["--sed", "1"], /^unknown option --sed \(did you mean --seed\?\); see --help$/],
    [["--seed"], /^--seed needs a value$/],
    [["--seed", "--force"], /^--seed needs a value \(write --seed=VALUE for a value that starts/],
    [["--force=yes"], /^--force takes no value$/],
    [["stray"], /^unexpected argument "stray"/],
  ];
  for (const [args, message] of bad) {
    assert.throws(() => parseFlags(args, options), (e: unknown) => {
      assert.ok(e instanceof CliError, String(e));
      assert.match(e.message, message, args.join(" "));
      return true;
    });
  }
});

globalThis.addEventListener("unload", () => {
  Deno.removeSync(ROOT, { recursive: true });
});
