/**
 * Dataset generation jobs over HTTP: a request becomes the same RunConfig `dipsy generate` builds
 * from its flags (the server's model settings, then the request's), with every path confined to
 * the configured roots. A job runs on the engine like any other work; its progress reaches
 * listeners (server-sent events) as it happens, and cancelling it stops after the batch in
 * flight, leaving a run folder that the same request resumes.
 */
import { dirname, isAbsolute, join, resolve, sep as SEPARATOR } from "node:path";
import {
  ConfigError,
  parseConfigObject,
  PRESETS,
  resolveConfig,
  resolveRun,
  RUN_FIELDS,
  type RunConfig,
} from "../core/config.ts";
import { type ProgressInfo, resolveShard, type Shard } from "../core/generate.ts";
import type { Registry } from "../core/plugins.ts";
import { ClosedError, type Engine } from "./engine.ts";
import * as s from "../core/schema.ts";
import { HttpError, invalid } from "./body.ts";
import type { ServerOptions } from "./app.ts";
import { UserError } from "../ffi/errors.ts";

// ---------------------------------------------------------------------------------------------
// The request

/** A plugin field; its document is jobRequestJson's, with each plugin's options. */
const plugin = (kind: string) =>
  s.oneOf<unknown>([
    s.string({ minLength: 1, maxLength: 100 }),
    s.object({ name: s.optional(s.string({ minLength: 1, maxLength: 100 })) }, {
      extra: (k) => /^[A-Za-z_][A-Za-z0-9_]{0,63}$/.test(k),
    }),
  ], { expected: `a ${kind} plugin name or { name, ...options }` });

const path = (description: string) => s.string({ minLength: 1, maxLength: 4096, description });

/** The server's cap on what anyone may ask of a setting: a longest text, a largest number. */
type Cap = { maxLength?: number; maximum?: number };

/**
 * A setting's schema with a cap on top. Both bounds are checked, so the smaller one holds: the
 * document says that one.
 */
export function capped<T>(inner: s.Schema<T>, cap: Cap): s.Schema<T> {
  const limits: Record<string, s.Schema<unknown>> = {
    string: s.string({ maxLength: cap.maxLength }),
    number: s.number({ max: cap.maximum }),
  };
  return {
    ...inner,
    check(v, field, ctx) {
      const before = ctx.issues.length;
      const r = inner.check(v, field, ctx);
      if (ctx.issues.length === before) limits[typeof r]?.check(r, field, ctx);
      return ctx.issues.length > before ? undefined : r;
    },
    jsonSchema: () => {
      const json = inner.jsonSchema();
      const bounds = Object.entries(cap).map(([k, v]) => [k, Math.min(v, json[k] as number ?? v)]);
      return { ...json, ...Object.fromEntries(bounds) };
    },
  };
}

/**
 * A run setting as RUN_FIELDS declares it (type, bounds, doc), without its default (absent, the
 * preset's holds), and capped.
 */
const runField = <K extends keyof typeof RUN_FIELDS.shape>(key: K, cap: Cap = {}) =>
  s.optional(capped(s.withoutDefault(RUN_FIELDS.shape[key].schema), cap));

/** The body of POST /v1/jobs: `dipsy generate`'s settings, without the server's model ones. */
export const JOB_REQUEST = s.object({
  data: s.required(path("few-shot images: DIR/<class>/*.jpg, or the DataDream layout")),
  out: s.required(path("output folder: new, empty, or an earlier run of the same settings")),
  dataset: runField("dataset", { maxLength: 100 }),
  fewshotSeed: runField("fewshotSeed", { maxLength: 100 }),
  skipBad: runField("skipBad"),
  similarity: s.optional(s.nullable(path("class similarity file"))),
  preset: s.optional(s.string({ enum: Object.keys(PRESETS), description: "named settings" })),
  perClass: runField("perClass", { maximum: 1_000_000 }),
  seed: runField("seed"),
  steps: runField("steps"),
  width: runField("width", { maximum: 4096 }),
  height: runField("height", { maximum: 4096 }),
  prompt: runField("prompt", { maxLength: 1000 }),
  guidance: s.optional(plugin("guidance")),
  sampler: s.optional(plugin("sampler")),
  pairs: s.optional(plugin("pairs")),
  batch: runField("batch", { maximum: 256 }),
  quality: runField("quality"),
  shard: s.optional(s.string({
    pattern: /^\d+\/\d+$/,
    patternText: 'I/N, e.g. "0/4"',
    description: "do shard I of N",
  })),
  only: s.optional(s.array(s.string({ maxLength: 300 }), {
    maxItems: 10_000,
    description: '(re)make just these images, "CLASS:INDEX"',
  })),
}, { description: "settings of `dipsy generate`; the model settings are the server's" });

