/** `dipsy report PATH`: the figures and the self-contained report.html of a dipsy output. */
import { CliError, type Command, parseFlags } from "./command.ts";

const USAGE = `usage: deno task dipsy report PATH [--out DIR] [--data DIR]

Writes PATH/report.html and its figures (SVG and PNG), thumbnails and contact sheets in
PATH/report/, for the output of \`generate\`, of \`train\`/\`eval\`, of \`run\` or of \`sweep\`.
The page works offline and from a copied folder (relative links only, nothing fetched).
Missing or corrupt inputs are listed (here and on the page) and the rest is still drawn.

options:
  --out DIR             write report.html and report/ into DIR instead of PATH
  --data DIR            the few-shot class folders, when the run does not record where the
                        reference images are (needed for their thumbnails)
  -h, --help            this help`;

const FLAGS = {
  help: { type: "boolean", short: "h" },
  out: { type: "string" },
  data: { type: "string" },
} as const;

export const command: Command = {
  usage: USAGE,
  flags: FLAGS,
  async run(args) {
    const path = args[0] !== undefined && !args[0].startsWith("-") ? args[0] : undefined;
    const values = parseFlags(path === undefined ? args : args.slice(1), FLAGS);
    if (values.help) {
      console.log(USAGE);
      return 0;
    }
    if (path === undefined) throw new CliError("give the folder to report on: report PATH");
    const { writeReport } = await import("../report/mod.ts");
    const result = await writeReport(path, {
      out: values.out,
      data: values.data,
      log: (line) => console.error(line),
    });
    console.log(`report: ${result.html}`);
    if (result.problems.length) {
      console.log(`${result.problems.length} problem(s):`);
      for (const p of result.problems) console.log(`  ${p}`);
    }
    return 0;
  },
};
