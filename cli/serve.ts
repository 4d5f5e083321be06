/**
 * `dipsy serve`: the HTTP service (server/app.ts) with the models loaded once, for notebooks and
 * other tools. SIGINT/SIGTERM stop it gracefully: no new connections, queued work refused, the
 * running sample finished, a running job stopped after its batch in flight (resumable).
 */
import { parseArgs } from "node:util";
import type { ServerOptions } from "../server/app.ts";
import { DEFAULT_CLIP, DEFAULT_MODEL } from "../core/config.ts";
import { CliError, type Command } from "./command.ts";

export const DEFAULT_PORT = 8765;

const USAGE = `usage: deno task dipsy serve [options]

Serves sampling and dataset generation over HTTP (see the README's "HTTP endpoint" section and
GET /openapi.json). One engine runs one request at a time, in arrival order.

network:
  --host ADDR           address to bind (default 127.0.0.1); any other than loopback needs a token
  --port N              port (default ${DEFAULT_PORT}; 0 picks a free one)
  --token-file FILE     bearer token every request must carry (first line of FILE); the
                        DIPSY_TOKEN environment variable is used when no file is given
  --roots DIR,...       folders that /v1/jobs may read and write in (repeatable); without it,
                        jobs are refused
  --queue N             requests that may wait behind the running one (default 16); more get
                        503 with Retry-After
  --max-body-mb N       largest POST /v1/sample body (default 32)
  --max-image-mb N      largest uploaded image (default 16)

models (as \`dipsy sample\` and \`dipsy generate\`):
  --model REF           "tiny" (embedded random model), a diffusers SD1.5 folder, or a Hub id
                        (default ${DEFAULT_MODEL})
  --ip-adapter REF      h94-layout .safetensors file, or org/name/path in a Hub repo
  --image-encoder REF   the adapter's CLIP image encoder folder
  --clip REF            CLIP for class similarity in jobs (default: tiny with --model tiny,
                        else ${DEFAULT_CLIP})
  --dtype T             auto (f16 on CUDA, f32 on the CPU), f32, f16, bf16
  --device D            auto, cpu, cuda, cuda:N (default auto)
  --plugin FILE         load plugins from a module (repeatable); see docs/plugins.md
  -h, --help            this text`;

const OPTIONS = {
  help: { type: "boolean", short: "h" },
  host: { type: "string" },
  port: { type: "string" },
  "token-file": { type: "string" },
  roots: { type: "string", multiple: true },
  queue: { type: "string" },
  "max-body-mb": { type: "string" },
  "max-image-mb": { type: "string" },
  model: { type: "string" },
  "ip-adapter": { type: "string" },
  "image-encoder": { type: "string" },
  clip: { type: "string" },
  dtype: { type: "string" },
  device: { type: "string" },
  plugin: { type: "string", multiple: true },
} as const;

type Flags = ReturnType<typeof parseArgs<{ options: typeof OPTIONS }>>["values"];

function integerFlag(flags: Flags, name: keyof Flags, min: number, fallback: number): number {
  const v = flags[name];
  if (v === undefined) return fallback;
  if (typeof v !== "string" || !/^\d+$/.test(v) || Number(v) < min) {
    throw new CliError(`--${name} must be an integer of at least ${min}, got "${v}"`);
  }
  return Number(v);
}

export interface ServeSettings {
  hostname: string;
  port: number;
  tokenFile: string | null;
  roots: string[];
  queue: number;
  maxBodyBytes: number;
  maxImageBytes: number;
  /** Configuration values for the models, as `dipsy generate` reads them. */
  models: Record<string, unknown>;
  plugins: string[];
}

/** Parses and checks the flags (no native library, no files read); null for --help. */
export function parseServeArgs(args: string[]): ServeSettings | null {
  let flags: Flags;
  try {
    flags = parseArgs({ args, options: OPTIONS, strict: true, allowPositionals: false }).values;
  } catch (e) {
    throw new CliError(e instanceof Error ? e.message : String(e));
  }
  if (flags.help) return null;
  const port = integerFlag(flags, "port", 0, DEFAULT_PORT);
  if (port > 65535) throw new CliError(`--port must be at most 65535, got ${port}`);
  if (flags.model === "tiny" && (flags["ip-adapter"] || flags["image-encoder"])) {
    throw new CliError(
      "--model tiny embeds its own IP-Adapter and image encoder: drop --ip-adapter/--image-encoder",
    );
  }
  const models: Record<string, unknown> = {
    model: flags.model,
    ipAdapter: flags["ip-adapter"],
    imageEncoder: flags["image-encoder"],
    clip: flags.clip,
    dtype: flags.dtype,
    device: flags.device,
  };
  return {
    hostname: flags.host ?? "127.0.0.1",
    port,
    tokenFile: flags["token-file"] ?? null,
    roots: (flags.roots ?? []).flatMap((r) => r.split(",")).map((r) => r.trim()).filter((r) => r),
    queue: integerFlag(flags, "queue", 0, 16),
    maxBodyBytes: integerFlag(flags, "max-body-mb", 1, 32) << 20,
    maxImageBytes: integerFlag(flags, "max-image-mb", 1, 16) << 20,
    models: Object.fromEntries(Object.entries(models).filter(([, v]) => v !== undefined)),
    plugins: flags.plugin ?? [],
  };
}

