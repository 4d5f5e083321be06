/**
 * `generate --devices`: one worker process per device of this machine, all writing into one
 * output folder. Worker k of K does shard i + k n of n K when this process has shard i/n
 * (core/shard.ts, workerShard), so the workers split exactly this process's share, GPUs on a
 * node combine with array tasks across nodes, and the images are those of one worker: shards
 * compute the same fixed batches.
 */
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { workerShard } from "../core/shard.ts";
import { CliError, flagArgs } from "./command.ts";
import type { GenerateFlags, PreparedGenerate } from "./generate.ts";

/** "cuda:0,cuda:1", "cpu,cpu" or "all" (every CUDA device libtorch sees) as a device list. */
export async function parseDevices(spec: string): Promise<string[]> {
  if (spec.trim() === "all") {
    const { runtimeInfo } = await import("../ffi/mod.ts");
    const count = runtimeInfo().cuda_device_count;
    if (count === 0) {
      throw new CliError("--devices all: no CUDA device is visible (see `dipsy info`)");
    }
    return Array.from({ length: count }, (_, i) => `cuda:${i}`);
  }
  const devices = spec.split(",").map((d) => d.trim());
  if (devices.some((d) => !/^(cpu|cuda(:\d+)?)$/.test(d))) {
    throw new CliError(
      `--devices must be "all" or devices separated by commas (cpu, cuda, cuda:N), got "${spec}"`,
    );
  }
  return devices;
}

/** Deno's arguments for `dipsy <args>` from this checkout, whatever the working folder. */
export function dipsyArgs(args: readonly string[]): string[] {
  const root = fileURLToPath(new URL("../", import.meta.url));
  const config = `--config=${join(root, "deno.json")}`;
  return ["run", "-A", config, join(root, "cli", "main.ts"), ...args];
}

/** Copies a child's output to ours line by line, each line tagged with its worker. */
async function relay(
  stream: ReadableStream<Uint8Array>,
  tag: string,
  write: (line: string) => void,
): Promise<void> {
  const decoder = new TextDecoder();
  let rest = "";
  for await (const bytes of stream) {
    const lines = (rest + decoder.decode(bytes, { stream: true })).split(/\r\n|\r|\n/);
    rest = lines.pop()!;
    for (const line of lines) write(tag + line);
  }
  if (rest) write(tag + rest);
}

/**
 * Runs the prepared job as one `generate` worker process per device and waits for all of them.
 * `flags` are the command's own: the workers get them with their device and shard. Returns the
 * exit code: 0 when every worker succeeded, 130 when they were stopped, else 1.
 */
export async function runOnDevices(
  flags: GenerateFlags,
  devices: readonly string[],
  prepared: PreparedGenerate,
  log: (message: string) => void = (m) => console.error(m),
): Promise<number> {
  const { config, dataset, placement, shard, run: { pairs } } = prepared;
  let scratch: string | null = null;
  let similarity = config.similarity ?? undefined;
  const listeners: [Deno.Signal, () => void][] = [];
  try {
    if (pairs.needsSimilarity && !similarity) {
      // Computed once here rather than by every worker, and handed to them as a file.
      const { isFile, similaritySource, SIMILARITY_FILE } = await import("../app/similarity.ts");
      const source = similaritySource(config, placement, log);
      const found = await source.get(dataset, resolve(config.out!));
      if (!isFile(found.from)) {
        scratch = await Deno.makeTempDir({ prefix: "dipsy-similarity-" });
        similarity = join(scratch, SIMILARITY_FILE);
        await source.keep!(similarity, dataset, found.matrix);
      }
    }

    const common = flagArgs(flags, ["devices", "device", "shard", "shard-count", "similarity"]);
    log(
      `${devices.length} workers (${devices.join(", ")})` +
        (shard.count > 1 ? ` sharing shard ${shard.index}/${shard.count}` : "") +
        ` into ${resolve(config.out!)}`,
    );
    const workers = devices.map((device, k) => {
      const part = workerShard(shard, k, devices.length);
      const args = dipsyArgs([
        "generate",
        ...common,
        `--device=${device}`,
        `--shard=${part.index}/${part.count}`,
        ...(similarity ? [`--similarity=${similarity}`] : []),
      ]);
      // In its own session: a Ctrl-C reaches each worker once, from us, as it would reach one
      // process (a second one stops it at once).
      const child = new Deno.Command(Deno.execPath(), {
        args,
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
        detached: true,
      }).spawn();
      const tag = `[${k} ${device}] `;
      const output = Promise.all([
        relay(child.stdout, tag, (l) => console.log(l)),
        relay(child.stderr, tag, (l) => console.error(l)),
      ]);
      return { device, child, done: output.then(() => child.status) };
    });
    for (const signal of ["SIGINT", "SIGTERM"] as const) {
      const forward = () => {
        for (const w of workers) {
          try {
            w.child.kill(signal);
          } catch { /* already exited */ }
        }
      };
      Deno.addSignalListener(signal, forward);
      listeners.push([signal, forward]);
    }

    const statuses = await Promise.all(workers.map((w) => w.done));
    const failed = statuses.flatMap((s, k) => s.success ? [] : [{ k, code: s.code }]);
    for (const { k, code } of failed) {
      log(`worker ${k} (${workers[k].device}) ended with exit code ${code}`);
    }
    if (failed.length === 0) {
      log(`all ${devices.length} workers done`);
      return 0;
    }
    return failed.every((f) => f.code === 130) ? 130 : 1;
  } finally {
    for (const [signal, fn] of listeners) Deno.removeSignalListener(signal, fn);
    if (scratch) await Deno.remove(scratch, { recursive: true }).catch(() => {});
  }
}
