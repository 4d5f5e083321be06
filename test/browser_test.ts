/**
 * The server's pages in a real browser (headless chromium through playwright-core) against a
 * server on a loopback port with the tiny models and a token: the live job page while a job is
 * held between batches (images written so far, new ones as they come, progress, cancel), a run's
 * report page (made on first visit, every image loads, one heatmap cell per class pair), and the
 * token rules (refused without it; `?token=` once, then the cookie). The path checks of the run
 * pages, and a server without a token, are spoken to over plain HTTP and need no browser.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { drawDataset } from "../cli/demo.ts";
import { main } from "../cli/main.ts";
import { parseServeArgs, startFromSettings } from "../cli/serve.ts";
import type { RunningServer } from "../server/app.ts";
import { setNumThreads } from "../ffi/mod.ts";
import { tinyRunArgs, withOutput, writeTinyDataset } from "./util.ts";
import { BatchGate, Client, MODEL_FLAGS, serverTest } from "./server_util.ts";
import {
  assertImagesLoad,
  browserTest,
  launchBrowser,
  screenshot,
  watchPage,
} from "./browser_util.ts";

setNumThreads(1);

const ROOT = await Deno.realPath(await Deno.makeTempDir({ prefix: "dipsy_pages_" }));
const SECRETS = await Deno.makeTempDir({ prefix: "dipsy_pages_token_" });
const TOKEN = "fedcba9876543210fedcba9876543210";
const ROOT_NAME = ROOT.split("/").at(-1)!;
await Deno.writeTextFile(join(SECRETS, "token"), `${TOKEN}\n`);
await writeTinyDataset(join(ROOT, "data"));
await Deno.symlink("/", join(ROOT, "escape"));
await Deno.writeTextFile(join(ROOT, "notes.txt"), "not for the pages");

const gate = new BatchGate();
const server: RunningServer = await startFromSettings(
  parseServeArgs([
    ...MODEL_FLAGS,
    "--port",
    "0",
    "--token-file",
    join(SECRETS, "token"),
    "--roots",
    ROOT,
  ])!,
  () => {},
  { beforeBatch: gate.hook },
);
const client = new Client(server.url, server.port, TOKEN);

/** 2 classes x 4 images in batches of 2: four batches. */
const JOB = { data: "data", perClass: 4, steps: 2, width: 32, height: 32, batch: 2, seed: 11 };

/** A tiny `dipsy run` experiment (4 shape classes) under the root, made once, by the CLI. */
let experiment: Promise<string> | undefined;
function tinyExperiment(): Promise<string> {
  return experiment ??= (async () => {
    const dir = join(ROOT, "experiment");
    await drawDataset(join(dir, "shots"), 2, 0);
    await drawDataset(join(dir, "test"), 1, 1);
    const out = join(dir, "exp");
    const run = await withOutput(() =>
      main(tinyRunArgs(join(dir, "shots"), join(dir, "test"), out))
    );
    assert.equal(run.result, 0, run.lines.join("\n"));
    return out;
  })();
}

const runUrl = (...parts: string[]) =>
  `/runs/${[ROOT_NAME, ...parts].map(encodeURIComponent).join("/")}`;
/** Where a run's report is shown: under its key, in the run's own folder. */
const reportPath = (...parts: string[]) =>
  new RegExp(`^/reports/[0-9a-f]{32}/${[ROOT_NAME, ...parts].map(encodeURIComponent).join("/")}/$`);

// ---------------------------------------------------------------------------------------------

