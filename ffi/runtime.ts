/**
 * Runtime controls: info, grad mode (per isolate), threads, seeds, TF32, the attention kernel
 * libtorch picks, and CUDA housekeeping (memory, sync checks, graphs).
 */
import { ERR, GRAD, takeError } from "./call.ts";
import { type Device, deviceCode } from "./dtype.ts";
import { lib } from "./lib.ts";
import type { Tensor } from "./tensor.ts";

const S = lib().symbols;

/** What the loaded shim reports about itself and the libtorch it runs on. */
export interface RuntimeInfo {
  /** libtorch's version, e.g. "2.13.0+cpu". */
  torch_version: string;
  /** The shim's C ABI version. */
  abi_version: number;
  /** Whether the shim was compiled against a CUDA libtorch. */
  built_with_cuda: boolean;
  /** Whether a CUDA device can be used now. */
  cuda_available: boolean;
  /** CUDA devices libtorch sees. */
  cuda_device_count: number;
  /** libtorch's intra-op thread count. */
  num_threads: number;
  /** Whether libtorch uses the C++11 std::string ABI. */
  cxx11_abi: boolean;
}

function takeString(p: Deno.PointerValue, op: string): string {
  if (p === null) throw takeError(op);
  const s = Deno.UnsafePointerView.getCString(p);
  S.dt_free_string(p);
  return s;
}

/** The shim's and libtorch's versions, CUDA availability and thread count. */
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

/** Sets libtorch's intra-op thread count (`torch.set_num_threads`). */
export function setNumThreads(n: number): void {
  if (S.dt_set_num_threads(n, ERR) < 0) throw takeError("set_num_threads");
}

/** Seeds libtorch's default generators (dropout and other draws made without a Generator). */
export function manualSeed(seed: number | bigint): void {
  if (S.dt_manual_seed(BigInt(seed), ERR) < 0) throw takeError("manual_seed");
}

/**
 * TF32 for float32 work on CUDA: cuBLAS matmuls and cuDNN convolutions. libtorch's defaults
 * (matmul off, convolutions on) are PyTorch's; tests that compare float32 with the CPU turn both
 * off.
 */
export function setAllowTf32(on: { matmul: boolean; conv: boolean }): void {
  if (S.dt_set_allow_tf32((on.matmul ? 1 : 0) | (on.conv ? 2 : 0), ERR) < 0) {
    throw takeError("set_allow_tf32");
  }
}

export function allowTf32(): { matmul: boolean; conv: boolean } {
  const bits = S.dt_allow_tf32(ERR);
  if (bits < 0) throw takeError("allow_tf32");
  return { matmul: (bits & 1) !== 0, conv: (bits & 2) !== 0 };
}

/** The kernels of scaled_dot_product_attention (at::SDPBackend). */
export type SdpaBackend = "math" | "flash" | "efficient" | "cudnn" | "overrideable" | "none";
const SDPA_BACKENDS: SdpaBackend[] = ["math", "flash", "efficient", "cudnn", "overrideable"];
const SDPA_OUT = new Int32Array(1);

/** The kernel `ops.sdpa` would run for these inputs ([..., L, E]; no dropout). */
export function sdpaBackend(
  q: Tensor,
  k: Tensor,
  v: Tensor,
  opts: { mask?: Tensor | null; causal?: boolean } = {},
): SdpaBackend {
  const status = S.dt_sdpa_backend(
    q.ptr,
    k.ptr,
    v.ptr,
    opts.mask?.ptr ?? null,
    opts.causal ? 1 : 0,
    SDPA_OUT,
    ERR,
  );
  if (status < 0) throw takeError("sdpa_backend");
  return SDPA_BACKENDS[SDPA_OUT[0]] ?? "none";
}

export interface CudaDevice {
  index: number;
  name: string;
  /** Compute capability, "9.0" for Hopper. */
  capability: string;
  memory_bytes: number;
  multiprocessors: number;
}

/** The CUDA devices libtorch sees (none without a CUDA build or a GPU). */
export function cudaDevices(): CudaDevice[] {
  return JSON.parse(takeString(S.dt_cuda_device_info(ERR), "cuda_device_info"));
}

