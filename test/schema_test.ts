/**
 * The option schemas: one declaration per setting gives its check, default, help line and JSON
 * Schema; a misspelt plugin option is refused through the HTTP server too (both endpoints), and
 * the OpenAPI document describes each plugin's options with the schema that checks them.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import * as s from "../core/schema.ts";
import { type PluginKind, registry } from "../core/plugins.ts";
import { setNumThreads } from "../ffi/mod.ts";
import { parseServeArgs, startFromSettings } from "../cli/serve.ts";
import { registerDefaults } from "../plugins/defaults.ts";
import { writeTinyDataset } from "./util.ts";
import { Client, form, MODEL_FLAGS, serverTest } from "./server_util.ts";

registerDefaults();

const opts = s.options({
  scale: s.number({ min: 0, default: 0.6, description: "how strong" }),
  steps: s.integer({ min: 1, max: 1000, default: 50, description: "how many" }),
  names: s.array(s.string(), { commaText: true, default: ["a", "b"], description: "which" }),
  span: s.nullable(
    s.refine(
      s.array(s.number(), { minItems: 2, maxItems: 2 }),
      ([a, b]) => a < b ? null : "must be [start, end] with start < end",
    ),
    { default: null, description: "where" },
  ),
  flag: s.boolean({ description: "no default" }),
});

Deno.test("schema: defaults are filled in (as copies), given values checked and kept", () => {
  const a = s.validate(opts, {});
  assert.ok(a.ok);
  assert.deepEqual(a.value, { scale: 0.6, steps: 50, names: ["a", "b"], span: null });
  (a.value.names as string[]).push("c");
  const b = s.validate(opts, { scale: 2, flag: true, span: [0.2, 0.5] });
  assert.ok(b.ok);
  assert.deepEqual(b.value, {
    scale: 2,
    steps: 50,
    names: ["a", "b"],
    span: [0.2, 0.5],
    flag: true,
  });
});

Deno.test("schema: every problem is listed with its field; unknown keys suggest the known ones", () => {
  const r = s.validate(opts, { scal: 1, steps: 0, names: "x", span: [0.5, 0.1] });
  assert.ok(!r.ok);
  assert.deepEqual(r.issues.map((i) => s.issueText(i, "option")), [
    'unknown option "scal" (did you mean scale? options: scale, steps, names, span, flag)',
    'option "steps" must be at least 1, got 0',
    'option "names" must be a list, got "x"',
    'option "span" must be [start, end] with start < end',
  ]);
  const far = s.validate(opts, { zzzzzz: 1 });
  assert.ok(!far.ok);
  assert.equal(
    far.issues[0].message,
    'unknown option "zzzzzz" (options: scale, steps, names, span, flag)',
  );
});

Deno.test("schema: text values (flags, form fields) are read as numbers, booleans and lists", () => {
  const r = s.validate(opts, {
    scale: "1.5",
    steps: "7",
    names: "q_proj, v_proj",
    flag: "false",
    span: "",
  }, {
    text: true,
  });
  assert.ok(r.ok, JSON.stringify(r));
  assert.deepEqual(r.value, {
    scale: 1.5,
    steps: 7,
    names: ["q_proj", "v_proj"],
    flag: false,
    span: null,
  });
  const strict = s.validate(opts, { steps: "7" });
  assert.ok(!strict.ok, "outside text mode a number in quotes is refused");
});

Deno.test("schema: help lines and JSON Schema come from the same declaration", () => {
  assert.deepEqual(s.fieldDocs(opts), [
    { name: "scale", type: "number >= 0", default: 0.6, description: "how strong" },
    { name: "steps", type: "integer 1..1000", default: 50, description: "how many" },
    { name: "names", type: "list of string", default: ["a", "b"], description: "which" },
    { name: "span", type: "list of 2 number | null", default: null, description: "where" },
    { name: "flag", type: "boolean", description: "no default" },
  ]);
  const json = opts.jsonSchema() as { properties: Record<string, Record<string, unknown>> };
  assert.deepEqual(json.properties.steps, {
    type: "integer",
    minimum: 1,
    maximum: 1000,
    default: 50,
    description: "how many",
  });
  assert.deepEqual(json.properties.span.type, ["array", "null"]);
  assert.equal((json as Record<string, unknown>).additionalProperties, false);
});

// ---------------------------------------------------------------------------------------------
// Through the server

setNumThreads(1);
const ROOT = await Deno.realPath(await Deno.makeTempDir({ prefix: "dipsy_schema_test_" }));
await writeTinyDataset(join(ROOT, "data"));
const server = await startFromSettings(
  parseServeArgs([...MODEL_FLAGS, "--port", "0", "--roots", ROOT])!,
  () => {},
);
const client = new Client(server.url, server.port, null);
const KINDS: readonly PluginKind[] = ["guidance", "sampler", "pairs"];
const JOB = { data: "data", perClass: 2, steps: 2, width: 32, height: 32, batch: 2 };

/** `key` with its second letter dropped. */
const typo = (key: string) => key[0] + key.slice(2);

