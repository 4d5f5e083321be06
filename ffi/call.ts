/**
 * Calling conventions shared by every binding: the error out-parameter, scratch buffers for list
 * arguments and list results, and turning raw handles into Tensors.
 */
import { TorchError } from "./errors.ts";
import { lib } from "./lib.ts";
import { Tensor } from "./tensor.ts";

export { deviceCode, dtypeCode } from "./dtype.ts";

/**
 * The `char** err` slot. Sync calls run on this thread one at a time, so one slot is enough;
 * nonblocking calls must bring their own (see `errorSlot`).
 */
export const ERR = new Uint8Array(8);
const ERR_VIEW = new BigUint64Array(ERR.buffer);

/**
 * This isolate's grad mode, passed to every op: libtorch keeps grad mode per thread, and each
 * isolate (test module, Worker) must be able to differ. Change it through runtime.ts.
 */
export const GRAD = { on: true };

export function errorSlot(): Uint8Array {
  return new Uint8Array(8);
}

/** Reads and frees the message the shim left in `slot`. */
export function takeError(op: string, slot: Uint8Array = ERR): TorchError {
  const addr = new BigUint64Array(slot.buffer, slot.byteOffset, 1)[0];
  const p = Deno.UnsafePointer.create(addr);
  if (p === null) return new TorchError(op, "failed without a message");
  const msg = Deno.UnsafePointerView.getCString(p);
  lib().symbols.dt_free_string(p);
  if (slot === ERR) ERR_VIEW[0] = 0n;
  return new TorchError(op, msg.trim());
}

export function checkStatus(status: number | bigint, op: string): void {
  if (status < 0) throw takeError(op);
}

export function wrapTensor(p: Deno.PointerValue, op: string): Tensor {
  if (p === null) throw takeError(op);
  return new Tensor(p, op);
}

// Integer-list arguments: each argument of a call gets its own region of one scratch buffer.
const INT_SLOTS = 4;
const INT_SLOT_LEN = 16;
const INT_SCRATCH = new Int32Array(INT_SLOTS * INT_SLOT_LEN);

export function int32List(values: readonly number[], slot: number): Int32Array {
  const view = values.length > INT_SLOT_LEN || slot >= INT_SLOTS
    ? new Int32Array(values.length)
    : INT_SCRATCH.subarray(slot * INT_SLOT_LEN, slot * INT_SLOT_LEN + values.length);
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (!Number.isInteger(v) || v > 0x7fffffff || v < -0x80000000) {
      throw new TypeError(`expected a 32-bit integer, got ${v}`);
    }
    view[i] = v;
  }
  return view;
}

// Tensor-list arguments: handle addresses in per-argument regions of one scratch buffer, so a call
// allocates nothing (a fresh array per call cost about as much as the op it fed).
const PTR_SLOTS = 4;
const PTR_SLOT_LEN = 64;
const PTR_SCRATCH = new BigUint64Array(PTR_SLOTS * PTR_SLOT_LEN);

export function ptrList(tensors: readonly Tensor[], slot = 0): BigUint64Array {
  const view = tensors.length > PTR_SLOT_LEN || slot >= PTR_SLOTS
    ? new BigUint64Array(tensors.length)
    : PTR_SCRATCH.subarray(slot * PTR_SLOT_LEN, slot * PTR_SLOT_LEN + tensors.length);
  for (let i = 0; i < tensors.length; i++) view[i] = tensors[i].address;
  return view;
}

/** Where list-returning and scalar-returning ops write their results. */
export const SCRATCH_CAP = 256;
export const SCRATCH_OUT = new BigUint64Array(SCRATCH_CAP);
const SCRATCH_F64 = new Float64Array(SCRATCH_OUT.buffer);

export function readTensorList(n: number | bigint, op: string): Tensor[] {
  if (n < 0) throw takeError(op);
  const out: Tensor[] = [];
  for (let i = 0; i < Number(n); i++) {
    out.push(new Tensor(Deno.UnsafePointer.create(SCRATCH_OUT[i])!, op));
  }
  return out;
}

export function readOptionalTensor(): Tensor | null {
  const p = Deno.UnsafePointer.create(SCRATCH_OUT[0]);
  return p === null ? null : new Tensor(p, "grad");
}

export function readF64(): number {
  return SCRATCH_F64[0];
}

/** FFI calls made by one piece of code, by kind (see `countFfiCalls`). */
export interface FfiCallCount {
  /** Calls to op wrappers (`dt_op_*`). */
  ops: number;
  /** Of those, ops that only make a view (reshape, permute, slice, ...). */
  views: number;
  /** Calls that free tensor handles (one per call, whatever the number of handles). */
  frees: number;
  /** Shape/dtype/device reads (`dt_tensor_meta`). */
  meta: number;
  /** Anything else (host copies, sharing, generators, ...). */
  other: number;
  total: number;
  /** Calls per native symbol. */
  bySymbol: Record<string, number>;
}

const VIEW_OPS = new Set([
  "reshape",
  "permute",
  "transpose",
  "unsqueeze",
  "squeeze",
  "flatten",
  "expand",
  "slice",
  "narrow",
  "select",
  "chunk",
  "split",
  "detach",
]);

/**
 * Runs `fn` with every binding of the shim wrapped by a counter, and returns its result with the
 * number of FFI calls it made. Wrapped calls lose Deno's fast-call path, so this is for counting,
 * not for timing.
 */
export function countFfiCalls<T>(fn: () => T): { result: T; calls: FfiCallCount } {
  const symbols = lib().symbols as unknown as Record<string, (...a: unknown[]) => unknown>;
  const original = { ...symbols };
  const bySymbol: Record<string, number> = {};
  for (const [name, f] of Object.entries(original)) {
    symbols[name] = (...args: unknown[]) => {
      bySymbol[name] = (bySymbol[name] ?? 0) + 1;
      return f(...args);
    };
  }
  let result: T;
  try {
    result = fn();
    if (result instanceof Promise) throw new Error("countFfiCalls takes a synchronous function");
  } finally {
    Object.assign(symbols, original);
  }
  const calls: FfiCallCount = {
    ops: 0,
    views: 0,
    frees: 0,
    meta: 0,
    other: 0,
    total: 0,
    bySymbol,
  };
  for (const [name, n] of Object.entries(bySymbol)) {
    calls.total += n;
    if (name.startsWith("dt_op_")) {
      calls.ops += n;
      if (VIEW_OPS.has(name.slice("dt_op_".length))) calls.views += n;
    } else if (name.startsWith("dt_tensor_free")) calls.frees += n;
    else if (name === "dt_tensor_meta") calls.meta += n;
    else calls.other += n;
  }
  return { result, calls };
}
