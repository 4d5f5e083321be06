/**
 * Model references against a fake Hugging Face cache laid out as huggingface_hub writes it
 * (refs/, snapshots/ with symlinks into blobs/, .no_exist/), plus local folders, offline mode and
 * a download attempt against a closed local port.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { join } from "node:path";
import type { ByteProgressOptions } from "../core/progress.ts";
import { fetchItems, runFetch } from "../cli/fetch.ts";
import { splitRef } from "../app/models.ts";
import { CliError } from "../cli/command.ts";
import {
  explainDownloadError,
  hubCacheDir,
  type HubOptions,
  isOffline,
  ModelNotFoundError,
  parseModelRef,
  resolveModelDir,
  resolveModelFile,
} from "../core/hub.ts";
import { withTempDir } from "./util.ts";

const MAIN = "a".repeat(8) + "0123456789abcdef0123456789abcdef";
const PR = "b".repeat(8) + "fedcba9876543210fedcba9876543210";
const OLD = "c".repeat(40);

interface Fake {
  cache: string;
  local: string;
}

function write(path: string, text: string): void {
  Deno.mkdirSync(join(path, ".."), { recursive: true });
  Deno.writeTextFileSync(path, text);
}

/**
 * Fills `root` with a cache holding org/tiny (main, refs/pr/10, an old commit) and a pickle-only
 * org/legacy, and a local model folder.
 */
function makeFake(root: string): Fake {
  const cache = join(root, "hub");
  const repo = join(cache, "models--org--tiny");
  write(join(repo, "refs", "main"), MAIN);
  write(join(repo, "refs", "refs", "pr", "10"), PR + "\n");
  // Snapshot files are relative symlinks into blobs/, as huggingface_hub makes them.
  write(join(repo, "blobs", "1111"), '{"hidden_size": 8}');
  Deno.mkdirSync(join(repo, "snapshots", MAIN, "unet"), { recursive: true });
  Deno.symlinkSync("../../blobs/1111", join(repo, "snapshots", MAIN, "config.json"));
  write(join(repo, "snapshots", MAIN, "unet", "config.json"), "{}");
  Deno.symlinkSync("../../blobs/gone", join(repo, "snapshots", MAIN, "dangling.json"));
  write(join(repo, "snapshots", PR, "model.safetensors"), "pr weights");
  write(join(repo, "snapshots", OLD, "config.json"), "old");
  write(join(repo, ".no_exist", MAIN, "tokenizer.json"), "");

  const legacy = join(cache, "models--org--legacy");
  write(join(legacy, "refs", "main"), OLD);
  write(join(legacy, "snapshots", OLD, "pytorch_model.bin"), "pickle");
  write(join(legacy, "snapshots", OLD, "unet", "diffusion_pytorch_model.bin"), "pickle");

  const local = join(root, "my model");
  write(join(local, "config.json"), "{}");
  write(join(local, "vae", "diffusion_pytorch_model.bin"), "pickle");
  return { cache, local };
}

/** Runs `fn` on a fresh fake cache, removed afterwards. */
function withFakeCache(fn: (fake: Fake) => void | Promise<void>): Promise<void> {
  return withTempDir(async (root) => await fn(makeFake(root)));
}

const offline = (cache: string) => ({ cacheDir: cache, offline: true });

async function rejectsWith(p: Promise<unknown>, ...patterns: RegExp[]): Promise<string> {
  let message = "";
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof ModelNotFoundError, String(e));
    message = e.message;
    for (const re of patterns) assert.match(e.message, re);
    return true;
  });
  return message;
}

Deno.test("cache location follows HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME, then ~/.cache", () => {
  const env = (vars: Record<string, string>) => (k: string) => vars[k];
  assert.equal(hubCacheDir(env({ HF_HUB_CACHE: "/c", HF_HOME: "/h", HOME: "/u" })), "/c");
  assert.equal(hubCacheDir(env({ HF_HOME: "/h", HOME: "/u" })), "/h/hub");
  assert.equal(hubCacheDir(env({ HF_HOME: "~/hf", HOME: "/u" })), "/u/hf/hub");
  assert.equal(hubCacheDir(env({ XDG_CACHE_HOME: "/x", HOME: "/u" })), "/x/huggingface/hub");
  assert.equal(hubCacheDir(env({ HOME: "/u" })), "/u/.cache/huggingface/hub");
  assert.equal(isOffline(env({ HF_HUB_OFFLINE: "1" })), true);
  assert.equal(isOffline(env({ HF_HUB_OFFLINE: "true" })), true);
  assert.equal(isOffline(env({ TRANSFORMERS_OFFLINE: "YES" })), true);
  assert.equal(isOffline(env({ HF_HUB_OFFLINE: "0" })), false);
  assert.equal(isOffline(env({})), false);
});

Deno.test("model references parse into local folders and Hub ids with revisions", async () => {
  await withFakeCache((fake) => {
    assert.deepEqual(parseModelRef("openai/clip-vit-base-patch16"), {
      kind: "hub",
      repo: "openai/clip-vit-base-patch16",
      revision: "main",
    });
    assert.deepEqual(parseModelRef("openai/clip-vit-base-patch16@refs/pr/10"), {
      kind: "hub",
      repo: "openai/clip-vit-base-patch16",
      revision: "refs/pr/10",
    });
    assert.deepEqual(parseModelRef(fake.local), { kind: "local", path: fake.local });
    assert.throws(() => parseModelRef("./no/such/folder"), /does not exist/);
    for (const bad of ["a/b/c", "org/na--me", "org/name@", "org/name@../x", "", "bad name/x"]) {
      assert.throws(() => parseModelRef(bad), ModelNotFoundError, bad);
    }
  });
});

