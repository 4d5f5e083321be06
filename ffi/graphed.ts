/**
 * A function of tensors replayed as CUDA graphs: one graph per input signature (shapes, dtypes,
 * devices), captured after warm-up calls on the graph's side stream, with static input buffers
 * that every call copies its inputs into. Numbers become one-element float32 device tensors filled
 * in place, so a value that changes per call (a timestep) is read by the graph, not frozen in it.
 *
 * The wrapped function must be a fixed sequence of GPU work over its inputs: no reads back to the
 * host, no tensors made from host data, no branching on values. Eager execution is the fallback
 * and the reference: when a graph cannot be made or captured, the call says so once and runs
 * eagerly from then on, with the same results.
 */
import * as ops from "./ops.gen.ts";
import { CudaGraph } from "./runtime.ts";
import { keep, scope, type Tensor } from "./tensor.ts";

/** What the runner needs of a graph; CudaGraph's, or a stand-in in tests. */
export interface CallGraph extends Disposable {
  /** Runs fn eagerly, ordered with the work around it. */
  warmup<T>(fn: () => T): T;
  /** Records fn's work; returns its output, whose memory every replay overwrites. */
  capture(fn: () => Tensor): Tensor;
  replay(): void;
}

/** A CUDA graph as a CallGraph. */
export function cudaCallGraph(): CallGraph {
  const graph = new CudaGraph();
  return {
    warmup: (fn) => graph.warmup(fn),
    capture(fn) {
      let out: Tensor | undefined;
      graph.capture(() => {
        out = fn();
      });
      return out!;
    },
    replay: () => graph.replay(),
    [Symbol.dispose]: () => graph.dispose(),
  };
}

export type GraphArg = Tensor | number;

export interface GraphedCallOptions {
  /** Named in the fallback message. */
  name: string;
  /** Eager calls per signature before its capture (they make libtorch's lazy state). */
  warmup?: number;
  /** Makes the graphs (default: CUDA graphs, which need inputs on a CUDA device). */
  newGraph?: () => CallGraph;
  /**
   * Graphs kept at once; the least recently used one goes first. Each holds the memory of one
   * call's intermediates, so a long-lived caller that sees many shapes stays bounded.
   */
  maxGraphs?: number;
  /** Told once, when graphs turn out not to work; default: a warning on stderr. */
  onFallback?: (message: string) => void;
}

interface Entry {
  graph: CallGraph;
  calls: number;
  /** The static inputs and output, once captured. */
  inputs: Tensor[] | null;
  output: Tensor | null;
}

const DEFAULT_WARMUP = 2;
const DEFAULT_MAX_GRAPHS = 4;

export class GraphedCall implements Disposable {
  readonly #fn: (inputs: readonly Tensor[]) => Tensor;
  readonly #name: string;
  readonly #warmup: number;
  readonly #newGraph: () => CallGraph;
  readonly #cudaOnly: boolean;
  readonly #maxGraphs: number;
  readonly #onFallback: (message: string) => void;
  readonly #entries = new Map<string, Entry>();
  /** Why graphs were given up; every call is eager from then on. */
  #failed: string | null = null;
  #replays = 0;

  constructor(fn: (inputs: readonly Tensor[]) => Tensor, opts: GraphedCallOptions) {
    this.#fn = fn;
    this.#name = opts.name;
    this.#warmup = opts.warmup ?? DEFAULT_WARMUP;
    this.#newGraph = opts.newGraph ?? cudaCallGraph;
    this.#cudaOnly = opts.newGraph === undefined;
    this.#maxGraphs = opts.maxGraphs ?? DEFAULT_MAX_GRAPHS;
    this.#onFallback = opts.onFallback ??
      ((m) => console.error(`dipsy: warning: ${m}`));
  }

  /** Why graphs are off (null while they work). */
  get failure(): string | null {
    return this.#failed;
  }

