/** `dipsy info`: what libtorch this installation runs on. */
import { parseArgs } from "node:util";
import type { Command } from "./command.ts";

export const command: Command = {
  summary: "libtorch / device information",
  async run(args) {
    const { values } = parseArgs({ args, options: { help: { type: "boolean", short: "h" } } });
    if (values.help) {
      console.log("usage: deno task dipsy info\n\nPrints the runtime information as JSON.");
      return 0;
    }
    const { runtimeInfo, libraryPath } = await import("../ffi/mod.ts");
    console.log(JSON.stringify({ library: libraryPath(), ...runtimeInfo() }, null, 2));
    return 0;
  },
};
