/**
 * Deterministic randomness. Every random decision of a run draws from its own stream, derived
 * from the run seed and labels naming the decision (purpose, class, index): a run is exactly
 * reproducible, a resumed run makes the same choices as an uninterrupted one, and any single
 * image can be regenerated alone, whatever order the work happens in.
 *
 * Streams are xoshiro128** (Blackman and Vigna, "Scrambled linear pseudorandom number
 * generators", 2021): 32-bit operations only, so it is fast in JavaScript without BigInt.
 * Derivation (rare: once per decision) uses 64-bit SplitMix64 mixing on BigInt.
 */

/** A run seed: a safe integer (negative values are taken modulo 2^64) or a 64-bit bigint. */
export type Seed = number | bigint;
/** What names a stream: strings (purposes) and safe integers (class and image indices). */
export type Label = string | number;

const MASK64 = (1n << 64n) - 1n;
const GOLDEN_GAMMA = 0x9e3779b97f4a7c15n;

/** The SplitMix64 output function: a bijection on 64-bit words that mixes every bit. */
function mix64(z: bigint): bigint {
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64;
  return z ^ (z >> 31n);
}

function seedWord(seed: Seed): bigint {
  if (typeof seed === "number") {
    if (!Number.isSafeInteger(seed)) {
      throw new RangeError(`seed must be a safe integer, got ${seed}`);
    }
    return BigInt(seed) & MASK64;
  }
  if (typeof seed !== "bigint" || seed < -(1n << 63n) || seed > MASK64) {
    throw new RangeError(`seed must be an integer in [-2^63, 2^64), got ${String(seed)}`);
  }
  return seed & MASK64;
}

const encoder = new TextEncoder();
const TAG_STRING = 1n << 56n;
const TAG_INTEGER = 2n << 56n;

/**
 * A label as 64-bit words: a tag word (kind, and byte length for strings), then the payload.
 * Tags and lengths make the encoding prefix-free, so ("ab", 1) and ("a", "b1") never collide
 * structurally.
 */
function labelWords(label: Label): bigint[] {
  if (typeof label === "number") {
    if (!Number.isSafeInteger(label)) {
      throw new RangeError(`random stream labels must be strings or safe integers, got ${label}`);
    }
    return [TAG_INTEGER, BigInt(label) & MASK64];
  }
  if (typeof label !== "string") {
    throw new TypeError(`random stream labels must be strings or integers, got ${typeof label}`);
  }
  const bytes = encoder.encode(label);
  const words = [TAG_STRING | BigInt(bytes.length)];
  for (let i = 0; i < bytes.length; i += 8) {
    let w = 0n;
    for (let j = Math.min(bytes.length, i + 8) - 1; j >= i; j--) w = (w << 8n) | BigInt(bytes[j]);
    words.push(w);
  }
  return words;
}

/** The 64-bit seed of the stream named by `labels` under `seed` (an unsigned bigint). */
export function deriveSeed(seed: Seed, ...labels: Label[]): bigint {
  let h = mix64((seedWord(seed) + GOLDEN_GAMMA) & MASK64);
  for (const label of labels) {
    for (const w of labelWords(label)) h = mix64(((h ^ w) + GOLDEN_GAMMA) & MASK64);
  }
  return h;
}

/** The random stream for one decision, e.g. `derive(runSeed, "pairs/positive", cls, index)`. */
export function derive(seed: Seed, ...labels: Label[]): Rng {
  return new Rng(deriveSeed(seed, ...labels));
}

/**
 * The seed of the initial noise of image `index` of class `classIndex`: an integer in
 * [0, 2^53 - 1], so it is exact as a JavaScript number and valid for
 * `torch.Generator().manual_seed(seed)` (which takes any integer in [-2^63, 2^64)).
 */
export function imageSeed(runSeed: Seed, classIndex: number, index: number): number {
  return Number(deriveSeed(runSeed, "noise", classIndex, index) >> 11n);
}

const TWO_32 = 4294967296;
const TWO_53 = 9007199254740992;

/** A xoshiro128** stream. Not cryptographic. */
export class Rng {
  #s0: number;
  #s1: number;
  #s2: number;
  #s3: number;

