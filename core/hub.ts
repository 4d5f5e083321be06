/**
 * Model references: a local folder, or a Hugging Face Hub id `org/name` with an optional
 * `@revision` (branch, tag, `refs/pr/N` or a 40-hex commit), e.g.
 * `openai/clip-vit-base-patch16@refs/pr/10`.
 *
 * Hub ids resolve in the standard cache that huggingface_hub (Python) and @huggingface/hub share,
 * so models downloaded by either are found without copying:
 *   <cache>/models--org--name/refs/<revision>          the commit a branch/tag/PR points at
 *   <cache>/models--org--name/snapshots/<commit>/<path> the files (symlinks into blobs/)
 *   <cache>/models--org--name/.no_exist/<commit>/<path> files known to be absent
 * `refs/pr/10` is stored as the file `refs/refs/pr/10`: the revision is used as a relative path.
 *
 * A file missing from the cache is downloaded (unless offline) into the same layout, with progress
 * on stderr (core/hub_download.ts); `dipsy fetch` downloads a whole model set. Pickle checkpoints
 * (`.bin`, `.pt`, ...) are never resolved: they can run code on load.
 */
import { dirname, isAbsolute, join, normalize, resolve } from "node:path";
import { UserError } from "../ffi/errors.ts";
import { downloadToCache, HttpError, type RemoteFile } from "./hub_download.ts";
import type { ByteProgressOptions } from "./progress.ts";

const DEFAULT_ENDPOINT = "https://huggingface.co";
const COMMIT = /^[0-9a-f]{40}$/;
/** huggingface_hub's repo id rule: one or two parts of word characters, '-' and '.'. */
const REPO_PART = /^[A-Za-z0-9_.-]{1,96}$/;
const PICKLE = /\.(bin|pt|pth|ckpt|pkl|pickle)$/i;

type Env = (name: string) => string | undefined;
const processEnv: Env = (name) => Deno.env.get(name);

export type ModelRef =
  | { kind: "local"; path: string }
  | { kind: "hub"; repo: string; revision: string };

export interface HubOptions {
  /** Cache root (default: `hubCacheDir()`). */
  cacheDir?: string;
  /** Never touch the network (default: `HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`). */
  offline?: boolean;
  /** Hub URL (default: `HF_ENDPOINT`, else https://huggingface.co). */
  endpoint?: string;
  /** Access token for gated or private repos (default: `HF_TOKEN`). */
  token?: string;
  /** How long to wait for the Hub to answer each request, in ms (default 10000). */
  timeoutMs?: number;
  /** Download progress (default: on stderr, redrawn on a terminal); false: none. */
  progress?: Omit<ByteProgressOptions, "label"> | false;
  /**
   * How long to wait for a file another process is downloading (it holds the file's lock under
   * .locks/) before saying so, in ms (default 5000); the line goes where progress goes, on
   * stderr when there is none. The wait itself has no end.
   */
  lockNoticeMs?: number;
}

export interface FileOptions extends HubOptions {
  /** Folder inside the model, e.g. "unet" in a diffusers pipeline. */
  subfolder?: string;
}

/** A model, revision or file that could not be found or fetched. */
export class ModelNotFoundError extends UserError {
  constructor(
    message: string,
    readonly ref: string,
    readonly file?: string,
    /** Why it could not be fetched, in a few words (without the remedy). */
    readonly reason?: string,
  ) {
    super(message);
  }
}

/** The Hub cache root: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub. */
export function hubCacheDir(env: Env = processEnv): string {
  const explicit = env("HF_HUB_CACHE") ?? env("HUGGINGFACE_HUB_CACHE");
  if (explicit) return expandHome(explicit, env);
  const home = env("HF_HOME");
  if (home) return join(expandHome(home, env), "hub");
  const xdg = env("XDG_CACHE_HOME");
  const cache = xdg ? expandHome(xdg, env) : join(homeDir(env), ".cache");
  return join(cache, "huggingface", "hub");
}

/** Whether the environment forbids network access, as huggingface_hub reads it. */
export function isOffline(env: Env = processEnv): boolean {
  const v = env("HF_HUB_OFFLINE") || env("TRANSFORMERS_OFFLINE");
  return v !== undefined && ["1", "ON", "YES", "TRUE"].includes(v.toUpperCase());
}