/**
 * JOB_REQUEST's JSON Schema with each plugin field a plugin's name, or `{ name, ...options }` with
 * that plugin's option schema (without a name, the options are for the plugin the preset chose).
 */
export function jobRequestJson(reg: Registry): s.JsonSchema {
  const json = JOB_REQUEST.jsonSchema();
  const properties = { ...json.properties as Record<string, s.JsonSchema> };
  for (const kind of ["guidance", "sampler", "pairs"] as const) {
    const defs = reg.list(kind);
    properties[kind] = {
      description: `${kind} plugin: a name, or { name, ...options }`,
      anyOf: [
        { type: "string", enum: defs.map((d) => d.name) },
        ...defs.map((d) => {
          const options = d.schema.jsonSchema();
          return {
            ...options,
            description: d.description,
            properties: { name: { enum: [d.name] }, ...options.properties as object },
          };
        }),
      ],
    };
  }
  return { ...json, properties };
}

// ---------------------------------------------------------------------------------------------
// Paths

function inside(root: string, p: string): boolean {
  return p === root || p.startsWith(root.endsWith(SEPARATOR) ? root : root + SEPARATOR);
}

/** The real path of `p`, following links, for the part of it that exists. */
async function realish(p: string): Promise<string> {
  const rest: string[] = [];
  let cur = p;
  for (;;) {
    try {
      return join(await Deno.realPath(cur), ...rest.reverse());
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
      const parent = dirname(cur);
      if (parent === cur) throw e;
      rest.push(cur.slice(parent.length).replace(/^[\\/]+/, ""));
      cur = parent;
    }
  }
}

/** A --roots folder that does not exist or is not a folder. */
export class RootsError extends UserError {}

/** The real paths of the roots (they must exist and be folders). */
export async function resolveRoots(roots: readonly string[]): Promise<string[]> {
  const out: string[] = [];
  for (const r of roots) {
    const real = await Deno.realPath(r).catch(() => {
      throw new RootsError(`--roots: ${r} does not exist`);
    });
    if (!(await Deno.stat(real)).isDirectory) throw new RootsError(`--roots: ${r} is not a folder`);
    out.push(real);
  }
  return out;
}

/**
 * `p` (relative paths are taken from the first root) if it lies inside a root once `..` and
 * links are resolved; a 403 otherwise.
 */
export async function confine(p: string, roots: readonly string[], field: string): Promise<string> {
  const refuse = (why: string) => new HttpError(403, `${field}: ${why}`, [{ field, message: why }]);
  if (roots.length === 0) throw refuse("the server was started without --roots: no paths allowed");
  if (p.includes("\0")) throw refuse("must not contain NUL characters");
  const abs = isAbsolute(p) ? resolve(p) : resolve(roots[0], p);
  const real = await realish(abs).catch(() => {
    throw refuse("cannot be resolved");
  });
  if (!roots.some((r) => inside(r, abs) && inside(r, real))) {
    throw refuse(`${p} is outside the allowed roots`);
  }
  return real;
}

// ---------------------------------------------------------------------------------------------
// Request to configuration

export interface JobDefaults
  extends Pick<ServerOptions, "base" | "roots" | "schedulerConfig" | "registry"> {
  /** The model's output size, when the request gives none. */
  defaultSize: number;
}

/** A checked request: the run's configuration, this job's shard and the images it remakes. */
export type JobPlan = Awaited<ReturnType<typeof planJob>>;

/** The field a core configuration message is about ("request: \"steps\" must be ..."). */
function configIssues(problems: readonly string[]): s.Issue[] {
  const patterns: [RegExp, (m: RegExpExecArray) => string][] = [
    [/^unknown (guidance|sampler|pairs) plugin/, (m) => m[1]],
    [
      /^(guidance|sampler|pairs) plugin "[^"]*": (?:unknown )?option "([^"]+)"/,
      (m) => `${m[1]}.${m[2]}`,
    ],
    [/^(guidance|sampler|pairs) plugin/, (m) => m[1]],
    [/^prompt /, () => "prompt"],
    [/^set both width and height/, () => "width"],
    [/^"([^"]+)"/, (m) => m[1]],
  ];
  return problems.map((p) => {
    const text = p.replace(/^request: /, "");
    for (const [re, field] of patterns) {
      const m = re.exec(text);
      if (m) return { field: field(m), message: text };
    }
    return { field: "", message: text };
  });
}

