/** Registers the built-in plugins (core only reaches plugins through the registry). */
export async function loadDefaultPlugins(): Promise<void> {
  const { registerDefaults } = await import("../plugins/defaults.ts");
  registerDefaults();
}
