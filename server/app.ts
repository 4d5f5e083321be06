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
import { type ConfigLayer, DEFAULTS, RUN_FIELDS } from "../core/config.ts";
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
  capped,
  type Job,
  JOB_REQUEST,
  type JobEvent,
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

const STEPS_BOUND = RUN_FIELDS.shape.steps.schema.jsonSchema().maximum as number;

const DEFAULT_LIMITS = Object.freeze({
  /** Whole request body of POST /v1/sample. */
  maxBodyBytes: 32 << 20,
  /** Each uploaded image, encoded. */
  maxImageBytes: 16 << 20,
  /** Each uploaded image's width x height, read from its header before decoding. */
  maxImagePixels: 40_000_000,
  /** JSON bodies (POST /v1/jobs). */
  maxJsonBytes: 1 << 20,
  /** Output width and height. */
  maxSide: 2048,
  /** At most the steps setting's own bound (a larger cap would be advertised, never reached). */
  maxSteps: STEPS_BOUND,
  maxPromptLength: 2000,
});

export type Limits = { -readonly [K in keyof typeof DEFAULT_LIMITS]: number };

/** HTTP errors, and sample, engine and work errors as HTTP errors; null for anything else. */
function httpError(e: unknown): HttpError | null {
  if (e instanceof HttpError) return e;
  if (e instanceof SampleError) return invalid([{ field: e.field, message: e.message }]);
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
  return null;
}

// ---------------------------------------------------------------------------------------------
// Sample requests

const GUIDANCE_FIELD = /^guidance\.([A-Za-z_][A-Za-z0-9_]{0,63})$/;
const DEFAULT_GUIDANCE = DEFAULTS.guidance.name;

/**
 * What each guidance asks of a request, as it declares with its default options (`usesImages`,
 * `usesNegative`: which conditionings its formula reads): the guidances that need each reference
 * image, and for the document one condition per guidance: when the request names it (or names
 * none and it is the default), the images it reads are required and guidanceOptions follows its
 * option schema. A guidance that cannot be built without options requires no image.
 */
function guidanceNeeds(reg: Registry) {
  const needs = reg.list("guidance").map((d) => {
    const images: string[] = [];
    try {
      const g = reg.create<Guidance>("guidance", d.name, {});
      if (g.usesImages) images.push("positive");
      if (g.usesNegative) images.push("negative");
      (g as Partial<Disposable>)[Symbol.dispose]?.();
    } catch { /* it needs options: no image is required without them */ }
    return { ...d, images };
  });
  const needing = (image: string) =>
    needs.filter((n) => n.images.includes(image)).map((n) => n.name);
  return {
    positive: needing("positive"),
    negative: needing("negative"),
    conditions: needs.map((n): s.JsonSchema => ({
      if: {
        ...(n.name === DEFAULT_GUIDANCE ? {} : { required: ["guidance"] }),
        properties: { guidance: { enum: [n.name] } },
      },
      then: { required: n.images, properties: { guidanceOptions: n.schema.jsonSchema() } },
    })),
  };
}

function needText(names: string[]): string {
  if (names.length === 0) return "used by no guidance";
  const listed = names.map((n) => n === DEFAULT_GUIDANCE ? `${n} (the default)` : n);
  return `required with guidance ${listed.join(", ")}; ignored by the others`;
}

