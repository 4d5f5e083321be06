/**
 * A Worker that prepares images for the loader (loader.ts): decoding and augmentation run here,
 * off the thread that drives libtorch, so the next batches are ready when a step ends.
 */
import { prepareImage, type PrepareJob, type PrepareSpec } from "./prepare.ts";

interface Request {
  id: number;
  job: PrepareJob;
  spec: PrepareSpec;
}

const post = (msg: unknown, transfer: Transferable[] = []) =>
  (self as unknown as Worker).postMessage(msg, transfer);

async function handle({ id, job, spec }: Request): Promise<void> {
  try {
    const pixels = await prepareImage(job, spec);
    post({ id, pixels }, [pixels.buffer]);
  } catch (err) {
    post({ id, error: err instanceof Error ? err.message : String(err) });
  }
}

// One image at a time, in arrival order: the loader queues jobs here ahead of need, and running
// them all at once would only hold more decoded images in memory.
let chain = Promise.resolve();
self.onmessage = (e: MessageEvent<Request>) => {
  chain = chain.then(() => handle(e.data));
};
