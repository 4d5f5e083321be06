/**
 * The HTTP service over core: routes, request checking and the OpenAPI document (built from the
 * schemas that check the requests), and `startServer`, which binds it to an address with the
 * engine behind it. The service adds nothing of its own beyond HTTP: a sample is core's
 * `sampleImage` as `dipsy sample` runs it, a job is core's `generate` as `dipsy generate` runs it.
 *
 * Bad input is refused as early and as cheaply as possible, in this order: 401 (token), 404/405
 * (route), 415 (media type), 413 (declared or actual body size; image size and pixel count before
 * decoding), 400 (malformed body, field errors), 403 (paths outside the roots), 422 (images that
 * do not decode), 503 (queue full, with Retry-After; or shutting down). Requests that never
 * reach a route are answered in the same JSON: malformed HTTP (400), a request head over the
 * limit (431), methods the fetch API cannot carry (TRACE, CONNECT: 401, 404 or 405).
 */
import { Buffer } from "node:buffer";
import { Hono } from "hono";
import denoJson from "../deno.json" with { type: "json" };
import { type ConfigLayer, DEFAULTS } from "../core/config.ts";
import { decodeImage, ImageDecodeError, type ImageFormat, type RgbImage } from "../core/image.ts";
import type { Guidance, Registry, SchedulerConfig } from "../core/plugins.ts";
import { prepareSample, SampleError, sampleSize, type SampleSpec } from "../core/sample.ts";
import { memory } from "../ffi/mod.ts";
import { authorized, checkExposure, isLoopback } from "./auth.ts";
import {
  ClosedError,
  Engine,
  EngineStoppedError,
  type ModelSetup,
  QueueFullError,
  WorkError,
} from "./engine.ts";
import {
  type BeforeBatch,
  type Job,
  JOB_REQUEST,
  type JobEvent,
  JobRequestError,
  jobRequestJson,
  JobStore,
  planJob,
  resolveRoots,
} from "./jobs.ts";
import {
  errorAnswer,
  errorResponse,
  HttpError,
  invalid,
  json,
  readForm,
  readJson,
} from "./body.ts";
import { type HttpServer, serveHttp } from "./http.ts";
import {
  mountPages,
  pageCookieAuthorized,
  pageErrorFor,
  pageGate,
  pageRefusal,
  REPORT_PREFIX,
} from "./pages.ts";
import { API_VERSION, openApi, routeDocs } from "./openapi.ts";
import * as s from "../core/schema.ts";
import { pluginOptionSchemas } from "./openapi.ts";

export { API_VERSION } from "./openapi.ts";
export { HttpError } from "./body.ts";

export interface Limits {
  /** Whole request body of POST /v1/sample. */
  maxBodyBytes: number;
  /** Each uploaded image, encoded. */
  maxImageBytes: number;
  /** Each uploaded image's width x height, read from its header before decoding. */
  maxImagePixels: number;
  /** JSON bodies (POST /v1/jobs). */
  maxJsonBytes: number;
  /** Output width and height. */
  maxSide: number;
  maxSteps: number;
  maxPromptLength: number;
}

export const DEFAULT_LIMITS: Readonly<Limits> = Object.freeze({
  maxBodyBytes: 32 << 20,
  maxImageBytes: 16 << 20,
  maxImagePixels: 40_000_000,
  maxJsonBytes: 1 << 20,
  maxSide: 2048,
  maxSteps: 1000,
  maxPromptLength: 2000,
});

/** Engine refusals and failures as HTTP errors. */
function engineError(e: unknown): HttpError {
  if (e instanceof HttpError) return e;
  if (e instanceof QueueFullError) {
    return new HttpError(503, e.message, [], { "retry-after": String(e.retryAfter) });
  }
  if (e instanceof ClosedError) {
    return new HttpError(503, e.message, [], { "retry-after": "30", connection: "close" });
  }
  if (e instanceof EngineStoppedError) return new HttpError(503, e.message);
  if (e instanceof WorkError && e.user) {
    return new HttpError(400, e.message, e.field ? [{ field: e.field, message: e.message }] : []);
  }
  throw e;
}

