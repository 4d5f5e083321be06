/**
 * The shape every CLI command module exports, the error for bad invocations, and
 * `defineCommand`: a command declares each flag once (value name, one-line help, default) and
 * its parser options, `--help` text and deprecation warnings are drawn from that declaration.
 */
import { parseArgs, type ParseArgsOptionsConfig } from "node:util";
import { UserError } from "../ffi/errors.ts";
import { closest } from "../core/suggest.ts";
import type { FieldDoc } from "../core/schema.ts";

export interface Command {
  /** What `--help` prints. */
  usage: string;
  /** The flags `run` accepts (checked against `usage` by the tests). */
  flags: ParseArgsOptionsConfig;
  /** Runs with the arguments after the command name; returns the exit code. */
  run(args: string[]): Promise<number>;
}

/** A usage mistake (a flag, a missing argument): printed without a stack trace, exit code 2. */
export class CliError extends UserError {}

/** `--device`: auto (the default), cpu, cuda or cuda:N. */
export function deviceFlag(value: string | undefined): string {
  const device = value ?? "auto";
  if (!/^(auto|cpu|cuda(:\d+)?)$/.test(device)) {
    throw new CliError(`--device must be auto, cpu, cuda or cuda:N, got "${device}"`);
  }
  return device;
}

/** An integer flag of at least `min`, or undefined. */
export function intFlag(value: string | undefined, flag: string, min = 0): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(n) || n < min) {
    throw new CliError(`${flag} must be an integer of at least ${min}, got "${value}"`);
  }
  return n;
}

/**
 * Runs `job` with Ctrl-C wired to its signal: the first stops it after the step in flight (what
 * it wrote stays resumable) and prints `notice`, a second quits at once.
 */
export async function withInterrupt<T>(
  job: (signal: AbortSignal) => Promise<T>,
  notice = "stopping after the step in flight (Ctrl-C again to quit at once)",
): Promise<T> {
  const controller = new AbortController();
  const onSigint = () => {
    if (controller.signal.aborted) Deno.exit(130);
    console.error(`\n${notice}`);
    controller.abort();
  };
  Deno.addSignalListener("SIGINT", onSigint);
  try {
    return await job(controller.signal);
  } finally {
    Deno.removeSignalListener("SIGINT", onSigint);
  }
}

/** One flag as a command declares it. */
export interface Flag {
  /** The value's name in the help ("DIR", "N"); a flag without one is a switch. */
  value?: string;
  /** Its help, wrapped to the help's width ("\n" starts a new line). */
  help: string;
  /** Shown as "(default X)": taken from a schema or a constant, never typed again here. */
  default?: unknown;
  /** Repeatable: the values arrive as a list. */
  multiple?: boolean;
  short?: string;
  /** The setting the flag stands for (a config field or plugin option). */
  field?: string;
  /** A flag kept for compatibility: what to use instead (warned about when given). */
  deprecated?: string;
}

export type Flags = Record<string, Flag>;

/** A setting's flag as declared: its value name, or what it says besides the setting's doc. */
export type FieldFlag = string | Partial<Flag>;

type Kebab<S extends string> = S extends `${infer H}${infer T}`
  ? `${H extends Lowercase<H> ? H : `-${Lowercase<H>}`}${Kebab<T>}`
  : "";

/** The flags `fieldFlags` makes of a declaration. */
export type FieldFlags<D> = {
  -readonly [K in keyof D & string as Kebab<K>]:
    & (D[K] extends string ? { value: string } : D[K])
    & Flag
    & { field: string };
};

/**
 * Flags for settings, one per field of `docs` (a schema's field docs) that `decl` names: the flag
 * is the field's name in kebab case, and its help and default are the field's unless it gives
 * its own (a null default is left to the help's words).
 */
export function fieldFlags<const D extends Record<string, FieldFlag>>(
  docs: readonly FieldDoc[],
  decl: D,
): FieldFlags<D> {
  return Object.fromEntries(
    Object.entries(decl).map(([field, own]) => {
      const doc = docs.find((d) => d.name === field);
      if (!doc) throw new Error(`no setting "${field}" to make a flag of`);
      const f: Partial<Flag> = typeof own === "string" ? { value: own } : own;
      // A switch's default goes without saying.
      const shown = f.value === undefined ? undefined : doc.default ?? undefined;
      const name = field.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
      return [name, { help: doc.description, default: shown, field, ...f }];
    }),
  ) as FieldFlags<D>;
}

/** The flags of `flags` under other names (`{ seed: "train-seed" }`), `omit` left out. */
export function renamed<
  F extends Flags,
  const N extends { [K in keyof F]?: string },
  const O extends keyof F = never,
>(
  flags: F,
  names: N,
  omit: readonly O[] = [],
  help: { [K in keyof F]?: string } = {},
): { [K in Exclude<keyof F, O> as K extends keyof N ? N[K] & string : K]: F[K] } {
  return Object.fromEntries(
    Object.entries(flags).filter(([k]) => !omit.includes(k as O)).map((
      [k, f],
    ): [string, Flag] => [names[k] ?? k, help[k] ? { ...f, help: help[k] } : f]),
  ) as never;
}

type ValueOf<F extends Flag> = F extends { value: string }
  ? (F extends { multiple: true } ? string[] : string)
  : boolean;

/** The parsed values of a flag declaration. */
export type FlagValues<F extends Flags> = { -readonly [K in keyof F]?: ValueOf<F[K]> };