export interface CudaMemoryStats {
  allocated_bytes: number;
  peak_allocated_bytes: number;
  reserved_bytes: number;
  peak_reserved_bytes: number;
}

export function cudaMemoryStats(device: Device = "cuda:0"): CudaMemoryStats {
  return JSON.parse(
    takeString(S.dt_cuda_memory_stats(cudaIndex(device), ERR), "cuda_memory_stats"),
  );
}

/** Starts the peak figures of cudaMemoryStats over from the current ones. */
export function cudaResetPeakMemoryStats(device: Device = "cuda:0"): void {
  if (S.dt_cuda_reset_peak_memory_stats(cudaIndex(device), ERR) < 0) {
    throw takeError("cuda_reset_peak_memory_stats");
  }
}

export function cudaEmptyCache(): void {
  if (S.dt_cuda_empty_cache(ERR) < 0) throw takeError("cuda_empty_cache");
}

export function cudaSynchronize(device: Device = "cuda:0"): void {
  if (S.dt_cuda_synchronize(cudaIndex(device), ERR) < 0) throw takeError("cuda_synchronize");
}

/**
 * libtorch's sync debug mode: "error" makes every call that waits for the GPU (a read-back, a
 * blocking copy, a synchronize) fail, which proves a loop free of host syncs.
 */
export function cudaSetSyncDebugMode(mode: "off" | "warn" | "error"): void {
  const code = { off: 0, warn: 1, error: 2 }[mode];
  if (S.dt_cuda_set_sync_debug_mode(code, ERR) < 0) throw takeError("cuda_set_sync_debug_mode");
}

function cudaIndex(device: Device): number {
  const code = deviceCode(device);
  if (code < 0) throw new TypeError(`expected a CUDA device, got "${device}"`);
  return code;
}

/**
 * A CUDA graph: capture a fixed sequence of GPU work once, replay it with one launch. The graph
 * owns a side stream, on which both its warm-up and its capture run (libtorch keeps per-stream
 * state, such as the cuBLAS workspace, that warm-up must create before capture may use it).
 */
export class CudaGraph implements Disposable {
  #ptr: Deno.PointerObject | null;

  /** Throws when there is no CUDA (a CPU build, or no GPU). */
  constructor() {
    const p = S.dt_cuda_graph_new(ERR);
    if (p === null) throw takeError("cuda_graph");
    this.#ptr = p;
  }

  #p(): Deno.PointerObject {
    if (this.#ptr === null) throw new Error("CUDA graph used after dispose");
    return this.#ptr;
  }

  /**
   * Runs `fn` eagerly on the graph's side stream, after the work queued so far; the current
   * stream waits for it afterwards, so its results can be used at once.
   */
  warmup<T>(fn: () => T): T {
    if (S.dt_cuda_graph_warmup_begin(this.#p(), ERR) < 0) throw takeError("cuda_graph_warmup");
    let result: T;
    try {
      result = fn();
    } catch (e) {
      // Back on the caller's stream whatever happened; fn's error wins over this one.
      if (S.dt_cuda_graph_warmup_end(this.#p(), ERR) < 0) takeError("cuda_graph_warmup");
      throw e;
    }
    if (S.dt_cuda_graph_warmup_end(this.#p(), ERR) < 0) throw takeError("cuda_graph_warmup");
    return result;
  }

  /**
   * Records every op that `fn` issues on the GPU; nothing runs until `replay`. fn must not wait
   * for the GPU (read values back, copy to the host). Whatever happens, the caller's stream is
   * current again afterwards; a failed capture leaves this graph unusable.
   */
  capture(fn: () => void): void {
    if (S.dt_cuda_graph_capture_begin(this.#p(), ERR) < 0) throw takeError("cuda_graph_capture");
    let failure: unknown = undefined;
    try {
      fn();
    } catch (e) {
      failure = e;
    }
    const ended = S.dt_cuda_graph_capture_end(this.#p(), ERR);
    const endError = ended < 0 ? takeError("cuda_graph_capture") : undefined;
    if (failure !== undefined) throw failure;
    if (endError) throw endError;
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
