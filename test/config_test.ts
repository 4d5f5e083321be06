/**
 * Run configuration: layering (defaults < preset < file < flags), presets for every ablation row,
 * JSON and YAML files, --set overrides, validation that reports every problem at once, plugin
 * files, and shard selection from flags and cluster environments.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  ConfigError,
  configFieldDocs,
  DEFAULTS,
  formatConfig,
  loadPluginFile,
  parseConfigObject,
  parseSets,
  PRESETS,
  readConfigFile,
  resolveConfig,
  resolveRun,
  RUN_FIELDS,
  type RunConfig,
  similarityClip,
} from "../core/config.ts";
import { type Guidance, type PluginKind, Registry, registry } from "../core/plugins.ts";
import { formatDuration, formatRate, Progress } from "../core/progress.ts";
import { NO_SHARD, planChunks, resolveShard, RunError, shardChunks } from "../core/generate.ts";
import { closest } from "../core/suggest.ts";
import { registerDefaults } from "../plugins/defaults.ts";
import { withTempDir } from "./util.ts";

registerDefaults();

const flags = (raw: Record<string, unknown>) =>
  parseConfigObject(raw, "command line", { textual: true });

Deno.test("defaults are the DIPSY paper's setting", () => {
  const c = resolveConfig([]);
  assert.equal(c.preset, "dipsy");
  assert.equal(c.guidance.name, "dipsy");
  assert.equal(c.pairs.name, "class-similarity");
  assert.deepEqual(c.pairs.options, { augment: true });
  assert.equal(c.sampler.name, "dpm-solver++");
  assert.equal(c.steps, 50);
  assert.equal(c.perClass, 200);
  assert.equal(c.prompt, null);
  assert.equal(similarityClip(c), "openai/clip-vit-base-patch16@refs/pr/10");
  assert.equal(similarityClip({ ...c, model: "tiny" }), "tiny");
});

Deno.test("every preset resolves, and the ablation rows set what they name", () => {
  const expect: Record<string, [string, string, boolean, string | null]> = {
    dipsy: ["dipsy", "class-similarity", true, null],
    "no-negative": ["single-ip", "none", true, null],
    "uniform-negative": ["dipsy", "uniform", true, null],
    "no-augment": ["dipsy", "class-similarity", false, null],
    "no-negative-no-augment": ["single-ip", "none", false, null],
    "uniform-no-augment": ["dipsy", "uniform", false, null],
    sd15: ["cfg", "none", false, null],
    "empty-prompt": ["dipsy", "class-similarity", true, ""],
    "single-ip": ["single-ip", "none", true, null],
  };
  assert.deepEqual(Object.keys(PRESETS).sort(), Object.keys(expect).sort());
  for (const [name, [guidance, pairs, augment, prompt]] of Object.entries(expect)) {
    const c = resolveConfig([flags({ preset: name })]);
    assert.equal(c.guidance.name, guidance, name);
    assert.equal(c.pairs.name, pairs, name);
    assert.equal(c.pairs.options.augment, augment, name);
    assert.equal(c.prompt, prompt, name);
  }
});

Deno.test("later layers win; flags are parsed from text", () => {
  const file = parseConfigObject(
    { preset: "no-augment", steps: 30, guidance: { name: "dipsy", negativeScale: 4 } },
    "file",
  );
  const c = resolveConfig([file, flags({ steps: "12", seed: "5", skipBad: "true" })]);
  assert.equal(c.steps, 12);
  assert.equal(c.seed, 5);
  assert.equal(c.skipBad, true);
  assert.equal(c.guidance.options.negativeScale, 4);
  assert.equal(c.pairs.options.augment, false, "the file's preset still applies");
  // A flag preset replaces the file's preset, but the file's own values stay.
  const d = resolveConfig([file, flags({ preset: "uniform-negative" })]);
  assert.equal(d.pairs.name, "uniform");
  assert.equal(d.steps, 30);
});

Deno.test("switching plugins keeps only the options the new one declares", () => {
  const c = resolveConfig([
    parseConfigObject({ guidance: { textScale: 3, negativeScale: 2 } }, "file"),
    flags({ guidance: "single-ip" }),
  ]);
  assert.equal(c.guidance.name, "single-ip");
  assert.deepEqual(c.guidance.options, { textScale: 3 });
  const d = resolveConfig([parseSets(["pairs.augment=false", "pairs.name=uniform"])]);
  assert.deepEqual(d.pairs, { name: "uniform", options: { augment: false } });
});

Deno.test("--set reads YAML scalars and dotted plugin options", () => {
  const c = resolveConfig([
    parseSets([
      "steps=7",
      "guidance.negativeScale=4.5",
      "guidance.interval=[0.2, 0.8]",
      "sampler.name=ddim",
      "prompt=A photo of a {class}, detailed",
    ]),
  ]);
  assert.equal(c.steps, 7);
  assert.equal(c.guidance.options.negativeScale, 4.5);
  assert.deepEqual(c.guidance.options.interval, [0.2, 0.8]);
  assert.equal(c.sampler.name, "ddim");
  assert.equal(c.prompt, "A photo of a {c}, detailed", "{class} is accepted for {c}");
  assert.throws(() => parseSets(["steps"]), /key=value/);
  assert.throws(() => parseSets(["seed.x=1"]), /dotted/);
});

Deno.test("a misspelt plugin option is refused, naming the valid ones", () => {
  for (
    const set of ["guidance.negativScale=4", "sampler.timestep_spacin=trailing", "pairs.agment=0"]
  ) {
    assert.throws(
      () => resolveConfig([parseSets([set])]),
      (e: unknown) => e instanceof ConfigError && /plugin "[^"]+": unknown option/.test(e.message),
      set,
    );
  }
  assert.throws(
    () => resolveConfig([parseSets(["guidance.negativScale=4"])]),
    /guidance plugin "dipsy": unknown option "negativScale" \(did you mean negativeScale\? options: .*positiveScale/,
  );
  assert.throws(
    () => resolveConfig([parseConfigObject({ guidance: { name: "cfg", positiveScale: 2 } }, "f")]),
    /guidance plugin "cfg": unknown option "positiveScale" \(options: textScale\)/,
  );
});

const KINDS: readonly PluginKind[] = ["guidance", "sampler", "pairs", "classifier"];
const escape = (t: string) => t.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/** `key` with one letter dropped (or one added), spelt so that it suggests `key` alone. */
function typo(key: string, known: readonly string[]): string {
  const tries = [...Array.from(key, (_, i) => key.slice(0, i) + key.slice(i + 1)), `${key}x`];
  const t = tries.find((t) => !known.includes(t) && closest(t, known) === key);
  assert.ok(t, `no unambiguous typo of ${key}`);
  return t;
}

