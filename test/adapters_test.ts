/**
 * Per-adapter settings: the negative reference image through its own IP-Adapter file and scale.
 * Parity with diffusers (test/reference/dipsy_ref.py loads two files with
 * `load_ip_adapter(weight_name=[pos, neg])` and switches `set_ip_adapter_scale([lam, lam_neg])`),
 * bit-identical output when neither is set, refusal of a mismatched pair naming both files
 * before anything is written, the record of both slots in run.json, and the same settings through
 * `dipsy sample` and the server.
 */
import assert from "node:assert/strict";
import { copyFileSync } from "node:fs";
import { join } from "node:path";
import { keep, memory, ops, SafetensorsFile, setNumThreads, type Tensor } from "../ffi/mod.ts";
import { UserError } from "../ffi/errors.ts";
import { readImage } from "../core/image.ts";
import { parseConfigObject, parseSets, resolveConfig, type RunConfig } from "../core/config.ts";
import { type Guidance, registry, type Sampler } from "../core/plugins.ts";
import { sampleLatents, type SampleRequest } from "../core/sampling.ts";
import type { ManifestEntry, RunRecord } from "../core/output.ts";
import { checkAdapterFiles } from "../app/models.ts";
import { Sd15Backbone } from "../plugins/sd15/backbone.ts";
import { runGenerate } from "../cli/generate.ts";
import { parseSampleArgs, runSample } from "../cli/sample.ts";
import { parseServeArgs, startFromSettings } from "../cli/serve.ts";
import { registerDefaults } from "../plugins/defaults.ts";
import {
  assertClose,
  type DipsyCase,
  dipsyCase,
  dipsyFixture,
  quietly,
  withTempDir,
  writeTinyDataset,
} from "./util.ts";
import { Client, form, serverTest } from "./server_util.ts";

// One thread: the reference ran with one, and thread counts change float rounding.
setNumThreads(1);
registerDefaults();

const TOL = 1e-4;
const fx = dipsyFixture();
const PLUS = join(fx.dir, "ip-adapter-plus_tiny.safetensors");
const PLUS_B = join(fx.dir, "ip-adapter-plus_tiny_b.safetensors");
const PLUS_Q4 = join(fx.dir, "ip-adapter-plus_tiny_q4.safetensors");
const BASE = join(fx.dir, "ip-adapter_tiny.safetensors");

/** A case of the dipsy fixture, with the negative image's own adapter file when it has one. */
type AdapterCase = DipsyCase & { negative_ip_adapter?: string };

function refTensor(key: string): Tensor {
  return SafetensorsFile.open(join(fx.dir, "io.safetensors")).load(key, { dtype: "f32" });
}

async function requests(c: DipsyCase): Promise<SampleRequest[]> {
  return await Promise.all(c.requests.map(async (r) => ({
    prompt: r.prompt,
    seed: r.seed,
    positive: r.positive ? await readImage(join(fx.dir, r.positive)) : null,
    negative: r.negative ? await readImage(join(fx.dir, r.negative)) : null,
  })));
}

async function load(negativeIpAdapter?: string): Promise<Sd15Backbone> {
  return await Sd15Backbone.load(
    { model: fx.model, ipAdapter: PLUS, negativeIpAdapter, imageEncoder: fx.imageEncoder },
    { adapters: 2 },
  );
}

/** Runs `c` as one batch; returns the latents after the first step and at the end. */
async function run(
  bb: Sd15Backbone,
  c: DipsyCase,
  options: Record<string, unknown> = c.options,
): Promise<{ first: Tensor; latents: Tensor }> {
  const reqs = await requests(c);
  const guidance = registry.create<Guidance>("guidance", c.guidance, options);
  using inner = registry.create<Sampler>("sampler", c.sampler, {
    steps: c.steps,
    config: bb.schedulerConfig,
  });
  let first: Tensor | null = null;
  // Keeps a copy of the first step's result (the loop frees what a step makes besides it).
  const sampler: Sampler = {
    kind: inner.kind,
    name: inner.name,
    timesteps: inner.timesteps,
    initNoiseSigma: inner.initNoiseSigma,
    scaleModelInput: (x, i) => inner.scaleModelInput(x, i),
    step(out, i, sample) {
      const next = inner.step(out, i, sample);
      if (i === 0) first = keep(next.clone());
      return next;
    },
    [Symbol.dispose]() {},
  };
  const latents = sampleLatents(bb, reqs, { width: c.width, height: c.height, guidance, sampler });
  return { first: first!, latents };
}

