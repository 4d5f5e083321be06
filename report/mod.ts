/**
 * `dipsy report PATH`: one self-contained report.html of a `generate` output, a `train`/`eval`
 * run, a `run` experiment or a sweep, with its figures (SVG and PNG), thumbnails and contact
 * sheets in PATH/report/. Inputs that are missing or corrupt are listed on the page and in the
 * result; everything else is still drawn.
 */
import { createHash } from "node:crypto";
import { existsSync, mkdirSync } from "node:fs";
import { join, resolve } from "node:path";
import type { TopLevelSpec } from "vega-lite";
import { UserError } from "../ffi/errors.ts";
import { writeAtomic } from "../core/output.ts";
import { negativeProbabilities } from "../plugins/pairs/similarity.ts";
import { exampleImages, misclassifiedAs, topConfusionPairs } from "./confusions.ts";
import { contactSheets, Thumbnails } from "./contact_sheet.ts";
import {
  accuracyCurves,
  confusionHeatmap,
  epochCurve,
  perClassBars,
  similarityHeatmap,
  stageTimes,
  stepCurve,
  sweepPlot,
} from "./figures.ts";
import {
  esc,
  figure,
  fmt,
  href,
  markup,
  page,
  pct,
  problemsBlock,
  settingsTable,
  table,
} from "./html.ts";
import {
  detectKind,
  type EvalData,
  EXPERIMENT_LAYOUTS,
  experimentLayout,
  type ExperimentRecord,
  findShotsRoot,
  type GenerateData,
  Problems,
  readEvals,
  readGenerate,
  readJson,
  readSimilarityRecord,
  readSweep,
  readTrain,
  type ReportKind,
  type SweepRecord,
  type TrainData,
} from "./read_run.ts";
import { renderFigure } from "./render.ts";
import type { EvalRecord, PredictionLine } from "../app/classify.ts";

export { NotDipsyOutputError, type ReportKind } from "./read_run.ts";

/** The report cannot be written where it was asked for. */
export class ReportError extends UserError {}

/** Where a report goes and what it may read besides the run's own records. */
export interface ReportOptions {
  /** Folder for report.html and report/ (default: PATH itself). */
  out?: string;
  /** The few-shot class root, when the run's records do not say where the references are. */
  data?: string;
  /** Progress lines. */
  log?: (line: string) => void;
  /**
   * The folders (real paths) whose images the report may show, as a server's roots; images
   * elsewhere that a record names are listed as problems instead. Any folder when absent.
   */
  sources?: readonly string[];
}

/** What `writeReport` wrote, and what it could not show. */
export interface ReportResult {
  /** Absolute path of report.html. */
  html: string;
  /** Absolute paths of the figure files (SVG and PNG). */
  figures: string[];
  /** One line per missing or corrupt input. */
  problems: string[];
  /** What PATH was found to be. */
  kind: ReportKind;
}

/** Everything the sections share while one report is made. */
class Report {
  readonly figures: string[] = [];
  readonly problems: Problems;
  readonly thumbs: Thumbnails;
  readonly figDir: string;
  #ids = new Set<string>();

  constructor(
    readonly outDir: string,
    readonly log: (line: string) => void,
    sources?: readonly string[],
  ) {
    this.problems = new Problems(outDir);
    this.thumbs = new Thumbnails(this.problems, sources);
    this.figDir = join(outDir, "report", "figures");
    mkdirSync(this.figDir, { recursive: true });
  }