Deno.test("Hub ids resolve through refs/ to snapshot files", async () => {
  await withFakeCache(async (fake) => {
    const o = offline(fake.cache);
    const snap = join(fake.cache, "models--org--tiny", "snapshots");
    const config = await resolveModelFile("org/tiny", "config.json", o);
    assert.equal(config, join(snap, MAIN, "config.json"));
    assert.equal(Deno.readTextFileSync(config), '{"hidden_size": 8}');
    assert.equal(
      await resolveModelFile("org/tiny", "config.json", { ...o, subfolder: "unet" }),
      join(snap, MAIN, "unet", "config.json"),
    );
    assert.equal(
      await resolveModelFile("org/tiny@refs/pr/10", "model.safetensors", o),
      join(snap, PR, "model.safetensors"),
    );
    assert.equal(
      await resolveModelFile(`org/tiny@${OLD}`, "config.json", o),
      join(snap, OLD, "config.json"),
    );
    assert.equal(await resolveModelDir("org/tiny", o), join(snap, MAIN));
    assert.equal(await resolveModelDir("org/tiny@refs/pr/10", o), join(snap, PR));
  });
});

Deno.test("local folders pass through", async () => {
  await withFakeCache(async (fake) => {
    assert.equal(await resolveModelDir(fake.local), fake.local);
    assert.equal(
      await resolveModelFile(fake.local, "config.json"),
      join(fake.local, "config.json"),
    );
    await rejectsWith(
      resolveModelFile(fake.local, "model.safetensors"),
      /has no file "model.safetensors"/,
    );
    await assert.rejects(resolveModelFile(fake.local, "../escape.json"), /inside the model folder/);
  });
});

Deno.test("pickles are refused, and a pickle-only model says safetensors are required", async () => {
  await withFakeCache(async (fake) => {
    const o = offline(fake.cache);
    await rejectsWith(resolveModelFile("org/legacy", "pytorch_model.bin", o), /pickle checkpoint/);
    await rejectsWith(
      resolveModelFile("org/legacy", "model.safetensors", o),
      /"pytorch_model\.bin"/,
      /safetensors are required/,
    );
    await rejectsWith(
      resolveModelFile("org/legacy", "diffusion_pytorch_model.safetensors", {
        ...o,
        subfolder: "unet",
      }),
      /"unet\/diffusion_pytorch_model\.bin"/,
      /safetensors are required/,
    );
    await rejectsWith(
      resolveModelFile(fake.local, "diffusion_pytorch_model.safetensors", { subfolder: "vae" }),
      /safetensors are required/,
    );
  });
});

Deno.test("offline misses name the repo, revision, file and how to get it", async () => {
  await withFakeCache(async (fake) => {
    const o = offline(fake.cache);
    const msg = await rejectsWith(
      resolveModelFile("org/tiny", "model.safetensors", o),
      /org\/tiny@main/,
      /"model\.safetensors"/,
      /offline/,
      /deno task dipsy fetch/,
      /local folder/,
    );
    assert.ok(msg.includes(fake.cache), msg);
    await rejectsWith(resolveModelFile("org/tiny", "dangling.json", o), /not in the Hugging Face/);
    await rejectsWith(resolveModelFile("org/tiny", "tokenizer.json", o), /records it as absent/);
    await rejectsWith(
      resolveModelFile("nobody/missing@v2", "config.json", o),
      /nobody\/missing@v2/,
    );
    await rejectsWith(resolveModelDir("nobody/missing", o), /nobody\/missing@main/, /dipsy fetch/);
    await rejectsWith(resolveModelDir("org/tiny@dev", o), /org\/tiny@dev/);
  });
});

function closedPort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

Deno.test("a failed download ends quickly in an error that says what to do", async () => {
  await withFakeCache(async (fake) => {
    const start = performance.now();
    await rejectsWith(
      resolveModelFile("nobody/missing", "config.json", {
        cacheDir: fake.cache,
        offline: false,
        endpoint: `http://127.0.0.1:${closedPort()}`,
        timeoutMs: 2000,
      }),
      /nobody\/missing@main/,
      /downloading it failed/,
      /dipsy fetch/,
    );
    // A file of a cached revision is fetched at the cached commit; it fails the same way.
    await rejectsWith(
      resolveModelFile("org/tiny", "model.safetensors", {
        cacheDir: fake.cache,
        offline: false,
        endpoint: `http://127.0.0.1:${closedPort()}`,
        timeoutMs: 2000,
      }),
      new RegExp(`org/tiny@main \\(${MAIN}\\)`),
      /downloading it failed/,
    );
    const seconds = (performance.now() - start) / 1000;
    assert.ok(seconds < 10, `download attempts took ${seconds.toFixed(1)} s`);
  });
});

/** Runs a resolveModelFile call in a child process with exactly the given HF variables. */
async function resolveInChild(env: Record<string, string>): Promise<string> {
  const hub = new URL("../core/hub.ts", import.meta.url).href;
  const code = `import { resolveModelFile } from ${JSON.stringify(hub)};
try { console.log("OK " + await resolveModelFile("org/tiny", "config.json")); }
catch (e) { console.log("ERR " + e.message); }
try { await resolveModelFile("nobody/missing", "config.json"); }
catch (e) { console.log("ERR " + e.message); }`;
  const keep = ["HOME", "PATH", "DENO_DIR", "XDG_CACHE_HOME", "DENO_NO_UPDATE_CHECK"];
  const base: Record<string, string> = {};
  for (const k of keep) {
    const v = Deno.env.get(k);
    if (v !== undefined) base[k] = v;
  }
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["eval", code],
    env: { ...base, ...env },
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout);
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
  return text;
}