function homeDir(env: Env): string {
  const home = env("HOME") ?? env("USERPROFILE");
  if (!home) {
    throw new UserError(
      "cannot locate the Hugging Face cache: HOME is not set (set HF_HUB_CACHE or HF_HOME)",
    );
  }
  return home;
}

function expandHome(p: string, env: Env): string {
  return p === "~" || p.startsWith("~/") ? join(homeDir(env), p.slice(1)) : p;
}

function isDirectory(p: string): boolean {
  try {
    return Deno.statSync(p).isDirectory;
  } catch {
    return false;
  }
}

/** True for a regular file, following symlinks (a snapshot entry whose blob is gone is not). */
function isFile(p: string): boolean {
  try {
    return Deno.statSync(p).isFile;
  } catch {
    return false;
  }
}

function looksLikePath(s: string): boolean {
  return s.startsWith("/") || s.startsWith(".") || s.startsWith("~") || s.includes("\\") ||
    /^[A-Za-z]:/.test(s);
}

/**
 * Parses a model reference. An existing directory always wins (as in transformers), so a folder
 * named `org/name` in the working directory shadows the Hub id.
 */
export function parseModelRef(ref: string, env: Env = processEnv): ModelRef {
  const text = ref.trim();
  if (!text) throw new ModelNotFoundError("empty model reference", ref);
  const local = expandHome(text, env);
  if (isDirectory(local)) return { kind: "local", path: resolve(local) };
  if (looksLikePath(text)) {
    throw new ModelNotFoundError(`model folder ${resolve(local)} does not exist`, ref);
  }
  const at = text.indexOf("@");
  const repo = at < 0 ? text : text.slice(0, at);
  const revision = at < 0 ? "main" : text.slice(at + 1);
  const parts = repo.split("/");
  const valid = parts.length <= 2 &&
    parts.every((p) => REPO_PART.test(p) && !/^[-.]|[-.]$|--|\.\./.test(p));
  if (!valid || !revision || revision.split("/").some((s) => s === "" || s === "." || s === "..")) {
    throw new ModelNotFoundError(
      `"${ref}" is neither an existing folder nor a Hub id like "org/name" or ` +
        `"org/name@revision"`,
      ref,
    );
  }
  return { kind: "hub", repo, revision };
}

function describe(ref: ModelRef): string {
  return ref.kind === "local" ? ref.path : `${ref.repo}@${ref.revision}`;
}

function repoFolder(cacheDir: string, repo: string): string {
  return join(cacheDir, `models--${repo.replaceAll("/", "--")}`);
}

/** The commit a revision points at in the cache, or null when the cache does not know it. */
function cachedCommit(repoDir: string, revision: string): string | null {
  try {
    const sha = Deno.readTextFileSync(join(repoDir, "refs", revision)).trim();
    if (COMMIT.test(sha)) return sha;
  } catch { /* no such ref */ }
  return COMMIT.test(revision) ? revision : null;
}

function relativeFile(path: string, subfolder?: string, where?: string): string {
  const rel = normalize(subfolder ? `${subfolder}/${path}` : path).replaceAll("\\", "/");
  const prefix = where ? `${where}: ` : "";
  if (!path) throw new UserError(`${prefix}no file path inside the model given`);
  if (isAbsolute(rel) || rel === ".." || rel.startsWith("../")) {
    throw new UserError(`${prefix}model file path must stay inside the model folder, got "${rel}"`);
  }
  return rel;
}

function refusePickle(file: string, where: string): void {
  if (PICKLE.test(file)) {
    throw new ModelNotFoundError(
      `${where}: "${file}" is a pickle checkpoint, which is never loaded (unpickling can run ` +
        "arbitrary code); use the .safetensors file instead",
      where,
      file,
    );
  }
}

/**
 * A file path inside a model as dipsy reads it (normalized, "/"-separated); a UserError that
 * starts with `where` when it leaves the model folder or names a pickle checkpoint.
 */
export function checkModelFile(path: string, where: string): string {
  const file = relativeFile(path, undefined, where);
  refusePickle(file, where);
  return file;
}

/** Pickle files a repo may hold instead of the safetensors file that was asked for. */
function pickleSiblings(file: string): string[] {
  const out = new Set<string>();
  if (!file.includes(".safetensors")) return [];
  out.add(file.replace(".safetensors", ".bin"));
  // transformers names its pickles pytorch_model.bin where the safetensors are model.safetensors.
  out.add(file.replace(/(^|\/)model\.safetensors/, "$1pytorch_model.bin"));
  out.delete(file);
  return [...out];
}