  /** A unique file name for a figure. */
  name(base: string): string {
    let name = base.replace(/[^A-Za-z0-9_-]+/g, "-"), i = 2;
    const safe = name;
    while (this.#ids.has(name)) name = `${safe}-${i++}`;
    this.#ids.add(name);
    return name;
  }

  /**
   * A section's HTML; a record that parses but lacks what the section reads becomes a problem
   * line, and the other sections are still drawn.
   */
  async section(label: string, fn: () => Promise<string>): Promise<string> {
    try {
      return await fn();
    } catch (e) {
      if (e instanceof UserError) throw e;
      this.problems.lines.push(
        `${label}: not drawn, a record is malformed (${(e as Error).message})`,
      );
      return `<p class="problems">${esc(label)}: not drawn (see the problems above)</p>`;
    }
  }

  async figure(spec: TopLevelSpec, base: string, caption: string, attrs = ""): Promise<string> {
    const name = this.name(base);
    try {
      const fig = await renderFigure(spec, this.figDir, name);
      this.figures.push(join(this.figDir, fig.svg), join(this.figDir, fig.png));
      this.log(`figure ${name}`);
      return figure("report/figures", fig, `fig-${name}`, caption, attrs);
    } catch (e) {
      // A figure that cannot be drawn is a bug; the report still shows the rest.
      this.problems.lines.push(`figure ${name}: could not be drawn (${(e as Error).message})`);
      return `<p class="problems">figure ${esc(name)} could not be drawn</p>`;
    }
  }
}

/**
 * Writes report.html (and report/: figures as SVG and PNG, thumbnails, contact sheets) of the
 * `generate` output, `train`/`eval` run, `run` experiment or sweep in `path`, as
 * `dipsy report` does. Missing or corrupt inputs are listed in the result and on the page;
 * a folder that is no dipsy output is a `NotDipsyOutputError`.
 */
export async function writeReport(path: string, opts: ReportOptions = {}): Promise<ReportResult> {
  const dir = resolve(path);
  const kind = detectKind(dir);
  const outDir = resolve(opts.out ?? dir);
  try {
    mkdirSync(join(outDir, "report"), { recursive: true });
  } catch (e) {
    throw new ReportError(`cannot write the report into ${outDir}: ${(e as Error).message}`);
  }
  const r = new Report(outDir, opts.log ?? (() => {}), opts.sources);
  let title: string, body: string;
  switch (kind) {
    case "generate": {
      const data = await readGenerate(dir, r.problems);
      title = `Generated set ${lastName(dir)}`;
      body = await r.section("generated images", () => generateSection(r, data, [opts.data]));
      break;
    }
    case "train": {
      const data = readTrain(dir, r.problems);
      title = `Classifier run ${lastName(dir)}`;
      body = await r.section("training", () => trainSection(r, data)) +
        await r.section("evaluation", () => evalSections(r, data.evals, data));
      break;
    }
    case "run":
      title = `Experiment ${lastName(dir)}`;
      body = await r.section("experiment", () => runSection(r, dir, opts.data));
      break;
    case "sweep":
      title = `Sweep ${lastName(dir)}`;
      body = await r.section("sweep", () => sweepSection(r, dir));
      break;
  }
  const html = join(outDir, "report.html");
  const where = r.problems.rel(dir);
  const content =
    `<h1>${esc(title)}</h1>\n<p>dipsy ${kind} report of <code>${
      esc(where === "." ? lastName(dir) : where)
    }</code>, made ${esc(new Date().toISOString().slice(0, 16).replace("T", " "))} UTC.</p>\n` +
    problemsBlock(r.problems.lines) + body;
  await writeAtomic(html, page(title, content, { sortable: kind === "sweep" }));
  return { html, figures: r.figures, problems: [...r.problems.lines], kind };
}

function lastName(dir: string): string {
  return dir.split(/[\\/]/).filter(Boolean).at(-1) ?? dir;
}

// ---------------------------------------------------------------------------------------------
// Generated images

async function generateSection(
  r: Report,
  data: GenerateData,
  roots: (string | undefined | null)[],
): Promise<string> {
  const rec = data.record;
  const sim = data.similarity;
  const shotsRoot = findShotsRoot(data, [
    ...roots.map((x) => (x ? resolve(x) : x)),
    typeof rec?.data === "string" ? rec.data : null,
    typeof sim?.meta.data === "string" ? sim.meta.data : null,
  ]);
  const anyRefs = data.entries.some((l) => l.some((e) => e.positive || e.negative));
  if (!shotsRoot && anyRefs) {
    r.problems.add(
      data.dir,
      "the few-shot reference images were not found (" +
        (typeof rec?.data === "string"
          ? `${rec.data}, recorded in run.json, does not hold them; `
          : "the folder is not recorded in the run; ") +
        "give --data DIR): reference thumbnails are left out",
    );
  }
  const out: string[] = [`<section id="generated"><h2>Generated images</h2>`];
  const total = data.entries.reduce((s, l) => s + l.length, 0);
  const o = (rec?.output ?? {}) as Record<string, unknown>;
  const pairs = (o.pairs ?? {}) as { name?: string; tau?: number };
  out.push(
    `<p>${total} images listed in <code>${esc(r.problems.rel(join(data.dir, "manifest.jsonl")))}` +
      `</code> for ${data.classes.length} classes` +
      (rec?.settings?.perClass ? markup`, ${rec.settings.perClass} per class planned`.text : "") +
      (shotsRoot ? `; references from <code>${esc(r.problems.rel(shotsRoot))}</code>` : "") +
      `.</p>`,
  );

  // Class similarity and the negative classes it makes likely.
  const n = data.classes.length;
  let probs: ((k: number) => number[]) | null = null;
  if (sim) {
    const order = data.classes.map((c) => sim.classNames.indexOf(c));
    const aligned = order.every((i) => i >= 0) && sim.classNames.length === n;
    if (!aligned) {
      r.problems.add(
        sim.file,
        "its classes differ from the run's; the heatmap shows the file's classes",
      );
    }
    const names = aligned ? data.classes : sim.classNames;
    const matrix = aligned ? order.map((i) => order.map((j) => sim.matrix[i][j])) : sim.matrix;
    // run.json holds the digest of the matrix the pairs were drawn from, in the run's class order.
    const used = o.similarity;
    if (
      aligned && typeof used === "string" &&
      used !== createHash("sha256").update(JSON.stringify(matrix)).digest("hex")
    ) {
      r.problems.add(
        sim.file,
        "not the matrix this run drew its negatives from (its digest differs from run.json's)",
      );
    }
    out.push(
      await r.figure(
        similarityHeatmap(names, matrix),
        "similarity",
        `Class similarity, ${names.length} x ${names.length} class pairs`,
        `data-classes="${names.length}" data-figure="similarity"`,
      ),
    );
    if (aligned && pairs.name === "class-similarity" && n >= 2) {
      const tau = typeof pairs.tau === "number" ? pairs.tau : undefined;
      probs = (k) => negativeProbabilities(matrix, k, tau);
    }
  }
  if (!probs && pairs.name === "uniform" && n >= 2) {
    probs = (k) => data.classes.map((_, j) => (j === k ? 0 : 1 / (n - 1)));
  }
  out.push(negativesTable(data, probs, pairs));

  // Per class: the contact sheet.
  const { strips } = await contactSheets(data, {
    outDir: r.outDir,
    shotsRoot,
    thumbs: r.thumbs,
    problems: r.problems,
    log: r.log,
  });
  out.push(
    `<h3>Contact sheets</h3><p>Each image with its positive reference (left) and ` +
      `negative reference (right) and the negative class; up to 200 images per sheet page.</p>`,
  );
  data.classes.forEach((c, k) => {
    out.push(`<h3 id="class-${k}">${esc(c)} (${data.entries[k].length} images)</h3>${strips[k]}`);
  });
  if (rec) {
    out.push(`<h3>Generation settings</h3>`, settingsTable(rec.output, r.outDir));
    out.push(settingsTable(rec.settings, r.outDir));
    if (rec.provenance) out.push(`<h3>Versions</h3>`, settingsTable(rec.provenance, r.outDir));
  }
  out.push(`</section>`);
  return out.join("\n");
}

/** Per class, its most likely negative classes with the sampler's probabilities. */
function negativesTable(
  data: GenerateData,
  probs: ((k: number) => number[]) | null,
  pairs: { name?: string; tau?: number },
): string {
  if (pairs.name === "none") {
    return "<p>No negative references (pairs plugin <code>none</code>).</p>";
  }
  const rows = data.classes.map((c, k) => {
    const seen = new Map<string, number>();
    for (const e of data.entries[k]) {
      if (e.negative) seen.set(e.negative.class, (seen.get(e.negative.class) ?? 0) + 1);
    }
    let likely = "-";
    if (probs) {
      const p = probs(k);
      likely = p.map((v, j) => [v, j] as const).filter(([, j]) => j !== k)
        .sort((a, b) => b[0] - a[0] || a[1] - b[1]).slice(0, 3)
        .map(([v, j]) => `${esc(data.classes[j])} (${pct(v)})`).join(", ");
    }
    const drawn = [...seen].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1)).slice(0, 3)
      .map(([name, count]) => `${esc(name)} (${count})`).join(", ");
    return [esc(c), likely, drawn || "-"];
  });
  const how = pairs.name === "class-similarity"
    ? `P(j | class) = softmax(S / tau) over the other classes, tau = ${fmt(pairs.tau ?? 0.4)}`
    : `pairs plugin ${esc(pairs.name ?? "unknown")}`;
  return `<h3>Negative classes</h3><p>The most likely negative classes of each class (${how}) ` +
    `and the ones drawn for the images listed.</p>` +
    table(["class", "most likely negatives (probability)", "drawn (images)"], rows);
}

