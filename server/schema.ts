/**
 * A small schema layer: each schema checks a value (collecting every problem with the field it
 * belongs to) and describes itself as JSON Schema, so the OpenAPI document is generated from the
 * very objects that validate requests and the two cannot drift apart.
 *
 * Multipart form fields arrive as text; checking with `text: true` reads numbers and booleans
 * from their text form, and JSON-valued fields (objects, arrays) from JSON text.
 */

export interface Issue {
  /** Dotted path of the offending field ("" for the whole body). */
  field: string;
  message: string;
}

export interface CheckContext {
  issues: Issue[];
  /** Values are form text. */
  text: boolean;
}

export type JsonSchema = Record<string, unknown>;

export interface Schema<T> {
  /** The checked value, or undefined after adding issues. */
  check(value: unknown, field: string, ctx: CheckContext): T | undefined;
  json(): JsonSchema;
  readonly description?: string;
}

export type Infer<S> = S extends Schema<infer T> ? T : never;

function show(v: unknown): string {
  if (v instanceof Blob) return "a file upload";
  if (typeof v === "string") return JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}...` : v);
  if (v === undefined) return "nothing";
  const s = JSON.stringify(v);
  return s === undefined ? String(v) : s.length > 40 ? `${s.slice(0, 40)}...` : s;
}

function fail(ctx: CheckContext, field: string, message: string): undefined {
  ctx.issues.push({ field, message });
  return undefined;
}

function withDescription(json: JsonSchema, description?: string): JsonSchema {
  return description ? { ...json, description } : json;
}

export interface StringOptions {
  minLength?: number;
  maxLength?: number;
  enum?: readonly string[];
  pattern?: RegExp;
  /** What `pattern` means, for the error message. */
  patternText?: string;
  description?: string;
  default?: string;
}

export function string(opts: StringOptions = {}): Schema<string> {
  return {
    description: opts.description,
    check(v, field, ctx) {
      if (typeof v !== "string") return fail(ctx, field, `must be a string, got ${show(v)}`);
      if (opts.minLength !== undefined && v.length < opts.minLength) {
        return fail(
          ctx,
          field,
          opts.minLength === 1 ? "must not be empty" : `must be at least ${opts.minLength} long`,
        );
      }
      if (opts.maxLength !== undefined && v.length > opts.maxLength) {
        return fail(ctx, field, `must be at most ${opts.maxLength} characters, got ${v.length}`);
      }
      if (opts.enum && !opts.enum.includes(v)) {
        return fail(ctx, field, `must be one of ${opts.enum.join(", ")}; got ${show(v)}`);
      }
      if (opts.pattern && !opts.pattern.test(v)) {
        return fail(ctx, field, `must be ${opts.patternText ?? `like ${opts.pattern}`}`);
      }
      return v;
    },
    json: () =>
      withDescription({
        type: "string",
        ...(opts.minLength !== undefined ? { minLength: opts.minLength } : {}),
        ...(opts.maxLength !== undefined ? { maxLength: opts.maxLength } : {}),
        ...(opts.enum ? { enum: [...opts.enum] } : {}),
        ...(opts.pattern ? { pattern: opts.pattern.source } : {}),
        ...(opts.default !== undefined ? { default: opts.default } : {}),
      }, opts.description),
  };
}

export interface NumberOptions {
  min?: number;
  max?: number;
  description?: string;
  default?: number;
}

function numeric(integer: boolean, opts: NumberOptions): Schema<number> {
  const kind = integer ? "an integer" : "a number";
  return {
    description: opts.description,
    check(v, field, ctx) {
      let n = v;
      if (ctx.text && typeof v === "string") {
        const t = v.trim();
        n = t !== "" && /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(t) ? Number(t) : v;
      }
      if (typeof n !== "number" || !Number.isFinite(n)) {
        return fail(ctx, field, `must be ${kind}, got ${show(v)}`);
      }
      if (integer && !Number.isSafeInteger(n)) {
        return fail(ctx, field, `must be ${kind}, got ${show(v)}`);
      }
      if (opts.min !== undefined && n < opts.min) {
        return fail(ctx, field, `must be at least ${opts.min}, got ${n}`);
      }
      if (opts.max !== undefined && n > opts.max) {
        return fail(ctx, field, `must be at most ${opts.max}, got ${n}`);
      }
      return n;
    },
    json: () =>
      withDescription({
        type: integer ? "integer" : "number",
        ...(opts.min !== undefined ? { minimum: opts.min } : {}),
        ...(opts.max !== undefined ? { maximum: opts.max } : {}),
        ...(opts.default !== undefined ? { default: opts.default } : {}),
      }, opts.description),
  };
}

export const integer = (opts: NumberOptions = {}) => numeric(true, opts);
export const number = (opts: NumberOptions = {}) => numeric(false, opts);

export function boolean(opts: { description?: string } = {}): Schema<boolean> {
  return {
    description: opts.description,
    check(v, field, ctx) {
      if (ctx.text && (v === "true" || v === "false")) return v === "true";
      if (typeof v !== "boolean") return fail(ctx, field, `must be true or false, got ${show(v)}`);
      return v;
    },
    json: () => withDescription({ type: "boolean" }, opts.description),
  };
}

/** An uploaded file (a multipart part with a file name); sizes are checked by the caller. */
export function binary(opts: { description?: string; mediaType?: string } = {}): Schema<File> {
  return {
    description: opts.description,
    check(v, field, ctx) {
      if (!(v instanceof File)) {
        return fail(ctx, field, `must be a file upload, got ${show(v)}`);
      }
      return v;
    },
    json: () =>
      withDescription({
        type: "string",
        format: "binary",
        ...(opts.mediaType ? { contentMediaType: opts.mediaType } : {}),
      }, opts.description),
  };
}

/** Reads JSON text for structured values in form fields. */
function fromText(v: unknown, ctx: CheckContext): unknown {
  if (!ctx.text || typeof v !== "string") return v;
  try {
    return JSON.parse(v);
  } catch {
    return v;
  }
}

export function array<T>(
  item: Schema<T>,
  opts: { maxItems?: number; description?: string } = {},
): Schema<T[]> {
  return {
    description: opts.description,
    check(raw, field, ctx) {
      const v = fromText(raw, ctx);
      if (!Array.isArray(v)) return fail(ctx, field, `must be a list, got ${show(raw)}`);
      if (opts.maxItems !== undefined && v.length > opts.maxItems) {
        return fail(ctx, field, `must have at most ${opts.maxItems} items, got ${v.length}`);
      }
      const before = ctx.issues.length;
      const out = v.map((x, i) => item.check(x, `${field}[${i}]`, { ...ctx, text: false }));
      return ctx.issues.length > before ? undefined : out as T[];
    },
    json: () =>
      withDescription({
        type: "array",
        items: item.json(),
        ...(opts.maxItems !== undefined ? { maxItems: opts.maxItems } : {}),
      }, opts.description),
  };
}

/** Any JSON value of limited size (plugin options, whose shape the plugin checks). */
export function jsonValue(opts: { maxLength?: number; description?: string } = {}): Schema<
  unknown
> {
  return {
    description: opts.description,
    check(v, field, ctx) {
      const text = JSON.stringify(v);
      if (text === undefined) return fail(ctx, field, `must be a JSON value, got ${show(v)}`);
      if (opts.maxLength !== undefined && text.length > opts.maxLength) {
        return fail(ctx, field, `is too large (${text.length} > ${opts.maxLength} characters)`);
      }
      return v;
    },
    json: () => withDescription({}, opts.description),
  };
}

/** A map of free keys to values of one schema. */
export function record<T>(
  value: Schema<T>,
  opts: { maxKeys?: number; description?: string; keyPattern?: RegExp } = {},
): Schema<Record<string, T>> {
  return {
    description: opts.description,
    check(raw, field, ctx) {
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
        if (opts.keyPattern && !opts.keyPattern.test(k)) {
          fail(ctx, `${field}.${k}`, "is not a valid key");
          continue;
        }
        const r = value.check(x, `${field}.${k}`, { ...ctx, text: false });
        if (r !== undefined) out[k] = r;
      }
      return ctx.issues.length > before ? undefined : out;
    },
    json: () =>
      withDescription({
        type: "object",
        additionalProperties: value.json(),
        ...(opts.maxKeys !== undefined ? { maxProperties: opts.maxKeys } : {}),
      }, opts.description),
  };
}

/** Null, or a value of `inner`. */
export function nullable<T>(inner: Schema<T>): Schema<T | null> {
  return {
    description: inner.description,
    check(v, field, ctx) {
      if (v === null) return null;
      return inner.check(v, field, ctx);
    },
    json: () => {
      const j = inner.json();
      return typeof j.type === "string" ? { ...j, type: [j.type, "null"] } : j;
    },
  };
}

/** The first alternative that accepts the value; the issues of the last one otherwise. */
export function oneOf<T>(
  alternatives: Schema<T>[],
  opts: { description?: string; expected: string },
): Schema<T> {
  return {
    description: opts.description,
    check(v, field, ctx) {
      for (const alt of alternatives) {
        const sub: CheckContext = { issues: [], text: ctx.text };
        const r = alt.check(v, field, sub);
        if (sub.issues.length === 0) return r;
      }
      return fail(ctx, field, `must be ${opts.expected}, got ${show(v)}`);
    },
    json: () => withDescription({ oneOf: alternatives.map((a) => a.json()) }, opts.description),
  };
}

/** Marks a field as required in an object schema. */
export interface Field<T, R extends boolean = boolean> {
  schema: Schema<T>;
  required: R;
}

export const required = <T>(schema: Schema<T>): Field<T, true> => ({ schema, required: true });
export const optional = <T>(schema: Schema<T>): Field<T, false> => ({ schema, required: false });

type Shape = Record<string, Field<unknown>>;
type RequiredKeys<S extends Shape> = {
  [K in keyof S]: S[K]["required"] extends true ? K : never;
}[keyof S];
export type ObjectOf<S extends Shape> =
  & { [K in RequiredKeys<S>]: Infer<S[K]["schema"]> }
  & { [K in Exclude<keyof S, RequiredKeys<S>>]?: Infer<S[K]["schema"]> };

export interface ObjectSchema<S extends Shape> extends Schema<ObjectOf<S>> {
  readonly shape: S;
}

/**
 * An object with known fields. Unknown fields are refused by name unless `extra` says which
 * free-form keys (matched by a predicate) are allowed.
 */
export function object<S extends Shape>(
  shape: S,
  opts: { description?: string; extra?: (key: string) => boolean } = {},
): ObjectSchema<S> {
  return {
    shape,
    description: opts.description,
    check(raw, field, ctx) {
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
          fail(ctx, at(k), `unknown field (known: ${Object.keys(shape).join(", ")})`);
        }
      }
      for (const [k, f] of Object.entries(shape)) {
        if (src[k] === undefined) {
          if (f.required) fail(ctx, at(k), "is required");
          continue;
        }
        const r = f.schema.check(src[k], at(k), ctx);
        if (r !== undefined) out[k] = r;
      }
      for (const k of Object.keys(src)) {
        if (!Object.hasOwn(shape, k) && opts.extra?.(k)) out[k] = src[k];
      }
      return ctx.issues.length > before ? undefined : out as ObjectOf<S>;
    },
    json: () =>
      withDescription({
        type: "object",
        properties: Object.fromEntries(Object.entries(shape).map(([k, f]) => [k, f.schema.json()])),
        required: Object.entries(shape).filter(([, f]) => f.required).map(([k]) => k),
        additionalProperties: opts.extra !== undefined,
      }, opts.description),
  };
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