function pickleHint(folder: string | null, file: string): string {
  if (!folder) return "";
  const found = pickleSiblings(file).find((p) => isFile(join(folder, p)));
  if (!found) return "";
  return ` Only the pickle checkpoint "${found}" is there, and pickles are never loaded ` +
    "(unpickling can run arbitrary code): safetensors are required. Convert it (e.g. " +
    "`safetensors.torch.save_file(torch.load(path, weights_only=True), out)`) or use a revision " +
    "that has safetensors (the Hub's conversion bot often offers one as refs/pr/N).";
}

/** The one-line remedy for a model missing from the cache. */
function downloadHint(): string {
  return "Fetch it with `deno task dipsy fetch` (the default models; add --model, --ip-adapter, " +
    "--image-encoder or --clip REF for others), or pass a local folder instead of the Hub id.";
}

/** The absolute folder of a model: a local folder, or the cached snapshot of a Hub revision. */
export function resolveModelDir(ref: string, opts: HubOptions = {}): Promise<string> {
  return Promise.resolve().then(() => {
    const parsed = parseModelRef(ref);
    if (parsed.kind === "local") return parsed.path;
    const cacheDir = resolve(opts.cacheDir ?? hubCacheDir());
    const commit = cachedCommit(repoFolder(cacheDir, parsed.repo), parsed.revision);
    const snapshot = commit && join(repoFolder(cacheDir, parsed.repo), "snapshots", commit);
    if (snapshot && isDirectory(snapshot)) return snapshot;
    throw new ModelNotFoundError(
      `${describe(parsed)} is not in the Hugging Face cache (${cacheDir}); this call does not ` +
        `download whole repositories. ${downloadHint()}`,
      ref,
    );
  });
}

/**
 * The absolute path of one file of a model (`subfolder/path`), downloading it into the Hub cache
 * when it is missing there and the network is allowed.
 */
export async function resolveModelFile(
  ref: string,
  path: string,
  opts: FileOptions = {},
): Promise<string> {
  const parsed = parseModelRef(ref);
  const file = relativeFile(path, opts.subfolder);
  refusePickle(file, describe(parsed));
  if (parsed.kind === "local") {
    const full = join(parsed.path, file);
    if (isFile(full)) return full;
    throw new ModelNotFoundError(
      `model folder ${parsed.path} has no file "${file}".${pickleHint(parsed.path, file)}`,
      ref,
      file,
    );
  }

  const { repo, revision } = parsed;
  const cacheDir = resolve(opts.cacheDir ?? hubCacheDir());
  const repoDir = repoFolder(cacheDir, repo);
  const commit = cachedCommit(repoDir, revision);
  const snapshot = commit ? join(repoDir, "snapshots", commit) : null;
  if (snapshot && isFile(join(snapshot, file))) return join(snapshot, file);

  const where = `${repo}@${revision}${commit && commit !== revision ? ` (${commit})` : ""}`;
  // A cached pickle sibling explains the miss, but the Hub may still have the safetensors file
  // (only the pickle was downloaded), so it is a hint, not a reason to skip the download.
  const hint = pickleHint(snapshot, file);
  if (commit && isFile(join(repoDir, ".no_exist", commit, file))) {
    throw new ModelNotFoundError(
      `${where} has no file "${file}" (the cache records it as absent from that commit).${hint}`,
      ref,
      file,
      "the cache records it as absent from that commit",
    );
  }
  if (opts.offline ?? isOffline()) {
    throw new ModelNotFoundError(
      `"${file}" of ${where} is not in the Hugging Face cache (${cacheDir}) and offline mode ` +
        `(HF_HUB_OFFLINE) forbids downloading it.${hint} ${downloadHint()}`,
      ref,
      file,
      "offline mode (HF_HUB_OFFLINE) forbids downloading it",
    );
  }
  try {
    return await download(repo, revision, commit, file, cacheDir, opts);
  } catch (e) {
    const reason = explainDownloadError(e);
    throw new ModelNotFoundError(
      `"${file}" of ${where} is not in the Hugging Face cache (${cacheDir}) and downloading it ` +
        `failed: ${reason}.${hint} ${downloadHint()}`,
      ref,
      file,
      reason,
    );
  }
}

