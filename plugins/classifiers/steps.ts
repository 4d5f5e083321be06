/**
 * The per-step training history, steps.jsonl in a run folder: one JSON line per optimizer step,
 * appended an epoch at a time just before the epoch's checkpoint. Kept apart from the trainer so
 * that readers (the report) need no tensor library.
 */
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";

export const STEP_HISTORY = "steps.jsonl";

/** One optimizer step in steps.jsonl. */
export interface StepRecord {
  /** The step over the whole run, from 1. */
  step: number;
  /** Its epoch, from 1. */
  epoch: number;
  /** The batch loss. */
  loss: number;
  /** The step's learning rate. */
  lr: number;
  /** Images of the batch over the seconds since the previous step (the only timing figure). */
  imagesPerSecond: number;
  /** Whether loss scaling skipped the update (inf/NaN gradients). */
  skipped: boolean;
}

function isStepRecord(v: unknown): v is StepRecord {
  const r = v as StepRecord;
  return r !== null && typeof r === "object" && Number.isInteger(r.step) &&
    Number.isInteger(r.epoch) && typeof r.loss === "number" && typeof r.lr === "number";
}

/** The steps recorded in a run folder, in order; a line that is not a step record is left out. */
export function readStepHistory(out: string): StepRecord[] {
  const path = join(out, STEP_HISTORY);
  if (!existsSync(path)) return [];
  return readFileSync(path, "utf8").split("\n").flatMap((line) => {
    if (!line.trim()) return [];
    try {
      const v = JSON.parse(line);
      return isStepRecord(v) ? [v] : [];
    } catch {
      return [];
    }
  });
}
