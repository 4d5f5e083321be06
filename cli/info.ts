/** `dipsy info`: what libtorch this installation runs on. */
import { defineCommand } from "./command.ts";

export const command = defineCommand({
  synopsis: "info",
  about:
    `Prints the runtime information as JSON: libtorch, the CUDA devices, and which attention kernel
SD1.5 at 512 px runs on the default device.`,
  sections: { "options:": {} },
  async run() {
    const { runtimeInfo, libraryPath } = await import("../ffi/mod.ts");
    const { allowTf32, cudaDevices } = await import("../ffi/runtime.ts");
    const { sd15AttentionReport } = await import("../plugins/sd15/unet.ts");
    const info = runtimeInfo();
    const device = info.cuda_available ? "cuda" : "cpu";
    console.log(JSON.stringify(
      {
        library: libraryPath(),
        ...info,
        cuda_devices: cudaDevices(),
        allow_tf32: allowTf32(),
        attention: sd15AttentionReport(device, device === "cpu" ? "f32" : "f16"),
      },
      null,
      2,
    ));
    return 0;
  },
});
