/**
 * Helpers shared by the HTTP server tests: a client for a running server (fetch calls, raw
 * HTTP/1.1 exchanges for what fetch will not send, server-sent events), multipart forms, the
 * checks that two run folders hold the same run, and a gate that holds jobs between batches so
 * that a test acts at a known point of a run instead of racing it.
 */
import assert from "node:assert/strict";
import { basename } from "node:path";
import type { Job } from "../server/jobs.ts";

/** The tiny models on the CPU in f32: the same bytes on every machine. */
export const MODEL_FLAGS = ["--model", "tiny", "--device", "cpu", "--dtype", "f32"];

/**
 * Server tests share one server and its worker across tests, which the per-test op and resource
 * sanitizers would count as leaks; every test closes what it opens itself.
 */
export function serverTest(name: string, fn: () => Promise<void>) {
  Deno.test({ name, fn, sanitizeOps: false, sanitizeResources: false });
}

export interface Reply {
  status: number;
  headers: Headers;
  bytes: Uint8Array;
  // deno-lint-ignore no-explicit-any
  json: any;
}

export interface SseEvent {
  event: string;
  // deno-lint-ignore no-explicit-any
  data: any;
}

/** What came back on a raw connection: the final answer's status (0: none) and its body. */
export interface RawReply {
  status: number;
  /** Statuses of interim answers (100 Continue). */
  interim: number[];
  headers: Record<string, string>;
  body: string;
  // deno-lint-ignore no-explicit-any
  json: any;
  /** Everything the server sent, as latin1 text. */
  text: string;
}

export interface RawOptions {
  /** The body, sent after the head; a function writes it itself (chunks, pauses, a cut). */
  body?:
    | Uint8Array
    | string
    | ((write: (b: Uint8Array | string) => Promise<void>) => Promise<void>);
  /** After the body: "read" (default) reads the answer; "half" half-closes first, then reads;
   * "hang-up" closes the connection without reading (a client that gives up). */
  then?: "read" | "half" | "hang-up";
  /** Read until the server closes the connection, not just the first whole answer. */
  untilClosed?: boolean;
}

const encoder = new TextEncoder();
const RAW_DEADLINE_MS = 120_000;
const bytesOf = (b: Uint8Array | string) => typeof b === "string" ? encoder.encode(b) : b;

/** Parses the first final answer of a raw HTTP/1.1 exchange; `complete` once it is all there. */
function parseRaw(bytes: Uint8Array): Omit<RawReply, "text"> & { complete: boolean } {
  const text = new TextDecoder().decode(bytes);
  const interim: number[] = [];
  let rest = text;
  for (;;) {
    const m = /^HTTP\/1\.[01] (\d{3})[^\r\n]*\r\n/.exec(rest);
    const end = rest.indexOf("\r\n\r\n");
    if (!m || end < 0) {
      return { status: 0, interim, headers: {}, body: "", json: null, complete: false };
    }
    const headers: Record<string, string> = {};
    for (const line of rest.slice(m[0].length, end).split("\r\n")) {
      const i = line.indexOf(":");
      if (i > 0) headers[line.slice(0, i).trim().toLowerCase()] = line.slice(i + 1).trim();
    }
    const status = Number(m[1]);
    rest = rest.slice(end + 4);
    if (status >= 100 && status < 200) {
      interim.push(status);
      continue;
    }
    let body = rest;
    let complete = false;
    if (headers["transfer-encoding"] === "chunked") {
      body = "";
      for (let r = rest;;) {
        const cut = r.indexOf("\r\n");
        if (cut < 0) break;
        const size = parseInt(r.slice(0, cut), 16);
        if (size === 0) complete = true;
        if (!(size > 0)) break;
        body += r.slice(cut + 2, cut + 2 + size);
        r = r.slice(cut + 2 + size + 2);
      }
    } else if (headers["content-length"] !== undefined) {
      const length = Number(headers["content-length"]);
      complete = encoder.encode(rest).length >= length;
      body = rest.slice(0, length);
    }
    let json = null;
    if ((headers["content-type"] ?? "").startsWith("application/json")) {
      try {
        json = JSON.parse(body);
      } catch { /* left null: the test says what it expected */ }
    }
    return { status, interim, headers, body, json, complete };
  }
}

function concat(parts: Uint8Array[]): Uint8Array {
  const all = new Uint8Array(parts.reduce((n, r) => n + r.length, 0));
  let off = 0;
  for (const r of parts) {
    all.set(r, off);
    off += r.length;
  }
  return all;
}

