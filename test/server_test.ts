/**
 * The HTTP service, started for real on a loopback port with the tiny models, spoken to over
 * HTTP: a sample equals `dipsy sample` byte for byte; a job equals `dipsy generate` and reports
 * progress as server-sent events; hundreds of malformed requests get the right 4xx while the
 * server keeps serving; work beyond the queue bound gets 503; a client that goes away leaves the
 * queue; cancel, shutdown (in process and by SIGTERM) and resume lose nothing.
 */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { join } from "node:path";
import { encodeImage } from "../core/image.ts";
import { setNumThreads } from "../ffi/mod.ts";
import { command as sampleCommand } from "../cli/sample.ts";
import { command as generateCommand } from "../cli/generate.ts";
import { parseServeArgs, startFromSettings } from "../cli/serve.ts";
import { checkExposure, isLoopback } from "../server/auth.ts";
import type { RunningServer } from "../server/app.ts";
import { WorkQueue } from "../server/engine.ts";
import { capped, type JOB_REQUEST } from "../server/jobs.ts";
import { RUN_FIELDS, type RunSettings } from "../core/config.ts";
import * as s from "../core/schema.ts";
import { CliError } from "../cli/command.ts";
import {
  noiseImage,
  quickGenerateFlags,
  quietly,
  readTree,
  withTempDir,
  writeTinyDataset,
} from "./util.ts";
import {
  assertSameRun,
  BatchGate,
  Client,
  form,
  manifestLines,
  MODEL_FLAGS,
  type Reply,
  serverTest,
  waitFor,
  whenListening,
} from "./server_util.ts";

// One thread: thread counts change float rounding, and the tiny models gain nothing from more.
setNumThreads(1);

const ROOT = await Deno.realPath(await Deno.makeTempDir({ prefix: "dipsy_server_test_" }));
const SECRETS = await Deno.makeTempDir({ prefix: "dipsy_server_token_" });
const DATA = join(ROOT, "data");
const TOKEN = "0123456789abcdef0123456789abcdef";
const SERVE_CHILD = new URL("./serve_child.ts", import.meta.url).pathname;

const POSITIVE = await encodeImage(noiseImage(40, 36, 1), "png");
const NEGATIVE = await encodeImage(noiseImage(36, 40, 2), "png");
await writeTinyDataset(DATA);
await Deno.writeTextFile(join(SECRETS, "token"), `${TOKEN}\n`);
await Deno.writeTextFile(join(ROOT, "not-a-folder.txt"), "x");
await Deno.symlink("/", join(ROOT, "escape"));

const QUEUE = 2;
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
    "--queue",
    String(QUEUE),
    "--max-body-mb",
    "1",
    "--max-image-mb",
    "1",
  ])!,
  () => {},
  { beforeBatch: gate.hook },
);
const BASE = server.url;
const AUTH = { authorization: `Bearer ${TOKEN}` };
const client = new Client(BASE, server.port, TOKEN);
const call = client.call.bind(client);
const postJob = client.postJob.bind(client);
const queueState = client.queue.bind(client);

const SAMPLE = {
  prompt: "a photo of a red circle",
  seed: "3",
  steps: "2",
  width: "32",
  height: "32",
  positive: POSITIVE,
  negative: NEGATIVE,
};

const JOB = { data: "data", perClass: 4, steps: 2, width: 32, height: 32, batch: 2, seed: 5 };

/**
 * Where `value` breaks `schema`, for the JSON Schema keywords the server's document uses on
 * answers: type, enum, bounds, properties, required, additionalProperties, items, oneOf, anyOf.
 */
// deno-lint-ignore no-explicit-any
function breaches(schema: any, value: any, at = "answer"): string[] {
  const types = [schema.type ?? []].flat();
  const kind = value === null
    ? "null"
    : Array.isArray(value)
    ? "array"
    : Number.isInteger(value) && types.includes("integer")
    ? "integer"
    : typeof value;
  if (types.length && !types.includes(kind)) return [`${at}: ${kind}, not ${types.join(" | ")}`];
  const alternatives = schema.oneOf ?? schema.anyOf;
  if (alternatives && !alternatives.some((a: unknown) => !breaches(a, value, at).length)) {
    return [`${at}: matches no alternative`];
  }
  const out: string[] = [];
  if (schema.enum && !schema.enum.includes(value)) out.push(`${at}: not one of ${schema.enum}`);
  if (value > schema.maximum || value < schema.minimum) out.push(`${at}: out of bounds`);
  if (kind === "array") {
    value.forEach((v: unknown, i: number) =>
      out.push(...breaches(schema.items ?? {}, v, `${at}[${i}]`))
    );
  }
  if (kind !== "object") return out;
  for (const k of schema.required ?? []) if (!(k in value)) out.push(`${at}.${k}: missing`);
  for (const [k, v] of Object.entries(value)) {
    const sub = schema.properties?.[k];
    if (sub) out.push(...breaches(sub, v, `${at}.${k}`));
    else if (schema.additionalProperties === false) out.push(`${at}.${k}: not in the document`);
  }
  return out;
}

/** The document's schema of the JSON answer `status` of `method path`. */
// deno-lint-ignore no-explicit-any
function answerSchema(doc: any, method: string, path: string, status: number) {
  return doc.paths[path][method].responses[status].content["application/json"].schema;
}

// ---------------------------------------------------------------------------------------------

