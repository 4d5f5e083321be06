/** The shape every CLI command module exports, and the error for bad invocations. */
import { parseArgs, type ParseArgsOptionsConfig } from "node:util";

export interface Command {
  /** One line for the command list. */
  summary: string;
  /** Runs with the arguments after the command name; returns the exit code. */
  run(args: string[]): Promise<number>;
}

/** A usage mistake: printed without a stack trace, exit code 2. */
export class CliError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "CliError";
  }
}

/** `parseArgs` whose mistakes become a CliError with the usage text. */
export function parseFlags<const O extends ParseArgsOptionsConfig>(
  args: string[],
  options: O,
  usage: string,
): ReturnType<typeof parseArgs<{ args: string[]; options: O }>>["values"] {
  try {
    return parseArgs({ args, options }).values;
  } catch (e) {
    throw new CliError(`${e instanceof Error ? e.message : e}\n\n${usage}`);
  }
}

/**
 * Runs a command body; errors that are the user's to fix (bad input, settings, missing models)
 * are printed as one line and give exit code 1, anything else propagates with its stack.
 */
export async function reportUserErrors(
  name: string,
  body: () => Promise<number>,
): Promise<number> {
  try {
    return await body();
  } catch (e) {
    const { isUserError } = await import("../app/errors.ts");
    if (!(e instanceof CliError) && await isUserError(e)) {
      console.error(`dipsy ${name}: ${(e as Error).message}`);
      return 1;
    }
    throw e;
  }
}
