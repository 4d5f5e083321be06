/** Runtime controls: info, grad mode (per isolate), threads, seeds and CUDA housekeeping. */
import { ERR, GRAD, takeError } from "./call.ts";
import { type Device, deviceCode } from "./dtype.ts";
import { lib } from "./lib.ts";

const S = lib().symbols;

export interface RuntimeInfo {
  torch_version: string;
  abi_version: number;
  built_with_cuda: boolean;
  cuda_available: boolean;
  cuda_device_count: number;
  num_threads: number;
  cxx11_abi: boolean;
}

function takeString(p: Deno.PointerValue, op: string): string {
  if (p === null) throw takeError(op);
  const s = Deno.UnsafePointerView.getCString(p);
  S.dt_free_string(p);
  return s;
}

export function runtimeInfo(): RuntimeInfo {
  return JSON.parse(takeString(S.dt_runtime_info(ERR), "runtime_info"));
}

export function setGradEnabled(on: boolean): void {
  GRAD.on = on;
}

export function isGradEnabled(): boolean {
  return GRAD.on;
}

function withGradMode<T>(on: boolean, fn: () => T): T {
  const before = isGradEnabled();
  setGradEnabled(on);
  try {
    const r = fn();
    if (r instanceof Promise) throw new Error("noGrad/enableGrad take synchronous functions");
    return r;
  } finally {
    setGradEnabled(before);
  }
}

/** Runs fn without recording autograd history (inference). */
export function noGrad<T>(fn: () => T): T {
  return withGradMode(false, fn);
}

/** Runs fn with autograd recording on. */
export function enableGrad<T>(fn: () => T): T {
  return withGradMode(true, fn);
}

export function setNumThreads(n: number): void {
  if (S.dt_set_num_threads(n, ERR) < 0) throw takeError("set_num_threads");
}

/** Seeds libtorch's default generators (dropout and other draws made without a Generator). */
export function manualSeed(seed: number | bigint): void {
  if (S.dt_manual_seed(BigInt(seed), ERR) < 0) throw takeError("manual_seed");
}

export interface CudaMemoryStats {
  allocated_bytes: number;
  peak_allocated_bytes: number;
  reserved_bytes: number;
  peak_reserved_bytes: number;
}

export function cudaMemoryStats(device: Device = "cuda:0"): CudaMemoryStats {
  return JSON.parse(
    takeString(S.dt_cuda_memory_stats(deviceCode(device), ERR), "cuda_memory_stats"),
  );
}

export function cudaEmptyCache(): void {
  if (S.dt_cuda_empty_cache(ERR) < 0) throw takeError("cuda_empty_cache");
}

export function cudaSynchronize(device: Device = "cuda:0"): void {
  if (S.dt_cuda_synchronize(Math.max(0, deviceCode(device)), ERR) < 0) {
    throw takeError("cuda_synchronize");
  }
}

/** A CUDA graph: capture a fixed sequence of ops once, replay it with one launch. */
export class CudaGraph implements Disposable {
  #ptr: Deno.PointerObject | null;

  constructor() {
    const p = S.dt_cuda_graph_new(ERR);
    if (p === null) throw takeError("cuda_graph");
    this.#ptr = p;
  }

  #p(): Deno.PointerObject {
    if (this.#ptr === null) throw new Error("CUDA graph used after dispose");
    return this.#ptr;
  }

  /** Records every op that `fn` issues on the GPU (fn must not read results back). */
  capture(fn: () => void): void {
    if (S.dt_cuda_graph_capture_begin(this.#p(), ERR) < 0) throw takeError("cuda_graph_capture");
    let failure: unknown = undefined;
    try {
      fn();
    } catch (e) {
      failure = e;
    }
    // Capture must always be ended, or the stream stays in capture mode; fn's error wins.
    const ended = S.dt_cuda_graph_capture_end(this.#p(), ERR);
    if (failure !== undefined) throw failure;
    if (ended < 0) throw takeError("cuda_graph_capture");
  }

  replay(): void {
    if (S.dt_cuda_graph_replay(this.#p(), ERR) < 0) throw takeError("cuda_graph_replay");
  }

  dispose(): void {
    if (this.#ptr === null) return;
    S.dt_cuda_graph_free(this.#ptr);
    this.#ptr = null;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