function message(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/**
 * Checks a request as far as possible without the device (settings, plugins, paths, shard), so
 * that a bad one is refused before it waits in the queue.
 */
export async function planJob(req: s.Infer<typeof JOB_REQUEST>, d: JobDefaults) {
  const { shard: shardText, only, data, out, similarity, ...rest } = req;
  const paths: Record<string, unknown> = {
    data: await confine(data, d.roots, "data"),
    out: await confine(out, d.roots, "out"),
  };
  if (similarity) paths.similarity = await confine(similarity, d.roots, "similarity");
  let config: RunConfig;
  try {
    const layer = parseConfigObject({ ...rest, ...paths }, "request", { baseDir: d.roots[0] });
    config = resolveConfig([d.base, layer], d.registry);
  } catch (e) {
    if (e instanceof ConfigError) {
      throw invalid(configIssues(e.problems));
    }
    throw e;
  }
  const info = await Deno.stat(config.data!).catch(() => null);
  if (!info?.isDirectory) {
    throw invalid([{ field: "data", message: `${data} is not a folder` }]);
  }
  config.width ??= d.defaultSize;
  config.height ??= d.defaultSize;
  // The sampler is built now (with the server's scheduler config) so that a bad option is
  // refused before the job queues.
  try {
    resolveRun(config, d.registry).sampler(d.schedulerConfig)[Symbol.dispose]();
  } catch (e) {
    const text = message(e).replace(/^configuration: /, "");
    const field = /^(guidance|sampler|pairs) plugin/.exec(text)?.[1] ?? "sampler";
    throw invalid([{ field, message: text }]);
  }
  let shard: Shard;
  try {
    shard = resolveShard(shardText, undefined, {});
  } catch (e) {
    throw invalid([{ field: "shard", message: message(e) }]);
  }
  return { config, shard, only: only ?? [] };
}

// ---------------------------------------------------------------------------------------------
// Jobs

const JOB_STATUSES = [
  "queued",
  "running",
  "cancelling",
  "cancelled",
  "succeeded",
  "failed",
] as const;
export type JobStatus = typeof JOB_STATUSES[number];

const FINAL: readonly JobStatus[] = ["cancelled", "succeeded", "failed"];

/** An object whose fields are all present: the shape of an answer, not of a request. */
function answer<S extends Record<string, s.Schema<unknown>>>(fields: S, description?: string) {
  const shape = Object.fromEntries(Object.entries(fields).map(([k, f]) => [k, s.required(f)]));
  return s.object(shape, { description }) as s.ObjectSchema<
    { [K in keyof S]: s.Field<s.Infer<S[K]>, true> }
  >;
}

const dateTime = <T>(inner: s.Schema<T>): s.Schema<T> => ({
  ...inner,
  jsonSchema: () => ({ ...inner.jsonSchema(), format: "date-time" }),
});

/** What a job's run did (core's `generate`). */
const GENERATE_SUMMARY = answer({
  out: s.string(),
  written: s.integer(),
  skipped: s.integer(),
  remaining: s.integer(),
  interrupted: s.boolean(),
});
export type GenerateSummary = s.Infer<typeof GENERATE_SUMMARY>;

/** A job as the API shows it. */
export const JOB_VIEW = answer({
  id: s.string(),
  status: s.string({ enum: JOB_STATUSES }),
  data: s.string(),
  out: s.string(),
  createdAt: dateTime(s.string()),
  startedAt: dateTime(s.nullable(s.string())),
  finishedAt: dateTime(s.nullable(s.string())),
  progress: answer(
    {
      done: s.integer(),
      total: s.nullable(s.integer()),
      step: s.nullable(answer({ index: s.integer(), total: s.integer() })),
    },
    "images written by this job, of `total` it has to write; the step of the batch in flight",
  ),
  result: s.nullable(GENERATE_SUMMARY),
  error: s.nullable(s.string()),
  messages: s.array(s.string(), { description: "notes and warnings from the run (the last few)" }),
});
export type JobView = s.Infer<typeof JOB_VIEW> & { status: JobStatus };

export type JobEvent =
  | { event: "status"; data: JobView }
  | { event: "progress"; data: JobView["progress"] }
  | { event: "image"; data: { file: string } }
  | { event: "message"; data: { message: string } };

const MAX_MESSAGES = 50;

export class Job {
  readonly id = crypto.randomUUID();
  readonly created = new Date();
  started: Date | null = null;
  finished: Date | null = null;
  status: JobStatus = "queued";
  progress: JobView["progress"] = { done: 0, total: null, step: null };
  result: GenerateSummary | null = null;
  error: string | null = null;
  readonly messages: string[] = [];
  readonly controller = new AbortController();
  readonly #listeners = new Set<(e: JobEvent) => void>();
  readonly #done = Promise.withResolvers<void>();

  constructor(readonly plan: JobPlan) {}

  get final(): boolean {
    return FINAL.includes(this.status);
  }

  /** Resolves when the job has reached a final status. */
  get done(): Promise<void> {
    return this.#done.promise;
  }

  view(): JobView {
    return {
      id: this.id,
      status: this.status,
      data: this.plan.config.data!,
      out: this.plan.config.out!,
      createdAt: this.created.toISOString(),
      startedAt: this.started?.toISOString() ?? null,
      finishedAt: this.finished?.toISOString() ?? null,
      progress: structuredClone(this.progress),
      result: this.result,
      error: this.error,
      messages: [...this.messages],
    };
  }

  /** Listens to events until the returned function is called. */
  subscribe(fn: (e: JobEvent) => void): () => void {
    this.#listeners.add(fn);
    return () => this.#listeners.delete(fn);
  }

  emit(e: JobEvent): void {
    for (const fn of [...this.#listeners]) fn(e);
  }

  setStatus(status: JobStatus): void {
    if (this.final) return;
    this.status = status;
    if (status === "running") this.started = new Date();
    if (FINAL.includes(status)) this.finished = new Date();
    this.emit({ event: "status", data: this.view() });
    if (FINAL.includes(status)) this.#done.resolve();
  }

  note(message: string): void {
    this.messages.push(message);
    if (this.messages.length > MAX_MESSAGES) this.messages.shift();
    this.emit({ event: "message", data: { message } });
  }

  onProgress(p: ProgressInfo): void {
    this.progress = { done: p.done, total: p.total, step: p.step ?? null };
    this.emit({ event: "progress", data: structuredClone(this.progress) });
  }
}

/**
 * Awaited as each batch of `job` starts (`batch`: 0, 1, ...); the engine waits meanwhile. For
 * tests that act between two batches (cancel, shut down) instead of racing the run.
 */
export type BeforeBatch = (job: Job, batch: number) => Promise<void>;

/** Jobs by id; finished ones are forgotten oldest first beyond `keep`. */
export class JobStore {
  readonly #jobs = new Map<string, Job>();

  constructor(
    readonly engine: Engine,
    readonly keep = 200,
    readonly beforeBatch?: BeforeBatch,
  ) {}

  get(id: string): Job | undefined {
    return this.#jobs.get(id);
  }

  list(): Job[] {
    return [...this.#jobs.values()];
  }

  /** Queues a job; throws (QueueFullError, ClosedError) without creating one when refused. */
  start(plan: JobPlan): Job {
    const job = new Job(plan);
    const hold = this.beforeBatch;
    let batch = 0;
    const promise = this.engine.generate(plan, {
      onProgress: (p) => job.onProgress(p),
      onImage: (file) => job.emit({ event: "image", data: { file } }),
      onLog: (m) => job.note(m),
      ...(hold ? { beforeBatch: () => hold(job, batch++) } : {}),
    }, { signal: job.controller.signal, onStart: () => job.setStatus("running") });
    this.#jobs.set(job.id, job);
    this.#forgetOld();
    promise.then((summary) => {
      job.result = summary;
      job.progress.step = null;
      job.setStatus(summary.interrupted ? "cancelled" : "succeeded");
    }, (e) => {
      if (job.controller.signal.aborted && e === job.controller.signal.reason) {
        job.setStatus("cancelled");
        return;
      }
      job.error = message(e);
      job.setStatus(e instanceof ClosedError ? "cancelled" : "failed");
    });
    return job;
  }

  /**
   * Stops a job: a queued one never starts; a running one finishes and writes the batch in
   * flight, then stops. Whatever it wrote stays, and the same request resumes it.
   */
  cancel(job: Job, reason = "cancelled"): void {
    if (job.final || job.controller.signal.aborted) return;
    job.note(reason);
    if (job.status === "running") job.setStatus("cancelling");
    job.controller.abort(new DOMException(reason, "AbortError"));
  }

  /** Stops every job (shutdown); resolves once none is running. */
  async stopAll(reason: string): Promise<void> {
    for (const job of this.#jobs.values()) this.cancel(job, reason);
    await Promise.all([...this.#jobs.values()].map((j) => j.done));
  }

  #forgetOld(): void {
    const finished = [...this.#jobs.values()].filter((j) => j.final);
    for (const j of finished.slice(0, Math.max(0, finished.length - this.keep))) {
      this.#jobs.delete(j.id);
    }
  }
}