Deno.test("HF_HUB_CACHE, HF_HUB_OFFLINE and HF_ENDPOINT are read from the environment", async () => {
  await withFakeCache(async (fake) => {
    const off = await resolveInChild({ HF_HUB_CACHE: fake.cache, HF_HUB_OFFLINE: "1" });
    assert.match(
      off,
      new RegExp(`OK ${fake.cache}/models--org--tiny/snapshots/${MAIN}/config.json`),
    );
    assert.match(off, /ERR .*nobody\/missing@main.*offline mode/);
    const on = await resolveInChild({
      HF_HOME: join(fake.cache, ".."),
      HF_ENDPOINT: `http://127.0.0.1:${closedPort()}`,
    });
    assert.match(on, /OK .*snapshots/);
    assert.match(on, /ERR .*downloading it failed/);
  });
});

/** A repository of the fake Hub: one commit, the revisions that point at it, its files. */
interface MockRepo {
  sha: string;
  revisions?: string[];
  files: Record<string, string | Uint8Array>;
}

interface MockOptions {
  /** Bytes per body chunk the server writes. */
  chunk?: number;
  /**
   * Cuts the first download of `path` off after `after` bytes, once `cut` resolves (the test
   * resolves it when the client has shown progress).
   */
  interrupt?: { path: string; after: number; cut: Promise<void> };
  /** Answers Range requests this many bytes away from the offset asked for (and says so). */
  rangeShift?: number;
  /** Serves this file with one byte changed (the listing keeps the true size and sha256). */
  corrupt?: string;
}

/** Files from this size up are LFS files, whose blob name is their sha256, as on the Hub. */
const LFS_FROM = 100;

function bytesOf(v: string | Uint8Array): Uint8Array {
  return typeof v === "string" ? new TextEncoder().encode(v) : v;
}

/** A file as the Hub's paths-info lists it. */
function describe(path: string, body: Uint8Array) {
  const lfs = body.length >= LFS_FROM
    ? { oid: createHash("sha256").update(body).digest("hex"), size: body.length }
    : undefined;
  // The last commit touching a file is usually older than the revision asked for.
  const lastCommit = { id: OLD, title: "older", date: "2024-01-01T00:00:00Z" };
  const oid = `oid-${path.replaceAll("/", "-")}`;
  return { type: "file", path, oid, size: body.length, lfs, lastCommit };
}

/**
 * Just enough of the Hub's HTTP API for dipsy's downloads and huggingface_hub's: a revision's
 * commit, paths-info (with LFS entries for larger files), and resolve (HEAD, and GET with Range
 * requests, served in small chunks).
 */
function mockHub(repos: Record<string, MockRepo>, opts: MockOptions = {}) {
  const requests: string[] = [];
  let interrupted = false;
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (req) => {
    const url = new URL(req.url);
    const range = req.headers.get("range");
    requests.push(`${req.method} ${decodeURIComponent(url.pathname)}${range ? ` ${range}` : ""}`);
    const api = /^\/api\/models\/([^/]+\/[^/]+)\/(revision|paths-info)\/(.+)$/.exec(url.pathname);
    if (api) {
      const repo = repos[api[1]], rev = decodeURIComponent(api[3]);
      if (api[2] === "revision") {
        if (!repo || !(repo.revisions ?? ["main"]).includes(rev)) {
          return Response.json({ error: "Revision not found" }, { status: 404 });
        }
        return Response.json({ _id: "1", id: api[1], sha: repo.sha, private: false });
      }
      if (!repo || rev !== repo.sha) return Response.json({ error: "nope" }, { status: 404 });
      const { paths } = await req.json() as { paths: string[] };
      return Response.json(
        paths.filter((p) => p in repo.files).map((p) => describe(p, bytesOf(repo.files[p]))),
      );
    }
    const file = /^\/([^/]+\/[^/]+)\/resolve\/([^/]+)\/(.+)$/.exec(url.pathname);
    const repo = file && repos[file[1]];
    const name = file && decodeURIComponent(file[3]);
    const rev = file && decodeURIComponent(file[2]);
    const known = repo && (rev === repo.sha || (repo.revisions ?? ["main"]).includes(rev!));
    if (!repo || !known || !(name! in repo.files)) {
      return new Response("not found", { status: 404 });
    }
    if (req.method === "HEAD") {
      // What huggingface_hub reads before a download: the commit, the blob name and the size.
      const info = describe(name!, bytesOf(repo.files[name!]));
      return new Response(null, {
        headers: {
          "x-repo-commit": repo.sha,
          ...(info.lfs ? { "x-linked-etag": `"${info.lfs.oid}"` } : { etag: `"${info.oid}"` }),
          "x-linked-size": String(info.size),
        },
      });
    }
    let body = bytesOf(repo.files[name!]);
    if (opts.corrupt === name) {
      body = body.slice();
      body[body.length >> 1] ^= 0xff;
    }
    const m = /bytes=(\d+)-(\d*)/.exec(range ?? "");
    const from = m ? Number(m[1]) + (opts.rangeShift ?? 0) : 0;
    const to = m && m[2] ? Number(m[2]) + 1 : body.length;
    const cut = opts.interrupt?.path === name && !interrupted ? opts.interrupt : undefined;
    if (cut) interrupted = true;
    const chunk = opts.chunk ?? 1 << 16;
    let at = from;
    const stream = new ReadableStream<Uint8Array>({
      async pull(controller) {
        if (cut && at >= from + cut.after) {
          // The body ends short, as when the connection drops.
          await cut.cut;
          controller.close();
          return;
        }
        const end = Math.min(to, at + chunk, cut ? from + cut.after : Infinity);
        controller.enqueue(body.slice(at, end));
        at = end;
        if (at >= to) controller.close();
      },
    });
    return new Response(stream, {
      status: m ? 206 : 200,
      headers: { "content-range": `bytes ${from}-${to - 1}/${body.length}` },
    });
  });
  return { server, requests, url: `http://127.0.0.1:${server.addr.port}` };
}

