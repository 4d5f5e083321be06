/**
 * Downloading one file of a Hub repository into the Hugging Face cache, in huggingface_hub's own
 * layout so that either tool finds what the other fetched:
 *   blobs/<etag>.incomplete   the bytes so far (a rerun resumes from them with a Range request)
 *   blobs/<etag>              the whole file, renamed from .incomplete once its size is right
 *                             and, for an LFS file, its sha256 is the etag
 *   snapshots/<commit>/<path> a relative symlink to the blob, made last
 *   ../.locks/models--org--name/<etag>.lock  held while downloading, as huggingface_hub holds it
 * A file under snapshots/ or blobs/ is therefore always complete; an interrupted download leaves
 * only the .incomplete file, and a corrupt one (wrong checksum, a resumed answer from the wrong
 * offset) leaves nothing.
 */
import { createHash, type Hash } from "node:crypto";
import { basename, dirname, join, relative } from "node:path";
import { ByteProgress, type ByteProgressOptions, formatDuration } from "./progress.ts";

/** A file as the Hub's paths-info describes it. */
export interface RemoteFile {
  /** Path inside the repository. */
  path: string;
  size: number;
  /** The blob name: the LFS sha256, else the git object id (huggingface_hub's etag). */
  etag: string;
  /** An LFS file's sha256 (hex), which the downloaded bytes must match. */
  sha256?: string;
}

/** How a wait for another process's lock on the same blob is reported. */
export interface LockNotice {
  /** Say so once the wait has lasted this long, in ms; then again every minute. */
  afterMs: number;
  /** Gets each line, "\n" included. */
  write: (text: string) => void;
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
  /** What the messages call the download, e.g. "download org/name unet/config.json". */
  label: string;
  lockNotice: LockNotice;
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
    await withLock(lock, d, async () => {
      if (sizeOf(blob) === null) await fetchBlob(d, blob);
    });
  }
  linkPointer(blob, pointer);
  return pointer;
}

/** flock(2) on the lock file, as Python's filelock takes it: each side waits for the other. */
async function withLock(path: string, d: BlobDownload, fn: () => Promise<void>): Promise<void> {
  Deno.mkdirSync(dirname(path), { recursive: true });
  const file = await Deno.open(path, { create: true, write: true });
  try {
    await lockSayingSo(file, path, d);
    await fn();
  } finally {
    file.close();
  }
}

const LOCK_NOTICE_REPEAT_MS = 60_000;

/**
 * Takes the lock, and while another process holds it says so now and then. The wait has no end:
 * the holder may be a download of gigabytes, and only a person can tell a hung one (and stop it,
 * or this one with Ctrl-C).
 */
async function lockSayingSo(file: Deno.FsFile, path: string, d: BlobDownload): Promise<void> {
  const start = performance.now();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const notice = () => {
    const waited = formatDuration((performance.now() - start) / 1000);
    d.lockNotice.write(
      `${d.label}: waiting for the lock ${path}, which another process holds (it is ` +
        `downloading the same file); ${waited} so far\n`,
    );
    timer = setTimeout(notice, LOCK_NOTICE_REPEAT_MS);
  };
  timer = setTimeout(notice, d.lockNotice.afterMs);
  try {
    await file.lock(true);
  } finally {
    clearTimeout(timer);
  }
}

async function fetchBlob(d: BlobDownload, blob: string): Promise<void> {
  const incomplete = `${blob}.incomplete`;
  Deno.mkdirSync(dirname(blob), { recursive: true });
  const size = d.file.size;
  let have = sizeOf(incomplete) ?? 0;
  if (have > size) have = 0;
  const hash = d.file.sha256 ? createHash("sha256") : null;
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
    const from = res.status === 206 ? rangeStart(res.headers.get("content-range")) : 0;
    if (from !== have && from !== 0) {
      await res.body.cancel();
      // Resuming from the same place would meet the same answer: the next attempt starts over.
      removeIfThere(incomplete);
      const sent = from === null
        ? "a partial answer without a Content-Range"
        : `bytes from ${from}`;
      throw new Error(
        `${d.file.path}: asked for the bytes from ${have} on, the server sent ${sent}; the ` +
          "partial download was deleted and the next attempt starts over",
      );
    }
    have = from;
    if (hash) await hashPrefix(incomplete, have, hash);
    have = await streamInto(d, res.body, incomplete, have, hash);
  } else {
    Deno.writeFileSync(incomplete, new Uint8Array(), { append: true });
    if (hash) await hashPrefix(incomplete, have, hash);
  }
  if (have !== size) {
    throw new Error(
      `the download of ${d.file.path} stopped at ${have} of ${size} bytes (the next attempt ` +
        "resumes it)",
    );
  }
  const digest = hash?.digest("hex");
  if (digest !== undefined && digest !== d.file.sha256) {
    removeIfThere(incomplete);
    throw new Error(
      `${d.file.path}: the downloaded bytes have sha256 ${digest}, the Hub lists ` +
        `${d.file.sha256}; the download was deleted and the next attempt fetches it again`,
    );
  }
  Deno.renameSync(incomplete, blob);
}

/** The first byte of a 206 answer ("bytes 100-199/200"), null when the header says none. */
function rangeStart(header: string | null): number | null {
  const m = /^bytes\s+(\d+)-\d+\/(\d+|\*)$/i.exec(header?.trim() ?? "");
  return m ? Number(m[1]) : null;
}

/** Feeds the first `bytes` of `path` (the bytes a resumed download keeps) to the hash. */
async function hashPrefix(path: string, bytes: number, hash: Hash): Promise<void> {
  if (bytes === 0) return;
  using file = await Deno.open(path, { read: true });
  const buf = new Uint8Array(1 << 20);
  let left = bytes;
  while (left > 0) {
    const n = await file.read(left < buf.length ? buf.subarray(0, left) : buf);
    if (n === null) throw new Error(`${path} ended after ${bytes - left} of ${bytes} bytes`);
    hash.update(buf.subarray(0, n));
    left -= n;
  }
}

/**
 * Appends the body to `path` (from byte `have`), with progress and into `hash`; returns the
 * bytes on disk.
 */
async function streamInto(
  d: BlobDownload,
  body: ReadableStream<Uint8Array>,
  path: string,
  have: number,
  hash: Hash | null,
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
      hash?.update(value);
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
    try {
      Deno.symlinkSync(relative(dirname(pointer), blob), tmp);
    } catch {
      Deno.copyFileSync(blob, tmp); // a file system without symlinks
    }
    Deno.renameSync(tmp, pointer);
  } catch (e) {
    removeIfThere(tmp); // a half-copied file must not stay beside the snapshot entries
    throw e;
  }
}

function removeIfThere(path: string): void {
  try {
    Deno.removeSync(path);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
}