/**
 * The path of a model file when it is already there (a local folder, or the Hub cache), else
 * null; never touches the network.
 */
export function cachedModelFile(ref: string, file: string, opts: HubOptions = {}): string | null {
  const parsed = parseModelRef(ref);
  const rel = relativeFile(file);
  if (parsed.kind === "local") {
    return isFile(join(parsed.path, rel)) ? join(parsed.path, rel) : null;
  }
  const repoDir = repoFolder(resolve(opts.cacheDir ?? hubCacheDir()), parsed.repo);
  const commit = cachedCommit(repoDir, parsed.revision);
  const path = commit && join(repoDir, "snapshots", commit, rel);
  return path && isFile(path) ? path : null;
}

/**
 * The sizes in bytes of `files` of a Hub model as the Hub lists them now (files it does not have
 * are left out). Reads only: the commit found is not recorded in the cache.
 */
export async function remoteFileSizes(
  ref: string,
  files: string[],
  opts: HubOptions = {},
): Promise<Map<string, number>> {
  const parsed = parseModelRef(ref);
  if (parsed.kind === "local") return new Map();
  const api = hubApi(opts);
  const cacheDir = resolve(opts.cacheDir ?? hubCacheDir());
  const commit = cachedCommit(repoFolder(cacheDir, parsed.repo), parsed.revision) ??
    await remoteCommit(parsed.repo, parsed.revision, null, api);
  const remote = await remoteFiles(parsed.repo, commit, files.map((f) => relativeFile(f)), api);
  return new Map([...remote].map(([path, f]) => [path, f.size]));
}

/** Why a Hub request failed, in a few words. */
export function explainDownloadError(e: unknown): string {
  const status = (e as { statusCode?: number })?.statusCode;
  const msg = e instanceof Error ? e.message : String(e);
  if (status === 401 || status === 403) {
    return `access denied (HTTP ${status}); gated or private repos need a token in HF_TOKEN`;
  }
  if (status === 404) return `not found on the Hub (HTTP 404: ${msg})`;
  if (e instanceof Error && e.name === "TimeoutError") return msg;
  const cause = e instanceof Error && e.cause instanceof Error ? ` (${e.cause.message})` : "";
  // Query strings (the API's expand=... list) only bury the reason, and a proxy's HTML error page
  // would break the one line the reason is part of.
  const line = `${msg}${cause}`.replace(/\?[^\s)]*/g, "").replace(/\s+/g, " ").trim();
  return line.length > 300 ? `${line.slice(0, 300)}...` : line;
}

/** A fetch that gives up when the server does not answer within `ms` (the body may take longer). */
function fetchWithTimeout(ms: number, endpoint: string): typeof fetch {
  return async (input, init) => {
    const controller = new AbortController();
    const timer = setTimeout(
      () =>
        controller.abort(
          new DOMException(`no answer from ${endpoint} in ${ms} ms`, "TimeoutError"),
        ),
      ms,
    );
    init?.signal?.addEventListener("abort", () => controller.abort(init.signal?.reason));
    try {
      return await fetch(input, { ...init, signal: controller.signal });
    } finally {
      clearTimeout(timer);
    }
  };
}

/** The Hub URL: `endpoint`, else HF_ENDPOINT, else https://huggingface.co (no trailing "/"). */
function hubEndpoint(opts: HubOptions = {}): string {
  return (opts.endpoint ?? Deno.env.get("HF_ENDPOINT") ?? DEFAULT_ENDPOINT).replace(/\/+$/, "");
}

interface HubApi {
  hubUrl: string;
  accessToken?: string;
  fetch: typeof fetch;
  timeoutMs: number;
}

function hubApi(opts: HubOptions): HubApi {
  const hubUrl = hubEndpoint(opts);
  const timeoutMs = opts.timeoutMs ?? 10_000;
  const accessToken = opts.token ?? Deno.env.get("HF_TOKEN") ?? undefined;
  return { hubUrl, accessToken, fetch: fetchWithTimeout(timeoutMs, hubUrl), timeoutMs };
}

/**
 * The commit a revision points at now, recorded under refs/ as huggingface_hub does, so the
 * files of one revision all come from one commit. (@huggingface/hub alone files a download under
 * the last commit that touched the file.)
 */
