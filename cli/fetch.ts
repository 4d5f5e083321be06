/**
 * `dipsy fetch`: downloads every model file the default `run` reads into the Hugging Face cache
 * in one go, so that a missing model is found before a long job starts, not at its first file.
 * Files already cached are skipped, so an interrupted fetch resumes where it stopped.
 */
import { existsSync, statSync } from "node:fs";
import { join } from "node:path";
import { type Command, parseFlags } from "./command.ts";
import {
  DEFAULT_CLIP,
  DEFAULT_IMAGE_ENCODER,
  DEFAULT_IP_ADAPTER,
  DEFAULT_MODEL,
  TINY,
} from "../core/config.ts";
import type { HubOptions } from "../core/hub.ts";
import { formatBytes, formatDuration } from "../core/progress.ts";

const USAGE = `usage: deno task dipsy fetch [options]

Downloads the models the default \`dipsy run\` uses into the Hugging Face cache (HF_HUB_CACHE /
HF_HOME), each file once, with progress on stderr. Files already cached are skipped, so running it
again resumes an interrupted fetch. The Hub is HF_ENDPOINT (default https://huggingface.co);
HF_TOKEN authenticates, HF_HUB_OFFLINE=1 forbids the network.

options:
  --model REF              SD1.5 diffusers model, org/name[@revision]
                           (default ${DEFAULT_MODEL})
  --ip-adapter REF         IP-Adapter file, org/name/path or org/name@revision:path
                           (default ${DEFAULT_IP_ADAPTER})
  --image-encoder REF      the adapter's image encoder folder
                           (default ${DEFAULT_IMAGE_ENCODER})
  --clip REF               the CLIP of class similarity and the classifier
                           (default ${DEFAULT_CLIP})
  --list                   print each file, whether it is cached and its size; fetch nothing
  -h, --help               this text

A REF may also be a local folder or file (checked, never fetched) or "tiny" (embedded, nothing
to fetch).`;

const FLAGS = {
  help: { type: "boolean", short: "h" },
  model: { type: "string" },
  "ip-adapter": { type: "string" },
  "image-encoder": { type: "string" },
  clip: { type: "string" },
  list: { type: "boolean" },
} as const;

/** One model a command line names, and the files of it that loading reads. */
export interface FetchItem {
  flag: string;
  ref: string;
  /** A folder (the files are inside it) or a single file. */
  kind: "folder" | "file";
  files: readonly string[];
}

/** The default model set, with any of its references replaced. */
export async function fetchItems(refs: {
  model?: string;
  ipAdapter?: string;
  imageEncoder?: string;
  clip?: string;
} = {}): Promise<FetchItem[]> {
  const { HF_MODEL_FILES, SD15_FILES } = await import("../app/models.ts");
  const { CLIP_CLASSIFIER_FILES } = await import("../app/classify.ts");
  const model = refs.model ?? DEFAULT_MODEL;
  // A tiny model carries its adapter and encoder, and its runs default to the tiny CLIP.
  const tiny = model === TINY;
  return [
    { flag: "--model", ref: model, kind: "folder", files: SD15_FILES },
    {
      flag: "--ip-adapter",
      ref: refs.ipAdapter ?? (tiny ? TINY : DEFAULT_IP_ADAPTER),
      kind: "file",
      files: [""],
    },
    {
      flag: "--image-encoder",
      ref: refs.imageEncoder ?? (tiny ? TINY : DEFAULT_IMAGE_ENCODER),
      kind: "folder",
      files: HF_MODEL_FILES,
    },
    {
      flag: "--clip",
      ref: refs.clip ?? (tiny ? TINY : DEFAULT_CLIP),
      kind: "folder",
      files: CLIP_CLASSIFIER_FILES,
    },
  ];
}

/** One file to have: in a Hub repo (`repo`, `file` inside it) or at a local `path`. */
interface Entry {
  item: FetchItem;
  /** What the user reads: "org/name@main unet/config.json" or the local path. */
  name: string;
  /** Same file, same key, whichever item names it. */
  key: string;
  repo?: string;
  file?: string;
  path?: string;
}

function isDir(p: string): boolean {
  return existsSync(p) && statSync(p).isDirectory();
}

function isFile(p: string): boolean {
  return existsSync(p) && statSync(p).isFile();
}

