/**
 * Bootstrap: finds libtorch, builds the native shim when its sources changed, and (with
 * `--reference`) prepares the Python reference environment and regenerates stale test fixtures.
 * Every task runs it first, so when everything is current it only stats and hashes a few files.
 *
 *   deno run -A native/bootstrap.ts [--force] [--reference] [--quiet]
 *
 *   --force      look for libtorch again and rebuild the shim from a clean build folder
 *   --reference  also make sure .venv holds test/reference/requirements.txt and that every
 *                test/fixtures/NAME/ is current with test/reference/NAME_ref.py
 *   --quiet      print errors only
 *
 * libtorch is taken, in order, from `LIBTORCH` (an unpacked libtorch folder), from the `torch`
 * package of `DIPSY_PYTHON` (default `python3`), or from the project's own `.venv`, which is created
 * and given `pip install torch==<pin>` when needed. The result is cached in
 * `.cache/native/libtorch.json`. The shim is built into `.cache/native/<key>/libdipsy_torch.so`,
 * where `<key>` hashes the native sources and the libtorch used, and `.cache/native/current.json`
 * names the library the FFI loader opens.
 *
 * `DIPSY_NATIVE_CACHE=DIR` puts all of that (libtorch.json, the builds, current.json) into DIR
 * instead of `.cache/native`, and the FFI loader reads DIR/current.json: a second build, e.g.
 * against a CUDA libtorch, lives beside the default one without replacing it.
 */
import { failureSummary } from "./build_log.ts";
import { nativeSourceHash } from "./source_hash.ts";

const ROOT = decodeURIComponent(new URL("..", import.meta.url).pathname).replace(/\/$/, "");
const DEFAULT_CACHE = `${ROOT}/.cache/native`;
const CACHE = nativeCacheDir();
const LIBTORCH_JSON = `${CACHE}/libtorch.json`;
const CURRENT_JSON = `${CACHE}/current.json`;
/** Guards .venv, the fixtures and the default cache. */
const LOCK = `${ROOT}/.cache/bootstrap.lock`;
/** Guards the cache folder; another cache's build then does not hold up the default one's. */
const CACHE_LOCK = CACHE === DEFAULT_CACHE ? LOCK : `${CACHE}/.bootstrap.lock`;
const VENV = `${ROOT}/.venv`;
const VENV_PY = `${VENV}/bin/python`;
const REF_DIR = `${ROOT}/test/reference`;
const REQUIREMENTS = `${REF_DIR}/requirements.txt`;
const REQUIREMENTS_NODEPS = `${REF_DIR}/requirements-nodeps.txt`; // optional, pip --no-deps
const REQUIREMENTS_MARKER = `${VENV}/.dipsy-requirements.sha256`;
const FIXTURES = `${ROOT}/test/fixtures`;
const STAMP = ".dipsy-stamp";
const TORCH_PIN = "torch==2.13.0"; // used when requirements.txt has no torch line
const FIXTURE_JOBS = 2;
const KEEP_BUILDS = 3;

const DEBIAN = "on Debian/Ubuntu:";

/** A failure the user can act on: printed as is, exit status 1. */
class BootstrapError extends Error {}

interface Options {
  force: boolean;
  reference: boolean;
  quiet: boolean;
}

/** Where libtorch is and what it is; cached in .cache/native/libtorch.json. */
interface Libtorch {
  /** LIBTORCH and DIPSY_PYTHON as they were when this was found; a change means "look again". */
  key: string;
  source: "LIBTORCH" | "python" | "venv";
  /** The libtorch folder (holding include/ and lib/): a libtorch download or site-packages/torch. */
  prefix: string;
  /** What CMake gets as CMAKE_PREFIX_PATH. */
  cmakePrefix: string;
  libDir: string;
  version: string;
  /** CUDA version libtorch was built with, or null for a CPU build. */
  cuda: string | null;
  /** "config" (find_package(Torch)) or "manual" (see native/CMakeLists.txt). */
  findMode: "config" | "manual";
  cxx11abi: boolean | null;
  python: string | null;
}

// ---------------------------------------------------------------------------------------------
// Small helpers

let quiet = false;

