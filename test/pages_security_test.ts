/**
 * What the run pages must never serve or do, against a server without a token on a loopback
 * port (the tiny models): HTML from anywhere but a run's report, sent sandboxed with only the
 * report's own script; files through links with servable names; requests whose Host is not a
 * loopback name (DNS rebinding); reports left out of date by a record changed while they were
 * made; and errors that are not the visitor's, as a page. The report's script is checked to run
 * in its sandbox in a real browser.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { join } from "node:path";
import { parseServeArgs, startFromSettings } from "../cli/serve.ts";
import type { RunningServer } from "../server/app.ts";
import { SORT_SCRIPT } from "../report/html.ts";
import { setNumThreads } from "../ffi/mod.ts";
import { writeTinyDataset } from "./util.ts";
import { Client, MODEL_FLAGS, serverTest } from "./server_util.ts";
import {
  assertImagesLoad,
  browserTest,
  launchBrowser,
  screenshot,
  watchPage,
} from "./browser_util.ts";

setNumThreads(1);

const ROOT = await Deno.realPath(await Deno.makeTempDir({ prefix: "dipsy_pages_sec_" }));
const ROOT_NAME = ROOT.split("/").at(-1)!;
await writeTinyDataset(join(ROOT, "data"));

const server: RunningServer = await startFromSettings(
  parseServeArgs([...MODEL_FLAGS, "--port", "0", "--roots", ROOT])!,
  () => {},
);
const client = new Client(server.url, server.port, null);

const runUrl = (...parts: string[]) =>
  `/runs/${[ROOT_NAME, ...parts].map(encodeURIComponent).join("/")}`;
const text = (bytes: Uint8Array) => new TextDecoder().decode(bytes);

/** A sweep table under the root: a run folder whose report is quick to make. */
function writeSweep(dir: string, rank: unknown = 1): void {
  Deno.mkdirSync(dir, { recursive: true });
  const rows = [[1, 0.9], [2, 0.8], [3, 0.7]].map(([r, val]) => ({
    rank: r === 1 ? rank : r,
    cell: `cell-${r}`,
    settings: { lr: val / 1000 },
    val_top1: val,
    test_top1: val,
    test_top5: 1,
    mean_per_class: val,
  }));
  Deno.writeTextFileSync(
    join(dir, "sweep.json"),
    JSON.stringify({ metric: "val_top1", swept: ["lr"], rows, missing: [], failed: [] }),
  );
}

/** GET without following redirects. */
async function getManual(path: string, headers: Record<string, string> = {}) {
  const res = await fetch(server.url + path, { redirect: "manual", headers });
  const body = text(new Uint8Array(await res.arrayBuffer()));
  return { status: res.status, headers: res.headers, body };
}

/** The report of a run folder: /runs/ sends it to its address under a key, where it is made. */
async function openReport(...parts: string[]) {
  const first = await getManual(`${runUrl(...parts)}/`);
  assert.equal(first.status, 303, first.body);
  const location = first.headers.get("location")!;
  const report = await getManual(new URL(location, server.url).pathname);
  return { location: new URL(location, server.url).pathname, ...report };
}

const scriptHash = `'sha256-${createHash("sha256").update(SORT_SCRIPT).digest("base64")}'`;

// ---------------------------------------------------------------------------------------------

