/**
 * Class similarity for negative sampling (DIPSY, section 3.3; `calculate_similarity_matrix.py`):
 * class vector m_k = mean of the projected CLIP image embeddings of class k's shots (not
 * normalised before averaging), S_kj = cos(m_k, m_j), and the negative class for target k is drawn
 * from P(j|k) = exp(S_kj / tau) / sum_{l != k} exp(S_kl / tau), P(k|k) = 0.
 */
import { ops, scope, type Tensor } from "../../ffi/mod.ts";

/** The temperature of the official code. */
export const DEFAULT_TAU = 0.4;

/**
 * S[k][j] = cos(m_k, m_j) from one [n_k, D] embedding tensor per class (any dtype and device).
 * Computed in float64.
 */
export function classSimilarity(embeddingsPerClass: readonly Tensor[]): number[][] {
  const k = embeddingsPerClass.length;
  if (k === 0) throw new RangeError("classSimilarity: no classes");
  const dim = embeddingsPerClass[0].shape.at(-1);
  embeddingsPerClass.forEach((e, i) => {
    if (e.shape.length !== 2 || e.shape[0] < 1 || e.shape[1] !== dim) {
      throw new RangeError(
        `classSimilarity: class ${i} embeddings have shape [${e.shape.join(", ")}]; expected ` +
          `[shots >= 1, ${dim}] like class 0`,
      );
    }
  });
  const host = scope(() => {
    const means = embeddingsPerClass.map((e) => ops.mean(ops.to(e, "f64", "cpu"), [0], false));
    const m = ops.stack(means, 0);
    const norms = ops.norm(m, 2, [1], true);
    const unit = ops.div(m, norms);
    const sim = ops.mm(unit, ops.transpose(unit, 0, 1));
    return { sim: sim.toFloat64(), norms: norms.toFloat64() };
  });
  host.norms.forEach((norm, i) => {
    if (!(norm > 0) || !Number.isFinite(norm)) {
      throw new RangeError(
        `classSimilarity: the mean embedding of class ${i} has norm ${norm}; ` +
          "cosine similarity needs a finite, non-zero vector",
      );
    }
  });
  return Array.from({ length: k }, (_, i) => Array.from(host.sim.subarray(i * k, (i + 1) * k)));
}

/**
 * P(.|k) over all classes: a softmax of S[k][j] / tau over j != k, and exactly 0 at k. Subtracts
 * the row maximum first, so any tau > 0 is safe.
 */
export function negativeProbabilities(
  similarity: readonly (readonly number[])[],
  k: number,
  tau: number = DEFAULT_TAU,
): number[] {
  const n = similarity.length;
  if (!(tau > 0) || !Number.isFinite(tau)) {
    throw new RangeError(`negativeProbabilities: tau must be a positive number, got ${tau}`);
  }
  if (!Number.isInteger(k) || k < 0 || k >= n) {
    throw new RangeError(`negativeProbabilities: class ${k} is not in [0, ${n})`);
  }
  if (n < 2) throw new RangeError("negativeProbabilities: a negative needs at least two classes");
  const row = similarity[k];
  if (row.length !== n) {
    throw new RangeError(
      `negativeProbabilities: row ${k} has ${row.length} entries, expected ${n}`,
    );
  }
  let max = -Infinity;
  for (let j = 0; j < n; j++) {
    if (j === k) continue;
    if (!Number.isFinite(row[j])) {
      throw new RangeError(`negativeProbabilities: similarity[${k}][${j}] is ${row[j]}`);
    }
    if (row[j] > max) max = row[j];
  }
  const p = new Array<number>(n);
  let sum = 0;
  for (let j = 0; j < n; j++) {
    p[j] = j === k ? 0 : Math.exp((row[j] - max) / tau);
    sum += p[j];
  }
  for (let j = 0; j < n; j++) p[j] /= sum;
  return p;
}

// ---------------------------------------------------------------------------------------------
// Files

