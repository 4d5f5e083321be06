/**
 * `dipsy serve` exactly as the CLI runs it, plus one test hook: with `--hold-batch N` (first),
 * every job is held as its batch N starts until it is cancelled. A test that stops this server
 * or fills its queue then knows where the job is, whatever the machine's speed. Run as a
 * subprocess by the server tests.
 */
import { parseServeArgs, serve } from "../cli/serve.ts";
import type { Job } from "../server/jobs.ts";

function cancelled(job: Job): Promise<void> {
  const signal = job.controller.signal;
  return new Promise((resolve) => {
    if (signal.aborted) resolve();
    else signal.addEventListener("abort", () => resolve(), { once: true });
  });
}

const [flag, n, ...args] = Deno.args;
if (flag !== "--hold-batch" || !/^\d+$/.test(n)) throw new Error("usage: --hold-batch N ARGS");
const held = Number(n);
Deno.exit(
  await serve(parseServeArgs(args)!, {
    beforeBatch: (job, batch) => batch === held ? cancelled(job) : Promise.resolve(),
  }),
);
