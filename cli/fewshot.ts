/** `dipsy fewshot`: nested k-shot splits of a full training set, for several seeds. */
import { CliError, defineCommand } from "./command.ts";

/** The shot counts and split seeds drawn when not given: DataDream's. */
const SHOTS = [1, 2, 4, 8, 16], SEEDS = [0, 1, 2];

export const command = defineCommand({
  synopsis: "fewshot --from DIR|LIST --out DIR --dataset NAME [options]",
  about:
    `Draws nested few-shot sets from a full training set and writes them in the layout generate and
the official DIPSY code read:
  OUT/NAME/real_train_fewshot/seed<N>/<class>/<rank>_<file>
Each class gets as many images as the largest shot count, ranked 000, 001, ... in a seeded
random order; the k-shot set of a seed is its first k ranks, so every smaller set is a subset
of every larger one. \`--shots k\` of similarity, generate, train and run reads it.
OUT/NAME/real_train_fewshot/seed<N>/fewshot.json records the source file and sha256 of each.
Deterministic: the same command writes the same files, and finds a finished seed up to date.`,
  sections: {
    "options:": {
      from: {
        value: "DIR|LIST",
        help: "the full training set: DIR/<class>/*, or a list file with one image per line, " +
          '"path<TAB>class" or "path" (the class is its parent folder), paths relative to the ' +
          "list file",
      },
      out: { value: "DIR", help: "output root" },
      dataset: { value: "NAME", help: "the dataset folder name (e.g. pets, fgvc_aircraft)" },
      shots: { value: "L", help: "shot counts; classes need the largest", default: SHOTS },
      seeds: { value: "L", help: "split seeds", default: SEEDS },
      "skip-bad": {
        help: "pass over unreadable or broken images (the next drawn takes the rank)",
      },
      force: { help: "replace seed folders that hold another split" },
    },
  },
  async run(values) {
    if (!values.from || !values.out || !values.dataset) {
      throw new CliError("--from, --out and --dataset are required (see --help)");
    }
    const { parseCounts, writeFewshot } = await import("../core/fewshot.ts");
    const shots = parseCounts(values.shots ?? SHOTS.join(","), "--shots");
    const seeds = parseCounts(values.seeds ?? SEEDS.join(","), "--seeds", 0);
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
});