/** Runs `fn` with a fake Hub serving `repos`, shut down afterwards. */
async function withMockHub(
  repos: Record<string, MockRepo>,
  opts: MockOptions,
  fn: (hub: ReturnType<typeof mockHub>) => Promise<void>,
): Promise<void> {
  const hub = mockHub(repos, opts);
  try {
    await fn(hub);
  } finally {
    await hub.server.shutdown();
  }
}

/** Progress options that collect the lines (never a terminal). */
function collect(lines: string[], extra: Omit<ByteProgressOptions, "label"> = {}) {
  return { tty: false, write: (t: string) => lines.push(t), ...extra };
}

Deno.test("downloads land where huggingface_hub puts them (mock Hub on localhost)", async () => {
  await withFakeCache(async (fake) => {
    const sha = "d".repeat(40);
    const big = deterministicBytes(300);
    const repos = {
      "org/fresh": {
        sha,
        files: { "config.json": '{"fresh": true}', "unet/config.json": "{}", "w.safetensors": big },
      },
    };
    await withMockHub(repos, {}, async (hub) => {
      const lines: string[] = [];
      const opts = {
        cacheDir: fake.cache,
        offline: false,
        endpoint: hub.url,
        timeoutMs: 5000,
        progress: collect(lines),
      };
      const path = await resolveModelFile("org/fresh", "config.json", opts);
      const repo = join(fake.cache, "models--org--fresh");
      assert.equal(path, join(repo, "snapshots", sha, "config.json"));
      assert.equal(Deno.readTextFileSync(path), '{"fresh": true}');
      assert.equal(Deno.readTextFileSync(join(repo, "refs", "main")), sha);
      assert.ok(Deno.lstatSync(path).isSymlink, "snapshot entries point into blobs/");
      assert.equal(Deno.realPathSync(path), join(repo, "blobs", "oid-config.json"));
      // Now cached: resolves offline, and a second file reuses the recorded commit.
      assert.equal(await resolveModelFile("org/fresh", "config.json", offline(fake.cache)), path);
      const unet = await resolveModelFile("org/fresh", "config.json", {
        ...opts,
        subfolder: "unet",
      });
      assert.equal(unet, join(repo, "snapshots", sha, "unet", "config.json"));
      assert.equal(hub.requests.filter((r) => r.includes("/revision/")).length, 1);
      // An LFS file's blob is named by its sha256, as huggingface_hub names it.
      const weights = await resolveModelFile("org/fresh", "w.safetensors", opts);
      const sum = createHash("sha256").update(big).digest("hex");
      assert.equal(Deno.realPathSync(weights), join(repo, "blobs", sum));
      assert.deepEqual(Deno.readFileSync(weights), big);
      assert.deepEqual(
        [...Deno.readDirSync(join(repo, "blobs"))].map((e) => e.name).sort(),
        [sum, "oid-config.json", "oid-unet-config.json"].sort(),
        "no .incomplete file is left",
      );
      // Each download ends in one line with its size.
      assert.deepEqual(lines.map((l) => l.replace(/ in .*/s, "")), [
        "download org/fresh config.json 15 B",
        "download org/fresh unet/config.json 2 B",
        "download org/fresh w.safetensors 300 B",
      ]);
      await rejectsWith(
        resolveModelFile("org/fresh", "model.safetensors", opts),
        /downloading it failed/,
        /has no file "model\.safetensors"/,
      );
      // The Hub's answer is kept: the next miss is known without asking.
      const asked = hub.requests.length;
      await rejectsWith(
        resolveModelFile("org/fresh", "model.safetensors", opts),
        /records it as absent/,
      );
      assert.equal(hub.requests.length, asked);
    });
  });
});

/** Bytes that differ from position to position (a truncated or shifted copy never matches). */
function deterministicBytes(n: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (i * 131 + (i >> 8) * 7) & 255;
  return out;
}

Deno.test("a multi-chunk download prints one line per tenth, then its size and mean rate", async () => {
  await withFakeCache(async (fake) => {
    const sha = "e".repeat(40);
    const data = deterministicBytes(10_000);
    // 10 000 bytes in chunks of 777: chunk edges never fall on the tenths, yet one line per
    // tenth comes out, since lines follow the byte count, not the chunks or the clock.
    const repos = { "org/big": { sha, files: { "w.safetensors": data } } };
    await withMockHub(repos, { chunk: 777 }, async (hub) => {
      const lines: string[] = [];
      const progress = collect(lines, { fraction: 0.1, minStepBytes: 1 });
      const path = await resolveModelFile("org/big", "w.safetensors", {
        cacheDir: fake.cache,
        offline: false,
        endpoint: hub.url,
        progress,
      });
      assert.deepEqual(Deno.readFileSync(path), data);
      assert.equal(lines.length, 10, lines.join(""));
      for (let k = 1; k <= 9; k++) {
        assert.match(
          lines[k - 1],
          new RegExp(
            `^download org/big w\\.safetensors ${k}\\.00 kB/10\\.0 kB \\(${k}0%\\)  .+/s(  ETA \\S+)?\\n$`,
          ),
        );
      }
      assert.match(lines[9], /^download org\/big w\.safetensors 10\.0 kB in \S+ \(.+\/s\)\n$/);
      // With the default step (64 MiB at least), a small file prints its final line only.
      const quiet: string[] = [];
      Deno.removeSync(join(fake.cache, "models--org--big"), { recursive: true });
      await resolveModelFile("org/big", "w.safetensors", {
        cacheDir: fake.cache,
        offline: false,
        endpoint: hub.url,
        progress: collect(quiet),
      });
      assert.equal(quiet.length, 1, quiet.join(""));
    });
  });
});

