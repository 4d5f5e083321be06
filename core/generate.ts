/**
 * The dataset job: M synthetic images per class, written as `<out>/<class folder>/<index>.jpg`
 * with one `<out>/manifest.jsonl` line each.
 *
 * Guarantees, and how they are kept:
 * - Deterministic. Every random choice derives from the run seed and (class, index), and the
 *   work is cut into fixed batches: the images of class k with indices [jB, (j+1)B). A batch is
 *   always computed whole, with the same members, whether the run is resumed, sharded or asked
 *   for one image (`only`), so every image comes out bit for bit the same (batched kernels are
 *   not bit-exact across batch compositions, so anything looser would not be).
 * - Resumable. An image is finished when its file exists and its manifest line does. Files are
 *   written to a temporary name and renamed; the manifest line is appended after the rename, in
 *   one write, so a killed run leaves at most files without a line (redone) and temporary files
 *   (removed), never half an image.
 * - Shardable. `i/n` takes every n-th batch starting at i. Shards share one output folder: they
 *   write disjoint files, append whole lines to the manifest (O_APPEND), and agree on run.json.
 * - Safe. The input, the settings and the model are checked completely before anything is
 *   written (a refused command leaves nothing that would block the corrected one), a folder that
 *   is not this run's output is never written into, and finished images are never rewritten.
 */
import { createHash } from "node:crypto";
import { join, relative, resolve } from "node:path";
import { scope } from "../ffi/mod.ts";
import { applyAugment } from "./augment.ts";
import type { DiffusionBackbone } from "./backbone.ts";
import type { PluginRecord, ResolvedRun, RunConfig } from "./config.ts";
import { resolveRun, TINY } from "./config.ts";
import { type Dataset, promptFor, promptTemplate, validateDataset } from "./dataset.ts";
import { encodeImage, imageFromTensor, readImage, type RgbImage } from "./image.ts";
import {
  type AdapterRecord,
  appendLine,
  checkOutputFolder,
  checkRecord,
  claimRecord,
  imageFileName,
  listOrNull,
  MANIFEST,
  type ManifestEntry,
  readManifest,
  RECORD_FORMAT,
  RECORD_VERSION,
  RunError,
  type RunRecord,
  type ShotRecord,
  SIMILARITY_FILE,
  type UpgradeRecord,
  writeAtomic,
} from "./output.ts";
import type { Guidance, PairChoice, PairContext, ShotRef } from "./plugins.ts";
import { provenance } from "./provenance.ts";
import { imageSeed } from "./rng.ts";
import { negativeScale, sampleLatents, type SampleRequest } from "./sampling.ts";
import { NO_SHARD, planChunks, type Shard, shardChunks, type WorkItem } from "./shard.ts";

export * from "./output.ts";
export * from "./shard.ts";

// ---------------------------------------------------------------------------------------------
// Plan

export interface SimilaritySource {
  /** The matrix for the dataset's classes, in its class order, and where it came from. */
  get(dataset: Dataset, out: string): Promise<{ matrix: number[][]; from: string }>;
  /** Keeps a copy in the output folder once it is known to be this run's. */
  keep?(path: string, dataset: Dataset, matrix: number[][]): Promise<void>;
}

export type RunPlan = Awaited<ReturnType<typeof planRun>>;

/** Refuses an image size the VAE cannot make: both sides must be multiples of its scale factor. */
export function checkImageSize(
  { width, height }: { width: number | null; height: number | null },
  vaeScaleFactor: number,
): void {
  if (width === null || height === null) return;
  if (width % vaeScaleFactor || height % vaeScaleFactor) {
    throw new RunError(
      `image size ${width}x${height}: "width" and "height" (--size) must be multiples of ` +
        `${vaeScaleFactor}, the model's VAE scale factor`,
    );
  }
}

/** IP-Adapters the guidance needs: 2 for a negative image, 1 for a positive only, else 0. */
export function adaptersFor(guidance: Guidance): number {
  return guidance.usesImages ? (guidance.usesNegative ? 2 : 1) : 0;
}

