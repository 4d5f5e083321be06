/**
 * The report's plots as Vega-Lite specs, each a pure function of the records' numbers, with the
 * data inline. The marks that tests and pages count are named: a heatmap's cells (one per class
 * pair) are the paths in the SVG group of class `cell_marks`, each labelled with its values
 * (`aria-label`), and a sweep plot's points are in `point_marks`.
 */
import type { TopLevelSpec } from "vega-lite";

/** Side of one heatmap cell, in SVG units: big enough to read, small enough for 100 classes. */
function cellSize(n: number): number {
  return Math.max(5, Math.min(28, Math.floor(640 / Math.max(1, n))));
}

/** Axis settings for class names, which may be long and many. */
function classAxis(title: string, n: number) {
  return {
    title,
    labelLimit: 140,
    labelFontSize: n > 40 ? 7 : 10,
    labels: n <= 120,
  };
}

/** Class similarity S[i][j] as a heatmap, one cell per (class, class) pair. */
export function similarityHeatmap(classNames: readonly string[], matrix: number[][]): TopLevelSpec {
  const n = classNames.length;
  const values = matrix.flatMap((row, i) =>
    row.map((v, j) => ({ row: classNames[i], column: classNames[j], similarity: v }))
  );
  const step = cellSize(n);
  return {
    title: "Class similarity (cosine of mean CLIP image embeddings)",
    data: { values },
    width: { step },
    height: { step },
    name: "cell",
    mark: "rect",
    encoding: {
      x: { field: "column", type: "nominal", sort: [...classNames], axis: classAxis("class", n) },
      y: { field: "row", type: "nominal", sort: [...classNames], axis: classAxis("class", n) },
      color: {
        field: "similarity",
        type: "quantitative",
        scale: { scheme: "viridis" },
        title: "similarity",
      },
      tooltip: [
        { field: "row", title: "class" },
        { field: "column", title: "other" },
        { field: "similarity", format: ".4f" },
      ],
    },
  } as TopLevelSpec;
}

/** Confusion counts: rows the true class, columns the predicted one; one cell per pair. */
export function confusionHeatmap(
  classNames: readonly string[],
  confusion: number[][],
): TopLevelSpec {
  const n = classNames.length;
  const values = confusion.flatMap((row, i) =>
    row.map((v, j) => ({ true: classNames[i], predicted: classNames[j], images: v }))
  );
  const step = cellSize(n);
  const encoding = {
    x: {
      field: "predicted",
      type: "nominal",
      sort: [...classNames],
      axis: classAxis("predicted", n),
    },
    y: { field: "true", type: "nominal", sort: [...classNames], axis: classAxis("true class", n) },
  };
  const cells = {
    name: "cell",
    mark: "rect",
    encoding: {
      ...encoding,
      color: { field: "images", type: "quantitative", scale: { scheme: "blues" }, title: "images" },
    },
  };
  // Counts are written in the cells while they fit.
  const dark = Math.max(1, ...confusion.flat()) / 2;
  const counts = {
    name: "count",
    mark: { type: "text", fontSize: 9 },
    transform: [{ filter: "datum.images > 0" }],
    encoding: {
      ...encoding,
      text: { field: "images", type: "quantitative" },
      color: { condition: { test: `datum.images > ${dark}`, value: "white" }, value: "black" },
    },
  };
  return {
    title: "Confusion matrix (test images)",
    data: { values },
    width: { step },
    height: { step },
    layer: step >= 16 ? [cells, counts] : [cells],
  } as TopLevelSpec;
}

/** Accuracy of each class as a horizontal bar; classes without test images are left out. */
export function perClassBars(
  perClass: readonly { class: string; accuracy: number | null; total: number }[],
): TopLevelSpec {
  const values = perClass.filter((c) => c.accuracy !== null).map((c) => ({
    class: c.class,
    accuracy: c.accuracy,
    images: c.total,
  }));
  return {
    title: "Accuracy per class (test images)",
    data: { values },
    width: 420,
    height: { step: values.length > 60 ? 8 : 16 },
    mark: "bar",
    encoding: {
      y: {
        field: "class",
        type: "nominal",
        sort: perClass.map((c) => c.class),
        axis: classAxis("class", values.length),
      },
      x: {
        field: "accuracy",
        type: "quantitative",
        scale: { domain: [0, 1] },
        axis: { format: "%" },
      },
      tooltip: [{ field: "class" }, { field: "accuracy", format: ".2%" }, { field: "images" }],
    },
  } as TopLevelSpec;
}

