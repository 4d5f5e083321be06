/**
 * CLIP's byte-level BPE tokenizer (Stable Diffusion 1.5 / 2 text encoders, CLIP ViT-B/16 text
 * tower), matching transformers 5.x `CLIPTokenizer` id for id. In transformers 5 that class is the
 * `tokenizers`-backed one; its pipeline is, in order:
 *
 * 1. added tokens whose `normalized` flag is false are cut out of the raw text;
 * 2. each remaining piece is normalised: NFC, whitespace runs to " ", per-character lowercase
 *    (no ftfy, no HTML unescaping, no strip: the slow tokenizer's `whitespace_clean` is gone);
 * 3. added tokens with `normalized` true are cut out of the normalised pieces;
 * 4. the CLIP regex splits words (whitespace is dropped), then the ByteLevel pre-tokenizer's own
 *    GPT-2 regex splits them again, which only matters for a literal `<|startoftext|>` /
 *    `<|endoftext|>` that step 1/3 did not catch;
 * 5. UTF-8 bytes map to printable characters, `</w>` is appended to the last one, BPE merges by
 *    rank;
 * 6. BOS + ids + EOS.
 *
 * Fixtures produced by test/reference/tokenizer_ref.py pin this against transformers.
 */
import { UserError } from "../../ffi/errors.ts";

/** Tokenizer files that cannot be read or describe a tokenizer this port does not implement. */
export class TokenizerError extends UserError {}

const SOT = "<|startoftext|>";
const EOT = "<|endoftext|>";
const END_OF_WORD = "</w>";
const DEFAULT_MAX_LENGTH = 77;

/**
 * Merges of the embedded byte-level tokenizer; mirrored in test/reference/tokenizer_ref.py.
 * Few enough that the ids stay below 520 (512 byte tokens + 6 merges + BOS + EOS).
 */
const TINY_MERGES = ["t h", "th e</w>", "a t</w>", "c at</w>", "o f</w>", "\u00c3 \u00a9"];

/**
 * Oniguruma's `\s` (Unicode White_Space), which is what the `tokenizers` regexes use. JS's `\s`
 * differs: it adds U+FEFF and lacks U+0085.
 */
const WS = "\\t-\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const WS_RUN = new RegExp(`[${WS}]+`, "gu");
const CLIP_PATTERN = new RegExp(
  `<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^${WS}\\p{L}\\p{N}]+`,
  "gu",
);
// deno-lint-ignore no-control-regex
const ASCII_ONLY = /^[\x00-\x7f]*$/;
const CAPITAL_SIGMA = /\u03a3/g;
/**
 * Capitals that Rust's char::to_lowercase (Unicode 17, inside `tokenizers`) maps but this V8's
 * ICU does not know yet; every other code point was checked to lowercase identically.
 */
const UNICODE17_CAPITALS = /[\ua7ce\ua7d2\ua7d4\u{16ea0}-\u{16eb8}]/gu;

/** Longer words merge through a heap: the allocation-free rescan is quadratic in length. */
const HEAP_THRESHOLD = 32;
/** Bounds the per-word cache for long-running processes fed arbitrary prompts. */
const CACHE_LIMIT = 100_000;

const UTF8 = new TextEncoder();

/** GPT-2 / OpenAI `bytes_to_unicode`: byte value -> printable character. */
function bytesToUnicode(): string[] {
  const out: string[] = new Array(256);
  let n = 0;
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
    out[b] = String.fromCharCode(printable ? b : 256 + n++);
  }
  return out;
}
const BYTE_CHARS = bytesToUnicode();
/** Vocabulary order of OpenAI's CLIP: printable bytes first, then the remapped ones. */
const BYTE_VOCAB_ORDER = [...BYTE_CHARS].sort((a, b) => a.charCodeAt(0) - b.charCodeAt(0));

/**
 * Per character, not per string: `tokenizers` lowercases code point by code point, so the final
 * sigma rule that String#toLowerCase applies must not fire (the only context-dependent rule in
 * the locale-independent mapping).
 */
function lowercase(s: string): string {
  return s.replace(CAPITAL_SIGMA, "\u03c3").toLowerCase().replace(
    UNICODE17_CAPITALS,
    (c) => String.fromCodePoint(c.codePointAt(0)! + (c.length === 1 ? 1 : 0x1b)),
  );
}

/**
 * `tokenizers`' NFC runs on older Unicode tables than this V8's ICU. Marks that ICU gives a
 * non-zero combining class but `tokenizers` treats as starters (class 0), so nothing is
 * reordered or composed across them:
 */
