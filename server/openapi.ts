/**
 * The OpenAPI 3.1 document. Request bodies are the JSON Schema of the very schemas that check
 * the requests (core/schema.ts), so the document cannot drift from what the server accepts.
 */
import * as s from "../core/schema.ts";
import { JOB_VIEW } from "./jobs.ts";

export const API_VERSION = "1";

export interface RouteDoc {
  method: "get" | "post" | "delete";
  /** OpenAPI form: /v1/jobs/{id}. */
  path: string;
  summary: string;
  request?: { type: string; schema: s.JsonSchema };
  responses: Record<number, { description: string; type?: string; schema?: s.JsonSchema }>;
  public?: boolean;
}

const ERROR_SCHEMA = s.object({
  error: s.required(s.object({
    status: s.required(s.integer()),
    message: s.required(s.string()),
    issues: s.optional(s.array(s.object({
      field: s.required(s.string()),
      message: s.required(s.string()),
      unknown: s.optional(s.boolean({ description: "the field is not one the server knows" })),
    }))),
  })),
}).jsonSchema();

export function routeDocs(sampleSchema: s.JsonSchema, jobSchema: s.JsonSchema): RouteDoc[] {
  const json = (description: string, schema?: s.JsonSchema) => ({
    description,
    type: "application/json",
    schema,
  });
  const err = (description: string) => json(description, ERROR_SCHEMA);
  const common = { 401: err("missing or wrong bearer token"), 404: err("no such route") };
  const jobView = JOB_VIEW.jsonSchema();
  const job = json("the job", jobView);
  return [
    {
      method: "get",
      path: "/healthz",
      summary: "liveness: 200 while the engine works",
      public: true,
      responses: { 200: json("alive"), 503: err("the engine failed") },
    },
    {
      method: "get",
      path: "/openapi.json",
      summary: "this document",
      responses: { 200: json("OpenAPI 3.1"), ...common },
    },
    {
      method: "get",
      path: "/v1/info",
      summary: "models loaded, device, dtype, plugins, queue, memory, limits and versions",
      responses: { 200: json("server information"), ...common },
    },
    {
      method: "post",
      path: "/v1/sample",
      summary: "one image from explicit reference images; the same bytes as `dipsy sample`",
      request: { type: "multipart/form-data", schema: sampleSchema },
      responses: {
        200: {
          description: "the image (image/png unless `format` says otherwise), or with " +
            "response=json (or no response and Accept: application/json), { image: <base64>, " +
            "mediaType, width, height, seed, ... }",
          type: "image/png",
          schema: { type: "string", format: "binary" },
        },
        400: err("malformed body or invalid fields (issues name each field)"),
        413: err("body or image over the limits"),
        415: err("not multipart/form-data"),
        422: err("an image that does not decode"),
        503: err("queue full (see Retry-After) or shutting down"),
        ...common,
      },
    },
    {
      method: "post",
      path: "/v1/jobs",
      summary: "start a dataset generation job (the settings of `dipsy generate`)",
      request: { type: "application/json", schema: jobSchema },
      responses: {
        202: job,
        400: err("malformed JSON or invalid settings (issues name each field)"),
        403: err("a path outside the allowed roots"),
        413: err("body over the limit"),
        415: err("not application/json"),
        503: err("queue full (see Retry-After) or shutting down"),
        ...common,
      },
    },
    {
      method: "get",
      path: "/v1/jobs",
      summary: "the jobs this server knows",
      responses: {
        200: json("jobs, oldest first", {
          type: "object",
          properties: { jobs: { type: "array", items: jobView } },
        }),
        ...common,
      },
    },
    {
      method: "get",
      path: "/v1/jobs/{id}",
      summary: "a job's status and progress",
      responses: { 200: job, ...common },
    },
    {
      method: "get",
      path: "/v1/jobs/{id}/events",
      summary: "a job's progress as server-sent events: status, progress, image, message; " +
        "the stream ends after the final status",
      responses: { 200: { description: "event stream", type: "text/event-stream" }, ...common },
    },
    {
      method: "delete",
      path: "/v1/jobs/{id}",
      summary: "cancel: a queued job never starts; a running one stops after the batch in " +
        "flight (its images are kept; the same request resumes it)",
      responses: { 202: job, 409: err("the job has finished already"), ...common },
    },
  ];
}

export function openApi(docs: RouteDoc[], secured: boolean): Record<string, unknown> {
  const paths: Record<string, Record<string, unknown>> = {};
  for (const d of docs) {
    const params = [...d.path.matchAll(/\{(\w+)\}/g)].map((m) => ({
      name: m[1],
      in: "path",
      required: true,
      schema: { type: "string" },
    }));
    (paths[d.path] ??= {})[d.method] = {
      summary: d.summary,
      ...(params.length ? { parameters: params } : {}),
      ...(d.request
        ? {
          requestBody: {
            required: true,
            content: { [d.request.type]: { schema: d.request.schema } },
          },
        }
        : {}),
      responses: Object.fromEntries(
        Object.entries(d.responses).map(([status, r]) => [status, {
          description: r.description,
          ...(r.type ? { content: { [r.type]: r.schema ? { schema: r.schema } : {} } } : {}),
        }]),
      ),
      ...(secured && d.public ? { security: [] } : {}),
    };
  }
  return {
    openapi: "3.1.0",
    info: {
      title: "dipsy",
      version: API_VERSION,
      description: "DIPSY synthetic data generation over HTTP: one engine, one piece of work " +
        "at a time, in arrival order.",
    },
    paths,
    ...(secured
      ? {
        components: { securitySchemes: { bearer: { type: "http", scheme: "bearer" } } },
        security: [{ bearer: [] }],
      }
      : {}),
  };
}