/** Model identifiers from the configuration (portable across machines, unlike local paths). */
export function configModelIds(config: RunConfig, adapters: number): Record<string, string> {
  if (config.model === TINY) return { model: TINY, modelSeed: String(config.modelSeed) };
  const ids: Record<string, string> = { model: config.model };
  if (adapters > 0) {
    ids.ipAdapter = config.ipAdapter;
    const negative = negativeAdapterFile(config, adapters);
    if (negative !== config.ipAdapter) ids.negativeIpAdapter = negative;
    ids.imageEncoder = config.imageEncoder;
    ids.adapters = String(adapters);
  }
  return ids;
}

/** The negative image's adapter file as configured (the positive's unless set). */
function negativeAdapterFile(config: RunConfig, adapters: number): string {
  return (adapters > 1 ? config.negativeIpAdapter : null) ?? config.ipAdapter;
}

/** Each adapter slot as the run uses it: which image, which file, at which scale. */
export function adapterRecords(
  config: RunConfig,
  guidance: Guidance,
  adapters: number,
): AdapterRecord[] {
  const tiny = config.model === TINY ? `${TINY} (seed ${config.modelSeed})` : null;
  const slots: AdapterRecord[] = [
    { image: "positive", file: tiny ?? config.ipAdapter, scale: guidance.adapterScale },
    {
      image: "negative",
      file: tiny ?? negativeAdapterFile(config, adapters),
      scale: negativeScale(guidance),
    },
  ];
  return slots.slice(0, adapters);
}

function parseOnly(spec: string, dataset: Dataset, perClass: number): WorkItem {
  const colon = spec.lastIndexOf(":");
  const name = colon < 0 ? "" : spec.slice(0, colon);
  const index = Number(spec.slice(colon + 1));
  if (colon < 0 || !name || !Number.isInteger(index) || index < 0) {
    throw new RunError(`--only "${spec}": expected CLASS:INDEX, e.g. "red circle:3"`);
  }
  let classIndex = dataset.classes.findIndex((c) => c.name === name);
  if (classIndex < 0) classIndex = dataset.classes.findIndex((c) => c.folder === name);
  if (classIndex < 0) {
    throw new RunError(
      `--only "${spec}": no class "${name}" (classes: ${
        dataset.classes.map((c) => c.name).join(", ")
      })`,
    );
  }
  if (index >= perClass) {
    throw new RunError(`--only "${spec}": index ${index} is past perClass (${perClass})`);
  }
  return { classIndex, index };
}

type Augment = PairChoice["positiveAugment"];

/** A reference image as the manifest records it; null where none is chosen or `used`. */
function shotRecord(
  dataset: Dataset,
  used: boolean,
  ref: ShotRef | null,
  augment: Augment,
): ShotRecord | null {
  if (!used || !ref) return null;
  const cls = dataset.classes[ref.classIndex];
  const shot = cls.shots[ref.shotIndex];
  const file = relative(dataset.root, shot.path).replaceAll("\\", "/");
  return { class: cls.name, file, shot: ref.shotIndex, augment: augment ? { ...augment } : null };
}

/**
 * Validates the plugins against the dataset and plans this shard's work: batches, pair choices,
 * seeds, prompts and manifest lines. Writes nothing.
 */
