/**
 * What every JSON record says about what made it (version, commit, libtorch, the device and
 * dtype that ran, plugin digests), that a newer checkout still resumes an older run, that a
 * second test set does not overwrite the first one's results, and the warm-up warning.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { main } from "../cli/main.ts";
import { drawDataset } from "../cli/demo.ts";
import { runtimeInfo } from "../ffi/mod.ts";
import project from "../deno.json" with { type: "json" };
import { TINY_TRAIN_FLAGS, tinyRunArgs, withOutput, withTempDir } from "./util.ts";

const readJson = (file: string) => JSON.parse(readFileSync(file, "utf8"));

function checkoutCommit(): string {
  try {
    return execFileSync("git", ["rev-parse", "HEAD"], {
      cwd: new URL("..", import.meta.url).pathname,
      encoding: "utf8",
      stdio: ["ignore", "pipe", "ignore"],
    }).trim();
  } catch {
    return "unknown";
  }
}

/** A plugin file adding one pair sampler (uniform negatives under another name). */
const PLUGIN = `
import { registry } from "${new URL("../core/plugins.ts", import.meta.url).href}";
const uniform = registry.list("pairs").find((d) => d.name === "uniform");
export const plugins = [{ ...uniform, name: "provenance-test-pairs" }];
`;

Deno.test("records state version, commit, libtorch, device, dtype and plugin digests; a newer commit resumes", async () => {
  await withTempDir(async (dir) => {
    const data = join(dir, "data"), test = join(dir, "test"), other = join(dir, "other-test");
    await drawDataset(data, 2, 0);
    await drawDataset(test, 1, 1);
    await drawDataset(other, 1, 2);
    const plugin = join(dir, "pairs_plugin.ts");
    writeFileSync(plugin, PLUGIN);
    const out = join(dir, "exp");
    const args = tinyRunArgs(
      data,
      test,
      out,
      "--plugin",
      plugin,
      "--pairs",
      "provenance-test-pairs",
    );
    const first = await withOutput(() => main(args));
    assert.equal(first.result, 0, first.lines.join("\n"));

    const want = {
      dipsy: { name: project.name, version: project.version, commit: checkoutCommit() },
      libtorch: runtimeInfo().torch_version,
      device: "cpu",
    };
    const digest = createHash("sha256").update(readFileSync(plugin)).digest("hex");
    const records = {
      run: join(out, "synthetic", "run.json"),
      train: join(out, "train", "train.json"),
      eval: join(out, "eval.json"),
      report: join(out, "report.json"),
    };
    for (const [what, file] of Object.entries(records)) {
      const p = readJson(file).provenance;
      assert.deepEqual({ dipsy: p.dipsy, libtorch: p.libtorch, device: p.device }, want, what);
      assert.equal(p.dtype, "f32", `${what}: the dtype that ran, not auto`);
    }
    for (const what of ["run", "report"] as const) {
      assert.deepEqual(readJson(records[what]).provenance.plugins, [
        { file: plugin, sha256: digest },
      ]);
    }
    assert.equal(readJson(records.report).generation.dtype, "f32");
    assert.equal(readJson(records.report).generation.device, "cpu");

    // Records from another commit and libtorch: the same configuration still resumes.
    for (const file of [records.run, records.train]) {
      const r = readJson(file);
      r.provenance = { ...r.provenance, dipsy: { ...r.provenance.dipsy, commit: "0".repeat(40) } };
      r.provenance.libtorch = "0.0.0";
      writeFileSync(file, JSON.stringify(r, null, 2));
    }
    const again = await withOutput(() => main(args));
    assert.equal(again.result, 0, again.lines.join("\n"));
    assert.ok(!again.lines.some((l) => /another configuration|other settings/.test(l)));

    // Another test set keeps the first one's results.
    const evalArgs = (t: string) => ["eval", "--model", join(out, "train"), "--test", t];
    const e1 = await withOutput(() => main(evalArgs(test)));
    assert.equal(e1.result, 0, e1.lines.join("\n"));
    const firstEval = readFileSync(join(out, "train", "eval.json"), "utf8");
    const e2 = await withOutput(() => main(evalArgs(other)));
    assert.equal(e2.result, 0, e2.lines.join("\n"));
    const otherFile = join(out, "train", "eval-other-test.json");
    assert.ok(e2.lines.some((l) => l.includes(`written: ${otherFile}`)), e2.lines.join("\n"));
    assert.equal(readJson(otherFile).test, other);
    assert.equal(readFileSync(join(out, "train", "eval.json"), "utf8"), firstEval);
    // The same test set again rewrites its own file.
    const e3 = await withOutput(() => main(evalArgs(test)));
    assert.ok(e3.lines.some((l) => l.includes(`written: ${join(out, "train", "eval.json")}`)));
  });
});

Deno.test("train: warm-up epochs as many as the epochs are warned about", async () => {
  await withTempDir(async (dir) => {
    const data = join(dir, "data");
    await drawDataset(data, 2, 0);
    const flags = [...TINY_TRAIN_FLAGS, "--epochs", "1", "--warmup-epochs", "1"];
    const args = ["train", "--real", data, "--mode", "real", "--clip", "tiny", "--out"];
    const warned = await withOutput(() => main([...args, join(dir, "a"), ...flags]));
    assert.equal(warned.result, 0, warned.lines.join("\n"));
    const warnings = warned.lines.filter((l) => /warning: 1 warm-up epoch\(s\) of 1/.test(l));
    assert.equal(warnings.length, 1, warned.lines.join("\n"));

    const quiet = await withOutput(() =>
      main([...args, join(dir, "b"), ...TINY_TRAIN_FLAGS, "--mode", "real"])
    );
    assert.equal(quiet.result, 0, quiet.lines.join("\n"));
    assert.ok(!quiet.lines.some((l) => /warm-up epoch/.test(l)), quiet.lines.join("\n"));
  });
});
