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

/**
 * A long-running reference script: one JSON request per line on its stdin, one JSON answer per
 * line on its stdout, so models load once and each timing is a round trip.
 */
export class ReferenceProcess implements AsyncDisposable {
  readonly #script: string;
  readonly #child: Deno.ChildProcess;
  readonly #lines: ReadableStreamDefaultReader<string>;
  readonly #stderr: Promise<string>;
  #buffer = "";

  constructor(script: string, args: string[]) {
    this.#script = script;
    this.#child = new Deno.Command(referencePython(), {
      args: [script, ...args],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#lines = this.#child.stdout.pipeThrough(new TextDecoderStream()).getReader();
    // Drained all along, so warnings can never fill the pipe and stall the child.
    this.#stderr = new Response(this.#child.stderr).text();
  }

  /** The next answer line (the script may send one unasked, e.g. when its models are ready). */
  async answer<T = Record<string, unknown>>(): Promise<T> {
    let end: number;
    while ((end = this.#buffer.indexOf("\n")) < 0) {
      const { value, done } = await this.#lines.read();
      if (done) {
        const status = await this.#child.status;
        throw new Error(`${this.#script} exited (${status.code}):\n${await this.#stderr}`);
      }
      this.#buffer += value;
    }
    const line = this.#buffer.slice(0, end);
    this.#buffer = this.#buffer.slice(end + 1);
    return JSON.parse(line);
  }

  async request<T = Record<string, unknown>>(req: Record<string, unknown>): Promise<T> {
    const w = this.#child.stdin.getWriter();
    await w.write(new TextEncoder().encode(JSON.stringify(req) + "\n"));
    w.releaseLock();
    return await this.answer<T>();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.#child.stdin.close();
    await this.#child.status;
    await this.#stderr;
  }
}
