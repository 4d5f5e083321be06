/**
 * Reading the `config.json` files diffusers and transformers write. A missing key takes the
 * library's default; a value of the wrong type, or one asking for an architecture this port does
 * not implement, is a one-line error naming the file and the key (never a silently different
 * network). Values are checked by `core/schema.ts` schemas, whose defaults are the library's.
 */
import { readFileSync } from "node:fs";
import { UserError } from "../ffi/errors.ts";
import * as s from "./schema.ts";

/** A config file that cannot be read, or a value in it this port does not implement. */
export class ConfigFileError extends UserError {
  /** `key` null: the file as a whole (missing, not JSON, the wrong kind of model). */
  constructor(readonly file: string, readonly key: string | null, detail: string) {
    super(key === null ? `${file}: ${detail}` : `${file}: "${key}" ${detail}`);
  }
}

/** The error class a reader throws (each model names its own). */
export type ConfigErrorClass = new (file: string, key: string | null, detail: string) => Error;

export type Json = Record<string, unknown>;

/**
 * The JSON object in `file`; `what` names the config in read errors, `notFound` says what the
 * folder should hold.
 */
export function readModelConfig(
  file: string,
  error: ConfigErrorClass,
  what: string,
  opts: { notFound?: string; parse?: (text: string) => unknown } = {},
): Json {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (e) {
    const missing = (e as { code?: string }).code === "ENOENT" && opts.notFound;
    throw new error(file, null, missing || `cannot read the ${what} (${(e as Error).message})`);
  }
  let json: unknown;
  try {
    json = (opts.parse ?? JSON.parse)(text);
  } catch (e) {
    throw new error(file, null, `not valid JSON (${(e as Error).message})`);
  }
  return configObject(json, file, error);
}

/** `json` as an object, or a one-line error naming the file (the config as a whole: `key` null). */
export function configObject(
  json: unknown,
  file: string,
  error: ConfigErrorClass,
  key: string | null = null,
): Json {
  if (json === null || typeof json !== "object" || Array.isArray(json)) {
    throw new error(file, key, "expected a JSON object");
  }
  return json as Json;
}

/** Checked reads of one config object; `path` prefixes the keys of a nested object. */
export class ConfigReader {
  constructor(
    readonly file: string,
    readonly json: Json,
    readonly error: ConfigErrorClass = ConfigFileError,
    readonly path = "",
    /** Whether a null its schema refuses takes the default (as most of these loaders do). */
    readonly nullIsDefault: (key: string) => boolean = () => true,
  ) {
    // Parsers are also called from code with any JSON value, which still gets a one-line error.
    configObject(json, file, error, path || null);
  }

  key(k: string): string {
    return this.path ? `${this.path}.${k}` : k;
  }

  fail(k: string, detail: string): never {
    throw new this.error(this.file, this.key(k), detail);
  }

  /** `v`, read for key `k`, checked by `schema`; `why` explains a refusal. */
  check<T>(k: string, v: unknown, schema: s.Schema<T>, why = ""): T {
    const checked = s.validate(schema, v);
    if (checked.ok) return checked.value;
    const { field, message } = checked.issues[0];
    const entry = field.replace(/\[(\d+)\]/g, "entry $1 ");
    this.fail(k, `${entry}${message}${why ? ` (${why})` : ""}`);
  }

  /** The value of `k`, or the schema's default where it is absent. */
  get<T>(k: string, schema: s.Schema<T>, why = ""): T {
    const v = this.json[k];
    const absent = v === undefined ||
      (v === null && this.nullIsDefault(k) && !s.validate(schema, null).ok);
    return absent ? structuredClone(schema.default) as T : this.check(k, v, schema, why);
  }

  /** A nested object (null or absent: none). */
  sub(k: string): ConfigReader | null {
    const v = this.json[k];
    if (v === undefined || v === null) return null;
    if (typeof v !== "object" || Array.isArray(v)) this.fail(k, "must be a JSON object");
    return new ConfigReader(this.file, v as Json, this.error, this.key(k), this.nullIsDefault);
  }

  /** Every key of `fields`, read under its camelCase name. */
  fields<F extends Fields>(fields: F): CamelFields<F> {
    return Object.fromEntries(
      Object.entries(fields).map(([k, schema]) => [camel(k), this.get(k, schema)]),
    ) as CamelFields<F>;
  }
}

/** Config keys with their schemas (defaults included). */
export type Fields = Record<string, s.Schema<unknown>>;

type Camel<K extends string> = K extends `${infer H}_${infer T}` ? `${H}${Capitalize<Camel<T>>}`
  : K;

/** What `ConfigReader.fields` returns: the keys in camelCase, with their schemas' types. */
export type CamelFields<F extends Fields> = { [K in keyof F & string as Camel<K>]: s.Infer<F[K]> };

function camel(key: string): string {
  return key.replace(/_(\w)/g, (_m, c: string) => c.toUpperCase());
}

/** A positive integer (channel counts, layer counts, sizes). */
export const positive = (def?: number): s.Schema<number> => s.integer({ min: 1, default: def });
