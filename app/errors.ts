import { RunError } from "../core/output.ts";

/** Errors that are the user's to fix (bad input, settings, folders, missing models). */
export async function isUserError(e: unknown): Promise<boolean> {
  const { ConfigError } = await import("../core/config.ts");
  const { DatasetError } = await import("../core/dataset.ts");
  const { ModelNotFoundError } = await import("../core/hub.ts");
  const { ImageDecodeError } = await import("../core/image.ts");
  const { PluginError } = await import("../core/plugins.ts");
  return [ConfigError, DatasetError, RunError, ModelNotFoundError, ImageDecodeError, PluginError]
    .some((c) => e instanceof c);
}