Deno.test("a typo in any option of every registered plugin is refused, naming the valid keys", () => {
  let checked = 0;
  for (const kind of KINDS) {
    assert.ok(registry.list(kind).length > 0, `no ${kind} plugin registered`);
    for (const def of registry.list(kind)) {
      const keys = Object.keys(def.schema.shape);
      for (const key of keys) {
        const bad = typo(key, keys);
        const want = new RegExp(
          `${kind} plugin "${escape(def.name)}": unknown option "${escape(bad)}" ` +
            `\\(did you mean ${escape(key)}\\? options: ${escape(keys.join(", "))}\\)`,
        );
        const label = `${kind} ${def.name} ${bad}`;
        assert.throws(() => registry.resolve(kind, def.name, { [bad]: 1 }), want, label);
        assert.throws(() => registry.create(kind, def.name, { [bad]: 1 }), want, label);
        if (kind === "classifier") continue;
        const file = parseConfigObject({ [kind]: { name: def.name, [bad]: 1 } }, "config file f");
        assert.throws(
          () => resolveConfig([file]),
          (e: unknown) => e instanceof ConfigError && want.test(e.message),
          label,
        );
        const sets = parseSets([`${kind}.name=${def.name}`, `${kind}.${bad}=1`]);
        assert.throws(() => resolveConfig([sets]), want, label);
        checked++;
      }
    }
  }
  assert.ok(checked > 20, `only ${checked} options checked`);
});

Deno.test("a typo in any configuration key is refused, naming the valid keys", async () => {
  const keys = [...Object.keys(RUN_FIELDS.shape), "guidance", "sampler", "pairs", "plugins"];
  await withTempDir(async (dir) => {
    for (const key of keys) {
      const bad = typo(key, keys);
      const want = `unknown setting "${bad}" (did you mean ${key}? settings: ${keys.join(", ")})`;
      const file = join(dir, "config.yaml");
      await Deno.writeTextFile(file, `${bad}: 1\n`);
      await assert.rejects(
        () => readConfigFile(file),
        (e: unknown) =>
          e instanceof ConfigError && e.message.includes(want) && e.message.includes(file),
        key,
      );
      assert.throws(() => parseSets([`${bad}=1`]), (e: unknown) => String(e).includes(want), key);
    }
  });
});

