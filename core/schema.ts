/**
 * One definition per setting. Each schema checks a value (collecting every problem with the field
 * it belongs to), carries its default and a one-line description, and describes itself as JSON
 * Schema and as help lines, so validation, defaults, `--help`, `--list`, manifests and the
 * OpenAPI document are all drawn from the same objects and cannot drift apart.
 *
 * Values given as text (form fields, command-line flags) are checked with `text: true`: numbers
 * and booleans are read from their text form, and JSON-valued fields (objects, arrays) from JSON
 * text.
 */
import { closest } from "./suggest.ts";

/** One problem with a checked value. */
export interface Issue {
  /** Dotted path of the offending field ("" for the whole body). */
  field: string;
  /** What is wrong, without the field's name. */
  message: string;
  /** The field is not one the schema knows; `message` then names it. */
  unknown?: boolean;
}

/** What a check collects its problems in, and how it reads values. */
export interface CheckContext {
  /** The problems found so far. */
  issues: Issue[];
  /** Values are text. */
  text: boolean;
}

/** A JSON Schema (2020-12, as OpenAPI 3.1 uses it). */
export type JsonSchema = Record<string, unknown>;

/** A checked setting: its check, type, default, description and JSON Schema. */
export interface Schema<T> {
  /** The checked value, or undefined after adding issues. */
  check(value: unknown, field: string, ctx: CheckContext): T | undefined;
  /** The JSON Schema of the accepted values, with the default and description. */
  jsonSchema(): JsonSchema;
  /** A short type for help texts, e.g. "integer 1..1000" or "number | null". */
  readonly type: string;
  /** One line for help texts. */
  readonly description?: string;
  /** The value an object schema fills in when its field is absent. */
  readonly default?: T;
}

/** The value type a schema accepts. */
export type Infer<S> = S extends Schema<infer T> ? T : never;

/** What every combinator takes besides its own bounds. */
export interface Meta<T> {
  /** One line for help texts. */
  description?: string;
  /** Filled in by an object schema when the field is absent. */
  default?: T;
}