Deno.test("an interrupted download leaves no complete-looking file; the rerun resumes it", async () => {
  await withFakeCache(async (fake) => {
    const sha = "f".repeat(40);
    const data = deterministicBytes(10_000);
    let cut!: () => void;
    const interrupt = {
      path: "w.safetensors",
      after: 6000,
      cut: new Promise<void>((r) => (cut = r)),
    };
    const repos = { "org/big": { sha, files: { "w.safetensors": data } } };
    await withMockHub(repos, { chunk: 1000, interrupt }, async (hub) => {
      const lines: string[] = [];
      // The connection is cut once the client has shown half the file as done.
      const progress = collect(lines, { fraction: 0.1, minStepBytes: 1 });
      const write = progress.write;
      progress.write = (t: string) => {
        write(t);
        if (t.includes("(50%)")) cut();
      };
      const opts = { cacheDir: fake.cache, offline: false, endpoint: hub.url, progress };
      await rejectsWith(
        resolveModelFile("org/big", "w.safetensors", opts),
        /downloading it failed/,
      );
      const repo = join(fake.cache, "models--org--big");
      const sum = createHash("sha256").update(data).digest("hex");
      const partial = join(repo, "blobs", `${sum}.incomplete`);
      assert.equal(existsSync(join(repo, "blobs", sum)), false, "no blob under its final name");
      assert.equal(existsSync(join(repo, "snapshots", sha, "w.safetensors")), false);
      await rejectsWith(
        resolveModelFile("org/big", "w.safetensors", offline(fake.cache)),
        /not in the Hugging Face cache/,
      );
      const have = Deno.statSync(partial).size;
      assert.ok(have >= 5000 && have <= 6000, `${have} bytes kept`);
      assert.deepEqual(Deno.readFileSync(partial), data.slice(0, have));

      lines.length = 0;
      const path = await resolveModelFile("org/big", "w.safetensors", opts);
      assert.deepEqual(Deno.readFileSync(path), data);
      assert.equal(hub.requests.at(-1), `GET /org/big/resolve/${sha}/w.safetensors bytes=${have}-`);
      assert.equal(existsSync(partial), false);
      assert.match(lines.at(-1)!, /10\.0 kB in .*resumed at/);
      // The lines of the rerun start after the bytes it already had.
      const first = Math.floor(have / 1000) + 1;
      assert.equal(lines.length, 10 - first + 1, lines.join(""));
      assert.match(lines[0], new RegExp(`\\(${first}0%\\)`));
    });
  });
});