serverTest(
  "pages: HTML is served only as a run's report, sandboxed, running only its script",
  async () => {
    // Pages planted where no run is: never served, whatever folder they are in.
    const planted = "<!doctype html><script>fetch('/v1/jobs',{method:'POST'})</script>";
    Deno.mkdirSync(join(ROOT, "data", "report"), { recursive: true });
    for (const f of ["report.html", "report/x.html", "report/x.js", "report/x.css"]) {
      Deno.writeTextFileSync(join(ROOT, "data", f), planted);
      const r = await getManual(runUrl("data", ...f.split("/")));
      assert.equal(r.status, 404, `data/${f}: ${r.body}`);
      assert.doesNotMatch(r.body, /fetch\('\/v1/);
    }

    writeSweep(join(ROOT, "sweep"));
    const report = await openReport("sweep");
    assert.equal(report.status, 200, report.body);
    assert.match(report.location, new RegExp(`^/reports/[0-9a-f]{32}/${ROOT_NAME}/sweep/$`));
    assert.match(report.headers.get("content-type")!, /^text\/html/);
    const policy = report.headers.get("content-security-policy")!;
    assert.match(policy, /(^|; )sandbox allow-scripts(;|$)/, policy);
    const scriptSrc = /script-src ([^;]*)/.exec(policy)![1].trim();
    assert.equal(scriptSrc, scriptHash, "the report's own script only, by its hash");
    assert.ok(report.body.includes(`<script>${SORT_SCRIPT}</script>`), "the hashed script");
    assert.equal(report.headers.get("referrer-policy"), "no-referrer");

    // A page planted in a run's report folder is sent the same way: sandboxed, its script refused.
    Deno.writeTextFileSync(join(ROOT, "sweep", "report", "evil.html"), planted);
    const viaRuns = await getManual(runUrl("sweep", "report", "evil.html"));
    assert.equal(viaRuns.status, 303);
    const evil = await getManual(new URL(viaRuns.headers.get("location")!, server.url).pathname);
    assert.equal(evil.status, 200);
    assert.equal(evil.headers.get("content-security-policy"), policy);

    // The key opens that run's folder alone; a wrong one leads back through /runs/.
    const key = report.location.split("/")[2];
    const other = await getManual(`/reports/${key}/${ROOT_NAME}/data/red%20circle/0.png`);
    assert.equal(other.status, 303);
    assert.equal(
      new URL(other.headers.get("location")!, server.url).pathname,
      runUrl("data", "red circle", "0.png"),
    );
    const wrong = await getManual(`/reports/${"0".repeat(32)}/${ROOT_NAME}/sweep/`);
    assert.equal(wrong.status, 303);
    assert.equal(
      new URL(wrong.headers.get("location")!, server.url).pathname,
      `${runUrl("sweep")}/`,
    );
    const figure = /<img src="([^"]+\.svg)"/.exec(report.body)![1];
    const svg = await getManual(`${report.location}${figure}`);
    assert.equal(svg.status, 200);
    assert.match(svg.headers.get("content-security-policy")!, /sandbox/);
  },
);