serverTest(
  "server: a misspelt option of any plugin is refused, naming the valid ones",
  async () => {
    for (const kind of KINDS) {
      for (const def of registry.list(kind)) {
        const keys = Object.keys(def.schema.shape);
        const bad = typo(keys[0]);
        const r = await client.postJob({
          ...JOB,
          out: `out-${kind}`,
          [kind]: { name: def.name, [bad]: 1 },
        });
        const label = `${kind} ${def.name} ${bad}`;
        assert.equal(r.status, 400, label);
        const issue = r.json.error.issues[0];
        assert.equal(issue.field, `${kind}.${bad}`, label);
        assert.ok(issue.message.includes(`unknown option "${bad}"`), issue.message);
        assert.ok(issue.message.includes(`options: ${keys.join(", ")})`), issue.message);
      }
    }
    for (const def of registry.list("guidance")) {
      const keys = Object.keys(def.schema.shape);
      const bad = typo(keys[0]);
      for (
        const fields of [
          { [`guidance.${bad}`]: "1" },
          { guidanceOptions: JSON.stringify({ [bad]: 1 }) },
        ] as Record<string, string>[]
      ) {
        const r = await client.call("POST", "/v1/sample", {
          body: form({
            prompt: "a red circle",
            seed: "1",
            steps: "2",
            guidance: def.name,
            ...fields,
          }),
        });
        assert.equal(r.status, 400, def.name);
        const issue = r.json.error.issues[0];
        assert.equal(issue.field, `guidanceOptions.${bad}`, def.name);
        assert.ok(issue.message.includes(`options: ${keys.join(", ")})`), issue.message);
      }
    }
    assert.deepEqual(
      await Array.fromAsync(Deno.readDir(ROOT), (e) => e.name),
      ["data"],
      "nothing written",
    );
  },
);

serverTest("server: the OpenAPI document gives each plugin's options its schema", async () => {
  const doc = (await client.call("GET", "/openapi.json")).json;
  const sample = doc.paths["/v1/sample"].post.requestBody.content["multipart/form-data"].schema;
  for (const def of registry.list("guidance")) {
    // deno-lint-ignore no-explicit-any
    const condition = sample.allOf.find((c: any) =>
      c.then?.properties?.guidanceOptions &&
      JSON.stringify(c.if.properties.guidance) === JSON.stringify({ enum: [def.name] })
    );
    assert.ok(condition, def.name);
    assert.deepEqual(condition.then.properties.guidanceOptions, def.schema.jsonSchema(), def.name);
  }
  const job = doc.paths["/v1/jobs"].post.requestBody.content["application/json"].schema;
  for (const kind of KINDS) {
    for (const def of registry.list(kind)) {
      const branch = job.properties[kind].anyOf.find((b: { properties?: { name?: unknown } }) =>
        JSON.stringify(b.properties?.name) === JSON.stringify({ enum: [def.name] })
      );
      assert.ok(branch, `${kind} ${def.name}`);
      for (const [k, v] of Object.entries(def.schema.jsonSchema().properties as object)) {
        assert.deepEqual(branch.properties[k], v, `${kind} ${def.name} ${k}`);
      }
    }
  }
});

serverTest("server: shut down", async () => {
  await server.shutdown();
  await server.finished;
  await Deno.remove(ROOT, { recursive: true });
});