function info(msg: string): void {
  if (!quiet) console.error(`dipsy: ${msg}`);
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

function removeAll(path: string): void {
  try {
    Deno.removeSync(path, { recursive: true });
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
}

function readText(path: string): string | null {
  try {
    return Deno.readTextFileSync(path);
  } catch {
    return null;
  }
}

function readJson<T>(path: string): T | null {
  const text = readText(path);
  if (text === null) return null;
  try {
    return JSON.parse(text) as T;
  } catch {
    return null;
  }
}

/** Writes through a temporary file and a rename, so readers never see half a file. */
function writeAtomic(path: string, text: string): void {
  const tmp = `${path}.tmp-${Deno.pid}`;
  Deno.writeTextFileSync(tmp, text);
  Deno.renameSync(tmp, path);
}

async function sha256(data: string | Uint8Array): Promise<string> {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes as BufferSource));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

function nativeCacheDir(): string {
  const dir = Deno.env.get("DIPSY_NATIVE_CACHE");
  if (!dir) return DEFAULT_CACHE;
  return (dir.startsWith("/") ? dir : `${Deno.cwd()}/${dir}`).replace(/\/+$/, "");
}

function rel(path: string): string {
  return path.startsWith(`${ROOT}/`) ? path.slice(ROOT.length + 1) : path;
}

function seconds(start: number): string {
  return `${((performance.now() - start) / 1000).toFixed(1)} s`;
}

function tail(lines: string[], n: number): string {
  return lines.slice(-n).map((l) => `    ${l}`).join("\n");
}

/** The path of an executable on PATH, or null. */
function which(name: string): string | null {
  if (name.includes("/")) return exists(name) ? name : null;
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    if (!dir) continue;
    try {
      const st = Deno.statSync(`${dir}/${name}`);
      if (st.isFile && ((st.mode ?? 0o111) & 0o111)) return `${dir}/${name}`;
    } catch { /* not here */ }
  }
  return null;
}

interface RunResult {
  code: number;
  /** stdout and stderr lines, interleaved as they arrived. */
  lines: string[];
  stdout: string;
  stderr: string;
}

/**
 * Runs a command to completion, collecting its output; `onLine` sees each line as it arrives.
 * Throws Deno.errors.NotFound when the executable does not exist.
 */
