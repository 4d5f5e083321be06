/**
 * Figures: a Vega-Lite spec compiled to Vega, drawn by Vega's headless SVG renderer (no browser,
 * no canvas: text is measured by Vega's estimate, so labels are laid out for the font the config
 * names), then rasterised with sharp (librsvg). Each figure is kept as both SVG and PNG.
 */
import { join } from "node:path";
import sharp from "sharp";
import * as vega from "vega";
import { compile, type TopLevelSpec } from "vega-lite";
import { writeAtomic } from "../core/output.ts";

/** A font family fontconfig finds on Debian (fonts-dejavu), so the PNG matches the layout. */
export const FONT = "DejaVu Sans";

/** The PNG's pixels per SVG unit: crisp on high-density screens, small enough to keep. */
const PNG_SCALE = 2;

export interface RenderedFigure {
  /** File names (no folder) of the two renderings. */
  svg: string;
  png: string;
  width: number;
  height: number;
}

/** The SVG text of a Vega-Lite spec; the spec's data must be inline (nothing is fetched). */
export async function toSvg(spec: TopLevelSpec): Promise<string> {
  const compiled = compile({
    ...spec,
    config: { font: FONT, background: "white", ...spec.config },
  } as TopLevelSpec).spec;
  // A loader that refuses everything: a figure never reads a file or the network.
  const loader = vega.loader();
  loader.load = (uri: string) => Promise.reject(new Error(`figures load nothing (${uri})`));
  // Warnings (an empty series, say) are no reason to write to a command's output.
  const view = new vega.View(vega.parse(compiled), {
    renderer: "none",
    loader,
    logLevel: vega.Error,
  });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}

/** Writes `dir/name.svg` and `dir/name.png`. */
export async function renderFigure(
  spec: TopLevelSpec,
  dir: string,
  name: string,
): Promise<RenderedFigure> {
  const svg = new TextEncoder().encode(await toSvg(spec));
  const { data, info } = await sharp(svg, { density: 72 * PNG_SCALE }).png()
    .toBuffer({ resolveWithObject: true });
  // Written whole or not at all: a server may be showing the previous report meanwhile.
  await writeAtomic(join(dir, `${name}.svg`), svg);
  await writeAtomic(join(dir, `${name}.png`), data);
  return {
    svg: `${name}.svg`,
    png: `${name}.png`,
    width: Math.round(info.width / PNG_SCALE),
    height: Math.round(info.height / PNG_SCALE),
  };
}
