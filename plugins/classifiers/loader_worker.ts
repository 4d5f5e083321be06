/**
 * A Worker that prepares images for the loader (loader.ts): decoding and augmentation run here,
 * off the thread that drives libtorch, so the next batches are ready when a step ends.
 */
import { readImage, type RgbImage } from "../../core/image.ts";
import { setNumThreads } from "../../ffi/mod.ts";
import { type PrepareJob, type PrepareSpec, transformImage } from "./prepare.ts";

interface Request {
  id: number;
  job: PrepareJob;
  spec: PrepareSpec;
}

const post = (msg: unknown, transfer: Transferable[] = []) =>
  (self as unknown as Worker).postMessage(msg, transfer);
const message = (err: unknown) => (err instanceof Error ? err.message : String(err));

// The libtorch ops here (the blur) stay on this thread, as in a PyTorch DataLoader worker: the
// cores belong to the other workers and to the training step (see ImageLoader's #startPool).
setNumThreads(1);

/** A job whose file is being read and decoded (off this thread, by the decoder's own pool). */
interface Started {
  req: Request;
  image: Promise<RgbImage | Error>;
}

const queue: Request[] = [];
let running = false;

const start = (req: Request): Started => ({
  req,
  image: readImage(req.job.path).catch((e) => new Error(message(e))),
});

// Jobs run in arrival order, one transform at a time; while one is transformed, the next one's
// decoding already runs (decoding happens off the JavaScript thread). Never more than those two
// are in hand, whatever the loader has queued, so memory stays at two decoded images.
async function run(): Promise<void> {
  running = true;
  let next: Started | undefined = queue.length ? start(queue.shift()!) : undefined;
  while (next) {
    const { req, image } = next;
    const decoded = await image;
    next = queue.length ? start(queue.shift()!) : undefined;
    try {
      if (decoded instanceof Error) throw decoded;
      const pixels = transformImage(decoded, req.job, req.spec);
      post({ id: req.id, pixels }, [pixels.buffer]);
    } catch (err) {
      post({ id: req.id, error: message(err) });
    }
  }
  running = false;
}

self.onmessage = (e: MessageEvent<Request>) => {
  queue.push(e.data);
  if (!running) run();
};
