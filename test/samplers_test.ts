/**
 * Sampler parity with diffusers 0.42 (fixtures from test/reference/samplers_ref.py): noise
 * schedules and timesteps bit for bit, every step of 50/25/10-step trajectories within 1e-5 (fed
 * diffusers' own inputs, and chained on our own outputs), DDIM's variance noise drawn in
 * diffusers' order, add_noise, the from_config resolution of the SD1.5 config, and config errors.
 */
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { registry, type Sampler, type SchedulerConfig } from "../core/plugins.ts";
import { Generator, memory, ops, SafetensorsFile, scope, type Tensor } from "../ffi/mod.ts";
import { registerDefaults } from "../plugins/defaults.ts";
import {
  DDIM_KEYS,
  DEFAULT_SAMPLER,
  type DpmSolverSampler,
  type EulerSampler,
  readSchedulerConfig,
  SD15_SCHEDULER_CONFIG,
} from "../plugins/samplers/mod.ts";
import {
  noiseSchedule,
  parseSchedulerConfig,
  resolveConfig,
  type ScheduleConfig,
} from "../plugins/samplers/schedule.ts";
import { fixture, maxAbsError, noLeak, withTempDirSync } from "./util.ts";

registerDefaults();

const TOL = 1e-5;
const PLUGIN = { ddim: "ddim", euler: "euler", dpm: "dpm-solver++" } as const;
type Family = keyof typeof PLUGIN;

interface Trajectory {
  name: string;
  sampler: Family;
  steps: number;
  options: Record<string, unknown>;
  eta: number;
  seed: number | null;
  dtype: "float32" | "float16";
  shape: number[];
  timesteps: number[];
  init_noise_sigma: number;
}

interface Cases {
  versions: Record<string, string>;
  from_config: {
    config: Record<string, unknown>;
    pipeline_config_spacing: string;
    pndm_spacing: string;
    timesteps_50: number[];
    ddim_spacing: string;
    euler_spacing: string;
  };
  schedules: { name: string; config: Record<string, unknown> }[];
  timesteps: {
    sampler: Family;
    steps: number;
    config: Record<string, unknown>;
    timesteps: number[];
    sigmas?: number[];
    init_noise_sigma?: number;
  }[];
  trajectories: Trajectory[];
  add_noise: { sampler: Family; steps: number; index: number }[];
}

let loaded: { cases: Cases; file: SafetensorsFile; config: SchedulerConfig } | undefined;
function load() {
  if (loaded) return loaded;
  const dir = fixture("samplers", "cases.json");
  loaded = {
    cases: JSON.parse(Deno.readTextFileSync(join(dir, "cases.json"))),
    file: SafetensorsFile.open(join(dir, "tensors.safetensors")),
    // The real on-disk layout: a model folder holding scheduler/scheduler_config.json.
    config: readSchedulerConfig(join(dir, "sd15")),
  };
  return loaded;
}

function create(family: Family, steps: number, extra: Record<string, unknown> = {}): Sampler {
  return registry.create<Sampler>("sampler", PLUGIN[family], {
    steps,
    config: load().config,
    ...extra,
  });
}

function host(key: string): Float32Array {
  using t = load().file.load(key);
  return t.toHost() as Float32Array;
}

/** Max abs difference and the reference's max magnitude (same dtype and shape). */
function diff(got: Tensor, want: Tensor): { err: number; scale: number } {
  assert.equal(got.dtype, want.dtype);
  return maxAbsError(got, want);
}

class Worst {
  err = 0;
  scale = 1;
  where = "";
  add(d: { err: number; scale: number }, where: string): void {
    if (!this.where || d.err / Math.max(1, d.scale) > this.err / Math.max(1, this.scale)) {
      Object.assign(this, { err: d.err, scale: d.scale, where });
    }
  }
  check(label: string): void {
    console.log(
      `  ${label}: max abs err ${this.err.toExponential(2)} (scale ${
        this.scale.toFixed(2)
      }, ${this.where})`,
    );
    assert.ok(this.err <= TOL * Math.max(1, this.scale), `${label}: ${this.err} at ${this.where}`);
  }
}

// ---------------------------------------------------------------------------------------------

Deno.test("samplers: the SD1.5 config resolves as DPMSolverMultistepScheduler.from_config", () => {
  const { cases, config } = load();
  const fc = cases.from_config;
  assert.equal(fc.config.timestep_spacing, "linspace");
  assert.equal(fc.pipeline_config_spacing, "linspace");
  assert.equal(DEFAULT_SAMPLER, "dpm-solver++");
  for (const cfg of [config, SD15_SCHEDULER_CONFIG]) {
    using dpm = registry.create<DpmSolverSampler>("sampler", DEFAULT_SAMPLER, {
      steps: 50,
      config: cfg,
    });
    assert.deepEqual([...dpm.timesteps], fc.timesteps_50);
    for (const [k, v] of Object.entries(fc.config)) {
      if (k in dpm.config) assert.deepEqual((dpm.config as Record<string, unknown>)[k], v, k);
    }
    using ddim = registry.create<Sampler & { config: ScheduleConfig }>("sampler", "ddim", {
      steps: 50,
      config: cfg,
    });
    assert.equal(ddim.config.timestep_spacing, fc.ddim_spacing);
    using euler = registry.create<EulerSampler>("sampler", "euler", { steps: 50, config: cfg });
    assert.equal(euler.config.timestep_spacing, fc.euler_spacing);
  }
  // A key written in the file wins over the class default, as in diffusers.
  using leading = registry.create<DpmSolverSampler>("sampler", "dpm-solver++", {
    steps: 10,
    config: parseSchedulerConfig({
      ...config,
      _use_default_values: [],
      timestep_spacing: "leading",
    }),
  });
  assert.equal(leading.config.timestep_spacing, "leading");
});

