/**
 * The single engine: one model on one device, one piece of work at a time, in arrival order.
 *
 * `WorkQueue` is the policy: a FIFO with a bound on waiting work (a full queue is refused at once
 * with a retry estimate), removal of waiting work whose AbortSignal fires (a client that went
 * away), and a clean close. `Engine` puts it in front of the device worker (worker.ts).
 */
import type { ProgressInfo } from "../core/generate.ts";
import type { ImageFormat, RgbImage } from "../core/image.ts";
import type { SampleSpec } from "../core/sample.ts";
import type { GenerateSummary, JobPlan } from "./jobs.ts";
import type { EngineInfo, FromWorker, ModelSetup, ToWorker, WorkerError } from "./worker.ts";

export type { EngineInfo, ModelSetup } from "./worker.ts";

/** The queue is at its bound: try again in `retryAfter` seconds. */
export class QueueFullError extends Error {
  override name = "QueueFullError";
  constructor(readonly retryAfter: number) {
    super(`the engine's queue is full; retry in ${retryAfter} s`);
  }
}

/** The server is shutting down and takes no more work. */
export class ClosedError extends Error {
  override name = "ClosedError";
  constructor() {
    super("the server is shutting down");
  }
}

/** The engine stopped (its worker failed, or it was closed): no work runs any more. */
export class EngineStoppedError extends Error {
  override name = "EngineStoppedError";
}

/** Work that failed on the device; `user` when the input was at fault. */
export class WorkError extends Error {
  readonly user: boolean;
  readonly field?: string;
  constructor(e: WorkerError) {
    super(e.message);
    this.name = e.name;
    this.user = e.user;
    this.field = e.field;
  }
}

/** How a queued or running piece of work settles its caller's promise. */
type Settle = Pick<PromiseWithResolvers<unknown>, "resolve" | "reject">;

interface Entry extends Settle {
  run: (signal: AbortSignal) => Promise<unknown>;
  signal: AbortSignal;
  onStart?: () => void;
  detach: () => void;
}

export interface SubmitOptions {
  /** Aborting removes the work while it waits; running work sees it through `run`'s signal. */
  signal?: AbortSignal;
  /** Called when the work leaves the queue and starts. */
  onStart?: () => void;
}

export class WorkQueue {
  readonly #waiting: Entry[] = [];
  #running: Entry | null = null;
  /** Settles once the running work has ended and the queue moved on. */
  #current: Promise<void> = Promise.resolve();
  #closed = false;
  /** Smoothed duration of finished work, seconds. */
  #meanSeconds = 0;
  #finished = 0;

  /** `bound`: how much work may wait behind the running one. */
  constructor(readonly bound: number) {
    if (!Number.isInteger(bound) || bound < 0) {
      throw new RangeError(`queue bound must be a non-negative integer, got ${bound}`);
    }
  }

  get running(): boolean {
    return this.#running !== null;
  }

  get waiting(): number {
    return this.#waiting.length;
  }