// ---------------------------------------------------------------------------------------------
// Training and evaluation

async function trainSection(r: Report, data: TrainData): Promise<string> {
  const rec = data.record;
  const out: string[] = [`<section id="training"><h2>Training</h2>`];
  if (!rec) {
    out.push("<p>No training record.</p></section>");
    return out.join("\n");
  }
  const h = Array.isArray(rec.history) ? rec.history : [];
  out.push(
    [
      markup`<p>${rec.status}: ${rec.epochsDone} of ${rec.settings?.epochs} epochs, `,
      markup`${rec.data?.real} real and ${rec.data?.synthetic} synthetic images `,
      markup`(${rec.data?.perEpoch} per epoch, ${rec.data?.itersPerEpoch} steps), `,
      markup`${fmt(rec.seconds ?? 0)} s on ${rec.device}.</p>`,
    ].join(""),
  );
  if (h.length) {
    const curve = (field: keyof (typeof h)[number]) =>
      h.map((e) => ({ epoch: e.epoch, value: Number(e[field]) }));
    out.push(
      await r.figure(
        epochCurve("Training loss (mean per epoch)", "loss", curve("loss")),
        "loss",
        "Loss per epoch",
      ),
      await r.figure(
        epochCurve("Learning rate (last step of the epoch)", "lr", curve("lr"), { format: ".1e" }),
        "lr",
        "Learning rate per epoch",
      ),
      await r.figure(
        epochCurve("Training throughput", "images/s", curve("imagesPerSecond")),
        "throughput",
        "Images per second per epoch",
      ),
    );
  }
  if (data.steps.length) {
    const steps = data.steps;
    out.push(
      await r.figure(
        stepCurve(
          "Training loss per step",
          "loss",
          steps.map((s) => ({ step: s.step, value: s.loss })),
        ),
        "loss-steps",
        `Loss of each of the ${steps.length} optimizer steps (steps.jsonl)`,
      ),
      await r.figure(
        stepCurve(
          "Learning rate per step",
          "lr",
          steps.map((s) => ({ step: s.step, value: s.lr })),
          { format: ".1e" },
        ),
        "lr-steps",
        "Learning rate of each optimizer step",
      ),
    );
  }
  const acc: { epoch: number; split: string; metric: string; value: number }[] = [];
  for (const { file, record } of data.evals) {
    for (const e of record.perEpoch ?? []) {
      const split = file === "eval.json" ? "test" : `test ${file.slice(5, -5)}`;
      acc.push({ epoch: e.epoch, split, metric: "top-1", value: e.top1 });
    }
  }
  // Drawn last, so its dashes show where it lies on a test curve.
  for (const e of data.validation?.epochs ?? []) {
    acc.push({ epoch: e.epoch, split: "validation", metric: "top-1", value: e.top1 });
  }
  if (acc.length) {
    out.push(
      await r.figure(accuracyCurves(acc), "accuracy-epochs", "Accuracy per evaluated epoch"),
    );
  }
  if (h.length) {
    out.push(
      table(
        ["epoch", "loss", "lr", "images/s", "seconds", "skipped steps"],
        h.map((e) =>
          [e.epoch, fmt(e.loss), fmt(e.lr), fmt(e.imagesPerSecond), fmt(e.seconds), e.skippedSteps]
            .map(esc)
        ),
      ),
    );
  }
  out.push(`<h3>Classifier settings</h3>`, settingsTable(rec.settings, r.outDir));
  if (rec.provenance) out.push(`<h3>Versions</h3>`, settingsTable(rec.provenance, r.outDir));
  out.push(`</section>`);
  return out.join("\n");
}

