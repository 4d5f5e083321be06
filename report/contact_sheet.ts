/**
 * Contact sheets of a generated set: every image beside the two references that conditioned it
 * (the positive shot and the negative shot, as the manifest records them) and the negative class,
 * paged at 200 images per class. Thumbnails are made once into report/thumbs/ (redone when the
 * source is newer), so the sheets are light and the folder stands alone when copied.
 */
import { existsSync, mkdirSync, statSync } from "node:fs";
import { basename, dirname, isAbsolute, join, relative, sep as SEP } from "node:path";
import sharp from "sharp";
import { decodeImage } from "../core/image.ts";
import { mapLimit } from "../core/dataset.ts";
import { type ManifestEntry, type ShotRecord, writeAtomic } from "../core/output.ts";
import type { GenerateData, Problems } from "./read_run.ts";
import { esc, href, markup, page } from "./html.ts";

/** Images per sheet page and class. */
export const SHEET_PAGE = 200;
/** Tiles of each class shown on the report page itself. */
export const STRIP = 6;
const MAIN_SIZE = 128;
const REF_SIZE = 64;
/** Thumbnails in flight at once (sharp runs each on its own thread pool). */
const PARALLEL = 4;

/** Makes thumbnails; a source that is missing or does not decode is a problem, never a throw. */
export class Thumbnails {
  readonly #made = new Map<string, Promise<string | null>>();
  /**
   * `sources`: the only folders (real paths) whose images may be shown, as a server's roots;
   * any folder when absent.
   */
  constructor(readonly problems: Problems, readonly sources?: readonly string[]) {}

  /** The thumbnail of `src` at `dest` (absolute), or null when `src` is unusable. */
  make(src: string, dest: string, size: number): Promise<string | null> {
    let p = this.#made.get(dest);
    if (!p) this.#made.set(dest, p = this.#make(src, dest, size));
    return p;
  }

