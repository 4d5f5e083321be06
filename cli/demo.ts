/**
 * `dipsy demo`: the main job on the embedded tiny default. Until the generation pipeline lands it
 * checks the installation end to end: libtorch info, and a small seeded computation whose result
 * PyTorch reproduces exactly (`torch.randn(2, 3, generator=torch.Generator().manual_seed(0))`).
 */
import { parseArgs } from "node:util";
import type { Command } from "./command.ts";

export const command: Command = {
  summary: "run the main job on the embedded tiny models",
  async run(args) {
    const { values } = parseArgs({ args, options: { help: { type: "boolean", short: "h" } } });
    if (values.help) {
      console.log("usage: deno task dipsy demo\n\nRuns the embedded demo (no files needed).");
      return 0;
    }
    const { Generator, ops, runtimeInfo, scope, memory } = await import("../ffi/mod.ts");
    const info = runtimeInfo();
    console.log(
      `libtorch ${info.torch_version} (${info.built_with_cuda ? "CUDA build" : "CPU build"}, ` +
        `${info.num_threads} threads, CUDA available: ${info.cuda_available})`,
    );
    const before = memory().handles;
    const values2 = scope(() => {
      using g = new Generator(0);
      const x = ops.randn([2, 3], "f32", "cpu", g);
      const y = ops.softmax(x, -1);
      return y.toFloat64();
    });
    console.log("softmax(randn(2, 3, seed 0)) =", Array.from(values2).map((v) => v.toFixed(6)));
    console.log(`live tensor handles after the run: ${memory().handles - before}`);
    return 0;
  },
};