/** A client of one running server. */
export class Client {
  constructor(readonly base: string, readonly port: number, readonly token: string | null) {}

  get auth(): Record<string, string> {
    return this.token ? { authorization: `Bearer ${this.token}` } : {};
  }

  async call(
    method: string,
    path: string,
    opts: { body?: BodyInit; headers?: Record<string, string>; auth?: boolean } = {},
  ): Promise<Reply> {
    const res = await fetch(this.base + path, {
      method,
      body: opts.body,
      headers: { ...(opts.auth === false ? {} : this.auth), ...opts.headers },
    });
    const bytes = new Uint8Array(await res.arrayBuffer());
    let json = null;
    if ((res.headers.get("content-type") ?? "").startsWith("application/json")) {
      json = JSON.parse(new TextDecoder().decode(bytes));
    }
    return { status: res.status, headers: res.headers, bytes, json };
  }

  postJob(body: unknown): Promise<Reply> {
    return this.call("POST", "/v1/jobs", {
      body: JSON.stringify(body),
      headers: { "content-type": "application/json" },
    });
  }

  async queue(): Promise<{ running: boolean; waiting: number; bound: number }> {
    return (await this.call("GET", "/v1/info")).json.queue;
  }

  /**
   * A raw HTTP/1.1 exchange on a new connection: `head` (lines joined with CRLF, the blank line
   * added), then the body. The answer is read while the body is still being sent, as a client
   * that watches for an early refusal does.
   */
  async raw(head: string, opts: RawOptions = {}): Promise<RawReply> {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: this.port });
    const received: Uint8Array[] = [];
    const reading = (async () => {
      const buf = new Uint8Array(1 << 16);
      try {
        for (;;) {
          const n = await conn.read(buf);
          if (n === null) break;
          received.push(buf.slice(0, n));
          // A whole answer is enough: a kept-alive connection would stay open.
          if (!opts.untilClosed && parseRaw(concat(received)).complete) break;
        }
      } catch { /* a reset ends the answer too */ }
    })();
    const write = async (b: Uint8Array | string) => {
      const bytes = bytesOf(b);
      for (let off = 0; off < bytes.length;) off += await conn.write(bytes.subarray(off));
    };
    const then = opts.then ?? "read";
    // A safety net, never a pace: a server that stops reading or answering fails the test
    // instead of hanging it.
    let stuck = false;
    const deadline = setTimeout(() => {
      stuck = true;
      conn.close();
    }, RAW_DEADLINE_MS);
    try {
      try {
        await write(head.replaceAll("\r\n", "\n").replaceAll("\n", "\r\n") + "\r\n\r\n");
        if (typeof opts.body === "function") await opts.body(write);
        else if (opts.body !== undefined) await write(opts.body);
      } catch { /* the server closed its side: what it answered is read below */ }
      if (then === "hang-up") {
        conn.close();
        await reading;
        return { status: 0, interim: [], headers: {}, body: "", json: null, text: "" };
      }
      if (then === "half") await conn.closeWrite().catch(() => {});
      await reading;
    } finally {
      clearTimeout(deadline);
      try {
        conn.close();
      } catch { /* closed already */ }
    }
    if (stuck) throw new Error(`no whole answer within ${RAW_DEADLINE_MS / 1000} s: ${head}`);
    const all = concat(received);
    const { complete: _, ...reply } = parseRaw(all);
    return { ...reply, text: new TextDecoder("latin1").decode(all) };
  }

  /** A job's server-sent events until the stream ends; `onEvent` may act on each as it comes. */
  async jobEvents(
    id: string,
    onEvent: (e: SseEvent) => void | Promise<void> = () => {},
  ): Promise<SseEvent[]> {
    const res = await fetch(`${this.base}/v1/jobs/${id}/events`, { headers: this.auth });
    assert.equal(res.status, 200);
    assert.match(res.headers.get("content-type")!, /^text\/event-stream/);
    const events: SseEvent[] = [];
    let buffer = "";
    const decoder = new TextDecoder();
    for await (const chunk of res.body!) {
      buffer += decoder.decode(chunk, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const event = /^event: (.*)$/m.exec(block)?.[1];
        const data = /^data: (.*)$/m.exec(block)?.[1];
        if (!event || data === undefined) continue;
        const e = { event, data: JSON.parse(data) };
        events.push(e);
        await onEvent(e);
      }
    }
    return events;
  }
}

