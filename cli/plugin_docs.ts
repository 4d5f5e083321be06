/**
 * What the commands say about plugins: their options as the registry documents them (for
 * `--help` and `--list`), and the plugin files a command loads with `--plugin`.
 */
import type { PluginKind, Registry } from "../core/plugins.ts";
import { DEFAULTS, type PluginKey } from "../core/config.ts";
import { helpRow, withDefault } from "./command.ts";

/** The registered plugins of `kinds`, each with its options, as `--list` prints them. */
export function pluginList(reg: Registry, kinds: readonly PluginKind[]): string {
  const blocks = kinds.map((kind) => {
    const lines = [`${kind} plugins:`];
    for (const d of reg.list(kind)) {
      lines.push(`  ${d.name.padEnd(24)} ${d.description}`);
      for (const o of reg.docs(kind, d.name)) {
        const def = o.default === undefined ? "" : ` (default ${JSON.stringify(o.default)})`;
        lines.push(`      ${o.name}: ${o.description}${def}`);
      }
    }
    return lines.join("\n");
  });
  return blocks.join("\n\n");
}

/** The process registry with the default plugins and those of `files` (`--plugin`) in it. */
export async function loadPlugins(files: readonly string[] = []): Promise<Registry> {
  const { loadDefaultPlugins } = await import("../app/plugins.ts");
  const { loadPluginFile } = await import("../core/config.ts");
  const { registry } = await import("../core/plugins.ts");
  await loadDefaultPlugins();
  for (const f of files) await loadPluginFile(f, registry);
  return registry;
}

/**
 * Help rows for the options of plugin `name`, each as `--set <prefix>.KEY=V` takes it; options
 * that share a description (a scheduler's config overrides) share a row.
 */
function pluginOptionRows(reg: Registry, kind: PluginKind, name: string, prefix: string) {
  const groups = new Map<string, string[]>();
  for (const o of reg.docs(kind, name)) {
    const value = Array.isArray(o.default) ? JSON.stringify(o.default) : o.default;
    const text = o.default === undefined || o.default === null
      ? o.description
      : withDefault(o.description, value);
    groups.set(text, [...groups.get(text) ?? [], o.name]);
  }
  return [...groups].flatMap(([text, keys]) =>
    keys.length === 1
      ? helpRow(`  ${prefix}.${keys[0]}`, text)
      : helpRow(`  ${prefix}.KEY`, `${text}; KEY: ${keys.join(", ")}`)
  );
}

/** The help section on the options of the default plugins of `kinds`, as `--set` takes them. */
export function pluginOptionsHelp(reg: Registry, kinds: readonly PluginKey[]): string {
  return [
    "options of the default plugins (--set KIND.KEY=VALUE):",
    ...kinds.flatMap((kind) => [
      `  ${kind} "${DEFAULTS[kind].name}":`,
      ...pluginOptionRows(reg, kind, DEFAULTS[kind].name, kind),
    ]),
  ].join("\n");
}