const NFC_OLD_STARTERS = "\\u07fd\\u0897-\\u089f\\u08ca-\\u08d3\\u09fe\\u0c3c\\u0d3b-\\u0d3c" +
  "\\u0eba\\u1715\\u1abf-\\u1ace\\u1df6-\\u1dfa\\ua82c\\u{10d24}-\\u{10d27}\\u{10d69}-\\u{10d6d}" +
  "\\u{10eab}-\\u{10eac}\\u{10efd}-\\u{10eff}\\u{10f46}-\\u{10f50}\\u{10f82}-\\u{10f85}\\u{11070}" +
  "\\u{1133b}\\u{113ce}-\\u{113d0}\\u{1145e}\\u{11839}-\\u{1183a}\\u{1193d}-\\u{1193e}\\u{11943}" +
  "\\u{119e0}\\u{11a34}\\u{11a47}\\u{11a99}\\u{11d42}\\u{11d44}-\\u{11d45}\\u{11d97}" +
  "\\u{11f41}-\\u{11f42}\\u{1612f}\\u{16ff0}-\\u{16ff1}\\u{1e08f}\\u{1e130}-\\u{1e136}\\u{1e2ae}" +
  "\\u{1e2ec}-\\u{1e2ef}\\u{1e4ec}-\\u{1e4ef}\\u{1e5ee}-\\u{1e5ef}";
/**
 * Both halves and results of the compositions ICU knows and `tokenizers` does not (Vithkuqi,
 * Tulu-Tigalari, Dives Akuru, Gurung Khema, Kirat Rai): `tokenizers` neither composes nor
 * decomposes them. NFC_MASK stands in for them while ICU normalises; a private-use starter
 * that no normalisation touches, and itself masked when the text already contains it.
 */
const NFC_OPAQUE = "\\u{105c9}\\u{105d2}\\u{105da}\\u{105e4}\\u{11382}-\\u{11385}\\u{1138b}" +
  "\\u{1138e}\\u{11390}-\\u{11391}\\u{113c2}\\u{113c5}\\u{113c7}-\\u{113c8}\\u{11935}\\u{11938}" +
  "\\u{1611e}\\u{16121}-\\u{16129}\\u{16d63}\\u{16d67}-\\u{16d6a}";
const NFC_MASK = "\u{f0000}";
const NFC_SUSPECT = new RegExp(`[${NFC_OLD_STARTERS}${NFC_OPAQUE}\\u{f0000}]`, "u");
const NFC_SPLIT = new RegExp(`[${NFC_OLD_STARTERS}]`, "gu");
const NFC_MASKED = new RegExp(`[${NFC_OPAQUE}\\u{f0000}]`, "gu");
const NFC_UNMASK = /\u{f0000}/gu;

function nfc(s: string): string {
  if (!NFC_SUSPECT.test(s)) return s.normalize("NFC");
  let out = "";
  let last = 0;
  for (const m of s.matchAll(NFC_SPLIT)) {
    out += nfcMasked(s.slice(last, m.index)) + m[0];
    last = m.index + m[0].length;
  }
  return out + nfcMasked(s.slice(last));
}

function nfcMasked(s: string): string {
  const saved: string[] = [];
  const masked = s.replace(NFC_MASKED, (c) => {
    saved.push(c);
    return NFC_MASK;
  });
  if (saved.length === 0) return masked.normalize("NFC");
  let k = 0;
  return masked.normalize("NFC").replace(NFC_UNMASK, () => saved[k++]);
}

function normalize(s: string): string {
  if (ASCII_ONLY.test(s)) return s.replace(WS_RUN, " ").toLowerCase();
  return lowercase(nfc(s).replace(WS_RUN, " "));
}

/** One added (special) token as transformers/tokenizers describe it. */
export interface AddedTokenSpec {
  content: string;
  /** Matched after normalisation (case-insensitively, in effect) instead of on the raw text. */
  normalized?: boolean;
  lstrip?: boolean;
  rstrip?: boolean;
  singleWord?: boolean;
  special?: boolean;
}

export interface ClipTokenizerOptions {
  bosToken?: string | AddedTokenSpec;
  eosToken?: string | AddedTokenSpec;
  unkToken?: string | AddedTokenSpec;
  padToken?: string | AddedTokenSpec;
  /** Further added tokens, registered before the four above (as `added_tokens_decoder` is). */
  addedTokens?: AddedTokenSpec[];
  /** Sequence length for padding/truncation; CLIP text towers have 77 positions. */
  maxLength?: number;
}

export interface EncodeBatchOptions {
  /** Defaults to the tokenizer's `maxLength` (77 for CLIP). */
  maxLength?: number;
  /**
   * "max_length" (default) pads every row to `maxLength`, "longest" to the longest row, "none"
   * requires all rows to come out equally long.
   */
  padding?: "max_length" | "longest" | "none";
  /** Default true: keep the first `maxLength - 1` ids and end with EOS, as transformers does. */
  truncation?: boolean;
}