Deno.test("a printed configuration reads back as the same run, for every preset", async () => {
  await withTempDir(async (dir) => {
    for (const preset of Object.keys(PRESETS)) {
      const config = resolveConfig([
        flags({ preset, data: "shots", steps: "30", seed: "7" }),
        parseSets(["guidance.textScale=5", "sampler.timestep_spacing=trailing", "shots=2"]),
      ]);
      const file = join(dir, `${preset}.yaml`);
      await Deno.writeTextFile(file, formatConfig(config));
      const again: RunConfig = resolveConfig([await readConfigFile(file)]);
      assert.deepEqual(again, config, preset);
      assert.deepEqual(resolveRun(again).records, resolveRun(config).records, preset);
      assert.equal(resolveRun(again).records.guidance.textScale, 5, preset);
    }
  });
});

Deno.test("resolved defaults are the documented ones; records hold resolved settings", () => {
  for (const kind of KINDS) {
    for (const def of registry.list(kind)) {
      const documented = Object.fromEntries(
        registry.docs(kind, def.name).filter((d) => "default" in d).map((d) => [d.name, d.default]),
      );
      assert.deepEqual(registry.resolve(kind, def.name, {}), documented, `${kind} ${def.name}`);
    }
  }
  const docs = configFieldDocs();
  assert.deepEqual(docs.map((d) => d.name), Object.keys(RUN_FIELDS.shape));
  for (const d of docs) {
    assert.ok(d.description, `${d.name} has a description`);
    assert.deepEqual(DEFAULTS[d.name as keyof RunConfig], d.default, d.name);
  }
  const run = resolveRun(resolveConfig([parseSets(["guidance.negativeScale=4"])]));
  assert.deepEqual(run.records.guidance, {
    ...registry.resolve("guidance", "dipsy", {}),
    name: "dipsy",
    negativeScale: 4,
  });
  assert.deepEqual(run.records.sampler, { name: "dpm-solver++", steps: 50 });
  const { name: _, ...settings } = run.records.guidance;
  assert.deepEqual(run.guidance.settings, settings, "the plugin carries what is recorded");
  // A configuration put together by hand cannot smuggle a misspelt key into a record.
  const bad = { ...DEFAULTS, guidance: { name: "dipsy", options: { negativScale: 4 } } };
  assert.throws(() => resolveRun(bad), /unknown option "negativScale"/);
});

Deno.test("negativeAdapterScale: the negative image's lambda, null meaning adapterScale", () => {
  const dipsy = registry.create<Guidance>("guidance", "dipsy");
  assert.equal(dipsy.negativeAdapterScale, null);
  const set = registry.create<Guidance>("guidance", "dipsy", { negativeAdapterScale: 0.3 });
  assert.equal(set.negativeAdapterScale, 0.3);
  assert.equal(set.adapterScale, registry.resolve("guidance", "dipsy", {}).adapterScale);
  assert.throws(
    () => registry.create("guidance", "dipsy", { negativeAdapterScale: -1 }),
    /option "negativeAdapterScale" must be at least 0/,
  );
  for (const def of registry.list("guidance")) {
    const g = registry.create<Guidance>("guidance", def.name);
    assert.equal(
      "negativeAdapterScale" in def.schema.shape,
      g.usesNegative,
      `${def.name}: the option exactly where a negative image is used`,
    );
  }
});

