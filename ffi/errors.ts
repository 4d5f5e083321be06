/** Errors raised by libtorch (through the shim) surface as this class. */
export class TorchError extends Error {
  constructor(readonly op: string, readonly torchMessage: string) {
    super(`${op}: ${torchMessage}`);
    this.name = "TorchError";
  }
}

/** Raised when a tensor is touched after dispose(). */
export class DisposedTensorError extends Error {
  constructor(origin: string) {
    super(`tensor (from ${origin}) used after dispose`);
    this.name = "DisposedTensorError";
  }
}
