/**
 * Registers every default plugin (samplers, guidance, pair samplers) in `core/plugins.ts`'s
 * registry. Import this once before choosing plugins by name.
 */
import "./samplers/mod.ts";
import "./guidance/mod.ts";
import "./pairs/mod.ts";
import "./classifiers/mod.ts";

export { registry } from "../core/plugins.ts";