  /** Seconds until a slot is likely free: the waiting work plus the running one, at least 1. */
  retryAfter(): number {
    const mean = this.#finished ? this.#meanSeconds : 5;
    return Math.max(1, Math.ceil(mean * (this.#waiting.length + 1)));
  }

  /**
   * Queues `run`. Throws at once (not through the promise) when the work is refused: closed,
   * full, or already aborted, so callers can answer before creating anything.
   */
  submit<T>(run: (signal: AbortSignal) => Promise<T>, opts: SubmitOptions = {}): Promise<T> {
    if (this.#closed) throw new ClosedError();
    const signal = opts.signal ?? new AbortController().signal;
    if (signal.aborted) throw signal.reason;
    if (this.#running && this.#waiting.length >= this.bound) {
      throw new QueueFullError(this.retryAfter());
    }
    const { promise, resolve, reject } = Promise.withResolvers<T>();
    const onAbort = () => {
      const i = this.#waiting.indexOf(entry);
      if (i < 0) return;
      this.#waiting.splice(i, 1);
      entry.detach();
      reject(signal.reason);
    };
    const entry: Entry = {
      run,
      signal,
      onStart: opts.onStart,
      resolve: resolve as (v: unknown) => void,
      reject,
      detach: () => signal.removeEventListener("abort", onAbort),
    };
    signal.addEventListener("abort", onAbort);
    this.#waiting.push(entry);
    this.#pump();
    return promise;
  }

  /**
   * Refuses new work and fails the waiting work with ClosedError; running work goes on, and the
   * promise resolves once it has ended.
   */
  close(): Promise<void> {
    this.#closed = true;
    for (const e of this.#waiting.splice(0)) {
      e.detach();
      e.reject(new ClosedError());
    }
    return this.#current;
  }

  #pump(): void {
    if (this.#running) return;
    const entry = this.#waiting.shift();
    if (!entry) return;
    entry.detach();
    this.#running = entry;
    const started = performance.now();
    entry.onStart?.();
    this.#current = entry.run(entry.signal).then(entry.resolve, entry.reject).finally(() => {
      const s = (performance.now() - started) / 1000;
      this.#finished++;
      this.#meanSeconds = this.#finished === 1 ? s : 0.8 * this.#meanSeconds + 0.2 * s;
      this.#running = null;
      this.#pump();
    });
  }
}

export interface GenerateHooks {
  onProgress?: (p: ProgressInfo) => void;
  onImage?: (file: string) => void;
  onLog?: (message: string) => void;
  /**
   * Awaited as each batch starts, once the run has decided to do it: the device waits
   * meanwhile. For tests that must act between two batches instead of racing the run.
   */
  beforeBatch?: () => Promise<void>;
}

/** A message to the worker before the engine numbers it. */
type Call = ToWorker extends infer M ? M extends { id: number } ? Omit<M, "id"> : never : never;

type Pending = Settle & { hooks?: GenerateHooks };

/** The device worker behind a WorkQueue. */
export class Engine {
  readonly queue: WorkQueue;
  readonly #worker: Worker;
  readonly #pending = new Map<number, Pending>();
  #nextId = 1;
  #failure: Error | null = null;

  private constructor(worker: Worker, readonly info: EngineInfo, bound: number) {
    this.#worker = worker;
    this.queue = new WorkQueue(bound);
    worker.onmessage = (e: MessageEvent<FromWorker>) => this.#receive(e.data);
    worker.onerror = (e) => {
      e.preventDefault();
      this.#fail(new EngineStoppedError(`the engine worker failed: ${e.message}`));
    };
  }

  /** Starts the worker and loads the model in it. */
  static start(setup: ModelSetup, opts: { queue: number }): Promise<Engine> {
    const worker = new Worker(new URL("./worker.ts", import.meta.url), { type: "module" });
    return new Promise((resolve, reject) => {
      worker.onmessage = (e: MessageEvent<FromWorker>) => {
        const m = e.data;
        if (m.type === "ready") {
          resolve(new Engine(worker, m.info, opts.queue));
        } else if (m.type === "init-failed") {
          worker.terminate();
          reject(new WorkError(m.error));
        }
      };
      worker.onerror = (e) => {
        e.preventDefault();
        worker.terminate();
        reject(new Error(`the engine worker failed to start: ${e.message}`));
      };
      worker.postMessage({ type: "init", setup } satisfies ToWorker);
    });
  }

  /** Null while the worker is healthy; the error that stopped it otherwise. */
  get failure(): Error | null {
    return this.#failure;
  }

  /** One image, encoded; queued behind earlier work. */
  sample(
    spec: SampleSpec,
    refs: { positive: RgbImage | null; negative: RgbImage | null },
    format: ImageFormat,
    opts: SubmitOptions = {},
  ): Promise<Uint8Array<ArrayBuffer>> {
    const call = { type: "sample", spec, ...refs, format } as const;
    return this.queue.submit(() => this.#call<Uint8Array<ArrayBuffer>>(call), opts);
  }

  /**
   * A dataset generation run. Aborting `opts.signal` removes it while queued; once it runs, the
   * batch in flight is finished and written, then it stops (resumable like `dipsy generate`).
   */
  generate(
    plan: JobPlan,
    hooks: GenerateHooks,
    opts: SubmitOptions = {},
  ): Promise<GenerateSummary> {
    const call = { type: "generate", ...plan, hold: !!hooks.beforeBatch } as const;
    return this.queue.submit((signal) => this.#call<GenerateSummary>(call, hooks, signal), opts);
  }

  /** Refuses new work, fails waiting work, waits for the running work, stops the worker. */
  async close(): Promise<void> {
    await this.queue.close();
    // The model's tensors live in the process, not in the worker: freed before it goes.
    await this.#call({ type: "close" }).catch(() => {});
    this.#worker.terminate();
    this.#fail(new EngineStoppedError("the engine was closed"));
  }

  /** Numbers `call` and sends it; aborting `signal` then asks the worker to stop it. */
  #call<T>(call: Call, hooks?: GenerateHooks, signal?: AbortSignal): Promise<T> {
    if (this.#failure) return Promise.reject(this.#failure);
    const id = this.#nextId++;
    const promise = new Promise<T>((resolve, reject) => {
      this.#pending.set(id, { resolve: resolve as (v: unknown) => void, reject, hooks });
      this.#worker.postMessage({ ...call, id } as ToWorker);
    });
    if (!signal) return promise;
    const cancel = () => this.#worker.postMessage({ type: "cancel", id } satisfies ToWorker);
    if (signal.aborted) cancel();
    else signal.addEventListener("abort", cancel, { once: true });
    return promise.finally(() => signal.removeEventListener("abort", cancel));
  }

  #receive(m: FromWorker): void {
    if (m.type === "ready" || m.type === "init-failed") return;
    const p = this.#pending.get(m.id);
    if (!p) return;
    switch (m.type) {
      case "done":
        this.#pending.delete(m.id);
        p.resolve(m.value);
        break;
      case "failed":
        this.#pending.delete(m.id);
        p.reject(new WorkError(m.error));
        break;
      case "progress":
        p.hooks?.onProgress?.(m.progress);
        break;
      case "image":
        p.hooks?.onImage?.(m.file);
        break;
      case "log":
        p.hooks?.onLog?.(m.message);
        break;
      case "batch": {
        const go = () =>
          this.#worker.postMessage({ type: "continue", id: m.id } satisfies ToWorker);
        Promise.resolve(p.hooks?.beforeBatch?.()).then(go, go);
        break;
      }
    }
  }

  #fail(e: Error): void {
    this.#failure ??= e;
    for (const [id, p] of this.#pending) {
      this.#pending.delete(id);
      p.reject(e);
    }
  }
}
