/**
 * Pages for a person with a browser, beside the API: the runs under the roots (`GET /`), each
 * run's report (`GET /runs/<root>/<path>/`, sent on to its address under a key, and made by
 * report/ when missing or older than the run's records) with the files it links to, and a live
 * page per job (`GET /jobs/<id>`) that follows the job's event stream. Files are served only from
 * inside the roots, by the same checks the API applies to job paths.
 *
 * A browser cannot send a bearer token with a link or an EventSource, so when the server needs a
 * token a page is opened once with `?token=<token>`: the answer sets an HttpOnly, SameSite=Strict
 * cookie and redirects to the same page without the token, and the cookie then stands for the
 * token on every request, the API's included (unsafe methods only from the server's own origin).
 */
import { createHash, createHmac, randomBytes } from "node:crypto";
import { basename, extname, isAbsolute, join, relative, sep as SEPARATOR } from "node:path";
import type { Hono } from "hono";
import { MANIFEST, RUN_RECORD, SIMILARITY_FILE } from "../core/output.ts";
import { SORT_SCRIPT } from "../report/html.ts";
import { UserError } from "../ffi/errors.ts";
import { sameSecret } from "./auth.ts";
import { confine, type JobStore, type JobView } from "./jobs.ts";
import { HttpError } from "./body.ts";

export interface PagesOptions {
  jobs: JobStore;
  /** Real paths of the roots, as the API confines job paths to them. */
  roots: readonly string[];
}

// ---------------------------------------------------------------------------------------------
// The page cookie

const COOKIE = "dipsy_pages";
/** Where reports are sent from, authorized by their key rather than the token (see below). */
export const REPORT_PREFIX = "/reports/";
const PAGE_PATH = /^\/(?:$|runs(?:\/|$)|jobs(?:\/|$)|reports\/)/;

/** The cookie's value: derived from the token, so the cookie never holds the token itself. */
function cookieValue(token: string): string {
  return createHash("sha256").update(`dipsy pages\0${token}`).digest("hex");
}

function cookieOf(req: Request): string | null {
  for (const part of (req.headers.get("cookie") ?? "").split(";")) {
    const i = part.indexOf("=");
    if (i > 0 && part.slice(0, i).trim() === COOKIE) return part.slice(i + 1).trim();
  }
  return null;
}

/**
 * Whether `req` carries the page cookie of `token`. A request that changes something (any
 * method but GET and HEAD) must also come from the server's own origin: SameSite=Strict keeps
 * the cookie off other sites' requests, and this check keeps it so with older browsers too.
 */
export function pageCookieAuthorized(req: Request, token: string): boolean {
  const value = cookieOf(req);
  if (value === null || !sameSecret(value, cookieValue(token))) return false;
  if (req.method === "GET" || req.method === "HEAD") return true;
  const origin = req.headers.get("origin"), host = req.headers.get("host");
  if (!origin || !host) return false;
  try {
    return new URL(origin).host === host;
  } catch {
    return false;
  }
}

/**
 * The answers a page gets before the token check: for the right `?token=`, a redirect to the
 * same page without it that sets the page cookie; for the icon a browser asks of every page,
 * nothing (a refusal would be an error on every page opened before the token). Null for
 * anything else (a wrong token is then refused like a missing one).
 */
export function pageGate(req: Request, token: string): Response | null {
  if (req.method !== "GET" && req.method !== "HEAD") return null;
  const url = new URL(req.url);
  if (url.pathname === "/favicon.ico") return new Response(null, { status: 204 });
  const given = url.searchParams.get("token");
  if (given === null || !PAGE_PATH.test(url.pathname) || !sameSecret(given, token)) return null;
  url.searchParams.delete("token");
  return new Response(null, {
    status: 303,
    headers: {
      location: url.pathname + url.search,
      "set-cookie": `${COOKIE}=${cookieValue(token)}; Path=/; HttpOnly; SameSite=Strict`,
      "cache-control": "no-store",
      // The token is in this request's URL: not to be passed on as a referrer.
      "referrer-policy": "no-referrer",
    },
  });
}

/**
 * The refusal a person sees: a browser asking for a page (Accept: text/html) without the token
 * gets a short page saying how to open it, with the API's status and challenge; anything else
 * (the API, images, scripts) is left to the API's JSON refusal. Null when it is not a page.
 */