async function evalSections(
  r: Report,
  evals: readonly EvalData[],
  train: TrainData | null,
): Promise<string> {
  const out: string[] = [];
  for (const data of evals) out.push(await evalSection(r, data, train));
  return out.join("\n");
}

async function evalSection(
  r: Report,
  { file, record: e, predictions }: EvalData,
  train: TrainData | null,
): Promise<string> {
  const base = file.replace(/\.json$/, "");
  const names = e.perClass.map((c) => c.class);
  const out: string[] = [`<section id="${esc(base)}"><h2>Evaluation (${esc(file)})</h2>`];
  out.push(
    table(
      ["test images", "top-1", esc(`top-${e.topK ?? 5}`), "mean per class", "epoch", "selected on"],
      [[
        esc(e.total),
        pct(e.top1),
        pct(e.top5),
        pct(e.meanPerClass),
        esc(e.selection?.epoch ?? "-"),
        esc(`${e.selection?.selectedOn ?? "-"} (${e.selection?.rule ?? "-"})`),
      ]],
    ),
  );
  if (e.selection?.warning) out.push(`<p><b>warning:</b> ${esc(e.selection.warning)}</p>`);
  const square = e.confusion.length === names.length &&
    e.confusion.every((row) => Array.isArray(row) && row.length === names.length);
  out.push(await r.figure(perClassBars(e.perClass), `per-class-${base}`, "Accuracy per class"));
  if (square) {
    out.push(
      await r.figure(
        confusionHeatmap(names, e.confusion),
        `confusion-${base}`,
        `Confusion matrix, ${names.length} x ${names.length}`,
        `data-classes="${names.length}" data-figure="confusion"`,
      ),
    );
    out.push(
      predictions
        ? await misclassified(r, file, e, names, predictions)
        : await worstConfusions(r, file, e, names, train),
    );
  } else {
    r.problems.lines.push(`${file}: the confusion matrix is not ${names.length} x ${names.length}`);
  }
  out.push(`</section>`);
  return out.join("\n");
}

