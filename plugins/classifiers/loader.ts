/**
 * Batches of prepared images, made ahead of use by a pool of Workers: while libtorch runs one
 * training step (a synchronous call that holds the main thread), the workers decode and augment
 * the next `prefetch` batches. Results come back in order and do not depend on which worker made
 * them, because every random transform is seeded per image.
 */
import { runtimeInfo } from "../../ffi/mod.ts";
import { prepareImage, type PrepareJob, type PrepareSpec } from "./prepare.ts";

export interface LoaderOptions {
  /** Worker threads; 0 prepares on the calling thread (tests, debugging). Default: cores - 1,
   * at least 1, at most 16: one worker prepares ~50 augmented 224 px images/s (`deno task
   * bench`), and a GPU trains ViT-B/16 with LoRA far faster than that. */
  workers?: number;
  /** Batches prepared ahead of the one being consumed (default 2). */
  prefetch?: number;
}

export interface PreparedBatch {
  /** Position of the batch in the list given to `batches`. */
  index: number;
  /** [count, 3, size, size] float32, row-major. */
  pixels: Float32Array;
  count: number;
}

export function defaultWorkers(): number {
  return Math.max(1, Math.min(16, (navigator.hardwareConcurrency ?? 2) - 1));
}

interface Pending {
  resolve: (pixels: Float32Array) => void;
  reject: (e: Error) => void;
  path: string;
}

export class ImageLoader implements Disposable {
  readonly spec: PrepareSpec;
  readonly workers: number;
  readonly prefetch: number;
  readonly #pool: Worker[] = [];
  readonly #pending = new Map<number, Pending>();
  #nextId = 0;
  #closed = false;

  constructor(spec: PrepareSpec, opts: LoaderOptions = {}) {
    this.spec = spec;
    this.workers = opts.workers ?? defaultWorkers();
    this.prefetch = opts.prefetch ?? 2;
    if (!Number.isInteger(this.workers) || this.workers < 0) {
      throw new RangeError(`workers must be a non-negative integer, got ${opts.workers}`);
    }
    if (!Number.isInteger(this.prefetch) || this.prefetch < 0) {
      throw new RangeError(`prefetch must be a non-negative integer, got ${opts.prefetch}`);
    }
  }

  #startPool(): void {
    // Each worker runs its libtorch ops on one thread, as a PyTorch DataLoader worker does (the
    // cores belong to the training step). libtorch hands the last count set to every thread
    // that has not yet run a parallel op, so this thread fixes its own count first.
    if (this.#pool.length === 0) runtimeInfo();
    while (this.#pool.length < this.workers) {
      const w = new Worker(new URL("./loader_worker.ts", import.meta.url), { type: "module" });
      w.onmessage = (e: MessageEvent<{ id: number; pixels?: Float32Array; error?: string }>) => {
        const { id, pixels, error } = e.data;
        const p = this.#pending.get(id);
        this.#pending.delete(id);
        if (!p) return;
        if (pixels) p.resolve(pixels);
        else p.reject(new Error(error!.includes(p.path) ? error! : `${p.path}: ${error}`));
      };
      w.onerror = (e) => {
        e.preventDefault();
        this.#failAll(new Error(`image loader worker failed: ${e.message}`));
      };
      this.#pool.push(w);
    }
  }

  #failAll(e: Error): void {
    for (const p of this.#pending.values()) p.reject(e);
    this.#pending.clear();
  }

  /** Pixels [3, size, size] of one image. */
  prepare(job: PrepareJob): Promise<Float32Array> {
    if (this.#closed) return Promise.reject(new Error("image loader is closed"));
    if (this.workers === 0) return prepareImage(job, this.spec);
    this.#startPool();
    const id = this.#nextId++;
    const promise = new Promise<Float32Array>((resolve, reject) => {
      this.#pending.set(id, { resolve, reject, path: job.path });
    });
    // Jobs go to the workers' own queues right away: the main thread may next block in a long
    // libtorch call, and the workers must keep going meanwhile.
    this.#pool[id % this.#pool.length].postMessage({ id, job, spec: this.spec });
    return promise;
  }

  async #batch(index: number, jobs: PrepareJob[]): Promise<PreparedBatch> {
    const plane = 3 * this.spec.size * this.spec.size;
    const parts = await Promise.all(jobs.map((j) => this.prepare(j)));
    const pixels = new Float32Array(jobs.length * plane);
    parts.forEach((p, i) => {
      if (p.length !== plane) {
        throw new Error(`${jobs[i].path}: prepared ${p.length} values, expected ${plane}`);
      }
      pixels.set(p, i * plane);
    });
    return { index, pixels, count: jobs.length };
  }

  /**
   * Yields the batches in order, keeping `prefetch` batches in preparation ahead of the one
   * handed out. Stops early (without error) when `signal` aborts.
   */
  async *batches(
    list: readonly PrepareJob[][],
    signal?: AbortSignal,
  ): AsyncGenerator<PreparedBatch> {
    const started: Promise<PreparedBatch>[] = [];
    const start = (i: number) => {
      const p = this.#batch(i, list[i]);
      p.catch(() => {}); // awaited below in order; this only marks it handled meanwhile
      started[i] = p;
    };
    for (let i = 0; i < list.length; i++) {
      for (let j = started.length; j <= Math.min(list.length - 1, i + this.prefetch); j++) start(j);
      if (signal?.aborted) return;
      const batch = await started[i];
      delete started[i];
      yield batch;
    }
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#failAll(new Error("image loader is closed"));
    for (const w of this.#pool) w.terminate();
    this.#pool.length = 0;
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
