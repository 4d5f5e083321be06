/**
 * A progress display for long jobs on stderr: done/total, items per second and the time left.
 * On a terminal it redraws one line in place; elsewhere (a log file, a cluster job's output) it
 * prints a plain line now and then, so logs stay readable and small.
 */

export interface ProgressOptions {
  /** What is counted, e.g. "images". */
  unit?: string;
  /** Text before the counts, e.g. "generate". */
  label?: string;
  /** Redraw in place (default: whether stderr is a terminal). */
  tty?: boolean;
  /** Where lines go (default: stderr). */
  write?: (text: string) => void;
  /** Seconds between plain lines when not redrawing (default 10). */
  interval?: number;
  /** Clock in milliseconds (tests). */
  now?: () => number;
}

const encoder = new TextEncoder();

function writeStderr(text: string): void {
  const bytes = encoder.encode(text);
  let off = 0;
  while (off < bytes.length) off += Deno.stderr.writeSync(bytes.subarray(off));
}

/** "1h02m", "3m05s", "12s". */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return "?";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  if (h > 0) return `${h}h${String(m).padStart(2, "0")}m`;
  if (m > 0) return `${m}m${String(r).padStart(2, "0")}s`;
  return `${r}s`;
}

/** "2.35 images/s", or "12.4 s/image" when slower than one per ten seconds. */
export function formatRate(perSecond: number, unit: string): string {
  if (!(perSecond > 0) || !Number.isFinite(perSecond)) return `- ${unit}/s`;
  if (perSecond >= 0.1) return `${perSecond.toFixed(perSecond >= 10 ? 1 : 2)} ${unit}/s`;
  return `${(1 / perSecond).toFixed(1)} s/${unit.replace(/s$/, "")}`;
}

export class Progress {
  readonly #total: number;
  readonly #unit: string;
  readonly #label: string;
  readonly #tty: boolean;
  readonly #write: (text: string) => void;
  readonly #interval: number;
  readonly #now: () => number;
  readonly #start: number;
  #done = 0;
  #detail = "";
  #lastDraw = -Infinity;
  #finished = false;

  constructor(total: number, opts: ProgressOptions = {}) {
    this.#total = total;
    this.#unit = opts.unit ?? "items";
    this.#label = opts.label ?? "";
    this.#tty = opts.tty ?? Deno.stderr.isTerminal();
    this.#write = opts.write ?? writeStderr;
    this.#interval = (opts.interval ?? 10) * 1000;
    this.#now = opts.now ?? (() => performance.now());
    this.#start = this.#now();
  }

  get done(): number {
    return this.#done;
  }