  /** Every thumbnail made or reused so far. */
  async all(): Promise<string[]> {
    return (await Promise.all(this.#made.values())).filter((p): p is string => p !== null);
  }

  async #make(src: string, dest: string, size: number): Promise<string | null> {
    const name = this.problems.rel(src);
    if (this.sources && !(await insideAny(src, this.sources))) {
      this.problems.add(src, "outside the served roots: not shown");
      return null;
    }
    let bytes: Uint8Array;
    try {
      bytes = await Deno.readFile(src);
    } catch (e) {
      this.problems.add(
        src,
        e instanceof Deno.errors.NotFound ? "missing" : `unreadable (${(e as Error).message})`,
      );
      return null;
    }
    // Strictly newer: a source rewritten within the same clock tick as its thumbnail is redone.
    if (existsSync(dest) && statSync(dest).mtimeMs > statSync(src).mtimeMs) return dest;
    try {
      // The project's decoder: it refuses truncated data as training would.
      const img = await decodeImage(bytes, name);
      mkdirSync(dirname(dest), { recursive: true });
      const thumb = await sharp(img.data, {
        raw: { width: img.width, height: img.height, channels: 3 },
      }).resize(size, size, { fit: "inside" }).jpeg({ quality: 82 }).toBuffer();
      await writeAtomic(dest, thumb);
      return dest;
    } catch (e) {
      this.problems.lines.push((e as Error).message.replace(/^cannot decode image /, ""));
      return null;
    }
  }
}

/** Whether the file `src` really is (links followed) inside one of the folders `dirs`. */
async function insideAny(src: string, dirs: readonly string[]): Promise<boolean> {
  let real: string;
  try {
    real = await Deno.realPath(src);
  } catch {
    // A file that is not there is not shown either way: reading it says why.
    return true;
  }
  return dirs.some((d) => {
    const rel = relative(d, real);
    return rel !== ".." && !rel.startsWith(`..${SEP}`) && !isAbsolute(rel);
  });
}

export interface SheetContext {
  /** The folder report.html is written to. */
  outDir: string;
  /** The class root the manifest's reference files are relative to, when known. */
  shotsRoot: string | null;
  thumbs: Thumbnails;
  problems: Problems;
  log: (line: string) => void;
}

interface Tile {
  entry: ManifestEntry;
  image: string | null;
  positive: string | null;
  negative: string | null;
}

function shotLabel(role: string, s: ShotRecord): string {
  const a = s.augment;
  const how = a
    ? `; ${a.flip ? "flipped, " : ""}${a.crop ? `crop ${a.crop.join(",")}, ` : ""}` +
      `rotated ${a.angle.toFixed(1)} deg`
    : "";
  return `${role}: ${s.class} / ${s.file}${how}`;
}

function tileHtml(t: Tile, fromDir: string, imagesDir: string): string {
  const link = (abs: string) => href(relative(fromDir, abs));
  const e = t.entry;
  const gone = (cls: string, text: string) => `<span class="${cls} gone">${esc(text)}</span>`;
  const main = t.image
    ? `<a href="${link(join(imagesDir, e.file))}"><img class="main" src="${link(t.image)}" ` +
      `alt="${esc(e.file)}" title="${esc(`${e.file}, seed ${e.seed}`)}"></a>`
    : gone("main", `${e.file} missing or corrupt`);
  const ref = (role: string, s: ShotRecord | null, thumb: string | null) => {
    if (!s) return `<span class="gone" title="no ${role} reference">none</span>`;
    return thumb
      ? `<img src="${link(thumb)}" alt="${esc(role)}" title="${esc(shotLabel(role, s))}">`
      : `<span class="gone" title="${esc(shotLabel(role, s))}">${esc(role)} not found</span>`;
  };
  return `<div class="tile" data-file="${esc(e.file)}">${main}<div class="refs">` +
    ref("positive", e.positive, t.positive) + ref("negative", e.negative, t.negative) +
    markup`</div><div>#${e.index} &middot; negative: ${e.negative?.class ?? "none"}</div></div>`
      .text;
}

async function tilesOf(
  entries: readonly ManifestEntry[],
  data: GenerateData,
  ctx: SheetContext,
): Promise<Tile[]> {
  const thumbs = join(ctx.outDir, "report", "thumbs");
  const classIndex = new Map(data.classes.map((c, i) => [c, i]));
  const refThumb = (s: ShotRecord | null) => {
    if (!s || !ctx.shotsRoot) return Promise.resolve(null);
    const k = classIndex.get(s.class) ?? "x";
    const dest = join(thumbs, "shots", `c${k}`, `${s.shot}-${basename(s.file)}.jpg`);
    return ctx.thumbs.make(join(ctx.shotsRoot, s.file), dest, REF_SIZE);
  };
  return await mapLimit(entries, PARALLEL, async (entry) => {
    const k = classIndex.get(entry.class);
    const dest = join(thumbs, "images", `c${k}`, basename(entry.file));
    const image = await ctx.thumbs.make(join(data.dir, entry.file), dest, MAIN_SIZE);
    return {
      entry,
      image,
      positive: await refThumb(entry.positive),
      negative: await refThumb(entry.negative),
    };
  });
}

/**
 * The sheet pages of every class and, per class, the HTML of its strip for the report page and
 * the links to its pages.
 */
export async function contactSheets(
  data: GenerateData,
  ctx: SheetContext,
): Promise<{ strips: string[]; pages: string[] }> {
  const sheetsDir = join(ctx.outDir, "report", "sheets");
  mkdirSync(sheetsDir, { recursive: true });
  const strips: string[] = [];
  const pages: string[] = [];
  for (const [k, name] of data.classes.entries()) {
    const entries = data.entries[k];
    const count = Math.ceil(entries.length / SHEET_PAGE);
    const links: string[] = [];
    let strip = "";
    for (let p = 0; p < count; p++) {
      const part = entries.slice(p * SHEET_PAGE, (p + 1) * SHEET_PAGE);
      const tiles = await tilesOf(part, data, ctx);
      const file = join(sheetsDir, `c${k}-${p + 1}.html`);
      const nav = Array.from(
        { length: count },
        (_, q) =>
          q === p ? `<b>${q + 1}</b>` : `<a href="${href(`c${k}-${q + 1}.html`)}">${q + 1}</a>`,
      ).join(" ");
      const back = href(relative(sheetsDir, join(ctx.outDir, "report.html")));
      const body = `<nav><a href="${back}">report</a> pages: ${nav}</nav>` +
        markup`<h1>${name}: images ${part[0].index} to ${part.at(-1)!.index}</h1>`.text +
        `<p>Each image with its positive reference (left) and negative reference (right); ` +
        `hover a reference for its file and augmentation.</p>` +
        `<div class="sheet">${tiles.map((t) => tileHtml(t, sheetsDir, data.dir)).join("\n")}` +
        `</div>`;
      const html = page(`${name}: contact sheet ${p + 1}`, body);
      await writeAtomic(file, html);
      pages.push(file);
      links.push(
        markup`<a href="${href(relative(ctx.outDir, file))}">${part[0].index}-${
          part.at(-1)!.index
        }</a>`.text,
      );
      if (p === 0) {
        strip = tiles.slice(0, STRIP).map((t) => tileHtml(t, ctx.outDir, data.dir)).join("\n");
      }
    }
    ctx.log(`contact sheet ${name}: ${entries.length} images, ${count} page(s)`);
    strips.push(
      entries.length
        ? `<div class="sheet">${strip}</div><p>contact sheets: ${links.join(" ")}</p>`
        : "<p>no images listed for this class</p>",
    );
  }
  return { strips, pages };
}
