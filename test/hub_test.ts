/**
 * Model references against a fake Hugging Face cache laid out as huggingface_hub writes it
 * (refs/, snapshots/ with symlinks into blobs/, .no_exist/), plus local folders, offline mode and
 * a download attempt against a closed local port.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  hubCacheDir,
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
      /hf download org\/tiny model\.safetensors --revision main/,
      /local folder/,
    );
    assert.ok(msg.includes(fake.cache), msg);
    await rejectsWith(resolveModelFile("org/tiny", "dangling.json", o), /not in the Hugging Face/);
    await rejectsWith(resolveModelFile("org/tiny", "tokenizer.json", o), /records it as absent/);
    await rejectsWith(
      resolveModelFile("nobody/missing@v2", "config.json", o),
      /nobody\/missing@v2/,
      /--revision v2/,
    );
    await rejectsWith(resolveModelDir("nobody/missing", o), /hf download nobody\/missing/);
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
      /hf download nobody\/missing config\.json --revision main/,
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

/** Just enough of the Hub's HTTP API for @huggingface/hub to download plain (non-LFS) files. */
function mockHub(files: Record<string, string>, sha: string) {
  const requests: string[] = [];
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (req) => {
    const url = new URL(req.url);
    requests.push(`${req.method} ${url.pathname}`);
    const json = (v: unknown) => Response.json(v);
    if (url.pathname === "/api/models/org/fresh/revision/main") {
      return json({ _id: "1", id: "org/fresh", sha, private: false, gated: false, downloads: 0 });
    }
    if (url.pathname.startsWith(`/api/models/org/fresh/paths-info/${sha}`)) {
      const { paths } = await req.json() as { paths: string[] };
      return json(
        paths.filter((p) => p in files).map((p) => ({
          type: "file",
          path: p,
          oid: `oid-${p.replaceAll("/", "-")}`,
          size: files[p].length,
          // The last commit touching a file is usually older than the revision asked for.
          lastCommit: { id: OLD, title: "older", date: "2024-01-01T00:00:00Z" },
        })),
      );
    }
    const prefix = `/org/fresh/resolve/${sha}/`;
    if (url.pathname.startsWith(prefix)) {
      const body = new TextEncoder().encode(files[url.pathname.slice(prefix.length)]);
      const m = /bytes=(\d+)-(\d*)/.exec(req.headers.get("range") ?? "");
      const from = m ? Number(m[1]) : 0;
      const to = m && m[2] ? Number(m[2]) + 1 : body.length;
      return new Response(body.slice(from, to), {
        status: m ? 206 : 200,
        headers: {
          etag: `"oid"`,
          "content-range": `bytes ${from}-${to - 1}/${body.length}`,
        },
      });
    }
    return new Response("not found", { status: 404 });
  });
  return { server, requests, url: `http://127.0.0.1:${server.addr.port}` };
}

Deno.test("downloads land where huggingface_hub puts them (mock Hub on localhost)", async () => {
  await withFakeCache(async (fake) => {
    const sha = "d".repeat(40);
    const hub = mockHub({ "config.json": '{"fresh": true}', "unet/config.json": "{}" }, sha);
    try {
      const opts = { cacheDir: fake.cache, offline: false, endpoint: hub.url, timeoutMs: 5000 };
      const path = await resolveModelFile("org/fresh", "config.json", opts);
      const repo = join(fake.cache, "models--org--fresh");
      assert.equal(path, join(repo, "snapshots", sha, "config.json"));
      assert.equal(Deno.readTextFileSync(path), '{"fresh": true}');
      assert.equal(Deno.readTextFileSync(join(repo, "refs", "main")), sha);
      assert.ok(Deno.lstatSync(path).isSymlink, "snapshot entries point into blobs/");
      // Now cached: resolves offline, and a second file reuses the recorded commit.
      assert.equal(await resolveModelFile("org/fresh", "config.json", offline(fake.cache)), path);
      const unet = await resolveModelFile("org/fresh", "config.json", {
        ...opts,
        subfolder: "unet",
      });
      assert.equal(unet, join(repo, "snapshots", sha, "unet", "config.json"));
      assert.equal(hub.requests.filter((r) => r.includes("/revision/")).length, 1);
      await rejectsWith(
        resolveModelFile("org/fresh", "model.safetensors", opts),
        /downloading it failed/,
      );
    } finally {
      await hub.server.shutdown();
    }
  });
});
