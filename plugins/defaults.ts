/**
 * The built-in plugins, listed in one place. Nothing registers on import: the CLI, the server and
 * tests call `registerDefaults` on the registry they use.
 */
import { type PluginDef, type Registry, registry as processRegistry } from "../core/plugins.ts";
import { CLASSIFIER_PLUGINS } from "./classifiers/mod.ts";
import { GUIDANCE_PLUGINS } from "./guidance/mod.ts";
import { PAIRS_PLUGINS } from "./pairs/mod.ts";
import { SAMPLER_PLUGINS } from "./samplers/mod.ts";

const DEFAULT_PLUGINS: readonly PluginDef[] = [
  ...SAMPLER_PLUGINS,
  ...GUIDANCE_PLUGINS,
  ...PAIRS_PLUGINS,
  ...CLASSIFIER_PLUGINS,
] as unknown as PluginDef[];

/** Registers every built-in plugin in `reg` (the process-wide registry by default); idempotent. */
export function registerDefaults(reg: Registry = processRegistry): Registry {
  for (const def of DEFAULT_PLUGINS) if (!reg.has(def.kind, def.name)) reg.register(def);
  return reg;
}