serverTest("pages: a link with a servable name is judged by the file it names", async () => {
  const dir = join(ROOT, "links");
  Deno.mkdirSync(dir, { recursive: true });
  Deno.writeTextFileSync(join(dir, "secret.safetensors"), "weights");
  Deno.writeTextFileSync(join(dir, ".hidden.json"), '{"hidden":true}');
  Deno.writeTextFileSync(join(dir, "notes.txt"), "notes");
  Deno.writeTextFileSync(join(dir, "fine.json"), '{"fine":true}');
  Deno.symlinkSync("secret.safetensors", join(dir, "leak.json"));
  Deno.symlinkSync(".hidden.json", join(dir, "vis.json"));
  Deno.symlinkSync("notes.txt", join(dir, "notes.png"));
  Deno.symlinkSync("fine.json", join(dir, "alias.json"));
  for (const name of ["leak.json", "vis.json", "notes.png"]) {
    const r = await getManual(runUrl("links", name));
    assert.equal(r.status, 404, `${name}: ${r.body}`);
    assert.doesNotMatch(r.body, /weights|hidden":true|^notes$/);
  }
  const ok = await getManual(runUrl("links", "alias.json"));
  assert.equal(ok.status, 200);
  assert.equal(ok.body, '{"fine":true}');
  assert.equal(ok.headers.get("content-length"), String(ok.body.length));
});

serverTest("pages: without a token, a request for another host name is refused", async () => {
  const ask = (host: string, path: string, accept = "*/*") =>
    client.raw(`GET ${path} HTTP/1.1\nHost: ${host}\nAccept: ${accept}\nConnection: close`);
  for (const path of ["/", runUrl("data", "red circle", "0.png"), "/v1/info", "/v1/jobs"]) {
    const r = await ask("evil.example", path);
    assert.equal(r.status, 421, `${path}: ${r.text}`);
    assert.match(r.body, /evil\.example/);
    assert.doesNotMatch(r.body, /<h1>Runs<\/h1>|PNG/);
  }
  const page = await ask(`evil.example:${server.port}`, "/", "text/html");
  assert.match(page.headers["content-type"], /^text\/html/);
  const api = await ask(`evil.example:${server.port}`, "/v1/info");
  assert.match(JSON.stringify(api.json), /not a name of this server/);
  const post = await client.raw(
    `POST /v1/jobs HTTP/1.1\nHost: evil.example\nContent-Type: application/json\n` +
      `Content-Length: 2\nConnection: close`,
    { body: "{}" },
  );
  assert.equal(post.status, 421);
  for (
    const host of [`localhost:${server.port}`, "127.0.0.1", `127.1.2.3:${server.port}`, "[::1]"]
  ) {
    const r = await ask(host, "/");
    assert.equal(r.status, 200, `${host}: ${r.text.slice(0, 300)}`);
  }
});

serverTest(
  "pages: a report takes its records' time, so a record changed while it was made is seen",
  async () => {
    const dir = join(ROOT, "fresh");
    writeSweep(dir);
    const gen = join(ROOT, "fresh-stage");
    Deno.mkdirSync(gen, { recursive: true });
    Deno.writeTextFileSync(join(gen, "run.json"), "{}");
    // A sweep cell's stage is a link to a generated set kept elsewhere.
    Deno.symlinkSync(gen, join(dir, "stage"));
    const hourAgo = Date.now() - 3600_000;
    const at = (file: string, ms: number) => Deno.utimeSync(file, new Date(ms), new Date(ms));
    for (const f of [join(dir, "sweep.json"), join(gen, "run.json")]) at(f, hourAgo);
    const report = join(dir, "report.html");
    const mtime = () => Deno.statSync(report).mtime!.getTime();

    assert.equal((await openReport("fresh")).status, 200);
    assert.equal(mtime(), hourAgo, "the report has the time of its newest record");
    // A record written after the records were read but before the report was (a job running
    // alongside): older than the report's writing, newer than what it was made from.
    const during = hourAgo + 60_000;
    at(join(dir, "sweep.json"), during);
    assert.equal((await openReport("fresh")).status, 200);
    assert.equal(mtime(), during, "made again");
    // Every record counts: the validation split, the similarity matrix, a linked stage's record.
    let t = during;
    for (const f of ["validation.json", "similarity.json"]) {
      Deno.writeTextFileSync(join(dir, f), "{}");
      at(join(dir, f), t += 60_000);
    }
    assert.equal((await openReport("fresh")).status, 200);
    assert.equal(mtime(), t, "validation.json and similarity.json");
    at(join(gen, "run.json"), t += 60_000);
    assert.equal((await openReport("fresh")).status, 200);
    assert.equal(mtime(), t, "the linked stage's run.json");
    const kept = await openReport("fresh");
    assert.equal(kept.status, 200);
    assert.equal(mtime(), t, "an up-to-date report is kept");
  },
);

serverTest(
  "pages: a demo's folder is a run; an error the visitor cannot fix is a page",
  async () => {
    const demo = join(ROOT, "demo");
    Deno.mkdirSync(join(demo, "images"), { recursive: true });
    Deno.mkdirSync(join(demo, "classifier"), { recursive: true });
    Deno.writeTextFileSync(join(demo, "images", "run.json"), "{}");
    Deno.writeTextFileSync(join(demo, "classifier", "train.json"), "{}");
    const index = text((await client.call("GET", "/")).bytes);
    assert.match(index, /<tr data-kind="run"><td><a href="[^"]*\/demo\/">/);
    const shown = await openReport("demo");
    assert.equal(shown.status, 200, shown.body);
    assert.match(shown.body, /<h1>Experiment demo<\/h1>/);

    // report.html cannot be written (a folder is in its place): a 500 page with one line.
    const blocked = join(ROOT, "blocked");
    writeSweep(blocked);
    Deno.mkdirSync(join(blocked, "report.html", "x"), { recursive: true });
    Deno.utimeSync(join(blocked, "report.html"), new Date(0), new Date(0));
    const failed = await openReport("blocked");
    assert.equal(failed.status, 500);
    assert.match(failed.headers.get("content-type")!, /^text\/html/);
    const line = /<p class="error">([^<]*)<\/p>/.exec(failed.body);
    assert.ok(line, failed.body);
    assert.match(line[1], /^the server could not answer: /);
  },
);

serverTest(
  "pages: a report shows no image from outside the roots that a record names",
  async () => {
    const outside = await Deno.makeTempDir({ prefix: "dipsy_pages_outside_" });
    try {
      await writeTinyDataset(outside);
      const gen = join(ROOT, "outside-refs");
      const image = join("red circle", "0.png");
      Deno.mkdirSync(join(gen, "red circle"), { recursive: true });
      Deno.copyFileSync(join(ROOT, "data", image), join(gen, image));
      Deno.writeTextFileSync(
        join(gen, "run.json"),
        JSON.stringify({ format: "dipsy-generate-run", data: outside }),
      );
      const shot = { class: "red circle", file: image, shot: 0, augment: null };
      const entry = {
        class: "red circle",
        classIndex: 0,
        index: 0,
        file: image,
        seed: 1,
        runSeed: 1,
        prompt: "a red circle",
        positive: shot,
        negative: null,
      };
      Deno.writeTextFileSync(join(gen, "manifest.jsonl"), JSON.stringify(entry) + "\n");
      const shown = await openReport("outside-refs");
      assert.equal(shown.status, 200, shown.body);
      assert.match(shown.body, /outside the served roots/);
      const thumbs = [...Deno.readDirSync(join(gen, "report", "thumbs"))].map((e) => e.name);
      assert.deepEqual(thumbs, ["images"], "the generated image's thumbnail only");
    } finally {
      await Deno.remove(outside, { recursive: true });
    }
  },
);

browserTest("pages: a sandboxed report still sorts its table and shows its figures", async () => {
  const dir = join(ROOT, "sorted");
  writeSweep(dir);
  const browser = await launchBrowser();
  try {
    const page = await browser.newContext().then((c) => c.newPage());
    const { problems } = watchPage(page);
    assert.equal((await page.goto(`${server.url}${runUrl("sorted")}/`))?.status(), 200);
    const ranks = () =>
      page.$$eval(
        "#sweep-table tbody tr",
        (r) => r.map((e) => (e as HTMLTableRowElement).cells[0].textContent),
      );
    assert.deepEqual(await ranks(), ["1", "2", "3"]);
    // The origin is opaque: no cookie, nothing of the server's own pages.
    assert.equal(await page.evaluate(() => self.origin), "null");
    await page.click("#sweep-table th:nth-child(1)");
    await page.click("#sweep-table th:nth-child(1)");
    assert.deepEqual(await ranks(), ["3", "2", "1"], "sorted by rank, descending");
    assert.ok(await assertImagesLoad(page, "sandboxed report") > 0, "the report shows figures");
    await screenshot(page, "report-sandboxed-sorted");
    assert.deepEqual(problems, []);
  } finally {
    await browser.close();
  }
});

serverTest("pages security: stop the server", async () => {
  await server.shutdown();
  await Deno.remove(ROOT, { recursive: true });
});
