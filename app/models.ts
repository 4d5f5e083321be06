/**
 * Finding and loading the models a configuration names: local folders and files, Hugging Face
 * Hub ids (resolved through the cache, downloading single files where allowed), or "tiny".
 * A file or folder inside a Hub repository is `org/name/path` (as `dipsy sample` writes it, e.g.
 * `h94/IP-Adapter/models/ip-adapter-plus_sd15.safetensors`), or `org/name@revision:path` when a
 * revision is given (revisions such as `refs/pr/10` contain slashes themselves).
 */
import { existsSync, statSync } from "node:fs";
import { join } from "node:path";
import type { Device, DType } from "../ffi/mod.ts";
import type { DiffusionBackbone } from "../core/backbone.ts";
import { type DTypeChoice, type RunConfig, TINY } from "../core/config.ts";
import { RunError } from "../core/output.ts";
import { resolveModelFile } from "../core/hub.ts";
import type { SchedulerConfig } from "../core/plugins.ts";
import type { Sd15Paths } from "../plugins/sd15/backbone.ts";

/** The files SD1.5 loading reads, per diffusers subfolder. */
export const SD15_FILES = [
  "unet/config.json",
  "unet/diffusion_pytorch_model.safetensors",
  "vae/config.json",
  "vae/diffusion_pytorch_model.safetensors",
  "text_encoder/config.json",
  "text_encoder/model.safetensors",
  "tokenizer/vocab.json",
  "tokenizer/merges.txt",
  "scheduler/scheduler_config.json",
];
export const HF_MODEL_FILES = ["config.json", "model.safetensors"];

function isDir(p: string): boolean {
  return existsSync(p) && statSync(p).isDirectory();
}

export function isFile(p: string): boolean {
  return existsSync(p) && statSync(p).isFile();
}

/**
 * Splits a reference into a Hub repo and a path inside it: `repo:path` (Hub ids and revisions
 * never contain ":"), or `org/name/path` without a revision. Null: the whole repo.
 */
export function splitRef(ref: string): { repo: string; path: string } | null {
  if (/^[./~\\]/.test(ref) || /^[A-Za-z]:[\\/]/.test(ref)) return null;
  const colon = ref.indexOf(":");
  if (colon > 0) {
    return { repo: ref.slice(0, colon), path: ref.slice(colon + 1).replace(/^\/+/, "") };
  }
  if (ref.includes("@")) return null;
  const parts = ref.split("/");
  if (parts.length < 3 || parts.some((p) => p === "")) return null;
  return { repo: parts.slice(0, 2).join("/"), path: parts.slice(2).join("/") };
}

/**
 * A model folder that holds `files`: a local folder as it is, or the Hub cache snapshot (files
 * downloaded one by one when missing and the network is allowed).
 */
export async function resolveFolderRef(ref: string, files: readonly string[]): Promise<string> {
  if (isDir(ref)) return ref;
  const split = splitRef(ref);
  const repo = split?.repo ?? ref, sub = split?.path ?? "";
  let folder = "";
  for (const f of files) {
    const path = await resolveModelFile(repo, f, sub ? { subfolder: sub } : {});
    folder ||= path.slice(0, path.length - (sub ? `${sub}/${f}` : f).length).replace(/\/$/, "");
  }
  return sub ? join(folder, sub) : folder;
}

/** A file: a local path as it is, or `<model ref>:<path in it>`. */
export async function resolveFileRef(ref: string): Promise<string> {
  if (isFile(ref)) return ref;
  const split = splitRef(ref);
  if (!split) {
    throw new RunError(
      `"${ref}" is neither a file nor a file in a Hub repo (org/name/path, e.g. ` +
        `"h94/IP-Adapter/models/ip-adapter-plus_sd15.safetensors", or org/name@revision:path)`,
    );
  }
  return await resolveModelFile(split.repo, split.path);
}

export interface Placement {
  device: Device;
  dtype: Exclude<DTypeChoice, "auto"> & DType;
}

/** "auto" device: CUDA when libtorch sees a GPU; "auto" dtype: f16 on CUDA (as DIPSY), else f32. */
export async function resolvePlacement(
  config: Pick<RunConfig, "device" | "dtype">,
): Promise<Placement> {
  let device = config.device as Device | "auto";
  if (device !== "cpu") {
    const { runtimeInfo } = await import("../ffi/mod.ts");
    const cuda = runtimeInfo().cuda_available;
    if (device === "auto") device = cuda ? "cuda" : "cpu";
    else if (!cuda) {
      throw new RunError(`device ${device}: this libtorch build has no usable CUDA device`);
    }
  }
  const dtype: Placement["dtype"] = config.dtype === "auto"
    ? (device === "cpu" ? "f32" : "f16")
    : config.dtype;
  return { device, dtype };
}

