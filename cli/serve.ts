/**
 * `dipsy serve`: the HTTP service (server/app.ts) with the models loaded once, for notebooks and
 * other tools. SIGINT/SIGTERM stop it gracefully: no new connections, queued work refused, the
 * running sample finished, a running job stopped after its batch in flight (resumable).
 */
import { checkSampleOptions } from "../app/api.ts";
import type { ServerOptions } from "../server/app.ts";
import { CliError, defineCommand, type FlagValues, intFlag } from "./command.ts";
import { MODEL_FLAGS, PLACEMENT_FLAGS, SETTING_FLAGS } from "./generate.ts";
import { flagError } from "./sample.ts";

export const DEFAULT_PORT = 8765;

const NETWORK_FLAGS = {
  host: {
    value: "ADDR",
    help: "address to bind; any other than loopback needs a token",
    default: "127.0.0.1",
  },
  port: { value: "N", help: "port (0 picks a free one)", default: DEFAULT_PORT },
  "token-file": {
    value: "FILE",
    help: "bearer token every request must carry (first line of FILE); the DIPSY_TOKEN " +
      "environment variable is used when no file is given",
  },
  roots: {
    value: "DIR,...",
    multiple: true,
    help: "folders that /v1/jobs may read and write in (repeatable); without it, jobs are " +
      "refused",
  },
  queue: {
    value: "N",
    help: "requests that may wait behind the running one; more get 503 with Retry-After",
    default: 16,
  },
  "max-body-mb": { value: "N", help: "largest POST /v1/sample body", default: 32 },
  "max-image-mb": { value: "N", help: "largest uploaded image", default: 16 },
} as const;

const SERVE_MODEL_FLAGS = { ...MODEL_FLAGS, ...PLACEMENT_FLAGS, plugin: SETTING_FLAGS.plugin };

type ServeFlags = FlagValues<typeof NETWORK_FLAGS & typeof SERVE_MODEL_FLAGS>;

/** An integer network flag of at least `min`, its declared default when absent. */
function integerFlag(
  flags: ServeFlags,
  name: "port" | "queue" | "max-body-mb" | "max-image-mb",
  min: number,
) {
  return intFlag(flags[name], `--${name}`, min) ?? NETWORK_FLAGS[name].default;
}

type ServeSettings = ReturnType<typeof serveSettings>;
/** Test-only server options, passed through; `dipsy serve` never sets them. */
type Testing = Pick<ServerOptions, "beforeBatch">;

/** Parses and checks the flags (no native library, no files read); null for --help. */
export function parseServeArgs(args: string[]): ServeSettings | null {
  const flags = command.parse(args);
  return flags.help ? null : serveSettings(flags);
}

function serveSettings(flags: ServeFlags) {
  const port = integerFlag(flags, "port", 0);
  if (port > 65535) throw new CliError(`--port must be at most 65535, got ${port}`);
  /** Configuration values for the models and plugin files, as `dipsy generate` reads them. */
  const models: Record<string, unknown> = {};
  for (const [name, flag] of Object.entries(SERVE_MODEL_FLAGS)) {
    const value = flags[name as keyof ServeFlags];
    if ("field" in flag && value !== undefined) models[flag.field] = value;
  }
  if (flags.tiny) models.model = "tiny";
  try {
    checkSampleOptions(models);
  } catch (e) {
    throw flagError(e);
  }
  return {
    hostname: flags.host ?? NETWORK_FLAGS.host.default,
    port,
    tokenFile: flags["token-file"] ?? null,
    roots: (flags.roots ?? []).flatMap((r) => r.split(",")).map((r) => r.trim()).filter((r) => r),
    queue: integerFlag(flags, "queue", 0),
    maxBodyBytes: integerFlag(flags, "max-body-mb", 1) << 20,
    maxImageBytes: integerFlag(flags, "max-image-mb", 1) << 20,
    models,
  };
}

/** Loads what the server needs and starts it (the caller owns shutdown). */
export async function startFromSettings(
  a: ServeSettings,
  log: (message: string) => void = (m) => console.error(m),
  testing: Testing = {},
) {
  const { AuthConfigError, checkExposure, loadToken } = await import("../server/auth.ts");
  const cfg = await import("../core/config.ts");
  const models = await import("../app/models.ts");
  const { loadDefaultPlugins } = await import("../app/plugins.ts");
  const { registry } = await import("../core/plugins.ts");
  const { startServer } = await import("../server/app.ts");

  const { tokenFile, models: values, maxBodyBytes, maxImageBytes, ...network } = a;
  let token: string | null;
  try {
    token = await loadToken({ file: tokenFile });
    checkExposure(a.hostname, token);
  } catch (e) {
    if (e instanceof AuthConfigError) throw new CliError(e.message);
    throw e;
  }
  const layer = cfg.parseConfigObject(values, "command line", { textual: true });
  await loadDefaultPlugins();
  await cfg.loadPluginFiles([layer]);
  const config = cfg.resolveConfig([layer]);
  const placement = await models.resolvePlacement(config);
  const { device, dtype } = placement;
  // Jobs run with the server's concrete device and dtype, as `dipsy generate` resolves them.
  const base = { ...layer, source: "server", values: { ...layer.values, device, dtype } };
  const adapters = 2;
  log(`loading ${config.model === cfg.TINY ? "the tiny models" : config.model}...`);
  const paths = await models.resolveModels(config, adapters);
  return await startServer({
    ...network,
    token,
    limits: { maxBodyBytes, maxImageBytes },
    setup: {
      config: { ...config, device, dtype },
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

/** The whole command: starts, serves until SIGINT/SIGTERM, stops gracefully. */
export async function serve(a: ServeSettings, testing: Testing = {}): Promise<number> {
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

export const command = defineCommand({
  synopsis: "serve [options]",
  about:
    `Serves sampling and dataset generation over HTTP (see the README's "HTTP endpoint" section and
GET /openapi.json). One engine runs one request at a time, in arrival order.
Pages for a browser: / lists the runs under --roots with their reports, /jobs/ID follows a job
live; with a token, open a page once as URL?token=TOKEN (a cookie keeps it).`,
  sections: {
    "network:": NETWORK_FLAGS,
    "models (as \`dipsy sample\` and \`dipsy generate\`):": SERVE_MODEL_FLAGS,
  },
  run: (values) => serve(serveSettings(values)),
});
