/** The shape every CLI command module exports, and the error for bad invocations. */
import { parseArgs, type ParseArgsOptionsConfig } from "node:util";
import { UserError } from "../ffi/errors.ts";
import { closest } from "../core/suggest.ts";

export interface Command {
  /** One line for the command list. */
  summary: string;
  /** What `--help` prints. */
  usage: string;
  /** The flags `run` accepts (checked against `usage` by the tests). */
  flags: ParseArgsOptionsConfig;
  /** Runs with the arguments after the command name; returns the exit code. */
  run(args: string[]): Promise<number>;
}

/** A usage mistake (a flag, a missing argument): printed without a stack trace, exit code 2. */
export class CliError extends UserError {}

/** A negative number, which node's parser would otherwise take for an option. */
const NEGATIVE_NUMBER = /^-(\d|\.\d)/;

/**
 * `--flag -1` as `--flag=-1` for flags that take a value: no option starts with a digit, so a
 * negative number is a value, and its own rule (not the parser) says whether it is allowed.
 */
function attachNegativeValues(args: string[], options: ParseArgsOptionsConfig): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === "--") return [...out, ...args.slice(i)];
    const name = a.startsWith("--") && !a.includes("=") ? a.slice(2) : null;
    if (name && options[name]?.type === "string" && NEGATIVE_NUMBER.test(args[i + 1] ?? "")) {
      out.push(`${a}=${args[++i]}`);
    } else {
      out.push(a);
    }
  }
  return out;
}

/** One line for a parser error, naming the flag. */
function flagProblem(e: unknown, options: ParseArgsOptionsConfig): string {
  const text = e instanceof Error ? e.message : String(e);
  const code = (e as { code?: string }).code;
  const quoted = /'([^']+)'/.exec(text)?.[1] ?? "";
  const flag = quoted.split(" ")[0];
  switch (code) {
    case "ERR_PARSE_ARGS_UNKNOWN_OPTION": {
      const known = Object.keys(options).map((k) => `--${k}`);
      const guess = flag.startsWith("--") ? closest(flag, known) : undefined;
      return `unknown option ${flag}${guess ? ` (did you mean ${guess}?)` : ""}; see --help`;
    }
    case "ERR_PARSE_ARGS_INVALID_OPTION_VALUE":
      if (/does not take an argument/.test(text)) return `${flag} takes no value`;
      return `${flag} needs a value` +
        (/ambiguous/.test(text) ? ` (write ${flag}=VALUE for a value that starts with "-")` : "");
    case "ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL":
      return `unexpected argument "${quoted}": values follow their flag (see --help)`;
    default:
      return text.split("\n")[0];
  }
}

/** `parseArgs` (strict, no positionals) whose mistakes become a one-line CliError. */
export function parseFlags<const O extends ParseArgsOptionsConfig>(
  args: string[],
  options: O,
): ReturnType<typeof parseArgs<{ args: string[]; options: O }>>["values"] {
  try {
    return parseArgs({
      args: attachNegativeValues(args, options),
      options,
      strict: true,
      allowPositionals: false,
    }).values;
  } catch (e) {
    throw new CliError(flagProblem(e, options));
  }
}

/**
 * Parsed flags back into arguments, each as `--name=value` so that no value can be read as a
 * flag; `omit` names flags to leave out.
 */
export function flagArgs(
  values: Record<string, string | boolean | (string | boolean)[] | undefined>,
  omit: readonly string[] = [],
): string[] {
  const args: string[] = [];
  for (const [name, v] of Object.entries(values)) {
    if (v === undefined || v === false || omit.includes(name)) continue;
    for (const x of Array.isArray(v) ? v : [v]) {
      args.push(x === true ? `--${name}` : `--${name}=${x}`);
    }
  }
  return args;
}