browserTest("pages: the job page fills in live, shows new images and cancels the job", async () => {
  const first = gate.hold("job-live", 1);
  const res = await client.postJob({ ...JOB, out: "job-live" });
  assert.equal(res.status, 202, JSON.stringify(res.json));
  const id = res.json.id;
  const job = await first.reached;
  assert.equal(job.progress.done, 2, "held after the first batch");

  const browser = await launchBrowser();
  try {
    const page = await browser.newContext().then((c) => c.newPage());
    const { problems } = watchPage(page);
    const opened = await page.goto(`${server.url}/jobs/${id}?token=${TOKEN}`);
    assert.equal(opened?.status(), 200);
    assert.equal(new URL(page.url()).search, "", "the token leaves the address");

    // What was written before the page opened.
    await page.waitForSelector('#job[data-listed="true"]');
    await page.waitForSelector('#images[data-count="2"]');
    assert.equal(await page.textContent("#count"), "2 / 8");
    assert.equal(await page.getAttribute("#job", "data-status"), "running");
    assert.equal(await page.evaluate(() => document.querySelector("progress")!.value), 2);
    assert.equal(await assertImagesLoad(page, "job page, held at batch 1"), 2);
    await screenshot(page, "job-held");

    // Released, the job writes its second batch and is held again: the page shows it live.
    const second = gate.hold("job-live", 2);
    first.release();
    await second.reached;
    await page.waitForSelector('#images[data-count="4"]');
    await page.waitForSelector('#job[data-done="4"]');
    assert.equal(await page.textContent("#count"), "4 / 8");
    assert.equal(await assertImagesLoad(page, "job page, held at batch 2"), 4);
    const files = await page.$$eval("#images figure", (f) => f.map((e) => e.dataset.file));
    assert.deepEqual(files, [...files].sort(), "images in file order");

    // Cancel: the batch in flight is finished, then the job stops.
    await page.click("#cancel");
    await page.waitForSelector('#job[data-final="true"]');
    assert.equal(await page.getAttribute("#job", "data-status"), "cancelled");
    const view = (await client.call("GET", `/v1/jobs/${id}`)).json;
    assert.equal(view.status, "cancelled");
    assert.equal(view.result.written, 6);
    assert.ok(await page.isDisabled("#cancel"), "no cancel for a finished job");
    await page.waitForSelector('#images[data-count="6"]');
    assert.equal(await assertImagesLoad(page, "job page, cancelled"), 6);
    assert.ok(
      (await page.$$eval("#log li", (l) => l.map((e) => e.textContent))).includes("cancelled"),
      "the log shows the cancel",
    );
    await screenshot(page, "job-cancelled");
    assert.deepEqual(problems, []);
  } finally {
    first.release();
    await browser.close();
  }
});

browserTest(
  "pages: a run's report is listed, made on first visit, and every image and heatmap cell is there",
  async () => {
    const out = await tinyExperiment();
    await Deno.remove(join(out, "report.html")).catch(() => {});
    const browser = await launchBrowser();
    try {
      const page = await browser.newContext().then((c) => c.newPage());
      const { problems } = watchPage(page);
      await page.goto(`${server.url}/?token=${TOKEN}`);
      const link = page.locator('#runs tr[data-kind="run"] a', { hasText: "experiment/exp" });
      assert.equal(await link.count(), 1, "the experiment is listed as a run");
      await screenshot(page, "runs");
      // Sent on from /runs/ to the report's own address once it is made.
      // The report is made before the answer comes: no deadline but the safety net's.
      await Promise.all([
        page.waitForURL((u) => reportPath("experiment", "exp").test(u.pathname), {
          timeout: 300_000,
        }),
        link.click(),
      ]);
      assert.match(new URL(page.url()).pathname, reportPath("experiment", "exp"));
      assert.ok((await Deno.stat(join(out, "report.html"))).isFile, "report.html was made");

      const images = await assertImagesLoad(page, "report page");
      assert.ok(images > 0, "the report shows images");
      // The similarity heatmap: one cell mark per class pair (4 shape classes).
      const heatmap = page.locator('img[data-figure="similarity"]');
      assert.equal(await heatmap.count(), 1, "the report shows the similarity heatmap");
      assert.equal(await heatmap.getAttribute("data-classes"), "4");
      const svg = await page.context().newPage();
      const svgProblems = watchPage(svg).problems;
      await svg.goto(new URL((await heatmap.getAttribute("src"))!, page.url()).href);
      assert.equal(await svg.locator("g.cell_marks > path").count(), 16, "cells");
      await svg.close();
      assert.deepEqual(svgProblems, []);
      await screenshot(page, "report");
      assert.deepEqual(problems, []);
    } finally {
      await browser.close();
    }
  },
);