export interface EncodedBatch {
  /** Row-major [batch, length] ids, ready to become an i32 tensor. */
  ids: Int32Array;
  /** Same shape: 1 for real tokens (BOS and EOS included), 0 for padding. */
  attentionMask: Int32Array;
  shape: [batch: number, length: number];
}

interface AddedToken {
  content: string;
  normalized: boolean;
  lstrip: boolean;
  rstrip: boolean;
  singleWord: boolean;
  special: boolean;
}

interface Matcher {
  contents: string[];
  ids: number[];
}

/** Python's AddedToken(**dict): `normalized` defaults to `not special`. */
function addedToken(v: AddedTokenSpec, specialDefault = false): AddedToken {
  const special = v.special ?? specialDefault;
  return {
    content: v.content,
    normalized: v.normalized ?? !special,
    lstrip: v.lstrip ?? false,
    rstrip: v.rstrip ?? false,
    singleWord: v.singleWord ?? false,
    special,
  };
}

function sameToken(a: AddedToken | string, b: AddedToken | string): boolean {
  if (typeof a === "string" || typeof b === "string") return a === b;
  return a.content === b.content && a.normalized === b.normalized && a.lstrip === b.lstrip &&
    a.rstrip === b.rstrip && a.singleWord === b.singleWord && a.special === b.special;
}

function contentOf(t: AddedToken | string): string {
  return typeof t === "string" ? t : t.content;
}

/** Leftmost-longest matching, like the aho-corasick automaton `tokenizers` builds. */
function splitAdded(text: string, m: Matcher, onText: (s: string) => void, out: number[]): void {
  if (m.contents.length === 0) {
    if (text.length > 0) onText(text);
    return;
  }
  let pos = 0;
  while (pos < text.length) {
    let best = -1;
    let bestLen = 0;
    let bestId = 0;
    for (let k = 0; k < m.contents.length; k++) {
      const c = m.contents[k];
      const at = text.indexOf(c, pos);
      if (at < 0) continue;
      if (best < 0 || at < best || (at === best && c.length > bestLen)) {
        best = at;
        bestLen = c.length;
        bestId = m.ids[k];
      }
    }
    if (best < 0) break;
    if (best > pos) onText(text.slice(pos, best));
    out.push(bestId);
    pos = best + bestLen;
  }
  if (pos < text.length) onText(text.slice(pos));
}

/** Parses `merges.txt` the way tokenizers' BPE::from_file does. */
function parseMergesTxt(text: string, where: string): [string, string][] {
  const lines = text.split("\n");
  if (lines[lines.length - 1] === "") lines.pop();
  const merges: [string, string][] = [];
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].endsWith("\r") ? lines[i].slice(0, -1) : lines[i];
    if (line.startsWith("#version")) continue;
    const parts = line.split(" ");
    if (parts.length !== 2) {
      const what = `line ${i + 1} (${JSON.stringify(line)})`;
      throw new TokenizerError(
        `ClipTokenizer: ${where} ${what} is not two tokens separated by one space`,
      );
    }
    merges.push([parts[0], parts[1]]);
  }
  return merges;
}

function asPair(m: unknown, index: number, where: string): [string, string] {
  if (typeof m === "string") {
    const parts = m.split(" ");
    if (parts.length === 2) return parts as [string, string];
  } else if (
    Array.isArray(m) && m.length === 2 && typeof m[0] === "string" && typeof m[1] === "string"
  ) {
    return m as [string, string];
  }
  throw new TokenizerError(
    `ClipTokenizer: merge #${index} in ${where} is not two tokens ("a b" or ["a", "b"]): ` +
      JSON.stringify(m),
  );
}

export class ClipTokenizer {
  readonly bosId: number;
  readonly eosId: number;
  readonly padId: number;
  readonly unkId: number | null;
  readonly maxLength: number;
  /** One past the largest id, added tokens included (transformers' `len(tokenizer)`). */
  readonly vocabSize: number;

  /** Pair key (left id * stride + right id) -> merge rank. */
  private readonly mergeRanks: Map<number, number>;
  /** Rank -> id of the merged token. */
  private readonly mergeResult: Int32Array;
  private readonly stride: number;
  private readonly byteIds: Int32Array;
  private readonly byteEowIds: Int32Array;
  private readonly rawAdded: Matcher;
  private readonly normalizedAdded: Matcher;
  private readonly cache = new Map<string, number[]>();

