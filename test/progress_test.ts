/**
 * Progress a person reads: byte progress of downloads (counts, rate, time left; lines by bytes
 * off a terminal, one redrawn line on it) and the denoising-step lines of `dipsy sample` when its
 * stderr is not a terminal.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { ByteProgress, formatBytes, stepLineEvery, StepProgress } from "../core/progress.ts";
import { withTempDir, writeNoiseImage } from "./util.ts";

/** A clock the test moves by hand. */
function manualClock() {
  let t = 0;
  return { now: () => t, advance: (ms: number) => (t += ms) };
}

Deno.test("formatBytes uses the Hub's decimal units", () => {
  assert.equal(formatBytes(0), "0 B");
  assert.equal(formatBytes(999), "999 B");
  assert.equal(formatBytes(1000), "1.00 kB");
  assert.equal(formatBytes(12_345), "12.3 kB");
  assert.equal(formatBytes(3_438_167_536), "3.44 GB");
  assert.equal(formatBytes(492_000_000), "492 MB");
  assert.equal(formatBytes(-1), "?");
});

Deno.test("byte progress off a terminal: one line per step of bytes, then size and mean rate", () => {
  const clock = manualClock();
  const lines: string[] = [];
  const p = new ByteProgress(1_000_000, 0, {
    label: "download org/m w.safetensors",
    tty: false,
    write: (t) => lines.push(t),
    now: clock.now,
    fraction: 0.25,
    minStepBytes: 1,
  });
  clock.advance(1000);
  p.update(200_000);
  assert.deepEqual(lines, [], "below the first step");
  clock.advance(1000);
  // One chunk passing two steps prints both, each with its own count.
  p.update(600_000);
  assert.deepEqual(lines, [
    "download org/m w.safetensors 250 kB/1.00 MB (25%)  125 kB/s  ETA 6s\n",
    "download org/m w.safetensors 500 kB/1.00 MB (50%)  250 kB/s  ETA 2s\n",
  ]);
  clock.advance(2000);
  p.update(1_000_000);
  assert.equal(lines.length, 3, "the step at 75%; the end is the final line's");
  assert.match(lines[2], /\(75%\)/);
  p.finish();
  assert.equal(lines[3], "download org/m w.safetensors 1.00 MB in 4s (250 kB/s)\n");
  p.update(1_000_000);
  p.finish();
  assert.equal(lines.length, 4, "nothing after the end");
});

Deno.test("byte progress of a resumed download counts the rate from where it resumed", () => {
  const clock = manualClock();
  const lines: string[] = [];
  const p = new ByteProgress(1000, 600, {
    tty: false,
    write: (t) => lines.push(t),
    now: clock.now,
    fraction: 0.1,
    minStepBytes: 1,
  });
  clock.advance(2000);
  p.update(1000);
  p.finish();
  // Steps at 700, 800, 900; none at or below the 600 bytes it started with.
  assert.deepEqual(lines.slice(0, 3).map((l) => /\((\d+)%\)/.exec(l)![1]), ["70", "80", "90"]);
  assert.equal(lines[3], "1.00 kB in 2s (200 B/s, resumed at 600 B)\n");
});

Deno.test("byte progress on a terminal redraws one line at most ten times a second", () => {
  const clock = manualClock();
  const out: string[] = [];
  const p = new ByteProgress(null, 0, {
    label: "download",
    tty: true,
    write: (t) => out.push(t),
    now: clock.now,
  });
  clock.advance(50);
  p.update(100);
  p.update(200); // within 100 ms of the last draw: skipped
  clock.advance(100);
  p.update(300);
  assert.equal(out.length, 2);
  assert.ok(out.every((t) => t.startsWith("\r\x1b[2K") && !t.includes("\n")));
  assert.ok(out[1].startsWith("\r\x1b[2Kdownload 300 B  "), "unknown total: bytes only");
  p.abort();
  assert.equal(out.at(-1), "\n", "a failed download ends the line for its error");
});

Deno.test("step progress off a terminal: a line every tenth of the steps and at the last", () => {
  assert.equal(stepLineEvery(50), 5);
  assert.equal(stepLineEvery(7), 1);
  assert.equal(stepLineEvery(11), 2);
  const clock = manualClock();
  const lines: string[] = [];
  const p = new StepProgress({ tty: false, write: (t) => lines.push(t), now: clock.now });
  for (let i = 1; i <= 50; i++) {
    clock.advance(2100);
    p.step(i, 50);
  }
  p.finish();
  assert.equal(lines.length, 10);
  assert.equal(lines[1], "step 10/50, 2.1 s/step, ETA 1m24s\n");
  assert.equal(lines[9], "step 50/50, 2.1 s/step, took 1m45s\n");

  const tty: string[] = [];
  const t = new StepProgress({ tty: true, write: (s) => tty.push(s) });
  for (let i = 1; i <= 3; i++) t.step(i, 3);
  t.finish();
  assert.deepEqual(tty, ["\rstep 1/3", "\rstep 2/3", "\rstep 3/3", "\n"]);
});

Deno.test("dipsy sample with stderr piped prints the step lines of the rule", async () => {
  await withTempDir(async (dir) => {
    await writeNoiseImage(join(dir, "a.png"), 32, 32, 1);
    await writeNoiseImage(join(dir, "b.png"), 32, 32, 2);
    const steps = 11;
    const main = new URL("../cli/main.ts", import.meta.url).pathname;
    const args = ["run", "-A", "--no-check", main, "sample", "--model", "tiny"];
    args.push("--prompt", "a cat", "--seed", "1", "--steps", String(steps), "--device", "cpu");
    args.push("--positive", join(dir, "a.png"), "--negative", join(dir, "b.png"));
    args.push("--out", join(dir, "x.png"));
    const out = await new Deno.Command(Deno.execPath(), {
      args,
      stdout: "piped",
      stderr: "piped",
    }).output();
    const err = new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 0, err);
    const lines = err.split("\n").filter((l) => l.startsWith("step "));
    const every = stepLineEvery(steps);
    const want = [];
    for (let i = every; i < steps; i += every) want.push(i);
    want.push(steps);
    assert.deepEqual(lines.map((l) => Number(/^step (\d+)\//.exec(l)![1])), want, err);
    for (const l of lines.slice(0, -1)) {
      assert.match(l, new RegExp(`^step \\d+/${steps}, [\\d.]+ s/step, ETA \\S+$`));
    }
    assert.match(lines.at(-1)!, new RegExp(`^step ${steps}/${steps}, [\\d.]+ s/step, took \\S+$`));
    assert.ok(!err.includes("\r"), "no redraws in a log");
  });
});
