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