  /** Signatures with a captured graph. */
  get graphs(): number {
    let n = 0;
    for (const e of this.#entries.values()) if (e.output) n++;
    return n;
  }

  /** Calls answered by a replay so far. */
  get replays(): number {
    return this.#replays;
  }

  /** fn(args), through the signature's graph once it is captured; a fresh tensor either way. */
  call(args: readonly GraphArg[]): Tensor {
    if (this.#failed !== null) return this.#eager(args);
    if (this.#cudaOnly && deviceOf(args) === "cpu") {
      this.#giveUp("CUDA graphs need inputs on a CUDA device, these are on the CPU");
      return this.#eager(args);
    }
    const key = signature(args);
    let entry = this.#entries.get(key);
    if (entry) {
      // most recently used last, so the first entry is the one to evict
      this.#entries.delete(key);
      this.#entries.set(key, entry);
    } else {
      if (this.#entries.size >= this.#maxGraphs) {
        const [oldKey, oldEntry] = this.#entries.entries().next().value!;
        this.#drop(oldKey, oldEntry);
      }
      let graph: CallGraph;
      try {
        graph = this.#newGraph();
      } catch (e) {
        this.#giveUp(`cannot make a CUDA graph (${message(e)})`);
        return this.#eager(args);
      }
      entry = { graph, calls: 0, inputs: null, output: null };
      this.#entries.set(key, entry);
    }
    if (entry.calls < this.#warmup) {
      entry.calls++;
      return entry.graph.warmup(() => this.#eager(args));
    }
    if (entry.output === null) {
      try {
        this.#capture(entry, args);
      } catch (e) {
        this.#drop(key, entry);
        this.#giveUp(`CUDA graph capture failed (${message(e)})`);
        return this.#eager(args);
      }
    } else {
      this.#load(entry.inputs!, args);
    }
    entry.graph.replay();
    this.#replays++;
    return ops.clone(entry.output!);
  }

  #eager(args: readonly GraphArg[]): Tensor {
    return scope(() => {
      const device = deviceOf(args);
      return this.#fn(args.map((a) => typeof a === "number" ? ops.full([1], a, "f32", device) : a));
    });
  }

  #capture(entry: Entry, args: readonly GraphArg[]): void {
    const device = deviceOf(args);
    entry.inputs = keep(
      args.map((a) => typeof a === "number" ? ops.full([1], a, "f32", device) : ops.clone(a)),
    );
    const inputs = entry.inputs;
    entry.output = keep(scope(() => entry.graph.capture(() => this.#fn(inputs))));
  }

  #load(inputs: readonly Tensor[], args: readonly GraphArg[]): void {
    args.forEach((a, i) => {
      if (typeof a === "number") ops.fill_(inputs[i], a);
      else ops.copy_(inputs[i], a);
    });
  }

  #drop(key: string, entry: Entry): void {
    this.#entries.delete(key);
    entry.graph[Symbol.dispose]();
    for (const t of entry.inputs ?? []) t.dispose();
    entry.output?.dispose();
    entry.inputs = entry.output = null;
  }

  #giveUp(reason: string): void {
    if (this.#failed !== null) return;
    this.#failed = reason;
    for (const [key, entry] of [...this.#entries]) this.#drop(key, entry);
    this.#onFallback(`${this.#name}: ${reason}; running eagerly from now on`);
  }

  dispose(): void {
    for (const [key, entry] of [...this.#entries]) this.#drop(key, entry);
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

function signature(args: readonly GraphArg[]): string {
  return args.map((a) =>
    typeof a === "number" ? "n" : `${a.dtype}@${a.device}[${a.shape.join(",")}]`
  ).join(" ");
}

function deviceOf(args: readonly GraphArg[]) {
  for (const a of args) if (typeof a !== "number") return a.device;
  return "cpu" as const;
}

/** The first line: libtorch's CUDA errors append lines of advice, a warning keeps one. */
function message(e: unknown): string {
  return (e instanceof Error ? e.message : String(e)).split("\n")[0];
}