// ---------------------------------------------------------------------------------------------
// Sample requests

const GUIDANCE_FIELD = /^guidance\.([A-Za-z_][A-Za-z0-9_]{0,63})$/;
const DEFAULT_GUIDANCE = DEFAULTS.guidance.name;
const DEFAULT_SAMPLER = DEFAULTS.sampler.name;

/**
 * The guidances that need each reference image, as each declares with its default options
 * (`usesImages`, `usesNegative`: which conditionings its formula reads). A guidance that cannot
 * be built without options is left out of both lists.
 */
function imageNeeds(reg: Registry): { all: string[]; positive: string[]; negative: string[] } {
  const all = reg.list("guidance").map((d) => d.name);
  const positive: string[] = [], negative: string[] = [];
  for (const name of all) {
    let g: Guidance;
    try {
      g = reg.create<Guidance>("guidance", name, {});
    } catch {
      continue;
    }
    if (g.usesImages) positive.push(name);
    if (g.usesNegative) negative.push(name);
    (g as Partial<Disposable>)[Symbol.dispose]?.();
  }
  return { all, positive, negative };
}

function needText(names: string[]): string {
  if (names.length === 0) return "used by no guidance";
  const listed = names.map((n) => n === DEFAULT_GUIDANCE ? `${n} (the default)` : n);
  return `required with guidance ${listed.join(", ")}; ignored by the others`;
}

/**
 * JSON Schema for "`field` is required when the guidance is one of `needing`", where a request
 * without a guidance field gets the default one.
 */
function requiredWith(field: string, needing: string[], all: string[]): s.JsonSchema | null {
  const others = all.filter((n) => !needing.includes(n));
  if (needing.includes(DEFAULT_GUIDANCE)) {
    if (others.length === 0) return { required: [field] };
    return {
      if: { required: ["guidance"], properties: { guidance: { enum: others } } },
      else: { required: [field] },
    };
  }
  if (needing.length === 0) return null;
  return {
    if: { required: ["guidance"], properties: { guidance: { enum: needing } } },
    then: { required: [field] },
  };
}

function sampleForm(reg: Registry, limits: Limits) {
  const names = (kind: "guidance" | "sampler") => reg.list(kind).map((d) => d.name);
  const needs = imageNeeds(reg);
  const side = (what: string) =>
    s.optional(s.integer({
      min: 8,
      max: limits.maxSide,
      description: `output ${what} in pixels (a multiple of the VAE factor, 8 for SD1.5); ` +
        "default: the model's",
    }));
  const form = s.object({
    prompt: s.required(s.string({ maxLength: limits.maxPromptLength, description: "text prompt" })),
    seed: s.required(s.integer({
      min: 0,
      description: "initial-noise seed (as torch.Generator().manual_seed(seed) on the CPU)",
    })),
    positive: s.optional(s.binary({
      description: `positive reference image: ${needText(needs.positive)}`,
      mediaType: "image/*",
    })),
    negative: s.optional(s.binary({
      description: `negative reference image: ${needText(needs.negative)}`,
      mediaType: "image/*",
    })),
    guidance: s.optional(s.string({
      enum: names("guidance"),
      default: DEFAULT_GUIDANCE,
      description: "guidance plugin",
    })),
    guidanceOptions: s.optional(s.record(s.jsonValue({ maxLength: 1000 }), {
      maxKeys: 32,
      description: 'guidance options as a JSON object, e.g. {"textScale": 7.5, ' +
        '"negativeScale": 4}; single options may also be sent as fields "guidance.<option>"',
    })),
    sampler: s.optional(s.string({
      enum: names("sampler"),
      default: DEFAULT_SAMPLER,
      description: "sampler plugin",
    })),
    steps: s.optional(s.integer({
      min: 1,
      max: limits.maxSteps,
      default: DEFAULTS.steps,
      description: "denoising steps",
    })),
    width: side("width"),
    height: side("height"),
    format: s.optional(s.string({
      enum: ["png", "jpeg", "webp"],
      default: "png",
      description: "encoding of the image",
    })),
    response: s.optional(s.string({
      enum: ["image", "json"],
      default: "image",
      description: "image: the encoded image; json: { image: <base64>, ... } (so does " +
        "Accept: application/json)",
    })),
  }, { extra: (k) => GUIDANCE_FIELD.test(k) });
  // Which images are required depends on the guidance: said in the document as conditions, and
  // so are the options each guidance takes (its schema, which checks them).
  const conditions = [
    requiredWith("positive", needs.positive, needs.all),
    requiredWith("negative", needs.negative, needs.all),
    ...pluginOptionSchemas(reg, "guidance", DEFAULT_GUIDANCE, "guidanceOptions"),
  ].filter((c) => c !== null);
  return {
    form,
    json: (): s.JsonSchema => ({
      ...form.jsonSchema(),
      ...(conditions.length ? { allOf: conditions } : {}),
    }),
  };
}

