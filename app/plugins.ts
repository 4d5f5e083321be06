/** Registers the built-in plugins (core only reaches plugins through the registry). */
export async function loadDefaultPlugins(): Promise<void> {
  await import("../plugins/mod.ts");
}
