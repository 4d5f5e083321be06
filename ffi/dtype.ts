/** Element types and devices, and their codes on the wire (c10::ScalarType values). */

/** An element type: unsigned and signed integers, floats (f16, bf16, f32, f64), bool. */
export type DType = "u8" | "i8" | "i16" | "i32" | "i64" | "f16" | "f32" | "f64" | "bool" | "bf16";
/** The CPU, the default CUDA device, or CUDA device N. */
export type Device = "cpu" | "cuda" | `cuda:${number}`;

const CODES: Record<DType, number> = {
  u8: 0,
  i8: 1,
  i16: 2,
  i32: 3,
  i64: 4,
  f16: 5,
  f32: 6,
  f64: 7,
  bool: 11,
  bf16: 15,
};
const BY_CODE = new Map<number, DType>(
  Object.entries(CODES).map(([k, v]) => [v, k as DType]),
);

export const ELEMENT_SIZE: Record<DType, number> = {
  u8: 1,
  i8: 1,
  i16: 2,
  i32: 4,
  i64: 8,
  f16: 2,
  f32: 4,
  f64: 8,
  bool: 1,
  bf16: 2,
};

/** The typed array that holds one element type on the host (16-bit floats as raw Uint16). */
export type HostArray =
  | Uint8Array
  | Int8Array
  | Int16Array
  | Int32Array
  | BigInt64Array
  | Uint16Array
  | Float32Array
  | Float64Array;

export function hostArray(dtype: DType, buffer: ArrayBuffer): HostArray {
  switch (dtype) {
    case "u8":
    case "bool":
      return new Uint8Array(buffer);
    case "i8":
      return new Int8Array(buffer);
    case "i16":
      return new Int16Array(buffer);
    case "i32":
      return new Int32Array(buffer);
    case "i64":
      return new BigInt64Array(buffer);
    case "f16":
    case "bf16":
      return new Uint16Array(buffer);
    case "f32":
      return new Float32Array(buffer);
    case "f64":
      return new Float64Array(buffer);
  }
}

/** Whether `s` names a DType. */
export function isDType(s: string): s is DType {
  return s in CODES;
}

export function dtypeCode(dtype: DType | undefined): number {
  if (dtype === undefined) return -1;
  const code = CODES[dtype];
  if (code === undefined) throw new TypeError(`unknown dtype "${dtype}"`);
  return code;
}

export function dtypeFromCode(code: number): DType {
  const d = BY_CODE.get(code);
  if (!d) throw new TypeError(`tensor has an element type dipsy does not handle (code ${code})`);
  return d;
}

/** -1 is the CPU, k >= 0 is cuda:k, -2 means "keep the tensor's device" (for `to`). */
export function deviceCode(device: Device | undefined): number {
  if (device === undefined) return -2;
  if (device === "cpu") return -1;
  if (device === "cuda") return 0;
  const m = /^cuda:(\d+)$/.exec(device);
  if (!m) throw new TypeError(`unknown device "${device}" (use "cpu", "cuda" or "cuda:N")`);
  return Number(m[1]);
}

export function deviceFromCode(code: number): Device {
  return code < 0 ? "cpu" : `cuda:${code}`;
}

/** Whether `s` names a Device. */
export function isDevice(s: string): s is Device {
  return s === "cpu" || s === "cuda" || /^cuda:\d+$/.test(s);
}
