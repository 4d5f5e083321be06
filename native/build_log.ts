/**
 * What a failed CMake configure or build shows of its log. CMake explains itself in message
 * blocks: a heading ("CMake Error at FILE:LINE (message):") over indented lines that hold the
 * reason, so a filter on single lines would keep the heading and lose the reason. Those blocks are
 * kept whole. Compiler and linker errors are single lines; an error in a header gets the project
 * file that included it. make's "*** ... Error 1" echoes are noise.
 */

/** Lines worth showing when a build step failed; the log's tail when nothing matches. */
export function failureSummary(lines: string[], max = 40): string[] {
  const errors: string[] = [];
  const warnings: string[] = [];
  const seen = new Set<string>();
  const add = (to: string[], line: string) => {
    if (seen.has(line)) return;
    seen.add(line);
    to.push(line);
  };
  let includedFrom: string | null = null; // the outermost file of gcc's "In file included from"
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].trimEnd();
    const include = line.match(/^(?:In file included from|\s+from) (.+?)[:,]$/);
    if (include) {
      includedFrom = include[1];
      continue;
    }
    const heading = line.match(/^CMake (Error|Warning)\b(?! \(dev\))/);
    if (heading) {
      const message = cmakeMessage(lines, i);
      i = message.end - 1;
      const key = message.lines.join("\n");
      if (!seen.has(key)) {
        seen.add(key);
        (heading[1] === "Error" ? errors : warnings).push(...message.lines);
      }
    } else if (/^-- Could NOT find /.test(line)) {
      add(warnings, line);
    } else if (isToolError(line)) {
      if (!seen.has(line) && includedFrom) {
        add(errors, line);
        errors.push(`    (included from ${includedFrom})`);
      } else add(errors, line);
    }
    includedFrom = null;
  }
  // Warnings come first, in log order, and are dropped when there is no room for both: the reason
  // is nearly always in the errors.
  const shown = warnings.length + errors.length <= max ? [...warnings, ...errors] : errors;
  if (!shown.length) return lines.slice(-Math.min(max, 30)).map((l) => l.trimEnd());
  return shown.slice(0, max);
}

const INDENTED = /^\s+\S/;

/**
 * The CMake message whose heading is `lines[at]`: the heading (which names the file and line)
 * and its indented body. `end` is the index of the first line after it and its call stack.
 */
function cmakeMessage(lines: string[], at: number): { lines: string[]; end: number } {
  const out = [lines[at].trimEnd()];
  let i = at + 1;
  for (; i < lines.length; i++) {
    const line = lines[i].trimEnd();
    if (INDENTED.test(line)) out.push(line);
    else if (line === "" && INDENTED.test(lines[i + 1] ?? "")) out.push(line);
    else break;
  }
  if (/^Call Stack\b/.test(lines[i] ?? "")) {
    i++;
    while (i < lines.length && INDENTED.test(lines[i])) i++;
  }
  return { lines: out, end: i };
}

function isToolError(line: string): boolean {
  if (/^g?make(\[\d+\])?: \*\*\*/.test(line)) return false;
  return /(^|\s|:)(fatal )?error:|#error\b|undefined reference to|cannot find -l|collect2: error/
    .test(line);
}
