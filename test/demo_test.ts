/**
 * `dipsy demo`, the README's first command, as a newcomer runs it: a fresh folder, then the same
 * folder again. Both runs must succeed, and the second must reuse what the first wrote.
 */
import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import {
  assertImagesLoad,
  browserTest,
  launchBrowser,
  screenshot,
  watchPage,
} from "./browser_util.ts";
import { withTempDir } from "./util.ts";

const MAIN = new URL("../cli/main.ts", import.meta.url).pathname;

async function demo(out: string): Promise<{ code: number; stdout: string; stderr: string }> {
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, "demo", "--out", out],
    env: { NO_COLOR: "1" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder();
  return { code, stdout: text.decode(stdout), stderr: text.decode(stderr) };
}

Deno.test("demo: runs end to end, writes its report, and runs again in the same folder", async () => {
  await withTempDir(async (dir) => {
    const out = join(dir, "demo");
    const first = await demo(out);
    assert.equal(first.code, 0, first.stderr);
    assert.doesNotMatch(first.stderr, /report: /, "the demo's report lists no problems");

    const html = join(out, "report.html");
    assert.match(first.stdout, new RegExp(`report: +${html.replaceAll("/", "\\/")} `));
    const page = readFileSync(html, "utf8");
    const sources = [...page.matchAll(/<img[^>]* src="([^"]+)"/g)].map((m) => m[1]);
    assert.ok(sources.length >= 8, `report shows the generated images (${sources.length} found)`);
    for (const src of sources) {
      assert.ok(existsSync(join(out, decodeURIComponent(src))), `report image ${src} exists`);
    }
    const images = (c: string) =>
      readdirSync(join(out, "images", c)).filter((f) => f.endsWith(".jpg"));
    assert.deepEqual(images("red circle").length, 2);

    const second = await demo(out);
    assert.equal(second.code, 0, second.stderr);
    assert.match(second.stdout, /already drawn/);
    assert.match(second.stdout, /report: /);
  });
});

browserTest("demo: its report opens from disk in chromium, every image loads", async () => {
  await withTempDir(async (dir) => {
    const out = join(dir, "demo");
    const run = await demo(out);
    assert.equal(run.code, 0, run.stderr);
    const browser = await launchBrowser();
    try {
      const page = await browser.newPage();
      const { problems } = watchPage(page);
      await page.goto(pathToFileURL(join(out, "report.html")).href);
      assert.ok(await assertImagesLoad(page, "demo report") >= 8, "the report shows the images");
      // The similarity heatmap: one cell mark per pair of the demo's 4 classes.
      const heatmap = page.locator('img[data-figure="similarity"]');
      assert.equal(await heatmap.getAttribute("data-classes"), "4");
      const svg = await browser.newPage();
      await svg.goto(new URL((await heatmap.getAttribute("src"))!, page.url()).href);
      assert.equal(await svg.locator("g.cell_marks > path").count(), 16, "heatmap cells");
      await screenshot(page, "demo-report");
      assert.deepEqual(problems, []);
    } finally {
      await browser.close();
    }
  });
});