browserTest("pages: with a token, a page is refused without it and works once given", async () => {
  const out = await tinyExperiment();
  const browser = await launchBrowser();
  try {
    const page = await browser.newContext().then((c) => c.newPage());
    const url = `${server.url}${runUrl("experiment", "exp")}/`;
    assert.equal((await page.goto(url))?.status(), 401);
    // The refusal is a page that says how to open it.
    assert.match(await page.locator("main").innerText(), /open \S+\?token=TOKEN/);
    await screenshot(page, "token-needed");
    assert.equal((await page.goto(`${url}?token=${"0".repeat(32)}`))?.status(), 401);
    assert.match(await page.locator("main").innerText(), /not this server's/);
    const { problems } = watchPage(page);
    const res = await page.goto(`${url}?token=${TOKEN}`);
    assert.equal(res?.status(), 200);
    assert.equal(new URL(page.url()).search, "", "the token leaves the address");
    assert.match(new URL(page.url()).pathname, reportPath("experiment", "exp"));
    // The cookie stands for the token on the following loads, images included. The report is
    // made again only once a record is newer than it.
    const report = join(out, "report.html");
    const made = (await Deno.stat(report)).mtime!.getTime();
    assert.equal((await page.reload())?.status(), 200);
    assert.equal((await Deno.stat(report)).mtime!.getTime(), made, "an up-to-date report is kept");
    await assertImagesLoad(page, "report page with the token cookie");
    // A report from before the run's last record (as after an `eval`) is out of date.
    const before = new Date((await Deno.stat(join(out, "eval.json"))).mtime!.getTime() - 60_000);
    await Deno.utime(report, before, before);
    assert.equal((await page.reload())?.status(), 200);
    assert.ok((await Deno.stat(report)).mtime!.getTime() >= made, "an out-of-date one is remade");
    await assertImagesLoad(page, "report page made again");
    assert.deepEqual(problems, []);
    // The cookie is the page's alone: scripts cannot read it, other sites do not send it.
    const cookies = await page.context().cookies();
    assert.equal(cookies.length, 1);
    assert.equal(cookies[0].httpOnly, true);
    assert.equal(cookies[0].sameSite, "Strict");
    assert.equal(cookies[0].value.includes(TOKEN), false, "the cookie does not hold the token");
    // (A report is sandboxed: there no script may ask at all; the list of runs is not.)
    await assert.rejects(page.evaluate(() => document.cookie), /sandboxed/);
    await page.goto(`${server.url}/`);
    assert.equal(await page.evaluate(() => document.cookie), "");
  } finally {
    await browser.close();
  }
});

serverTest("pages: run files are served from inside the roots only", async () => {
  const get = (path: string, headers: Record<string, string> = {}) =>
    client.call("GET", path, { headers });
  const shot = join("data", "red circle", "0.png");
  const ok = await get(runUrl(...shot.split("/")));
  assert.equal(ok.status, 200);
  assert.equal(ok.headers.get("content-type"), "image/png");
  assert.deepEqual(ok.bytes, await Deno.readFile(join(ROOT, shot)));

  const refused: [string, number][] = [
    [`/runs/${ROOT_NAME}/escape/etc/passwd`, 403], // a link out of the root
    [`/runs/${ROOT_NAME}/%2e%2e/%2e%2e/etc/passwd`, 404], // the URL parser resolves these: /etc
    [`/runs/${ROOT_NAME}/..%2f..%2fetc%2fpasswd`, 403],
    [`/runs/${ROOT_NAME}/data%00/x.png`, 403],
    [`/runs/${ROOT_NAME}/notes.txt`, 404], // not a file the pages serve
    [`/runs/${ROOT_NAME}/.hidden.png`, 404],
    [`/runs/nope/x.png`, 404],
    [`/runs/${ROOT_NAME}/data/`, 404], // a folder that is not a run
    [`/jobs/${crypto.randomUUID()}`, 404],
  ];
  for (const [path, status] of refused) {
    const r = await get(path);
    assert.equal(r.status, status, path);
    assert.match(r.headers.get("content-type") ?? "", /^text\/html|^application\/json/, path);
  }
  // A folder without its slash is sent to it, so that the report's relative links work.
  const bare = await fetch(`${server.url}${runUrl("data")}`, {
    headers: client.auth,
    redirect: "manual",
  });
  await bare.body?.cancel();
  assert.equal(bare.status, 301);
  assert.equal(new URL(bare.headers.get("location")!, server.url).pathname, `${runUrl("data")}/`);

  // Without the token (or its cookie) nothing is served; the cookie does not unlock unsafe
  // methods from another origin.
  assert.equal((await client.call("GET", runUrl(...shot.split("/")), { auth: false })).status, 401);
  // A browser asking for a page is told how to open it; the API keeps its JSON refusal.
  const browserAccept = { accept: "text/html,application/xhtml+xml,*/*;q=0.8" };
  const pageRefused = await client.call("GET", runUrl("data") + "/", {
    auth: false,
    headers: browserAccept,
  });
  assert.equal(pageRefused.status, 401);
  assert.match(pageRefused.headers.get("content-type")!, /^text\/html/);
  assert.equal(pageRefused.headers.get("www-authenticate"), 'Bearer realm="dipsy"');
  assert.ok(
    new TextDecoder().decode(pageRefused.bytes).includes(`${runUrl("data")}/?token=TOKEN`),
    "the refusal page shows the address to open",
  );
  for (
    const [path, headers] of [["/v1/jobs", browserAccept], [runUrl("data") + "/", {}]] as const
  ) {
    const api = await client.call("GET", path, { auth: false, headers });
    assert.equal(api.status, 401, path);
    assert.match(api.json?.error?.message ?? "", /bearer token/, path);
  }
  const exchange = await fetch(`${server.url}/?token=${TOKEN}`, { redirect: "manual" });
  await exchange.body?.cancel();
  assert.equal(exchange.status, 303);
  const cookie = exchange.headers.get("set-cookie")!.split(";")[0];
  assert.equal(
    (await client.call("GET", runUrl(...shot.split("/")), { auth: false, headers: { cookie } }))
      .status,
    200,
  );
  const foreign = await client.call("POST", "/v1/jobs", {
    auth: false,
    headers: { cookie, origin: "http://evil.example", "content-type": "application/json" },
    body: JSON.stringify({ ...JOB, out: "never" }),
  });
  assert.equal(foreign.status, 401);
});

serverTest("pages: a server without a token serves its pages to anyone on loopback", async () => {
  const open = await startFromSettings(
    parseServeArgs([...MODEL_FLAGS, "--port", "0", "--roots", ROOT])!,
    () => {},
  );
  try {
    const anyone = new Client(open.url, open.port, null);
    const index = await anyone.call("GET", "/");
    assert.equal(index.status, 200);
    assert.match(new TextDecoder().decode(index.bytes), /<h1>Runs<\/h1>/);
    const shot = await anyone.call("GET", runUrl("data", "red circle", "0.png"));
    assert.equal(shot.status, 200);
    assert.equal((await anyone.call("GET", "/static/job.js")).status, 200);
    // ?token= means nothing here: no cookie, no redirect.
    const given = await fetch(`${open.url}/?token=${TOKEN}`, { redirect: "manual" });
    await given.body?.cancel();
    assert.equal(given.status, 200);
    assert.equal(given.headers.get("set-cookie"), null);
  } finally {
    await open.shutdown();
  }
});

serverTest("pages: stop the server", async () => {
  await server.shutdown();
  await Deno.remove(ROOT, { recursive: true });
  await Deno.remove(SECRETS, { recursive: true });
});
