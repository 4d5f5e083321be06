/**
 * `deno task bench`: every benchmark, ours vs the Python reference in the same run, one JSON line
 * each: {"bench", "ours_s", "reference_s", "ratio"} (ratio = ours / reference; lower is better).
 * `--only NAME` runs the benchmarks whose name starts with NAME.
 */
import { parseArgs } from "node:util";
import { benchAugment } from "./augment_bench.ts";
import { benchDipsy } from "./dipsy_bench.ts";
import { benchModels } from "./models_bench.ts";
import { benchOps } from "./ops_bench.ts";
import { benchTrain } from "./train_bench.ts";
import { type BenchResult, report } from "./harness.ts";

const SUITES: Record<string, () => Promise<BenchResult[]>> = {
  op: benchOps,
  model: benchModels,
  train: benchTrain,
  dipsy: benchDipsy,
  augment: benchAugment,
};

const { values } = parseArgs({ args: Deno.args, options: { only: { type: "string" } } });
for (const [name, suite] of Object.entries(SUITES)) {
  if (values.only && !name.startsWith(values.only) && !values.only.startsWith(name)) continue;
  for (const r of await suite()) {
    if (values.only && !r.bench.startsWith(values.only) && !values.only.startsWith(name)) continue;
    report(r);
  }
}
