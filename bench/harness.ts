/** Shared timing helpers: every benchmark reports ours vs the Python reference from one run. */
import { join } from "node:path";
import { ROOT } from "../ffi/lib.ts";

export interface BenchResult {
  bench: string;
  ours_s: number;
  reference_s: number;
}

/** Median over 5 repetitions of the mean time per call, after a warm-up. */
export function medianSeconds(iters: number, fn: () => void): number {
  for (let i = 0; i < Math.max(10, iters / 10); i++) fn();
  const runs: number[] = [];
  for (let r = 0; r < 5; r++) {
    const t0 = performance.now();
    for (let i = 0; i < iters; i++) fn();
    runs.push((performance.now() - t0) / 1000 / iters);
  }
  runs.sort((a, b) => a - b);
  return runs[2];
}

/** Python interpreter of the reference venv that the bootstrap prepares. */
export function referencePython(): string {
  return Deno.env.get("DIPSY_REFERENCE_PYTHON") ?? join(ROOT, ".venv/bin/python");
}

/** Runs a reference script that prints one JSON object on its last stdout line. */
export async function runPythonReference(
  script: string,
  args: string[],
): Promise<Record<string, number>> {
  const out = await new Deno.Command(referencePython(), {
    args: [join(ROOT, script), ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout).trim();
  if (out.code !== 0) {
    throw new Error(`${script} failed:\n${new TextDecoder().decode(out.stderr)}`);
  }
  return JSON.parse(text.split("\n").at(-1)!);
}

export function report(r: BenchResult): void {
  console.log(JSON.stringify({ ...r, ratio: r.ours_s / r.reference_s }));
}
