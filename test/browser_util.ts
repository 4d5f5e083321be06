/**
 * Helpers for tests in a real browser: Debian's chromium (or DIPSY_CHROMIUM) driven headless by
 * playwright-core. Without the browser the tests are ignored, with the reason in their names.
 * Every page is watched for console errors, uncaught exceptions and failed loads, and can be
 * kept as a screenshot in .cache/test-output/screenshots/.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { Browser, Page } from "playwright-core";

export const CHROMIUM = Deno.env.get("DIPSY_CHROMIUM") ?? "/usr/bin/chromium";

export const SCREENSHOTS = fileURLToPath(
  new URL("../.cache/test-output/screenshots/", import.meta.url),
);

/** Why browser tests cannot run here, or null when they can. */
function missingBrowser(): string | null {
  try {
    if (!Deno.statSync(CHROMIUM).isFile) return `${CHROMIUM} is not a file`;
  } catch {
    return `no chromium at ${CHROMIUM} (apt-get install chromium, or set DIPSY_CHROMIUM)`;
  }
  return null;
}

export const BROWSER_MISSING = missingBrowser();
if (BROWSER_MISSING) console.error(`browser tests are ignored: ${BROWSER_MISSING}`);

/**
 * A test that needs the browser: ignored, saying why in its name, when there is none. Like the
 * server tests, it shares one server across tests and closes what it opens itself.
 */
export function browserTest(name: string, fn: () => Promise<void>) {
  Deno.test({
    name: BROWSER_MISSING ? `${name} (ignored: ${BROWSER_MISSING})` : name,
    ignore: BROWSER_MISSING !== null,
    fn,
    sanitizeOps: false,
    sanitizeResources: false,
  });
}

/** Headless chromium that reaches nothing but the pages a test opens. */
export async function launchBrowser(): Promise<Browser> {
  const { chromium } = await import("playwright-core");
  return await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-default-apps",
      "--disable-sync",
      "--no-first-run",
      "--metrics-recording-only",
    ],
  });
}

/** What went wrong on a page: console errors, uncaught exceptions, failed requests. */
export function watchPage(page: Page): { problems: string[] } {
  const problems: string[] = [];
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console: ${m.text()} (${m.location().url})`);
  });
  page.on("pageerror", (e) => problems.push(`exception: ${e.message}`));
  page.on("requestfailed", (r) => {
    // Leaving a page aborts its open event stream: not a failure of the page.
    if (r.failure()?.errorText === "net::ERR_ABORTED" && r.resourceType() === "eventsource") return;
    problems.push(`request failed: ${r.url()} ${r.failure()?.errorText}`);
  });
  return { problems };
}

/**
 * Waits until every image on the page has finished loading (or failed), then asserts that each
 * one decoded to a picture: naturalWidth > 0. Returns how many there are.
 */
export async function assertImagesLoad(page: Page, what: string): Promise<number> {
  await page.waitForFunction(() => [...document.images].every((i) => i.complete));
  const images = await page.evaluate(() =>
    [...document.images].map((i) => ({ src: i.currentSrc || i.src, width: i.naturalWidth }))
  );
  const broken = images.filter((i) => !(i.width > 0)).map((i) => i.src);
  assert.deepEqual(broken, [], `${what}: images that did not load`);
  return images.length;
}

/** Keeps a full-page screenshot as test output and prints where. */
export async function screenshot(page: Page, name: string): Promise<string> {
  await Deno.mkdir(SCREENSHOTS, { recursive: true });
  const path = join(SCREENSHOTS, `${name}.png`);
  await page.screenshot({ path, fullPage: true });
  console.log(`screenshot: ${path}`);
  return path;
}
