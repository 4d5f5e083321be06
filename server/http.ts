/**
 * Serves a fetch-style handler (`(Request) => Response`, as Hono's `app.fetch`) over node:http.
 *
 * Why not Deno.serve: a request's AbortSignal must fire when its client goes away while the
 * request waits in the engine's queue, so that the queue drops it. Deno.serve only notices a
 * closed connection while it still reads from it, which it stops doing once a request body of
 * more than a few hundred bytes has been read: every upload with an image would stay queued and
 * run for nobody. node:http reports the closed socket in every case ('close' on the response
 * before it has finished).
 */
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { Readable } from "node:stream";

export interface HttpServer {
  port: number;
  /** Stops accepting connections; resolves once every open connection has ended. */
  close(): Promise<void>;
  /** Ends every connection now, idle keep-alive ones included. */
  closeAll(): void;
  /** Resolves once the server has closed. */
  finished: Promise<void>;
}

export interface ServeOptions {
  hostname: string;
  port: number;
  /** Called for a handler that throws instead of answering. */
  onError?: (e: unknown) => Response;
}

function toRequest(req: IncomingMessage, base: string, signal: AbortSignal): Request {
  const headers = new Headers();
  for (let i = 0; i + 1 < req.rawHeaders.length; i += 2) {
    try {
      headers.append(req.rawHeaders[i], req.rawHeaders[i + 1]);
    } catch { /* a header value the fetch API cannot hold: dropped */ }
  }
  const method = req.method ?? "GET";
  const hasBody = method !== "GET" && method !== "HEAD";
  // Origin-form targets ("/v1/info") are joined to the base; a target like "//x" must not be
  // read as another host.
  const target = req.url ?? "/";
  return new Request(new URL(target.startsWith("/") ? base + target : target), {
    method,
    headers,
    signal,
    ...(hasBody
      ? { body: Readable.toWeb(req) as ReadableStream<Uint8Array>, duplex: "half" as const }
      : {}),
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

/** Binds at once; rejects when the address cannot be bound. */
export function serveHttp(
  handler: (req: Request) => Response | Promise<Response>,
  opts: ServeOptions,
): Promise<HttpServer> {
  const host = opts.hostname.includes(":") ? `[${opts.hostname}]` : opts.hostname;
  const onError = opts.onError ?? (() => new Response("internal error", { status: 500 }));
  const server = createServer((req, res) => {
    const controller = new AbortController();
    res.once("close", () => {
      if (!res.writableFinished) controller.abort(new DOMException("client gone", "AbortError"));
    });
    let request: Request;
    try {
      request = toRequest(req, `http://${host}`, controller.signal);
    } catch {
      res.writeHead(400, { "content-type": "text/plain", connection: "close" }).end("bad request");
      return;
    }
    (async () => {
      let response: Response;
      try {
        response = await handler(request);
      } catch (e) {
        response = onError(e);
      }
      await writeResponse(res, response);
    })();
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
