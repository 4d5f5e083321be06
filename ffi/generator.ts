/** Seeded random generators, so every random draw can be reproduced from a seed. */
import { ERR, takeError } from "./call.ts";
import { type Device, deviceCode } from "./dtype.ts";
import { lib } from "./lib.ts";

const S = lib().symbols;
const finalizer = new FinalizationRegistry<Deno.PointerObject>((p) => S.dt_generator_free(p));

/** A libtorch random generator, for ops that draw random numbers (randn, dropout, ...). */
export class Generator implements Disposable {
  #ptr: Deno.PointerObject | null;

  /**
   * A generator seeded like `torch.Generator(device).manual_seed(seed)`: a CPU generator gives the
   * same numbers as PyTorch's for the same seed and draw sequence.
   */
  constructor(seed: number | bigint, device: Device = "cpu") {
    const code = deviceCode(device);
    const p = S.dt_generator_new(BigInt(seed), code < 0 ? -1 : code, ERR);
    if (p === null) throw takeError("generator");
    this.#ptr = p;
    finalizer.register(this, p, this);
  }

  /** The native handle; throws once disposed. */
  get ptr(): Deno.PointerObject {
    if (this.#ptr === null) throw new Error("generator used after dispose");
    return this.#ptr;
  }

  /** Frees the native generator. Idempotent. */
  dispose(): void {
    if (this.#ptr === null) return;
    finalizer.unregister(this);
    S.dt_generator_free(this.#ptr);
    this.#ptr = null;
  }

  /** `dispose()`, for `using`. */
  [Symbol.dispose](): void {
    this.dispose();
  }
}
