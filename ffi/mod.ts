/** The tensor layer: libtorch through the native shim. */
export * as ops from "./ops.gen.ts";
export {
  disposeAll,
  fromHost,
  keep,
  memory,
  type MemoryInfo,
  scalar,
  scope,
  scopeAsync,
  Tensor,
} from "./tensor.ts";
export {
  type Device,
  type DType,
  ELEMENT_SIZE,
  type HostArray,
  isDevice,
  isDType,
} from "./dtype.ts";
export { DisposedTensorError, TorchError, UserError } from "./errors.ts";
export { Generator } from "./generator.ts";
export {
  cudaEmptyCache,
  CudaGraph,
  cudaMemoryStats,
  cudaSynchronize,
  enableGrad,
  isGradEnabled,
  manualSeed,
  noGrad,
  type RuntimeInfo,
  runtimeInfo,
  setGradEnabled,
  setNumThreads,
} from "./runtime.ts";
export {
  refusePickle,
  SafetensorsError,
  SafetensorsFile,
  saveSafetensors,
  type TensorInfo,
} from "./safetensors.ts";
export { libraryPath } from "./lib.ts";