/** One training statistic per epoch as a line with points. */
export function epochCurve(
  title: string,
  field: string,
  points: readonly { epoch: number; value: number }[],
  opts: { log?: boolean; format?: string } = {},
): TopLevelSpec {
  return {
    title,
    data: { values: points.map((p) => ({ epoch: p.epoch, [field]: p.value })) },
    width: 320,
    height: 180,
    mark: { type: "line", point: true },
    encoding: {
      x: { field: "epoch", type: "quantitative", axis: { tickMinStep: 1, format: "d" } },
      y: {
        field,
        type: "quantitative",
        scale: opts.log ? { type: "log" } : { zero: false },
        axis: opts.format ? { format: opts.format } : {},
      },
    },
  } as TopLevelSpec;
}

/**
 * One training statistic per optimizer step, with each point labelled `step N: VALUE` (the
 * recorded number as written) so that what is drawn can be read back from the SVG.
 */
export function stepCurve(
  title: string,
  field: string,
  points: readonly { step: number; value: number }[],
  opts: { format?: string } = {},
): TopLevelSpec {
  return {
    title,
    data: {
      values: points.map((p) => ({
        step: p.step,
        [field]: p.value,
        label: `step ${p.step}: ${p.value}`,
      })),
    },
    width: 480,
    height: 180,
    // Points only while they do not hide the line.
    mark: { type: "line", point: points.length <= 400 ? { size: 10 } : false, strokeWidth: 1 },
    encoding: {
      x: { field: "step", type: "quantitative", axis: { tickMinStep: 1, format: "d" } },
      y: {
        field,
        type: "quantitative",
        scale: { zero: false },
        axis: opts.format ? { format: opts.format } : {},
      },
      description: { field: "label" },
    },
  } as TopLevelSpec;
}

/** Accuracy per epoch of one or more splits (validation, test), as lines coloured by split. */
export function accuracyCurves(
  points: readonly { epoch: number; split: string; metric: string; value: number }[],
): TopLevelSpec {
  return {
    title: "Accuracy per epoch",
    data: { values: points.map((p) => ({ ...p, series: `${p.split} ${p.metric}` })) },
    width: 320,
    height: 180,
    mark: { type: "line", point: true },
    encoding: {
      x: { field: "epoch", type: "quantitative", axis: { tickMinStep: 1, format: "d" } },
      y: {
        field: "value",
        type: "quantitative",
        title: "accuracy",
        scale: { domain: [0, 1] },
        axis: { format: "%" },
      },
      color: { field: "series", type: "nominal", title: null },
      // Dashes keep a series visible where it lies on another.
      strokeDash: { field: "series", type: "nominal", title: null },
    },
  } as TopLevelSpec;
}

/** Seconds per stage of an experiment. */
export function stageTimes(stages: readonly { stage: string; seconds: number; status: string }[]) {
  return {
    title: "Stage timings",
    data: { values: stages.map((s) => ({ ...s })) },
    width: 320,
    height: { step: 18 },
    mark: "bar",
    encoding: {
      y: { field: "stage", type: "nominal", sort: stages.map((s) => s.stage), title: null },
      x: { field: "seconds", type: "quantitative" },
      color: { field: "status", type: "nominal" },
    },
  } as TopLevelSpec;
}

/**
 * Accuracy of a sweep's cells against one swept setting: numbers on a linear axis, anything else
 * (plugin names, lists) as categories; one colour per metric.
 */
export function sweepPlot(
  setting: string,
  points: readonly { value: unknown; metric: string; accuracy: number; cell: string }[],
): TopLevelSpec {
  const numeric = points.every((p) => typeof p.value === "number");
  const nums = numeric ? points.map((p) => p.value as number) : [];
  // Settings such as learning rates are swept over decades.
  const log = numeric && Math.min(...nums) > 0 && Math.max(...nums) / Math.min(...nums) >= 10;
  const values = points.map((p) => ({
    setting: numeric || typeof p.value === "string" ? p.value : JSON.stringify(p.value),
    metric: p.metric,
    accuracy: p.accuracy,
    cell: p.cell,
  }));
  return {
    title: `Accuracy against ${setting}`,
    data: { values },
    width: 320,
    height: 200,
    name: "point",
    mark: { type: "point", filled: true, size: 60 },
    encoding: {
      x: {
        field: "setting",
        type: numeric ? "quantitative" : "nominal",
        title: setting,
        scale: numeric ? (log ? { type: "log" } : { zero: false }) : undefined,
        axis: numeric ? {} : { labelAngle: -20, labelLimit: 180 },
      },
      y: { field: "accuracy", type: "quantitative", axis: { format: "%" } },
      color: { field: "metric", type: "nominal" },
      tooltip: [{ field: "cell" }, { field: "metric" }, { field: "accuracy", format: ".2%" }],
    },
  } as TopLevelSpec;
}