function show(v: unknown): string {
  if (v instanceof Blob) return "a file upload";
  if (typeof v === "string") return JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}...` : v);
  if (v === undefined) return "nothing";
  if (typeof v === "number" && !Number.isFinite(v)) return String(v);
  const s = JSON.stringify(v);
  return s === undefined ? String(v) : s.length > 40 ? `${s.slice(0, 40)}...` : s;
}

function fail(ctx: CheckContext, field: string, message: string): undefined {
  ctx.issues.push({ field, message });
  return undefined;
}

/** `json` with the description and default, and without the bounds that are not set. */
function annotate(json: JsonSchema, meta: Meta<unknown>): JsonSchema {
  const all = { ...json, default: meta.default, description: meta.description || undefined };
  return Object.fromEntries(Object.entries(all).filter(([, v]) => v !== undefined));
}

/** A schema from its check and JSON Schema, with the plumbing every combinator shares. */
function make<T>(
  type: string,
  meta: Meta<T>,
  check: Schema<T>["check"],
  json: () => JsonSchema,
): Schema<T> {
  return {
    type,
    description: meta.description,
    default: meta.default,
    check,
    jsonSchema: () => annotate(json(), meta),
  };
}

/** Bounds of a string. */
export interface StringOptions extends Meta<string> {
  /** Fewest characters. */
  minLength?: number;
  /** Most characters. */
  maxLength?: number;
  /** The only values allowed. */
  enum?: readonly string[];
  /** A pattern the value must match. */
  pattern?: RegExp;
  /** What `pattern` means, for the error message. */
  patternText?: string;
}

/** A string, optionally bounded in length, from a list, or matching a pattern. */
export function string(opts: StringOptions = {}): Schema<string> {
  const { minLength, maxLength, pattern } = opts;
  return make(opts.enum ? opts.enum.join(" | ") : "string", opts, (v, field, ctx) => {
    if (typeof v !== "string") return fail(ctx, field, `must be a string, got ${show(v)}`);
    if (minLength !== undefined && v.length < minLength) {
      return fail(
        ctx,
        field,
        minLength === 1 ? "must not be empty" : `must be at least ${minLength} long`,
      );
    }
    if (maxLength !== undefined && v.length > maxLength) {
      return fail(ctx, field, `must be at most ${maxLength} characters, got ${v.length}`);
    }
    if (opts.enum && !opts.enum.includes(v)) {
      return fail(ctx, field, `must be one of ${opts.enum.join(", ")}; got ${show(v)}`);
    }
    if (pattern && !pattern.test(v)) {
      return fail(ctx, field, `must be ${opts.patternText ?? `like ${pattern}`}`);
    }
    return v;
  }, () => ({
    type: "string",
    minLength,
    maxLength,
    enum: opts.enum && [...opts.enum],
    pattern: pattern?.source,
  }));
}

/** A string from a fixed list, typed as that list's union. */
export function choice<T extends string>(
  values: readonly T[],
  def?: T,
  description?: string,
): Schema<T> {
  return string({ enum: values, default: def, description }) as Schema<T>;
}

/** Bounds of a number. */
export interface NumberOptions extends Meta<number> {
  /** Smallest value (see exclusiveMin). */
  min?: number;
  /** Largest value. */
  max?: number;
  /** Values must be above `min`, not equal to it. */
  exclusiveMin?: boolean;
}

const NUMBER_TEXT = /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/;

function numeric(integer: boolean, opts: NumberOptions): Schema<number> {
  const kind = integer ? "an integer" : "a number";
  const { min, max } = opts;
  const bounds = min !== undefined && max !== undefined && !opts.exclusiveMin
    ? ` ${min}..${max}`
    : min !== undefined
    ? ` ${opts.exclusiveMin ? ">" : ">="} ${min}${max !== undefined ? `, <= ${max}` : ""}`
    : max !== undefined
    ? ` <= ${max}`
    : "";
  const name = integer ? "integer" : "number";
  return make(
    `${name}${bounds}`,
    opts,
    (v, field, ctx) => {
      const n = ctx.text && typeof v === "string" && NUMBER_TEXT.test(v.trim()) ? Number(v) : v;
      if (typeof n !== "number" || !Number.isFinite(n) || (integer && !Number.isSafeInteger(n))) {
        return fail(ctx, field, `must be ${kind}, got ${show(v)}`);
      }
      if (min !== undefined && (opts.exclusiveMin ? !(n > min) : n < min)) {
        return fail(
          ctx,
          field,
          `must be ${opts.exclusiveMin ? "above" : "at least"} ${min}, got ${n}`,
        );
      }
      if (max !== undefined && n > max) {
        return fail(ctx, field, `must be at most ${max}, got ${n}`);
      }
      return n;
    },
    () => ({ type: name, [opts.exclusiveMin ? "exclusiveMinimum" : "minimum"]: min, maximum: max }),
  );
}

/** A safe integer within bounds; as text, read from its decimal form. */
export const integer = (opts: NumberOptions = {}): Schema<number> => numeric(true, opts);
/** A finite number within bounds; as text, read from its decimal form. */
export const number = (opts: NumberOptions = {}): Schema<number> => numeric(false, opts);

/** true or false; as text, "true" or "false". */
export function boolean(opts: Meta<boolean> = {}): Schema<boolean> {
  return make("boolean", opts, (v, field, ctx) => {
    if (ctx.text && (v === "true" || v === "false")) return v === "true";
    if (typeof v !== "boolean") return fail(ctx, field, `must be true or false, got ${show(v)}`);
    return v;
  }, () => ({ type: "boolean" }));
}

/** A value that must equal `value` (settings this implementation supports one value of). */
export function literal<T extends string | number | boolean | null>(
  value: T,
  opts: Meta<T> = {},
): Schema<T> {
  const type = typeof value === "number" ? String(value) : JSON.stringify(value);
  return make(type, opts, (v, field, ctx) => {
    if (Object.is(v, value)) return value;
    return fail(ctx, field, `must be ${show(value)} (the only value supported), got ${show(v)}`);
  }, () =>
    // JSON has no -Infinity: such a value can only be left out of a JSON request.
    typeof value === "number" && !Number.isFinite(value) ? { not: {} } : { const: value });
}

/** An uploaded file (a multipart part with a file name); sizes are checked by the caller. */
export function binary(opts: { description?: string; mediaType?: string } = {}): Schema<File> {
  return make("file", opts, (v, field, ctx) => {
    if (!(v instanceof File)) return fail(ctx, field, `must be a file upload, got ${show(v)}`);
    return v;
  }, () => ({ type: "string", format: "binary", contentMediaType: opts.mediaType || undefined }));
}

/** Reads JSON text for structured values in text fields. */
function fromText(v: unknown, ctx: CheckContext): unknown {
  if (!ctx.text || typeof v !== "string") return v;
  try {
    return JSON.parse(v);
  } catch {
    return v;
  }
}

/** Bounds of a list. */
export interface ArrayOptions<T> extends Meta<T[]> {
  /** Fewest items. */
  minItems?: number;
  /** Most items. */
  maxItems?: number;
  /** Text that is not JSON is split at commas (command-line lists: `q_proj,v_proj`). */
  commaText?: boolean;
}

/** A list of values of one schema. */
export function array<T>(item: Schema<T>, opts: ArrayOptions<T> = {}): Schema<T[]> {
  const { minItems, maxItems } = opts;
  const n = minItems !== undefined && minItems === maxItems ? `${minItems} ` : "";
  return make(`list of ${n}${item.type}`, opts, (raw, field, ctx) => {
    let v = fromText(raw, ctx);
    if (opts.commaText && ctx.text && typeof v === "string") {
      v = v.split(",").map((p) => p.trim()).filter(Boolean);
    }
    if (!Array.isArray(v)) return fail(ctx, field, `must be a list, got ${show(raw)}`);
    if (minItems !== undefined && v.length < minItems) {
      return fail(ctx, field, `must have at least ${minItems} items, got ${v.length}`);
    }
    if (maxItems !== undefined && v.length > maxItems) {
      return fail(ctx, field, `must have at most ${maxItems} items, got ${v.length}`);
    }
    const before = ctx.issues.length;
    const out = v.map((x, i) => item.check(x, `${field}[${i}]`, { ...ctx, text: false }));
    return ctx.issues.length > before ? undefined : out as T[];
  }, () => ({ type: "array", items: item.jsonSchema(), minItems, maxItems }));
}

/** Any JSON value of limited size (plugin options, whose shape the plugin's schema checks). */
export function jsonValue(opts: { maxLength?: number; description?: string } = {}): Schema<
  unknown
> {
  return make("JSON", opts, (v, field, ctx) => {
    const text = JSON.stringify(v);
    if (text === undefined) return fail(ctx, field, `must be a JSON value, got ${show(v)}`);
    if (opts.maxLength !== undefined && text.length > opts.maxLength) {
      return fail(ctx, field, `is too large (${text.length} > ${opts.maxLength} characters)`);
    }
    return v;
  }, () => ({}));
}

/** A map of free keys to values of one schema. */
export function record<T>(
  value: Schema<T>,
  opts: { maxKeys?: number; description?: string } = {},
): Schema<Record<string, T>> {
  return make(`map of ${value.type}`, opts, (raw, field, ctx) => {
    const v = fromText(raw, ctx);
    if (v === null || typeof v !== "object" || Array.isArray(v)) {
      return fail(ctx, field, `must be an object, got ${show(raw)}`);
    }
    const entries = Object.entries(v);
    if (opts.maxKeys !== undefined && entries.length > opts.maxKeys) {
      return fail(ctx, field, `must have at most ${opts.maxKeys} keys, got ${entries.length}`);
    }
    const before = ctx.issues.length;
    const out: Record<string, T> = {};
    for (const [k, x] of entries) {
      const r = value.check(x, `${field}.${k}`, { ...ctx, text: false });
      if (r !== undefined) out[k] = r;
    }
    return ctx.issues.length > before ? undefined : out;
  }, () => ({
    type: "object",
    additionalProperties: value.jsonSchema(),
    maxProperties: opts.maxKeys,
  }));
}

/**
 * Null, or a value of `inner`. As text, "" and "null" read as null where `inner` is not a
 * string (a string field keeps "" as the empty string).
 */
export function nullable<T>(inner: Schema<T>, opts: Meta<T | null> = {}): Schema<T | null> {
  return make(`${inner.type} | null`, over(inner, opts), (v, field, ctx) => {
    if (v === null) return null;
    if (ctx.text && (v === "null" || v === "") && !inner.type.startsWith("string")) return null;
    return inner.check(v, field, ctx);
  }, () => {
    const j = inner.jsonSchema();
    return typeof j.type === "string"
      ? { ...j, type: [j.type, "null"] }
      : { oneOf: [j, { type: "null" }] };
  });
}

/** `opts` over the description and default of the schema a combinator wraps. */
function over<T>(inner: Schema<T>, opts: Meta<T | null>): Meta<T | null> {
  return {
    description: opts.description ?? inner.description,
    default: opts.default !== undefined ? opts.default : inner.default,
  };
}

/** The first alternative that accepts the value. */
export function oneOf<T>(
  alternatives: Schema<T>[],
  opts: Meta<T> & { expected: string },
): Schema<T> {
  return make(alternatives.map((a) => a.type).join(" | "), opts, (v, field, ctx) => {
    for (const alt of alternatives) {
      const sub: CheckContext = { issues: [], text: ctx.text };
      const r = alt.check(v, field, sub);
      if (sub.issues.length === 0) return r;
    }
    return fail(ctx, field, `must be ${opts.expected}, got ${show(v)}`);
  }, () => ({ oneOf: alternatives.map((a) => a.jsonSchema()) }));
}

/** `inner`, with a rule across its parts (e.g. start < end); `rule` returns the problem. */
export function refine<T>(
  inner: Schema<T>,
  rule: (value: T) => string | null,
  opts: Meta<T> & { type?: string } = {},
): Schema<T> {
  return make(opts.type ?? inner.type, over(inner, opts) as Meta<T>, (v, field, ctx) => {
    const before = ctx.issues.length;
    const r = inner.check(v, field, ctx);
    if (ctx.issues.length > before) return undefined;
    const problem = rule(r as T);
    return problem ? fail(ctx, field, problem) : r;
  }, () => inner.jsonSchema());
}

/** Marks a field as required in an object schema. */
export interface Field<T, R extends boolean = boolean> {
  /** The field's value schema. */
  schema: Schema<T>;
  /** Whether an object without the field is refused. */
  required: R;
}

/**
 * `schema` without its default, for a partial layer (a request over a preset) whose absent
 * fields are left to the layers below it.
 */
export function withoutDefault<T>(schema: Schema<T>): Schema<T> {
  return {
    ...schema,
    default: undefined,
    jsonSchema: () => {
      const { default: _, ...json } = schema.jsonSchema();
      return json;
    },
  };
}

/** A field the object must have. */
export const required = <T>(schema: Schema<T>): Field<T, true> => ({ schema, required: true });
/** A field the object may leave out (its default is then filled in). */
export const optional = <T>(schema: Schema<T>): Field<T, false> => ({ schema, required: false });

/** The fields of an object schema. */
export type Shape = Record<string, Field<unknown>>;
/** The keys of the required fields of `S`. */
export type RequiredKeys<S extends Shape> = {
  [K in keyof S]: S[K]["required"] extends true ? K : never;
}[keyof S];
/** The value type of an object schema with the fields `S`. */
export type ObjectOf<S extends Shape> =
  & { [K in RequiredKeys<S>]: Infer<S[K]["schema"]> }
  & { [K in Exclude<keyof S, RequiredKeys<S>>]?: Infer<S[K]["schema"]> };

/** An object schema, whose fields can be listed. */
export interface ObjectSchema<S extends Shape = Shape> extends Schema<ObjectOf<S>> {
  /** Its fields. */
  readonly shape: S;
}

/** How an object schema treats its keys. */
export interface ObjectOptions {
  /** One line for help texts. */
  description?: string;
  /** Which free-form keys (matched by a predicate) are allowed besides the known ones. */
  extra?: (key: string) => boolean;
  /** What a key is called in messages ("field", "option"). */
  noun?: string;
}

/** "unknown option "x" (did you mean y? options: a, b)": the one wording for a misspelt key. */
export function unknownKey(key: string, known: readonly string[], noun = "field"): string {
  const guess = closest(key, known);
  return `unknown ${noun} "${key}" (${guess ? `did you mean ${guess}? ` : ""}${noun}s: ${
    known.join(", ") || "none"
  })`;
}

/**
 * An object with known fields. Absent optional fields with a default get it (a copy); unknown
 * fields are refused with a did-you-mean unless `extra` allows them.
 */
export function object<S extends Shape>(shape: S, opts: ObjectOptions = {}): ObjectSchema<S> {
  const keys = Object.keys(shape);
  const check: Schema<ObjectOf<S>>["check"] = (raw, field, ctx) => {
    const v = fromText(raw, ctx);
    if (v === null || typeof v !== "object" || Array.isArray(v)) {
      return fail(ctx, field, `must be an object, got ${show(raw)}`);
    }
    const src = v as Record<string, unknown>;
    const before = ctx.issues.length;
    const out: Record<string, unknown> = {};
    const at = (k: string) => field ? `${field}.${k}` : k;
    for (const k of Object.keys(src)) {
      if (!Object.hasOwn(shape, k) && !opts.extra?.(k)) {
        ctx.issues.push({ field: at(k), message: unknownKey(k, keys, opts.noun), unknown: true });
      }
    }
    for (const [k, f] of Object.entries(shape)) {
      if (src[k] === undefined) {
        if (f.required) fail(ctx, at(k), "is required");
        else if (f.schema.default !== undefined) out[k] = structuredClone(f.schema.default);
        continue;
      }
      const r = f.schema.check(src[k], at(k), ctx);
      if (r !== undefined) out[k] = r;
    }
    for (const k of Object.keys(src)) {
      if (!Object.hasOwn(shape, k) && opts.extra?.(k)) out[k] = src[k];
    }
    return ctx.issues.length > before ? undefined : out as ObjectOf<S>;
  };
  const fields = Object.entries(shape);
  return {
    shape,
    ...make("object", opts, check, () => ({
      type: "object",
      properties: Object.fromEntries(fields.map(([k, f]) => [k, f.schema.jsonSchema()])),
      required: fields.filter(([, f]) => f.required).map(([k]) => k),
      additionalProperties: opts.extra !== undefined,
    })),
  };
}

/** Optional fields of an object schema, for plugin options and settings. */
export function options<S extends Record<string, Schema<unknown>>>(
  fields: S,
  opts: ObjectOptions = {},
): ObjectSchema<{ [K in keyof S]: Field<Infer<S[K]>, false> }> {
  const shape = Object.fromEntries(Object.entries(fields).map(([k, s]) => [k, optional(s)]));
  return object(shape, { noun: "option", ...opts }) as ObjectSchema<
    { [K in keyof S]: Field<Infer<S[K]>, false> }
  >;
}

/** Checks a whole value; `ok` with the value, or the issues. */
export function validate<T>(
  schema: Schema<T>,
  value: unknown,
  opts: { text?: boolean } = {},
): { ok: true; value: T } | { ok: false; issues: Issue[] } {
  const ctx: CheckContext = { issues: [], text: opts.text ?? false };
  const r = schema.check(value, "", ctx);
  return ctx.issues.length ? { ok: false, issues: ctx.issues } : { ok: true, value: r as T };
}

/** An issue as one line: `option "x" must be ...`, or the unknown-key message as it is. */
export function issueText(issue: Issue, noun = "field"): string {
  return issue.unknown || !issue.field
    ? issue.message
    : `${noun} "${issue.field}" ${issue.message}`;
}

/** One line of help per field. */
export interface FieldDoc {
  /** The key. */
  name: string;
  /** A short type, e.g. "integer 1..1000". */
  type: string;
  /** Absent when the field has no default. */
  default?: unknown;
  /** One line. */
  description: string;
}

/** The fields of an object schema with their types, defaults and descriptions. */
export function fieldDocs(schema: ObjectSchema): FieldDoc[] {
  return Object.entries(schema.shape).map(([name, f]) => ({
    name,
    type: f.schema.type,
    ...(f.schema.default !== undefined ? { default: f.schema.default } : {}),
    description: f.schema.description ?? "",
  }));
}

/** The defaults of an object schema's fields (those that have one). */
export function defaultsOf(schema: ObjectSchema): Record<string, unknown> {
  const r = validate(schema, {});
  if (!r.ok) throw new Error(`schema defaults: ${r.issues.map((i) => issueText(i)).join("; ")}`);
  return r.value as Record<string, unknown>;
}