Deno.test("samplers: noise schedules are bit-identical to diffusers' float32 ones", () => {
  const { cases, config } = load();
  for (const s of cases.schedules) {
    const { config: c } = resolveConfig<ScheduleConfig>(
      { steps: 1, config, ...s.config },
      DDIM_KEYS,
    );
    const { betas, alphasCumprod } = noiseSchedule(c);
    assert.deepEqual(betas, host(`schedule.${s.name}.betas`), `${s.name} betas`);
    assert.deepEqual(alphasCumprod, host(`schedule.${s.name}.alphas_cumprod`), s.name);
  }
});

Deno.test("samplers: timesteps, sigmas and initNoiseSigma equal diffusers' for every spacing", () => {
  const { cases } = load();
  let n = 0;
  for (const e of cases.timesteps) {
    const label = `${e.sampler} ${JSON.stringify(e.config)} steps ${e.steps}`;
    using s = create(e.sampler, e.steps, e.config);
    assert.deepEqual([...s.timesteps], e.timesteps, label);
    if (e.sigmas) assert.deepEqual([...(s as EulerSampler).sigmas], e.sigmas, label);
    if (e.init_noise_sigma !== undefined) assert.equal(s.initNoiseSigma, e.init_noise_sigma, label);
    n++;
  }
  console.log(`  ${n} schedules identical`);
});

function runTrajectory(c: Trajectory, chained: boolean, worst: Worst): void {
  const { file } = load();
  const gen = c.seed === null ? undefined : new Generator(c.seed);
  using s = create(c.sampler, c.steps, { ...c.options, ...(c.eta ? { eta: c.eta } : {}) });
  assert.deepEqual([...s.timesteps], c.timesteps);
  assert.equal(s.initNoiseSigma, c.init_noise_sigma);
  let x: Tensor = file.load(`${c.name}.sample_in.0`);
  for (let i = 0; i < s.timesteps.length; i++) {
    scope(() => {
      const input = chained ? x : file.load(`${c.name}.sample_in.${i}`);
      const scaled = s.scaleModelInput(input, i);
      worst.add(diff(scaled, file.load(`${c.name}.scaled.${i}`)), `scaled ${i}`);
      const out = s.step(file.load(`${c.name}.model_output.${i}`), i, input, gen);
      worst.add(diff(out, file.load(`${c.name}.sample_out.${i}`)), `step ${i}`);
      if (chained) {
        x.dispose();
        x = out;
        return out;
      }
    });
  }
  x.dispose();
  gen?.dispose();
}

const TRAJECTORIES = [
  "dpm50",
  "dpm25",
  "dpm10",
  "ddim50",
  "ddim25",
  "ddim10",
  "ddim50_eta1",
  "ddim25_eta1",
  "ddim10_eta1",
  "euler50",
  "euler25",
  "euler10",
  "dpm_v",
  "dpm_order3",
  "dpm_order3_20",
  "dpm_heun_leading",
  "dpm_sigma_min",
  "dpm_euler_final_cosine",
  "ddim_v_clip_one",
  "ddim_sample_trailing_eta",
  "ddim_linspace",
  "euler_v",
  "euler_leading",
  "euler_trailing_linear",
  "dpm10_f16",
  "ddim10_eta1_f16",
  "euler10_f16",
];

for (const name of TRAJECTORIES) {
  Deno.test(`samplers: ${name} matches diffusers step by step, frees its history`, () => {
    const c = load().cases.trajectories.find((t) => t.name === name);
    if (!c) throw new Error(`no trajectory ${name} in the fixture: rerun samplers_ref.py`);
    // Warm-up outside the leak check: first calls may create lasting library state.
    runTrajectory(c, false, new Worst());
    const fed = new Worst(), chained = new Worst();
    noLeak(name, () => {
      runTrajectory(c, false, fed);
      runTrajectory(c, true, chained);
    });
    fed.check(`${name} fed diffusers' inputs`);
    chained.check(`${name} chained`);
  });
}

Deno.test("samplers: addNoise matches diffusers' add_noise", () => {
  const { cases, file } = load();
  for (const a of cases.add_noise) {
    using s = create(a.sampler, a.steps) as Sampler & {
      addNoise(x: Tensor, n: Tensor, i: number): Tensor;
    };
    const worst = new Worst();
    scope(() => {
      const got = s.addNoise(
        file.load(`add_noise.${a.sampler}.original`),
        file.load(`add_noise.${a.sampler}.noise`),
        a.index,
      );
      worst.add(diff(got, file.load(`add_noise.${a.sampler}.noisy`)), `index ${a.index}`);
    });
    worst.check(`${a.sampler} add_noise`);
  }
});