/**
 * Loads what the server needs and starts it (the caller owns shutdown). `testing` passes
 * test-only server options through.
 */
export async function startFromSettings(
  a: ServeSettings,
  log: (message: string) => void = (m) => console.error(m),
  testing: Pick<ServerOptions, "beforeBatch"> = {},
) {
  const { AuthConfigError, checkExposure, loadToken } = await import("../server/auth.ts");
  const cfg = await import("../core/config.ts");
  const models = await import("../app/models.ts");
  const { loadDefaultPlugins } = await import("../app/plugins.ts");
  const { registry } = await import("../core/plugins.ts");
  const { startServer } = await import("../server/app.ts");

  let token: string | null;
  try {
    token = await loadToken({ file: a.tokenFile });
    checkExposure(a.hostname, token);
  } catch (e) {
    if (e instanceof AuthConfigError) throw new CliError(e.message);
    throw e;
  }
  const layer = cfg.parseConfigObject(
    { ...a.models, plugins: a.plugins.length ? a.plugins : undefined },
    "command line",
    { textual: true },
  );
  await loadDefaultPlugins();
  await cfg.loadPluginFiles([layer]);
  const config = cfg.resolveConfig([layer]);
  const placement = await models.resolvePlacement(config);
  // Jobs run with the server's concrete device and dtype, as `dipsy generate` resolves them.
  const base = {
    ...layer,
    source: "server",
    values: { ...layer.values, device: placement.device, dtype: placement.dtype },
  };
  const adapters = 2;
  log(`loading ${config.model === cfg.TINY ? "the tiny models" : config.model}...`);
  const paths = await models.resolveModels(config, adapters);
  return await startServer({
    hostname: a.hostname,
    port: a.port,
    token,
    roots: a.roots,
    queue: a.queue,
    limits: { maxBodyBytes: a.maxBodyBytes, maxImageBytes: a.maxImageBytes },
    setup: {
      config: { ...config, device: placement.device, dtype: placement.dtype },
      paths,
      adapters,
      placement,
      plugins: config.plugins,
    },
    base,
    schedulerConfig: await models.schedulerConfigOf(paths),
    registry,
    log,
    ...testing,
  });
}

/**
 * The whole command: starts, serves until SIGINT/SIGTERM, stops gracefully. `testing` passes
 * test-only server options through.
 */
export async function runServe(
  args: string[],
  testing: Pick<ServerOptions, "beforeBatch"> = {},
): Promise<number> {
  const a = parseServeArgs(args);
  if (!a) {
    console.log(USAGE);
    return 0;
  }
  let server;
  try {
    server = await startFromSettings(a, undefined, testing);
  } catch (e) {
    const { WorkError } = await import("../server/engine.ts");
    // A model the engine could not load for the user's reasons (a bad file) is one line too.
    if (e instanceof WorkError && e.user) {
      console.error(`dipsy serve: ${e.message}`);
      return 1;
    }
    throw e;
  }
  const info = server.engine.info;
  console.log(
    `listening on ${server.url} (${Object.values(info.modelIds)[0]}, ${info.device} ` +
      `${info.dtype}; queue ${a.queue}${a.roots.length ? `; roots ${a.roots.join(", ")}` : ""})`,
  );
  let signals = 0;
  const stop = (name: string) => () => {
    signals++;
    if (signals > 1) Deno.exit(130);
    console.error(`${name}: shutting down (again to quit at once; a running batch is then lost)`);
    server.shutdown();
  };
  const handlers = [["SIGINT", stop("SIGINT")], ["SIGTERM", stop("SIGTERM")]] as const;
  for (const [sig, h] of handlers) Deno.addSignalListener(sig, h);
  try {
    await server.finished;
    await server.shutdown();
  } finally {
    for (const [sig, h] of handlers) Deno.removeSignalListener(sig, h);
  }
  console.error("stopped");
  return 0;
}

export const command: Command = {
  summary: "serve sampling and dataset generation over HTTP",
  usage: USAGE,
  flags: OPTIONS,
  run: (args) => runServe(args),
};