/** Misclassified images shown per confusion pair, at most. */
export const CONFUSION_EXAMPLES = 12;

/** The worst confusions with the very test images that were misclassified. */
async function misclassified(
  r: Report,
  file: string,
  e: EvalRecord,
  names: string[],
  predictions: readonly PredictionLine[],
): Promise<string> {
  const worst = topConfusionPairs(e.confusion, 8);
  if (!worst.length) return "<h3>Worst confusions</h3><p>No test image was misclassified.</p>";
  const base = `test-${file.replace(/\.json$/, "")}`;
  const rows: string[][] = [];
  for (const { count, from, to } of worst) {
    const wrong = misclassifiedAs(predictions, names[from], names[to]);
    const shown = wrong.slice(0, CONFUSION_EXAMPLES);
    const made = await Promise.all(
      shown.map((p, i) =>
        r.thumbs.make(
          join(e.test, p.file),
          join(r.outDir, "report", "thumbs", base, `c${from}-${to}`, `${i}.jpg`),
          64,
        )
      ),
    );
    const images = shown.map((p, i) => {
      const title = esc(`${p.file}; top-5: ${p.top5.join(", ")}`);
      return made[i]
        ? `<img src="${href(r.problems.rel(made[i]!))}" alt="${esc(p.file)}" title="${title}" ` +
          `data-file="${esc(p.file)}">`
        : `<span class="gone" data-file="${esc(p.file)}" title="${title}">missing</span>`;
    }).join("");
    const share = e.perClass[from]?.total ? count / e.perClass[from].total : null;
    rows.push([
      esc(names[from]),
      esc(names[to]),
      markup`${count} (${pct(share)})`.text,
      `<span class="examples" data-true="${esc(names[from])}" data-predicted="${
        esc(names[to])
      }">${images}</span>` +
      (wrong.length > shown.length ? ` and ${wrong.length - shown.length} more` : ""),
    ]);
  }
  return `<h3>Worst confusions</h3><p>Test images of a class taken for another, most ` +
    `frequent first, with the images that were misclassified (up to ${CONFUSION_EXAMPLES} ` +
    `per pair; hover one for its file and top-5 classes).</p>` +
    table(["true class", "taken for", "images (share of class)", "misclassified images"], rows);
}

