/**
 * The Tensor handle and memory scopes.
 *
 * Native memory is freed deterministically: by `dispose()` / `using`, or by the scope that was
 * innermost when the tensor was created. A FinalizationRegistry only backs up tensors that live
 * outside every scope; it cannot be the strategy because it never runs inside a synchronous loop.
 */
import {
  type Device,
  deviceCode,
  deviceFromCode,
  type DType,
  dtypeCode,
  dtypeFromCode,
  ELEMENT_SIZE,
  type HostArray,
  hostArray,
} from "./dtype.ts";
import { DisposedTensorError } from "./errors.ts";
import { lib } from "./lib.ts";
import * as ops from "./ops.gen.ts";
import { ERR, takeError } from "./call.ts";

const S = lib().symbols;

/**
 * Live handles made by this isolate. The shim's own counter is process-wide, and Deno runs test
 * modules (and Workers) as isolates of one process, so leak checks read this one.
 */
let liveHandles = 0;

const finalizer = new FinalizationRegistry<Deno.PointerObject>((p) => {
  liveHandles--;
  S.dt_tensor_free(p);
});

interface Meta {
  dtype: DType;
  device: Device;
  shape: number[];
}

const META = new BigInt64Array(4 + 16);
const META_BYTES = new Uint8Array(META.buffer);

class Scope {
  readonly tensors: Tensor[] = [];
}
const scopes: Scope[] = [];

/**
 * Handles to free in one FFI call: a scope's temporaries go back together, not one call each
 * (a UNet forward made more free calls than op calls).
 */
class FreeBatch {
  #addresses = new BigUint64Array(256);
  #n = 0;