  /** The current line: "label 12/200 images  1.35 images/s  ETA 2m19s  detail". */
  line(): string {
    const elapsed = (this.#now() - this.#start) / 1000;
    const rate = elapsed > 0 ? this.#done / elapsed : 0;
    const left = this.#total - this.#done;
    const eta = this.#done > 0 && rate > 0 ? formatDuration(left / rate) : "?";
    const parts = [
      `${this.#label ? `${this.#label} ` : ""}${this.#done}/${this.#total} ${this.#unit}`,
      formatRate(rate, this.#unit),
      this.#done >= this.#total ? `took ${formatDuration(elapsed)}` : `ETA ${eta}`,
    ];
    if (this.#detail) parts.push(this.#detail);
    return parts.join("  ");
  }

  /** Sets the count of finished items and an optional detail (e.g. the current step). */
  update(done: number, detail = ""): void {
    this.#done = done;
    this.#detail = detail;
    this.#draw(false);
  }

  /** Adds finished items. */
  tick(n = 1, detail = ""): void {
    this.update(this.#done + n, detail);
  }

  /** Shows a message above the bar without breaking it. */
  log(message: string): void {
    if (this.#tty) this.#write(`\r\x1b[2K${message}\n`);
    else this.#write(`${message}\n`);
    if (this.#tty) this.#draw(true);
  }

  /** Draws the final state and ends the line. */
  finish(): void {
    if (this.#finished) return;
    this.#finished = true;
    this.#detail = "";
    if (this.#tty) this.#write(`\r\x1b[2K${this.line()}\n`);
    else this.#write(`${this.line()}\n`);
  }

  #draw(force: boolean): void {
    if (this.#finished) return;
    const now = this.#now();
    if (this.#tty) {
      // Redrawing more than ~10 times a second only costs terminal time.
      if (!force && now - this.#lastDraw < 100 && this.#done < this.#total) return;
      this.#lastDraw = now;
      this.#write(`\r\x1b[2K${this.line()}`);
      return;
    }
    // The final count is finish()'s line; printing it here too would repeat it in logs.
    if (!force && (now - this.#lastDraw < this.#interval || this.#done >= this.#total)) return;
    this.#lastDraw = now;
    this.#write(`${this.line()}\n`);
  }
}

/** "743 B", "12.3 kB", "3.44 GB": decimal units, as the Hugging Face Hub shows sizes. */
export function formatBytes(bytes: number): string {
  if (!Number.isFinite(bytes) || bytes < 0) return "?";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let value = bytes, unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit++;
  }
  if (unit === 0) return `${bytes} B`;
  return `${value.toFixed(value >= 100 ? 0 : value >= 10 ? 1 : 2)} ${units[unit]}`;
}

export interface ByteProgressOptions {
  /** Text before the counts, e.g. "download org/name unet/config.json". */
  label?: string;
  /** Redraw in place (default: whether stderr is a terminal). */
  tty?: boolean;
  /** Where lines go (default: stderr). */
  write?: (text: string) => void;
  /** Clock in milliseconds (tests). */
  now?: () => number;
  /** Not redrawing: a line each time this fraction of the total more is done (default 0.1). */
  fraction?: number;
  /** ...and at least this many bytes apart, so small files print their final line only. */
  minStepBytes?: number;
}

/**
 * Progress of one byte stream (a download): done / total, rate and time left. Off a terminal, a
 * line is printed each time the count passes the next step of bytes, whatever the clock and
 * however the bytes arrive in chunks: a log shows the same lines for the same file on every run.
 */
export class ByteProgress {
  readonly #total: number | null;
  readonly #start: number;
  readonly #label: string;
  readonly #tty: boolean;
  readonly #write: (text: string) => void;
  readonly #now: () => number;
  readonly #t0: number;
  readonly #step: number;
  #done: number;
  #nextLine: number;
  #lastDraw = -Infinity;
  #ended = false;

  /**
   * @param total the size in bytes, null when unknown
   * @param start bytes already there before this run (a resumed download): not counted in the rate
   */
  constructor(total: number | null, start = 0, opts: ByteProgressOptions = {}) {
    this.#total = total;
    this.#start = this.#done = start;
    this.#label = opts.label ?? "";
    this.#tty = opts.tty ?? Deno.stderr.isTerminal();
    this.#write = opts.write ?? writeStderr;
    this.#now = opts.now ?? (() => performance.now());
    this.#t0 = this.#now();
    const minStep = opts.minStepBytes ?? 64 * 1024 * 1024;
    const byFraction = total === null ? 0 : Math.ceil(total * (opts.fraction ?? 0.1));
    this.#step = Math.max(1, minStep, byFraction);
    this.#nextLine = (Math.floor(start / this.#step) + 1) * this.#step;
  }

  /** The line for `done` bytes: "label 120 MB/3.44 GB (3%)  47.8 MB/s  ETA 1m10s". */
  line(done = this.#done): string {
    const rate = this.#rate(done);
    const total = this.#total;
    const counts = total === null
      ? formatBytes(done)
      : `${formatBytes(done)}/${formatBytes(total)} (${Math.floor((done / total) * 100)}%)`;
    const eta = total !== null && rate > 0 ? `  ETA ${formatDuration((total - done) / rate)}` : "";
    return `${this.#label ? `${this.#label} ` : ""}${counts}  ${formatByteRate(rate)}${eta}`;
  }

  /** Sets the count of bytes done. */
  update(done: number): void {
    if (this.#ended) return;
    this.#done = done;
    if (this.#tty) {
      const now = this.#now();
      // Redrawing more than ~10 times a second only costs terminal time.
      if (now - this.#lastDraw < 100) return;
      this.#lastDraw = now;
      this.#write(`\r\x1b[2K${this.line()}`);
      return;
    }
    // One line per step passed, showing the step itself: a chunk that passes two steps prints
    // both, so the count of lines depends on the size only. The end is finish()'s line.
    const end = this.#total ?? Infinity;
    while (this.#nextLine <= done && this.#nextLine < end) {
      this.#write(`${this.line(this.#nextLine)}\n`);
      this.#nextLine += this.#step;
    }
  }

  /** The final line: "label 3.44 GB in 1m12s (47.8 MB/s)". */
  finish(): void {
    if (this.#ended) return;
    this.#ended = true;
    const seconds = (this.#now() - this.#t0) / 1000;
    const rate = formatByteRate(this.#rate(this.#done));
    const resumed = this.#start > 0 ? `, resumed at ${formatBytes(this.#start)}` : "";
    const text = `${this.#label ? `${this.#label} ` : ""}${formatBytes(this.#done)} in ` +
      `${formatDuration(seconds)} (${rate}${resumed})`;
    this.#write(this.#tty ? `\r\x1b[2K${text}\n` : `${text}\n`);
  }

  /** Ends the line without a summary (the download failed; its error follows on its own line). */
  abort(): void {
    if (this.#ended) return;
    this.#ended = true;
    if (this.#tty && this.#lastDraw > -Infinity) this.#write("\n");
  }

  #rate(done: number): number {
    const seconds = (this.#now() - this.#t0) / 1000;
    return seconds > 0 ? (done - this.#start) / seconds : 0;
  }
}

function formatByteRate(perSecond: number): string {
  return perSecond > 0 && Number.isFinite(perSecond) ? `${formatBytes(perSecond)}/s` : "- B/s";
}

export interface StepProgressOptions {
  /** Redraw in place (default: whether stderr is a terminal). */
  tty?: boolean;
  /** Where lines go (default: stderr). */
  write?: (text: string) => void;
  /** Clock in milliseconds (tests). */
  now?: () => number;
}

/**
 * Off a terminal, the steps after which a line is printed: every ceil(total / 10)th and the last,
 * so a log gets at most about ten lines per image whatever the step count.
 */
export function stepLineEvery(total: number): number {
  return Math.max(1, Math.ceil(total / 10));
}

/** "2.1 s/step", "0.034 s/step". */
function secondsPerStep(seconds: number): string {
  return `${seconds >= 1 ? seconds.toFixed(1) : seconds.toPrecision(2)} s/step`;
}

/**
 * Denoising-step progress of one image: on a terminal "step i/n" redrawn in place; elsewhere
 * "step 10/50, 2.1 s/step, ETA 1m24s" every `stepLineEvery(n)` steps and at the last.
 */
export class StepProgress {
  readonly #tty: boolean;
  readonly #write: (text: string) => void;
  readonly #now: () => number;
  readonly #t0: number;
  #drawn = false;

  constructor(opts: StepProgressOptions = {}) {
    this.#tty = opts.tty ?? Deno.stderr.isTerminal();
    this.#write = opts.write ?? writeStderr;
    this.#now = opts.now ?? (() => performance.now());
    this.#t0 = this.#now();
  }

  /** `done` of `total` steps are finished. */
  step(done: number, total: number): void {
    if (this.#tty) {
      this.#drawn = true;
      this.#write(`\rstep ${done}/${total}`);
      return;
    }
    if (done % stepLineEvery(total) !== 0 && done !== total) return;
    const perStep = (this.#now() - this.#t0) / 1000 / done;
    const tail = done === total
      ? `took ${formatDuration(perStep * done)}`
      : `ETA ${formatDuration(perStep * (total - done))}`;
    this.#write(`step ${done}/${total}, ${secondsPerStep(perStep)}, ${tail}\n`);
  }

  /** Ends the redrawn line. */
  finish(): void {
    if (this.#tty && this.#drawn) this.#write("\n");
    this.#drawn = false;
  }
}
