import { UserError } from "../ffi/errors.ts";

/**
 * Whether an error is the user's to fix (bad input, settings, folders, model files): front ends
 * print its message as one line, without a stack.
 */
export function isUserError(e: unknown): e is UserError {
  return e instanceof UserError;
}