  private constructor(
    vocab: Map<string, number>,
    merges: [string, string][],
    added: AddedToken[],
    specials: { bos: string; eos: string; unk: string | null; pad: string },
    maxLength: number,
    where: string,
  ) {
    let maxId = -1;
    for (const id of vocab.values()) if (id > maxId) maxId = id;
    this.stride = maxId + 1;
    if (this.stride * this.stride > Number.MAX_SAFE_INTEGER) {
      throw new TokenizerError(
        `ClipTokenizer: vocabulary ids in ${where} are too large (max ${maxId})`,
      );
    }

    // Later duplicates overwrite earlier ones, as collecting into tokenizers' HashMap does.
    this.mergeRanks = new Map();
    this.mergeResult = new Int32Array(merges.length);
    for (let rank = 0; rank < merges.length; rank++) {
      const [a, b] = merges[rank];
      const ia = vocab.get(a);
      const ib = vocab.get(b);
      const ir = vocab.get(a + b);
      if (ia === undefined || ib === undefined || ir === undefined) {
        const tok = JSON.stringify(ia === undefined ? a : ib === undefined ? b : a + b);
        throw new TokenizerError(
          `ClipTokenizer: merge #${rank} "${a} ${b}" in ${where} uses ${tok}, ` +
            "which is not in the vocabulary",
        );
      }
      this.mergeRanks.set(ia * this.stride + ib, rank);
      this.mergeResult[rank] = ir;
    }

    this.byteIds = new Int32Array(256).fill(-1);
    this.byteEowIds = new Int32Array(256).fill(-1);
    for (let b = 0; b < 256; b++) {
      this.byteIds[b] = vocab.get(BYTE_CHARS[b]) ?? -1;
      this.byteEowIds[b] = vocab.get(BYTE_CHARS[b] + END_OF_WORD) ?? -1;
    }

    // Ids follow tokenizers' AddedVocabulary: a token in the model vocabulary keeps its id, others
    // are appended; for one content the last registration's flags win.
    const addedIds = new Map<string, number>();
    const flags = new Map<string, AddedToken>();
    let next = vocab.size;
    for (const t of added) {
      if (t.content === "") continue;
      if (t.lstrip || t.rstrip || t.singleWord) {
        // Not used by any CLIP checkpoint; failing beats silently producing other ids.
        throw new TokenizerError(
          `ClipTokenizer: added token ${JSON.stringify(t.content)} in ${where} sets ` +
            "lstrip/rstrip/single_word, which this tokenizer does not implement",
        );
      }
      if (!addedIds.has(t.content)) {
        const id = vocab.get(t.content) ?? next++;
        if (id >= next) next = id + 1;
        addedIds.set(t.content, id);
      }
      flags.set(t.content, t);
    }
    this.rawAdded = { contents: [], ids: [] };
    this.normalizedAdded = { contents: [], ids: [] };
    for (const [content, t] of flags) {
      const target = t.normalized ? this.normalizedAdded : this.rawAdded;
      target.contents.push(t.normalized ? normalize(content) : content);
      target.ids.push(addedIds.get(content)!);
    }

    const idOf = (tok: string, role: string) => {
      const id = addedIds.get(tok) ?? vocab.get(tok);
      if (id === undefined) {
        throw new TokenizerError(
          `ClipTokenizer: ${role} token ${JSON.stringify(tok)} has no id in ${where}`,
        );
      }
      return id;
    };
    this.bosId = idOf(specials.bos, "bos");
    this.eosId = idOf(specials.eos, "eos");
    this.padId = idOf(specials.pad, "pad");
    this.unkId = specials.unk === null ? null : idOf(specials.unk, "unk");
    let top = maxId;
    for (const id of addedIds.values()) if (id > top) top = id;
    this.vocabSize = top + 1;
    if (!Number.isInteger(maxLength) || maxLength < 2) {
      throw new Error(`ClipTokenizer: maxLength must be an integer >= 2, got ${maxLength}`);
    }
    this.maxLength = maxLength;
  }

