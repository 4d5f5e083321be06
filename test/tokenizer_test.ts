/**
 * ClipTokenizer against transformers' CLIPTokenizer: the fixtures (real 49408-token CLIP vocab in
 * several folder layouts, plus the embedded byte-level tokenizer) and expected ids come from
 * test/reference/tokenizer_ref.py.
 */
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { ClipTokenizer } from "../plugins/clip/tokenizer.ts";
import { fixture, withTempDir } from "./util.ts";

const FIXTURES = fileURLToPath(new URL("./fixtures/tokenizer/", import.meta.url));

interface Layout {
  folder: string;
  padId: number;
  vocabSize?: number;
  ids: number[][];
  batch: { maxLength: number; ids: number[][]; attentionMask: number[][] };
}
interface Cases {
  strings: string[];
  layouts: Record<string, Layout>;
  sweep: { layout: string; block: number; starts: number[]; fnv1a: number[] };
}

/** JSON with every non-printable-ASCII code point spelled out, for readable failures. */
function show(s: string): string {
  return JSON.stringify(s).replace(
    /[^\x20-\x7e]/gu,
    (c) => `\\u{${c.codePointAt(0)!.toString(16)}}`,
  );
}

let casesPromise: Promise<Cases> | null = null;
function loadCases(): Promise<Cases> {
  casesPromise ??=
    (async () => JSON.parse(await Deno.readTextFile(fixture("tokenizer/cases.json"))) as Cases)();
  return casesPromise;
}

function folder(layout: Layout): string {
  return layout.folder === "." ? FIXTURES : `${FIXTURES}${layout.folder}`;
}

const loaded = new Map<string, Promise<ClipTokenizer>>();
/** One load per layout: the real vocabulary takes a moment to parse. */
async function tokenizerFor(name: string): Promise<ClipTokenizer> {
  const cases = await loadCases();
  let tok = loaded.get(name);
  if (!tok) loaded.set(name, tok = ClipTokenizer.fromFolder(folder(cases.layouts[name])));
  return tok;
}

function assertAllIds(tok: ClipTokenizer, cases: Cases, layout: Layout, name: string) {
  let first: string | null = null;
  let mismatches = 0;
  cases.strings.forEach((s, i) => {
    const got = tok.encode(s);
    const want = layout.ids[i];
    if (got.length === want.length && got.every((v, k) => v === want[k])) return;
    mismatches++;
    first ??= `string #${i} ${show(s)}\n  want ${JSON.stringify(want)}\n  got  ${
      JSON.stringify(got)
    }`;
  });
  if (first !== null) {
    throw new Error(
      `${name}: ${mismatches} of ${cases.strings.length} strings differ from transformers; ` +
        `first: ${first}`,
    );
  }
}

function assertBatch(tok: ClipTokenizer, cases: Cases, layout: Layout, name: string) {
  const { maxLength } = layout.batch;
  const b = tok.encodeBatch(cases.strings, { maxLength, padding: "max_length", truncation: true });
  assert.deepEqual(b.shape, [cases.strings.length, maxLength]);
  cases.strings.forEach((s, i) => {
    const ids = Array.from(b.ids.subarray(i * maxLength, (i + 1) * maxLength));
    const mask = Array.from(b.attentionMask.subarray(i * maxLength, (i + 1) * maxLength));
    assert.deepEqual(ids, layout.batch.ids[i], `${name}: padded ids of #${i} ${show(s)}`);
    assert.deepEqual(mask, layout.batch.attentionMask[i], `${name}: mask of #${i}`);
  });
}

for (const name of ["sd15", "clip-vit-base-patch16", "sd2", "tiny"]) {
  Deno.test(`tokenizer ${name}: ids equal transformers for every fixture string`, async () => {
    const cases = await loadCases();
    const layout = cases.layouts[name];
    const tok = await tokenizerFor(name);
    assert.ok(cases.strings.length >= 400);
    assertAllIds(tok, cases, layout, name);
  });

  Deno.test(`tokenizer ${name}: 77-padded, truncated batch equals transformers`, async () => {
    const cases = await loadCases();
    const layout = cases.layouts[name];
    const tok = await tokenizerFor(name);
    assert.equal(tok.padId, layout.padId);
    assertBatch(tok, cases, layout, name);
  });
}