  /** Seeds the four state words from a SplitMix64 sequence started at `seed`. */
  constructor(seed: Seed) {
    let s = seedWord(seed);
    const next = () => {
      s = (s + GOLDEN_GAMMA) & MASK64;
      return mix64(s);
    };
    const a = next();
    const b = next();
    this.#s0 = Number(a & 0xffffffffn) | 0;
    this.#s1 = Number(a >> 32n) | 0;
    this.#s2 = Number(b & 0xffffffffn) | 0;
    this.#s3 = Number(b >> 32n) | 0;
    // The all-zero state is the one fixed point of the generator.
    if ((this.#s0 | this.#s1 | this.#s2 | this.#s3) === 0) this.#s0 = 1;
  }

  /** A stream at an explicit state (four 32-bit words, not all zero), e.g. one saved by `state`. */
  static fromState(state: readonly [number, number, number, number]): Rng {
    if (state.length !== 4 || state.some((w) => !Number.isInteger(w) || w < 0 || w >= TWO_32)) {
      throw new RangeError("Rng.fromState: expected four integers in [0, 2^32)");
    }
    if (state.every((w) => w === 0)) throw new RangeError("Rng.fromState: the state is all zero");
    const rng = new Rng(0);
    [rng.#s0, rng.#s1, rng.#s2, rng.#s3] = state.map((w) => w | 0);
    return rng;
  }

  /** The current state, for `fromState`. */
  state(): [number, number, number, number] {
    return [this.#s0 >>> 0, this.#s1 >>> 0, this.#s2 >>> 0, this.#s3 >>> 0];
  }

  /** The next 32 random bits, as an integer in [0, 2^32). */
  nextUint32(): number {
    const s1 = this.#s1;
    const result = Math.imul(rotl(Math.imul(s1, 5), 7), 9) >>> 0;
    const t = s1 << 9;
    this.#s2 ^= this.#s0;
    this.#s3 ^= s1;
    this.#s1 ^= this.#s2;
    this.#s0 ^= this.#s3;
    this.#s2 ^= t;
    this.#s3 = rotl(this.#s3, 11);
    return result;
  }

  /** A 53-bit integer in [0, 2^53). */
  #next53(): number {
    const hi = this.nextUint32() >>> 5;
    const lo = this.nextUint32() >>> 6;
    return hi * 67108864 + lo;
  }

  /** Uniform in [0, 1), with 53 random bits (every double of the form k / 2^53). */
  uniform(): number {
    return this.#next53() / TWO_53;
  }

  /** Uniform in [lo, hi). */
  range(lo: number, hi: number): number {
    return lo + (hi - lo) * this.uniform();
  }

  /** An unbiased integer in [0, n), for a positive safe integer n (rejection sampling). */
  int(n: number): number {
    if (!Number.isSafeInteger(n) || n < 1) {
      throw new RangeError(`Rng.int: n must be a positive safe integer, got ${n}`);
    }
    if (n <= TWO_32) {
      const limit = TWO_32 - (TWO_32 % n);
      let x = this.nextUint32();
      while (x >= limit) x = this.nextUint32();
      return x % n;
    }
    const limit = TWO_53 - (TWO_53 % n);
    let x = this.#next53();
    while (x >= limit) x = this.#next53();
    return x % n;
  }

  /** True with probability p. */
  bernoulli(p: number): boolean {
    return this.uniform() < p;
  }

  /**
   * An index drawn with probability proportional to `weights` (finite, non-negative, positive
   * sum). Indices of zero weight are never returned.
   */
  choice(weights: readonly number[]): number {
    let total = 0;
    let last = -1;
    for (let i = 0; i < weights.length; i++) {
      const w = weights[i];
      if (!(w >= 0) || !Number.isFinite(w)) {
        throw new RangeError(`Rng.choice: weight ${i} is ${w}; weights must be finite and >= 0`);
      }
      total += w;
      if (w > 0) last = i;
    }
    if (!(total > 0) || !Number.isFinite(total)) {
      throw new RangeError(`Rng.choice: the weights must have a positive finite sum, got ${total}`);
    }
    const u = this.uniform() * total;
    let acc = 0;
    for (let i = 0; i < weights.length; i++) {
      acc += weights[i];
      if (u < acc && weights[i] > 0) return i;
    }
    // Rounding can leave u just above the running sum at the end.
    return last;
  }

  /** Shuffles `items` in place (Fisher-Yates) and returns it. */
  shuffle<T>(items: T[]): T[] {
    for (let i = items.length - 1; i > 0; i--) {
      const j = this.int(i + 1);
      const tmp = items[i];
      items[i] = items[j];
      items[j] = tmp;
    }
    return items;
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}
