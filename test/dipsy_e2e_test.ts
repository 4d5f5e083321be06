/**
 * End-to-end generation parity with the official DIPSY code structure. Fixtures come from
 * test/reference/dipsy_ref.py (run by `deno task test`): tiny random SD1.5 / image encoder /
 * IP-Adapter files in their real layouts, and the final latents of diffusers runs that switch two
 * IP-Adapters per UNet call with `set_ip_adapter_scale`, one image at a time. Here the same files
 * go through the real loaders and each case runs as ONE batch through `sampleLatents`.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { keep, memory, SafetensorsFile, type Tensor } from "../ffi/mod.ts";
import { readImage, type RgbImage } from "../core/image.ts";
import { type Guidance, registry, type Sampler } from "../core/plugins.ts";
import { sampleLatents, type SampleRequest } from "../core/sampling.ts";
import { Sd15Backbone } from "../plugins/sd15/backbone.ts";
import { registerDefaults } from "../plugins/defaults.ts";
import { assertClose, type DipsyCase, dipsyCase, type DipsyFixture, dipsyFixture } from "./util.ts";

registerDefaults();

const TOL = 1e-4;

/** Reference tensors `<case>.<key>` as float32 CPU tensors (caller disposes). */
function refTensor(fx: DipsyFixture, key: string): Tensor {
  const file = SafetensorsFile.open(join(fx.dir, "io.safetensors"));
  if (!file.has(key)) throw new Error(`${fx.dir}/io.safetensors has no tensor "${key}"`);
  return file.load(key, { dtype: "f32" });
}

async function requests(fx: DipsyFixture, c: DipsyCase): Promise<SampleRequest[]> {
  const cache = new Map<string, Promise<RgbImage>>();
  const image = (rel?: string) => {
    if (!rel) return null;
    if (!cache.has(rel)) cache.set(rel, readImage(join(fx.dir, rel)));
    return cache.get(rel)!;
  };
  return await Promise.all(c.requests.map(async (r) => ({
    prompt: r.prompt,
    seed: r.seed,
    positive: await image(r.positive),
    negative: await image(r.negative),
  })));
}

/** A sampler that keeps a copy of the latents after its first step (localises a mismatch). */
function recordingFirstStep(inner: Sampler): Sampler & { first: Tensor | null } {
  const rec = {
    kind: inner.kind,
    name: inner.name,
    timesteps: inner.timesteps,
    initNoiseSigma: inner.initNoiseSigma,
    first: null as Tensor | null,
    scaleModelInput: (s: Tensor, i: number) => inner.scaleModelInput(s, i),
    step(out: Tensor, i: number, sample: Tensor): Tensor {
      const next = inner.step(out, i, sample);
      // The loop frees what a step creates besides its result: keep the copy out of that scope.
      if (i === 0) rec.first = keep(next.clone());
      return next;
    },
    [Symbol.dispose]() {
      rec.first?.dispose();
      inner[Symbol.dispose]();
    },
  };
  return rec;
}

const backbones = new Map<string, Promise<Sd15Backbone>>();

function backbone(fx: DipsyFixture, ipAdapter: string | null, adapters: number) {
  const key = `${ipAdapter}:${adapters}`;
  if (!backbones.has(key)) {
    backbones.set(
      key,
      Sd15Backbone.load(
        ipAdapter && adapters > 0
          ? { model: fx.model, ipAdapter: join(fx.dir, ipAdapter), imageEncoder: fx.imageEncoder }
          : { model: fx.model },
        { adapters },
      ),
    );
  }
  return backbones.get(key)!;
}

interface RunResult {
  latents: Tensor;
  first: Tensor;
  stepHandles: number[];
}

/** Runs a case as one batch; the caller disposes the tensors. */
async function runCase(bb: Sd15Backbone, fx: DipsyFixture, c: DipsyCase): Promise<RunResult> {
  const reqs = await requests(fx, c);
  const guidance = registry.create<Guidance>("guidance", c.guidance, c.options);
  using sampler = recordingFirstStep(
    registry.create<Sampler>("sampler", c.sampler, {
      steps: c.steps,
      config: bb.schedulerConfig,
    }),
  );
  const stepHandles: number[] = [];
  const latents = sampleLatents(bb, reqs, {
    width: c.width,
    height: c.height,
    guidance,
    sampler,
    onStep: () => stepHandles.push(memory().handles),
  });
  const first = sampler.first!;
  sampler.first = null;
  return { latents, first, stepHandles };
}