async function run(
  cmd: string,
  args: string[],
  opts: { env?: Record<string, string>; onLine?: (line: string) => void } = {},
): Promise<RunResult> {
  const child = new Deno.Command(cmd, {
    args,
    cwd: ROOT,
    env: opts.env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const lines: string[] = [];
  const pump = async (stream: ReadableStream<Uint8Array>): Promise<string> => {
    let all = "";
    let pending = "";
    const decoder = new TextDecoder();
    for await (const bytes of stream) {
      const chunk = decoder.decode(bytes, { stream: true });
      all += chunk;
      pending += chunk;
      const parts = pending.split(/\r?\n/);
      pending = parts.pop() ?? "";
      for (const line of parts) {
        lines.push(line);
        opts.onLine?.(line);
      }
    }
    if (pending) {
      lines.push(pending);
      opts.onLine?.(pending);
    }
    return all;
  };
  const [stdout, stderr, status] = await Promise.all([
    pump(child.stdout),
    pump(child.stderr),
    child.status,
  ]);
  return { code: status.code, lines, stdout, stderr };
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Serializes the steps that write (venv, build, fixtures) between bootstraps started at the same
 * time, e.g. two tasks in two terminals. A lock left by a killed process is taken over.
 */
async function withLock<T>(lock: string, fn: () => Promise<T>): Promise<T> {
  Deno.mkdirSync(lock.slice(0, lock.lastIndexOf("/")), { recursive: true });
  let announced = false;
  for (;;) {
    try {
      Deno.mkdirSync(lock);
      break;
    } catch (e) {
      if (!(e instanceof Deno.errors.AlreadyExists)) throw e;
    }
    const pid = Number(readText(`${lock}/pid`) ?? "0");
    let age = 0;
    try {
      age = Date.now() - (Deno.statSync(lock).mtime?.getTime() ?? Date.now());
    } catch { /* just released */ }
    const dead = pid > 0 && Deno.build.os === "linux" && !exists(`/proc/${pid}`);
    if (dead || (pid === 0 && age > 60_000) || age > 6 * 3600_000) {
      try {
        Deno.removeSync(lock, { recursive: true });
      } catch { /* someone else took it over */ }
      continue;
    }
    if (!announced) {
      info(`waiting for another bootstrap (pid ${pid || "?"}) to finish`);
      announced = true;
    }
    await sleep(500);
  }
  Deno.writeTextFileSync(`${lock}/pid`, String(Deno.pid));
  try {
    return await fn();
  } finally {
    try {
      Deno.removeSync(lock, { recursive: true });
    } catch { /* already gone */ }
  }
}

/**
 * Runs `fn` holding the lock of .venv and the fixtures. A bootstrap of the default cache holds it
 * throughout; one of another cache takes it only around these steps (always after its own cache
 * lock, so two bootstraps never wait on each other in a circle).
 */
function withSharedLock<T>(fn: () => Promise<T>): Promise<T> {
  return CACHE_LOCK === LOCK ? fn() : withLock(LOCK, fn);
}

// ---------------------------------------------------------------------------------------------
// libtorch discovery

function describe(lt: Libtorch): string {
  return `${lt.version} (${lt.cuda ? `CUDA ${lt.cuda}` : "CPU"})`;
}

function discoveryKey(): string {
  return JSON.stringify({
    LIBTORCH: Deno.env.get("LIBTORCH") ?? null,
    DIPSY_PYTHON: Deno.env.get("DIPSY_PYTHON") ?? null,
    DIPSY_TORCH_FIND: Deno.env.get("DIPSY_TORCH_FIND") ?? null,
  });
}

/** Version and CUDA version of the libtorch in `prefix`, read from files: no Python involved. */
function readTorchVersion(prefix: string): { version: string; cuda: string | null } | null {
  const hasCudaLib = exists(`${prefix}/lib/libtorch_cuda.so`);
  const py = readText(`${prefix}/version.py`); // site-packages/torch
  if (py) {
    const v = py.match(/^__version__\s*=\s*['"]([^'"]+)['"]/m);
    const c = py.match(/^cuda\s*(?::[^=]*)?=\s*(?:['"]([^'"]+)['"]|None)/m);
    if (v) return { version: v[1], cuda: c?.[1] ?? (hasCudaLib ? "unknown" : null) };
  }
  const bv = readText(`${prefix}/build-version`)?.trim(); // libtorch downloads: "2.13.0+cu128"
  if (bv) {
    const cu = bv.match(/\+cu(\d+)(\d)$/);
    return { version: bv, cuda: cu ? `${cu[1]}.${cu[2]}` : (hasCudaLib ? "unknown" : null) };
  }
  const cv = readText(`${prefix}/share/cmake/Torch/TorchConfigVersion.cmake`);
  const m = cv?.match(/PACKAGE_VERSION "([^"]+)"/);
  if (m) return { version: m[1], cuda: hasCudaLib ? "unknown" : null };
  return null;
}

/** The cached discovery, if it was made under the same environment and still holds. */
function cachedLibtorch(): Libtorch | null {
  const lt = readJson<Libtorch>(LIBTORCH_JSON);
  if (!lt || lt.key !== discoveryKey()) return null;
  if (!exists(`${lt.libDir}/libtorch.so`)) return null;
  const v = readTorchVersion(lt.prefix);
  if (!v || v.version !== lt.version || v.cuda !== lt.cuda) return null;
  // A discovery made under an older rule (or before TorchConfig.cmake went) is made again.
  if (lt.findMode !== chooseFindMode(lt.prefix, lt.cuda)) return null;
  return lt;
}

/**
 * How CMake gets libtorch. TorchConfig.cmake of a CUDA libtorch searches for a complete CUDA
 * toolkit (nvcc, cuBLAS, cuSPARSE, NVRTC, ...) and fails without one, although the shim compiles no
 * CUDA code and needs only headers: the manual mode links the libtorch folder and takes the CUDA
 * headers from the nvidia-* wheels of a pip torch or from any toolkit (see native/CMakeLists.txt).
 * So CUDA always goes the manual way, and config is for CPU builds, where it always works.
 */
function chooseFindMode(prefix: string, cuda: string | null): "config" | "manual" {
  const forced = Deno.env.get("DIPSY_TORCH_FIND");
  if (forced === "config" || forced === "manual") return forced;
  if (forced) throw new BootstrapError(`DIPSY_TORCH_FIND must be config or manual, not ${forced}`);
  if (cuda || !exists(`${prefix}/share/cmake/Torch/TorchConfig.cmake`)) return "manual";
  return "config";
}

function fromLibtorchEnv(value: string): Libtorch {
  let prefix = value.startsWith("/") ? value : `${Deno.cwd()}/${value}`;
  prefix = prefix.replace(/\/+$/, "").replace(/\/share\/cmake(\/Torch)?$/, "");
  const config = `${prefix}/share/cmake/Torch/TorchConfig.cmake`;
  const lib = `${prefix}/lib/libtorch.so`;
  if (!exists(lib) || !(exists(config) || exists(`${prefix}/include/torch`))) {
    throw new BootstrapError(
      `LIBTORCH=${value} is not a usable libtorch folder.\n` +
        `  expected ${lib}\n` +
        `  and ${config} (or ${prefix}/include/torch)\n` +
        `  (${exists(prefix) ? "the folder exists but lacks them" : "no such folder"}).\n` +
        "  Point LIBTORCH at an unpacked libtorch (the folder holding lib/ and include/, from\n" +
        "  https://pytorch.org/get-started/locally/ > LibTorch) or at a Python torch package\n" +
        "  (.../site-packages/torch), or unset LIBTORCH to use Python's torch.",
    );
  }
  prefix = Deno.realPathSync(prefix);
  const v = readTorchVersion(prefix);
  if (!v) {
    throw new BootstrapError(
      `LIBTORCH=${value}: cannot tell the libtorch version (no version.py, build-version or ` +
        "share/cmake/Torch/TorchConfigVersion.cmake)",
    );
  }
  const findMode = chooseFindMode(prefix, v.cuda);
  return {
    key: discoveryKey(),
    source: "LIBTORCH",
    prefix,
    cmakePrefix: prefix,
    libDir: `${prefix}/lib`,
    version: v.version,
    cuda: v.cuda,
    findMode,
    cxx11abi: null,
    python: null,
  };
}

const TORCH_QUERY = `
import json, os, sys
import torch, torch.utils
print(json.dumps({
  "prefix": os.path.dirname(os.path.realpath(torch.__file__)),
  "cmakePrefix": os.path.realpath(torch.utils.cmake_prefix_path),
  "version": torch.__version__,
  "cuda": torch.version.cuda,
  "cxx11abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)),
  "python": sys.executable,
}))
`;

/** Asks a Python for its torch; null when that Python has none (`why` then says what happened). */
async function queryPythonTorch(
  python: string,
  source: "python" | "venv",
): Promise<{ lt: Libtorch | null; why: string }> {
  let r: RunResult;
  try {
    r = await run(python, ["-c", TORCH_QUERY]);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return { lt: null, why: `${python} not found` };
    throw e;
  }
  if (r.code !== 0) {
    const last = r.stderr.trim().split("\n").pop() ?? "";
    return { lt: null, why: `${python} cannot import torch (${last})` };
  }
  const q = JSON.parse(r.stdout.trim().split("\n").pop()!) as {
    prefix: string;
    cmakePrefix: string;
    version: string;
    cuda: string | null;
    cxx11abi: boolean;
    python: string;
  };
  return {
    lt: {
      key: discoveryKey(),
      source,
      prefix: q.prefix,
      cmakePrefix: q.cmakePrefix,
      libDir: `${q.prefix}/lib`,
      version: q.version,
      cuda: q.cuda,
      findMode: chooseFindMode(q.prefix, q.cuda),
      cxx11abi: q.cxx11abi,
      python: q.python,
    },
    why: "",
  };
}

function torchPin(): string {
  const req = readText(REQUIREMENTS) ?? "";
  const line = req.split("\n").map((l) => l.trim()).find((l) => /^torch\s*[=<>~!]/.test(l));
  return line ?? TORCH_PIN;
}

/** Creates .venv with the system python3 when it does not exist yet. */
async function ensureVenv(): Promise<void> {
  if (exists(VENV_PY)) return;
  const python3 = which("python3");
  if (!python3) {
    throw new BootstrapError(
      "python3 not found, and it is needed to install torch into .venv.\n" +
        `  Install it (${DEBIAN} sudo apt-get install python3 python3-venv python3-pip),\n` +
        "  or point LIBTORCH at an unpacked libtorch, or DIPSY_PYTHON at a Python that has torch.",
    );
  }
  info(`creating ${rel(VENV)} (python3 -m venv)`);
  const r = await run(python3, ["-m", "venv", VENV]);
  if (r.code !== 0 || !exists(VENV_PY)) {
    const noVenv = /ensurepip|venv/i.test(r.stdout + r.stderr);
    try {
      Deno.removeSync(VENV, { recursive: true });
    } catch { /* nothing was created */ }
    throw new BootstrapError(
      `python3 -m venv .venv failed:\n${tail(r.lines, 15)}\n` +
        (noVenv
          ? `  The venv module (with ensurepip) is missing: ${DEBIAN} sudo apt-get install python3-venv`
          : ""),
    );
  }
}

/** pip install into .venv, printing progress lines; throws with pip's output tail on failure. */
async function pipInstall(args: string[], what: string): Promise<void> {
  const start = performance.now();
  info(`pip install ${what} into ${rel(VENV)} (this can take a few minutes)`);
  const r = await run(
    VENV_PY,
    ["-m", "pip", "install", "--progress-bar", "off", "--disable-pip-version-check", ...args],
    {
      onLine: (line) => {
        // What was asked for (not its dependencies), big downloads, and the end.
        let show = line.trim();
        if (/^(Collecting|Processing) /.test(show) && !/\(from (?!-r )/.test(show)) {
          show = show.replace(/ \(from .*$/, "").replace(/^Processing \S*\//, "Processing ");
        } else if (
          !/^(Downloading \S+ \((\d{3,}(\.\d+)? MB|[\d.]+ GB)\)|Installing coll)/.test(show)
        ) {
          return;
        }
        info(`  pip: ${show.length > 120 ? `${show.slice(0, 120)}...` : show}`);
      },
    },
  );
  if (r.code !== 0) {
    throw new BootstrapError(
      `pip install ${what} failed (exit ${r.code}); the end of its output:\n` +
        `${tail(r.lines, 30)}\n` +
        "  Check the network / package index, then run the task again. A broken .venv can be\n" +
        "  deleted: the next run recreates it.",
    );
  }
  info(`pip install ${what} done in ${seconds(start)}`);
}

async function discoverLibtorch(): Promise<Libtorch> {
  const libtorchEnv = Deno.env.get("LIBTORCH");
  if (libtorchEnv) return fromLibtorchEnv(libtorchEnv);

  const explicit = Deno.env.get("DIPSY_PYTHON");
  const python = explicit ?? "python3";
  const found = await queryPythonTorch(python, "python");
  if (found.lt) return found.lt;
  if (explicit) {
    throw new BootstrapError(
      `DIPSY_PYTHON=${explicit}: ${found.why}.\n` +
        "  Point DIPSY_PYTHON at a Python whose `import torch` works, or unset it.",
    );
  }

  if (exists(VENV_PY)) {
    const venv = await queryPythonTorch(VENV_PY, "venv");
    if (venv.lt) return venv.lt;
  } else {
    info(`no libtorch found (no LIBTORCH, ${found.why}): installing torch into ${rel(VENV)}`);
  }
  await ensureVenv();
  await pipInstall([torchPin()], torchPin());
  const venv = await queryPythonTorch(VENV_PY, "venv");
  if (!venv.lt) throw new BootstrapError(`torch was installed into .venv but ${venv.why}`);
  return venv.lt;
}

// ---------------------------------------------------------------------------------------------
// Native build

interface BuildPlan {
  sourceHash: string;
  key: string;
  lib: string;
}

/** "auto" (what the libtorch headers require, see native/CMakeLists.txt) unless overridden. */
function cxxStandard(): string {
  return Deno.env.get("DIPSY_CXX_STANDARD") || "auto";
}

async function buildPlan(lt: Libtorch): Promise<BuildPlan> {
  const sourceHash = await nativeSourceHash(ROOT);
  const parts: unknown[] = [sourceHash, lt.prefix, lt.version, lt.cuda, lt.findMode];
  if (cxxStandard() !== "auto") parts.push(cxxStandard()); // the default keeps the old keys
  const key = (await sha256(JSON.stringify(parts))).slice(0, 16);
  return { sourceHash, key, lib: `${CACHE}/${key}/libdipsy_torch.so` };
}

function currentJson(lt: Libtorch, plan: BuildPlan): string {
  const builtAt = Deno.statSync(plan.lib).mtime?.toISOString() ?? null;
  return JSON.stringify(
    {
      lib: plan.lib,
      sourceHash: plan.sourceHash,
      buildKey: plan.key,
      libtorch: {
        source: lt.source,
        prefix: lt.prefix,
        libDir: lt.libDir,
        version: lt.version,
        cuda: lt.cuda,
        findMode: lt.findMode,
      },
      builtAt,
    },
    null,
    2,
  ) + "\n";
}

function checkBuildTools(): void {
  const missing: string[] = [];
  if (!which("cmake")) missing.push("cmake (package cmake)");
  const cxx = Deno.env.get("CXX");
  if (cxx ? !which(cxx) : !(which("c++") || which("g++") || which("clang++"))) {
    missing.push(cxx ? `the C++ compiler CXX=${cxx}` : "a C++ compiler (package g++)");
  }
  if (!which("make")) missing.push("make (package make)");
  if (missing.length) {
    throw new BootstrapError(
      `cannot build the native library: missing ${missing.join(", ")}.\n` +
        `  ${DEBIAN} sudo apt-get install cmake g++ make   (or: build-essential cmake)`,
    );
  }
}

/** Builds the shim (incrementally unless `clean`) and returns the path of the fresh library. */
async function buildNative(lt: Libtorch, clean: boolean): Promise<string> {
  checkBuildTools();
  // One incremental build folder per libtorch: an edit recompiles only the files it touched.
  const libKey = (await sha256(JSON.stringify([lt.prefix, lt.version, lt.cuda, lt.findMode])))
    .slice(0, 12);
  const buildDir = `${CACHE}/build-${libKey}`;
  if (clean) removeAll(buildDir);
  Deno.mkdirSync(buildDir, { recursive: true });
  const log: string[] = [];
  const jobs = Number(Deno.env.get("DIPSY_BUILD_JOBS")) || navigator.hardwareConcurrency || 2;
  info(`building the native library against libtorch ${describe(lt)}, ${jobs} jobs`);

  const configure = [
    "-S",
    `${ROOT}/native`,
    "-B",
    buildDir,
    "-DCMAKE_BUILD_TYPE=Release",
    `-DCMAKE_PREFIX_PATH=${lt.cmakePrefix}`,
    `-DDIPSY_TORCH_FIND=${lt.findMode}`,
    `-DDIPSY_TORCH_PREFIX=${lt.prefix}`,
    // Passed on every configure: a cached value from an earlier one must not outlive its reason.
    `-DDIPSY_CXX_STANDARD=${cxxStandard()}`,
  ];
  if (lt.cxx11abi !== null) configure.push(`-DDIPSY_TORCH_CXX11_ABI=${lt.cxx11abi ? 1 : 0}`);
  if (which("ccache")) configure.push("-DCMAKE_CXX_COMPILER_LAUNCHER=ccache");
  const steps: [string, string[]][] = [
    ["configure", configure],
    ["build", ["--build", buildDir, "-j", String(jobs)]],
  ];
  for (const [step, args] of steps) {
    log.push(`$ cmake ${args.join(" ")}`);
    const r = await run("cmake", args, {
      onLine: (line) => {
        log.push(line);
        const m = line.match(/^\[\s*\d+%\] (?:Building CXX object .*\/(.*)\.o|(Linking).*)$/);
        if (m) info(`  ${line.slice(0, 6)} ${m[1] ? `compiling ${m[1]}` : "linking"}`);
      },
    });
    Deno.writeTextFileSync(`${buildDir}/build.log`, log.join("\n") + "\n");
    if (r.code !== 0) {
      const hint = lt.cuda && lt.findMode === "config" && step === "configure"
        ? "  DIPSY_TORCH_FIND=config makes TorchConfig.cmake look for a complete CUDA toolkit;\n" +
          "  without it the build needs the CUDA headers only (README, CUDA).\n"
        : "";
      throw new BootstrapError(
        `cmake ${step} failed (exit ${r.code}):\n` +
          `${failureSummary(r.lines).map((l) => `    ${l}`).join("\n")}\n${hint}` +
          `  Full log: ${rel(buildDir)}/build.log\n` +
          "  Fix the cause and run the task again (`deno task build:native` rebuilds from a clean\n" +
          "  build folder).",
      );
    }
  }

  const built = `${buildDir}/libdipsy_torch.so`;
  if (!exists(built)) throw new BootstrapError(`cmake succeeded but ${built} is missing`);
  return built;
}

/**
 * Builds and files the library under the key of the sources it was built from. Sources edited
 * while the compiler ran would be filed under the wrong key, so the hash is taken again after the
 * build, and a mismatch builds once more (incrementally).
 */
async function buildAndStore(lt: Libtorch, plan: BuildPlan, clean: boolean): Promise<BuildPlan> {
  const start = performance.now();
  for (let attempt = 1; attempt <= 3; attempt++) {
    const built = await buildNative(lt, clean && attempt === 1);
    const after = await buildPlan(lt);
    if (after.key !== plan.key) {
      info("the native sources changed during the build: building again");
      plan = after;
      continue;
    }
    Deno.mkdirSync(`${CACHE}/${plan.key}`, { recursive: true });
    const tmp = `${plan.lib}.tmp-${Deno.pid}`;
    Deno.copyFileSync(built, tmp);
    Deno.renameSync(tmp, plan.lib);
    info(`built ${rel(plan.lib)} in ${seconds(start)}`);
    return plan;
  }
  throw new BootstrapError("the native sources kept changing during the build: run it again");
}

/** Keeps the newest few libraries (a running process may still use one) and drops the rest. */
function pruneOldBuilds(current: string): void {
  const dirs: { path: string; mtime: number }[] = [];
  for (const e of Deno.readDirSync(CACHE)) {
    if (!e.isDirectory || !/^[0-9a-f]{16}$/.test(e.name) || e.name === current) continue;
    const path = `${CACHE}/${e.name}`;
    dirs.push({ path, mtime: Deno.statSync(path).mtime?.getTime() ?? 0 });
  }
  dirs.sort((a, b) => b.mtime - a.mtime);
  for (const d of dirs.slice(KEEP_BUILDS - 1)) {
    try {
      Deno.removeSync(d.path, { recursive: true });
    } catch { /* in use elsewhere or already gone */ }
  }
}

// ---------------------------------------------------------------------------------------------
// Python reference: .venv packages and test fixtures

interface Fixture {
  name: string;
  script: string;
  stamp: string;
  dir: string;
}

async function referenceState(): Promise<{ reqHash: string; stale: Fixture[] }> {
  const main = readText(REQUIREMENTS);
  if (main === null) throw new BootstrapError(`${rel(REQUIREMENTS)} is missing`);
  const req = `requirements.txt\0${main}\0requirements-nodeps.txt\0${
    readText(REQUIREMENTS_NODEPS) ?? ""
  }\0`;
  const reqHash = await sha256(req);
  const scripts: string[] = [];
  const helpers: string[] = [];
  try {
    for (const e of Deno.readDirSync(REF_DIR)) {
      if (!e.isFile || !e.name.endsWith(".py")) continue;
      (e.name.endsWith("_ref.py") ? scripts : helpers).push(e.name);
    }
  } catch { /* no reference folder */ }
  scripts.sort();
  helpers.sort();
  // Shared helpers and the pinned packages feed every fixture.
  let common = req;
  for (const h of helpers) common += `${h}\0${readText(`${REF_DIR}/${h}`)}\0`;
  const stale: Fixture[] = [];
  for (const script of scripts) {
    const name = script.slice(0, -"_ref.py".length);
    const stamp = await sha256(`${common}${script}\0${readText(`${REF_DIR}/${script}`)}`);
    const dir = `${FIXTURES}/${name}`;
    if (readText(`${dir}/${STAMP}`)?.trim() !== stamp) stale.push({ name, script, stamp, dir });
  }
  return { reqHash, stale };
}

function referenceEnvCurrent(reqHash: string): boolean {
  return exists(VENV_PY) && readText(REQUIREMENTS_MARKER)?.trim() === reqHash;
}

async function ensureReferenceEnv(reqHash: string): Promise<void> {
  if (referenceEnvCurrent(reqHash)) return;
  await ensureVenv();
  await pipInstall(["-r", REQUIREMENTS], `-r ${rel(REQUIREMENTS)}`);
  if (exists(REQUIREMENTS_NODEPS)) {
    await pipInstall(
      ["--no-deps", "-r", REQUIREMENTS_NODEPS],
      `--no-deps -r ${rel(REQUIREMENTS_NODEPS)}`,
    );
  }
  Deno.writeTextFileSync(REQUIREMENTS_MARKER, `${reqHash}\n`);
}

/** Runs one NAME_ref.py into a temporary folder and swaps it in only when the script succeeds. */
async function generateFixture(f: Fixture): Promise<string | null> {
  const start = performance.now();
  const tmp = `${FIXTURES}/.tmp-${f.name}-${Deno.pid}`;
  removeAll(tmp);
  Deno.mkdirSync(tmp, { recursive: true });
  // One thread, as `deno task test` runs: a reduction split across threads rounds differently,
  // and the parity tests compare to the last bit.
  const env: Record<string, string> = { PYTHONDONTWRITEBYTECODE: "1", OMP_NUM_THREADS: "1" };
  const r = await run(VENV_PY, [`test/reference/${f.script}`, `${rel(tmp)}/`], { env });
  if (r.code !== 0) {
    Deno.removeSync(tmp, { recursive: true });
    const out = (r.stderr.trim() || r.stdout.trim()).split("\n");
    return `test/reference/${f.script} failed (exit ${r.code}):\n${tail(out, 60)}`;
  }
  Deno.writeTextFileSync(`${tmp}/${STAMP}`, `${f.stamp}\n`);
  const old = `${FIXTURES}/.old-${f.name}-${Deno.pid}`;
  if (exists(f.dir)) Deno.renameSync(f.dir, old);
  Deno.renameSync(tmp, f.dir);
  if (exists(old)) Deno.removeSync(old, { recursive: true });
  info(`fixture ${rel(f.dir)} regenerated by ${f.script} in ${seconds(start)}`);
  return null;
}

async function generateFixtures(stale: Fixture[]): Promise<void> {
  if (!stale.length) return;
  Deno.mkdirSync(FIXTURES, { recursive: true });
  const jobs = Math.min(FIXTURE_JOBS, stale.length);
  const queue = [...stale];
  const failures: string[] = [];
  const worker = async () => {
    for (let f = queue.shift(); f; f = queue.shift()) {
      const failure = await generateFixture(f);
      if (failure) failures.push(failure);
    }
  };
  await Promise.all(Array.from({ length: jobs }, worker));
  if (failures.length) {
    throw new BootstrapError(
      `${failures.length} fixture script(s) failed (their old fixtures, if any, are untouched)` +
        `\n\n${failures.join("\n\n")}`,
    );
  }
}

// ---------------------------------------------------------------------------------------------
// Main

function parseArgs(args: string[]): Options {
  const opts: Options = { force: false, reference: false, quiet: false };
  for (const a of args) {
    if (a === "--force") opts.force = true;
    else if (a === "--reference") opts.reference = true;
    else if (a === "--quiet") opts.quiet = true;
    else {
      throw new BootstrapError(
        `unknown argument ${a}\n  usage: deno run -A native/bootstrap.ts [--force] [--reference] [--quiet]`,
      );
    }
  }
  return opts;
}

/** True when nothing needs doing: the common case, which must stay fast. */
async function upToDate(opts: Options): Promise<boolean> {
  if (opts.force) return false;
  if (opts.reference) {
    const ref = await referenceState();
    if (!referenceEnvCurrent(ref.reqHash) || ref.stale.length) return false;
  }
  const lt = cachedLibtorch();
  if (!lt) return false;
  const plan = await buildPlan(lt);
  return exists(plan.lib) && readText(CURRENT_JSON) === currentJson(lt, plan);
}

async function bootstrap(opts: Options): Promise<void> {
  const start = performance.now();
  Deno.mkdirSync(CACHE, { recursive: true });

  // The reference venv first: on a fresh machine it also provides the torch that the build uses.
  let stale: Fixture[] = [];
  if (opts.reference) {
    const ref = await referenceState();
    await withSharedLock(() => ensureReferenceEnv(ref.reqHash));
    stale = ref.stale;
  }

  let lt = opts.force ? null : cachedLibtorch();
  if (!lt) {
    lt = await withSharedLock(discoverLibtorch);
    writeAtomic(LIBTORCH_JSON, JSON.stringify(lt, null, 2) + "\n");
    info(`libtorch ${describe(lt)} from ${lt.source}: ${lt.prefix}`);
  }

  let plan = await buildPlan(lt);
  if (opts.force || !exists(plan.lib)) {
    plan = await buildAndStore(lt, plan, opts.force);
    pruneOldBuilds(plan.key);
  }
  const current = currentJson(lt, plan);
  if (readText(CURRENT_JSON) !== current) writeAtomic(CURRENT_JSON, current);

  if (stale.length) {
    info(`regenerating ${stale.length} stale fixture(s) with ${rel(VENV_PY)}`);
    await withSharedLock(() => generateFixtures(stale));
  }
  if (performance.now() - start > 1000) info(`bootstrap done in ${seconds(start)}`);
}

async function main(): Promise<number> {
  try {
    const opts = parseArgs(Deno.args);
    quiet = opts.quiet;
    if (await upToDate(opts)) return 0;
    await withLock(CACHE_LOCK, () => bootstrap(opts));
    return 0;
  } catch (e) {
    if (e instanceof BootstrapError) {
      console.error(`dipsy bootstrap: ${e.message}`);
      return 1;
    }
    throw e;
  }
}

if (import.meta.main) Deno.exit(await main());
