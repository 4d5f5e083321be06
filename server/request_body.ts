/**
 * A node:http request body as a web ReadableStream, pulled one chunk per read.
 *
 * Why not `Readable.toWeb(req)`: when its reader gives up while the client keeps sending (a
 * chunked body over the size limit), that adapter still receives 'data' events and enqueues
 * them into the cancelled stream, which throws outside any handler and ends the process. Here
 * nothing is enqueued once the stream has ended, failed or been cancelled; the rest of an
 * abandoned body is read and dropped, so the answer still reaches a client that is busy
 * sending, and the connection closes once the client is done.
 */
import type { IncomingMessage } from "node:http";

/** The body did not arrive whole: the connection ended or its framing broke mid-body. */
export class BodyError extends Error {
  override name = "BodyError";
}

export interface RequestBody {
  stream: ReadableStream<Uint8Array>;
  /** Stops delivering: what is left of the body is read and dropped. */
  abandon(): void;
  /** The connection's parser failed mid-body (`reason`): the stream fails with it. */
  fail(reason: string): void;
}

export interface BodyEvents {
  /** The handler reads for the first time: the moment to send 100 Continue. */
  onFirstRead?: () => void;
  /** The body broke off (the stream fails with `message`); called before node closes up. */
  onBroken?: (message: string) => void;
}

export function requestBody(req: IncomingMessage, events: BodyEvents = {}): RequestBody {
  let state: "idle" | "reading" | "done" = "idle";
  let received = 0;
  let controller!: ReadableStreamDefaultController<Uint8Array>;
  const declared = req.headers["content-length"];

  const settle = (f: () => void) => {
    if (state === "done") return;
    state = "done";
    try {
      f();
    } catch { /* the stream was already closed or errored by its reader */ }
  };
  const abandon = () => {
    settle(() => {});
    // Flowing with nothing left to deliver to: node drops the bytes as they come.
    req.resume();
  };
  const cutOff = (why?: string) => {
    if (state === "done") return;
    // What came before the break but was not read yet counts as arrived.
    const arrived = received + req.readableLength;
    const message = why
      ? `the body is malformed (${why}) after ${arrived} bytes`
      : declared !== undefined
      ? `the body is truncated: ${arrived} of ${declared} bytes arrived before the connection ended`
      : `the body is truncated: the connection ended after ${arrived} bytes, before the last chunk`;
    settle(() => controller.error(new BodyError(message)));
    events.onBroken?.(message);
  };
  const onData = (chunk: Uint8Array) => {
    if (state === "done") return;
    received += chunk.length;
    try {
      // A copy: node may reuse the buffer of a chunk once the event returns.
      controller.enqueue(new Uint8Array(chunk));
    } catch {
      abandon();
      return;
    }
    if ((controller.desiredSize ?? 0) <= 0) req.pause();
  };

  req.once("end", () => settle(() => controller.close()));
  req.once("aborted", () => cutOff());
  // A listener must stay: an 'error' event without one throws.
  req.on("error", () => cutOff());
  req.once("close", () => {
    if (!req.complete) cutOff();
  });

  const stream = new ReadableStream<Uint8Array>({
    start(c) {
      controller = c;
    },
    pull() {
      if (state === "idle") {
        state = "reading";
        events.onFirstRead?.();
        req.on("data", onData);
      }
      if (state === "reading") req.resume();
    },
    cancel() {
      abandon();
    },
  }, { highWaterMark: 0 });
  return { stream, abandon, fail: cutOff };
}