async function planRun(opts: GenerateOptions & { dataset: Dataset; run: ResolvedRun }) {
  const { config, dataset, run } = opts;
  const { guidance, pairs } = run;
  if (!config.out) throw new RunError("no output folder (--out)");
  if (config.width === null || config.height === null) {
    throw new Error("planRun: width and height must be resolved (the model's default size)");
  }
  const width = config.width, height = config.height;
  if (opts.vaeScaleFactor !== undefined) checkImageSize(config, opts.vaeScaleFactor);
  const out = resolve(config.out);
  // Before the similarity, which may take minutes to compute.
  checkOutputFolder(out, dataset.root);

  let similarity: { matrix: number[][]; from: string } | null = null;
  if (pairs.needsSimilarity) {
    if (!opts.similarity) {
      throw new RunError(`pairs plugin "${pairs.name}" needs the class similarity matrix`);
    }
    similarity = await opts.similarity.get(dataset, out);
    if (similarity.matrix.length !== dataset.classes.length) {
      throw new RunError(
        `the class similarity (${similarity.from}) has ${similarity.matrix.length} rows for ` +
          `${dataset.classes.length} classes`,
      );
    }
  }

  const classNames = dataset.classes.map((c) => c.name);
  const context: PairContext = {
    classNames,
    shotCounts: dataset.classes.map((c) => c.shots.length),
    shotSizes: dataset.classes.map((c) => c.shots.map((s) => [s.width, s.height] as const)),
    similarity: similarity?.matrix,
    seed: config.seed,
  };
  const template = config.prompt ?? promptTemplate(config.dataset ?? dataset.dataset);
  const prompts = classNames.map((c) => template === "" ? "" : promptFor(template, c));
  const adapters = adaptersFor(guidance);
  const models = configModelIds(config, adapters);
  // Sampler overrides not given follow the model's scheduler config, so they are not listed.
  const { pairs: pairsInfo, sampler: samplerInfo, guidance: guidanceInfo } = run.records;
  /** An image's file, relative to the output folder. */
  const fileOf = ({ classIndex, index }: WorkItem) =>
    `${dataset.classes[classIndex].folder}/${imageFileName(index)}`;

  /** The decisions for one image, made on demand (a large run has 10^5 images or more). */
  const describe = (item: WorkItem) => {
    const { classIndex, index } = item;
    const cls = dataset.classes[classIndex];
    let choice: PairChoice;
    try {
      choice = pairs.choose(context, classIndex, index);
    } catch (e) {
      throw new RunError(
        `pairs plugin "${pairs.name}", class "${cls.name}" image ${index}: ${
          e instanceof Error ? e.message : e
        }`,
        { cause: e },
      );
    }
    if (guidance.usesNegative && !choice.negative) {
      throw new RunError(
        `guidance "${guidance.name}" needs a negative reference image, but pairs plugin ` +
          `"${pairs.name}" chose none (use a pairs plugin with negatives, or a guidance ` +
          "without them, e.g. --preset no-negative)",
      );
    }
    const entry: ManifestEntry = {
      class: cls.name,
      classIndex,
      index,
      file: fileOf(item),
      seed: imageSeed(config.seed, classIndex, index),
      runSeed: config.seed,
      prompt: prompts[classIndex],
      positive: shotRecord(dataset, guidance.usesImages, choice.positive, choice.positiveAugment),
      negative: shotRecord(dataset, guidance.usesNegative, choice.negative, choice.negativeAugment),
      pairs: pairsInfo,
      sampler: samplerInfo,
      guidance: guidanceInfo,
      width,
      height,
      models,
    };
    return { choice, entry, line: JSON.stringify(entry) };
  };
  // A first image of every class, so that a plugin mismatch fails now, not hours in.
  dataset.classes.forEach((_, classIndex) => describe({ classIndex, index: 0 }));

  // `only` keeps the batches of its images, so that those come out as in the whole run.
  const only = opts.only?.length
    ? opts.only.map((s) => parseOnly(s, dataset, config.perClass))
    : null;
  const onlyFiles = only && new Set(only.map(fileOf));
  const batches = planChunks(dataset.classes.length, config.perClass, config.batch).filter((c) =>
    !only ||
    only.some((w) =>
      w.classIndex === c.classIndex && w.index >= c.start && w.index < c.start + c.size
    )
  );
  /** This shard's batches. */
  const chunks = shardChunks(batches, opts.shard ?? NO_SHARD).map((chunk) => {
    const images = Array.from({ length: chunk.size }, (_, k) => {
      const item = { classIndex: chunk.classIndex, index: chunk.start + k };
      return { ...item, file: fileOf(item) };
    });
    return { ...chunk, folder: dataset.classes[chunk.classIndex].folder, images };
  });
  /** Images this invocation is responsible for (all of the shard, or `only`). */
  const wanted = new Set(
    chunks.flatMap((c) => c.images.map((i) => i.file)).filter((f) =>
      !onlyFiles || onlyFiles.has(f)
    ),
  );

  const record: RunRecord = {
    format: RECORD_FORMAT,
    version: RECORD_VERSION,
    output: {
      models,
      dtype: config.dtype,
      guidance: guidanceInfo,
      sampler: samplerInfo,
      pairs: pairsInfo,
      width,
      height,
      seed: config.seed,
      prompt: template,
      quality: config.quality,
      similarity: similarity
        ? createHash("sha256").update(JSON.stringify(similarity.matrix)).digest("hex")
        : null,
    },
    dataset: {
      classes: dataset.classes.map((c) => ({
        name: c.name,
        folder: c.folder,
        shots: c.shots.map((s) => `${s.file} ${s.width}x${s.height}`),
      })),
    },
    settings: {
      batch: config.batch,
      perClass: config.perClass,
      device: config.device,
      clip: pairs.needsSimilarity ? config.clip : null,
    },
    adapters: adapterRecords(config, guidance, adapters),
    data: resolve(dataset.root),
    provenance: await provenance(config),
  };
  return {
    config,
    out,
    dataset,
    run,
    chunks,
    wanted,
    describe,
    record,
    similarity,
    similaritySource: opts.similarity,
  };
}