Deno.test("problems are reported together, with hints", () => {
  try {
    parseConfigObject(
      { stepz: 3, perClass: -1, batch: 1.5, dtype: "f64", guidance: 5, skipBad: "yes" },
      "config file x.yaml",
    );
    assert.fail("no error");
  } catch (e) {
    assert.ok(e instanceof ConfigError);
    assert.equal(e.problems.length, 6, e.message);
    assert.match(e.message, /unknown setting "stepz" \(did you mean steps\? settings: preset, /);
    assert.match(e.message, /"perClass" must be at least 1/);
    assert.match(e.message, /"batch" must be an integer/);
    assert.match(e.message, /"dtype" must be one of auto, f32, f16, bf16; got "f64"/);
    assert.match(e.message, /config file x.yaml/);
  }
  assert.throws(
    () => resolveConfig([flags({ guidance: "dipsi", sampler: "dpm" })]),
    (e: unknown) =>
      e instanceof ConfigError && e.problems.length === 2 &&
      /unknown guidance plugin "dipsi"/.test(e.message) && /available: .*cfg/.test(e.message),
  );
  assert.throws(() => resolveConfig([flags({ preset: "nope" })]), /unknown preset "nope"/);
  assert.throws(() => resolveConfig([flags({ prompt: "a photo" })]), /has no \{c\}/);
  assert.throws(() => resolveConfig([flags({ width: "64" })]), /both width and height/);
});

Deno.test("JSON and YAML files, paths relative to the file", async () => {
  await withTempDir(async (dir) => {
    await Deno.writeTextFile(
      join(dir, "run.yaml"),
      [
        "preset: sd15",
        "data: ./shots",
        "out: out",
        "model: ./models/sd15",
        "clip: openai/clip-vit-base-patch16",
        "sampler: ddim",
        "guidance: { name: cfg, textScale: 5 }",
        "perClass: 10",
        "prompt: 'A photo of a {class}'",
      ].join("\n"),
    );
    const y = resolveConfig([await readConfigFile(join(dir, "run.yaml"))]);
    assert.equal(y.data, join(dir, "shots"));
    assert.equal(y.out, join(dir, "out"));
    assert.equal(y.model, join(dir, "models/sd15"));
    assert.equal(y.clip, "openai/clip-vit-base-patch16", "Hub ids stay as they are");
    assert.deepEqual(y.guidance, { name: "cfg", options: { textScale: 5 } });
    assert.equal(y.sampler.name, "ddim");
    assert.equal(y.prompt, "A photo of a {c}");

    await Deno.writeTextFile(join(dir, "run.json"), JSON.stringify({ steps: 3, seed: 9 }));
    const j = resolveConfig([await readConfigFile(join(dir, "run.json"))]);
    assert.equal(j.steps, 3);
    assert.equal(j.seed, 9);

    await Deno.writeTextFile(join(dir, "bad.json"), "{ steps: 3 ");
    await assert.rejects(() => readConfigFile(join(dir, "bad.json")), /not valid JSON/);

    // --print-config output loads back to the same configuration.
    await Deno.writeTextFile(join(dir, "printed.yaml"), formatConfig(y));
    const again = resolveConfig([await readConfigFile(join(dir, "printed.yaml"))]);
    assert.deepEqual(again, y);
  });
});

Deno.test("plugin files: exported or self-registered plugins; clear errors", async () => {
  const reg = new Registry();
  await withTempDir(async (dir) => {
    const exported = join(dir, "exported.ts");
    await Deno.writeTextFile(
      exported,
      `import * as s from "${new URL("../core/schema.ts", import.meta.url).href}";\n` +
        `export const plugins = [{ kind: "pairs", name: "mine", description: "test", ` +
        `schema: s.options({ k: s.integer({ default: 1 }) }), create: () => ({ kind: "pairs", ` +
        `name: "mine", needsSimilarity: false, choose() { throw new Error("x"); } }) }];\n`,
    );
    const added = await loadPluginFile(exported, reg);
    assert.deepEqual(added.map((d) => `${d.kind}:${d.name}`), ["pairs:mine"]);
    assert.ok(reg.has("pairs", "mine"));
    assert.deepEqual(await loadPluginFile(exported, reg), added, "loading twice is harmless");

    const empty = join(dir, "empty.ts");
    await Deno.writeTextFile(empty, "export const x = 1;\n");
    await assert.rejects(() => loadPluginFile(empty, reg), /added no plugin/);
    await assert.rejects(() => loadPluginFile(join(dir, "missing.ts"), reg), /does not exist/);
    const broken = join(dir, "broken.ts");
    await Deno.writeTextFile(broken, "export const plugins = [{ kind: 'x' }];\n");
    await assert.rejects(() => loadPluginFile(broken, reg), /every entry of "plugins"/);
    const unchecked = join(dir, "unchecked.ts");
    await Deno.writeTextFile(
      unchecked,
      `export const plugins = [{ kind: "pairs", name: "old", description: "no schema", ` +
        `options: {}, create: () => ({}) }];\n`,
    );
    await assert.rejects(
      () => loadPluginFile(unchecked, reg),
      (e: unknown) => e instanceof ConfigError && /unchecked\.ts: .*schema/.test(e.message),
    );
    assert.deepEqual(reg.resolve("pairs", "mine", {}), { k: 1 });
  });
});

Deno.test("shards: flag, Slurm arrays, Kubernetes indexed jobs", () => {
  assert.deepEqual(resolveShard(undefined, undefined, {}), NO_SHARD);
  assert.deepEqual(resolveShard("1/4", undefined, {}), { index: 1, count: 4, source: "--shard" });
  assert.throws(() => resolveShard("4/4", undefined, {}), RunError);
  assert.throws(() => resolveShard("1-4", undefined, {}), /i\/n/);
  const slurm = {
    SLURM_ARRAY_TASK_ID: "3",
    SLURM_ARRAY_TASK_COUNT: "3",
    SLURM_ARRAY_TASK_MIN: "1",
  };
  assert.deepEqual(resolveShard(undefined, undefined, slurm), {
    index: 2,
    count: 3,
    source: "SLURM_ARRAY_TASK_ID",
  });
  assert.equal(resolveShard("0/2", undefined, slurm).source, "--shard", "the flag wins");
  assert.throws(() => resolveShard(undefined, undefined, { JOB_COMPLETION_INDEX: "1" }), /count/);
  assert.deepEqual(resolveShard(undefined, 4, { JOB_COMPLETION_INDEX: "1" }).index, 1);
  assert.deepEqual(
    resolveShard(undefined, undefined, { JOB_COMPLETION_INDEX: "2", DIPSY_SHARD_COUNT: "3" }),
    { index: 2, count: 3, source: "JOB_COMPLETION_INDEX" },
  );
});

Deno.test("fixed batches per class; shards partition them", () => {
  const chunks = planChunks(3, 5, 2);
  assert.deepEqual(
    chunks.map((c) => [c.classIndex, c.start, c.size]),
    [[0, 0, 2], [0, 2, 2], [0, 4, 1], [1, 0, 2], [1, 2, 2], [1, 4, 1], [2, 0, 2], [2, 2, 2], [
      2,
      4,
      1,
    ]],
  );
  for (const n of [1, 2, 3, 4]) {
    const parts = Array.from(
      { length: n },
      (_, i) => shardChunks(chunks, { ...NO_SHARD, index: i, count: n }),
    );
    const ids = parts.flat().map((c) => c.id).sort((a, b) => a - b);
    assert.deepEqual(ids, chunks.map((c) => c.id), `${n} shards cover every batch once`);
  }
  assert.equal(DEFAULTS.batch, 4);
});

Deno.test("progress: counts, rate and ETA; plain lines when not a terminal", () => {
  let now = 0;
  const out: string[] = [];
  const p = new Progress(10, {
    unit: "images",
    label: "generate",
    tty: false,
    interval: 5,
    write: (t) => out.push(t),
    now: () => now,
  });
  p.update(0);
  now = 2000;
  p.update(4, "step 3/50");
  assert.equal(p.line(), "generate 4/10 images  2.00 images/s  ETA 3s  step 3/50");
  now = 6000;
  p.update(5);
  p.finish();
  assert.deepEqual(out, [
    "generate 0/10 images  - images/s  ETA ?\n",
    "generate 5/10 images  0.83 images/s  ETA 6s\n",
    "generate 5/10 images  0.83 images/s  ETA 6s\n",
  ]);
  assert.equal(formatDuration(3725), "1h02m");
  assert.equal(formatDuration(65), "1m05s");
  assert.equal(formatRate(0.05, "images"), "20.0 s/image");
  // Reaching the total prints nothing more: finish() prints the last line once.
  const last: string[] = [];
  const r = new Progress(2, { tty: false, write: (t) => last.push(t), now: () => now });
  r.update(2);
  r.finish();
  assert.equal(last.length, 1);
  assert.match(last[0], /^2\/2 items .* took/);
  const tty: string[] = [];
  const q = new Progress(2, { tty: true, write: (t) => tty.push(t), now: () => now });
  q.update(1);
  q.finish();
  assert.ok(tty[0].startsWith("\r\x1b[2K") && tty.at(-1)!.endsWith("\n"));
});
