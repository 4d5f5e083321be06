/**
 * `dipsy sample`, run in-process: on the embedded tiny model, and on the tiny fixture models of
 * test/reference/dipsy_ref.py, where its latents must equal the official-structure diffusers run
 * (the first image of the "dipsy" case).
 */
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { ops, SafetensorsFile, scope } from "../ffi/mod.ts";
import { readImage } from "../core/image.ts";
import { CliError } from "../cli/command.ts";
import { command, parseSampleArgs } from "../cli/sample.ts";

const FIXTURES = join(import.meta.dirname!, "fixtures", "dipsy");
const TOL = 1e-4;

interface RefCase {
  name: string;
  guidance: string;
  options: Record<string, number>;
  sampler: string;
  ip_adapter: string;
  steps: number;
  width: number;
  height: number;
  requests: { prompt: string; seed: number; positive: string; negative: string }[];
}

function fixture(): { model: string; imageEncoder: string; dipsy: RefCase } {
  for (const f of ["cases.json", "io.safetensors"]) {
    if (!existsSync(join(FIXTURES, f))) {
      throw new Error(
        `missing fixture ${join(FIXTURES, f)}: run \`deno task test\` (it generates fixtures ` +
          "with test/reference/dipsy_ref.py)",
      );
    }
  }
  const raw = JSON.parse(readFileSync(join(FIXTURES, "cases.json"), "utf8"));
  return {
    model: join(FIXTURES, raw.model),
    imageEncoder: join(FIXTURES, raw.image_encoder),
    dipsy: raw.cases.find((c: RefCase) => c.name === "dipsy"),
  };
}

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "dipsy-cli-sample-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function quietly<T>(fn: () => Promise<T>): Promise<T> {
  const log = console.log, err = console.error;
  const lines: string[] = [];
  console.log = console.error = (...a: unknown[]) => lines.push(a.join(" "));
  try {
    return await fn();
  } finally {
    console.log = log;
    console.error = err;
    for (const l of lines) log(`  | ${l}`);
  }
}

Deno.test("cli sample: argument errors are CliErrors, --help needs nothing", async () => {
  const log = console.log;
  console.log = () => {};
  try {
    assert.equal(await command.run(["--help"]), 0);
  } finally {
    console.log = log;
  }
  const base = ["--prompt", "a cat", "--seed", "1", "--out", "x.png"];
  assert.ok(parseSampleArgs(base));
  const bad: string[][] = [
    ["--seed", "1", "--out", "x.png"],
    ["--prompt", "a", "--seed", "-3", "--out", "x.png"],
    ["--prompt", "a", "--seed", "1", "--out", "x.gif"],
    [...base, "--steps", "0"],
    [...base, "--dtype", "f64"],
    [...base, "--device", "gpu"],
    [...base, "--guidance-opt", "textScale"],
    [...base, "--latents-out", "x.bin"],
    [...base, "--model", "tiny", "--ip-adapter", "a.safetensors"],
    [...base, "--unknown"],
  ];
  for (const args of bad) {
    assert.throws(() => parseSampleArgs(args), CliError, args.join(" "));
  }
  const a = parseSampleArgs([...base, "--guidance-opt", "interval=[0.2,0.8]"])!;
  assert.deepEqual(a.guidanceOptions, { interval: [0.2, 0.8] });
  assert.equal(a.model, "stable-diffusion-v1-5/stable-diffusion-v1-5");
});

Deno.test("cli sample: tiny model writes the PNG and the latents, never overwrites", async () => {
  const fx = fixture();
  const img = (k: string) => join(FIXTURES, fx.dipsy.requests[0][k as "positive"]);
  await withTempDir(async (dir) => {
    const out = join(dir, "x.png"), lat = join(dir, "x.safetensors");
    const args = [
      "--model",
      "tiny",
      "--prompt",
      "a photo of the cat",
      "--seed",
      "3",
      "--positive",
      img("positive"),
      "--negative",
      img("negative"),
      "--steps",
      "3",
      "--device",
      "cpu",
      "--out",
      out,
      "--latents-out",
      lat,
    ];
    assert.equal(await quietly(() => command.run(args)), 0);
    const image = await readImage(out);
    assert.deepEqual([image.width, image.height], [16, 16]);
    const file = SafetensorsFile.open(lat);
    assert.deepEqual(file.info("latents").shape, [1, 4, 8, 8]);
    assert.equal(file.metadata.prompt, "a photo of the cat");
    assert.equal(file.metadata.guidance, "dipsy");
    assert.deepEqual(
      (await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name).sort(),
      ["x.png", "x.safetensors"],
      "no temporary files left behind",
    );
    const before = await Deno.readFile(out);
    await assert.rejects(() => command.run(args), CliError);
    assert.deepEqual(await Deno.readFile(out), before, "existing output left untouched");
    // --force replaces both outputs.
    const forced = args.map((a) => a === "3" ? "2" : a);
    assert.equal(await quietly(() => command.run([...forced, "--force"])), 0);
    assert.ok(existsSync(out) && existsSync(lat));
  });
});

Deno.test("cli sample: fixture models give the official-structure reference latents", async () => {
  const fx = fixture();
  const c = fx.dipsy;
  const r = c.requests[0];
  await withTempDir(async (dir) => {
    const out = join(dir, "dipsy.png"), lat = join(dir, "dipsy.safetensors");
    const opts = Object.entries(c.options).flatMap(([k, v]) => ["--guidance-opt", `${k}=${v}`]);
    const args = [
      "--model",
      fx.model,
      "--ip-adapter",
      join(FIXTURES, c.ip_adapter),
      "--image-encoder",
      fx.imageEncoder,
      "--prompt",
      r.prompt,
      "--seed",
      String(r.seed),
      "--positive",
      join(FIXTURES, r.positive),
      "--negative",
      join(FIXTURES, r.negative),
      "--guidance",
      c.guidance,
      ...opts,
      "--sampler",
      c.sampler,
      "--steps",
      String(c.steps),
      "--width",
      String(c.width),
      "--height",
      String(c.height),
      "--dtype",
      "f32",
      "--device",
      "cpu",
      "--out",
      out,
      "--latents-out",
      lat,
    ];
    assert.equal(await quietly(() => command.run(args)), 0);
    const image = await readImage(out);
    assert.deepEqual([image.width, image.height], [c.width, c.height]);
    using got = SafetensorsFile.open(lat).load("latents");
    using all = SafetensorsFile.open(join(FIXTURES, "io.safetensors")).load("dipsy.latents", {
      dtype: "f32",
    });
    const [err, scale] = scope(() => {
      const want = ops.narrow(all, 0, 0, 1);
      return [ops.maxAll(ops.abs(ops.sub(got, want))).item(), ops.maxAll(ops.abs(want)).item()];
    });
    console.log(
      `  sample latents: max abs err ${err.toExponential(2)} (scale ${scale.toFixed(3)})`,
    );
    assert.ok(err <= TOL * Math.max(1, scale), `max abs err ${err} > ${TOL} x scale`);
  });
});
