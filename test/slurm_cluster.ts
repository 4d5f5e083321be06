/**
 * A throwaway one-node Slurm cluster for the tests, started as root in a temporary folder: a
 * munged with a fresh key and its own socket, slurmctld and slurmd on free private ports, with
 * their own spool and state folders, the machine's short host name as the node. No cgroups
 * (proctrack/linuxproc, task/none), so it runs inside a container; four stand-in GPUs (standard
 * character devices that nothing opens, since no cgroup confines devices) let job scripts ask
 * for GPUs as they would on a real cluster, and set CUDA_VISIBLE_DEVICES.
 */
import { existsSync, readFileSync } from "node:fs";
import { delimiter, join } from "node:path";
import { type JobRecord, showJob, slurmCommand } from "../cli/slurm.ts";

const DAEMONS = ["munged", "slurmctld", "slurmd"];
const CLIENTS = ["sbatch", "scontrol", "scancel", "squeue", "sinfo"];

/** Where `name` is on PATH (or in /usr/sbin, often left off a user's PATH), or null. */
function which(name: string): string | null {
  const dirs = [...(Deno.env.get("PATH") ?? "").split(delimiter), "/usr/sbin", "/sbin"];
  for (const dir of dirs) {
    const path = join(dir, name);
    try {
      if (Deno.statSync(path).isFile) return path;
    } catch { /* not here */ }
  }
  return null;
}

/** Why the cluster cannot be started here, or null when it can. */
export function clusterUnavailable(): string | null {
  const missing = [...DAEMONS, ...CLIENTS].filter((c) => !which(c));
  if (missing.length) {
    return `Slurm is not installed (no ${missing.join(", ")}; ` +
      "apt-get install slurm-wlm munge, as .ci/run does)";
  }
  if (Deno.uid() !== 0) return "the throwaway cluster runs its daemons as root";
  return null;
}

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr as Deno.NetAddr;
  listener.close();
  return port;
}

function pidIn(file: string): number | null {
  try {
    const pid = Number(readFileSync(file, "utf8").trim());
    return Number.isInteger(pid) && pid > 0 ? pid : null;
  } catch {
    return null;
  }
}

const alive = (pid: number) => existsSync(`/proc/${pid}`);

async function sleep(ms: number): Promise<void> {
  await new Promise((r) => setTimeout(r, ms));
}

export interface Cluster {
  dir: string;
  node: string;
  /** SLURM_CONF for the Slurm commands and the jobs, with anything the caller adds. */
  env: Record<string, string>;
  /** A Slurm client command against this cluster; its stdout. */
  run(command: string, args: string[]): Promise<string>;
  /** `sbatch --parsable ...`: the job id. */
  sbatch(args: string[], env?: Record<string, string>): Promise<string>;
  /** What `scontrol show job` says of a job or array. */
  jobs(id: string): Promise<JobRecord[]>;
  /**
   * Waits until `test` holds of the job's records, polling Slurm (its state is the event
   * awaited); fails after `seconds` with the records and `what`.
   */
  waitFor(
    id: string,
    what: string,
    test: (records: JobRecord[]) => boolean,
    seconds?: number,
  ): Promise<JobRecord[]>;
  /** Cancels every job, stops every daemon it started and removes its folder. */
  stop(): Promise<void>;
}