export function pageRefusal(req: Request): Response | null {
  if (req.method !== "GET" && req.method !== "HEAD") return null;
  const url = new URL(req.url);
  if (!PAGE_PATH.test(url.pathname) || !/\btext\/html\b/.test(req.headers.get("accept") ?? "")) {
    return null;
  }
  const wrong = url.searchParams.has("token");
  url.searchParams.delete("token");
  url.searchParams.set("token", "TOKEN");
  const example = url.pathname + url.search;
  const res = html(
    page(
      "Token needed",
      `<main><h1>Token needed</h1><p>${
        wrong ? "The token given is not this server's. " : ""
      }This server needs its token: open <code>${esc(example)}</code>, with TOKEN the one ` +
        `<code>dipsy serve</code> was started with (its <code>--token-file</code> or ` +
        `<code>DIPSY_TOKEN</code>). The page then keeps it as a cookie, and later links work ` +
        `without it.</p></main>`,
    ),
    401,
  );
  res.headers.set("www-authenticate", 'Bearer realm="dipsy"');
  res.headers.set("cache-control", "no-store");
  return res;
}

// ---------------------------------------------------------------------------------------------
// HTML

const esc = (s: unknown) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

/** Pages of this module run no inline code and load nothing from elsewhere. */
const PAGE_POLICY =
  "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
  "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
/**
 * A report has its own inline style and one script (it sorts a table) and fetches nothing. Any
 * HTML file in a run's report folder is sent so, whoever wrote it: sandboxed, it runs in an
 * origin of its own that holds no cookie and reaches none of the server's pages, and the only
 * script it may run is the report's own, by its hash.
 */
const REPORT_POLICY = "sandbox allow-scripts; default-src 'none'; script-src 'sha256-" +
  createHash("sha256").update(SORT_SCRIPT).digest("base64") + "'; style-src 'unsafe-inline'; " +
  "img-src 'self' data:; font-src data:; connect-src 'none'; base-uri 'self'; " +
  "form-action 'none'; frame-ancestors 'none'";
/** Files from the roots are shown, never run (an SVG may hold a script). */
const FILE_POLICY = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; " +
  "sandbox";

/**
 * The answer a page path gets for a refusal that the API would send as JSON: a small page with
 * one line. Null for any other path.
 */
export function pageErrorFor(req: Request, status: number, message: string): Response | null {
  return PAGE_PATH.test(new URL(req.url).pathname) ? errorPage(status, message) : null;
}

/**
 * A redirect to a path of this server, as a relative reference: the request's URL does not know
 * the address the client used.
 */
function redirect(path: string, status: 301 | 303): Response {
  return new Response(null, { status, headers: { location: path, "cache-control": "no-store" } });
}

function html(body: string, status = 200): Response {
  return new Response(body, {
    status,
    headers: {
      "content-type": "text/html; charset=utf-8",
      "content-security-policy": PAGE_POLICY,
      "x-content-type-options": "nosniff",
      "cache-control": "no-cache",
      "referrer-policy": "same-origin",
    },
  });
}

