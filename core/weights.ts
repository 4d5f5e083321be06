/**
 * Pull-style weight loading: each layer asks a prefixed source for exactly the tensors it needs,
 * with the shape it expects. Sources: safetensors files (real checkpoints), seeded random values
 * (tiny presets), or an in-memory map (tests). Loading casts and moves at read time, so a model is
 * never held twice.
 */
import {
  type Device,
  type DType,
  Generator,
  ops,
  SafetensorsFile,
  type Tensor,
} from "../ffi/mod.ts";
import { UserError } from "../ffi/errors.ts";

/** How a random source initialises a tensor that has no file behind it. */
export type Init = "normal" | "zeros" | "ones";

/** A weights file that is missing, or whose keys or shapes are not the model's. */
export class WeightError extends UserError {}

export interface WeightSource {
  readonly dtype: DType;
  readonly device: Device;
  /** A tensor of exactly `shape`; a missing key or another shape is a WeightError. */
  get(name: string, shape: readonly number[], init?: Init): Tensor;
  has(name: string): boolean;
  /** The same source seen under `prefix.`. */
  sub(prefix: string): WeightSource;
  /** Throws when keys under this source's root were never asked for (a mismatched checkpoint). */
  assertAllUsed(ignore?: RegExp): void;
}

const join = (prefix: string, name: string) => (prefix ? `${prefix}.${name}` : name);
const fmt = (s: readonly number[]) => `[${s.join(", ")}]`;

abstract class BaseSource implements WeightSource {
  constructor(
    readonly prefix: string,
    readonly dtype: DType,
    readonly device: Device,
    protected readonly used: Set<string>,
  ) {}
  abstract get(name: string, shape: readonly number[], init?: Init): Tensor;
  abstract has(name: string): boolean;
  abstract sub(prefix: string): WeightSource;
  protected abstract allKeys(): string[];
  protected abstract describe(): string;

  assertAllUsed(ignore?: RegExp): void {
    const root = this.prefix ? this.prefix + "." : "";
    const unused = this.allKeys().filter((k) =>
      k.startsWith(root) && !this.used.has(k) && !(ignore && ignore.test(k))
    );
    if (unused.length) {
      const shown = unused.slice(0, 8).join(", ") + (unused.length > 8 ? ", ..." : "");
      throw new WeightError(
        `${this.describe()}: ${unused.length} unexpected key(s) the model does not use: ${shown}`,
      );
    }
  }
}

/** Weights from one or more safetensors files (sharded checkpoints list every shard). */
export class SafetensorsSource extends BaseSource {
  constructor(
    readonly files: SafetensorsFile[],
    dtype: DType = "f32",
    device: Device = "cpu",
    prefix = "",
    used: Set<string> = new Set<string>(),
  ) {
    super(prefix, dtype, device, used);
  }

  static open(
    paths: string | string[],
    dtype: DType = "f32",
    device: Device = "cpu",
  ): SafetensorsSource {
    const list = Array.isArray(paths) ? paths : [paths];
    return new SafetensorsSource(list.map((p) => SafetensorsFile.open(p)), dtype, device);
  }

  #find(key: string): SafetensorsFile | undefined {
    return this.files.find((f) => f.has(key));
  }

  has(name: string): boolean {
    return this.#find(join(this.prefix, name)) !== undefined;
  }

  get(name: string, shape: readonly number[]): Tensor {
    const key = join(this.prefix, name);
    const file = this.#find(key);
    if (!file) {
      throw new WeightError(
        `${this.describe()}: missing key "${key}" (expected shape ${fmt(shape)})`,
      );
    }
    const info = file.info(key);
    if (info.shape.length !== shape.length || info.shape.some((d, i) => d !== shape[i])) {
      throw new WeightError(
        `${file.path}: key "${key}" has shape ${fmt(info.shape)}, the model expects ${fmt(shape)}`,
      );
    }
    this.used.add(key);
    const dtype = isFloat(info.dtype) ? this.dtype : undefined;
    return file.load(key, { dtype, device: this.device });
  }

  sub(prefix: string): WeightSource {
    return new SafetensorsSource(
      this.files,
      this.dtype,
      this.device,
      join(this.prefix, prefix),
      this.used,
    );
  }

  protected allKeys(): string[] {
    return this.files.flatMap((f) => f.keys());
  }

  protected describe(): string {
    return this.files.map((f) => f.path).join(", ");
  }
}

function isFloat(d: DType): boolean {
  return d === "f32" || d === "f16" || d === "bf16" || d === "f64";
}

/** 32-bit FNV-1a: turns a key into a per-tensor seed so values do not depend on load order. */
function hashKey(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h;
}

/**
 * Seeded random weights for tiny presets and tests: N(0, std) for weights, exact zeros / ones for
 * biases and norm scales. The same seed and key always give the same tensor.
 */
export class RandomSource extends BaseSource {
  constructor(
    readonly seed: number,
    dtype: DType = "f32",
    device: Device = "cpu",
    readonly std = 0.02,
    prefix = "",
    used: Set<string> = new Set<string>(),
  ) {
    super(prefix, dtype, device, used);
  }

  has(): boolean {
    return true;
  }

  get(name: string, shape: readonly number[], init: Init = "normal"): Tensor {
    const key = join(this.prefix, name);
    this.used.add(key);
    if (init === "zeros") return ops.zeros(shape, this.dtype, this.device);
    if (init === "ones") return ops.ones(shape, this.dtype, this.device);
    using g = new Generator(BigInt(this.seed) * 4294967296n + BigInt(hashKey(key)));
    using r = ops.randn(shape, "f32", "cpu", g);
    using s = ops.mulScalar(r, this.std);
    return ops.to(s, this.dtype, this.device);
  }

  sub(prefix: string): WeightSource {
    return new RandomSource(
      this.seed,
      this.dtype,
      this.device,
      this.std,
      join(this.prefix, prefix),
      this.used,
    );
  }

  protected allKeys(): string[] {
    return [];
  }

  protected describe(): string {
    return `random weights (seed ${this.seed})`;
  }
}

/** Weights from tensors already in memory (tests, converted checkpoints). Not copied. */
export class MapSource extends BaseSource {
  constructor(
    readonly map: ReadonlyMap<string, Tensor>,
    dtype: DType = "f32",
    device: Device = "cpu",
    prefix = "",
    used: Set<string> = new Set<string>(),
  ) {
    super(prefix, dtype, device, used);
  }

  has(name: string): boolean {
    return this.map.has(join(this.prefix, name));
  }

  get(name: string, shape: readonly number[]): Tensor {
    const key = join(this.prefix, name);
    const t = this.map.get(key);
    if (!t) {
      throw new WeightError(`in-memory weights: missing key "${key}" (expected ${fmt(shape)})`);
    }
    if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
      throw new WeightError(
        `in-memory weights: key "${key}" has shape ${fmt(t.shape)}, the model expects ${
          fmt(shape)
        }`,
      );
    }
    this.used.add(key);
    return ops.to(t, isFloat(t.dtype) ? this.dtype : undefined, this.device);
  }

  sub(prefix: string): WeightSource {
    return new MapSource(this.map, this.dtype, this.device, join(this.prefix, prefix), this.used);
  }

  protected allKeys(): string[] {
    return [...this.map.keys()];
  }

  protected describe(): string {
    return "in-memory weights";
  }
}
