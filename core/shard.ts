/**
 * Splitting the dataset job: fixed batches per class, and shards (from a flag, a Slurm job
 * array or a Kubernetes indexed Job) that take every n-th batch.
 */
import { RunError } from "./output.ts";

export interface Shard {
  index: number;
  count: number;
  /** Where it came from ("--shard", "SLURM_ARRAY_TASK_ID", ...), for messages. */
  source: string;
}

export const NO_SHARD: Shard = { index: 0, count: 1, source: "default" };

function shardOf(index: number, count: number, source: string): Shard {
  if (!Number.isInteger(count) || count < 1) {
    throw new RunError(`${source}: the shard count must be a positive integer, got ${count}`);
  }
  if (!Number.isInteger(index) || index < 0 || index >= count) {
    const valid = count === 1
      ? "0/1"
      : `0/${count} ${count === 2 ? "and" : "to"} ${count - 1}/${count}`;
    throw new RunError(
      `${source}: there is no shard ${index} of ${count}: shards count from 0 (${valid})`,
    );
  }
  return { index, count, source };
}

function envInt(env: Record<string, string | undefined>, name: string): number | undefined {
  const v = env[name];
  if (v === undefined || v.trim() === "") return undefined;
  const n = Number(v);
  if (!Number.isInteger(n)) throw new RunError(`${name}="${v}" is not an integer`);
  return n;
}

/**
 * The shard this process works on: `--shard i/n` first, then a Slurm job array
 * (SLURM_ARRAY_TASK_ID, counted from SLURM_ARRAY_TASK_MIN, of SLURM_ARRAY_TASK_COUNT), then a
 * Kubernetes indexed Job (JOB_COMPLETION_INDEX, of `count` or DIPSY_SHARD_COUNT, since
 * Kubernetes does not export the completion count). Without any: the whole run.
 *
 * A Slurm task with `count` or DIPSY_SHARD_COUNT given takes its task id as the shard index, so
 * that an array resubmitted for some shards only (`--array=1,3`) still does shards 1 and 3 of
 * the whole run, which Slurm's own count and minimum would renumber.
 */
export function resolveShard(
  flag?: string,
  count?: number,
  env: Record<string, string | undefined> = Deno.env.toObject(),
): Shard {
  if (flag !== undefined) {
    const m = /^\s*(\d+)\s*\/\s*(\d+)\s*$/.exec(flag);
    if (!m) {
      throw new RunError(`--shard must be i/n, i counting from 0 (e.g. 0/4), got "${flag}"`);
    }
    return shardOf(Number(m[1]), Number(m[2]), "--shard");
  }
  const slurmId = envInt(env, "SLURM_ARRAY_TASK_ID");
  if (slurmId !== undefined) {
    const fixed = count ?? envInt(env, "DIPSY_SHARD_COUNT");
    if (fixed !== undefined) return shardOf(slurmId, fixed, "SLURM_ARRAY_TASK_ID");
    const slurmCount = envInt(env, "SLURM_ARRAY_TASK_COUNT");
    if (slurmCount === undefined) {
      throw new RunError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not");
    }
    const min = envInt(env, "SLURM_ARRAY_TASK_MIN") ?? 0;
    return shardOf(slurmId - min, slurmCount, "SLURM_ARRAY_TASK_ID");
  }
  const k8s = envInt(env, "JOB_COMPLETION_INDEX");
  if (k8s !== undefined) {
    const n = count ?? envInt(env, "DIPSY_SHARD_COUNT");
    if (n === undefined) {
      throw new RunError(
        "JOB_COMPLETION_INDEX is set: give the number of shards with --shard-count N or " +
          "DIPSY_SHARD_COUNT (the Job's completions)",
      );
    }
    return shardOf(k8s, n, "JOB_COMPLETION_INDEX");
  }
  return NO_SHARD;
}

export interface WorkItem {
  classIndex: number;
  index: number;
}

/** A fixed batch: images [start, start + size) of one class, always computed together. */
export interface Chunk {
  /** Position in the run's list of batches (class-major), which sharding splits. */
  id: number;
  classIndex: number;
  start: number;
  size: number;
}

/** The run's batches: per class, indices cut into runs of `batch`. */
export function planChunks(classCount: number, perClass: number, batch: number): Chunk[] {
  const chunks: Chunk[] = [];
  for (let c = 0; c < classCount; c++) {
    for (let start = 0; start < perClass; start += batch) {
      chunks.push({
        id: chunks.length,
        classIndex: c,
        start,
        size: Math.min(batch, perClass - start),
      });
    }
  }
  return chunks;
}

/**
 * Worker k of K on one machine, sharing `shard` i/n: shard i + k n of n K. Batch j belongs to
 * it when j mod nK = i + kn, so j mod n = i: the K workers together do exactly shard i/n, and
 * nodes with different K still split the run between them without overlap.
 */
export function workerShard(shard: Shard, worker: number, workers: number): Shard {
  return shardOf(
    shard.index + worker * shard.count,
    shard.count * workers,
    `${shard.source}, worker ${worker + 1} of ${workers}`,
  );
}

/** Batch j goes to shard j mod n: every shard gets every class's work spread evenly. */
export function shardChunks(chunks: readonly Chunk[], shard: Shard): Chunk[] {
  return chunks.filter((c) => c.id % shard.count === shard.index);
}