function bytesOf(t: Tensor): Float64Array {
  return t.toFloat64();
}

Deno.test("adapters: a second file and scale for the negative image match diffusers", async () => {
  const before = memory().handles;
  {
    using bb = await load(PLUS_B);
    assert.equal(bb.modelIds.negativeIpAdapter, PLUS_B);
    const c = dipsyCase(fx, "dipsy-two-adapters") as AdapterCase;
    assert.equal(join(fx.dir, c.negative_ip_adapter!), PLUS_B);
    console.log(
      `  ${c.name}: ${c.options.adapterScale} / ${c.options.negativeAdapterScale}, ` +
        `${c.requests.length} images in one batch`,
    );
    const { first, latents } = await run(bb, c);
    using _f = first, _l = latents;
    using wantFirst = refTensor(`${c.name}.latents_step1`);
    using want = refTensor(`${c.name}.latents`);
    using wantImage = refTensor(`${c.name}.image`);
    assertClose(`${c.name} latents after step 1`, first, wantFirst, TOL);
    assertClose(`${c.name} final latents`, latents, want, TOL);
    using image = bb.decode(latents);
    assertClose(`${c.name} decoded image`, image, wantImage, TOL);
    // The same requests with one file at one scale: the second file must have changed them.
    using single = refTensor("dipsy.latents");
    const a = bytesOf(latents), b = bytesOf(single);
    const apart = a.reduce((m, x, i) => Math.max(m, Math.abs(x - b[i])), 0);
    assert.ok(apart > 100 * TOL, `the negative adapter changed nothing (${apart})`);
  }
  assert.equal(memory().handles, before, "handles leaked by loading and running two files");
});

Deno.test("adapters: a scale of its own for the negative image matches diffusers", async () => {
  using bb = await load();
  const c = dipsyCase(fx, "dipsy-negative-scale");
  const { first, latents } = await run(bb, c);
  using _f = first, _l = latents;
  using wantFirst = refTensor(`${c.name}.latents_step1`);
  using want = refTensor(`${c.name}.latents`);
  assertClose(`${c.name} latents after step 1`, first, wantFirst, TOL);
  assertClose(`${c.name} final latents`, latents, want, TOL);
});

Deno.test("adapters: unset settings give bit-identical output to a single shared file", async () => {
  const c = dipsyCase(fx, "dipsy");
  const lambda = c.options.adapterScale;
  await withTempDir(async (dir) => {
    // The same bytes under another name: a second adapter instance with equal weights.
    const copy = join(dir, "copy.safetensors");
    copyFileSync(PLUS, copy);
    using shared = await load();
    using same = await load(PLUS);
    using twin = await load(copy);
    assert.equal(same.modelIds.negativeIpAdapter, undefined, "the same file is loaded once");
    assert.equal(twin.modelIds.negativeIpAdapter, copy);
    const base = await run(shared, c);
    using _b1 = base.first, baseLatents = base.latents;
    using want = refTensor("dipsy.latents");
    assertClose("dipsy final latents (unset settings)", baseLatents, want, TOL);
    const ref = bytesOf(baseLatents);
    const variants: [string, Sd15Backbone, Record<string, unknown>][] = [
      ["negativeAdapterScale null", shared, { ...c.options, negativeAdapterScale: null }],
      ["negativeAdapterScale = adapterScale", shared, {
        ...c.options,
        negativeAdapterScale: lambda,
      }],
      ["negativeIpAdapter = ipAdapter", same, c.options],
      ["negativeIpAdapter = a copy of ipAdapter", twin, c.options],
    ];
    for (const [label, bb, options] of variants) {
      const r = await run(bb, c, options);
      using _f = r.first, latents = r.latents;
      assert.deepEqual(bytesOf(latents), ref, `${label}: output differs from the default's`);
      console.log(`  ${label}: bit-identical`);
    }
  });
});