/** The files each item needs, in a Hub repo or on disk; a bad reference is a CliError. */
async function entriesOf(items: FetchItem[]): Promise<Entry[]> {
  const { splitRef } = await import("../app/models.ts");
  const { checkModelFile, parseModelRef, ModelNotFoundError } = await import("../core/hub.ts");
  const { CliError } = await import("./command.ts");
  const { UserError } = await import("../ffi/errors.ts");
  const out: Entry[] = [];
  for (const item of items) {
    if (item.ref === TINY) continue;
    const local = item.kind === "file" ? isFile(item.ref) : isDir(item.ref);
    if (local) {
      for (const f of item.files) {
        const path = f ? join(item.ref, f) : item.ref;
        out.push({ item, name: path, key: `local ${path}`, path });
      }
      continue;
    }
    const split = splitRef(item.ref);
    if (item.kind === "file" && !split) {
      throw new CliError(
        `${item.flag} ${item.ref}: neither a file nor a file in a Hub repo (org/name/path or ` +
          "org/name@revision:path)",
      );
    }
    const repoRef = split?.repo ?? item.ref, sub = split?.path ?? "";
    let parsed;
    try {
      parsed = parseModelRef(repoRef);
    } catch (e) {
      if (e instanceof ModelNotFoundError) throw new CliError(`${item.flag}: ${e.message}`);
      throw e;
    }
    for (const f of item.files) {
      let file = [sub, f].filter((s) => s).join("/");
      try {
        // Up front, so that a path out of the model or a pickle is one line naming the flag.
        file = checkModelFile(file, `${item.flag} ${item.ref}`);
      } catch (e) {
        if (e instanceof UserError) throw new CliError(e.message);
        throw e;
      }
      if (parsed.kind === "local") {
        const path = join(parsed.path, file);
        out.push({ item, name: path, key: `local ${path}`, path });
        continue;
      }
      const repo = `${parsed.repo}@${parsed.revision}`;
      out.push({ item, name: `${repo} ${file}`, key: `${repo} ${file}`, repo, file });
    }
  }
  return out;
}

/** Where output goes and how the Hub is reached (tests point these at a fake). */
export interface FetchIO {
  out: (line: string) => void;
  err: (line: string) => void;
  hub: HubOptions;
}

const consoleIO: FetchIO = {
  out: (line) => console.log(line),
  err: (line) => console.error(line),
  hub: {},
};

interface State {
  entry: Entry;
  /** The file's path once it is there. */
  path: string | null;
  /** Bytes, when known (on disk, or as the Hub lists it). */
  size: number | null;
  /** Why it is still missing after a fetch. */
  reason?: string;
}

function statSize(path: string): number | null {
  try {
    return Deno.statSync(path).size;
  } catch {
    return null;
  }
}

/** What is there already: each distinct file once, in the order the items name them. */
async function survey(entries: Entry[], hub: HubOptions): Promise<Map<string, State>> {
  const { cachedModelFile } = await import("../core/hub.ts");
  const states = new Map<string, State>();
  for (const entry of entries) {
    if (states.has(entry.key)) continue;
    const path = entry.path !== undefined
      ? (isFile(entry.path) ? entry.path : null)
      : cachedModelFile(entry.repo!, entry.file!, hub);
    states.set(entry.key, { entry, path, size: path === null ? null : statSize(path) });
  }
  return states;
}

/** Fills in the Hub's sizes of missing files, one request per repo; returns the repos' errors. */
async function askSizes(missing: State[], hub: HubOptions): Promise<Map<string, string>> {
  const { explainDownloadError, remoteFileSizes } = await import("../core/hub.ts");
  const failures = new Map<string, string>();
  const byRepo = Map.groupBy(missing.filter((s) => s.entry.repo), (s) => s.entry.repo!);
  for (const [repo, states] of byRepo) {
    try {
      const sizes = await remoteFileSizes(repo, states.map((s) => s.entry.file!), hub);
      for (const s of states) s.size = sizes.get(s.entry.file!) ?? null;
    } catch (e) {
      failures.set(repo, explainDownloadError(e));
    }
  }
  return failures;
}

function settings(hub: HubOptions): string {
  const env = (name: string) => {
    const v = Deno.env.get(name);
    return v === undefined ? `${name} unset` : `${name}=${v}`;
  };
  return `${env("HF_ENDPOINT")}, ${env("HF_HUB_OFFLINE")}` +
    (hub.endpoint ? `; Hub ${hub.endpoint}` : "");
}

/** "a, b, c and 6 more" */
function someOf(names: string[], shown = 3): string {
  if (names.length <= shown) return names.join(", ");
  return `${names.slice(0, shown).join(", ")} and ${names.length - shown} more`;
}

function sumSizes(states: State[]): string {
  if (states.some((s) => s.size === null)) {
    const known = states.filter((s) => s.size !== null);
    return known.length ? `at least ${formatBytes(total(known))}` : "size unknown";
  }
  return formatBytes(total(states));
}

function total(states: State[]): number {
  return states.reduce((n, s) => n + (s.size ?? 0), 0);
}

