/**
 * The device side of the server: a Worker that holds the loaded model and runs one piece of work
 * at a time, as the engine (engine.ts) hands it over. Sampling blocks the thread it runs on for
 * the whole batch, so it runs here and the HTTP thread stays free to answer, queue and refuse.
 *
 * Everything it does is core's: `sampleImage` exactly as `dipsy sample` runs it, and `generate`
 * exactly as `dipsy generate` runs it.
 */
import type { DiffusionBackbone } from "../core/backbone.ts";
import type { RunConfig } from "../core/config.ts";
import type { ProgressInfo } from "../core/generate.ts";
import type { ImageFormat, RgbImage } from "../core/image.ts";
import type { SampleSpec } from "../core/sample.ts";
import type { ModelPaths, Placement } from "../app/models.ts";
import type { GenerateSummary, JobPlan } from "./jobs.ts";

export interface ModelSetup {
  /** The server's configuration: model references, device and dtype (concrete). */
  config: RunConfig;
  paths: ModelPaths;
  /** IP-Adapters to attach (2 serves every built-in guidance). */
  adapters: number;
  placement: Placement;
  /** Plugin modules to load (the HTTP thread loads them too). */
  plugins: string[];
}

export type EngineInfo = Awaited<ReturnType<typeof init>>;

export type ToWorker =
  | { type: "init"; setup: ModelSetup }
  | {
    type: "sample";
    id: number;
    spec: SampleSpec;
    positive: RgbImage | null;
    negative: RgbImage | null;
    format: ImageFormat;
  }
  | JobPlan & {
    type: "generate";
    id: number;
    /** Wait for "continue" after each "batch" message (a caller that holds runs between batches). */
    hold: boolean;
  }
  | { type: "cancel" | "continue" | "close"; id: number };

/** An error as it crosses the thread boundary. `user`: the input's fault, not the server's. */
export interface WorkerError {
  name: string;
  message: string;
  user: boolean;
  field?: string;
}

export type FromWorker =
  | { type: "ready"; info: EngineInfo }
  | { type: "init-failed"; error: WorkerError }
  | { type: "done"; id: number; value: unknown }
  | { type: "failed"; id: number; error: WorkerError }
  | { type: "progress"; id: number; progress: ProgressInfo }
  | { type: "image"; id: number; file: string }
  | { type: "log"; id: number; message: string }
  | { type: "batch"; id: number };

interface Port {
  postMessage(message: FromWorker, transfer?: Transferable[]): void;
  onmessage: ((e: MessageEvent<ToWorker>) => void) | null;
}

const port = self as unknown as Port;
let backbone: DiffusionBackbone | null = null;
let setup: ModelSetup | null = null;
const cancels = new Map<number, AbortController>();
const holds = new Map<number, () => void>();

async function describe(e: unknown): Promise<WorkerError> {
  const { isUserError } = await import("../app/errors.ts");
  const { SampleError } = await import("../core/sample.ts");
  const err = e instanceof Error ? e : new Error(String(e));
  // A SampleError is a UserError, with the field it is about.
  const user = isUserError(err);
  if (!user) console.error(err);
  return {
    name: err.name,
    message: err.message,
    user,
    ...(err instanceof SampleError ? { field: err.field } : {}),
  };
}

async function init(s: ModelSetup) {
  const { loadDefaultPlugins } = await import("../app/plugins.ts");
  const { loadPluginFile } = await import("../core/config.ts");
  const { loadBackbone } = await import("../app/models.ts");
  const { runtimeInfo } = await import("../ffi/mod.ts");
  await loadDefaultPlugins();
  for (const p of s.plugins) await loadPluginFile(p);
  setup = s;
  backbone = await loadBackbone(s.config, s.paths, s.adapters, s.placement);
  return {
    modelIds: { ...backbone.modelIds },
    device: backbone.device,
    dtype: backbone.dtype,
    adapters: backbone.adapterCount,
    defaultSize: backbone.defaultSize,
    vaeScaleFactor: backbone.vaeScaleFactor,
    libtorch: runtimeInfo().torch_version,
  };
}

async function sample(m: Extract<ToWorker, { type: "sample" }>): Promise<Uint8Array> {
  const { prepareSample, sampleImage } = await import("../core/sample.ts");
  const { encodeImage } = await import("../core/image.ts");
  const prepared = prepareSample(m.spec, {
    positive: m.positive !== null,
    negative: m.negative !== null,
  });
  const result = sampleImage(backbone!, prepared, { positive: m.positive, negative: m.negative });
  result.latents.dispose();
  return await encodeImage(result.image, m.format);
}

async function generate(
  m: Extract<ToWorker, { type: "generate" }>,
  signal: AbortSignal,
): Promise<GenerateSummary> {
  const gen = await import("../core/generate.ts");
  const { similaritySource } = await import("../app/similarity.ts");
  const log = (message: string) => port.postMessage({ type: "log", id: m.id, message });
  // Listed one by one: the answer shows these, never the plan or anything else core returns.
  const { plan, written, skipped, remaining, interrupted } = await gen.generate({
    config: m.config,
    similarity: similaritySource(m.config, setup!.placement, log),
    shard: m.shard,
    only: m.only.length ? m.only : undefined,
    signal,
    log,
    backbone: () => backbone!,
    // Lets planRun refuse a bad image size before run.json is written.
    vaeScaleFactor: backbone!.vaeScaleFactor,
    onProgress: (progress) => port.postMessage({ type: "progress", id: m.id, progress }),
    onImage: (entry) => port.postMessage({ type: "image", id: m.id, file: entry.file }),
    ...(m.hold
      ? {
        beforeBatch: () =>
          new Promise<void>((resolve) => {
            holds.set(m.id, resolve);
            port.postMessage({ type: "batch", id: m.id });
          }),
      }
      : {}),
  });
  return { out: plan.out, written, skipped, remaining, interrupted };
}

port.onmessage = async (e) => {
  const m = e.data;
  switch (m.type) {
    case "init":
      try {
        port.postMessage({ type: "ready", info: await init(m.setup) });
      } catch (err) {
        port.postMessage({ type: "init-failed", error: await describe(err) });
      }
      return;
    case "cancel":
      cancels.get(m.id)?.abort();
      return;
    case "continue":
      holds.get(m.id)?.();
      holds.delete(m.id);
      return;
    case "close":
      backbone?.[Symbol.dispose]();
      backbone = null;
      port.postMessage({ type: "done", id: m.id, value: null });
      return;
    case "sample":
      return await answer(m.id, async () => {
        const bytes = await sample(m);
        return [bytes, [bytes.buffer as ArrayBuffer]];
      });
    case "generate": {
      const controller = new AbortController();
      cancels.set(m.id, controller);
      await answer(m.id, async () => [await generate(m, controller.signal), []]);
      cancels.delete(m.id);
      return;
    }
  }
};

/** Posts what `work` gives (with the buffers it hands over) as "done", or its error as "failed". */
async function answer(id: number, work: () => Promise<[unknown, Transferable[]]>) {
  try {
    const [value, transfer] = await work();
    port.postMessage({ type: "done", id, value }, transfer);
  } catch (err) {
    port.postMessage({ type: "failed", id, error: await describe(err) });
  }
}