// ---------------------------------------------------------------------------------------------
// Output folder

export interface OpenedRun {
  /** Batches with at least one wanted image not finished. */
  pending: RunPlan["chunks"];
  /** Wanted images already finished (file and manifest line). */
  finished: Set<string>;
  /** Wanted images to write. */
  toWrite: number;
  /** Manifest lines already present for wanted images (their files are missing). */
  lines: Map<string, string>;
  notes: string[];
}

/**
 * Resolves an earlier run.json's plugin options as this version does: records written before
 * defaults were recorded (no `interval: null`, no DDIM `eta: 0`) compare by effective settings.
 */
function upgrader(run: ResolvedRun): UpgradeRecord {
  return (previous) => {
    const output = { ...previous.output };
    for (const key of ["guidance", "sampler", "pairs"] as const) {
      const p = output[key] as PluginRecord | undefined;
      if (p && typeof p === "object" && typeof p.name === "string") {
        output[key] = run.resolveRecord(key, p);
      }
    }
    return { ...previous, output };
  };
}

/**
 * Checks the output folder: refuses a folder with other contents or an incompatible run.json,
 * and finds what is left to do. Only with `claim` does it write: it claims the folder for this
 * run (run.json, the similarity's copy) and removes this shard's leftover temporary files.
 */
async function openRun(plan: RunPlan, claim: boolean): Promise<OpenedRun> {
  const { out, dataset } = plan;
  const missing = checkOutputFolder(out, dataset.root) === "missing";
  if (!claim) return await findWork(plan, await checkRecord(out, plan.record, upgrader(plan.run)));
  if (missing) await Deno.mkdir(out, { recursive: true });
  const { notes } = await claimRecord(out, plan.record, upgrader(plan.run));
  const { similarity, similaritySource: source } = plan;
  if (similarity && source?.keep && listOrNull(out)?.every((e) => e.name !== SIMILARITY_FILE)) {
    await source.keep(join(out, SIMILARITY_FILE), dataset, similarity.matrix);
  }

  // Leftover temporary files of this shard's images (another shard's may be in flight).
  const mine = new Set(plan.chunks.flatMap((c) => c.images.map((i) => i.file)));
  for (const folder of new Set(plan.chunks.map((c) => c.folder))) {
    for (const e of listOrNull(join(out, folder)) ?? []) {
      const m = /^\.(.+)\.[0-9a-f]{8}\.tmp$/.exec(e.name);
      if (m && mine.has(`${folder}/${m[1]}`)) {
        await Deno.remove(join(out, folder, e.name)).catch(() => {});
      }
    }
  }
  return await findWork(plan, notes);
}

/** The wanted images already finished, the batches still to run (reads only). */
async function findWork(plan: RunPlan, notes: string[]): Promise<OpenedRun> {
  const { out } = plan;
  const manifest = await readManifest(out, (f) => plan.wanted.has(f));
  const bad = manifest.badLines;
  if (bad.length) {
    const some = bad.slice(0, 5).join(", ") + (bad.length > 5 ? ", ..." : "");
    notes.push(
      `${MANIFEST}: ignored ${bad.length} unreadable line(s) (${some}); their images are redone`,
    );
  }
  const finished = new Set<string>();
  const lines = new Map<string, string>();
  for (const file of plan.wanted) {
    const m = manifest.entries.get(file);
    if (!m) continue;
    if (await Deno.stat(join(out, file)).then((s) => s.isFile, () => false)) finished.add(file);
    else lines.set(file, m.line);
  }
  const pending = plan.chunks.filter((c) =>
    c.images.some((i) => plan.wanted.has(i.file) && !finished.has(i.file))
  );
  const toWrite = [...plan.wanted].filter((f) => !finished.has(f)).length;
  return { pending, finished, toWrite, lines, notes };
}