function sampleForm(reg: Registry, limits: Limits) {
  const plugin = (kind: "guidance" | "sampler") =>
    s.optional(s.string({
      enum: reg.list(kind).map((d) => d.name),
      default: DEFAULTS[kind].name,
      description: `${kind} plugin`,
    }));
  const needs = guidanceNeeds(reg);
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
    guidance: plugin("guidance"),
    guidanceOptions: s.optional(s.record(s.jsonValue({ maxLength: 1000 }), {
      maxKeys: 32,
      description: 'guidance options as a JSON object, e.g. {"textScale": 7.5, ' +
        '"negativeScale": 4}; single options may also be sent as fields "guidance.<option>"',
    })),
    sampler: plugin("sampler"),
    steps: s.optional(capped(RUN_FIELDS.shape.steps.schema, { maximum: limits.maxSteps })),
    width: side("width"),
    height: side("height"),
    format: s.optional(s.string({
      enum: ["png", "jpeg", "webp"],
      default: "png",
      description: "encoding of the image",
    })),
    // No default: an absent field leaves the choice to the Accept header.
    response: s.optional(s.string({
      enum: ["image", "json"],
      description: "image: the encoded image; json: { image: <base64>, ... }; default: json " +
        "when Accept is application/json, else image",
    })),
  }, { extra: (k) => GUIDANCE_FIELD.test(k) });
  // Which images are required depends on the guidance, and so do the options it takes (its
  // schema, which checks them): said in the document as conditions.
  return {
    form,
    json: (): s.JsonSchema => ({
      ...form.jsonSchema(),
      ...(needs.conditions.length ? { allOf: needs.conditions } : {}),
    }),
  };
}

const GUIDANCE_VALUE = s.string({ maxLength: 1000 });

/**
 * Option values of "guidance.<option>" fields: JSON when they parse, text otherwise; an option
 * also in `given` (guidanceOptions) is an issue.
 */
function guidanceFields(
  fields: Record<string, FormDataEntryValue>,
  given: Record<string, unknown>,
  issues: s.Issue[],
): Record<string, unknown> {
  const options: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(fields)) {
    const m = GUIDANCE_FIELD.exec(k);
    const text = m ? GUIDANCE_VALUE.check(v, k, { issues, text: true }) : undefined;
    if (text === undefined) continue;
    if (Object.hasOwn(given, m![1])) {
      issues.push({ field: k, message: "is also given in guidanceOptions" });
    }
    try {
      options[m![1]] = JSON.parse(text);
    } catch {
      options[m![1]] = text;
    }
  }
  return options;
}

function wantsJson(req: Request, field: string | undefined): boolean {
  if (field) return field === "json";
  const first = (req.headers.get("accept") ?? "").split(",")[0].split(";")[0].trim();
  return first.toLowerCase() === "application/json";
}

let sharpModule: Promise<typeof import("sharp").default> | undefined;
const loadSharp = () => sharpModule ??= import("sharp").then((m) => m.default);

