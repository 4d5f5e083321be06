/**
 * Bearer-token access. The server binds to loopback by default, where only local users reach it;
 * binding anywhere else needs a token, which every request must then carry as
 * `Authorization: Bearer <token>`. The token comes from a file (preferred: it stays out of the
 * process list and shell history) or from the DIPSY_TOKEN environment variable.
 */

import { UserError } from "../ffi/errors.ts";

export const TOKEN_ENV = "DIPSY_TOKEN";
/** Shorter tokens are refused: they can be guessed. */
export const MIN_TOKEN_LENGTH = 16;

export class AuthConfigError extends UserError {}

/** Whether `host` only accepts connections from this machine. */
export function isLoopback(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, "").toLowerCase();
  return h === "localhost" || h === "::1" || /^127(\.\d{1,3}){3}$/.test(h);
}

function checkToken(token: string, source: string): string {
  if (token.length < MIN_TOKEN_LENGTH) {
    throw new AuthConfigError(
      `the token from ${source} is ${token.length} characters long; use at least ` +
        `${MIN_TOKEN_LENGTH} (e.g. \`openssl rand -hex 32\`)`,
    );
  }
  if (!/^[\x21-\x7e]+$/.test(token)) {
    throw new AuthConfigError(`the token from ${source} must be printable ASCII without spaces`);
  }
  return token;
}

/** The token from `--token-file` (first line, trimmed), else from DIPSY_TOKEN, else null. */
export async function loadToken(
  opts: { file?: string | null; env?: Record<string, string | undefined> } = {},
): Promise<string | null> {
  if (opts.file) {
    const text = await Deno.readTextFile(opts.file).catch((e) => {
      throw new AuthConfigError(
        `cannot read the token file ${opts.file}: ${e instanceof Error ? e.message : e}`,
      );
    });
    return checkToken(text.split(/\r?\n/)[0].trim(), opts.file);
  }
  const env = opts.env ?? { [TOKEN_ENV]: Deno.env.get(TOKEN_ENV) };
  const value = env[TOKEN_ENV]?.trim();
  return value ? checkToken(value, TOKEN_ENV) : null;
}

/** Refuses to expose the server beyond this machine without a token. */
export function checkExposure(host: string, token: string | null): void {
  if (!isLoopback(host) && token === null) {
    throw new AuthConfigError(
      `binding to ${host} makes the server reachable from other machines: give a token with ` +
        `--token-file FILE or ${TOKEN_ENV}, or bind to 127.0.0.1`,
    );
  }
}

const encoder = new TextEncoder();

/** Compares in time that depends only on the lengths, so timing does not leak a secret. */
export function sameSecret(a: string, b: string): boolean {
  const x = encoder.encode(a), y = encoder.encode(b);
  let diff = x.length ^ y.length;
  for (let i = 0; i < x.length; i++) diff |= x[i] ^ (y[i % y.length] ?? 0);
  return diff === 0;
}

/** Whether an Authorization header value carries `token`. */
export function authorized(header: string | null | undefined, token: string): boolean {
  const m = /^Bearer[ ]+(\S+)\s*$/i.exec(header ?? "");
  return m !== null && sameSecret(m[1], token);
}