async function checkCase(name: string, adapters?: number): Promise<void> {
  const fx = dipsyFixture();
  const c = dipsyCase(fx, name);
  const n = adapters ?? c.adapters;
  const bb = await backbone(fx, c.ip_adapter, n);
  console.log(
    `  ${name}: ${c.requests.length} image(s) in one batch, ${n} adapter(s), ${c.sampler}`,
  );
  {
    // A schedule mismatch would fail every later check: name it first.
    using want = refTensor(fx, `${name}.timesteps`);
    using s = registry.create<Sampler>("sampler", c.sampler, {
      steps: c.steps,
      config: bb.schedulerConfig,
    });
    assert.deepEqual(
      [...s.timesteps],
      [...want.toFloat64()],
      `${name}: ${c.sampler} timesteps from the backbone's scheduler config differ from diffusers'`,
    );
  }
  const run = await runCase(bb, fx, c);
  using latents = run.latents;
  using first = run.first;
  using wantFirst = refTensor(fx, `${name}.latents_step1`);
  using want = refTensor(fx, `${name}.latents`);
  using wantImage = refTensor(fx, `${name}.image`);
  assertClose(`${name} latents after step 1`, first, wantFirst, TOL);
  assertClose(`${name} final latents`, latents, want, TOL);
  using image = bb.decode(latents);
  assertClose(`${name} decoded image`, image, wantImage, TOL);
}

Deno.test("dipsy e2e: Eq. 9, two images with different prompts/seeds/references as one batch", async () => {
  await checkCase("dipsy");
});

Deno.test("dipsy e2e: Eq. 9 with DDIM", async () => {
  await checkCase("dipsy-ddim");
});

Deno.test("dipsy e2e: Eq. 9 with Euler", async () => {
  await checkCase("dipsy-euler");
});

Deno.test("dipsy e2e: Eq. 9 with the base (non-Plus) IP-Adapter", async () => {
  await checkCase("dipsy-base");
});

Deno.test("dipsy e2e: Eq. 8 (single IP-Adapter) on the dual-adapter model", async () => {
  // The second adapter stays attached at scale 0: it must change nothing.
  await checkCase("single-ip", 2);
});

Deno.test("dipsy e2e: Eq. 8 with one adapter attached", async () => {
  await checkCase("single-ip", 1);
});

Deno.test("dipsy e2e: text CFG without adapters", async () => {
  await checkCase("cfg");
});

Deno.test("dipsy e2e: no tensor handle growth across a full run or a denoising step", async () => {
  // Eq. 8 on the dual-adapter model: one image through DPM-Solver++ (which keeps a history), on a
  // backbone the tests above have already run, so nothing cached on first use is counted.
  const fx = dipsyFixture();
  const c = dipsyCase(fx, "single-ip");
  const bb = await backbone(fx, c.ip_adapter, 2);
  const before = memory().handles;
  const run = await runCase(bb, fx, c);
  run.latents.dispose();
  run.first.dispose();
  assert.equal(memory().handles, before, "handles leaked by a full sampleLatents run");
  // Between steps the live set is the latents plus the sampler's history, which is full once the
  // multistep solver holds `solver_order` (2) outputs; from then on a step must add nothing.
  const steady = run.stepHandles.slice(1);
  assert.ok(
    steady.every((h) => h === steady[0]),
    `handles grew across denoising steps: ${run.stepHandles.join(", ")}`,
  );
  console.log(`  live handles after each step: ${run.stepHandles.join(", ")}`);
});

Deno.test({
  name: "dipsy e2e: release the loaded models",
  fn: async () => {
    for (const p of backbones.values()) (await p)[Symbol.dispose]();
    backbones.clear();
  },
});