/** Size limits and a header check before the image is decoded, then core's decoder. */
async function loadImage(file: File, field: string, limits: Limits): Promise<RgbImage> {
  const tooLarge = (what: string, limit: number) => {
    const message = `is ${what}; the limit is ${limit}`;
    return new HttpError(413, `${field} ${message}`, [{ field, message }]);
  };
  if (file.size > limits.maxImageBytes) throw tooLarge(`${file.size} bytes`, limits.maxImageBytes);
  const bytes = new Uint8Array(await file.arrayBuffer());
  const undecodable = (why: string) =>
    new HttpError(422, `${field}: ${why}`, [{ field, message: why }]);
  if (bytes.length === 0) throw undecodable("the file is empty");
  const sharp = await loadSharp();
  let meta: { width?: number; height?: number };
  try {
    meta = await sharp(bytes, { limitInputPixels: false }).metadata();
  } catch {
    throw undecodable("not an image in a supported format (JPEG, PNG, WebP, GIF, TIFF, AVIF)");
  }
  const pixels = (meta.width ?? 0) * (meta.height ?? 0);
  if (pixels > limits.maxImagePixels) {
    throw tooLarge(`${meta.width}x${meta.height} pixels`, limits.maxImagePixels);
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

/** The server's options as the app takes them: the engine started, the roots resolved. */
type AppOptions = ServerOptions & { engine: Engine; jobs: JobStore; limits: Limits };

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
      // At the end of the job the stream says so; a client that left is sent nothing more.
      const close = (end: boolean) => {
        if (!open) return;
        if (end) send(sseMessage({ event: "end", data: job.view() }));
        open = false;
        cleanup();
        controller.close();
      };
      const unsubscribe = job.subscribe((e) => {
        send(sseMessage(e));
        if (e.event === "status" && job.final) close(true);
      });
      // Proxies drop connections that stay silent; a comment line every 15 s keeps it open.
      const ping = setInterval(() => send(": ping\n\n"), 15_000);
      const onAbort = () => close(false);
      signal.addEventListener("abort", onAbort);
      cleanup = () => {
        unsubscribe();
        clearInterval(ping);
        signal.removeEventListener("abort", onAbort);
      };
      send("retry: 2000\n\n");
      send(sseMessage({ event: "status", data: job.view() }));
      if (job.final) close(true);
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

/** Whether a Host header names this machine's loopback (a name or address, any port). */
function loopbackHost(host: string): boolean {
  const m = /^(\[[0-9A-Fa-f:.]+\]|[^:[\]]+)(?::\d{1,5})?$/.exec(host.trim());
  return m !== null && isLoopback(m[1]);
}

/** The Hono app and its OpenAPI document. */
function createApp(o: AppOptions) {
  const { engine, jobs, limits, registry: reg } = o;
  const { form, json: sampleJson } = sampleForm(reg, limits);
  const docs = routeDocs(sampleJson(), jobRequestJson(reg));
  const doc = openApi(docs, o.token !== null);
  const app = new Hono();

  app.onError((e) => {
    const known = httpError(e);
    if (known) return errorResponse(known);
    console.error(e);
    return errorResponse(new HttpError(500, `internal error: ${e.message}`));
  });

  // 404 for unknown paths; 405 (with Allow) for known paths with another method.
  const patterns = docs.map((d) => ({
    method: d.method.toUpperCase(),
    re: new RegExp(`^${d.path.replace(/\{\w+\}/g, "[^/]+")}$`),
  }));
  const pathOf = (target: string) =>
    target.startsWith("/") ? new URL(target, "http://x").pathname : target;
  const unrouted = (method: string, path: string): HttpError => {
    const allowed = patterns.filter((p) => p.re.test(path)).map((p) => p.method);
    if (allowed.length) {
      const allow = [...new Set(allowed)].join(", ");
      return new HttpError(405, `${method} is not allowed on ${path}`, [], { allow });
    }
    return new HttpError(404, `no route ${method} ${path}`);
  };
  app.notFound((c) => errorResponse(unrouted(c.req.method, new URL(c.req.url).pathname)));

  const unauthorized = (path: string, authorization: string | undefined): HttpError | null => {
    // A report's own requests carry its key instead (see server/pages.ts).
    if (
      o.token === null || path === "/healthz" || path.startsWith(REPORT_PREFIX) ||
      authorized(authorization, o.token)
    ) return null;
    return new HttpError(401, "missing or wrong bearer token (Authorization: Bearer <token>)", [], {
      "www-authenticate": 'Bearer realm="dipsy"',
    });
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
        if (refused) return pageRefusal(c.req.raw) ?? errorResponse(refused);
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
    const plugins = (kind: "guidance" | "sampler" | "pairs") => [
      kind,
      reg.list(kind).map((d) => ({
        name: d.name,
        description: d.description,
        options: Object.fromEntries(reg.docs(kind, d.name).map(({ name, ...doc }) => [name, doc])),
      })),
    ];
    const info = engine.info, tensors = memory(), process = Deno.memoryUsage();
    const { running, waiting, bound } = engine.queue;
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
      plugins: Object.fromEntries((["guidance", "sampler", "pairs"] as const).map(plugins)),
      queue: { running, waiting, bound },
      memory: {
        residentBytes: process.rss,
        heapBytes: process.heapUsed,
        liveTensors: tensors.processHandles,
        tensorBytes: tensors.processBytes,
      },
      jobs: { roots: o.roots },
      limits,
    });
  });

  app.post("/v1/sample", async (c) => {
    const req = c.req.raw;
    const fields = await readForm(req, limits.maxBodyBytes);
    const checked = s.validate(form, fields, { text: true });
    const issues = checked.ok ? [] : [...checked.issues];
    const given = checked.ok ? checked.value.guidanceOptions ?? {} : {};
    const dotted = guidanceFields(fields, given, issues);
    if (!checked.ok || issues.length) throw invalid(issues);
    const v = checked.value;
    // The form fills in the defaults of absent fields.
    const spec: SampleSpec = {
      prompt: v.prompt,
      seed: v.seed,
      guidance: v.guidance!,
      guidanceOptions: { ...v.guidanceOptions, ...dotted },
      sampler: v.sampler!,
      steps: v.steps!,
      width: v.width ?? null,
      height: v.height ?? null,
    };
    const prepared = prepareSample(spec, {
      positive: v.positive !== undefined,
      negative: v.negative !== undefined,
    }, { registry: reg, schedulerConfig: o.schedulerConfig });
    const size = sampleSize(engine.info, spec);
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
    const format = v.format as ImageFormat;
    let bytes: Uint8Array<ArrayBuffer>;
    try {
      bytes = await engine.sample(spec, { positive, negative }, format, { signal: req.signal });
    } catch (e) {
      if (req.signal.aborted && e === req.signal.reason) {
        // The client is gone; nobody reads this.
        return new Response(null, { status: 499 });
      }
      throw e;
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
    const plan = await planJob(checked.value, { ...o, defaultSize: engine.info.defaultSize });
    const job = jobs.start(plan);
    return json(job.view(), 202, { location: `/v1/jobs/${job.id}` });
  });

  app.get("/v1/jobs", () => json({ jobs: jobs.list().map((j) => j.view()) }));

  const findJob = (id: string): Job => {
    const job = jobs.get(id);
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
    /**
     * The answer for a method and target no route takes (401 first when a token is required,
     * then 404 or 405), for requests that cannot become a fetch Request.
     */
    unrouted: (method: string, target: string, authorization?: string) =>
      errorAnswer(unauthorized(pathOf(target), authorization) ?? unrouted(method, pathOf(target))),
  };
}