serverTest(
  "server: liveness, info and the OpenAPI document of the validating schemas",
  async () => {
    const health = await call("GET", "/healthz", { auth: false });
    assert.equal(health.status, 200);
    assert.deepEqual(health.json, { status: "ok" });

    const info = (await call("GET", "/v1/info")).json;
    assert.equal(info.device, "cpu");
    assert.equal(info.dtype, "f32");
    assert.equal(info.adapters, 2);
    assert.match(info.models.model, /^tiny/);
    assert.equal(info.version.api, "1");
    assert.ok(info.plugins.guidance.some((p: { name: string }) => p.name === "dipsy"));
    assert.ok(info.plugins.sampler.some((p: { name: string }) => p.name === "dpm-solver++"));
    assert.deepEqual(info.queue, { running: false, waiting: 0, bound: QUEUE });

    const doc = (await call("GET", "/openapi.json")).json;
    assert.equal(doc.openapi, "3.1.0");
    assert.deepEqual(Object.keys(doc.paths).sort(), [
      "/healthz",
      "/openapi.json",
      "/v1/info",
      "/v1/jobs",
      "/v1/jobs/{id}",
      "/v1/jobs/{id}/events",
      "/v1/sample",
    ]);
    const sample = doc.paths["/v1/sample"].post.requestBody.content["multipart/form-data"].schema;
    assert.deepEqual(sample.required, ["prompt", "seed"]);
    assert.equal(sample.properties.positive.format, "binary");
    // An absent response field is the Accept header's to decide, so it has no default.
    assert.equal(sample.properties.response.default, undefined);
    assert.deepEqual(
      sample.properties.guidance.enum,
      info.plugins.guidance.map((p: { name: string }) => p.name),
    );
    const job = doc.paths["/v1/jobs"].post.requestBody.content["application/json"].schema;
    assert.deepEqual(job.required, ["data", "out"]);
    assert.equal(job.additionalProperties, false);
    assert.equal(job.properties.steps.maximum, 1000);
    assert.deepEqual(doc.security, [{ bearer: [] }]);
    assert.deepEqual(doc.paths["/healthz"].get.security, []);
  },
);

type JobRequest = s.Infer<typeof JOB_REQUEST>;
type Shared = Exclude<keyof JobRequest & keyof RunSettings, "data" | "out">;
type Same<A, B> = [A] extends [B] ? [B] extends [A] ? true : false : false;
/** A type error here: a job request's run setting lost the type RUN_FIELDS gives it. */
const KEEPS_TYPES: Same<
  { [K in Shared]: JobRequest[K] },
  { [K in Shared]: RunSettings[K] | undefined }
> = true;
void KEEPS_TYPES;

Deno.test("server: a capped setting enforces the smaller bound and documents that one", () => {
  const own = RUN_FIELDS.shape.steps.schema.jsonSchema().maximum as number;
  for (const [cap, bound] of [[2 * own, own], [own / 2, own / 2]]) {
    const steps = capped(RUN_FIELDS.shape.steps.schema, { maximum: cap });
    assert.equal(steps.jsonSchema().maximum, bound, `cap ${cap}`);
    assert.ok(s.validate(steps, bound).ok, `cap ${cap}: ${bound}`);
    const over = s.validate(steps, bound + 1);
    assert.deepEqual(over.ok ? [] : over.issues.map((i) => i.message), [
      `must be at most ${bound}, got ${bound + 1}`,
    ]);
  }
});

