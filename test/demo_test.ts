/**
 * `dipsy demo`, the README's first command, as a newcomer runs it: a fresh folder, then the same
 * folder again. Both runs must succeed, and the second must reuse what the first wrote.
 */
import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
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