Deno.test("tokenizer sd15: ids and sizes of the real vocabulary", async () => {
  const tok = await tokenizerFor("sd15");
  assert.equal(tok.vocabSize, 49408);
  assert.equal(tok.bosId, 49406);
  assert.equal(tok.eosId, 49407);
  assert.equal(tok.padId, 49407);
  assert.equal(tok.maxLength, 77);
  assert.deepEqual(tok.encode("a photo of a cat"), [49406, 320, 1125, 539, 320, 2368, 49407]);
  // Cached words must give the same ids on the next call.
  assert.deepEqual(tok.encode("a photo of a cat"), [49406, 320, 1125, 539, 320, 2368, 49407]);
  assert.deepEqual(tok.encode(""), [49406, 49407]);
});

Deno.test("tokenizer: every code point normalises and splits as in transformers", async () => {
  const cases = await loadCases();
  const { block, starts, fnv1a } = cases.sweep;
  const tok = await tokenizerFor(cases.sweep.layout);
  const bad: string[] = [];
  starts.forEach((start, k) => {
    // Mirrors sweep_string() in test/reference/tokenizer_ref.py.
    let text = "";
    for (let c = start; c < start + block; c++) {
      if (c >= 0xd800 && c <= 0xdfff) continue;
      const ch = String.fromCodePoint(c);
      text += `a${ch}\u0345${ch}1${ch}! `;
    }
    let h = 0x811c9dc5;
    for (const id of tok.encode(text)) {
      for (let b = 0; b < 32; b += 8) h = Math.imul(h ^ ((id >>> b) & 0xff), 0x01000193) >>> 0;
    }
    if (h !== fnv1a[k]) bad.push(`U+${start.toString(16)}..U+${(start + block - 1).toString(16)}`);
  });
  if (bad.length > 0) {
    throw new Error(
      `ids differ from transformers for code points in ${bad.length} blocks: ` +
        bad.slice(0, 10).join(", "),
    );
  }
});

Deno.test("tokenizer: byteLevel() is the fixture's tiny tokenizer", async () => {
  const cases = await loadCases();
  const layout = cases.layouts.tiny;
  const tok = ClipTokenizer.byteLevel();
  const files = ClipTokenizer.byteLevelFiles();
  const vocab = JSON.parse(await Deno.readTextFile(`${FIXTURES}tiny/vocab.json`));
  const merges = (await Deno.readTextFile(`${FIXTURES}tiny/merges.txt`)).split("\n")
    .filter((l) => l !== "" && !l.startsWith("#version"));
  assert.deepEqual(files.vocab, vocab);
  assert.deepEqual(files.merges, merges);
  assert.equal(tok.vocabSize, layout.vocabSize);
  assert.equal(tok.vocabSize, 520);
  assert.equal(tok.bosId, 518);
  assert.equal(tok.eosId, 519);
  assert.equal(tok.padId, 519);
  assertAllIds(tok, cases, layout, "byteLevel()");
  assertBatch(tok, cases, layout, "byteLevel()");
});

Deno.test("tokenizer: fromVocabMerges matches fromFolder on the real files", async () => {
  const cases = await loadCases();
  const vocab = JSON.parse(await Deno.readTextFile(`${FIXTURES}vocab.json`));
  const merges = (await Deno.readTextFile(`${FIXTURES}merges.txt`)).split("\n")
    .filter((l) => l !== "" && !l.startsWith("#version"));
  const tok = ClipTokenizer.fromVocabMerges(vocab, merges);
  // Plain-string specials, like the tiny layout: only case-sensitive special-token matches.
  const expected = cases.layouts.sd15;
  cases.strings.forEach((s, i) => {
    if (/<\|/.test(s) && s.toLowerCase() !== s) return;
    assert.deepEqual(tok.encode(s), expected.ids[i], `#${i} ${show(s)}`);
  });
});