async function remoteCommit(
  repo: string,
  revision: string,
  /** Where to record the commit under refs/; null: nowhere. */
  cacheDir: string | null,
  api: HubApi,
): Promise<string> {
  // Loaded on first download only: resolving cached files needs no network library.
  const hub = await import("@huggingface/hub");
  const info = await hub.modelInfo({
    name: repo,
    revision,
    hubUrl: api.hubUrl,
    accessToken: api.accessToken,
    fetch: api.fetch,
    additionalFields: ["sha"],
  });
  const commit = String(info.sha);
  if (!COMMIT.test(commit)) throw new Error(`the Hub returned no commit for ${revision}`);
  if (cacheDir !== null && commit !== revision) {
    writeRef(repoFolder(cacheDir, repo), revision, commit);
  }
  return commit;
}

/** Size and blob name of each of `paths` that the commit has (absent ones are left out). */
async function remoteFiles(
  repo: string,
  commit: string,
  paths: string[],
  api: HubApi,
): Promise<Map<string, RemoteFile>> {
  const hub = await import("@huggingface/hub");
  const infos = await hub.pathsInfo({
    repo: { type: "model", name: repo },
    paths,
    revision: commit,
    hubUrl: api.hubUrl,
    accessToken: api.accessToken,
    fetch: api.fetch,
  });
  const out = new Map<string, RemoteFile>();
  for (const info of infos) {
    if (info.type !== "file" || !paths.includes(info.path)) continue;
    const etag = info.lfs?.oid ?? info.oid;
    if (!etag || /[\\/]|^\.\.?$/.test(etag)) {
      throw new Error(`the Hub gave no usable object id for ${info.path}`);
    }
    const sha256 = info.lfs?.oid;
    if (sha256 !== undefined && !/^[0-9a-f]{64}$/.test(sha256)) {
      throw new Error(`the Hub gave no sha256 for the LFS file ${info.path}`);
    }
    out.set(info.path, { path: info.path, size: info.lfs?.size ?? info.size, etag, sha256 });
  }
  return out;
}

function encodePath(path: string): string {
  return path.split("/").map(encodeURIComponent).join("/");
}

async function download(
  repo: string,
  revision: string,
  knownCommit: string | null,
  file: string,
  cacheDir: string,
  opts: HubOptions,
): Promise<string> {
  const api = hubApi(opts);
  // Pin the download to a commit: the cached one (so a partly cached revision stays
  // consistent), else the one the revision points at now.
  const commit = knownCommit ?? await remoteCommit(repo, revision, cacheDir, api);
  const repoDir = repoFolder(cacheDir, repo);
  const remote = (await remoteFiles(repo, commit, [file], api)).get(file);
  if (!remote) {
    // Recorded as huggingface_hub records it: a commit never changes, so neither does the answer.
    const marker = join(repoDir, ".no_exist", commit, file);
    Deno.mkdirSync(dirname(marker), { recursive: true });
    Deno.writeTextFileSync(marker, "");
    throw new HttpError(`commit ${commit} has no file "${file}"`, 404);
  }
  const label = `download ${repo} ${file}`;
  const progress = opts.progress === false ? false : { ...opts.progress, label };
  const write = (opts.progress !== false && opts.progress?.write) || writeStderr;
  return await downloadToCache({
    url: `${api.hubUrl}/${repo}/resolve/${commit}/${encodePath(file)}`,
    repoDir,
    commit,
    file: remote,
    accessToken: api.accessToken,
    fetch: api.fetch,
    idleMs: Math.max(api.timeoutMs, 30_000),
    progress,
    label,
    lockNotice: { afterMs: opts.lockNoticeMs ?? 5000, write },
  });
}

function writeStderr(text: string): void {
  const bytes = new TextEncoder().encode(text);
  for (let off = 0; off < bytes.length;) off += Deno.stderr.writeSync(bytes.subarray(off));
}

function writeRef(repoDir: string, revision: string, commit: string): void {
  const path = join(repoDir, "refs", revision);
  Deno.mkdirSync(dirname(path), { recursive: true });
  const tmp = `${path}.${crypto.randomUUID().slice(0, 8)}.tmp`;
  Deno.writeTextFileSync(tmp, commit);
  Deno.renameSync(tmp, path);
}
