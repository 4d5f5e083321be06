import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { generateFormatted } from "../native/gen_ops.ts";
import { OPS } from "../native/ops_spec.ts";

Deno.test("generated op bindings match native/ops_spec.ts", async () => {
  for (const [path, text] of Object.entries(await generateFormatted())) {
    assert.equal(
      readFileSync(path, "utf8"),
      text,
      `${path} is stale: run \`deno task gen:ops\` and rebuild`,
    );
  }
});

Deno.test("op names are unique", () => {
  const names = OPS.map((o) => o.name);
  assert.deepEqual(names.filter((n, i) => names.indexOf(n) !== i), []);
});