/** Option values of "guidance.<option>" fields: JSON when they parse, text otherwise. */
function guidanceFields(fields: Record<string, FormDataEntryValue>): {
  options: Record<string, unknown>;
  issues: s.Issue[];
} {
  const options: Record<string, unknown> = {};
  const issues: s.Issue[] = [];
  for (const [k, v] of Object.entries(fields)) {
    const m = GUIDANCE_FIELD.exec(k);
    if (!m) continue;
    if (typeof v !== "string") {
      issues.push({ field: k, message: "must be a text field, not a file upload" });
    } else if (v.length > 1000) {
      issues.push({ field: k, message: "is too long" });
    } else {
      try {
        options[m[1]] = JSON.parse(v);
      } catch {
        options[m[1]] = v;
      }
    }
  }
  return { options, issues };
}

function wantsJson(req: Request, field: string | undefined): boolean {
  if (field) return field === "json";
  const first = (req.headers.get("accept") ?? "").split(",")[0].split(";")[0].trim();
  return first.toLowerCase() === "application/json";
}

let sharpModule: Promise<typeof import("sharp").default> | undefined;

/** Size limits and a header check before the image is decoded, then core's decoder. */
async function loadImage(file: File, field: string, limits: Limits): Promise<RgbImage> {
  if (file.size > limits.maxImageBytes) {
    throw new HttpError(
      413,
      `${field} is ${file.size} bytes; the limit is ${limits.maxImageBytes}`,
      [
        { field, message: `is over the limit of ${limits.maxImageBytes} bytes` },
      ],
    );
  }
  const bytes = new Uint8Array(await file.arrayBuffer());
  const undecodable = (why: string) =>
    new HttpError(422, `${field}: ${why}`, [{ field, message: why }]);
  if (bytes.length === 0) throw undecodable("the file is empty");
  sharpModule ??= import("sharp").then((m) => m.default);
  const sharp = await sharpModule;
  let meta: { width?: number; height?: number };
  try {
    meta = await sharp(bytes, { limitInputPixels: false }).metadata();
  } catch {
    throw undecodable("not an image in a supported format (JPEG, PNG, WebP, GIF, TIFF, AVIF)");
  }
  const pixels = (meta.width ?? 0) * (meta.height ?? 0);
  if (pixels > limits.maxImagePixels) {
    const msg = `is ${meta.width}x${meta.height} pixels; the limit is ${limits.maxImagePixels}`;
    throw new HttpError(413, `${field} ${msg}`, [{ field, message: msg }]);
  }
  try {
    return await decodeImage(bytes, field);
  } catch (e) {
    if (e instanceof ImageDecodeError) throw undecodable(e.message);
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// The app

export interface AppOptions {
  engine: Engine;
  jobs: JobStore;
  /** Required on every request but /healthz when set. */
  token: string | null;
  limits: Limits;
  registry: Registry;
  /** The scheduler config of the loaded model (for checking sampler options early). */
  schedulerConfig: SchedulerConfig;
  /** The server's generate settings (models, device, dtype) and the allowed roots. */
  base: ConfigLayer;
  roots: readonly string[];
}

function sseMessage(e: JobEvent | { event: "end"; data: unknown }): string {
  return `event: ${e.event}\ndata: ${JSON.stringify(e.data)}\n\n`;
}

/** A job's events; ends after its final status. */
function eventStream(job: Job, signal: AbortSignal): Response {
  const encoder = new TextEncoder();
  let cleanup = () => {};
  const body = new ReadableStream<Uint8Array>({
    start(controller) {
      let open = true;
      const send = (text: string) => {
        if (open) controller.enqueue(encoder.encode(text));
      };
      const close = () => {
        if (!open) return;
        send(sseMessage({ event: "end", data: job.view() }));
        open = false;
        cleanup();
        controller.close();
      };
      const unsubscribe = job.subscribe((e) => {
        send(sseMessage(e));
        if (e.event === "status" && job.final) close();
      });
      // Proxies drop connections that stay silent; a comment line every 15 s keeps it open.
      const ping = setInterval(() => send(": ping\n\n"), 15_000);
      const onAbort = () => {
        if (!open) return;
        open = false;
        cleanup();
        controller.close();
      };
      signal.addEventListener("abort", onAbort);
      cleanup = () => {
        unsubscribe();
        clearInterval(ping);
        signal.removeEventListener("abort", onAbort);
      };
      send("retry: 2000\n\n");
      send(sseMessage({ event: "status", data: job.view() }));
      if (job.final) close();
    },
    cancel() {
      cleanup();
    },
  });
  return new Response(body, {
    headers: {
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-cache",
      "x-accel-buffering": "no",
    },
  });
}

const JOB_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** Whether a Host header names this machine's loopback (a name or address, any port). */
function loopbackHost(host: string): boolean {
  const m = /^(\[[0-9A-Fa-f:.]+\]|[^:[\]]+)(?::\d{1,5})?$/.exec(host.trim());
  return m !== null && isLoopback(m[1]);
}

/** The Hono app and its OpenAPI document. */
export function createApp(o: AppOptions): {
  app: Hono;
  openapi: Record<string, unknown>;
  /**
   * The answer for a method and target no route takes (401 first when a token is required,
   * then 404 or 405), for requests that cannot become a fetch Request.
   */
  unrouted: (method: string, target: string, authorization?: string) => Response;
} {
  const { engine, jobs, limits, registry: reg } = o;
  const { form, json: sampleJson } = sampleForm(reg, limits);
  const docs = routeDocs(sampleJson(), jobRequestJson(reg));
  const doc = openApi(docs, o.token !== null);
  const app = new Hono();

  app.onError((e) => {
    if (e instanceof HttpError) return errorResponse(e);
    console.error(e);
    return errorResponse(new HttpError(500, `internal error: ${e.message}`));
  });

  // 404 for unknown paths; 405 (with Allow) for known paths with another method.
  const patterns = docs.map((d) => ({
    method: d.method.toUpperCase(),
    re: new RegExp(`^${d.path.replace(/\{\w+\}/g, "[^/]+")}$`),
  }));
  const unrouted = (method: string, target: string): Response => {
    const path = target.startsWith("/") ? new URL(target, "http://x").pathname : target;
    const allowed = patterns.filter((p) => p.re.test(path)).map((p) => p.method);
    if (allowed.length) {
      return errorResponse(
        new HttpError(405, `${method} is not allowed on ${path}`, [], {
          allow: [...new Set(allowed)].join(", "),
        }),
      );
    }
    return errorResponse(new HttpError(404, `no route ${method} ${path}`));
  };
  app.notFound((c) => unrouted(c.req.method, new URL(c.req.url).pathname));

  const unauthorized = (path: string, authorization: string | undefined): Response | null => {
    // A report's own requests carry its key instead (see server/pages.ts).
    if (
      o.token === null || path === "/healthz" || path.startsWith(REPORT_PREFIX) ||
      authorized(authorization, o.token)
    ) return null;
    return errorResponse(
      new HttpError(401, "missing or wrong bearer token (Authorization: Bearer <token>)", [], {
        "www-authenticate": 'Bearer realm="dipsy"',
      }),
    );
  };
  if (o.token === null) {
    // Without a token, a name that only resolves here is the guard: a web page whose own name
    // is made to resolve to this machine (DNS rebinding) still sends that name.
    app.use("*", async (c, next) => {
      const host = c.req.header("host");
      if (host !== undefined && !loopbackHost(host)) {
        const message = `Host ${JSON.stringify(host)} is not a name of this server: without a ` +
          "token it answers only to localhost, 127.0.0.0/8 and [::1]";
        return pageErrorFor(c.req.raw, 421, message) ??
          errorResponse(new HttpError(421, message));
      }
      await next();
    });
  } else {
    const token = o.token;
    app.use("*", async (c, next) => {
      const answered = pageGate(c.req.raw, token);
      if (answered) return answered;
      // Pages and their own API calls (an EventSource sends no header) carry the page cookie.
      if (!pageCookieAuthorized(c.req.raw, token)) {
        const refused = unauthorized(new URL(c.req.url).pathname, c.req.header("authorization"));
        if (refused) return pageRefusal(c.req.raw) ?? refused;
      }
      await next();
    });
  }

  app.get("/healthz", () => {
    if (engine.failure) {
      return json({ status: "failing", error: engine.failure.message }, 503);
    }
    return json({ status: "ok" });
  });

  app.get("/openapi.json", () => json(doc));

  app.get("/v1/info", () => {
    const plugins = (kind: "guidance" | "sampler" | "pairs") =>
      reg.list(kind).map((d) => ({
        name: d.name,
        description: d.description,
        options: Object.fromEntries(reg.docs(kind, d.name).map(({ name, ...doc }) => [name, doc])),
      }));
    const info = engine.info;
    return json({
      version: {
        dipsy: (denoJson as { version?: string }).version ?? "unreleased",
        api: API_VERSION,
        deno: Deno.version.deno,
        libtorch: info.libtorch,
      },
      models: info.modelIds,
      device: info.device,
      dtype: info.dtype,
      adapters: info.adapters,
      defaultSize: info.defaultSize,
      plugins: {
        guidance: plugins("guidance"),
        sampler: plugins("sampler"),
        pairs: plugins("pairs"),
      },
      queue: {
        running: engine.queue.running,
        waiting: engine.queue.waiting,
        bound: engine.queue.bound,
      },
      memory: (() => {
        const m = memory(), process = Deno.memoryUsage();
        return {
          residentBytes: process.rss,
          heapBytes: process.heapUsed,
          liveTensors: m.processHandles,
          tensorBytes: m.processBytes,
        };
      })(),
      jobs: { roots: o.roots },
      limits,
    });
  });

  app.post("/v1/sample", async (c) => {
    const req = c.req.raw;
    const fields = await readForm(req, limits.maxBodyBytes);
    const checked = s.validate(form, fields, { text: true });
    const dotted = guidanceFields(fields);
    const issues = [...(checked.ok ? [] : checked.issues), ...dotted.issues];
    if (!checked.ok || issues.length) throw invalid(issues);
    const v = checked.value;
    for (const k of Object.keys(dotted.options)) {
      if (v.guidanceOptions && k in v.guidanceOptions) {
        issues.push({ field: `guidance.${k}`, message: "is also given in guidanceOptions" });
      }
    }
    if (issues.length) throw invalid(issues);
    const spec: SampleSpec = {
      prompt: v.prompt,
      seed: v.seed,
      guidance: v.guidance ?? DEFAULT_GUIDANCE,
      guidanceOptions: { ...v.guidanceOptions, ...dotted.options },
      sampler: v.sampler ?? DEFAULT_SAMPLER,
      steps: v.steps ?? DEFAULTS.steps,
      width: v.width ?? null,
      height: v.height ?? null,
    };
    let prepared;
    let size;
    try {
      prepared = prepareSample(spec, {
        positive: v.positive !== undefined,
        negative: v.negative !== undefined,
      }, { registry: reg, schedulerConfig: o.schedulerConfig });
      size = sampleSize(engine.info, spec);
    } catch (e) {
      if (e instanceof SampleError) throw invalid([{ field: e.field, message: e.message }]);
      throw e;
    }
    if (prepared.adapters > engine.info.adapters) {
      throw invalid([{
        field: "guidance",
        message: `guidance "${spec.guidance}" needs ${prepared.adapters} IP-Adapter(s); the ` +
          `loaded model has ${engine.info.adapters}`,
      }]);
    }
    const used = (k: "positive" | "negative") => !prepared.ignored.includes(k) && v[k];
    const positive = used("positive") ? await loadImage(v.positive!, "positive", limits) : null;
    const negative = used("negative") ? await loadImage(v.negative!, "negative", limits) : null;
    const format = (v.format ?? "png") as ImageFormat;
    let bytes: Uint8Array<ArrayBuffer>;
    try {
      bytes = await engine.sample(spec, { positive, negative }, format, { signal: req.signal });
    } catch (e) {
      if (req.signal.aborted && e === req.signal.reason) {
        // The client is gone; nobody reads this.
        return new Response(null, { status: 499 });
      }
      throw engineError(e);
    }
    const mime = `image/${format}`;
    if (wantsJson(req, v.response)) {
      return json({
        image: Buffer.from(bytes).toString("base64"),
        mediaType: mime,
        ...spec,
        width: size.width,
        height: size.height,
        ignored: prepared.ignored,
      });
    }
    return new Response(bytes, {
      headers: {
        "content-type": mime,
        "content-length": String(bytes.length),
        "content-disposition": `inline; filename="sample-${spec.seed}.${
          format === "jpeg" ? "jpg" : format
        }"`,
      },
    });
  });

  app.post("/v1/jobs", async (c) => {
    const body = await readJson(c.req.raw, limits.maxJsonBytes);
    const checked = s.validate(JOB_REQUEST, body);
    if (!checked.ok) throw invalid(checked.issues);
    let job: Job;
    try {
      const plan = await planJob(checked.value, {
        base: o.base,
        roots: o.roots,
        defaultSize: engine.info.defaultSize,
        schedulerConfig: o.schedulerConfig,
        registry: reg,
      });
      job = jobs.start(plan);
    } catch (e) {
      if (e instanceof JobRequestError) {
        throw e.status === 400 ? invalid(e.issues) : new HttpError(e.status, e.message, e.issues);
      }
      throw engineError(e);
    }
    return json(job.view(), 202, { location: `/v1/jobs/${job.id}` });
  });

  app.get("/v1/jobs", () => json({ jobs: jobs.list().map((j) => j.view()) }));

  const findJob = (id: string): Job => {
    const job = JOB_ID.test(id) ? jobs.get(id) : undefined;
    if (!job) throw new HttpError(404, `no job ${id}`);
    return job;
  };

  app.get("/v1/jobs/:id", (c) => json(findJob(c.req.param("id")).view()));

  app.get("/v1/jobs/:id/events", (c) => eventStream(findJob(c.req.param("id")), c.req.raw.signal));

  app.delete("/v1/jobs/:id", (c) => {
    const job = findJob(c.req.param("id"));
    if (job.final) throw new HttpError(409, `job ${job.id} has finished already (${job.status})`);
    jobs.cancel(job);
    return json(job.view(), 202);
  });

  mountPages(app, { jobs, roots: o.roots });

  return {
    app,
    openapi: doc,
    unrouted: (method, target, authorization) =>
      unauthorized(
        target.startsWith("/") ? new URL(target, "http://x").pathname : target,
        authorization,
      ) ?? unrouted(method, target),
  };
}

// ---------------------------------------------------------------------------------------------
// The server

export interface ServerOptions {
  hostname: string;
  /** 0: any free port. */
  port: number;
  token: string | null;
  /** Folders /v1/jobs may read and write in. */
  roots: readonly string[];
  queue: number;
  limits?: Partial<Limits>;
  setup: ModelSetup;
  /** The server's settings as a generate configuration layer (models, device, dtype). */
  base: ConfigLayer;
  schedulerConfig: SchedulerConfig;
  registry: Registry;
  log?: (message: string) => void;
  /** Largest request head (request line and headers) in bytes (default 16 KiB). */
  maxHeadBytes?: number;
  /** Holds each job as each of its batches starts: for tests, never set by `dipsy serve`. */
  beforeBatch?: BeforeBatch;
}

export interface RunningServer {
  url: string;
  port: number;
  engine: Engine;
  jobs: JobStore;
  openapi: Record<string, unknown>;
  /**
   * Stops accepting, fails queued work (503), lets a running sample finish and a running job
   * finish and write its batch in flight, then closes. Idempotent.
   */
  shutdown(): Promise<void>;
  /** Resolves once the server has shut down. */
  finished: Promise<void>;
}

export async function startServer(o: ServerOptions): Promise<RunningServer> {
  checkExposure(o.hostname, o.token);
  const log = o.log ?? ((m: string) => console.error(m));
  const roots = await resolveRoots(o.roots);
  const limits: Limits = { ...DEFAULT_LIMITS, ...o.limits };
  // libvips' operation cache (one for the process, the engine's thread included) keeps recent
  // images for reuse, which never comes for uploads that are new each time: off, so that memory
  // follows the work in hand.
  sharpModule ??= import("sharp").then((m) => m.default);
  (await sharpModule).cache(false);
  const engine = await Engine.start(o.setup, { queue: o.queue });
  const jobs = new JobStore(engine, undefined, o.beforeBatch);
  const { app, openapi, unrouted } = createApp({
    engine,
    jobs,
    token: o.token,
    limits,
    registry: o.registry,
    schedulerConfig: o.schedulerConfig,
    base: o.base,
    roots,
  });
  let server: HttpServer;
  try {
    server = await serveHttp((req) => app.fetch(req), {
      hostname: o.hostname,
      port: o.port,
      maxHeadBytes: o.maxHeadBytes,
      onError: (e) => {
        console.error(e);
        return json({ error: { status: 500, message: "internal error" } }, 500);
      },
      onClientError: (status, message) =>
        errorAnswer(new HttpError(status, message, [], { connection: "close" })),
      onMethod: unrouted,
    });
  } catch (e) {
    await engine.close();
    throw e;
  }
  const { port } = server;
  const host = o.hostname.includes(":") ? `[${o.hostname}]` : o.hostname;
  let stopping: Promise<void> | null = null;
  const shutdown = () =>
    stopping ??= (async () => {
      const closing = server.close();
      engine.queue.close();
      const running = jobs.list().filter((j) => !j.final);
      if (running.length) log(`stopping ${running.length} job(s) after their batch in flight`);
      await jobs.stopAll("stopped: the server is shutting down (the same request resumes it)");
      await engine.close();
      // Answers are out; keep-alive connections that clients hold open idle end now.
      const timer = setTimeout(() => server.closeAll(), 1000);
      await closing;
      clearTimeout(timer);
    })();
  return {
    url: `http://${host}:${port}`,
    port,
    engine,
    jobs,
    openapi,
    shutdown,
    finished: server.finished.then(() => stopping ?? undefined),
  };
}