  /**
   * Loads a diffusers `tokenizer/` folder (vocab.json + merges.txt) or a folder with
   * tokenizer.json (preferred when both exist, as in transformers), plus tokenizer_config.json /
   * special_tokens_map.json when present.
   */
  static async fromFolder(dir: string): Promise<ClipTokenizer> {
    const path = (name: string) => `${dir.replace(/\/+$/, "")}/${name}`;
    const read = async (name: string): Promise<string | null> => {
      try {
        return await Deno.readTextFile(path(name));
      } catch (e) {
        if (e instanceof Deno.errors.NotFound) return null;
        throw new TokenizerError(
          `ClipTokenizer: cannot read ${path(name)} (${(e as Error).message})`,
        );
      }
    };
    const readJson = async (name: string): Promise<Record<string, unknown> | null> => {
      const text = await read(name);
      if (text === null) return null;
      try {
        return JSON.parse(text);
      } catch (e) {
        throw new TokenizerError(
          `ClipTokenizer: ${path(name)} is not valid JSON: ${(e as Error).message}`,
        );
      }
    };

    const [tokenizerJson, config, specialMap] = await Promise.all([
      readJson("tokenizer.json"),
      readJson("tokenizer_config.json"),
      readJson("special_tokens_map.json"),
    ]);

    let vocab: Record<string, number>;
    let merges: [string, string][];
    let jsonAdded: AddedToken[] | null = null;
    if (tokenizerJson !== null) {
      const where = path("tokenizer.json");
      const model = tokenizerJson.model as Record<string, unknown> | undefined;
      if (model?.type !== undefined && model.type !== "BPE") {
        throw new TokenizerError(`ClipTokenizer: ${where} holds a ${model.type} model, not BPE`);
      }
      if (!model || typeof model.vocab !== "object" || !Array.isArray(model.merges)) {
        throw new TokenizerError(`ClipTokenizer: ${where} has no model.vocab / model.merges`);
      }
      if (tokenizerJson.truncation != null || tokenizerJson.padding != null) {
        throw new TokenizerError(
          `ClipTokenizer: ${where} bakes in truncation/padding, which this tokenizer ` +
            "does not apply",
        );
      }
      vocab = model.vocab as Record<string, number>;
      merges = (model.merges as unknown[]).map((m, i) => asPair(m, i, where));
      jsonAdded = ((tokenizerJson.added_tokens ?? []) as Record<string, unknown>[]).map((t) =>
        tokenFromJson(t, false)
      );
    } else {
      const [vocabJson, mergesTxt] = await Promise.all([read("vocab.json"), read("merges.txt")]);
      if (vocabJson === null || mergesTxt === null) {
        const missing = vocabJson !== null
          ? "merges.txt"
          : mergesTxt !== null
          ? "vocab.json"
          : "vocab.json and merges.txt";
        throw new TokenizerError(
          `ClipTokenizer: ${dir} has no ${missing}; expected vocab.json + merges.txt ` +
            `(diffusers tokenizer/ layout) or tokenizer.json`,
        );
      }
      try {
        vocab = JSON.parse(vocabJson);
      } catch (e) {
        throw new TokenizerError(
          `ClipTokenizer: ${path("vocab.json")} is not valid JSON: ${(e as Error).message}`,
        );
      }
      merges = parseMergesTxt(mergesTxt, path("merges.txt"));
    }

    const resolved = resolveSpecialTokens(config ?? {}, specialMap, jsonAdded);
    let maxLength = DEFAULT_MAX_LENGTH;
    const cfgMax = config?.model_max_length;
    // transformers writes 1e30 ("no limit") when a config sets none; CLIP still has 77 positions.
    if (typeof cfgMax === "number" && cfgMax < 1e9) maxLength = cfgMax;
    for (const key of ["padding_side", "truncation_side"]) {
      const side = config?.[key];
      if (side !== undefined && side !== "right") {
        throw new TokenizerError(`ClipTokenizer: ${key} ${JSON.stringify(side)} is not supported`);
      }
    }
    return new ClipTokenizer(
      vocabMap(vocab, dir),
      merges,
      resolved.added,
      resolved.specials,
      maxLength,
      dir,
    );
  }

  /**
   * Builds from an in-memory vocabulary and merge list ("a b" strings, no `#version` header), like
   * `CLIPTokenizer(vocab=..., merges=...)`: plain-string special tokens, matched on raw text.
   */
  static fromVocabMerges(
    vocab: Record<string, number>,
    merges: (string | [string, string])[],
    opts: ClipTokenizerOptions = {},
  ): ClipTokenizer {
    const where = "fromVocabMerges()";
    const spec = (v: string | AddedTokenSpec | undefined, dflt: string): AddedToken | string =>
      v === undefined ? dflt : typeof v === "string" ? v : addedToken(v);
    const named = [
      spec(opts.bosToken, SOT),
      spec(opts.eosToken, EOT),
      spec(opts.unkToken, EOT),
      spec(opts.padToken, EOT),
    ];
    const fromDecoder = (opts.addedTokens ?? []).map((t) => addedToken(t));
    const added = collectAdded(fromDecoder, named);
    return new ClipTokenizer(
      vocabMap(vocab, where),
      merges.map((m, i) => asPair(m, i, where)),
      added,
      {
        bos: contentOf(named[0]),
        eos: contentOf(named[1]),
        unk: contentOf(named[2]),
        pad: contentOf(named[3]),
      },
      opts.maxLength ?? DEFAULT_MAX_LENGTH,
      where,
    );
  }