/** `--list`: every file of every item, cached or not, with sizes when known. */
async function list(items: FetchItem[], entries: Entry[], io: FetchIO): Promise<number> {
  const { hubCacheDir, isOffline } = await import("../core/hub.ts");
  const states = await survey(entries, io.hub);
  const missing = [...states.values()].filter((s) => s.path === null);
  const offline = io.hub.offline ?? isOffline();
  const failures = offline ? new Map<string, string>() : await askSizes(missing, io.hub);
  for (const item of items) {
    const mine = entries.filter((e) => e.item === item);
    if (!mine.length) {
      io.out(`${item.flag} ${item.ref}: embedded, nothing to fetch`);
      continue;
    }
    io.out(`${item.flag} ${item.ref}`);
    for (const e of mine) {
      const s = states.get(e.key)!;
      const local = e.path !== undefined;
      const status = s.path !== null
        ? (local ? "local  " : "cached ")
        : local
        ? "absent "
        : "missing";
      const size = s.size === null ? "?" : formatBytes(s.size);
      io.out(`  ${status}  ${size.padStart(9)}  ${e.file ?? e.path}`);
    }
  }
  const all = [...states.values()];
  const cached = all.filter((s) => s.path !== null);
  io.out(
    `${all.length} files: ${cached.length} cached (${sumSizes(cached)}), ${missing.length} ` +
      `missing${missing.length ? ` (${sumSizes(missing)})` : ""}; cache ` +
      (io.hub.cacheDir ?? hubCacheDir()),
  );
  if (offline && missing.length) {
    io.err(`sizes of missing files unknown: offline (${settings(io.hub)})`);
  }
  for (const [repo, reason] of failures) {
    io.err(`sizes of missing files of ${repo} unknown: ${reason} (${settings(io.hub)})`);
  }
  return 0;
}

/** Fetches what is missing; one line per item that still lacks files; 1 if any does. */
async function fetchAll(items: FetchItem[], entries: Entry[], io: FetchIO): Promise<number> {
  const { hubCacheDir, isOffline, ModelNotFoundError, resolveModelFile } = await import(
    "../core/hub.ts"
  );
  const states = await survey(entries, io.hub);
  const all = [...states.values()];
  const missing = all.filter((s) => s.path === null);
  const cacheDir = io.hub.cacheDir ?? hubCacheDir();
  if (!all.length) {
    io.out("nothing to fetch: the models are embedded (tiny)");
    return 0;
  }
  if (!missing.length) {
    io.out(`all ${all.length} files are there (${sumSizes(all)}); cache ${cacheDir}`);
    return 0;
  }
  const offline = io.hub.offline ?? isOffline();
  const t0 = performance.now();
  for (const s of missing) {
    if (s.entry.path !== undefined) s.reason = "not there (a local path is never fetched)";
    else if (offline) s.reason = "offline mode forbids downloading it";
  }
  if (!offline) {
    // One request per repo first: an unreachable Hub fails once per repo, not once per file.
    const failures = await askSizes(missing.filter((s) => s.reason === undefined), io.hub);
    for (const s of missing) {
      if (s.reason === undefined && failures.has(s.entry.repo!)) {
        s.reason = failures.get(s.entry.repo!);
      }
    }
    const todo = missing.filter((s) => s.reason === undefined);
    if (todo.length) {
      io.err(
        `fetching ${todo.length} files (${sumSizes(todo)}) into ${cacheDir}; ` +
          `${all.length - missing.length} already there`,
      );
    }
    for (const s of todo) {
      try {
        s.path = await resolveModelFile(s.entry.repo!, s.entry.file!, io.hub);
        s.size = statSize(s.path);
      } catch (e) {
        if (!(e instanceof ModelNotFoundError)) throw e;
        s.reason = e.reason ?? e.message;
      }
    }
  }
  const seconds = (performance.now() - t0) / 1000;
  const fetched = missing.filter((s) => s.path !== null);
  const failed = missing.filter((s) => s.path === null);
  for (const item of items) {
    const lacking = failed.filter((s) =>
      entries.some((e) => e.item === item && e.key === s.entry.key)
    );
    if (!lacking.length) continue;
    const names = lacking.map((s) => s.entry.file ?? s.entry.path!);
    io.err(
      `dipsy fetch: ${item.flag} ${item.ref}: ${lacking.length} file(s) missing ` +
        `(${someOf(names)}): ${lacking[0].reason} (${settings(io.hub)})`,
    );
  }
  const bytes = total(fetched);
  const rate = seconds > 0 && bytes > 0 ? `, ${formatBytes(bytes / seconds)}/s` : "";
  const still = failed.length ? `; ${failed.length} still missing` : "";
  io.out(
    `fetched ${fetched.length} files (${formatBytes(bytes)} in ${formatDuration(seconds)}` +
      `${rate})${still}; ${all.length - missing.length} already there; cache ${cacheDir}`,
  );
  return failed.length ? 1 : 0;
}

export interface FetchArgs {
  model?: string;
  ipAdapter?: string;
  imageEncoder?: string;
  clip?: string;
  list: boolean;
}

/** Lists or fetches the models of `args`; returns the exit code. */
export async function runFetch(args: FetchArgs, io: FetchIO = consoleIO): Promise<number> {
  const items = await fetchItems(args);
  const entries = await entriesOf(items);
  return args.list ? await list(items, entries, io) : await fetchAll(items, entries, io);
}

export const command: Command = {
  usage: USAGE,
  flags: FLAGS,
  async run(args) {
    const v = parseFlags(args, FLAGS);
    if (v.help) {
      console.log(USAGE);
      return 0;
    }
    return await runFetch({
      model: v.model,
      ipAdapter: v["ip-adapter"],
      imageEncoder: v["image-encoder"],
      clip: v.clip,
      list: v.list ?? false,
    });
  },
};