  add(address: bigint): void {
    if (this.#n === this.#addresses.length) {
      const grown = new BigUint64Array(this.#addresses.length * 2);
      grown.set(this.#addresses);
      this.#addresses = grown;
    }
    this.#addresses[this.#n++] = address;
  }

  flush(): void {
    if (this.#n > 0) S.dt_tensor_free_many(this.#addresses, this.#n);
    this.#n = 0;
  }
}

/**
 * A libtorch tensor, held through a native handle. Every op returns a new tensor that the caller
 * owns: free it with `dispose()` (or `using`), or let the innermost `scope` free it.
 */
export class Tensor implements Disposable {
  #ptr: Deno.PointerObject | null;
  #address: bigint | undefined;
  #meta: Meta | undefined;
  /**
   * The scope that will free this tensor, if any.
   * @internal
   */
  _scope: Scope | null = null;
  /** Which op made it, for error messages about disposed tensors. */
  readonly origin: string;

  /** Takes ownership of a native handle; `origin` names the op that made it. */
  constructor(ptr: Deno.PointerObject, origin: string) {
    this.#ptr = ptr;
    this.origin = origin;
    liveHandles++;
    const top = scopes[scopes.length - 1];
    if (top) {
      this._scope = top;
      top.tensors.push(this);
    } else {
      finalizer.register(this, ptr, this);
    }
  }

  /** The raw handle; throws once the tensor was disposed. */
  get ptr(): Deno.PointerObject {
    if (this.#ptr === null) throw new DisposedTensorError(this.origin);
    return this.#ptr;
  }

  /** The handle as a number, for tensor-list arguments (computed once: BigInt is not free). */
  get address(): bigint {
    return this.#address ??= BigInt(Deno.UnsafePointer.value(this.ptr));
  }

  /** Whether the handle was freed. */
  get disposed(): boolean {
    return this.#ptr === null;
  }

  /** Frees the native handle. Idempotent. */
  dispose(): void {
    const p = this.#ptr;
    if (p === null) return;
    this.#ptr = null;
    const scope = this._scope;
    if (scope === null) finalizer.unregister(this);
    // Made and freed at once is the common pattern: leave the scope's list as it was, so a long
    // scope does not accumulate dead tensors.
    else if (scope.tensors[scope.tensors.length - 1] === this) scope.tensors.pop();
    this._scope = null;
    liveHandles--;
    S.dt_tensor_free(p);
  }

  /**
   * Marks the tensor disposed and hands its handle's address to `batch`, which frees it with
   * others in one call. The caller drops it from its scope's list.
   * @internal
   */
  _releaseInto(batch: FreeBatch): void {
    if (this.#ptr === null) return;
    batch.add(this.#address ?? BigInt(Deno.UnsafePointer.value(this.#ptr)));
    if (this._scope === null) finalizer.unregister(this);
    this.#ptr = null;
    this._scope = null;
    liveHandles--;
  }

  /** `dispose()`, for `using`. */
  [Symbol.dispose](): void {
    this.dispose();
  }

  #readMeta(): Meta {
    if (this.#meta) return this.#meta;
    if (S.dt_tensor_meta(this.ptr, META_BYTES, META.length, ERR) < 0) throw takeError("meta");
    const ndim = Number(META[3]);
    const shape = new Array<number>(ndim);
    for (let i = 0; i < ndim; i++) shape[i] = Number(META[4 + i]);
    this.#meta = {
      dtype: dtypeFromCode(Number(META[0])),
      device: deviceFromCode(Number(META[1])),
      shape,
    };
    return this.#meta;
  }

  /** The size of each dimension. */
  get shape(): readonly number[] {
    return this.#readMeta().shape;
  }
  /** The element type. */
  get dtype(): DType {
    return this.#readMeta().dtype;
  }
  /** Where the data lives. */
  get device(): Device {
    return this.#readMeta().device;
  }
  /** The number of dimensions. */
  get ndim(): number {
    return this.#readMeta().shape.length;
  }
  /** The number of elements. */
  get numel(): number {
    return this.#readMeta().shape.reduce((a, b) => a * b, 1);
  }
  /** Whether autograd records ops on it. */
  get requiresGrad(): boolean {
    if (S.dt_tensor_meta(this.ptr, META_BYTES, META.length, ERR) < 0) throw takeError("meta");
    return META[2] !== 0n;
  }

  /** Size of one dimension; negative dims count from the end. */
  size(dim: number): number {
    const s = this.shape;
    return s[dim < 0 ? s.length + dim : dim];
  }

  /** Copies the data to a host typed array (16-bit floats come back as raw Uint16Array). */
  toHost(): HostArray {
    const bytes = this.numel * ELEMENT_SIZE[this.dtype];
    const buf = new ArrayBuffer(bytes);
    if (S.dt_to_host(this.ptr, new Uint8Array(buf), BigInt(bytes), ERR) < 0) {
      throw takeError("to_host");
    }
    return hostArray(this.dtype, buf);
  }

  /** The values as float64 numbers (casts 16-bit and integer types first). */
  toFloat64(): Float64Array {
    if (this.dtype === "f64") return this.toHost() as Float64Array;
    using t = ops.to(this, "f64", "cpu");
    return t.toHost() as Float64Array;
  }

  /** The single value of a one-element tensor. */
  item(): number {
    return ops.item(this);
  }

  // Convenience methods: numbers mean scalars, so `x.mul(0.5)` and `x.mul(y)` both read well.
  /** this + o (broadcasting; a number is a scalar). */
  add(o: Tensor | number): Tensor {
    return typeof o === "number" ? ops.addScalar(this, o) : ops.add(this, o);
  }
  /** this - o (broadcasting; a number is a scalar). */
  sub(o: Tensor | number): Tensor {
    return typeof o === "number" ? ops.subScalar(this, o) : ops.sub(this, o);
  }
  /** this * o (broadcasting; a number is a scalar). */
  mul(o: Tensor | number): Tensor {
    return typeof o === "number" ? ops.mulScalar(this, o) : ops.mul(this, o);
  }
  /** this / o (broadcasting; a number is a scalar). */
  div(o: Tensor | number): Tensor {
    return typeof o === "number" ? ops.divScalar(this, o) : ops.div(this, o);
  }
  /** -this. */
  neg(): Tensor {
    return ops.neg(this);
  }
  /** Matrix product, as `torch.matmul`. */
  matmul(o: Tensor): Tensor {
    return ops.matmul(this, o);
  }
  /** The same elements in another shape (a view when possible). */
  reshape(shape: readonly number[]): Tensor {
    return ops.reshape(this, shape);
  }
  /** The dimensions reordered (a view). */
  permute(dims: readonly number[]): Tensor {
    return ops.permute(this, dims);
  }
  /** Dimensions d0 and d1 swapped (a view). */
  transpose(d0: number, d1: number): Tensor {
    return ops.transpose(this, d0, d1);
  }
  /** The data laid out contiguously (this tensor's data when it already is). */
  contiguous(): Tensor {
    return ops.contiguous(this);
  }
  /** A dimension of size 1 inserted at `dim`. */
  unsqueeze(dim: number): Tensor {
    return ops.unsqueeze(this, dim);
  }
  /** Dimension `dim` removed when its size is 1. */
  squeeze(dim: number): Tensor {
    return ops.squeeze(this, dim);
  }
  /** Dimensions start..end (inclusive) merged into one. */
  flatten(start = 0, end = -1): Tensor {
    return ops.flatten(this, start, end);
  }
  /** `chunks` near-equal views along `dim`. */
  chunk(chunks: number, dim = 0): Tensor[] {
    return ops.chunk(this, chunks, dim);
  }
  /** Softmax along `dim`. */
  softmax(dim: number): Tensor {
    return ops.softmax(this, dim);
  }
  /** The sum over `dims`, or of every element when none are given. */
  sum(dims?: readonly number[], keepdim = false): Tensor {
    return dims === undefined ? ops.sumAll(this) : ops.sum(this, dims, keepdim);
  }
  /** The mean over `dims`, or of every element when none are given. */
  mean(dims?: readonly number[], keepdim = false): Tensor {
    return dims === undefined ? ops.meanAll(this) : ops.mean(this, dims, keepdim);
  }
  /** Casts and/or moves; returns a new handle even when nothing changes. */
  to(target: { dtype?: DType; device?: Device } | DType | Device): Tensor {
    const t = typeof target === "string"
      ? (target === "cpu" || target.startsWith("cuda")
        ? { device: target as Device }
        : { dtype: target as DType })
      : target;
    return ops.to(this, t.dtype, t.device);
  }
  /** A copy of the data. */
  clone(): Tensor {
    return ops.clone(this);
  }
  /** The same data, outside the autograd graph. */
  detach(): Tensor {
    return ops.detach(this);
  }
  /** Another handle to the same tensor, with its own lifetime. */
  share(): Tensor {
    const p = S.dt_tensor_share(this.ptr, ERR);
    if (p === null) throw takeError("share");
    return new Tensor(p, this.origin);
  }

  /** A short description: dtype, device and shape. */
  toString(): string {
    if (this.disposed) return `Tensor(disposed, from ${this.origin})`;
    return `Tensor(${this.dtype}, ${this.device}, [${this.shape.join(", ")}])`;
  }
}

/** A fresh CPU tensor holding a copy of host data (16-bit floats are given as raw Uint16 bits). */
export function fromHost(
  data: ArrayLike<number> | HostArray,
  shape: readonly number[],
  dtype: DType = "f32",
): Tensor {
  const numel = shape.reduce((a, b) => a * b, 1);
  if (data.length !== numel) {
    throw new RangeError(`fromHost: ${data.length} values do not fill shape [${shape.join(", ")}]`);
  }
  const host = hostArray(dtype, new ArrayBuffer(numel * ELEMENT_SIZE[dtype]));
  if (host instanceof BigInt64Array && !(data instanceof BigInt64Array)) {
    for (let i = 0; i < numel; i++) host[i] = BigInt((data as ArrayLike<number>)[i]);
  } else if ((dtype === "f16" || dtype === "bf16") && !(data instanceof Uint16Array)) {
    throw new TypeError(
      `fromHost: give ${dtype} data as raw Uint16Array bits, or cast after loading`,
    );
  } else {
    (host as Float64Array).set(data as ArrayLike<number>);
  }
  const bytes = new Uint8Array(host.buffer);
  const shp = Int32Array.from(shape);
  const p = S.dt_from_host(
    bytes,
    BigInt(bytes.byteLength),
    shp,
    shape.length,
    dtypeCode(dtype),
    ERR,
  );
  if (p === null) throw takeError("from_host");
  return new Tensor(p, "from_host");
}

/** A one-element f32 (or given dtype) tensor. */
export function scalar(value: number, dtype: DType = "f32", device?: Device): Tensor {
  return ops.full([], value, dtype, device ?? "cpu");
}

function collect(value: unknown, out: Tensor[], depth = 0): void {
  if (depth > 4 || value === null || typeof value !== "object") return;
  if (value instanceof Tensor) {
    out.push(value);
  } else if (Array.isArray(value)) {
    for (const v of value) collect(v, out, depth + 1);
  } else if (value instanceof Map) {
    for (const v of value.values()) collect(v, out, depth + 1);
  } else if (Object.getPrototypeOf(value) === Object.prototype) {
    for (const v of Object.values(value)) collect(v, out, depth + 1);
  }
}

function enter(): Scope {
  const s = new Scope();
  scopes.push(s);
  return s;
}

/** One batch serves every exit: an exit runs no user code, so exits never overlap. */
const FREED = new FreeBatch();

function exit(s: Scope, result: unknown): void {
  if (scopes[scopes.length - 1] !== s) throw new Error("memory scopes exited out of order");
  scopes.pop();
  const escaping: Tensor[] = [];
  collect(result, escaping);
  const keepSet = escaping.length ? new Set(escaping.filter((t) => t._scope === s)) : null;
  try {
    for (const t of s.tensors) {
      if (t._scope !== s) continue; // kept or already handed on
      if (keepSet?.has(t)) {
        adopt(t);
      } else {
        t._releaseInto(FREED);
      }
    }
    s.tensors.length = 0;
  } finally {
    FREED.flush();
  }
}

/** Moves a tensor to the current innermost scope, or to GC backup when there is none. */
function adopt(t: Tensor): void {
  if (t.disposed) return;
  const top = scopes[scopes.length - 1];
  if (top) {
    t._scope = top;
    top.tensors.push(t);
  } else {
    t._scope = null;
    finalizer.register(t, t.ptr, t);
  }
}

/**
 * Runs `fn` in a memory scope: every tensor created inside that is not returned (directly, or in
 * an array / plain object / Map) or kept is freed when it returns or throws.
 */
export function scope<T>(fn: () => T): T {
  const s = enter();
  let result: T | undefined;
  try {
    result = fn();
    if (result instanceof Promise) {
      throw new Error("scope() got an async function: use scopeAsync()");
    }
    return result;
  } finally {
    exit(s, result);
  }
}

/**
 * The async form of `scope`. The scope stack is global, so another async task that creates
 * tensors while this one awaits would register them here: run one engine job at a time.
 */
export async function scopeAsync<T>(fn: () => Promise<T>): Promise<T> {
  const s = enter();
  let result: T | undefined;
  try {
    result = await fn();
    return result;
  } finally {
    exit(s, result);
  }
}

/** Takes tensors out of scope management: the caller now owns them (dispose them yourself). */
export function keep<T extends Tensor | readonly Tensor[]>(t: T): T {
  const list = Array.isArray(t) ? t as readonly Tensor[] : [t as Tensor];
  for (const x of list) {
    if (x._scope === null) continue;
    x._scope = null;
    finalizer.register(x, x.ptr, x);
  }
  return t;
}

/** Disposes every tensor found in a value (array, plain object, Map), in one native call. */
export function disposeAll(value: unknown): void {
  const found: Tensor[] = [];
  collect(value, found);
  try {
    for (const t of found) {
      const scope = t._scope;
      t._releaseInto(FREED);
      // as dispose() does, so a long scope does not keep the dead tensor listed
      if (scope && scope.tensors[scope.tensors.length - 1] === t) scope.tensors.pop();
    }
  } finally {
    FREED.flush();
  }
}

/** Counts of live native tensor handles, for leak checks. */
export interface MemoryInfo {
  /** Live tensor handles created by this isolate (views count once each). */
  handles: number;
  /** Live handles of the whole process (all isolates and Workers). */
  processHandles: number;
  /** Logical bytes of the process's live handles (numel x element size, per handle). */
  processBytes: number;
}

/** Live tensor handles of this isolate and of the whole process, and their bytes. */
export function memory(): MemoryInfo {
  return {
    handles: liveHandles,
    processHandles: Number(S.dt_live_handles()),
    processBytes: Number(S.dt_live_bytes()),
  };
}

export { deviceCode };
