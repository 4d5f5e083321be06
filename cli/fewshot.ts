/** `dipsy fewshot`: nested k-shot splits of a full training set, for several seeds. */
import { CliError, type Command, parseFlags } from "./command.ts";

const USAGE = `usage: deno task dipsy fewshot --from DIR|LIST --out DIR --dataset NAME [options]

Draws nested few-shot sets from a full training set and writes them in the layout generate and
the official DIPSY code read:
  OUT/NAME/real_train_fewshot/seed<N>/<class>/<rank>_<file>
Each class gets as many images as the largest shot count, ranked 000, 001, ... in a seeded
random order; the k-shot set of a seed is its first k ranks, so every smaller set is a subset
of every larger one. \`--shots k\` of similarity, generate, train and run reads it.
OUT/NAME/real_train_fewshot/seed<N>/fewshot.json records the source file and sha256 of each.
Deterministic: the same command writes the same files, and finds a finished seed up to date.

options:
  --from DIR|LIST      the full training set: DIR/<class>/*, or a list file with one image
                       per line, "path<TAB>class" or "path" (the class is its parent folder),
                       paths relative to the list file
  --out DIR            output root
  --dataset NAME       the dataset folder name (e.g. pets, fgvc_aircraft)
  --shots L            shot counts (default 1,2,4,8,16); classes need the largest
  --seeds L            split seeds (default 0,1,2)
  --skip-bad           pass over unreadable or broken images (the next drawn takes the rank)
  --force              replace seed folders that hold another split`;

const FLAGS = {
  help: { type: "boolean", short: "h" },
  from: { type: "string" },
  out: { type: "string" },
  dataset: { type: "string" },
  shots: { type: "string" },
  seeds: { type: "string" },
  "skip-bad": { type: "boolean" },
  force: { type: "boolean" },
} as const;

export const command: Command = {
  summary: "draw nested k-shot splits of a training set (seeded, recorded)",
  usage: USAGE,
  flags: FLAGS,
  async run(args) {
    const values = parseFlags(args, FLAGS);
    if (values.help) {
      console.log(USAGE);
      return 0;
    }
    if (!values.from || !values.out || !values.dataset) {
      throw new CliError("--from, --out and --dataset are required (see --help)");
    }
    const { parseCounts, writeFewshot } = await import("../core/fewshot.ts");
    const shots = parseCounts(values.shots ?? "1,2,4,8,16", "--shots");
    const seeds = parseCounts(values.seeds ?? "0,1,2", "--seeds", 0);
    const results = await writeFewshot({
      source: values.from,
      out: values.out,
      dataset: values.dataset,
      shots,
      seeds,
      skipBad: values["skip-bad"] ?? false,
      force: values.force ?? false,
      log: (line) => console.error(line),
    });
    for (const r of results) console.log(`seed ${r.seed}: ${r.status}  ${r.dir}`);
    console.log(`shots ${shots.join(", ")}: the first k ranks of each class (--shots k)`);
    return 0;
  },
};