/** The model files a run loads: "tiny" as the model, or SD1.5 and its adapters' files. */
export type ModelPaths = Sd15Paths;

/** Resolves the model files a run needs (adapters: how many IP-Adapters the guidance uses). */
export async function resolveModels(config: RunConfig, adapters: number): Promise<ModelPaths> {
  if (config.model === TINY) return { model: TINY };
  const model = await resolveFolderRef(config.model, SD15_FILES);
  if (adapters === 0) return { model };
  const paths: ModelPaths = {
    model,
    ipAdapter: await resolveFileRef(config.ipAdapter),
    imageEncoder: await resolveFolderRef(config.imageEncoder, HF_MODEL_FILES),
  };
  const negative = adapters > 1 ? config.negativeIpAdapter ?? null : null;
  if (negative !== null && negative !== config.ipAdapter) {
    paths.negativeIpAdapter = await resolveFileRef(negative);
  }
  await checkAdapterFiles(paths);
  return paths;
}

/**
 * The adapters against each other and their image encoder, from the file headers and the
 * encoder's config.json: a mismatch is refused before anything is written or loaded.
 */
export async function checkAdapterFiles(paths: ModelPaths): Promise<void> {
  if (!paths.ipAdapter || !paths.imageEncoder) return;
  const ip = await import("../plugins/sd15/ip_adapter.ts");
  const { parseClipCheckpointConfig } = await import("../plugins/clip/config.ts");
  const adapter = (path: string) => ({ path, config: ip.readIpAdapterConfig(path) });
  const files = [adapter(paths.ipAdapter)];
  if (paths.negativeIpAdapter && paths.negativeIpAdapter !== paths.ipAdapter) {
    files.push(adapter(paths.negativeIpAdapter));
    ip.checkAdapterPair(files[0], files[1]);
  }
  const configPath = join(paths.imageEncoder, "config.json");
  let json: Record<string, unknown>;
  try {
    json = JSON.parse(await Deno.readTextFile(configPath));
  } catch (e) {
    throw new RunError(`${configPath}: unreadable (${e instanceof Error ? e.message : e})`);
  }
  const checkpoint = parseClipCheckpointConfig(json, configPath);
  if (checkpoint.kind !== "vision") return;
  const features = {
    path: paths.imageEncoder,
    hiddenSize: checkpoint.config.hiddenSize,
    projectionDim: checkpoint.projection === false ? null : checkpoint.config.projectionDim,
  };
  for (const f of files) ip.checkEncoderFit(f, features);
}

export interface ModelGeometry {
  /** The native output size: UNet sample size times the VAE's scale factor. */
  defaultSize: number;
  /** Image sides must be multiples of it. */
  vaeScaleFactor: number;
}

/**
 * The output geometry from the model's config files, read (and checked) without loading any
 * weights, so that a bad size or a broken config is refused before anything is written.
 */
export async function modelGeometry(paths: ModelPaths): Promise<ModelGeometry> {
  const { loadUNetConfig, parseUNetConfig, TINY_UNET_CONFIG_JSON } = await import(
    "../plugins/sd15/unet_config.ts"
  );
  const { readVaeConfig, TINY_VAE_CONFIG } = await import("../plugins/sd15/vae_config.ts");
  const tiny = paths.model === TINY;
  const unet = tiny
    ? parseUNetConfig({ ...TINY_UNET_CONFIG_JSON }, "tiny")
    : loadUNetConfig(join(paths.model, "unet"));
  const vae = tiny ? TINY_VAE_CONFIG : readVaeConfig(join(paths.model, "vae", "config.json"));
  const vaeScaleFactor = 2 ** (vae.blockOutChannels.length - 1);
  const ss = unet.sampleSize ?? 64;
  return { defaultSize: (typeof ss === "number" ? ss : ss[0]) * vaeScaleFactor, vaeScaleFactor };
}

/** Loads SD1.5 with as many IP-Adapters as the guidance needs. */
export async function loadBackbone(
  config: RunConfig,
  paths: ModelPaths,
  adapters: number,
  placement: Placement,
): Promise<DiffusionBackbone> {
  const { Sd15Backbone } = await import("../plugins/sd15/backbone.ts");
  if (paths.model === TINY) {
    return Sd15Backbone.tiny({ seed: config.modelSeed, adapters, ...placement });
  }
  return await Sd15Backbone.load(paths, { adapters, ...placement });
}

/** The scheduler config the backbone will carry, for checking sampler options before loading. */
export async function schedulerConfigOf(paths: ModelPaths): Promise<SchedulerConfig> {
  const { modelSchedulerConfig } = await import("../plugins/sd15/backbone.ts");
  const { SD15_SCHEDULER_CONFIG } = await import("../plugins/samplers/mod.ts");
  return paths.model === TINY ? SD15_SCHEDULER_CONFIG : modelSchedulerConfig(paths.model);
}
