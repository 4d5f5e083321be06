/**
 * The pieces the report's pages are made of. Every link is a relative URL built by `href`, so a
 * report works from a copied folder and under any URL prefix; pages load no script, style or
 * font from anywhere (the one script sorts the sweep table in place).
 */
import { isAbsolute, relative } from "node:path";

export function esc(text: unknown): string {
  return String(text).replace(
    /[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]!,
  );
}

/** Markup that `markup` passes through as it is; every other value is escaped. */
export class Markup {
  constructor(readonly text: string) {}
  toString(): string {
    return this.text;
  }
}

/**
 * A template whose interpolated values are escaped unless they are `Markup` (as made by `markup`
 * itself): a record's value cannot become markup by being written into a page. Arrays are
 * joined; null, undefined and false add nothing.
 */
export function markup(strings: TemplateStringsArray, ...values: unknown[]): Markup {
  const part = (v: unknown): string =>
    v instanceof Markup
      ? v.text
      : Array.isArray(v)
      ? v.map(part).join("")
      : v === null || v === undefined || v === false
      ? ""
      : esc(v);
  return new Markup(strings.reduce((out, s, i) => out + part(values[i - 1]) + s));
}

/** A relative file path as a URL: each segment percent-encoded ("a b/c#1.jpg" stays a path). */
export function href(path: string): string {
  return path.replaceAll("\\", "/").split("/").map(encodeURIComponent).join("/");
}

/**
 * A value for display: an absolute path is shown relative to the report folder `base`, so that
 * a copied report names nothing of the machine it was made on.
 */
export function shown(value: unknown, base: string): string {
  if (typeof value === "string") {
    return isAbsolute(value) ? relative(base, value).replaceAll("\\", "/") || "." : value;
  }
  if (value === null || value === undefined) return "-";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : fmt(value);
  if (Array.isArray(value)) return value.map((v) => shown(v, base)).join(", ");
  return JSON.stringify(value);
}

/** A number with at most 4 significant digits. */
export function fmt(v: number): string {
  return Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0)
    ? v.toExponential(3)
    : String(Number(v.toPrecision(4)));
}

export function pct(v: number | null | undefined): string {
  return typeof v === "number" && Number.isFinite(v) ? `${(100 * v).toFixed(2)}%` : "-";
}

/** Nested objects as dotted keys -> values. */
export function flatten(value: unknown, prefix = "", out: [string, unknown][] = []) {
  if (value !== null && typeof value === "object" && !Array.isArray(value)) {
    for (const [k, v] of Object.entries(value)) flatten(v, prefix ? `${prefix}.${k}` : k, out);
  } else {
    out.push([prefix, value]);
  }
  return out;
}

export function table(headers: string[], rows: string[][], attrs = ""): string {
  return `<table${attrs ? ` ${attrs}` : ""}><thead><tr>${
    headers.map((h) => `<th>${h}</th>`).join("")
  }</tr></thead><tbody>${
    rows.map((r) => `<tr>${r.map((c) => `<td>${c}</td>`).join("")}</tr>`).join("\n")
  }</tbody></table>`;
}

/** A settings object as a two-column table of dotted keys. */
export function settingsTable(value: unknown, base: string): string {
  const rows = flatten(value).map(([k, v]) => [`<code>${esc(k)}</code>`, esc(shown(v, base))]);
  return rows.length ? table(["setting", "value"], rows, 'class="settings"') : "<p>-</p>";
}

/** A figure as its SVG, with the PNG beside it. */
export function figure(
  dir: string,
  fig: { svg: string; png: string; width: number; height: number },
  id: string,
  caption: string,
  attrs = "",
): string {
  return `<figure id="${esc(id)}"><img src="${href(`${dir}/${fig.svg}`)}" width="${fig.width}" ` +
    `height="${fig.height}" alt="${esc(caption)}"${attrs ? ` ${attrs}` : ""}>` +
    `<figcaption>${esc(caption)} (<a href="${href(`${dir}/${fig.png}`)}">PNG</a>)</figcaption>` +
    `</figure>`;
}

export function problemsBlock(problems: readonly string[]): string {
  if (!problems.length) return "";
  return `<section id="problems" class="problems"><h2>Problems (${problems.length})</h2>` +
    `<p>These inputs are missing or corrupt; the rest of the report is drawn without them.</p>` +
    `<ul>${problems.map((p) => `<li>${esc(p)}</li>`).join("")}</ul></section>`;
}

const STYLE = `
body { font-family: "DejaVu Sans", system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px;
  padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .85em; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } table.sortable th { cursor: pointer; }
table.settings td:first-child { white-space: nowrap; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figure img { max-width: 100%; height: auto; }
figcaption { font-size: .8em; color: #555; }
.problems { background: #fff4f4; border: 1px solid #e0b4b4; padding: .5em 1em; }
.sheet { display: flex; flex-wrap: wrap; gap: 8px; }
.tile { border: 1px solid #ddd; padding: 4px; font-size: .7em; width: 140px; }
.tile .main { display: block; width: 128px; height: 128px; object-fit: contain; background: #eee; }
.tile .refs { display: flex; gap: 4px; margin-top: 3px; }
.tile .refs img, .tile .refs .gone { width: 60px; height: 60px; object-fit: contain; background: #eee; }
.gone { display: flex; align-items: center; justify-content: center; background: #fdd;
  color: #a00; text-align: center; }
.tile .main.gone { display: flex; width: 128px; height: 128px; }
.examples img { width: 64px; height: 64px; object-fit: contain; margin-right: 3px; }
nav a { margin-right: .8em; }
`;

/** Sorts a table.sortable by the clicked column: numbers as numbers, the rest as text. */
export const SORT_SCRIPT = `
document.querySelectorAll("table.sortable").forEach(function (t) {
  t.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = t.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var up = th.getAttribute("data-order") !== "asc";
      t.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-order"); });
      th.setAttribute("data-order", up ? "asc" : "desc");
      var key = function (r) {
        var c = r.cells[col], v = c.getAttribute("data-value");
        return v === null ? c.textContent : v;
      };
      rows.sort(function (a, b) {
        var x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
        var d = !isNaN(nx) && !isNaN(ny) ? nx - ny : x.localeCompare(y);
        return up ? d : -d;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
`;

export function page(title: string, body: string, opts: { sortable?: boolean } = {}): string {
  return `<!doctype html>\n<html lang="en"><head><meta charset="utf-8">` +
    `<meta name="viewport" content="width=device-width, initial-scale=1">` +
    `<title>${esc(title)}</title><style>${STYLE}</style></head>\n<body>\n${body}\n` +
    (opts.sortable ? `<script>${SORT_SCRIPT}</script>\n` : "") + `</body></html>\n`;
}
