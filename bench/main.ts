/**
 * `deno task bench`: every benchmark, ours vs the Python reference in the same run, one JSON line
 * each: {"bench", "ours_s", "reference_s", "ratio"} (ratio = ours / reference; lower is better),
 * and a few counted figures ({"bench", "value", "unit", ...}: FFI calls per UNet forward).
 * `--only NAME` runs the benchmarks whose name starts with NAME (or the whole suite it names).
 */
import { parseArgs } from "node:util";
import { benchAugment } from "./augment_bench.ts";
import { benchDipsy } from "./dipsy_bench.ts";
import { benchModels, type CountedFigure } from "./models_bench.ts";
import { benchOps } from "./ops_bench.ts";
import { benchTrain } from "./train_bench.ts";
import { type BenchResult, report } from "./harness.ts";

/** Each suite gets the `--only` value, so it can skip the cases that would not be reported. */
const SUITES: Record<string, (only?: string) => Promise<(BenchResult | CountedFigure)[]>> = {
  op: benchOps,
  model: benchModels,
  train: benchTrain,
  dipsy: benchDipsy,
  augment: benchAugment,
};

const { values } = parseArgs({ args: Deno.args, options: { only: { type: "string" } } });
const only = values.only;
for (const [name, suite] of Object.entries(SUITES)) {
  if (only && !name.startsWith(only) && !only.startsWith(name)) continue;
  for (const r of await suite(only)) {
    if (only && !name.startsWith(only) && !r.bench.startsWith(only)) continue;
    if ("value" in r) console.log(JSON.stringify(r));
    else report(r);
  }
}