type Intersect<U> = (U extends unknown ? (u: U) => void : never) extends (i: infer I) => void ? I
  : never;

/** The flags of all sections of a command, as one declaration. */
export type SectionFlags<S extends Record<string, Flags>> = Intersect<S[keyof S]> & Flags;

/** The declaration as node's parser takes it. */
export function parserOptions(flags: Flags): ParseArgsOptionsConfig {
  return Object.fromEntries(
    Object.entries(flags).map(([name, f]) => [name, {
      type: f.value === undefined ? "boolean" : "string",
      ...(f.multiple ? { multiple: true } : {}),
      ...(f.short ? { short: f.short } : {}),
    }]),
  ) as ParseArgsOptionsConfig;
}

/** How a default reads in a help text. */
export function showDefault(v: unknown): string {
  if (Array.isArray(v)) return v.join(",");
  return typeof v === "string" ? (v === "" ? '""' : v) : String(v);
}

/** The widest a help line gets, and the column the flags' help starts in. */
export const HELP_WIDTH = 100;
const HELP_COLUMN = 24;

/** `text` in lines of at most `width` characters, breaking at spaces. */
export function wrap(text: string, width: number): string[] {
  const lines: string[] = [];
  for (const paragraph of text.split("\n")) {
    let line = "";
    for (const word of paragraph.split(" ")) {
      if (line && line.length + 1 + word.length > width) {
        lines.push(line);
        line = word;
      } else {
        line = line ? `${line} ${word}` : word;
      }
    }
    lines.push(line);
  }
  return lines;
}

/** One flag's rows of a help text: `  --name VALUE   help (default X)`. */
function flagRows(name: string, f: Flag): string[] {
  const label = `${f.short ? `-${f.short}, ` : ""}--${name}${f.value ? ` ${f.value}` : ""}`;
  return helpRow(label, f.default === undefined ? f.help : withDefault(f.help, f.default));
}

/** A help text with its default. */
export function withDefault(help: string, value: unknown): string {
  return `${help} (default ${showDefault(value)})`;
}

/** The rows of one entry of a help list: the label, then its text wrapped in a column. */
export function helpRow(label: string, text: string): string[] {
  const head = label.length + 4 <= HELP_COLUMN ? `  ${label}`.padEnd(HELP_COLUMN) : `  ${label}  `;
  const [first] = wrap(text, HELP_WIDTH - head.length);
  // wrap() broke after `first` at one space or newline, which the rest leaves out.
  const rest = wrap(text.slice(first.length + 1), HELP_WIDTH - HELP_COLUMN).filter((l) => l);
  return [head + first, ...rest.map((l) => " ".repeat(HELP_COLUMN) + l)];
}

/** Titled sections of flag rows; deprecated flags come last, in a section of their own. */
function flagSections(sections: Record<string, Flags>): string {
  const blocks = Object.entries(sections).map(([title, flags]) =>
    [title, Object.entries(flags).filter(([, f]) => !f.deprecated)] as const
  );
  const old = Object.values(sections).flatMap((flags) => Object.entries(flags))
    .filter(([, f]) => f.deprecated)
    .map(([n, f]): [string, Flag] => [n, { ...f, help: `${f.help}; use ${f.deprecated}` }]);
  if (old.length) blocks.push(["deprecated (still accepted, with a warning):", old]);
  return blocks.map(([title, rows]) =>
    [title, ...rows.flatMap(([name, f]) => flagRows(name, f))].join("\n")
  ).join("\n\n");
}

const HELP: Flag = { short: "h", help: "this text" };

export interface CommandDef<S extends Record<string, Flags>> {
  /** What follows `deno task dipsy` in the usage line. */
  synopsis: string;
  /** What the command does, before the flags. */
  about?: string;
  /** The flags under their section titles, in help order. */
  sections: S;
  /** After the flags. */
  footer?: string;
  run(values: FlagValues<SectionFlags<S>>): Promise<number>;
}

/** A command built from its declaration. */
export interface DefinedCommand<F extends Flags> extends Command {
  /** Every flag (`help` included) as declared. */
  declared: F & { help: Flag };
  /** Parses, refusing unknown flags with a did-you-mean and warning of deprecated ones. */
  parse(args: string[]): FlagValues<F & { help: Flag }>;
}

export function defineCommand<const S extends Record<string, Flags>>(
  def: CommandDef<S>,
): DefinedCommand<SectionFlags<S>> {
  const [first = "options:"] = Object.keys(def.sections);
  const sections = { ...def.sections, [first]: { ...def.sections[first], help: HELP } };
  const declared = Object.assign({}, ...Object.values(sections)) as SectionFlags<S> & {
    help: Flag;
  };
  const usage = [
    `usage: deno task dipsy ${def.synopsis}`,
    ...(def.about ? ["", def.about] : []),
    "",
    flagSections(sections),
    ...(def.footer ? ["", def.footer] : []),
  ].join("\n");
  const options = parserOptions(declared);
  const parse = (args: string[]) => {
    const values = parseFlags(args, options) as FlagValues<typeof declared>;
    for (const [name, f] of Object.entries(declared as Flags)) {
      if (f.deprecated && values[name] !== undefined) {
        console.error(`warning: --${name} is deprecated; use ${f.deprecated}`);
      }
    }
    return values;
  };
  return {
    usage,
    flags: options,
    declared,
    parse,
    async run(args) {
      const values = parse(args);
      if (values.help) {
        console.log(usage);
        return 0;
      }
      return await def.run(values as FlagValues<SectionFlags<S>>);
    },
  };
}

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
