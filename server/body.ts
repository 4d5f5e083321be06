/**
 * Request bodies and error answers: media-type checks (415), size limits checked on the declared
 * length before reading and on the bytes while reading (413), and parsing (400), each answered as
 * JSON: `{ error: { status, message, issues? } }`.
 */
import { Buffer } from "node:buffer";
import type { Answer } from "./http.ts";
import { BodyError } from "./request_body.ts";
import type { Issue } from "../core/schema.ts";

/** An HTTP error answered as JSON: `{ error: { status, message, issues? } }`. */
export class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly issues: Issue[] = [],
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
    this.name = "HttpError";
  }
}

const JSON_TYPE = "application/json; charset=utf-8";

export function json(body: unknown, status = 200, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": JSON_TYPE, ...headers },
  });
}

/** The answer as plain data, as answers written outside a handler need it. */
export function errorAnswer(e: HttpError): Answer {
  const issues = e.issues.length ? { issues: e.issues } : {};
  return {
    status: e.status,
    headers: { "content-type": JSON_TYPE, ...e.headers },
    body: JSON.stringify({ error: { status: e.status, message: e.message, ...issues } }),
  };
}

export function errorResponse(e: HttpError): Response {
  const a = errorAnswer(e);
  return new Response(a.body, a);
}

export const invalid = (issues: Issue[]) =>
  new HttpError(
    400,
    `invalid request: ${issues.map((i) => (i.field ? `${i.field} ` : "") + i.message).join("; ")}`,
    issues,
  );

/** Refuses (415) a body of another media type than `type`. */
function requireType(req: Request, type: string): void {
  const given = (req.headers.get("content-type") ?? "").split(";")[0].trim().toLowerCase();
  if (given !== type) throw new HttpError(415, `send the body as ${type}`, [], { accept: type });
}

/** The body, refused with 413 when its declared or actual size passes `limit`. */
export async function readBody(req: Request, limit: number): Promise<Uint8Array<ArrayBuffer>> {
  const declared = req.headers.get("content-length");
  if (declared !== null) {
    if (!/^\d+$/.test(declared.trim())) throw new HttpError(400, "invalid Content-Length");
    if (Number(declared) > limit) {
      throw new HttpError(413, `the body is ${declared} bytes; the limit is ${limit}`, [], {
        connection: "close",
      });
    }
  }
  if (!req.body) return new Uint8Array(0);
  const reader = req.body.getReader();
  const parts: Uint8Array[] = [];
  let size = 0;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      size += value.length;
      if (size > limit) {
        await reader.cancel().catch(() => {});
        throw new HttpError(413, `the body is over the limit of ${limit} bytes`, [], {
          connection: "close",
        });
      }
      parts.push(value);
    }
  } catch (e) {
    if (e instanceof HttpError) throw e;
    if (e instanceof BodyError) throw new HttpError(400, e.message, [], { connection: "close" });
    throw new HttpError(400, `the body could not be read (${e instanceof Error ? e.message : e})`);
  }
  return new Uint8Array(Buffer.concat(parts, size));
}

export async function readJson(req: Request, limit: number): Promise<unknown> {
  requireType(req, "application/json");
  const body = await readBody(req, limit);
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(body);
  } catch {
    throw new HttpError(400, "the body is not valid UTF-8");
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new HttpError(400, `the body is not valid JSON (${e instanceof Error ? e.message : e})`);
  }
}

/** The boundary parameter of a multipart media type (maybe quoted). */
function boundaryOf(type: string): string | null {
  const m = /;\s*boundary=(?:"([^"]+)"|([^\s;"]+))/i.exec(type);
  return m ? (m[1] ?? m[2]) : null;
}

/**
 * Where the multipart body ends: just after its close delimiter ("--" boundary "--" at the start
 * of a line); null when it has none.
 */
function multipartEnd(body: Uint8Array, boundary: string): number | null {
  const bytes = Buffer.from(body.buffer, body.byteOffset, body.byteLength);
  const close = Buffer.from(`--${boundary}--`);
  for (let i = bytes.indexOf(close); i >= 0; i = bytes.indexOf(close, i + 1)) {
    if (i === 0 || (i >= 2 && bytes[i - 2] === 0x0d && bytes[i - 1] === 0x0a)) {
      return i + close.length;
    }
  }
  return null;
}

/** Multipart form fields by name; a field sent twice is an error. */
export async function readForm(
  req: Request,
  limit: number,
): Promise<Record<string, FormDataEntryValue>> {
  const type = req.headers.get("content-type") ?? "";
  requireType(req, "multipart/form-data");
  const boundary = boundaryOf(type);
  if (!boundary) throw new HttpError(400, "multipart/form-data without a boundary parameter");
  const body = await readBody(req, limit);
  // The parser takes a body cut off mid-part for a shorter form, and drops the last part when
  // an epilogue follows the close delimiter: the delimiter tells a whole body, and where it ends.
  const end = multipartEnd(body, boundary);
  if (end === null) {
    throw new HttpError(
      400,
      `the multipart body is truncated: it does not end with the closing boundary "--${boundary}--"`,
    );
  }
  const form = await new Response(body.subarray(0, end), { headers: { "content-type": type } })
    .formData().catch((e) => {
      throw new HttpError(400, `malformed multipart body (${e instanceof Error ? e.message : e})`);
    });
  const fields: Record<string, FormDataEntryValue> = {};
  const issues: Issue[] = [];
  for (const [k, v] of form.entries()) {
    if (Object.hasOwn(fields, k)) issues.push({ field: k, message: "is given more than once" });
    fields[k] = v;
  }
  if (issues.length) throw invalid(issues);
  return fields;
}