/** Starts the cluster and waits until its node is idle. */
export async function startCluster(): Promise<Cluster> {
  const dir = await Deno.makeTempDir({ prefix: "dipsy-slurm-" });
  // munged refuses a socket whose folders others cannot traverse.
  await Deno.chmod(dir, 0o755);
  const path = (...p: string[]) => join(dir, ...p);
  for (const d of ["munge", "state", "spool", "log"]) await Deno.mkdir(path(d), { mode: 0o700 });
  await Deno.mkdir(path("socket"), { mode: 0o755 });
  const node = Deno.hostname().split(".")[0];
  const conf = path("slurm.conf");
  const env = { SLURM_CONF: conf };
  const pidFiles = [
    path("munge", "munged.pid"),
    path("log", "slurmctld.pid"),
    path("log", "slurmd.pid"),
  ];
  let started = false;

  const run = (command: string, args: string[]) => slurmCommand(command, args, env);
  const cluster: Cluster = {
    dir,
    node,
    env,
    run,
    async sbatch(args, extra) {
      const out = await slurmCommand("sbatch", ["--parsable", ...args], { ...env, ...extra });
      return out.trim().split(";")[0];
    },
    jobs: (id) => showJob(id, env),
    async waitFor(id, what, test, seconds = 60) {
      const until = Date.now() + seconds * 1000;
      let records: JobRecord[] = [];
      while (Date.now() < until) {
        records = await showJob(id, env);
        if (test(records)) return records;
        await sleep(200);
      }
      const seen = records.map((r) => `${r.jobId} [${r.tasks}] ${r.state} (${r.reason})`);
      throw new Error(`job ${id}: not ${what} after ${seconds} s; Slurm says: ${seen.join("; ")}`);
    },
    async stop() {
      if (started) {
        // Jobs first: their steps outlive slurmd, and a held one would outlive the test.
        try {
          const ids = (await run("squeue", ["-h", "-o", "%A"])).split("\n").filter((l) => l);
          if (ids.length) await run("scancel", [...new Set(ids)]);
          const until = Date.now() + 30_000;
          while (Date.now() < until && (await run("squeue", ["-h", "-o", "%A"])).trim()) {
            await sleep(200);
          }
          await run("scontrol", ["shutdown"]);
        } catch { /* the pid files below stop what is left */ }
      }
      for (const file of pidFiles.toReversed()) {
        const pid = pidIn(file);
        if (pid === null) continue;
        const until = Date.now() + 15_000;
        for (const signal of ["SIGTERM", "SIGKILL"] as const) {
          if (!alive(pid)) break;
          try {
            Deno.kill(pid, signal);
          } catch { /* gone */ }
          while (alive(pid) && Date.now() < until) await sleep(100);
        }
      }
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
  };

  try {
    const key = crypto.getRandomValues(new Uint8Array(1024));
    await Deno.writeFile(path("munge", "munge.key"), key, { mode: 0o400 });
    const socket = path("socket", "munge.socket");
    await daemon("munged", [
      `--socket=${socket}`,
      `--key-file=${path("munge", "munge.key")}`,
      `--pid-file=${pidFiles[0]}`,
      `--log-file=${path("munge", "munged.log")}`,
      `--seed-file=${path("munge", "munged.seed")}`,
    ], path("munge", "munged.log"));

    const gpus = ["/dev/null", "/dev/zero", "/dev/full", "/dev/urandom"];
    await Deno.writeTextFile(
      path("gres.conf"),
      gpus.map((file) => `NodeName=${node} Name=gpu File=${file}\n`).join(""),
    );
    await Deno.writeTextFile(
      conf,
      [
        "ClusterName=dipsytest",
        `SlurmctldHost=${node}(127.0.0.1)`,
        `SlurmctldPort=${freePort()}`,
        `SlurmdPort=${freePort()}`,
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        // cred_expire also sets how long a requeued job waits before it may start again.
        `AuthInfo=socket=${socket},cred_expire=10`,
        `StateSaveLocation=${path("state")}`,
        `SlurmdSpoolDir=${path("spool")}`,
        `SlurmctldPidFile=${pidFiles[1]}`,
        `SlurmdPidFile=${pidFiles[2]}`,
        `SlurmctldLogFile=${path("log", "slurmctld.log")}`,
        `SlurmdLogFile=${path("log", "slurmd.log")}`,
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "MailProg=/bin/true",
        "ReturnToService=2",
        "GresTypes=gpu",
        // The node may declare more CPUs than the machine has: the jobs are small.
        "SlurmdParameters=config_overrides",
        `NodeName=${node} NodeAddr=127.0.0.1 CPUs=16 Gres=gpu:${gpus.length} State=UNKNOWN`,
        `PartitionName=test Nodes=${node} Default=YES MaxTime=INFINITE State=UP`,
        "",
      ].join("\n"),
    );
    started = true;
    await daemon("slurmctld", ["-i"], path("log", "slurmctld.log"), env);
    await daemon("slurmd", [], path("log", "slurmd.log"), env);
    const until = Date.now() + 60_000;
    let state = "";
    while (Date.now() < until) {
      state = (await run("sinfo", ["-h", "-N", "-o", "%T"]).catch(() => "")).trim();
      if (state === "idle") return cluster;
      await sleep(200);
    }
    throw new Error(`the node did not become idle (state "${state}"); logs in ${path("log")}`);
  } catch (e) {
    await cluster.stop();
    throw e;
  }
}

/** Starts a daemon (it forks into the background); on failure, the end of its log. */
async function daemon(
  command: string,
  args: string[],
  log: string,
  env?: Record<string, string>,
): Promise<void> {
  const result = await new Deno.Command(which(command) ?? command, {
    args,
    env,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).output();
  if (!result.success) {
    const tail = existsSync(log) ? readFileSync(log, "utf8").split("\n").slice(-5).join("\n") : "";
    throw new Error(
      `${command} did not start: ${new TextDecoder().decode(result.stderr).trim()}\n${tail}`,
    );
  }
}