function sha256(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

/** The one-line reason inside a failed download's message; asserts the message is one line. */
function oneLine(message: string): string {
  assert.ok(!message.includes("\n"), message);
  assert.ok(!/\bat .*:\d+:\d+/.test(message), `no stack in ${message}`);
  return message;
}

/** What is in blobs/ and whether the snapshot entry exists, for "nothing was left" checks. */
function leftovers(repo: string, commit: string, file: string) {
  const blobs = join(repo, "blobs");
  return {
    blobs: existsSync(blobs) ? [...Deno.readDirSync(blobs)].map((e) => e.name).sort() : [],
    snapshot: existsSync(join(repo, "snapshots", commit, file)),
  };
}

Deno.test("a resumed answer from the wrong offset leaves no blob; the next attempt starts over", async () => {
  await withFakeCache(async (fake) => {
    const sha = "9".repeat(40);
    const data = deterministicBytes(10_000);
    const sum = sha256(data);
    const repo = join(fake.cache, "models--org--big");
    // The first 4000 bytes of an earlier attempt; the server answers their Range from byte 3000.
    Deno.mkdirSync(join(repo, "blobs"), { recursive: true });
    Deno.writeFileSync(join(repo, "blobs", `${sum}.incomplete`), data.slice(0, 4000));
    const repos = { "org/big": { sha, files: { "w.safetensors": data } } };
    await withMockHub(repos, { chunk: 1000, rangeShift: -1000 }, async (hub) => {
      const lines: string[] = [];
      const opts = {
        cacheDir: fake.cache,
        offline: false,
        endpoint: hub.url,
        progress: collect(lines),
      };
      const msg = await rejectsWith(
        resolveModelFile("org/big", "w.safetensors", opts),
        /w\.safetensors: asked for the bytes from 4000 on, the server sent bytes from 3000/,
        /next attempt starts over/,
      );
      oneLine(msg);
      assert.deepEqual(leftovers(repo, sha, "w.safetensors"), { blobs: [], snapshot: false });
      assert.deepEqual(lines, [], "no progress for bytes that were refused");

      // The partial file is gone, so the next attempt asks for the whole file and gets it.
      const path = await resolveModelFile("org/big", "w.safetensors", opts);
      assert.equal(hub.requests.at(-1), `GET /org/big/resolve/${sha}/w.safetensors`);
      assert.deepEqual(Deno.readFileSync(path), data);
      assert.deepEqual(leftovers(repo, sha, "w.safetensors"), { blobs: [sum], snapshot: true });
    });
  });
});

Deno.test("an LFS file whose bytes do not match its sha256 leaves no blob and names both digests", async () => {
  await withFakeCache(async (fake) => {
    const sha = "8".repeat(40);
    const data = deterministicBytes(10_000);
    const sum = sha256(data);
    const bad = data.slice();
    bad[bad.length >> 1] ^= 0xff; // the byte the corrupting server changes
    const repo = join(fake.cache, "models--org--big");
    const repos = { "org/big": { sha, files: { "w.safetensors": data } } };
    const opts = (url: string) => ({
      cacheDir: fake.cache,
      offline: false,
      endpoint: url,
      progress: collect([]),
    });
    await withMockHub(repos, { chunk: 1000, corrupt: "w.safetensors" }, async (hub) => {
      const msg = await rejectsWith(
        resolveModelFile("org/big", "w.safetensors", opts(hub.url)),
        new RegExp(
          `w\\.safetensors: the downloaded bytes have sha256 ${sha256(bad)}, the Hub lists ${sum}`,
        ),
        /the download was deleted/,
      );
      oneLine(msg);
      assert.deepEqual(leftovers(repo, sha, "w.safetensors"), { blobs: [], snapshot: false });
    });
    // A corrupt prefix kept from an earlier attempt is caught as well: the hash covers it.
    const prefix = bad.slice(0, 6000);
    Deno.writeFileSync(join(repo, "blobs", `${sum}.incomplete`), prefix);
    const resumed = new Uint8Array([...prefix, ...data.slice(6000)]);
    await withMockHub(repos, { chunk: 1000 }, async (hub) => {
      await rejectsWith(
        resolveModelFile("org/big", "w.safetensors", opts(hub.url)),
        new RegExp(`sha256 ${sha256(resumed)}, the Hub lists ${sum}`),
      );
      assert.equal(hub.requests.at(-1), `GET /org/big/resolve/${sha}/w.safetensors bytes=6000-`);
      assert.deepEqual(leftovers(repo, sha, "w.safetensors"), { blobs: [], snapshot: false });
      // Nothing blocks the next attempt: it fetches the whole file afresh.
      const path = await resolveModelFile("org/big", "w.safetensors", opts(hub.url));
      assert.deepEqual(Deno.readFileSync(path), data);
      assert.equal(hub.requests.at(-1), `GET /org/big/resolve/${sha}/w.safetensors`);
    });
  });
});

Deno.test("a download waits for another holder of its lock, says so in one line, then completes", async () => {
  await withFakeCache(async (fake) => {
    const sha = "7".repeat(40);
    const data = deterministicBytes(3000);
    const sum = sha256(data);
    // The lock huggingface_hub (or a second dipsy) takes while it downloads the same blob.
    const lockPath = join(fake.cache, ".locks", "models--org--big", `${sum}.lock`);
    Deno.mkdirSync(join(lockPath, ".."), { recursive: true });
    const holder = await Deno.open(lockPath, { create: true, write: true });
    await holder.lock(true);
    const repos = { "org/big": { sha, files: { "w.safetensors": data } } };
    await withMockHub(repos, {}, async (hub) => {
      const lines: string[] = [];
      let noticed!: () => void;
      const notice = new Promise<void>((r) => (noticed = r));
      const progress = collect(lines);
      progress.write = (t: string) => {
        lines.push(t);
        if (t.includes("waiting for the lock")) noticed();
      };
      const pending = resolveModelFile("org/big", "w.safetensors", {
        cacheDir: fake.cache,
        offline: false,
        endpoint: hub.url,
        progress,
        lockNoticeMs: 0,
      });
      let released = false;
      try {
        // The download must not end (nor fail) while the lock is held.
        const early = pending.then(() => {
          throw new Error("the download finished while another process held its lock");
        });
        await Promise.race([notice, early]);
        early.catch(() => {});
        assert.equal(
          lines[0].replace(/; \S+ so far\n$/, "; T so far\n"),
          `download org/big w.safetensors: waiting for the lock ${lockPath}, which another ` +
            "process holds (it is downloading the same file); T so far\n",
        );
        assert.ok(!hub.requests.some((r) => r.includes("/resolve/")), "no download while locked");
        holder.close();
        released = true;
      } finally {
        if (!released) holder.close();
      }
      const path = await pending;
      assert.deepEqual(Deno.readFileSync(path), data);
      assert.match(lines.at(-1)!, /^download org\/big w\.safetensors 3\.00 kB in /);
    });
  });
});

/** The fake Hub's copy of the default model set: every file `dipsy run` reads, small. */
async function defaultSetRepos(): Promise<{ repos: Record<string, MockRepo>; count: number }> {
  const items = await fetchItems();
  const repos: Record<string, MockRepo> = {};
  const seen = new Set<string>();
  const shas = ["1", "2", "3", "4"].map((c) => c.repeat(40));
  for (const item of items) {
    const split = splitRef(item.ref);
    const [repoRev, sub] = split ? [split.repo, split.path] : [item.ref, ""];
    const [repo, revision = "main"] = repoRev.split("@");
    repos[repo] ??= { sha: shas[Object.keys(repos).length], revisions: [], files: {} };
    if (!repos[repo].revisions!.includes(revision)) repos[repo].revisions!.push(revision);
    for (const f of item.files) {
      const path = [sub, f].filter((s) => s).join("/");
      seen.add(`${repo} ${path}`);
      // Some files large enough to be LFS files and to take several chunks.
      repos[repo].files[path] = path.endsWith(".safetensors")
        ? deterministicBytes(3000 + path.length)
        : `{"file": "${path}"}`;
    }
  }
  return { repos, count: seen.size };
}

function fetchIO(hub: HubOptions) {
  const out: string[] = [], err: string[] = [], progress: string[] = [];
  return {
    out,
    err,
    progress,
    io: {
      out: (l: string) => out.push(l),
      err: (l: string) => err.push(l),
      hub: { ...hub, progress: collect(progress) },
    },
  };
}

Deno.test("dipsy fetch gets the whole default set in one go; a second run fetches nothing", async () => {
  await withFakeCache(async (fake) => {
    const { repos, count } = await defaultSetRepos();
    assert.equal(count, 16, "SD1.5 (9 files), the adapter, its encoder (2), CLIP (4)");
    await withMockHub(repos, { chunk: 1000 }, async (hub) => {
      const hubOpts = { cacheDir: fake.cache, offline: false, endpoint: hub.url };
      const first = fetchIO(hubOpts);
      assert.equal(await runFetch({ list: false }, first.io), 0, first.err.join("\n"));
      const gets = hub.requests.filter((r) => r.includes("/resolve/"));
      assert.equal(gets.length, count, "each file downloaded once");
      assert.equal(new Set(gets).size, count);
      assert.equal(first.progress.length, count, "one final progress line per file");
      assert.match(first.out.at(-1)!, /^fetched 16 files \(.+ in .+\); 0 already there; cache /);
      // Everything resolves offline now, with the Hub's bytes.
      for (const [repo, r] of Object.entries(repos)) {
        for (const revision of r.revisions!) {
          for (const [file, body] of Object.entries(r.files)) {
            const path = await resolveModelFile(`${repo}@${revision}`, file, offline(fake.cache));
            assert.deepEqual(Deno.readFileSync(path), bytesOf(body), `${repo} ${file}`);
          }
        }
      }

      const asked = hub.requests.length;
      const second = fetchIO(hubOpts);
      assert.equal(await runFetch({ list: false }, second.io), 0);
      assert.equal(hub.requests.length, asked, "nothing asked of the Hub");
      assert.deepEqual(second.progress, []);
      assert.match(second.out.at(-1)!, /^all 16 files are there/);

      const list = fetchIO({ ...hubOpts, offline: true });
      assert.equal(await runFetch({ list: true }, list.io), 0);
      assert.equal(list.out.filter((l) => /^ {2}cached /.test(l)).length, count);
      assert.match(list.out.at(-1)!, /^16 files: 16 cached \(.+B\), 0 missing/);
    });
  });
});

Deno.test("dipsy fetch resumes: only the missing files are fetched, with their sizes listed", async () => {
  await withFakeCache(async (fake) => {
    const { repos } = await defaultSetRepos();
    await withMockHub(repos, {}, async (hub) => {
      const hubOpts = { cacheDir: fake.cache, offline: false, endpoint: hub.url };
      const clip = "openai/clip-vit-base-patch16@refs/pr/10";
      assert.equal(await runFetch({ list: false, clip }, fetchIO(hubOpts).io), 0);
      const snapshot = join(fake.cache, "models--openai--clip-vit-base-patch16", "snapshots");
      const [commit] = [...Deno.readDirSync(snapshot)].map((e) => e.name);
      // The weights lose their snapshot entry only, the vocabulary its blob too.
      Deno.removeSync(join(snapshot, commit, "model.safetensors"));
      Deno.removeSync(Deno.realPathSync(join(snapshot, commit, "vocab.json")));
      Deno.removeSync(join(snapshot, commit, "vocab.json"));

      const list = fetchIO(hubOpts);
      assert.equal(await runFetch({ list: true }, list.io), 0);
      const missing = list.out.filter((l) => /^ {2}missing /.test(l));
      assert.deepEqual(missing.map((l) => l.trim().split(/\s+/).at(-1)), [
        "model.safetensors",
        "vocab.json",
      ]);
      // Sizes as the Hub lists them.
      const sizes = missing.map((l) => l.trim().split(/\s+/).slice(1, 3).join(" "));
      assert.deepEqual(sizes, [
        "3.02 kB",
        `${bytesOf(repos["openai/clip-vit-base-patch16"].files["vocab.json"]).length} B`,
      ]);

      const before = hub.requests.filter((r) => r.includes("/resolve/")).length;
      const again = fetchIO(hubOpts);
      assert.equal(await runFetch({ list: false }, again.io), 0);
      const gets = hub.requests.filter((r) => r.includes("/resolve/")).slice(before);
      // The blob of the weights is still there: only its snapshot link is made again.
      assert.deepEqual(gets, [`GET /openai/clip-vit-base-patch16/resolve/${commit}/vocab.json`]);
      assert.match(again.out.at(-1)!, /^fetched 2 files .*; 14 already there/);
    });
  });
});

Deno.test("dipsy fetch without a network: one line per missing item with the settings, exit 1", async () => {
  await withFakeCache(async (fake) => {
    const unreachable = fetchIO({
      cacheDir: fake.cache,
      offline: false,
      endpoint: `http://127.0.0.1:${closedPort()}`,
      timeoutMs: 2000,
    });
    assert.equal(await runFetch({ list: false }, unreachable.io), 1);
    assert.equal(unreachable.err.length, 4, unreachable.err.join("\n"));
    const flags = ["--model", "--ip-adapter", "--image-encoder", "--clip"];
    for (const [i, line] of unreachable.err.entries()) {
      assert.ok(line.startsWith(`dipsy fetch: ${flags[i]} `), line);
      assert.match(line, /HF_ENDPOINT/);
      assert.match(line, /HF_HUB_OFFLINE/);
      assert.ok(!line.includes("\n"), line);
    }
    assert.match(
      unreachable.err[0],
      /stable-diffusion-v1-5\/stable-diffusion-v1-5: 9 file\(s\) missing/,
    );
    assert.match(unreachable.out.at(-1)!, /^fetched 0 files .*16 still missing/);
    // Nothing half-made is left behind to confuse the next attempt.
    assert.equal(existsSync(join(fake.cache, "models--h94--IP-Adapter")), false);

    const off = fetchIO({ cacheDir: fake.cache, offline: true });
    assert.equal(await runFetch({ list: false }, off.io), 1);
    assert.equal(off.err.length, 4);
    assert.match(off.err[3], /--clip .*: 4 file\(s\) missing .*offline/);

    // A local folder is checked, never fetched.
    const local = fetchIO({ cacheDir: fake.cache, offline: true });
    assert.equal(await runFetch({ list: false, model: fake.local }, local.io), 1);
    assert.match(
      local.err[0],
      /^dipsy fetch: --model .*my model: 9 file\(s\) missing .*a local path is never fetched/,
    );
    const listed = fetchIO({ cacheDir: fake.cache, offline: true });
    assert.equal(await runFetch({ list: true, model: fake.local }, listed.io), 0);
    assert.equal(listed.out.filter((l) => /^ {2}absent /.test(l)).length, 9);
  });
});

Deno.test("dipsy fetch as a command: exit 1 and one line per item, no stack trace", async () => {
  await withFakeCache(async (fake) => {
    const main = new URL("../cli/main.ts", import.meta.url).pathname;
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--no-check", main, "fetch", "--model", "org/tiny@refs/pr/10"],
      env: {
        HF_HUB_CACHE: fake.cache,
        HF_ENDPOINT: `http://127.0.0.1:${closedPort()}`,
        HF_HUB_OFFLINE: "0",
      },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const err = new TextDecoder().decode(out.stderr).trim().split("\n");
    assert.equal(out.code, 1, err.join("\n"));
    assert.equal(err.length, 4, err.join("\n"));
    assert.match(err[0], /^dipsy fetch: --model org\/tiny@refs\/pr\/10: 9 file\(s\) missing/);
    assert.ok(err.every((l) => /HF_ENDPOINT=http:\/\/127\.0\.0\.1:\d+, HF_HUB_OFFLINE=0/.test(l)));
    assert.ok(!err.some((l) => /^\s+at /.test(l)), "no stack trace");
  });
});

/** Every entry under `root`: "path" for files, "path -> target" for symlinks, sorted. */
function cacheTree(root: string): string[] {
  const out: string[] = [];
  const walk = (dir: string, rel: string) => {
    for (const e of Deno.readDirSync(dir)) {
      const path = join(dir, e.name), r = rel ? `${rel}/${e.name}` : e.name;
      // Locks are empty files whose presence varies; CACHEDIR.TAG is huggingface_hub's note to
      // backup tools that nothing reads.
      if (r.startsWith(".locks") || r === "CACHEDIR.TAG") continue;
      if (e.isSymlink) out.push(`${r} -> ${Deno.readLinkSync(path)}`);
      else if (e.isDirectory) walk(path, r);
      else out.push(`${r} ${Deno.readTextFileSync(path).length}`);
    }
  };
  walk(root, "");
  return out.sort();
}

Deno.test("the cache dipsy fetch fills is the one huggingface_hub fills (.venv's Python)", async () => {
  const python = join(Deno.cwd(), ".venv", "bin", "python");
  if (!existsSync(python)) {
    console.log(`skipped: no ${python} (the reference venv; deno task test makes it)`);
    return;
  }
  await withTempDir(async (root) => {
    const { repos } = await defaultSetRepos();
    await withMockHub(repos, {}, async (hub) => {
      const ours = join(root, "dipsy"), theirs = join(root, "python");
      const io = fetchIO({ cacheDir: ours, offline: false, endpoint: hub.url });
      assert.equal(await runFetch({ list: false }, io.io), 0, io.err.join("\n"));
      const wanted = Object.entries(repos).flatMap(([repo, r]) =>
        r.revisions!.flatMap((rev) => Object.keys(r.files).map((f) => [repo, rev, f]))
      );
      const code = `import json, sys
from huggingface_hub import hf_hub_download
for repo, rev, f in json.loads(sys.argv[1]):
    hf_hub_download(repo, f, revision=rev, cache_dir=sys.argv[2])`;
      const out = await new Deno.Command(python, {
        args: ["-c", code, JSON.stringify(wanted), theirs],
        env: { HF_ENDPOINT: hub.url, HF_HUB_DISABLE_TELEMETRY: "1", HF_HUB_OFFLINE: "0" },
        stdout: "piped",
        stderr: "piped",
      }).output();
      assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
      assert.deepEqual(cacheTree(ours), cacheTree(theirs));
    });
  });
});

Deno.test("dipsy fetch refuses a path out of the model or a pickle up front, in one line", async () => {
  await withFakeCache(async (fake) => {
    const cases: [string, RegExp][] = [
      [
        "org/x@main:../y.safetensors",
        /^--ip-adapter org\/x@main:\.\.\/y\.safetensors: .* must stay inside the model folder, got "\.\.\/y\.safetensors"$/,
      ],
      ["org/x@main:", /^--ip-adapter org\/x@main:: no file path inside the model given$/],
      [
        "org/x/models/a.bin",
        /^--ip-adapter org\/x\/models\/a\.bin: "models\/a\.bin" is a pickle checkpoint/,
      ],
    ];
    for (const list of [true, false]) {
      for (const [ipAdapter, re] of cases) {
        const io = fetchIO({ cacheDir: fake.cache, offline: true });
        await assert.rejects(runFetch({ list, ipAdapter }, io.io), (e: unknown) => {
          assert.ok(e instanceof CliError, String(e));
          assert.match(oneLine(e.message), re);
          return true;
        });
        assert.deepEqual([...io.out, ...io.err], [], "refused before anything is listed");
      }
    }
  });
});

Deno.test("a Hub failure's reason is one line, even from an HTML error page", () => {
  const page = new Error("<html>\n  <body>\n    502 Bad Gateway\n  </body>\n</html>\n");
  assert.equal(explainDownloadError(page), "<html> <body> 502 Bad Gateway </body> </html>");
  const long = explainDownloadError(new Error("x".repeat(1000)));
  assert.equal(long, `${"x".repeat(300)}...`);
});