/** A `dipsy serve` child that has said where it listens. */
export interface Listening {
  url: string;
  /** Everything the child writes to stderr, once it exits. */
  stderr: Promise<string>;
  /** Frees the child's stdout; call it once the child has exited. */
  release(): Promise<void>;
}

/**
 * Reads the stdout of `child` (a `dipsy serve` with stdout and stderr piped) until it says where
 * it listens. Its stderr is drained from the start, so a chatty child never blocks on the pipe,
 * and an early exit fails with what the child said.
 */
export async function whenListening(child: Deno.ChildProcess): Promise<Listening> {
  const stderr = new Response(child.stderr).text();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let out = "";
  while (!/listening on (\S+)/.test(out)) {
    const { value, done } = await lines.read();
    if (done) throw new Error(`serve ended early: ${out}\n${await stderr}`);
    out += value;
  }
  return {
    url: /listening on (\S+)/.exec(out)![1],
    stderr,
    async release() {
      lines.releaseLock();
      await child.stdout.cancel().catch(() => {});
    },
  };
}

/** A multipart form; byte fields become PNG file uploads named after the field. */
export function form(fields: Record<string, string | Uint8Array>): FormData {
  const f = new FormData();
  for (const [k, v] of Object.entries(fields)) {
    if (typeof v === "string") f.append(k, v);
    else f.append(k, new Blob([v as Uint8Array<ArrayBuffer>], { type: "image/png" }), `${k}.png`);
  }
  return f;
}

/** The encoded multipart body of `form` and its content type, as fetch would send them. */
export async function encodeForm(f: FormData): Promise<{ body: Uint8Array; type: string }> {
  const req = new Request("http://x/", { method: "POST", body: f });
  return {
    body: new Uint8Array(await req.arrayBuffer()),
    type: req.headers.get("content-type")!,
  };
}

/** The sorted lines of a run folder's manifest. */
export function manifestLines(files: Map<string, Uint8Array>): string[] {
  return new TextDecoder().decode(files.get("manifest.jsonl")).split("\n").filter((l) => l).sort();
}

/** Same images, same manifest lines, no temporary files. */
export function assertSameRun(actual: Map<string, Uint8Array>, expected: Map<string, Uint8Array>) {
  const jpgs = (m: Map<string, Uint8Array>) => [...m.keys()].filter((k) => k.endsWith(".jpg"));
  assert.deepEqual(jpgs(actual).sort(), jpgs(expected).sort());
  for (const k of jpgs(expected)) assert.deepEqual(actual.get(k), expected.get(k), `${k} differs`);
  assert.deepEqual(manifestLines(actual), manifestLines(expected));
  assert.deepEqual([...actual.keys()].filter((k) => k.endsWith(".tmp")), [], "temporary files");
}

/**
 * Waits for a condition the test itself brought about (a request it sent entering the queue),
 * never for a run to get somewhere: runs are held with a BatchGate instead.
 */
export async function waitFor(
  what: string,
  test: () => boolean | Promise<boolean>,
  ms = 60_000,
): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await test())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

export interface Hold {
  /** Resolves with the job once it is held at the start of the batch. */
  reached: Promise<Job>;
  /** Lets the job go on (so does cancelling it). */
  release(): void;
}

/**
 * The server's `beforeBatch` hook for tests: a job whose output folder is named `out` stops at
 * the start of batch `batch` (after deciding to run it) until the test releases it or the job
 * is cancelled. Other jobs and batches pass straight through.
 */
export class BatchGate {
  readonly #holds = new Map<
    string,
    { batch: number; arrive: (j: Job) => void; gone: Promise<void> }
  >();

  readonly hook = async (job: Job, batch: number): Promise<void> => {
    const key = basename(job.plan.config.out!);
    const h = this.#holds.get(key);
    if (!h || h.batch !== batch) return;
    this.#holds.delete(key);
    h.arrive(job);
    const signal = job.controller.signal;
    const cancelled = new Promise<void>((resolve) => {
      if (signal.aborted) resolve();
      else signal.addEventListener("abort", () => resolve(), { once: true });
    });
    await Promise.race([h.gone, cancelled]);
  };

  /** Holds the next job writing to a folder named `out` when it starts batch `batch`. */
  hold(out: string, batch: number): Hold {
    let arrive!: (j: Job) => void, release!: () => void;
    const reached = new Promise<Job>((r) => arrive = r);
    const gone = new Promise<void>((r) => release = r);
    this.#holds.set(out, { batch, arrive, gone });
    return { reached, release };
  }
}