// ---------------------------------------------------------------------------------------------
// The server

export interface ServerOptions {
  hostname: string;
  /** 0: any free port. */
  port: number;
  /** Required on every request but /healthz when set. */
  token: string | null;
  /** Folders /v1/jobs may read and write in. */
  roots: readonly string[];
  queue: number;
  limits?: Partial<Limits>;
  setup: ModelSetup;
  /** The server's settings as a generate configuration layer (models, device, dtype). */
  base: ConfigLayer;
  /** The scheduler config of the loaded model (for checking sampler options early). */
  schedulerConfig: SchedulerConfig;
  registry: Registry;
  log?: (message: string) => void;
  /** Largest request head (request line and headers) in bytes (default 16 KiB). */
  maxHeadBytes?: number;
  /** Holds each job as each of its batches starts: for tests, never set by `dipsy serve`. */
  beforeBatch?: BeforeBatch;
}

export type RunningServer = Awaited<ReturnType<typeof startServer>>;

export async function startServer(o: ServerOptions) {
  checkExposure(o.hostname, o.token);
  const log = o.log ?? ((m: string) => console.error(m));
  const roots = await resolveRoots(o.roots);
  const limits: Limits = { ...DEFAULT_LIMITS, ...o.limits };
  limits.maxSteps = Math.min(limits.maxSteps, STEPS_BOUND);
  // libvips' operation cache (one for the process, the engine's thread included) keeps recent
  // images for reuse, which never comes for uploads that are new each time: off, so that memory
  // follows the work in hand.
  (await loadSharp()).cache(false);
  const engine = await Engine.start(o.setup, { queue: o.queue });
  const jobs = new JobStore(engine, undefined, o.beforeBatch);
  const { app, openapi, unrouted } = createApp({ ...o, engine, jobs, limits, roots });
  let server: HttpServer;
  try {
    server = await serveHttp((req) => app.fetch(req), {
      hostname: o.hostname,
      port: o.port,
      maxHeadBytes: o.maxHeadBytes,
      onError: (e) => {
        console.error(e);
        return errorResponse(new HttpError(500, "internal error"));
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
  /**
   * Stops accepting, fails queued work (503), lets a running sample finish and a running job
   * finish and write its batch in flight, then closes. Idempotent.
   */
  const shutdown = (): Promise<void> =>
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
    /** Resolves once the server has shut down. */
    finished: server.finished.then(() => stopping ?? undefined),
  };
}
