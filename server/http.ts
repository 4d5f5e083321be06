/**
 * Serves a fetch-style handler (`(Request) => Response`, as Hono's `app.fetch`) over node:http.
 *
 * Why not Deno.serve: a request's AbortSignal must fire when its client goes away while the
 * request waits in the engine's queue, so that the queue drops it. Deno.serve only notices a
 * closed connection while it still reads from it, which it stops doing once a request body of
 * more than a few hundred bytes has been read: every upload with an image would stay queued and
 * run for nobody. node:http reports the closed socket in every case ('close' on the response
 * before it has finished).
 *
 * Every request gets an answer from the caller's callbacks, including those that never become a
 * fetch Request: malformed HTTP (400), a request head over the limit (431), a method the fetch
 * API refuses to carry (TRACE, CONNECT). Request bodies come through request_body.ts.
 */
import { createServer, type IncomingMessage, type ServerResponse, STATUS_CODES } from "node:http";
import type { AddressInfo, Socket } from "node:net";
import { type RequestBody, requestBody } from "./request_body.ts";

export interface HttpServer {
  port: number;
  /** Stops accepting connections; resolves once every open connection has ended. */
  close(): Promise<void>;
  /** Ends every connection now, idle keep-alive ones included. */
  closeAll(): void;
  /** Resolves once the server has closed. */
  finished: Promise<void>;
}

/** node:http's default: a request line and headers of more than 16 KiB get 431. */
const DEFAULT_MAX_HEAD_BYTES = 16 << 10;

export interface ServeOptions {
  hostname: string;
  port: number;
  /** Largest request head (request line and headers) in bytes; a larger one gets 431. */
  maxHeadBytes?: number;
  /** Called for a handler that throws instead of answering. */
  onError: (e: unknown) => Response;
  /**
   * The answer to a request that never reached the handler (400, 408, 431), or whose body broke
   * off while the handler read it (400). Plain data: it may have to be written at once, before
   * node closes the connection.
   */
  onClientError: (status: number, message: string) => Answer;
  /** The answer to a method the fetch API cannot carry (TRACE, CONNECT) on `target`. */
  onMethod: (method: string, target: string, authorization?: string) => Answer;
}

/** An answer written as it is. */
export interface Answer {
  status: number;
  headers: Record<string, string>;
  body: string;
}

/** Methods that `new Request` refuses. */
const UNCARRIED = new Set(["CONNECT", "TRACE", "TRACK"]);

function toRequest(
  req: IncomingMessage,
  base: string,
  signal: AbortSignal,
  body: RequestBody | null,
): Request {
  const headers = new Headers();
  for (let i = 0; i + 1 < req.rawHeaders.length; i += 2) {
    try {
      headers.append(req.rawHeaders[i], req.rawHeaders[i + 1]);
    } catch { /* a header value the fetch API cannot hold: dropped */ }
  }
  // Origin-form targets ("/v1/info") are joined to the base; a target like "//x" must not be
  // read as another host.
  const target = req.url ?? "/";
  return new Request(new URL(target.startsWith("/") ? base + target : target), {
    method: req.method ?? "GET",
    headers,
    signal,
    ...(body ? { body: body.stream, duplex: "half" as const } : {}),
  } as RequestInit);
}

async function writeResponse(res: ServerResponse, response: Response): Promise<void> {
  const headers: Record<string, string> = {};
  response.headers.forEach((v, k) => headers[k] = v);
  res.writeHead(response.status, headers);
  if (!response.body) {
    res.end();
    return;
  }
  const reader = response.body.getReader();
  // A client that leaves mid-stream (an event stream, typically) cancels the body's source.
  const onClose = () => reader.cancel().catch(() => {});
  res.once("close", onClose);
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      if (res.destroyed) return;
      if (!res.write(value)) {
        await new Promise<void>((resolve) => {
          res.once("drain", resolve);
          res.once("close", resolve);
        });
      }
    }
    res.end();
  } catch {
    res.destroy();
  } finally {
    res.off("close", onClose);
  }
}

/**
 * Writes an answer on a socket that has no HTTP response object (a parse error, CONNECT), then
 * closes it. The rest of what the client sends is read and dropped, so that the answer is not
 * lost to a reset while the client is still sending.
 */
function answerSocket(socket: Socket, a: Answer) {
  if (socket.destroyed || !socket.writable) {
    socket.destroy();
    return;
  }
  const body = new TextEncoder().encode(a.body);
  const lines = [`HTTP/1.1 ${a.status} ${STATUS_CODES[a.status] ?? ""}`];
  for (const [k, v] of Object.entries(a.headers)) {
    if (k !== "content-length" && k !== "connection") lines.push(`${k}: ${v}`);
  }
  lines.push(`content-length: ${body.length}`, "connection: close", "", "");
  socket.on("data", () => {});
  socket.resume();
  socket.setTimeout(10_000, () => socket.destroy());
  socket.end(new Uint8Array([...new TextEncoder().encode(lines.join("\r\n")), ...body]));
}

