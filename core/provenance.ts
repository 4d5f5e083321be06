/**
 * What produced a record: the dipsy version and commit, the libtorch version, the device and
 * dtype that ran, and a digest of each plugin file. Kept apart from the settings a resume
 * compares, so that a newer checkout still continues an older run.
 */
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { fileURLToPath } from "node:url";
import project from "../deno.json" with { type: "json" };

/** Who made a record: dipsy's version and commit, libtorch, and the device and dtype that ran. */
export interface Provenance {
  /** The package name and version (deno.json) and the git commit of the checkout. */
  dipsy: { name: string; version: string; commit: string };
  /** libtorch's version. */
  libtorch: string;
  /** The device that ran ("cpu", "cuda:0", ...), never "auto". */
  device: string;
  /** The dtype that ran, never "auto". */
  dtype: string;
  /** Each file loaded with --plugin (absolute path) and the SHA-256 of its bytes. */
  plugins: { file: string; sha256: string }[];
}

const CHECKOUT = fileURLToPath(new URL("..", import.meta.url));
let commit: string | undefined;

/** The checkout's commit, read once; "unknown" outside a git repository or without git. */
export function dipsyCommit(): string {
  if (commit === undefined) {
    try {
      commit = execFileSync("git", ["rev-parse", "HEAD"], {
        cwd: CHECKOUT,
        encoding: "utf8",
        stdio: ["ignore", "pipe", "ignore"],
      }).trim() || "unknown";
    } catch {
      commit = "unknown";
    }
  }
  return commit;
}

/** The provenance of a record made on `device` in `dtype` (both as resolved, never "auto"). */
export async function provenance(
  run: { device: string; dtype: string; plugins?: readonly string[] },
): Promise<Provenance> {
  const { runtimeInfo } = await import("../ffi/mod.ts");
  const plugins = (run.plugins ?? []).map((p) => resolve(p)).map((file) => ({
    file,
    sha256: createHash("sha256").update(readFileSync(file)).digest("hex"),
  }));
  return {
    dipsy: { name: project.name, version: project.version, commit: dipsyCommit() },
    libtorch: runtimeInfo().torch_version,
    device: run.device,
    dtype: run.dtype,
    plugins,
  };
}
