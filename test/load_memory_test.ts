/**
 * Loading a full-size SD1.5 UNet holds its weights once: each tensor is read from the file straight
 * into its own buffer, with no staging copy of the checkpoint and no file pages mapped into the
 * process. Measured in a fresh child process (peak RSS is per process and never goes down), on the
 * random-weight SD1.5 UNet that test/reference/unet_ref.py writes for the full-size parity test.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { SafetensorsFile } from "../ffi/mod.ts";

const DIR = join(import.meta.dirname!, "fixtures", "unet", "sd15full", "unet");
const ROOT = join(import.meta.dirname!, "..");
const LIMIT = 1.3;

/** Loads the UNet and reports VmHWM (peak RSS) before and after, and VmRSS after, in bytes. */
function childScript(dir: string): string {
  const unetModule = pathToFileURL(join(ROOT, "plugins", "sd15", "unet.ts")).href;
  return `
import { UNet2DConditionModel } from ${JSON.stringify(unetModule)};
const field = (key) => {
  const m = Deno.readTextFileSync("/proc/self/status").match(new RegExp("^" + key + ":\\\\s+(\\\\d+) kB", "m"));
  if (!m) throw new Error("/proc/self/status has no " + key);
  return Number(m[1]) * 1024;
};
const baseline = field("VmHWM");
const t0 = performance.now();
const unet = UNet2DConditionModel.fromPretrained(${JSON.stringify(dir)});
const seconds = (performance.now() - t0) / 1000;
let params = 0;
for (const t of unet.namedParameters().values()) params += t.numel * 4;
console.log(JSON.stringify({ baseline, peak: field("VmHWM"), rss: field("VmRSS"), params, seconds }));
unet.dispose();
`;
}

const GB = (n: number) => `${(n / 1e9).toFixed(3)} GB`;

Deno.test({
  name: "load memory: a full-size SD1.5 UNet loads with peak RSS below 1.3x its weights",
  // DIPSY_UNET_FULL=0 opts out of the 3.4 GB fixtures on small machines (as in unet_test.ts)
  ignore: Deno.env.get("DIPSY_UNET_FULL") === "0",
  async fn() {
    const file = join(DIR, "diffusion_pytorch_model.safetensors");
    if (!existsSync(file)) {
      throw new Error(
        `missing fixture ${file}: run \`deno task test\` (it generates fixtures with ` +
          "test/reference/unet_ref.py)",
      );
    }
    const weights = [...SafetensorsFile.open(file).tensors.values()]
      .reduce((sum, t) => sum + t.nbytes, 0);
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["eval", "--ext=js", childScript(DIR)],
      cwd: ROOT,
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(out.stdout).trim();
    if (out.code !== 0) {
      throw new Error(`the loading child failed:\n${new TextDecoder().decode(out.stderr)}`);
    }
    const r = JSON.parse(text.split("\n").at(-1)!);
    console.log(
      `  weights ${GB(weights)}; baseline peak RSS ${GB(r.baseline)}; peak RSS after loading ` +
        `${GB(r.peak)} (${(r.peak / weights).toFixed(3)}x the weights, ${
          GB(r.peak - r.baseline)
        } ` +
        `above the baseline); RSS after ${GB(r.rss)}; load ${r.seconds.toFixed(1)} s`,
    );
    assert.equal(r.params, weights, "the model holds every weight of the file, as f32");
    assert.ok(
      r.peak <= LIMIT * weights,
      `peak RSS ${GB(r.peak)} exceeds ${LIMIT}x the weights (${GB(LIMIT * weights)})`,
    );
  },
});