async function worstConfusions(
  r: Report,
  file: string,
  e: EvalRecord,
  names: string[],
  train: TrainData | null,
): Promise<string> {
  const worst = topConfusionPairs(e.confusion, 8);
  // Thumbnails of each eval file's test images apart: two test sets may share class names.
  const base = `test-${file.replace(/\.json$/, "")}`;
  if (!worst.length) return "<h3>Worst confusions</h3><p>No test image was misclassified.</p>";
  const dataset = (train?.record?.settings?.dataset ?? undefined) as string | undefined;
  const examples = await exampleImages(e.test, names, { dataset, problems: r.problems });
  const thumbs = async (k: number) => {
    const list = examples?.get(names[k]) ?? [];
    const made = await Promise.all(
      list.slice(0, 4).map((src, i) =>
        r.thumbs.make(src, join(r.outDir, "report", "thumbs", base, `c${k}`, `${i}.jpg`), 64)
      ),
    );
    return made.filter((p): p is string => p !== null).map((p) =>
      `<img src="${href(r.problems.rel(p))}" alt="${esc(names[k])}">`
    ).join("");
  };
  const rows: string[][] = [];
  for (const { count, from, to } of worst) {
    const share = e.perClass[from]?.total ? count / e.perClass[from].total : null;
    rows.push([
      esc(names[from]),
      esc(names[to]),
      markup`${count} (${pct(share)})`.text,
      `<span class="examples">${await thumbs(from)}</span>`,
      `<span class="examples">${await thumbs(to)}</span>`,
    ]);
  }
  return `<h3>Worst confusions</h3><p>Test images of a class taken for another, most ` +
    `frequent first, with example test images of both classes (the evaluation kept no ` +
    `per-image predictions; evaluate again to see the misclassified images).</p>` +
    table([
      "true class",
      "taken for",
      "images (share of class)",
      "true class examples",
      "other class examples",
    ], rows);
}

// ---------------------------------------------------------------------------------------------
// An experiment

async function runSection(r: Report, dir: string, data?: string): Promise<string> {
  const layout = experimentLayout(dir) ?? EXPERIMENT_LAYOUTS[0];
  // The demo writes no experiment record; `dipsy run` always does, at its end.
  const rec = readJson<ExperimentRecord>(join(dir, "report.json"), r.problems, {
    required: layout === EXPERIMENT_LAYOUTS[0],
    format: "dipsy-run-report",
  });
  const out: string[] = [];
  if (rec) {
    out.push(
      `<section id="summary"><h2>Summary</h2>`,
      table(
        ["classes", "test images", "top-1", "top-5", "mean per class", "device"],
        [[
          esc(rec.classes),
          esc(rec.accuracy?.total),
          pct(rec.accuracy?.top1),
          pct(rec.accuracy?.top5),
          pct(rec.accuracy?.meanPerClass),
          esc(rec.device),
        ]],
      ),
    );
    if (Array.isArray(rec.stages) && rec.stages.length) {
      out.push(
        await r.figure(stageTimes(rec.stages), "stages", "Stage timings"),
        table(
          ["stage", "status", "seconds"],
          rec.stages.map((s) => [esc(s.stage), esc(s.status), fmt(s.seconds)]),
        ),
      );
    }
    out.push(`</section>`);
  }
  const synthetic = join(dir, layout.synthetic);
  if (existsSync(synthetic)) {
    const gen = await readGenerate(synthetic, r.problems);
    // The experiment's own matrix, when the generated set holds no copy of it.
    const simFile = join(dir, "similarity.json");
    if (!gen.similarity && existsSync(simFile)) {
      gen.similarity = readSimilarityRecord(simFile, r.problems);
    }
    out.push(
      await r.section(
        "generated images",
        () => generateSection(r, gen, [data, rec?.data, join(dir, "data")]),
      ),
    );
  }
  const trainDir = join(dir, layout.train);
  if (existsSync(trainDir)) {
    const train = readTrain(trainDir, r.problems);
    const evals = readEvals(dir, r.problems);
    const all = { ...train, evals: [...evals, ...train.evals] };
    out.push(await r.section("training", () => trainSection(r, all)));
    out.push(await r.section("evaluation", () => evalSections(r, all.evals, all)));
  }
  if (rec) {
    out.push(
      `<section id="configuration"><h2>Configuration</h2><h3>Generation</h3>`,
      settingsTable(rec.generation, r.outDir),
      `<h3>Classifier</h3>`,
      settingsTable(rec.classifier, r.outDir),
      `<h3>Evaluation</h3>`,
      settingsTable({ test: rec.test, selection: rec.selection }, r.outDir),
    );
    if (rec.provenance) out.push(`<h3>Versions</h3>`, settingsTable(rec.provenance, r.outDir));
    out.push(`</section>`);
  }
  return out.join("\n");
}