Deno.test("adapters: a mismatched pair is refused naming both files, leaking nothing", async () => {
  const before = memory().handles;
  for (const [other, why] of [[BASE, "kind"], [PLUS_Q4, "token count"]]) {
    const err = await load(other).then(
      (bb) => {
        bb[Symbol.dispose]();
        return null;
      },
      (e) => e,
    );
    assert.ok(err instanceof UserError, `${why}: expected a user error, got ${err}`);
    const message = (err as Error).message;
    assert.ok(!message.includes("\n"), `${why}: one line: ${message}`);
    assert.ok(message.includes(PLUS) && message.includes(other), `${why}: ${message}`);
    console.log(`  ${why}: ${message}`);
    // The header check (before any weight is read) says the same.
    await assert.rejects(
      checkAdapterFiles({
        model: fx.model,
        ipAdapter: PLUS,
        negativeIpAdapter: other,
        imageEncoder: fx.imageEncoder,
      }),
      (e: Error) => e instanceof UserError && e.message.includes(other),
    );
  }
  assert.equal(memory().handles, before, "a refused load leaked tensor handles");
});

Deno.test("adapters: an adapter its image encoder cannot feed is refused naming both", async () => {
  await checkAdapterFiles({
    model: fx.model,
    ipAdapter: PLUS,
    negativeIpAdapter: PLUS_B,
    imageEncoder: fx.imageEncoder,
  });
  await withTempDir(async (dir) => {
    // The encoder's config alone decides (no weights are read): widen its hidden states.
    const config = JSON.parse(await Deno.readTextFile(join(fx.imageEncoder, "config.json")));
    await Deno.writeTextFile(
      join(dir, "config.json"),
      JSON.stringify({ ...config, hidden_size: config.hidden_size + 16 }),
    );
    await assert.rejects(
      checkAdapterFiles({
        model: fx.model,
        ipAdapter: PLUS,
        negativeIpAdapter: PLUS_B,
        imageEncoder: dir,
      }),
      (e: Error) => {
        console.log(`  ${e.message}`);
        return e instanceof UserError && e.message.includes(PLUS) && e.message.includes(dir);
      },
    );
  });
});

function generateConfig(data: string, out: string, sets: string[]): RunConfig {
  return resolveConfig([
    parseConfigObject({
      data,
      out,
      model: fx.model,
      ipAdapter: PLUS,
      imageEncoder: fx.imageEncoder,
      preset: "uniform-negative",
      perClass: 1,
      steps: 2,
      width: 32,
      height: 32,
      batch: 1,
      device: "cpu",
      dtype: "f32",
    }, "test"),
    parseSets(sets),
  ]);
}

Deno.test("adapters: generate records both files and scales in run.json", async () => {
  await withTempDir(async (dir) => {
    const data = join(dir, "data"), out = join(dir, "out");
    await writeTinyDataset(data);
    const config = generateConfig(data, out, [
      `negativeIpAdapter=${PLUS_B}`,
      "guidance.negativeAdapterScale=0.9",
    ]);
    assert.equal(config.negativeIpAdapter, PLUS_B);
    const code = await quietly(() => runGenerate(config, { progress: false, log: () => {} }));
    assert.equal(code, 0);
    const record = JSON.parse(await Deno.readTextFile(join(out, "run.json"))) as RunRecord;
    const models = record.output.models as Record<string, string>;
    assert.equal(models.ipAdapter, PLUS);
    assert.equal(models.negativeIpAdapter, PLUS_B);
    assert.deepEqual(record.adapters, [
      { image: "positive", file: PLUS, scale: 0.6 },
      { image: "negative", file: PLUS_B, scale: 0.9 },
    ]);
    const lines = (await Deno.readTextFile(join(out, "manifest.jsonl"))).trim().split("\n");
    for (const line of lines) {
      const entry = JSON.parse(line) as ManifestEntry;
      assert.equal(entry.models.negativeIpAdapter, PLUS_B);
    }
    console.log(`  run.json adapters: ${JSON.stringify(record.adapters)}`);

    // Unset: the record names the one file for both slots, and no negativeIpAdapter model.
    const out2 = join(dir, "out2");
    const plain = generateConfig(data, out2, []);
    assert.equal(await quietly(() => runGenerate(plain, { progress: false, log: () => {} })), 0);
    const r2 = JSON.parse(await Deno.readTextFile(join(out2, "run.json"))) as RunRecord;
    assert.equal((r2.output.models as Record<string, string>).negativeIpAdapter, undefined);
    assert.deepEqual(r2.adapters, [
      { image: "positive", file: PLUS, scale: 0.6 },
      { image: "negative", file: PLUS, scale: 0.6 },
    ]);
  });
});