serverTest("server: a misspelt field's 400 is the documented error answer", async () => {
  const doc = (await call("GET", "/openapi.json")).json;
  const errorSchema = answerSchema(doc, "post", "/v1/jobs", 400);
  const job = await postJob({ ...JOB, out: "o", stpes: 2 });
  const sample = await call("POST", "/v1/sample", { body: form({ ...SAMPLE, stpes: "2" }) });
  for (const r of [job, sample]) {
    assert.equal(r.status, 400);
    assert.deepEqual(r.json.error.issues.map((i: s.Issue) => [i.field, i.unknown]), [[
      "stpes",
      true,
    ]]);
    assert.match(r.json.error.message, /unknown field "stpes" \(did you mean steps\?/);
    assert.deepEqual(breaches(errorSchema, r.json), []);
  }
});

serverTest(
  "server: a sample equals `dipsy sample` byte for byte (PNG and base64 JSON)",
  async () => {
    const res = await call("POST", "/v1/sample", {
      body: form({ ...SAMPLE, guidanceOptions: '{"negativeScale": 4}', "guidance.textScale": "5" }),
    });
    assert.equal(res.status, 200, JSON.stringify(res.json));
    assert.equal(res.headers.get("content-type"), "image/png");

    await withTempDir(async (dir) => {
      await Deno.writeFile(join(dir, "p.png"), POSITIVE);
      await Deno.writeFile(join(dir, "n.png"), NEGATIVE);
      const out = join(dir, "cli.png");
      const code = await quietly(() =>
        sampleCommand.run([
          ...MODEL_FLAGS,
          "--prompt",
          SAMPLE.prompt,
          "--seed",
          SAMPLE.seed,
          "--steps",
          SAMPLE.steps,
          "--width",
          SAMPLE.width,
          "--height",
          SAMPLE.height,
          "--positive",
          join(dir, "p.png"),
          "--negative",
          join(dir, "n.png"),
          "--guidance-opt",
          "negativeScale=4",
          "--guidance-opt",
          "textScale=5",
          "--out",
          out,
        ])
      );
      assert.equal(code, 0);
      assert.deepEqual(res.bytes, await Deno.readFile(out), "server and CLI images differ");

      // Another seed gives another image; JSON carries the same bytes as base64.
      const other = await call("POST", "/v1/sample", {
        body: form({ ...SAMPLE, seed: "4", response: "json" }),
      });
      assert.equal(other.status, 200);
      assert.equal(other.json.mediaType, "image/png");
      assert.deepEqual([other.json.width, other.json.height, other.json.seed], [32, 32, 4]);
      const png = new Uint8Array(Buffer.from(other.json.image, "base64"));
      assert.notDeepEqual(png, res.bytes);
      const again = await call("POST", "/v1/sample", {
        body: form({ ...SAMPLE, seed: "4" }),
        headers: { accept: "image/png" },
      });
      assert.deepEqual(again.bytes, png);
      // Without a response field the Accept header chooses; the field, when given, wins.
      const accepted = await call("POST", "/v1/sample", {
        body: form({ ...SAMPLE, seed: "4" }),
        headers: { accept: "application/json" },
      });
      assert.equal(accepted.status, 200);
      assert.equal(accepted.json.mediaType, "image/png");
      assert.deepEqual(new Uint8Array(Buffer.from(accepted.json.image, "base64")), png);
      const field = await call("POST", "/v1/sample", {
        body: form({ ...SAMPLE, seed: "4", response: "image" }),
        headers: { accept: "application/json" },
      });
      assert.equal(field.headers.get("content-type"), "image/png");
      assert.deepEqual(field.bytes, png);
    });
  },
);

serverTest("server: a job equals `dipsy generate` and reports progress as events", async () => {
  const res = await postJob({ ...JOB, out: "out-full" });
  assert.equal(res.status, 202, JSON.stringify(res.json));
  assert.equal(res.headers.get("location"), `/v1/jobs/${res.json.id}`);
  const events = await client.jobEvents(res.json.id);
  const statuses = events.filter((e) => e.event === "status").map((e) => e.data.status);
  assert.equal(statuses.at(-1), "succeeded");
  assert.equal(events.at(-1)!.event, "end");
  const images = events.filter((e) => e.event === "image").map((e) => e.data.file);
  assert.equal(images.length, 8);
  const done = events.filter((e) => e.event === "progress").map((e) => e.data.done);
  assert.deepEqual(done, [...done].sort((a, b) => a - b), "progress never goes back");
  assert.equal(done.at(-1), 8);
  assert.ok(events.some((e) => e.event === "progress" && e.data.step), "denoising steps reported");
  const view = (await call("GET", `/v1/jobs/${res.json.id}`)).json;
  assert.equal(view.status, "succeeded");
  const doc = (await call("GET", "/openapi.json")).json;
  assert.deepEqual(breaches(answerSchema(doc, "get", "/v1/jobs/{id}", 200), view), []);
  assert.deepEqual(view.result, {
    out: join(ROOT, "out-full"),
    written: 8,
    skipped: 0,
    remaining: 0,
    interrupted: false,
  });

  const cliOut = join(ROOT, "cli-full");
  const code = await quietly(() =>
    generateCommand.run([
      ...MODEL_FLAGS,
      "--data",
      DATA,
      "--out",
      cliOut,
      ...quickGenerateFlags(4, 5),
    ])
  );
  assert.equal(code, 0);
  const served = await readTree(join(ROOT, "out-full"));
  const cli = await readTree(cliOut);
  assertSameRun(served, cli);
  assert.deepEqual(served.get("run.json"), cli.get("run.json"));
});

serverTest(
  "server: a job refused for its image size writes nothing; the corrected job then runs there",
  async () => {
    const bad = await postJob({ ...JOB, out: "out-size", width: 13, height: 13 });
    assert.equal(bad.status, 202, JSON.stringify(bad.json));
    const last = (await client.jobEvents(bad.json.id)).at(-1)!.data;
    assert.equal(last.status, "failed");
    assert.match(last.error, /must be multiples of \d+/);
    const left = await readTree(join(ROOT, "out-size")).catch(() => new Map());
    assert.deepEqual([...left.keys()], [], "nothing written for the refused job");

    const good = await postJob({ ...JOB, out: "out-size" });
    assert.equal(good.status, 202, JSON.stringify(good.json));
    const done = (await client.jobEvents(good.json.id)).at(-1)!.data;
    assert.equal(done.status, "succeeded", JSON.stringify(done));
    assert.equal(done.result.written, 8);
  },
);

serverTest(
  "server: cancel stops after the batch in flight; the same request resumes, losing nothing",
  async () => {
    const full = await readTree(join(ROOT, "out-full"));
    // The job stops as its second batch starts (two images written): the cancel comes while
    // that batch is in flight, whatever the machine's speed.
    const hold = gate.hold("out-cancel", 1);
    const res = await postJob({ ...JOB, out: "out-cancel" });
    assert.equal(res.status, 202);
    const id = res.json.id;
    await hold.reached;
    const cancelled = await call("DELETE", `/v1/jobs/${id}`);
    assert.equal(cancelled.status, 202);
    assert.equal(cancelled.json.status, "cancelling");
    const events = await client.jobEvents(id);
    const last = events.at(-1)!.data;
    assert.equal(last.status, "cancelled");
    assert.equal(last.result.written, 4, "the batch in flight is finished, no other starts");
    assert.equal(last.result.remaining, 4);
    assert.equal(last.result.interrupted, true);
    assert.equal(
      (await call("DELETE", `/v1/jobs/${id}`)).status,
      409,
      "finished jobs stay finished",
    );
    const partial = await readTree(join(ROOT, "out-cancel"));
    const written = [...partial.keys()].filter((k) => k.endsWith(".jpg"));
    assert.equal(written.length, last.result.written);
    assert.equal(manifestLines(partial).length, written.length, "every image has its line");

    const again = await postJob({ ...JOB, out: "out-cancel" });
    assert.equal(again.status, 202);
    const resumed = (await client.jobEvents(again.json.id)).at(-1)!.data;
    assert.equal(resumed.status, "succeeded");
    assert.equal(resumed.result.skipped, 4);
    assert.equal(resumed.result.written, 4);
    assertSameRun(await readTree(join(ROOT, "out-cancel")), full);
  },
);

serverTest(
  "server: work beyond the queue bound gets 503; a client that leaves drops out of the queue",
  async () => {
    // A job held at its first batch keeps the engine busy while the queue fills.
    const held = gate.hold("out-hold", 0);
    const hold = await postJob({ ...JOB, out: "out-hold" });
    assert.equal(hold.status, 202);
    const id = hold.json.id;
    await held.reached;
    assert.deepEqual(await queueState(), { running: true, waiting: 0, bound: QUEUE });

    const gone = new AbortController();
    const leaving = fetch(BASE + "/v1/sample", {
      method: "POST",
      body: form(SAMPLE),
      headers: AUTH,
      signal: gone.signal,
    }).catch((e) => e);
    await waitFor("the sample to queue", async () => (await queueState()).waiting === 1);
    gone.abort();
    assert.equal((await leaving).name, "AbortError");
    await waitFor("the queue to drop it", async () => (await queueState()).waiting === 0);

    // The first QUEUE requests wait; the next ones, sent together, are refused at once.
    const waiting: Promise<Reply>[] = [];
    for (let k = 0; k < QUEUE; k++) {
      waiting.push(call("POST", "/v1/sample", { body: form({ ...SAMPLE, seed: String(10 + k) }) }));
      await waitFor("the sample to queue", async () => (await queueState()).waiting === k + 1);
    }
    const refused = await Promise.all(
      [0, 1, 2].map((k) =>
        call("POST", "/v1/sample", { body: form({ ...SAMPLE, seed: String(20 + k) }) })
      ),
    );
    for (const r of refused) {
      assert.equal(r.status, 503);
      assert.ok(Number(r.headers.get("retry-after")) >= 1);
      assert.match(r.json.error.message, /queue is full/);
    }
    const jobRefused = await postJob({ ...JOB, out: "out-refused" });
    assert.equal(jobRefused.status, 503, "jobs share the queue");
    assert.equal((await call("GET", "/healthz")).status, 200, "liveness answers while busy");

    assert.equal((await call("DELETE", `/v1/jobs/${id}`)).status, 202);
    for (const r of await Promise.all(waiting)) {
      assert.equal(r.status, 200);
      assert.equal(r.headers.get("content-type"), "image/png");
    }
    // The waiting samples ran after the job: it had stopped after its batch in flight.
    const view = (await call("GET", `/v1/jobs/${id}`)).json;
    assert.equal(view.status, "cancelled");
    assert.equal(view.result.written, 2);
  },
);

function pngHeader(width: number, height: number): Uint8Array {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (b: Uint8Array) => {
    let c = 0xffffffff;
    for (const x of b) c = crcTable[(c ^ x) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (type: string, data: Uint8Array) => {
    const out = new Uint8Array(12 + data.length);
    const view = new DataView(out.buffer);
    view.setUint32(0, data.length);
    out.set(new TextEncoder().encode(type), 4);
    out.set(data, 8);
    view.setUint32(8 + data.length, crc(out.subarray(4, 8 + data.length)));
    return out;
  };
  const ihdr = new Uint8Array(13);
  new DataView(ihdr.buffer).setUint32(0, width);
  new DataView(ihdr.buffer).setUint32(4, height);
  ihdr.set([8, 2, 0, 0, 0], 8);
  const parts = [
    new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]),
    chunk("IHDR", ihdr),
    chunk("IDAT", new Uint8Array([0x78, 0x9c, 0x03, 0x00])),
    chunk("IEND", new Uint8Array(0)),
  ];
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

/**
 * A raw HTTP/1.1 exchange, for bodies fetch will not send: the status code, or 0 when the
 * connection ends without an answer. `hangUp`: close the connection after sending, as a client
 * that gives up mid-upload does (nobody is left to answer).
 */
async function rawStatus(head: string, body: Uint8Array | string, hangUp = false): Promise<number> {
  const reply = await client.raw(head.replace(/\n$/, ""), {
    body,
    then: hangUp ? "hang-up" : "read",
  });
  return reply.status;
}

interface BadCase {
  name: string;
  status: number;
  /** The field the first issue must name. */
  field?: string;
  send: () => Promise<Reply | number>;
}

function sampleCase(
  name: string,
  status: number,
  fields: Record<string, string | Uint8Array | null>,
  field?: string,
): BadCase {
  const merged = Object.fromEntries(
    Object.entries({ ...SAMPLE, ...fields }).filter(([, v]) => v !== null),
  ) as Record<string, string | Uint8Array>;
  return { name, status, field, send: () => call("POST", "/v1/sample", { body: form(merged) }) };
}

function jobCase(name: string, status: number, body: unknown, field?: string): BadCase {
  return { name, status, field, send: () => postJob(body) };
}

function rawJobCase(
  name: string,
  status: number,
  body: string,
  type = "application/json",
): BadCase {
  return {
    name,
    status,
    send: () => call("POST", "/v1/jobs", { body, headers: { "content-type": type } }),
  };
}

function badCases(): BadCase[] {
  const cases: BadCase[] = [];
  const id = crypto.randomUUID();
  const routes: [string, string][] = [
    ["GET", "/v1/info"],
    ["GET", "/openapi.json"],
    ["POST", "/v1/sample"],
    ["POST", "/v1/jobs"],
    ["GET", "/v1/jobs"],
    ["GET", `/v1/jobs/${id}`],
    ["GET", `/v1/jobs/${id}/events`],
    ["DELETE", `/v1/jobs/${id}`],
  ];
  const wrongAuth: Record<string, string>[] = [
    {},
    { authorization: "" },
    { authorization: "Bearer" },
    { authorization: `Bearer ${TOKEN}x` },
    { authorization: `Bearer ${TOKEN.slice(1)}` },
    { authorization: `Basic ${btoa(`user:${TOKEN}`)}` },
    { authorization: TOKEN },
  ];
  for (const [method, path] of routes) {
    for (const [k, headers] of wrongAuth.entries()) {
      cases.push({
        name: `${method} ${path} token ${k}`,
        status: 401,
        send: () => call(method, path, { headers, auth: false }),
      });
    }
  }
  for (
    const [method, path] of [
      ["GET", "/index.html"],
      ["GET", "/v2/info"],
      ["GET", "/v1/infos"],
      ["POST", "/v1/samples"],
      ["GET", "/v1/jobs/x/y/z"],
      ["GET", "/healthz/x"],
      ["GET", "/v1/jobs/not-a-uuid"],
      ["GET", `/v1/jobs/${id}`],
      ["GET", `/v1/jobs/${id}/events`],
      ["DELETE", `/v1/jobs/${id}`],
      ["DELETE", "/v1/jobs/../../etc"],
      ["GET", "/%2e%2e/%2e%2e/etc/passwd"],
    ]
  ) {
    cases.push({ name: `${method} ${path}`, status: 404, send: () => call(method, path) });
  }
  for (
    const [method, path] of [
      ["GET", "/v1/sample"],
      ["PUT", "/v1/sample"],
      ["DELETE", "/v1/sample"],
      ["PUT", "/v1/jobs"],
      ["DELETE", "/v1/jobs"],
      ["POST", "/v1/info"],
      ["POST", "/healthz"],
      ["PATCH", `/v1/jobs/${id}`],
      ["POST", `/v1/jobs/${id}/events`],
    ]
  ) {
    cases.push({ name: `${method} ${path}`, status: 405, send: () => call(method, path) });
  }

  // POST /v1/sample: media types, sizes and framing.
  for (
    const [type, body] of [
      ["application/json", JSON.stringify({ prompt: "x", seed: 1 })],
      ["text/plain", "prompt=x&seed=1"],
      ["application/x-www-form-urlencoded", "prompt=x&seed=1"],
      ["image/png", "x"],
      ["multipart/mixed; boundary=b", "--b--"],
    ]
  ) {
    cases.push({
      name: `sample as ${type}`,
      status: 415,
      send: () => call("POST", "/v1/sample", { body, headers: { "content-type": type } }),
    });
  }
  cases.push({
    name: "sample without a content type",
    status: 415,
    send: () => call("POST", "/v1/sample", { body: new Uint8Array([1, 2, 3]) }),
  });
  const multipart = (boundary: string, body: string, extra = "", hangUp = false) => () =>
    rawStatus(
      `POST /v1/sample HTTP/1.1\nHost: x\nAuthorization: Bearer ${TOKEN}\nConnection: close\n` +
        `Content-Type: multipart/form-data; boundary=${boundary}\n` +
        `Content-Length: ${extra || new TextEncoder().encode(body).length}\n`,
      body,
      hangUp,
    );
  const part = (name: string, value: string) =>
    `--b\r\nContent-Disposition: form-data; name="${name}"\r\n\r\n${value}\r\n`;
  const whole = part("prompt", "x") + part("seed", "1") + "--b--\r\n";
  cases.push(
    {
      name: "multipart without a boundary",
      status: 400,
      send: () =>
        call("POST", "/v1/sample", {
          body: whole,
          headers: { "content-type": "multipart/form-data" },
        }),
    },
    { name: "multipart truncated mid-part", status: 400, send: multipart("b", whole.slice(0, 30)) },
    {
      name: "multipart without the closing boundary",
      status: 400,
      send: multipart("b", part("prompt", "x")),
    },
    { name: "multipart with another boundary", status: 400, send: multipart("zzz", whole) },
    { name: "multipart of garbage", status: 400, send: multipart("b", "\x00\x01garbage\r\n\r\n") },
    { name: "multipart empty", status: 400, send: multipart("b", "") },
    {
      name: "client hangs up mid-body (no answer; the server goes on)",
      status: 0,
      send: multipart("b", whole, "5000", true),
    },
    {
      name: "Content-Length over the limit",
      status: 413,
      send: multipart("b", whole, String(5 << 20)),
    },
    {
      name: "body over the limit",
      status: 413,
      send: () =>
        call("POST", "/v1/sample", { body: form({ ...SAMPLE, prompt: "x".repeat(2 << 20) }) }),
    },
    {
      name: "streamed body over the limit",
      status: 413,
      send: () =>
        call("POST", "/v1/sample", {
          body: ReadableStream.from([new Uint8Array(700_000), new Uint8Array(700_000)]),
          headers: { "content-type": "multipart/form-data; boundary=b" },
        }),
    },
  );

  // POST /v1/sample: fields.
  const seeds = ["-1", "1.5", "abc", "", "1e400", "9007199254740993", "0x10", " "];
  for (const v of seeds) {
    cases.push(sampleCase(`seed ${JSON.stringify(v)}`, 400, { seed: v }, "seed"));
  }
  for (const v of ["0", "-2", "1001", "two", "2.5", "[2]"]) {
    cases.push(sampleCase(`steps ${v}`, 400, { steps: v }, "steps"));
  }
  for (const k of ["width", "height"]) {
    for (const v of ["0", "7", "4096", "abc", "-32", "33.5"]) {
      cases.push(sampleCase(`${k} ${v}`, 400, { [k]: v }, k));
    }
    // The tiny VAE halves the size: odd sizes do not fit it.
    cases.push(sampleCase(`${k} not a multiple of the VAE factor`, 400, { [k]: "33" }, k));
  }
  cases.push(
    sampleCase("no prompt", 400, { prompt: null }, "prompt"),
    sampleCase("no seed", 400, { seed: null }, "seed"),
    sampleCase("huge prompt", 400, { prompt: "x".repeat(5000) }, "prompt"),
    sampleCase("prompt as a file", 400, { prompt: POSITIVE }, "prompt"),
    sampleCase("seed as a file", 400, { seed: POSITIVE }, "seed"),
    sampleCase("positive as text", 400, { positive: "a.png" }, "positive"),
    sampleCase("negative as text", 400, { negative: "b.png" }, "negative"),
    sampleCase("no positive", 400, { positive: null }, "positive"),
    sampleCase("no negative", 400, { negative: null }, "negative"),
    sampleCase("no negative for single-ip is fine but bad sampler", 400, {
      negative: null,
      guidance: "single-ip",
      sampler: "heun",
    }, "sampler"),
    sampleCase("unknown guidance", 400, { guidance: "dipsy2" }, "guidance"),
    sampleCase("unknown sampler", 400, { sampler: "plms" }, "sampler"),
    sampleCase("empty guidance", 400, { guidance: "" }, "guidance"),
    sampleCase("unknown format", 400, { format: "gif" }, "format"),
    sampleCase("unknown response", 400, { response: "xml" }, "response"),
    sampleCase("unknown field", 400, { colour: "red" }, "colour"),
    sampleCase("field with a bad name", 400, { "guidance.": "1" }, "guidance."),
    sampleCase(
      "guidanceOptions not JSON",
      400,
      { guidanceOptions: "{textScale:" },
      "guidanceOptions",
    ),
    sampleCase("guidanceOptions a list", 400, { guidanceOptions: "[1,2]" }, "guidanceOptions"),
    sampleCase("guidanceOptions a number", 400, { guidanceOptions: "7" }, "guidanceOptions"),
    sampleCase("an option given twice", 400, {
      guidanceOptions: '{"textScale": 5}',
      "guidance.textScale": "6",
    }, "guidance.textScale"),
    sampleCase(
      "guidanceOptions unknown option",
      400,
      { guidanceOptions: '{"scale": 2}' },
      "guidanceOptions.scale",
    ),
    sampleCase("guidanceOptions huge value", 400, {
      guidanceOptions: `{"textScale": "${"9".repeat(2000)}"}`,
    }, "guidanceOptions.textScale"),
    sampleCase(
      "guidanceOptions too many keys",
      400,
      {
        guidanceOptions: JSON.stringify(
          Object.fromEntries(Array.from({ length: 40 }, (_, i) => [`k${i}`, i])),
        ),
      },
      "guidanceOptions",
    ),
    sampleCase(
      "guidance option of the wrong type",
      400,
      { "guidance.textScale": "high" },
      "guidanceOptions.textScale",
    ),
    sampleCase(
      "guidance weight a list",
      400,
      { "guidance.adapterScale": "[1]" },
      "guidanceOptions.adapterScale",
    ),
    sampleCase(
      "bad interval",
      400,
      { "guidance.interval": "[0.9, 0.1]" },
      "guidanceOptions.interval",
    ),
    sampleCase(
      "unknown dotted option",
      400,
      { "guidance.strength": "1" },
      "guidanceOptions.strength",
    ),
    sampleCase("option given twice", 400, {
      "guidance.textScale": "2",
      guidanceOptions: '{"textScale": 3}',
    }, "guidance.textScale"),
    sampleCase(
      "dotted option as a file",
      400,
      { "guidance.textScale": POSITIVE },
      "guidance.textScale",
    ),
    sampleCase(
      "positive not an image",
      422,
      { positive: new TextEncoder().encode("hello, world") },
      "positive",
    ),
    sampleCase(
      "negative not an image",
      422,
      { negative: new TextEncoder().encode("<svg") },
      "negative",
    ),
    sampleCase("positive empty", 422, { positive: new Uint8Array(0) }, "positive"),
    sampleCase(
      "positive truncated",
      422,
      { positive: POSITIVE.slice(0, POSITIVE.length >> 1) },
      "positive",
    ),
    sampleCase("negative header only", 422, { negative: POSITIVE.slice(0, 40) }, "negative"),
    sampleCase(
      "positive of random bytes",
      422,
      { positive: noiseImage(30, 30, 9).data },
      "positive",
    ),
    sampleCase("positive a pixel bomb", 413, { positive: pngHeader(30_000, 30_000) }, "positive"),
    sampleCase("negative a pixel bomb", 413, { negative: pngHeader(100_000, 1_000) }, "negative"),
  );
  cases.push({
    name: "a field given twice",
    status: 400,
    field: "seed",
    send: () => {
      const f = form(SAMPLE);
      f.append("seed", "4");
      return call("POST", "/v1/sample", { body: f });
    },
  });

  // POST /v1/jobs: media types and JSON.
  for (const type of ["text/plain", "multipart/form-data; boundary=b", "application/xml", ""]) {
    cases.push(
      rawJobCase(`job as ${type || "no type"}`, 415, JSON.stringify({ ...JOB, out: "o" }), type),
    );
  }
  for (
    const body of [
      "",
      "{",
      '{"data": "data",}',
      "{'data': 'data'}",
      '{"data": NaN}',
      '{"data": "data"} x',
      "undefined",
      "\u00ff\u00fe",
      '{"data": "\\x"}',
    ]
  ) {
    cases.push(rawJobCase(`job JSON ${JSON.stringify(body)}`, 400, body));
  }
  cases.push({
    name: "job JSON not UTF-8",
    status: 400,
    send: () =>
      call("POST", "/v1/jobs", {
        body: new Uint8Array([0x7b, 0x22, 0xff, 0xfe, 0x22, 0x7d]),
        headers: { "content-type": "application/json" },
      }),
  });
  cases.push(
    rawJobCase(
      "job JSON over the limit",
      413,
      JSON.stringify({ ...JOB, out: "o", prompt: "x".repeat(2 << 20) }),
    ),
  );
  for (const body of [null, [], "data", 42, true]) {
    cases.push(jobCase(`job body ${JSON.stringify(body)}`, 400, body, ""));
  }
  // POST /v1/jobs: fields.
  const bad: [string, unknown][] = [
    ["data", 5],
    ["data", ""],
    ["data", "x".repeat(5000)],
    ["out", null],
    ["out", ["a"]],
    ["perClass", "10"],
    ["perClass", 0],
    ["perClass", 2.5],
    ["perClass", 1e12],
    ["seed", -1],
    ["seed", "7"],
    ["seed", 1.5],
    ["steps", 0],
    ["steps", 5000],
    ["steps", null],
    ["width", 4],
    ["width", 100_000],
    ["height", "32"],
    ["batch", 0],
    ["batch", 1000],
    ["quality", 0],
    ["quality", 101],
    ["skipBad", "yes"],
    ["skipBad", 1],
    ["prompt", 5],
    ["prompt", "x".repeat(5000)],
    ["dataset", 3],
    ["fewshotSeed", true],
    ["preset", "best"],
    ["guidance", 5],
    ["guidance", ""],
    ["guidance", { name: 5 }],
    ["guidance", { name: "dipsy", "bad key!": 1 }],
    ["sampler", []],
    ["pairs", true],
    ["shard", "1"],
    ["shard", "a/b"],
    ["shard", 1],
    ["only", "cat:1"],
    ["only", Array.from({ length: 20_000 }, () => "a:1")],
    ["model", "tiny"],
    ["device", "cuda"],
    ["plugins", ["/tmp/evil.ts"]],
    ["ipAdapter", "x"],
    ["nonsense", 1],
  ];
  for (const [field, value] of bad) {
    cases.push(jobCase(`job ${field} = ${JSON.stringify(value)?.slice(0, 30)}`, 400, {
      ...JOB,
      out: "o",
      [field]: value,
    }, field));
  }
  const { data: _, ...noData } = JOB;
  cases.push(
    jobCase("job only of numbers", 400, { ...JOB, out: "o", only: [1] }, "only[0]"),
    jobCase("job without data", 400, { out: "o", ...noData }, "data"),
    jobCase("job without out", 400, JOB, "out"),
    jobCase("job prompt without {c}", 400, { ...JOB, out: "o", prompt: "a photo" }, "prompt"),
    jobCase("job with width but no height", 400, { ...JOB, out: "o", height: null }, "width"),
    jobCase(
      "job unknown guidance plugin",
      400,
      { ...JOB, out: "o", guidance: "dipsy3" },
      "guidance",
    ),
    jobCase("job unknown sampler plugin", 400, { ...JOB, out: "o", sampler: "plms" }, "sampler"),
    jobCase(
      "job unknown pairs plugin",
      400,
      { ...JOB, out: "o", pairs: { name: "nearest" } },
      "pairs",
    ),
    jobCase(
      "job bad guidance option",
      400,
      { ...JOB, out: "o", guidance: { textScale: "x" } },
      "guidance.textScale",
    ),
    jobCase("job bad sampler option", 400, {
      ...JOB,
      out: "o",
      sampler: { name: "ddim", eta: "x" },
    }, "sampler.eta"),
    jobCase("job shard past its count", 400, { ...JOB, out: "o", shard: "2/2" }, "shard"),
    jobCase("job shard of zero", 400, { ...JOB, out: "o", shard: "0/0" }, "shard"),
    jobCase("job data is a file", 400, { ...JOB, out: "o", data: "not-a-folder.txt" }, "data"),
    jobCase("job data missing", 400, { ...JOB, out: "o", data: "missing" }, "data"),
    jobCase("job data ~ is inside the first root", 400, { ...JOB, out: "o", data: "~/" }, "data"),
  );
  // POST /v1/jobs: paths outside the roots.
  const escapes: [string, string][] = [
    ["data", "../"],
    ["data", ".."],
    ["data", "data/../../"],
    ["data", "/etc"],
    ["data", "/"],
    ["data", "escape/etc"],
    ["data", "escape"],
    ["data", `${ROOT}/../x`],
    ["data", `${ROOT}x`],
    ["data", "data\u0000/x"],
    ["out", "../out"],
    ["out", "/tmp/dipsy-escape"],
    ["out", "escape/tmp/x"],
    ["out", "a/../../b"],
    ["similarity", "/etc/passwd"],
    ["similarity", "../similarity.json"],
  ];
  for (const [field, p] of escapes) {
    cases.push(
      jobCase(`job ${field} ${JSON.stringify(p)}`, 403, { ...JOB, out: "o", [field]: p }, field),
    );
  }
  cases.push(
    {
      name: "job list with a token of another case",
      status: 401,
      send: () =>
        call("GET", "/v1/jobs", {
          headers: { authorization: `bearer ${TOKEN.toUpperCase()}` },
          auth: false,
        }),
    },
  );
  return cases;
}

serverTest(
  "server: 200+ malformed requests get the right 4xx and the server keeps serving",
  async () => {
    const cases = badCases();
    assert.ok(cases.length >= 200, `only ${cases.length} cases`);
    // Every route answers errors in the one documented shape.
    const errorSchema = answerSchema(
      (await call("GET", "/openapi.json")).json,
      "post",
      "/v1/jobs",
      400,
    );
    const wrong: string[] = [];
    for (const c of cases) {
      const r = await c.send();
      const status = typeof r === "number" ? r : r.status;
      if (status !== c.status) {
        wrong.push(
          `${c.name}: ${status} (want ${c.status}) ${
            typeof r === "number" ? "" : JSON.stringify(r.json)
          }`,
        );
        continue;
      }
      if (typeof r === "number") continue;
      assert.equal(r.json?.error?.status, c.status, `${c.name}: JSON error body`);
      wrong.push(...breaches(errorSchema, r.json).map((b) => `${c.name}: ${b}`));
      if (c.field !== undefined && c.status !== 401) {
        const fields = (r.json.error.issues ?? []).map((i: { field: string }) => i.field);
        if (!fields.includes(c.field)) {
          wrong.push(
            `${c.name}: issues name ${fields} (want ${c.field})`,
          );
        }
      }
    }
    assert.deepEqual(wrong, [], `${wrong.length} of ${cases.length} wrong:\n${wrong.join("\n")}`);
    assert.equal((await call("GET", "/healthz")).status, 200);
    assert.deepEqual(await queueState(), { running: false, waiting: 0, bound: QUEUE });
    const ok = await call("POST", "/v1/sample", { body: form(SAMPLE) });
    assert.equal(ok.status, 200);
    const entries = await Array.fromAsync(Deno.readDir(ROOT));
    assert.ok(!entries.some((e) => e.name === "o"), "no refused job wrote anything");
  },
);

serverTest(
  "server: a WorkQueue runs in order, bounds the waiting work and drops aborted work",
  async () => {
    const q = new WorkQueue(1);
    const order: number[] = [];
    let release!: () => void;
    const gate = new Promise<void>((r) => release = r);
    const first = q.submit(async () => {
      await gate;
      order.push(1);
    });
    const gone = new AbortController();
    const dropped = q.submit(() => Promise.resolve(order.push(99)), { signal: gone.signal });
    assert.throws(() => q.submit(() => Promise.resolve()), { name: "QueueFullError" });
    gone.abort(new Error("client left"));
    await assert.rejects(dropped, /client left/);
    const second = q.submit(() => Promise.resolve(order.push(2)));
    release();
    await Promise.all([first, second]);
    assert.deepEqual(order, [1, 2]);
    q.close();
    assert.throws(() => q.submit(() => Promise.resolve()), { name: "ClosedError" });
  },
);

serverTest("server: exposure beyond loopback needs a token", async () => {
  assert.ok(isLoopback("127.0.0.1") && isLoopback("::1") && isLoopback("localhost"));
  assert.ok(!isLoopback("0.0.0.0") && !isLoopback("192.168.1.2") && !isLoopback("::"));
  assert.throws(() => checkExposure("0.0.0.0", null), /token/);
  checkExposure("0.0.0.0", TOKEN);
  checkExposure("127.0.0.1", null);
  const env = Deno.env.get("DIPSY_TOKEN");
  Deno.env.delete("DIPSY_TOKEN");
  try {
    await assert.rejects(
      () => startFromSettings(parseServeArgs([...MODEL_FLAGS, "--host", "0.0.0.0"])!, () => {}),
      CliError,
    );
    await Deno.writeTextFile(join(SECRETS, "short"), "abc");
    await assert.rejects(
      () =>
        startFromSettings(
          parseServeArgs([...MODEL_FLAGS, "--token-file", join(SECRETS, "short")])!,
          () => {},
        ),
      /at least 16/,
    );
  } finally {
    if (env !== undefined) Deno.env.set("DIPSY_TOKEN", env);
  }
  assert.throws(() => parseServeArgs(["--queue", "-1"]), CliError);
  assert.throws(() => parseServeArgs(["--port", "70000"]), CliError);
  assert.throws(() => parseServeArgs(["--model", "tiny", "--ip-adapter", "x"]), CliError);
});

serverTest(
  "server: SIGTERM stops after the batch in flight; the run resumes to the same result",
  async () => {
    const out = join(ROOT, "out-sigterm");
    // The child holds each job as its second batch starts until the job is cancelled: the
    // signal comes while the job runs, however fast the machine is.
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        SERVE_CHILD,
        "--hold-batch",
        "1",
        ...MODEL_FLAGS,
        "--port",
        "0",
        "--roots",
        ROOT,
      ],
      env: { DIPSY_TOKEN: TOKEN, OMP_NUM_THREADS: "1" },
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const { url, stderr, release } = await whenListening(child);
    const res = await fetch(`${url}/v1/jobs`, {
      method: "POST",
      headers: { ...AUTH, "content-type": "application/json" },
      body: JSON.stringify({ ...JOB, out: "out-sigterm" }),
    });
    assert.equal(res.status, 202);
    const { id } = await res.json();
    let signalled = false;
    const events = await new Client(url, 0, TOKEN).jobEvents(id, (e) => {
      if (e.event === "image" && !signalled) {
        signalled = true;
        child.kill("SIGTERM");
      }
    });
    const status = await child.status;
    await release();
    assert.equal(status.code, 0, await stderr);
    const last = events.at(-1)!.data;
    assert.equal(last.status, "cancelled");
    // The signal came after the first image: the job stopped after batch 1 or, when the
    // cancel reached it as batch 2 was starting, after that batch.
    assert.ok([2, 4].includes(last.result.written), JSON.stringify(last.result));
    assert.match(await stderr, /SIGTERM: shutting down/);
    await assert.rejects(() => fetch(`${url}/healthz`), "no longer listening");

    const partial = await readTree(out);
    const jpgs = [...partial.keys()].filter((k) => k.endsWith(".jpg"));
    assert.equal(jpgs.length, last.result.written);
    assert.equal(manifestLines(partial).length, jpgs.length);
    const again = await postJob({ ...JOB, out: "out-sigterm" });
    const resumed = (await client.jobEvents(again.json.id)).at(-1)!.data;
    assert.equal(resumed.status, "succeeded");
    assert.equal(resumed.result.skipped, last.result.written);
    assertSameRun(await readTree(out), await readTree(join(ROOT, "out-full")));
  },
);

serverTest(
  "server: shutdown refuses queued work, checkpoints the running job, stops listening",
  async () => {
    // Held as its second batch starts until the shutdown cancels it.
    const held = gate.hold("out-shutdown", 1);
    const hold = await postJob({ ...JOB, out: "out-shutdown" });
    assert.equal(hold.status, 202);
    await held.reached;
    const queued = call("POST", "/v1/sample", { body: form(SAMPLE) });
    await waitFor("the sample to queue", async () => (await queueState()).waiting === 1);
    const stopping = server.shutdown();
    const refused = await queued;
    assert.equal(refused.status, 503);
    assert.match(refused.json.error.message, /shutting down/);
    await stopping;
    await server.finished;
    const job = server.jobs.get(hold.json.id)!;
    assert.equal(job.status, "cancelled");
    assert.equal(job.result!.written, 4, "the batch in flight is finished, no other starts");
    assert.equal(job.result!.remaining, 4);
    const files = await readTree(join(ROOT, "out-shutdown"));
    const jpgs = [...files.keys()].filter((k) => k.endsWith(".jpg"));
    assert.equal(jpgs.length, job.result!.written);
    assert.equal(manifestLines(files).length, jpgs.length);
    await assert.rejects(() => fetch(`${BASE}/healthz`));
    await Deno.remove(ROOT, { recursive: true });
    await Deno.remove(SECRETS, { recursive: true });
  },
);
