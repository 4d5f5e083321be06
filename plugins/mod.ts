/** The built-in plugins and the call that registers them (see defaults.ts). */
export { DEFAULT_PLUGINS, registerDefaults } from "./defaults.ts";
export { registry } from "../core/plugins.ts";
