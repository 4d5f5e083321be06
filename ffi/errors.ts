/** Errors raised by libtorch (through the shim) surface as this class. */
export class TorchError extends Error {
  /** `op`: the shim call that failed; `torchMessage`: libtorch's message, without backtrace. */
  constructor(readonly op: string, readonly torchMessage: string) {
    super(`${op}: ${torchMessage}`);
    this.name = "TorchError";
  }
}

/** Raised when a tensor is touched after dispose(). */
export class DisposedTensorError extends Error {
  /** `origin`: the op that made the tensor. */
  constructor(origin: string) {
    super(`tensor (from ${origin}) used after dispose`);
    this.name = "DisposedTensorError";
  }
}

/**
 * The base of every error the user can fix (a file, a flag, a field, a folder, a missing model).
 * Front ends print its message as one line and no stack; any other error is a bug. It lives in
 * the lowest layer because the safetensors reader raises user errors too.
 */
export class UserError extends Error {
  /** A one-line message naming what to fix. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = new.target.name;
  }
}
