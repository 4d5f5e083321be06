"""Image preparation with torchvision on PIL, the reference side of bench/augment_bench.ts.

Usage: augment_bench.py PLAN_JSON   ({"files": [...]})

What a DataDream training loader does for one sample: open and decode the file, convert to RGB,
the spec's train transform (RandAugment(2, 9), RandomResizedCrop 224, flip, colour jitter,
grayscale, blur, solarize), ToTensor and Normalize; or the test transform (Resize 224 bicubic,
CenterCrop, ToTensor, Normalize). File i's train transform draws from torch.manual_seed(i), so
every round repeats the same decisions; they are recorded once (as TrainTransformParams records,
see test/reference/train_transforms_ref.py) for the TypeScript side to apply the same ones.

Answers one JSON request per stdin line with one JSON line on stdout (the first line, unasked,
is {"records": [...]}):
  {"op": "time", "kind": "train" | "test", "file": i}  ->  {"s": seconds for file i}
  {"op": "digest", "kind": ...}             ->  {"sha256": [hex digest of each file's float32
                                                 [3, 224, 224] output]}
  {"op": "pool", "kind": ..., "workers": n, "jobs": m}  ->  {"s": seconds for m samples
                                                 (file j % len(files), seed j) on a
                                                 multiprocessing pool of n processes (made and
                                                 warmed up by the first such request)}
"""
import hashlib
import json
import multiprocessing
import sys
import time

from cache import ensure_cache  # noqa: F401  (puts test/reference on sys.path)
import pure_torchvision  # noqa: E402,F401  (registers torchvision's pure-Python package)
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from PIL import Image  # noqa: E402
from train_transforms_ref import run_pipeline  # noqa: E402

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = T.InterpolationMode.BICUBIC
PROTOCOL = sys.stdout

TRANSFORMS = {
    "train": T.Compose([
        T.RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31),
        T.RandomResizedCrop(224, scale=(0.25, 1), interpolation=BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(0.2),
        T.RandomApply([T.GaussianBlur(kernel_size=23, sigma=(0.1, 2.0))], p=0.2),
        T.RandomSolarize(threshold=128, p=0.2),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ]),
    "test": T.Compose([
        T.Resize(224, interpolation=BICUBIC),
        T.CenterCrop(224),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ]),
}


def prepare(kind, path, seed):
    """One sample, as a loader worker makes it."""
    if kind == "train":
        torch.manual_seed(seed)
    return TRANSFORMS[kind](Image.open(path).convert("RGB"))


def timed(kind, files, i):
    t = time.perf_counter()
    prepare(kind, files[i], i)
    return time.perf_counter() - t


def pool_job(args):
    kind, path, seed = args
    prepare(kind, path, seed)


def single_thread():
    torch.set_num_threads(1)


POOLS = {}


def pooled(kind, files, workers, jobs):
    """Seconds for `jobs` samples on a pool of `workers` processes, kept for later requests (as
    a DataLoader keeps its workers between epochs) and warmed up when made."""
    work = [(kind, files[j % len(files)], j) for j in range(jobs)]
    if workers not in POOLS:
        POOLS[workers] = multiprocessing.get_context("fork").Pool(workers, initializer=single_thread)
        POOLS[workers].map(pool_job, work[: 4 * workers], chunksize=1)
    t = time.perf_counter()
    POOLS[workers].map(pool_job, work, chunksize=1)
    return time.perf_counter() - t


def main():
    plan = json.loads(sys.argv[1])
    files = plan["files"]
    sys.stdout = sys.stderr
    torch.set_num_threads(1)
    records = []
    for i, path in enumerate(files):
        _, rec = run_pipeline(Image.open(path).convert("RGB"), i, "default")
        records.append(rec)
    reply({"records": records})
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "time":
            reply({"s": timed(req["kind"], files, req["file"])})
        elif req["op"] == "digest":
            digests = []
            for i, path in enumerate(files):
                x = prepare(req["kind"], path, i).contiguous().numpy()
                digests.append(hashlib.sha256(x.tobytes()).hexdigest())
            reply({"sha256": digests})
        elif req["op"] == "pool":
            reply({"s": pooled(req["kind"], files, req["workers"], req["jobs"])})
        else:
            sys.exit(f"unknown request {line!r}")
    for pool in POOLS.values():
        pool.terminate()


def reply(obj):
    PROTOCOL.write(json.dumps(obj) + "\n")
    PROTOCOL.flush()


if __name__ == "__main__":
    main()