// ---------------------------------------------------------------------------------------------
// A sweep

const METRICS = ["val_top1", "test_top1", "test_top5", "mean_per_class"] as const;

async function sweepSection(r: Report, dir: string): Promise<string> {
  const sweep: SweepRecord | null = readSweep(dir, r.problems);
  if (!sweep) return "<p>No readable sweep table.</p>";
  const out: string[] = [`<section id="sweep"><h2>Sweep</h2>`];
  out.push(
    `<p>${sweep.rows.length} cells ranked by <code>${esc(sweep.metric)}</code>` +
      (sweep.sweep
        ? ` (sweep file <code>${esc(r.problems.rel(resolve(dir, sweep.sweep)))}</code>)`
        : "") +
      `; click a column header to sort.</p>`,
  );
  const cellLink = (row: SweepRecord["rows"][number]) => {
    const report = join(dir, row.run ?? "", "report.html");
    return row.run && existsSync(report)
      ? `<a href="${href(r.problems.rel(report))}">${esc(row.cell)}</a>`
      : esc(row.cell);
  };
  const num = (v: unknown) => (typeof v === "number" && Number.isFinite(v) ? v : null);
  const rows = sweep.rows.map((row) => {
    const cells = [
      [esc(row.rank), String(row.rank)],
      [cellLink(row), row.cell],
      ...sweep.swept.map((k) => {
        const v = row.settings[k];
        return [
          esc(typeof v === "string" ? v : JSON.stringify(v) ?? "-"),
          typeof v === "number" ? String(v) : null,
        ];
      }),
      ...METRICS.map((m) => [pct(num(row[m])), num(row[m]) === null ? "-1" : String(row[m])]),
    ];
    return `<tr>${
      cells.map(([text, value]) =>
        `<td${value !== null ? ` data-value="${esc(value)}"` : ""}>${text}</td>`
      ).join("")
    }</tr>`;
  });
  const headers = ["rank", "cell", ...sweep.swept, ...METRICS];
  out.push(
    `<table class="sortable" id="sweep-table"><thead><tr>${
      headers.map((h) => `<th>${esc(h)}</th>`).join("")
    }</tr></thead><tbody>${rows.join("\n")}</tbody></table>`,
  );
  if (sweep.missing.length) {
    const why = new Map(sweep.failed.map((f) => [f.cell, f.reason]));
    out.push(
      `<h3>Missing cells (${sweep.missing.length})</h3><ul>${
        sweep.missing.map((c) =>
          `<li><code>${esc(c)}</code>${
            why.has(c) ? `: failed: ${esc(why.get(c))}` : ": not run yet"
          }</li>`
        ).join("")
      }</ul>`,
    );
  }
  for (const [i, setting] of sweep.swept.entries()) {
    const points = sweep.rows.flatMap((row) =>
      (["val_top1", "test_top1"] as const).flatMap((m) => {
        const v = num(row[m]);
        return v === null
          ? []
          : [{ value: row.settings[setting], metric: m, accuracy: v, cell: row.cell }];
      })
    );
    if (points.length) {
      out.push(
        await r.figure(sweepPlot(setting, points), `sweep-${i + 1}`, `Accuracy against ${setting}`),
      );
    }
  }
  out.push(`</section>`);
  return out.join("\n");
}