  /**
   * A file-free tokenizer for tiny test models: the 256 byte tokens, the 256 byte+`</w>` tokens,
   * six merges, then `<|startoftext|>` (518) and `<|endoftext|>` (519, also pad): 520 ids.
   */
  static byteLevel(): ClipTokenizer {
    const { vocab, merges } = ClipTokenizer.byteLevelFiles();
    return ClipTokenizer.fromVocabMerges(vocab, merges);
  }

  /** byteLevel()'s vocab.json / merges.txt contents, e.g. to hand the same tokenizer to Python. */
  static byteLevelFiles(): { vocab: Record<string, number>; merges: string[] } {
    const tokens = [...BYTE_VOCAB_ORDER, ...BYTE_VOCAB_ORDER.map((c) => c + END_OF_WORD)];
    for (const m of TINY_MERGES) tokens.push(m.replace(" ", ""));
    tokens.push(SOT, EOT);
    return { vocab: Object.fromEntries(tokens.map((t, i) => [t, i])), merges: [...TINY_MERGES] };
  }

  /** BOS + ids + EOS, neither padded nor truncated. */
  encode(text: string): number[] {
    const out = [this.bosId];
    this.encodeInto(text, out);
    out.push(this.eosId);
    return out;
  }

  encodeBatch(texts: string[], opts: EncodeBatchOptions = {}): EncodedBatch {
    const maxLength = opts.maxLength ?? this.maxLength;
    const padding = opts.padding ?? "max_length";
    const truncation = opts.truncation ?? true;
    if (!Number.isInteger(maxLength) || maxLength < 2) {
      throw new Error(`ClipTokenizer: maxLength must be an integer >= 2, got ${maxLength}`);
    }
    const rows = texts.map((t) => {
      const ids = this.encode(t);
      if (truncation && ids.length > maxLength) {
        ids.length = maxLength - 1;
        ids.push(this.eosId);
      }
      return ids;
    });
    let length = 0;
    for (const r of rows) if (r.length > length) length = r.length;
    if (padding === "max_length") {
      if (length > maxLength) {
        const i = rows.findIndex((r) => r.length > maxLength);
        throw new Error(
          `ClipTokenizer: text #${i} is ${rows[i].length} tokens, over maxLength ${maxLength}, ` +
            `and truncation is off`,
        );
      }
      length = maxLength;
    } else if (padding === "none") {
      const i = rows.findIndex((r) => r.length !== length);
      if (i >= 0) {
        throw new Error(
          `ClipTokenizer: padding "none" needs equally long rows, but text #${i} has ` +
            `${rows[i].length} tokens and another ${length}; use padding "longest" or "max_length"`,
        );
      }
    }
    const ids = new Int32Array(rows.length * length).fill(this.padId);
    const attentionMask = new Int32Array(rows.length * length);
    rows.forEach((r, i) => {
      ids.set(r, i * length);
      attentionMask.fill(1, i * length, i * length + r.length);
    });
    return { ids, attentionMask, shape: [rows.length, length] };
  }

  private encodeInto(text: string, out: number[]): void {
    splitAdded(text, this.rawAdded, (raw) => {
      splitAdded(
        normalize(raw),
        this.normalizedAdded,
        (piece) => this.encodePiece(piece, out),
        out,
      );
    }, out);
  }

  private encodePiece(text: string, out: number[]): void {
    for (const m of text.matchAll(CLIP_PATTERN)) {
      const word = m[0];
      if (word === SOT || word === EOT) {
        // The ByteLevel pre-tokenizer's GPT-2 regex runs after the CLIP split and cuts these
        // (and nothing else the CLIP regex yields) into "<|", the letters, and "|>".
        for (const part of ["<|", word.slice(2, -2), "|>"]) this.pushWord(part, out);
      } else {
        this.pushWord(word, out);
      }
    }
  }

  private pushWord(word: string, out: number[]): void {
    let ids = this.cache.get(word);
    if (ids === undefined) {
      ids = this.bpe(word);
      if (this.cache.size >= CACHE_LIMIT) this.cache.clear();
      this.cache.set(word, ids);
    }
    for (let i = 0; i < ids.length; i++) out.push(ids[i]);
  }

  private bpe(word: string): number[] {
    let bytes: ArrayLike<number>;
    if (ASCII_ONLY.test(word)) {
      const a = new Array<number>(word.length);
      for (let i = 0; i < word.length; i++) a[i] = word.charCodeAt(i);
      bytes = a;
    } else {
      bytes = UTF8.encode(word);
    }
    const syms: number[] = [];
    const last = bytes.length - 1;
    for (let i = 0; i <= last; i++) {
      const id = i === last ? this.byteEowIds[bytes[i]] : this.byteIds[bytes[i]];
      // tokenizers' BPE with fuse_unk=false: one unk per unknown symbol, or drop it when the
      // model has no unk token.
      if (id >= 0) syms.push(id);
      else if (this.unkId !== null) syms.push(this.unkId);
    }
    return syms.length > HEAP_THRESHOLD ? this.mergeHeap(syms) : this.mergeScan(syms);
  }