Deno.test("tokenizer: encodeBatch shapes and options", () => {
  const tok = ClipTokenizer.byteLevel();
  const long = "a ".repeat(100);
  const b = tok.encodeBatch(["the cat", long]);
  assert.deepEqual(b.shape, [2, 77]);
  assert.equal(b.ids[76], tok.padId);
  assert.equal(b.ids[77], tok.bosId);
  assert.equal(b.ids[77 + 76], tok.eosId, "truncation keeps EOS as the last token");
  assert.equal(b.attentionMask.reduce((s, v) => s + v, 0), tok.encode("the cat").length + 77);

  const longest = tok.encodeBatch(["the cat", "a"], { padding: "longest" });
  assert.deepEqual(longest.shape, [2, tok.encode("the cat").length]);
  assert.deepEqual(Array.from(longest.ids.subarray(longest.shape[1])), [
    ...tok.encode("a"),
    ...new Array(longest.shape[1] - 3).fill(tok.padId),
  ]);

  const short = tok.encodeBatch(["the cat the cat"], { maxLength: 4 });
  assert.deepEqual(Array.from(short.ids), [...tok.encode("the cat the cat").slice(0, 3), 519]);

  assert.throws(() => tok.encodeBatch(["a", "the cat"], { padding: "none" }), /padding "none"/);
  assert.deepEqual(tok.encodeBatch(["a", "b"], { padding: "none" }).shape, [2, 3]);
  assert.throws(() => tok.encodeBatch([long], { truncation: false }), /over maxLength 77/);
  assert.deepEqual(
    tok.encodeBatch([long], { truncation: false, padding: "longest" }).shape,
    [1, 102],
  );
  assert.throws(() => tok.encodeBatch(["a"], { maxLength: 1 }), /maxLength/);
  assert.deepEqual(tok.encodeBatch([]).shape, [0, 77]);
});

Deno.test("tokenizer: missing files name the folder and the files", async () => {
  await withTempDir(async (dir) => {
    await assert.rejects(
      ClipTokenizer.fromFolder(dir),
      (e: Error) =>
        e.message.includes(dir) && e.message.includes("vocab.json") &&
        e.message.includes("merges.txt") && e.message.includes("tokenizer.json"),
    );
    await Deno.writeTextFile(`${dir}/merges.txt`, "#version: 0.2\n");
    await assert.rejects(
      ClipTokenizer.fromFolder(dir),
      (e: Error) => e.message.includes(dir) && /no vocab\.json;/.test(e.message),
    );
  });
});

Deno.test("tokenizer: malformed merges and vocabularies are rejected", async () => {
  const { vocab } = ClipTokenizer.byteLevelFiles();
  await withTempDir(async (dir) => {
    await Deno.writeTextFile(`${dir}/vocab.json`, JSON.stringify(vocab));
    await Deno.writeTextFile(`${dir}/merges.txt`, "#version: 0.2\nt h\nth e</w> x\n");
    await assert.rejects(
      ClipTokenizer.fromFolder(dir),
      (e: Error) => e.message.includes("merges.txt line 3") && e.message.includes("th e</w> x"),
    );
    await Deno.writeTextFile(`${dir}/merges.txt`, "#version: 0.2\nt h\n\nth e</w>\n");
    await assert.rejects(ClipTokenizer.fromFolder(dir), /merges\.txt line 3/);
    await Deno.writeTextFile(`${dir}/merges.txt`, "#version: 0.2\nq z\n");
    await assert.rejects(ClipTokenizer.fromFolder(dir), /"qz", which is not in the vocabulary/);
    await Deno.writeTextFile(`${dir}/merges.txt`, "#version: 0.2\r\nt h\r\n");
    assert.deepEqual(
      (await ClipTokenizer.fromFolder(dir)).encode("th"),
      ClipTokenizer.byteLevel().encode("th"),
    );
    await Deno.writeTextFile(`${dir}/vocab.json`, "{not json");
    await assert.rejects(ClipTokenizer.fromFolder(dir), /vocab\.json is not valid JSON/);
  });
  assert.throws(() => ClipTokenizer.fromVocabMerges(vocab, ["t h x"]), /merge #0/);
  assert.throws(() => ClipTokenizer.fromVocabMerges(vocab, ["zz h"]), /"zz"/);
  assert.throws(
    () => ClipTokenizer.fromVocabMerges({ ...vocab, bad: -1 }, []),
    /"bad" .* not a non-negative integer/,
  );
});

Deno.test("tokenizer: long words take the heap path and merge like short ones", () => {
  const tok = ClipTokenizer.byteLevel();
  const { vocab } = ClipTokenizer.byteLevelFiles();
  const word = "the".repeat(13);
  const want = [...new Array(12).fill([vocab["th"], vocab["e"]]).flat(), vocab["the</w>"]];
  assert.deepEqual(tok.encode(word).slice(1, -1), want);
  assert.equal(tok.encode("x".repeat(20000)).length, 20002);
});