Deno.test("adapters: generate refuses a mismatched pair before writing anything", async () => {
  await withTempDir(async (dir) => {
    const data = join(dir, "data"), out = join(dir, "out");
    await writeTinyDataset(data);
    const config = generateConfig(data, out, [`negativeIpAdapter=${BASE}`]);
    await assert.rejects(
      quietly(() => runGenerate(config, { progress: false, log: () => {} })),
      (e: Error) => e instanceof UserError && e.message.includes(PLUS) && e.message.includes(BASE),
    );
    assert.equal(
      await Deno.stat(out).then(() => true, () => false),
      false,
      "the refused run wrote its output folder",
    );
  });
});

Deno.test("adapters: sample takes --negative-ip-adapter and records it with the latents", async () => {
  await withTempDir(async (dir) => {
    const out = join(dir, "one.png"), latents = join(dir, "one.safetensors");
    const c = dipsyCase(fx, "dipsy-two-adapters");
    const r = c.requests[0];
    const args = parseSampleArgs([
      ...["--prompt", r.prompt, "--seed", String(r.seed), "--out", out],
      ...["--latents-out", latents, "--positive", join(fx.dir, r.positive!)],
      ...["--negative", join(fx.dir, r.negative!), "--model", fx.model],
      ...["--ip-adapter", PLUS, "--negative-ip-adapter", PLUS_B],
      ...["--image-encoder", fx.imageEncoder, "--steps", String(c.steps), "--size", "32"],
      ...["--set", "guidance.negativeAdapterScale=0.9", "--device", "cpu", "--dtype", "f32"],
    ])!;
    assert.equal(args.negativeIpAdapter, PLUS_B);
    await quietly(() => runSample(args));
    const file = SafetensorsFile.open(latents);
    assert.equal(JSON.parse(file.metadata.models).negativeIpAdapter, PLUS_B);
    // The first request of the two-file case, alone: the reference's first image.
    using got = file.load("latents", { dtype: "f32" });
    using all = refTensor(`${c.name}.latents`);
    using want = ops.narrow(all, 0, 0, 1);
    assertClose("sample --negative-ip-adapter latents", got, want, TOL);
  });
  assert.throws(
    () =>
      parseSampleArgs([
        ...["--prompt", "x", "--seed", "1", "--out", "x.png", "--tiny"],
        ...["--negative-ip-adapter", PLUS_B],
      ]),
    (e: Error) => e instanceof UserError && e.message.includes("--negative-ip-adapter"),
  );
});

serverTest(
  "adapters: the server loads the negative image's file; samples set its scale",
  async () => {
    const server = await startFromSettings(
      parseServeArgs([
        ...["--model", fx.model, "--ip-adapter", PLUS, "--negative-ip-adapter", PLUS_B],
        ...["--image-encoder", fx.imageEncoder, "--device", "cpu", "--dtype", "f32", "--port", "0"],
      ])!,
      () => {},
    );
    try {
      const client = new Client(server.url, server.port, null);
      const info = (await client.call("GET", "/v1/info")).json;
      assert.equal(info.models.negativeIpAdapter, PLUS_B);
      const c = dipsyCase(fx, "dipsy-two-adapters");
      const r = c.requests[0];
      const res = await client.call("POST", "/v1/sample", {
        body: form({
          prompt: r.prompt,
          seed: String(r.seed),
          steps: String(c.steps),
          width: "32",
          height: "32",
          positive: await Deno.readFile(join(fx.dir, r.positive!)),
          negative: await Deno.readFile(join(fx.dir, r.negative!)),
          "guidance.negativeAdapterScale": "0.9",
        }),
      });
      assert.equal(res.status, 200, JSON.stringify(res.json));
      await withTempDir(async (dir) => {
        const out = join(dir, "cli.png");
        await quietly(() =>
          runSample(
            parseSampleArgs([
              ...["--prompt", r.prompt, "--seed", String(r.seed), "--out", out],
              ...["--positive", join(fx.dir, r.positive!), "--negative", join(fx.dir, r.negative!)],
              ...["--model", fx.model, "--ip-adapter", PLUS, "--negative-ip-adapter", PLUS_B],
              ...["--image-encoder", fx.imageEncoder, "--steps", String(c.steps), "--size", "32"],
              ...[
                "--set",
                "guidance.negativeAdapterScale=0.9",
                "--device",
                "cpu",
                "--dtype",
                "f32",
              ],
            ])!,
          )
        );
        assert.deepEqual(res.bytes, await Deno.readFile(out), "server and CLI images differ");
      });
    } finally {
      await server.shutdown();
    }
  },
);
