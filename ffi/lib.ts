/**
 * Locates and opens the native shim. The bootstrap (`native/bootstrap.ts`) builds it and records
 * where it lives in `.cache/native/current.json` (`$DIPSY_NATIVE_CACHE/current.json` when that is
 * set, as for the bootstrap); `DIPSY_LIB` overrides that with a path.
 */
import { existsSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { nativeSourceHashSync } from "../native/source_hash.ts";
import { OP_SYMBOLS } from "./symbols.gen.ts";

export const ABI_VERSION = 2;

export const CORE_SYMBOLS = {
  dt_abi_version: { parameters: [], result: "i32" },
  dt_free_string: { parameters: ["pointer"], result: "void" },
  dt_runtime_info: { parameters: ["buffer"], result: "pointer" },
  dt_set_num_threads: { parameters: ["i32", "buffer"], result: "i32" },
  dt_manual_seed: { parameters: ["u64", "buffer"], result: "i32" },
  dt_live_handles: { parameters: [], result: "i64" },
  dt_live_bytes: { parameters: [], result: "i64" },
  dt_tensor_free: { parameters: ["pointer"], result: "void" },
  dt_tensor_free_many: { parameters: ["buffer", "i32"], result: "void" },
  dt_tensor_meta: { parameters: ["pointer", "buffer", "i32", "buffer"], result: "i32" },
  dt_tensor_share: { parameters: ["pointer", "buffer"], result: "pointer" },
  dt_from_host: {
    parameters: ["buffer", "i64", "buffer", "i32", "i32", "buffer"],
    result: "pointer",
  },
  dt_to_host: { parameters: ["pointer", "buffer", "i64", "buffer"], result: "i32" },
  dt_file_tensor: {
    parameters: ["buffer", "i64", "i64", "i32", "buffer", "i32", "i32", "i32", "buffer"],
    result: "pointer",
  },
  dt_generator_new: { parameters: ["u64", "i32", "buffer"], result: "pointer" },
  dt_generator_free: { parameters: ["pointer"], result: "void" },
  dt_set_allow_tf32: { parameters: ["i32", "buffer"], result: "i32" },
  dt_allow_tf32: { parameters: ["buffer"], result: "i32" },
  dt_sdpa_backend: {
    parameters: ["pointer", "pointer", "pointer", "pointer", "i32", "buffer", "buffer"],
    result: "i32",
  },
  dt_cuda_device_info: { parameters: ["buffer"], result: "pointer" },
  dt_cuda_memory_stats: { parameters: ["i32", "buffer"], result: "pointer" },
  dt_cuda_reset_peak_memory_stats: { parameters: ["i32", "buffer"], result: "i32" },
  dt_cuda_empty_cache: { parameters: ["buffer"], result: "i32" },
  dt_cuda_synchronize: { parameters: ["i32", "buffer"], result: "i32" },
  dt_cuda_set_sync_debug_mode: { parameters: ["i32", "buffer"], result: "i32" },
  dt_cuda_graph_new: { parameters: ["buffer"], result: "pointer" },
  dt_cuda_graph_warmup_begin: { parameters: ["pointer", "buffer"], result: "i32" },
  dt_cuda_graph_warmup_end: { parameters: ["pointer", "buffer"], result: "i32" },
  dt_cuda_graph_capture_begin: { parameters: ["pointer", "buffer"], result: "i32" },
  dt_cuda_graph_capture_end: { parameters: ["pointer", "buffer"], result: "i32" },
  dt_cuda_graph_replay: { parameters: ["pointer", "buffer"], result: "i32" },
  dt_cuda_graph_free: { parameters: ["pointer"], result: "void" },
} as const satisfies Deno.ForeignLibraryInterface;

const SYMBOLS = { ...CORE_SYMBOLS, ...OP_SYMBOLS };
export type Library = Deno.DynamicLibrary<typeof SYMBOLS>;

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const CURRENT = join(
  resolve(Deno.env.get("DIPSY_NATIVE_CACHE") || join(ROOT, ".cache/native")),
  "current.json",
);
const HOW_TO_BUILD = "run `deno task build:native` (or any task: they build it on first use)";

let opened: Library | undefined;

/** The path of the shim library that `lib()` opens. */
export function libraryPath(): string {
  const override = Deno.env.get("DIPSY_LIB");
  if (override) {
    if (!existsSync(override)) {
      throw new Error(`DIPSY_LIB points at ${override}, which does not exist`);
    }
    return override;
  }
  if (!existsSync(CURRENT)) {
    throw new Error(
      `the native library has not been built (${CURRENT} is missing): ${HOW_TO_BUILD}`,
    );
  }
  let path: string, sourceHash: string;
  try {
    ({ lib: path, sourceHash } = JSON.parse(readFileSync(CURRENT, "utf8")));
  } catch (e) {
    throw new Error(`${CURRENT} is unreadable (${(e as Error).message}): ${HOW_TO_BUILD}`);
  }
  // A library built from other sources may have other signatures: refuse it rather than crash.
  if (sourceHash !== nativeSourceHashSync(ROOT)) {
    throw new Error(`the native sources changed since the library was built: ${HOW_TO_BUILD}`);
  }
  if (!path || !existsSync(path)) {
    throw new Error(`the native library recorded in ${CURRENT} is gone (${path}): ${HOW_TO_BUILD}`);
  }
  return path;
}

/** Opens the shim once per process and checks that its ABI matches these bindings. */
export function lib(): Library {
  if (opened) return opened;
  const path = libraryPath();
  let l: Library;
  try {
    l = Deno.dlopen(path, SYMBOLS);
  } catch (e) {
    throw new Error(`cannot load ${path}: ${(e as Error).message}; ${HOW_TO_BUILD}`);
  }
  const abi = l.symbols.dt_abi_version();
  if (abi !== ABI_VERSION) {
    l.close();
    throw new Error(
      `${path} has ABI version ${abi}, these bindings need ${ABI_VERSION}: ${HOW_TO_BUILD}`,
    );
  }
  opened = l;
  return l;
}