  /** Repeatedly merges the lowest-rank pair, leftmost first: tokenizers' order. */
  private mergeScan(syms: number[]): number[] {
    const stride = this.stride;
    while (syms.length > 1) {
      let bestRank = Infinity;
      let bestAt = -1;
      for (let i = 0; i < syms.length - 1; i++) {
        const r = this.mergeRanks.get(syms[i] * stride + syms[i + 1]);
        if (r !== undefined && r < bestRank) {
          bestRank = r;
          bestAt = i;
        }
      }
      if (bestAt < 0) break;
      syms.splice(bestAt, 2, this.mergeResult[bestRank]);
    }
    return syms;
  }

  /**
   * Same merge order as mergeScan in O(n log n) for long words, the way tokenizers' Word::merge_all
   * does it: a heap of (rank, position) over a linked list, skipping stale entries.
   */
  private mergeHeap(syms: number[]): number[] {
    const n = syms.length;
    const stride = this.stride;
    const id = Int32Array.from(syms);
    const prev = new Int32Array(n);
    const next = new Int32Array(n);
    const alive = new Uint8Array(n).fill(1);
    for (let i = 0; i < n; i++) {
      prev[i] = i - 1;
      next[i] = i + 1 < n ? i + 1 : -1;
    }
    // Entries are rank * n + position: ordered by rank, then by position.
    const heap: number[] = [];
    const push = (v: number) => {
      let i = heap.length;
      heap.push(v);
      while (i > 0) {
        const p = (i - 1) >> 1;
        if (heap[p] <= v) break;
        heap[i] = heap[p];
        i = p;
      }
      heap[i] = v;
    };
    const pop = (): number => {
      const top = heap[0];
      const v = heap.pop()!;
      if (heap.length > 0) {
        let i = 0;
        for (;;) {
          let c = 2 * i + 1;
          if (c >= heap.length) break;
          if (c + 1 < heap.length && heap[c + 1] < heap[c]) c++;
          if (heap[c] >= v) break;
          heap[i] = heap[c];
          i = c;
        }
        heap[i] = v;
      }
      return top;
    };
    const candidate = (left: number) => {
      const right = next[left];
      if (right < 0) return;
      const r = this.mergeRanks.get(id[left] * stride + id[right]);
      if (r !== undefined) push(r * n + left);
    };
    for (let i = 0; i + 1 < n; i++) candidate(i);
    while (heap.length > 0) {
      const e = pop();
      const pos = e % n;
      const rank = (e - pos) / n;
      if (!alive[pos]) continue;
      const right = next[pos];
      if (right < 0 || this.mergeRanks.get(id[pos] * stride + id[right]) !== rank) continue;
      id[pos] = this.mergeResult[rank];
      alive[right] = 0;
      next[pos] = next[right];
      if (next[right] >= 0) prev[next[right]] = pos;
      if (prev[pos] >= 0) candidate(prev[pos]);
      candidate(pos);
    }
    const out: number[] = [];
    for (let i = 0; i >= 0; i = next[i]) out.push(id[i]);
    return out;
  }
}

function vocabMap(vocab: Record<string, number>, where: string): Map<string, number> {
  if (vocab === null || typeof vocab !== "object" || Array.isArray(vocab)) {
    throw new TokenizerError(
      `ClipTokenizer: the vocabulary in ${where} is not a token -> id object`,
    );
  }
  const m = new Map<string, number>();
  for (const [tok, id] of Object.entries(vocab)) {
    if (!Number.isInteger(id) || id < 0) {
      throw new TokenizerError(
        `ClipTokenizer: vocabulary entry ${JSON.stringify(tok)} in ${where} has id ${
          JSON.stringify(id)
        }, not a non-negative integer`,
      );
    }
    m.set(tok, id);
  }
  return m;
}

/** A token as written in tokenizer_config.json / special_tokens_map.json / tokenizer.json. */
function tokenFromJson(v: unknown, specialDefault: boolean): AddedToken {
  const o = v as Record<string, unknown>;
  if (typeof o?.content !== "string") {
    throw new TokenizerError(`ClipTokenizer: malformed added token ${JSON.stringify(v)}`);
  }
  return addedToken({
    content: o.content,
    normalized: o.normalized as boolean | undefined,
    lstrip: o.lstrip as boolean | undefined,
    rstrip: o.rstrip as boolean | undefined,
    singleWord: o.single_word as boolean | undefined,
    special: specialDefault ? true : o.special as boolean | undefined,
  });
}

