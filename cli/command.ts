/** The shape every CLI command module exports, and the error for bad invocations. */
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