Deno.test("samplers: DPM-Solver++ owns its history: order enforced, freed on dispose", () => {
  const before = memory().handles;
  const s = create("dpm", 10);
  scope(() => {
    const x = ops.randn([1, 4, 4, 4], "f32", "cpu", null);
    const eps = ops.randn([1, 4, 4, 4], "f32", "cpu", null);
    s.step(eps, 0, x);
    s.step(eps, 1, x);
    assert.throws(() => s.step(eps, 3, x), /expected step 2/);
  });
  assert.equal(memory().handles, before + 2, "two data predictions held for a second-order step");
  s[Symbol.dispose]();
  assert.equal(memory().handles, before);
  assert.throws(
    () => scope(() => s.step(ops.zeros([1], "f32", "cpu"), 2, ops.zeros([1], "f32", "cpu"))),
    /after dispose/,
  );
});

Deno.test("samplers: unsupported configs and options fail with the key named", () => {
  const { config } = load();
  const cases: [Family, Record<string, unknown>, RegExp][] = [
    [
      "ddim",
      { beta_schedule: "sigmoid" },
      /"beta_schedule" must be one of linear, scaled_linear, squaredcos_cap_v2; got "sigmoid"/,
    ],
    [
      "ddim",
      { thresholding: true },
      /"thresholding" must be false \(the only value supported\), got true/,
    ],
    ["dpm", { algorithm_type: "sde-dpmsolver++" }, /algorithm_type/],
    ["dpm", { use_karras_sigmas: true }, /use_karras_sigmas/],
    ["dpm", { solver_order: 4 }, /solver_order/],
    ["euler", { interpolation_type: "log_linear" }, /interpolation_type/],
    ["euler", { timestep_spacing: "uniform" }, /timestep_spacing/],
    ["ddim", { steps: 1001 }, /"steps" must be an integer from 1 to num_train_timesteps \(1000\)/],
    ["ddim", { steps: 0 }, /"steps"/],
    ["ddim", { eta: -1 }, /"eta"/],
    ["euler", { eta: 1 }, /unknown option "eta"/],
    ["dpm", { timestepSpacing: "linspace" }, /unknown option "timestepSpacing"/],
    ["ddim", { steps_offset: 0.5 }, /steps_offset" must be an integer/],
    ["ddim", { trained_betas: [0.1, 0.2] }, /trained_betas" has 2 values/],
  ];
  for (const [family, extra, re] of cases) {
    assert.throws(
      () => registry.create("sampler", PLUGIN[family], { steps: 10, config, ...extra }),
      (e: Error) => re.test(e.message) && e.message.includes(`sampler plugin "${PLUGIN[family]}"`),
      `${family} ${JSON.stringify(extra)}`,
    );
  }
  // diffusers accepts these timesteps but fails at the step (alphas_cumprod[1000]).
  using past = create("ddim", 1000, { timestep_spacing: "leading", steps_offset: 1 });
  assert.equal(past.timesteps[0], 1000);
  assert.throws(
    () => past.step(ops.zeros([1], "f32", "cpu"), 0, ops.zeros([1], "f32", "cpu")),
    /timestep 1000 is outside/,
  );
  // A bad value in the file names the file.
  const bad = parseSchedulerConfig(
    { ...config, _use_default_values: [], beta_schedule: "cosine" },
    "x/scheduler_config.json",
  );
  assert.throws(
    () => registry.create("sampler", "ddim", { steps: 10, config: bad }),
    /x\/scheduler_config\.json: "beta_schedule" must be one of .*; got "cosine"/,
  );
  assert.throws(
    () => registry.create("sampler", "heun", { steps: 10, config }),
    /available: .*dpm-solver\+\+/,
  );
});

Deno.test("samplers: readSchedulerConfig takes a file or folder, Python's -Infinity, and names errors", () => {
  withTempDirSync((dir) => {
    const file = join(dir, "scheduler_config.json");
    writeFileSync(
      file,
      '{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity, ' +
        '"beta_schedule": "scaled_linear", "timestep_spacing": "trailing", "solver_order": 3}',
    );
    for (const p of [file, dir]) {
      const cfg = readSchedulerConfig(p);
      assert.equal(cfg.lambda_min_clipped, -Infinity);
      using s = registry.create<DpmSolverSampler>("sampler", "dpm-solver++", {
        steps: 4,
        config: cfg,
      });
      assert.equal(s.config.solver_order, 3);
      assert.equal(s.config.timestep_spacing, "trailing");
      // Keys absent from the file take the class defaults.
      assert.equal(s.config.steps_offset, 0);
    }
    writeFileSync(file, '{"beta_schedule": ');
    assert.throws(() => readSchedulerConfig(file), /scheduler_config\.json: not valid JSON/);
    assert.throws(() => readSchedulerConfig(join(dir, "nope")), /cannot read the scheduler config/);
  });
});