interface ParseError extends Error {
  code?: string;
  reason?: string;
}

/** Binds at once; rejects when the address cannot be bound. */
export function serveHttp(
  handler: (req: Request) => Response | Promise<Response>,
  opts: ServeOptions,
): Promise<HttpServer> {
  const host = opts.hostname.includes(":") ? `[${opts.hostname}]` : opts.hostname;
  const maxHead = opts.maxHeadBytes ?? DEFAULT_MAX_HEAD_BYTES;
  const { onError, onClientError, onMethod } = opts;
  // The request in progress on each connection, for parse errors that happen meanwhile.
  const current = new WeakMap<
    Socket,
    { req: IncomingMessage; body: RequestBody | null; res: ServerResponse }
  >();

  const serve = (req: IncomingMessage, res: ServerResponse, expectsContinue: boolean) => {
    const socket = req.socket;
    const controller = new AbortController();
    const method = (req.method ?? "GET").toUpperCase();
    const hasBody = method !== "GET" && method !== "HEAD";
    const body = hasBody
      ? requestBody(req, {
        onFirstRead: () => expectsContinue && res.writeContinue(),
        // Node closes the connection as soon as the body breaks off: a client that stopped
        // sending but still listens hears why only if the answer goes out now.
        onBroken: (message) => {
          if (res.headersSent || res.destroyed) return;
          const a = onClientError(400, message);
          res.writeHead(a.status, { ...a.headers, connection: "close" }).end(a.body);
        },
      })
      : null;
    const entry = { req, body, res };
    current.set(socket, entry);
    res.once("close", () => {
      if (!res.writableFinished) controller.abort(new DOMException("client gone", "AbortError"));
      // Whatever the handler left unread is dropped; the connection stays usable.
      body?.abandon();
      if (current.get(socket) === entry) current.delete(socket);
    });
    let request: Request | null = null;
    let refusal: Answer | null = null;
    if (UNCARRIED.has(method)) {
      refusal = onMethod(method, req.url ?? "/", req.headers.authorization);
    } else {
      try {
        request = toRequest(req, `http://${host}`, controller.signal, body);
      } catch (e) {
        const why = e instanceof Error ? e.message : String(e);
        refusal = onClientError(400, `the request cannot be read (${why})`);
      }
    }
    (async () => {
      let response = refusal && new Response(refusal.body, refusal);
      if (request) {
        try {
          response = await handler(request);
        } catch (e) {
          response = onError(e);
        }
      }
      // Answered already when the body broke off.
      if (res.headersSent) await response!.body?.cancel();
      else await writeResponse(res, response!);
    })().catch(() => res.destroy());
  };

  const server = createServer({ maxHeaderSize: maxHead }, (req, res) => serve(req, res, false));
  // Without this listener node sends 100 Continue at once; here it goes out when the handler
  // reads the body, so a request refused from its head (401, 413, 415) is never sent whole.
  server.on("checkContinue", (req, res) => serve(req, res, true));
  server.on("connect", (req: IncomingMessage, socket: Socket) => {
    answerSocket(socket, onMethod("CONNECT", req.url ?? "", req.headers.authorization));
  });
  server.on("clientError", (err: ParseError, socket: Socket) => {
    const inProgress = current.get(socket);
    const parse = err.code?.startsWith("HPE_") ?? false;
    if (inProgress && !inProgress.res.writableFinished) {
      if (!inProgress.req.complete) {
        // The parser broke in this request's body: the request in progress answers.
        if (parse) inProgress.body?.fail(err.reason ?? err.message);
        inProgress.res.once("finish", () => socket.end());
      } else {
        // A request pipelined behind it is malformed: answered once the one before is.
        const a = onClientError(400, `malformed HTTP request (${err.reason ?? err.message})`);
        inProgress.res.once("finish", () => parse ? answerSocket(socket, a) : socket.end());
      }
      return;
    }
    if (err.code === "ECONNRESET" || !socket.writable) {
      socket.destroy();
      return;
    }
    const [status, message] = err.code === "HPE_HEADER_OVERFLOW"
      ? [431, `the request line and headers are over the limit of ${maxHead} bytes`]
      : err.code === "ERR_HTTP_REQUEST_TIMEOUT"
      ? [408, "the request did not arrive in time"]
      : [400, `malformed HTTP request (${err.reason ?? err.message})`];
    answerSocket(socket, onClientError(status, message));
  });
  const finished = new Promise<void>((resolve) => server.once("close", () => resolve()));
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(opts.port, opts.hostname, () => {
      server.off("error", reject);
      resolve({
        port: (server.address() as AddressInfo).port,
        close: () => {
          server.close();
          server.closeIdleConnections?.();
          return finished;
        },
        closeAll: () => server.closeAllConnections?.(),
        finished,
      });
    });
  });
}
