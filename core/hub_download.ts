/**
 * Downloading one file of a Hub repository into the Hugging Face cache, in huggingface_hub's own
 * layout so that either tool finds what the other fetched:
 *   blobs/<etag>.incomplete   the bytes so far (a rerun resumes from them with a Range request)
 *   blobs/<etag>              the whole file, renamed from .incomplete once its size is right
 *   snapshots/<commit>/<path> a relative symlink to the blob, made last
 *   ../.locks/models--org--name/<etag>.lock  held while downloading, as huggingface_hub holds it
 * A file under snapshots/ or blobs/ is therefore always complete; an interrupted download leaves
 * only the .incomplete file.
 */
import { basename, dirname, join, relative } from "node:path";
import { ByteProgress, type ByteProgressOptions } from "./progress.ts";

/** A file as the Hub's paths-info describes it. */
export interface RemoteFile {
  /** Path inside the repository. */
  path: string;
  size: number;
  /** The blob name: the LFS sha256, else the git object id (huggingface_hub's etag). */
  etag: string;
}

export interface BlobDownload {
  /** The file's resolve URL at the commit. */
  url: string;
  /** <cache>/models--org--name */
  repoDir: string;
  commit: string;
  file: RemoteFile;
  accessToken?: string;
  fetch: typeof fetch;
  /** Give up when no byte arrives for this long, in ms; the bytes so far stay for a rerun. */
  idleMs: number;
  /** Progress display (label included); false for none. */
  progress: ByteProgressOptions | false;
}

/** An HTTP answer that is not the file; `statusCode` as @huggingface/hub's errors carry it. */
export class HttpError extends Error {
  constructor(message: string, readonly statusCode: number) {
    super(message);
  }
}

function sizeOf(path: string): number | null {
  try {
    return Deno.statSync(path).size;
  } catch {
    return null;
  }
}

/** Downloads the file (unless its blob is already there) and returns its snapshot path. */
export async function downloadToCache(d: BlobDownload): Promise<string> {
  const blob = join(d.repoDir, "blobs", d.file.etag);
  const pointer = join(d.repoDir, "snapshots", d.commit, d.file.path);
  if (sizeOf(blob) === null) {
    const lock = join(dirname(d.repoDir), ".locks", basename(d.repoDir), `${d.file.etag}.lock`);
    // Another process (a second worker, a Python download) may be fetching the same blob: wait
    // for it, then take its result instead of writing the same .incomplete file at once.
    await withLock(lock, async () => {
      if (sizeOf(blob) === null) await fetchBlob(d, blob);
    });
  }
  linkPointer(blob, pointer);
  return pointer;
}

async function withLock(path: string, fn: () => Promise<void>): Promise<void> {
  Deno.mkdirSync(dirname(path), { recursive: true });
  const file = await Deno.open(path, { create: true, write: true });
  try {
    await file.lock(true);
    await fn();
  } finally {
    file.close();
  }
}

async function fetchBlob(d: BlobDownload, blob: string): Promise<void> {
  const incomplete = `${blob}.incomplete`;
  Deno.mkdirSync(dirname(blob), { recursive: true });
  const size = d.file.size;
  let have = sizeOf(incomplete) ?? 0;
  if (have > size) have = 0;
  if (have < size) {
    // Byte offsets and sizes are of the file itself, so no transfer compression.
    const headers: Record<string, string> = { "Accept-Encoding": "identity" };
    if (d.accessToken) headers.Authorization = `Bearer ${d.accessToken}`;
    if (have > 0) headers.Range = `bytes=${have}-`;
    const res = await d.fetch(d.url, { headers });
    if (!res.ok || !res.body) {
      await res.body?.cancel();
      throw new HttpError(`HTTP ${res.status} for ${d.file.path}`, res.status);
    }
    // A server that ignores the range sends the whole file: start over.
    if (res.status !== 206) have = 0;
    have = await streamInto(d, res.body, incomplete, have);
  } else {
    Deno.writeFileSync(incomplete, new Uint8Array(), { append: true });
  }
  if (have !== size) {
    throw new Error(
      `the download of ${d.file.path} stopped at ${have} of ${size} bytes (the next attempt ` +
        "resumes it)",
    );
  }
  Deno.renameSync(incomplete, blob);
}

/** Appends the body to `path` (from byte `have`), with progress; returns the bytes on disk. */
async function streamInto(
  d: BlobDownload,
  body: ReadableStream<Uint8Array>,
  path: string,
  have: number,
): Promise<number> {
  const progress = d.progress === false ? null : new ByteProgress(d.file.size, have, d.progress);
  const file = await Deno.open(path, {
    create: true,
    write: true,
    append: have > 0,
    truncate: have === 0,
  });
  const reader = body.getReader();
  let ok = false;
  try {
    for (;;) {
      const { done, value } = await readWithin(reader, d.idleMs, d.file.path);
      if (done) break;
      for (let off = 0; off < value.length;) off += await file.write(value.subarray(off));
      have += value.length;
      if (have > d.file.size) {
        throw new Error(
          `${d.file.path}: the Hub sent more than the ${d.file.size} bytes it listed`,
        );
      }
      progress?.update(have);
    }
    ok = have === d.file.size;
    return have;
  } finally {
    file.close();
    if (ok) progress?.finish();
    else {
      progress?.abort();
      await reader.cancel().catch(() => {});
    }
  }
}

/** The next chunk, or a TimeoutError when none comes within `ms`. */
async function readWithin(
  reader: ReadableStreamDefaultReader<Uint8Array>,
  ms: number,
  what: string,
): Promise<ReadableStreamReadResult<Uint8Array>> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new DOMException(`no data for ${what} in ${ms} ms`, "TimeoutError")),
      ms,
    );
  });
  try {
    return await Promise.race([reader.read(), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Points snapshots/<commit>/<path> at the blob, replacing any stale entry in one rename. */
function linkPointer(blob: string, pointer: string): void {
  Deno.mkdirSync(dirname(pointer), { recursive: true });
  const tmp = `${pointer}.${crypto.randomUUID().slice(0, 8)}.tmp`;
  try {
    Deno.symlinkSync(relative(dirname(pointer), blob), tmp);
  } catch {
    Deno.copyFileSync(blob, tmp); // a file system without symlinks
  }
  Deno.renameSync(tmp, pointer);
}
