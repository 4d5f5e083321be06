/**
 * Request bodies and error answers: media-type checks (415), size limits checked on the declared
 * length before reading and on the bytes while reading (413), and parsing (400), each answered as
 * JSON: `{ error: { status, message, issues? } }`.
 */
import type { Issue } from "./schema.ts";

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

export function json(body: unknown, status = 200, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json; charset=utf-8", ...headers },
  });
}

export function errorResponse(e: HttpError): Response {
  return json(
    {
      error: {
        status: e.status,
        message: e.message,
        ...(e.issues.length ? { issues: e.issues } : {}),
      },
    },
    e.status,
    e.headers,
  );
}

export const invalid = (issues: Issue[]) =>
  new HttpError(
    400,
    `invalid request: ${issues.map((i) => (i.field ? `${i.field} ` : "") + i.message).join("; ")}`,
    issues,
  );

function mediaType(req: Request): string {
  return (req.headers.get("content-type") ?? "").split(";")[0].trim().toLowerCase();
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
    throw new HttpError(400, `the body could not be read (${e instanceof Error ? e.message : e})`);
  }
  const out = new Uint8Array(size);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

export async function readJson(req: Request, limit: number): Promise<unknown> {
  if (mediaType(req) !== "application/json") {
    throw new HttpError(415, "send the body as application/json", [], {
      accept: "application/json",
    });
  }
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

/** Multipart form fields by name; a field sent twice is an error. */
export async function readForm(
  req: Request,
  limit: number,
): Promise<Record<string, FormDataEntryValue>> {
  const type = req.headers.get("content-type") ?? "";
  if (mediaType(req) !== "multipart/form-data") {
    throw new HttpError(415, "send the body as multipart/form-data", [], {
      accept: "multipart/form-data",
    });
  }
  if (!/;\s*boundary=/i.test(type)) {
    throw new HttpError(400, "multipart/form-data without a boundary parameter");
  }
  const body = await readBody(req, limit);
  let form: FormData;
  try {
    form = await new Response(body, { headers: { "content-type": type } }).formData();
  } catch (e) {
    throw new HttpError(
      400,
      `malformed multipart body (${e instanceof Error ? e.message : e})`,
    );
  }
  const fields: Record<string, FormDataEntryValue> = {};
  const issues: Issue[] = [];
  for (const [k, v] of form.entries()) {
    if (Object.hasOwn(fields, k)) issues.push({ field: k, message: "is given more than once" });
    fields[k] = v;
  }
  if (issues.length) throw invalid(issues);
  return fields;
}