/** A similarity matrix with the classes it belongs to, as `generate` reuses it. */
export interface SimilarityMatrix {
  classNames: string[];
  similarity: number[][];
  /** How it was made (encoder, dataset, ...), for the record. */
  meta?: Record<string, unknown>;
}

const FORMAT = "dipsy-class-similarity";
const VERSION = 1;

/**
 * Writes `{format, version, classNames, similarity, meta}` as JSON. Numbers are written in
 * round-trip form, so loading gives back the same float64 values.
 */
export async function saveSimilarity(path: string, m: SimilarityMatrix): Promise<void> {
  checkMatrix(m, path);
  const { classNames, similarity, meta } = m;
  const rows = similarity.map((r) => `    ${JSON.stringify(r)}`).join(",\n");
  const text = `{\n  "format": "${FORMAT}",\n  "version": ${VERSION},\n` +
    `  "classNames": ${JSON.stringify(classNames)},\n` +
    (meta ? `  "meta": ${JSON.stringify(meta)},\n` : "") +
    `  "similarity": [\n${rows}\n  ]\n}\n`;
  await Deno.writeTextFile(path, text);
}

/**
 * Reads a similarity file. With `classNames`, checks that it covers exactly these classes and
 * returns it in that order (a file written with another class order is permuted); a different
 * class list is an error naming the missing and extra classes.
 */
export async function loadSimilarity(
  path: string,
  classNames?: readonly string[],
): Promise<SimilarityMatrix> {
  let parsed: Record<string, unknown>;
  try {
    parsed = JSON.parse(await Deno.readTextFile(path));
  } catch (e) {
    throw new Error(`similarity file ${path}: ${e instanceof Error ? e.message : e}`);
  }
  if (parsed?.format !== FORMAT || parsed.version !== VERSION) {
    throw new Error(
      `similarity file ${path}: not a "${FORMAT}" version ${VERSION} file ` +
        `(format ${JSON.stringify(parsed?.format)}, version ${JSON.stringify(parsed?.version)})`,
    );
  }
  const { classNames: names, similarity, meta } = parsed as unknown as SimilarityMatrix;
  const m: SimilarityMatrix = { classNames: names, similarity, meta };
  checkMatrix(m, path);
  if (!classNames) return m;

  const index = new Map(m.classNames.map((c, i) => [c, i]));
  const missing = classNames.filter((c) => !index.has(c));
  const wanted = new Set(classNames);
  const extra = m.classNames.filter((c) => !wanted.has(c));
  if (missing.length || extra.length) {
    const list = (xs: string[]) =>
      xs.slice(0, 10).map((x) => JSON.stringify(x)).join(", ") +
      (xs.length > 10 ? `, ... (${xs.length} in all)` : "");
    throw new Error(
      `similarity file ${path} was computed for other classes` +
        (missing.length ? `; missing: ${list(missing)}` : "") +
        (extra.length ? `; not in this dataset: ${list(extra)}` : "") +
        ": recompute it for this dataset",
    );
  }
  const order = classNames.map((c) => index.get(c)!);
  return {
    classNames: [...classNames],
    similarity: order.map((i) => order.map((j) => m.similarity[i][j])),
    meta: m.meta,
  };
}

function checkMatrix(m: SimilarityMatrix, path: string): void {
  const { classNames, similarity } = m;
  const bad = (why: string) => new Error(`similarity file ${path}: ${why}`);
  if (!Array.isArray(classNames) || classNames.some((c) => typeof c !== "string")) {
    throw bad("classNames must be a list of strings");
  }
  if (new Set(classNames).size !== classNames.length) throw bad("classNames has duplicates");
  const n = classNames.length;
  if (!Array.isArray(similarity) || similarity.length !== n) {
    throw bad(`similarity must have ${n} rows, one per class`);
  }
  similarity.forEach((row, i) => {
    if (!Array.isArray(row) || row.length !== n) throw bad(`row ${i} must have ${n} entries`);
    row.forEach((v, j) => {
      if (typeof v !== "number" || !Number.isFinite(v)) throw bad(`entry [${i}][${j}] is ${v}`);
    });
  });
}