function page(title: string, main: string, opts: { script?: string } = {}): string {
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${esc(title)} · dipsy</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/pages.css">
${opts.script ? `<script src="${esc(opts.script)}" defer></script>` : ""}
</head>
<body>
<header><a href="/">dipsy</a></header>
${main}
</body>
</html>
`;
}

/** An error as a page: one line saying what is wrong, and the way back. */
function errorPage(status: number, message: string): Response {
  return html(
    page(
      `${status}`,
      `<main><h1>${status}</h1><p class="error">${esc(message)}</p>` +
        `<p><a href="/">all runs</a></p></main>`,
    ),
    status,
  );
}

// ---------------------------------------------------------------------------------------------
// Paths in the roots

/**
 * The URL name of each root: its folder name, with "-2", "-3"... where two roots share one, so
 * that a run's address reads like its path.
 */
function rootNames(roots: readonly string[]): Map<string, string> {
  const names = new Map<string, string>();
  for (const root of roots) {
    const base = (basename(root) || "root").replace(/[^\w.-]+/g, "_").replace(/^\.+/, "_");
    let name = base;
    for (let n = 2; names.has(name); n++) name = `${base}-${n}`;
    names.set(name, root);
  }
  return names;
}

/** URL path segments, decoded; refuses what could step out of a folder or name a hidden file. */
function segments(path: string): string[] {
  const parts = path.split("/").filter((p, i, all) => p !== "" || i === all.length - 1);
  return parts.map((raw, i) => {
    let p: string;
    try {
      p = decodeURIComponent(raw);
    } catch {
      throw new HttpError(400, `malformed path segment "${raw}"`);
    }
    if (p === "" && i === parts.length - 1) return p;
    if (p === "." || p === ".." || /[\\/\0]/.test(p)) {
      throw new HttpError(403, `path segment "${p}" is not allowed`);
    }
    if (p.startsWith(".")) throw new HttpError(404, `hidden files are not served: ${p}`);
    return p;
  });
}

/** The path of `p` from `dir` when `p` is `dir` or inside it ("" for `dir`), else null. */
function within(dir: string, p: string): string | null {
  const rel = relative(dir, p);
  return rel === ".." || rel.startsWith(`..${SEPARATOR}`) || isAbsolute(rel) ? null : rel;
}

const statOrNull = (p: string): Promise<Deno.FileInfo | null> => Deno.stat(p).catch(() => null);

/** Files the run pages serve anywhere in the roots: images and records. */
const TYPES: Record<string, string> = {
  ".jpg": "image/jpeg",
  ".jpeg": "image/jpeg",
  ".png": "image/png",
  ".webp": "image/webp",
  ".gif": "image/gif",
  ".bmp": "image/bmp",
  ".avif": "image/avif",
  ".svg": "image/svg+xml",
  ".json": "application/json; charset=utf-8",
  ".jsonl": "text/plain; charset=utf-8",
};
const HTML_TYPE = "text/html; charset=utf-8";
/** And in a run's report folder, its other files. */
const REPORT_TYPES: Record<string, string> = {
  ".html": HTML_TYPE,
  ".css": "text/css; charset=utf-8",
  ".csv": "text/csv; charset=utf-8",
  ".txt": "text/plain; charset=utf-8",
};
const IMAGE = /\.(jpe?g|png|webp|gif|bmp|avif)$/i;
const REPORT_HTML = "report.html";
const REPORT_ASSETS = "report";

/**
 * How many leading parts of a path from a root name the run folder a report file belongs to:
 * report.html's own folder, or the folder that holds the report assets folder. Null for a
 * path that is no report file's.
 */
function reportRunDepth(rel: readonly string[]): number | null {
  if (rel.at(-1) === REPORT_HTML) return rel.length - 1;
  const i = rel.indexOf(REPORT_ASSETS);
  return i >= 0 && i < rel.length - 1 ? i : null;
}

/**
 * The type of the file at `real` (a real path in one of `roots`) that the run pages may send,
 * or null: nothing else in the roots is readable over HTTP. Judged by the real path, so that a
 * link with a servable name serves no other file; a report's HTML only in a run's folder.
 */
async function servableType(real: string, roots: readonly string[]): Promise<string | null> {
  const root = roots.find((r) => within(r, real) !== null);
  if (root === undefined) return null;
  const rel = within(root, real)!.split(SEPARATOR).filter((p) => p);
  const hidden = rel.find((p) => p.startsWith("."));
  if (hidden !== undefined) throw new HttpError(404, `hidden files are not served: ${hidden}`);
  const name = rel.at(-1) ?? "", ext = extname(name).toLowerCase();
  if (TYPES[ext] !== undefined) return TYPES[ext];
  const type = name === REPORT_HTML ? HTML_TYPE : REPORT_TYPES[ext];
  const depth = reportRunDepth(rel);
  if (type === undefined || depth === null) return null;
  return (await runKind(join(root, ...rel.slice(0, depth)))) ? type : null;
}

/**
 * Sends the file as it is when opened: a file a running job appends to is sent at the length
 * it had then, which the content-length says.
 */
async function sendFile(path: string, type: string): Promise<Response> {
  using file = await Deno.open(path, { read: true });
  const { size } = await file.stat();
  const whole = new Uint8Array(size);
  let n = 0;
  while (n < size) {
    const got = await file.read(whole.subarray(n));
    if (got === null) break;
    n += got;
  }
  const body = whole.subarray(0, n);
  const report = type === HTML_TYPE;
  const headers: Record<string, string> = {
    "content-type": type,
    "content-length": String(body.length),
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
    "content-security-policy": report ? REPORT_POLICY : FILE_POLICY,
    // A report's address holds its key (see mountPages): not to be passed on.
    "referrer-policy": "no-referrer",
  };
  return new Response(body as Uint8Array<ArrayBuffer>, { headers });
}

// ---------------------------------------------------------------------------------------------
// Runs

type RunKind = "generate" | "train" | "run" | "sweep";

/** The record that makes a folder a run of each kind, most inclusive first. */
const KIND_RECORDS: [RunKind, string][] = [
  ["sweep", "sweep.json"],
  ["run", "report.json"],
  ["train", "train.json"],
  ["generate", RUN_RECORD],
];
/** Records whose change makes a report out of date. */
const RECORD = new RegExp(
  `^(${
    [...KIND_RECORDS.map(([, f]) => f), MANIFEST, SIMILARITY_FILE, "validation.json", "steps.jsonl"]
      .map((f) => f.replace(".", "\\.")).join("|")
  }|eval(-.+)?\\.json|predictions-.+\\.jsonl)$`,
);

async function runKind(dir: string): Promise<RunKind | null> {
  const has = async (...p: string[]) => (await statOrNull(join(dir, ...p)))?.isFile === true;
  for (const [kind, file] of KIND_RECORDS) {
    if (await has(file)) return kind;
    // An experiment before its own record: its first stages are there.
    if (
      kind === "run" && (await has("synthetic", RUN_RECORD) || await has("train", "train.json") ||
        // `dipsy demo`'s experiment, under its own folder names.
        (await has("images", RUN_RECORD) && await has("classifier", "train.json")))
    ) {
      return kind;
    }
  }
  return null;
}

/**
 * The newest modification time of the run's records, its stages' (one level down, through
 * links: a sweep cell's generated set is one) included.
 */
async function recordsChanged(dir: string, kind: RunKind): Promise<number> {
  let newest = 0;
  const scan = async (d: string, descend: boolean) => {
    try {
      for await (const e of Deno.readDir(d)) {
        if (e.name.startsWith(".") || !(e.isFile || e.isDirectory || e.isSymlink)) continue;
        const record = RECORD.test(e.name);
        if (!record && !(descend && e.name !== REPORT_ASSETS)) continue;
        const info = e.isSymlink ? await statOrNull(join(d, e.name)) : e;
        if (record && info?.isFile) {
          newest = Math.max(newest, (await statOrNull(join(d, e.name)))?.mtime?.getTime() ?? 0);
        } else if (descend && info?.isDirectory) {
          await scan(join(d, e.name), false);
        }
      }
    } catch { /* a folder that went away has no records */ }
  };
  // A dataset's or training run's subfolders are images and checkpoints, not stages.
  await scan(dir, kind === "run" || kind === "sweep");
  return newest;
}

interface ListedRun {
  root: string;
  /** Path from the root, "" for the root itself. */
  rel: string;
  kind: RunKind;
  changed: number;
}

const LIST_DEPTH = 4;
const LIST_FOLDERS = 5000;

/**
 * The runs under the roots, to a few levels down. A dataset's or training run's own subfolders
 * (classes, checkpoints) are not searched; an experiment's and a sweep's stages are.
 */
async function listRuns(roots: readonly string[]): Promise<{ runs: ListedRun[]; cut: boolean }> {
  const runs: ListedRun[] = [];
  let visited = 0, cut = false;
  const walk = async (root: string, dir: string, depth: number): Promise<void> => {
    if (++visited > LIST_FOLDERS) {
      cut = true;
      return;
    }
    const kind = await runKind(dir);
    if (kind) {
      runs.push({ root, rel: relative(root, dir), kind, changed: await recordsChanged(dir, kind) });
      if (kind === "generate" || kind === "train") return;
    }
    if (depth >= LIST_DEPTH) return;
    const subs: string[] = [];
    try {
      for await (const e of Deno.readDir(dir)) {
        if (e.isDirectory && !e.name.startsWith(".") && e.name !== REPORT_ASSETS) subs.push(e.name);
      }
    } catch {
      return;
    }
    for (const s of subs.sort()) await walk(root, join(dir, s), depth + 1);
  };
  for (const root of roots) await walk(root, root, 0);
  return { runs, cut };
}

/** report/ is loaded on the first report page: a server that shows none never loads vega. */
let reportModule: Promise<typeof import("../report/mod.ts")> | undefined;

// ---------------------------------------------------------------------------------------------
// Jobs

/** The images in a job's output folder (`<class>/<file>`), in name order. */
async function jobImages(out: string): Promise<string[]> {
  const files: string[] = [];
  try {
    for await (const c of Deno.readDir(out)) {
      if (!c.isDirectory || c.name.startsWith(".") || c.name === REPORT_ASSETS) continue;
      for await (const f of Deno.readDir(join(out, c.name))) {
        if (f.isFile && IMAGE.test(f.name)) files.push(`${c.name}/${f.name}`);
      }
    }
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  return files.sort();
}

// ---------------------------------------------------------------------------------------------
// Routes

const STATIC: Record<string, string> = {
  "job.js": "text/javascript; charset=utf-8",
  "pages.css": "text/css; charset=utf-8",
};

function when(ms: number): string {
  return ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) + " UTC" : "";
}

/** Adds the pages to `app` (behind the app's token check). */
export function mountPages(app: Hono, o: PagesOptions): void {
  const names = rootNames(o.roots);
  const nameOf = new Map([...names].map(([n, r]) => [r, n]));
  const making = new Map<string, Promise<void>>();

  /** The URL of a folder or file inside a root, or null outside them. */
  const urlOf = (path: string): string | null => {
    for (const [root, name] of nameOf) {
      const rel = within(root, path);
      if (rel !== null) {
        const parts = rel ? rel.split(SEPARATOR).map(encodeURIComponent) : [];
        return `/runs/${[encodeURIComponent(name), ...parts].join("/")}`;
      }
    }
    return null;
  };

  /** The runs under the roots and the server's jobs, newest job first. */
  const indexMain = ({ runs, cut }: { runs: ListedRun[]; cut: boolean }): string => {
    const rootList = o.roots.length
      ? o.roots.map((r) => `<li><code>${esc(r)}</code></li>`).join("")
      : "<li>none: the server was started without <code>--roots</code></li>";
    const runRows = runs.map((r) => {
      const url = `${urlOf(join(r.root, r.rel))}/`;
      const label = join(nameOf.get(r.root)!, r.rel);
      return `<tr data-kind="${r.kind}"><td><a href="${esc(url)}">${esc(label)}</a></td>` +
        `<td>${r.kind}</td><td>${when(r.changed)}</td></tr>`;
    });
    const jobRows = o.jobs.list().reverse().map((j) => {
      const v = j.view();
      const link = `<a href="/jobs/${v.id}">${v.id.slice(0, 8)}</a>`;
      const count = `${v.progress.done} / ${v.progress.total ?? "?"}`;
      return `<tr data-status="${v.status}"><td>${link}</td><td>${v.status}</td>` +
        `<td>${count}</td><td><code>${esc(v.out)}</code></td>` +
        `<td>${when(Date.parse(v.createdAt))}</td></tr>`;
    });
    const table = (id: string, head: string[], rows: string[]) =>
      `<table id="${id}"><thead><tr>${head.map((h) => `<th>${h}</th>`).join("")}</tr></thead>` +
      `<tbody>\n${rows.join("\n")}\n</tbody></table>`;
    return `<main>
<h1>Runs</h1>
<p>Roots:</p><ul>${rootList}</ul>
${
      runRows.length
        ? table("runs", ["run", "kind", "records changed"], runRows)
        : "<p>No runs under the roots yet.</p>"
    }
${cut ? `<p class="note">Only the first ${LIST_FOLDERS} folders were searched.</p>` : ""}
<h2>Jobs</h2>
${
      jobRows.length
        ? table("jobs", ["job", "status", "images", "output", "created"], jobRows)
        : "<p>No jobs since the server started.</p>"
    }
</main>`;
  };

  const guard =
    (handler: (req: Request) => Response | Promise<Response>) =>
    async (c: { req: { raw: Request } }) => {
      try {
        return await handler(c.req.raw);
      } catch (e) {
        // A refusal of a path (as the API refuses a job's) says on the page just what is wrong.
        if (e instanceof HttpError) return errorPage(e.status, e.issues[0]?.message ?? e.message);
        if (e instanceof UserError) return errorPage(422, e.message);
        // Not the visitor's to fix (a full disk, a folder it may not write): said on the page
        // in one line, the details in the server's log.
        console.error(e);
        const message = (e instanceof Error ? e.message : String(e)).split("\n")[0];
        return errorPage(500, `the server could not answer: ${message}`);
      }
    };

  app.get("/favicon.ico", () => new Response(null, { status: 204 }));

  app.get("/static/:file", async (c) => {
    const file = c.req.param("file");
    const type = STATIC[file];
    if (!type) return errorPage(404, `no file ${file}`);
    const body = await Deno.readFile(new URL(`./static/${file}`, import.meta.url));
    return new Response(body, {
      headers: {
        "content-type": type,
        "cache-control": "no-cache",
        "x-content-type-options": "nosniff",
      },
    });
  });

  app.get("/", guard(async () => html(page("runs", indexMain(await listRuns(o.roots))))));

  app.get("/runs", (c) => c.redirect("/", 302));

  /**
   * A report and its files are sent from /reports/<key>/<root>/<run path>/, where the key stands
   * for the page cookie on requests under that run's folder alone: a report is sandboxed (see
   * REPORT_POLICY), so its own requests carry no cookie. The key is made afresh each time the
   * server starts; an old one leads back through /runs/, which asks for the token again.
   */
  const secret = randomBytes(32);
  const keyOf = (parts: readonly string[]) =>
    createHmac("sha256", secret).update(parts.join("/")).digest("hex").slice(0, 32);
  const pathOf = (parts: readonly string[]) => parts.map(encodeURIComponent).join("/");
  const reportUrl = (run: readonly string[], parts: readonly string[]) =>
    `/reports/${keyOf(run)}/${pathOf(parts)}`;

  /**
   * A path from the roots' names: its root and the real path it names (confined), and for a file
   * its type (a 404 for one the pages do not serve).
   */
  const resolvePath = async (parts: string[]) => {
    const root = names.get(parts[0] ?? "");
    if (root === undefined) throw new HttpError(404, `no root named "${parts[0] ?? ""}"`);
    const rel = parts.slice(1).filter((p) => p);
    const real = await confine(join(root, ...rel), o.roots, "path");
    const info = await statOrNull(real);
    if (!info) throw new HttpError(404, `${join(...parts)} does not exist`);
    const slash = parts.length === 1 || parts.at(-1) === "";
    if (info.isDirectory) return { real, info, slash, type: null };
    if (slash || !info.isFile) throw new HttpError(404, `${join(...parts)} is not a folder`);
    const type = await servableType(real, o.roots);
    if (!type) throw new HttpError(404, `${parts.at(-1)} is not a file the pages serve`);
    return { real, info, slash, type };
  };

  app.get(
    "/runs/*",
    guard(async (req) => {
      const url = new URL(req.url);
      const parts = segments(url.pathname.slice("/runs/".length));
      const { real, info, slash, type } = await resolvePath(parts);
      const named = parts.filter((p) => p);
      if (info.isDirectory) {
        // The report's links are relative to its folder.
        if (!slash) return redirect(`${url.pathname}/`, 301);
        if (!await runKind(real)) {
          throw new HttpError(404, `${urlOf(real) ?? real} is not a dipsy run (no run record)`);
        }
        return redirect(`${reportUrl(named, named)}/`, 303);
      }
      if (type === HTML_TYPE) {
        const depth = reportRunDepth(named.slice(1));
        if (depth === null) throw new HttpError(404, `${parts.at(-1)} is not a report's page`);
        return redirect(reportUrl(named.slice(0, depth + 1), named), 303);
      }
      return await sendFile(real, type!);
    }),
  );

  app.get(
    "/reports/:key/*",
    guard(async (req) => {
      const url = new URL(req.url);
      const [, , key, ...rest] = url.pathname.split("/");
      const parts = segments(rest.join("/"));
      const named = parts.filter((p) => p);
      // The run folder the key is for: one of the path's leading folders.
      let run = 0;
      for (let n = 1; n <= named.length && !run; n++) {
        if (sameSecret(key, keyOf(named.slice(0, n)))) run = n;
      }
      if (!run) return redirect(`/runs/${pathOf(parts)}`, 303);
      const { real, info, slash, type } = await resolvePath(parts);
      if (info.isDirectory) {
        if (!slash) return redirect(`${url.pathname}/`, 301);
        return await reportPage(real);
      }
      return await sendFile(real, type!);
    }),
  );

  /**
   * The report of the run in `dir`, remade first when missing or older than its records. A
   * report takes the time of the records it was made from, so that one written while a job
   * changed them is out of date.
   */
  const reportPage = async (dir: string): Promise<Response> => {
    const kind = await runKind(dir);
    if (!kind) throw new HttpError(404, `${urlOf(dir) ?? dir} is not a dipsy run (no run record)`);
    const file = join(dir, REPORT_HTML);
    const made = (await statOrNull(file))?.mtime?.getTime() ?? -1;
    const changed = await recordsChanged(dir, kind);
    if (made < changed) {
      // One report at a time per run: two visitors wait for the same one.
      let p = making.get(dir);
      if (!p) {
        p = (async () => {
          reportModule ??= import("../report/mod.ts");
          await (await reportModule).writeReport(dir, { log: () => {}, sources: o.roots });
          await Deno.utime(file, new Date(), new Date(changed));
        })().finally(() => making.delete(dir));
        making.set(dir, p);
      }
      await p;
    }
    return await sendFile(file, HTML_TYPE);
  };

  const findJob = (id: string) => {
    const job = o.jobs.get(id);
    if (!job) throw new HttpError(404, `no job ${id} (jobs are forgotten when the server stops)`);
    return job;
  };

  app.get("/jobs", (c) => c.redirect("/", 302));

  app.get(
    "/jobs/:id",
    guard((req) => {
      const v: JobView = findJob(new URL(req.url).pathname.split("/")[2]).view();
      const report = urlOf(v.out);
      const link = report ? ` (<a id="report" href="${esc(report)}/">report</a>)` : "";
      const count = `${v.progress.done} / ${v.progress.total ?? "?"}`;
      return html(page(
        `job ${v.id.slice(0, 8)}`,
        `<main id="job" data-job="${v.id}" data-status="${v.status}">
<h1>Job <code>${v.id.slice(0, 8)}</code> <span id="status" class="status">${v.status}</span></h1>
<p>From <code>${esc(v.data)}</code> into <code>${esc(v.out)}</code>${link}</p>
<div class="bar"><progress id="progress" max="1" value="0"></progress>
<span id="count">${count}</span> <span id="step"></span></div>
<p><button id="cancel" type="button">Cancel</button> <span id="connection"></span></p>
<h2>Images</h2>
<div id="images" class="grid"></div>
<h2>Log</h2>
<ol id="log" class="log"></ol>
</main>`,
        { script: "/static/job.js" },
      ));
    }),
  );

  app.get(
    "/jobs/:id/images",
    guard(async (req) => {
      const v = findJob(new URL(req.url).pathname.split("/")[2]).view();
      return Response.json({ files: await jobImages(v.out) }, {
        headers: { "cache-control": "no-store" },
      });
    }),
  );

  app.get(
    "/jobs/:id/files/*",
    guard(async (req) => {
      const [, , id, , ...rest] = new URL(req.url).pathname.split("/");
      const out = findJob(id).view().out;
      const rel = segments(rest.join("/"));
      if (rel.length === 0 || rel[rel.length - 1] === "" || !IMAGE.test(rel[rel.length - 1])) {
        throw new HttpError(404, "only the job's images are served here");
      }
      const real = await confine(join(out, ...rel), o.roots, "path");
      if (within(await confine(out, o.roots, "path"), real) === null) {
        throw new HttpError(403, `${rel.join("/")} is outside the job's output folder`);
      }
      if (!(await statOrNull(real))?.isFile) throw new HttpError(404, `no image ${rel.join("/")}`);
      const type = await servableType(real, o.roots);
      if (!type || !IMAGE.test(real)) throw new HttpError(404, `no image ${rel.join("/")}`);
      return await sendFile(real, type);
    }),
  );
}