// ---------------------------------------------------------------------------------------------
// Execution

/** How far a run is, as `onProgress` reports it. */
export interface ProgressInfo {
  /** Images written so far by this invocation. */
  done: number;
  /** Images this invocation has to write. */
  total: number;
  /** The denoising step of the batch in flight. */
  step?: { index: number; total: number };
}

export interface ExecuteOptions {
  /** Checked between batches: the batch in flight is finished and written first. */
  signal?: AbortSignal;
  onProgress?: (p: ProgressInfo) => void;
  /** After each image's manifest line is written. */
  onImage?: (entry: ManifestEntry) => void;
  /** Awaited as each batch starts, after the signal check (lets a test hold the run there). */
  beforeBatch?: () => Promise<void>;
}

export interface RunResult {
  written: number;
  /** Images that were already finished. */
  skipped: number;
  /** Images left to do (after an interruption). */
  remaining: number;
  interrupted: boolean;
}

/** A small cache of decoded shots: a batch's positives all come from one class. */
class ShotCache {
  readonly #map = new Map<string, Promise<RgbImage>>();
  constructor(readonly capacity: number) {}
  get(path: string): Promise<RgbImage> {
    let p = this.#map.get(path);
    if (p) {
      this.#map.delete(path);
    } else {
      p = readImage(path);
      if (this.#map.size >= this.capacity) this.#map.delete(this.#map.keys().next().value!);
    }
    this.#map.set(path, p);
    return p;
  }
}

/** The result of a run that has written `written` of the images `opened` found to do. */
function runResult(opened: OpenedRun, written: number): RunResult {
  const { finished, toWrite } = opened;
  return {
    written,
    skipped: finished.size,
    remaining: toWrite - written,
    interrupted: written < toWrite,
  };
}

/** Generates the pending batches and writes their wanted images. */
async function executeRun(
  plan: RunPlan,
  opened: OpenedRun,
  backbone: DiffusionBackbone,
  opts: ExecuteOptions,
): Promise<RunResult> {
  const { config, out } = plan;
  const { guidance } = plan.run;
  const need = adaptersFor(guidance);
  if (backbone.adapterCount < need) {
    throw new RunError(
      `guidance "${guidance.name}" needs ${need} IP-Adapter(s); the model has ` +
        `${backbone.adapterCount}`,
    );
  }
  checkImageSize(config, backbone.vaeScaleFactor);
  const cache = new ShotCache(64);
  // A reference image as the sampler takes it; null where none is chosen or `used`.
  const reference = async (used: boolean, ref: ShotRef | null, augment: Augment) => {
    if (!used || !ref) return null;
    const img = await cache.get(plan.dataset.classes[ref.classIndex].shots[ref.shotIndex].path);
    return augment ? applyAugment(img, augment) : img;
  };
  const total = opened.toWrite;
  let written = 0;
  opts.onProgress?.({ done: 0, total });
  const manifestPath = join(out, MANIFEST);
  const made = new Set<string>();

  for (const chunk of opened.pending) {
    if (opts.signal?.aborted) break;
    await opts.beforeBatch?.();
    const requests: SampleRequest[] = [];
    const plans = chunk.images.map((img) => plan.describe(img));
    for (const { choice: c, entry } of plans) {
      requests.push({
        prompt: entry.prompt,
        positive: await reference(guidance.usesImages, c.positive, c.positiveAugment),
        negative: await reference(guidance.usesNegative, c.negative, c.negativeAugment),
        seed: entry.seed,
      });
    }
    const images = generateBatch(
      plan,
      backbone,
      requests,
      (index, steps) => opts.onProgress?.({ done: written, total, step: { index, total: steps } }),
    );

    await Deno.mkdir(join(out, chunk.folder), { recursive: true });
    for (let k = 0; k < chunk.images.length; k++) {
      const img = chunk.images[k], { entry, line } = plans[k];
      if (!plan.wanted.has(img.file) || opened.finished.has(img.file) || made.has(img.file)) {
        continue;
      }
      const bytes = await encodeImage(images[k], "jpeg", { quality: config.quality });
      await writeAtomic(join(out, img.file), bytes);
      // The line is there already when only the file was lost: it would be the same line.
      if (opened.lines.get(img.file) !== line) await appendLine(manifestPath, line);
      made.add(img.file);
      written++;
      opts.onImage?.(entry);
      opts.onProgress?.({ done: written, total });
    }
  }
  return runResult(opened, written);
}

function generateBatch(
  plan: RunPlan,
  backbone: DiffusionBackbone,
  requests: SampleRequest[],
  onStep: (index: number, total: number) => void,
): RgbImage[] {
  const { config, run } = plan;
  using sampler = run.sampler(backbone.schedulerConfig);
  using latents = sampleLatents(backbone, requests, {
    width: config.width!,
    height: config.height!,
    guidance: run.guidance,
    sampler,
    onStep,
  });
  return scope(() => imageFromTensor(backbone.decode(latents)) as RgbImage[]);
}

// ---------------------------------------------------------------------------------------------
// The whole job

/**
 * Finds and checks the few-shot data of a configuration: every image is decoded, and all
 * problems are reported at once (a DatasetError) before anything else happens.
 */
export async function validateInput(
  config: RunConfig,
  run: ResolvedRun = resolveRun(config),
): Promise<Dataset> {
  if (!config.data) throw new RunError("no few-shot data folder (--data)");
  return await validateDataset(config.data, {
    dataset: config.dataset ?? undefined,
    fewshotSeed: config.fewshotSeed ?? undefined,
    shots: config.shots ?? undefined,
    holdout: config.holdout ?? undefined,
    skipBad: config.skipBad,
    negatives: run.guidance.usesNegative,
  });
}

export interface GenerateOptions extends ExecuteOptions {
  /** Resolved: data and out set, width and height set, dtype and device concrete. */
  config: RunConfig;
  /** Already validated input (default: validated from the configuration first). */
  dataset?: Dataset;
  similarity?: SimilaritySource;
  shard?: Shard;
  /** Only these images ("class:index", class by name or folder); their batches are computed. */
  only?: readonly string[];
  /**
   * The model's VAE scale factor, which the image sides must be multiples of. Known before the
   * model loads (from its config files), it lets a bad size be refused before anything is written.
   */
  vaeScaleFactor?: number;
  /** The configuration's plugins, built once (default: built from `config`). */
  run?: ResolvedRun;
  /** Built after the input and the output folder are checked (loading a model takes a while). */
  backbone: () => DiffusionBackbone | Promise<DiffusionBackbone>;
  /** Warnings and notes. */
  log?: (message: string) => void;
  /** Called once the work is known, before the model loads. */
  onPlan?: (plan: RunPlan, opened: OpenedRun) => void;
}

/**
 * Validates the input, plans, checks the output folder, loads the model, then claims the folder
 * and generates: nothing is written until the configuration and the model have been accepted.
 */
export async function generate(opts: GenerateOptions): Promise<RunResult & { plan: RunPlan }> {
  const log = opts.log ?? ((m: string) => console.error(m));
  const run = opts.run ?? resolveRun(opts.config);
  let dataset = opts.dataset;
  if (!dataset) {
    dataset = await validateInput(opts.config, run);
    for (const p of dataset.problems) log(`${p.severity}: ${p.path}: ${p.message}`);
  }
  const plan = await planRun({ ...opts, dataset, run });
  const surveyed = await openRun(plan, false);
  for (const n of surveyed.notes) log(`note: ${n}`);
  opts.onPlan?.(plan, surveyed);
  if (surveyed.pending.length === 0 || opts.signal?.aborted) {
    return { ...runResult(surveyed, 0), plan };
  }
  const backbone = await opts.backbone();
  // The folder is claimed only now: a model that fails to load leaves it as it was.
  return { ...await executeRun(plan, await openRun(plan, true), backbone, opts), plan };
}
