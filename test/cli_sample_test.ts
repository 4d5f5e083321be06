/**
 * `dipsy sample`, run in-process: on the embedded tiny model, and on the tiny fixture models of
 * test/reference/dipsy_ref.py, where its latents must equal the official-structure diffusers run
 * (the first image of the "dipsy" case).
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { ops, SafetensorsFile, scope } from "../ffi/mod.ts";
import { readImage } from "../core/image.ts";
import { CliError } from "../cli/command.ts";
import { command, parseSampleArgs } from "../cli/sample.ts";
import { assertClose, dipsyCase, dipsyFixture, quietly, withTempDir } from "./util.ts";

const TOL = 1e-4;

Deno.test("cli sample: argument errors are CliErrors, --help needs nothing", async () => {
  assert.equal(await quietly(() => command.run(["--help"])), 0);
  const base = ["--prompt", "a cat", "--seed", "1", "--out", "x.png"];
  assert.ok(parseSampleArgs(base));
  const bad: string[][] = [
    ["--seed", "1", "--out", "x.png"],
    ["--prompt", "a", "--seed", "-3", "--out", "x.png"],
    ["--prompt", "a", "--seed", "1", "--out", "x.gif"],
    [...base, "--steps", "0"],
    [...base, "--dtype", "f64"],
    [...base, "--device", "gpu"],
    [...base, "--set", "guidance.textScale"],
    [...base, "--set", "steps=3"],
    [...base, "--size", "32x"],
    [...base, "--tiny", "--model", "other"],
    [...base, "--latents-out", "x.bin"],
    [...base, "--model", "tiny", "--ip-adapter", "a.safetensors"],
    [...base, "--unknown"],
  ];
  for (const args of bad) {
    assert.throws(() => parseSampleArgs(args), CliError, args.join(" "));
  }
  const a = parseSampleArgs([...base, "--set", "guidance.interval=[0.2,0.8]"])!;
  assert.deepEqual(a.guidanceOptions, { interval: [0.2, 0.8] });
  assert.equal(a.model, "stable-diffusion-v1-5/stable-diffusion-v1-5");
});

Deno.test("cli sample: tiny model writes the PNG and the latents, never overwrites", async () => {
  const fx = dipsyFixture();
  const r = dipsyCase(fx, "dipsy").requests[0];
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
      join(fx.dir, r.positive!),
      "--negative",
      join(fx.dir, r.negative!),
      "--steps",
      "3",
      "--device",
      "cpu",
      "--out",
      out,
      "--latents-out",
      lat,
    ];
    assert.equal(await quietly(() => command.run(args), { echo: true }), 0);
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
    assert.equal(await quietly(() => command.run([...forced, "--force"]), { echo: true }), 0);
    assert.ok(existsSync(out) && existsSync(lat));
  });
});

Deno.test("cli sample: fixture models give the official-structure reference latents", async () => {
  const fx = dipsyFixture();
  const c = dipsyCase(fx, "dipsy");
  const r = c.requests[0];
  await withTempDir(async (dir) => {
    const out = join(dir, "dipsy.png"), lat = join(dir, "dipsy.safetensors");
    const opts = Object.entries(c.options).flatMap(([k, v]) => ["--set", `guidance.${k}=${v}`]);
    const args = [
      "--model",
      fx.model,
      "--ip-adapter",
      join(fx.dir, c.ip_adapter!),
      "--image-encoder",
      fx.imageEncoder,
      "--prompt",
      r.prompt,
      "--seed",
      String(r.seed),
      "--positive",
      join(fx.dir, r.positive!),
      "--negative",
      join(fx.dir, r.negative!),
      "--guidance",
      c.guidance,
      ...opts,
      "--sampler",
      c.sampler,
      "--steps",
      String(c.steps),
      "--size",
      `${c.width}x${c.height}`,
      "--dtype",
      "f32",
      "--device",
      "cpu",
      "--out",
      out,
      "--latents-out",
      lat,
    ];
    assert.equal(await quietly(() => command.run(args), { echo: true }), 0);
    const image = await readImage(out);
    assert.deepEqual([image.width, image.height], [c.width, c.height]);
    using got = SafetensorsFile.open(lat).load("latents");
    using all = SafetensorsFile.open(join(fx.dir, "io.safetensors")).load("dipsy.latents", {
      dtype: "f32",
    });
    scope(() => assertClose("sample latents", got, ops.narrow(all, 0, 0, 1), TOL));
  });
});