const NAMED_SPECIALS = [
  "bos_token",
  "eos_token",
  "unk_token",
  "sep_token",
  "pad_token",
  "cls_token",
  "mask_token",
] as const;
const CLIP_DEFAULTS: Record<string, string> = {
  bos_token: SOT,
  eos_token: EOT,
  unk_token: EOT,
  pad_token: EOT,
};

/**
 * Reproduces how transformers 5 turns a folder's configs into the backend's added tokens. The
 * visible effect is which special tokens also match in other letter cases: in the SD1.5 layout
 * `<|STARTOFTEXT|>` is BOS but `<|ENDOFTEXT|>` is plain text (pad, a plain string, re-registers
 * EOS as non-normalized); with a tokenizer.json both match; an SD2-style pad "!" becomes a
 * special token that splits every "!" out of the text.
 */
function resolveSpecialTokens(
  config: Record<string, unknown>,
  specialMap: Record<string, unknown> | null,
  tokenizerJsonAdded: AddedToken[] | null,
): {
  added: AddedToken[];
  specials: { bos: string; eos: string; unk: string | null; pad: string };
} {
  const values: Record<string, AddedToken | string | null> = {};
  const fromConfig = (v: unknown): AddedToken | string | null =>
    v == null ? null : typeof v === "string" ? v : tokenFromJson(v, false);
  for (const key of NAMED_SPECIALS) {
    values[key] = key in config ? fromConfig(config[key]) : CLIP_DEFAULTS[key] ?? null;
  }
  const extraOf = (v: unknown): (AddedToken | string)[] => {
    const list = Array.isArray(v) ? v : v && typeof v === "object" ? Object.values(v) : [];
    return list.map((t) => typeof t === "string" ? t : tokenFromJson(t, false));
  };
  const extra = extraOf(config.extra_special_tokens ?? config.additional_special_tokens);

  const decoder = new Map<number, AddedToken>();
  if (config.added_tokens_decoder && typeof config.added_tokens_decoder === "object") {
    for (const [id, t] of Object.entries(config.added_tokens_decoder)) {
      decoder.set(Number(id), tokenFromJson(t, false));
    }
  } else {
    if (specialMap) {
      for (const [key, v] of Object.entries(specialMap)) {
        if ((NAMED_SPECIALS as readonly string[]).includes(key)) {
          values[key] = typeof v === "string" ? v : tokenFromJson(v, true);
        } else if (key === "additional_special_tokens" || key === "extra_special_tokens") {
          for (const t of extraOf(v)) if (!extra.some((e) => sameToken(e, t))) extra.push(t);
        }
      }
    }
    for (const t of tokenizerJsonAdded ?? []) {
      // Only the content and flags survive; ids are reassigned from the vocabulary.
      decoder.set(decoder.size, t);
    }
  }
  const byContent = new Map<string, AddedToken>();
  for (const t of decoder.values()) byContent.set(t.content, t);
  for (const key of NAMED_SPECIALS) {
    const v = values[key];
    if (v !== null && byContent.size > 0) values[key] = byContent.get(contentOf(v)) ?? v;
  }

  const fromDecoder = [...decoder.entries()].sort((a, b) => a[0] - b[0]).map(([, t]) => t);
  const named = NAMED_SPECIALS.map((k) => values[k]).filter((v) => v !== null);
  const added = collectAdded(fromDecoder, [...named, ...extra]);
  const req = (key: string) => {
    const v = values[key];
    if (v === null) {
      throw new TokenizerError(
        `ClipTokenizer: the tokenizer config sets ${key} to null; CLIP needs one`,
      );
    }
    return contentOf(v);
  };
  return {
    added,
    specials: {
      bos: req("bos_token"),
      eos: req("eos_token"),
      unk: values.unk_token === null ? null : contentOf(values.unk_token),
      pad: req("pad_token"),
    },
  };
}

/**
 * TokenizersBackend.__init__: decoder entries first, then each special token unless its content
 * is already among them or an identical token was queued; strings become special, non-normalized.
 */
function collectAdded(
  fromDecoder: AddedToken[],
  specials: (AddedToken | string)[],
): AddedToken[] {
  const queued: (AddedToken | string)[] = [...fromDecoder];
  const encoder = new Set(fromDecoder.map((t) => t.content));
  for (const v of specials) {
    if (encoder.has(contentOf(v)) || queued.some((q) => sameToken(q, v))) continue;
    queued.push(v);
  }
  return queued.map((v) => typeof v === "string" ? addedToken({ content: v, special: true }) : v);
}
