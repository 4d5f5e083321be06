"""Image preparation with torchvision on PIL, the reference side of bench/augment_bench.ts.

Usage: augment_bench.py PLAN_JSON   ({"files": [...], "rounds": n})

Times, per image and on one thread, what a DataDream training loader does for one sample: open and
decode the file, convert to RGB, the spec's train transform (RandAugment(2, 9), RandomResizedCrop
224, flip, colour jitter, grayscale, blur, solarize), ToTensor and Normalize; and the test
transform (Resize 224 bicubic, CenterCrop, ToTensor, Normalize). Prints {"train": s, "test": s},
each the best round's mean.
"""
import json
import sys
import time

from cache import ensure_cache  # noqa: F401  (puts test/reference on sys.path)
import pure_torchvision  # noqa: E402,F401  (registers torchvision's pure-Python package)
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from PIL import Image  # noqa: E402

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = T.InterpolationMode.BICUBIC


def main():
    plan = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train = T.Compose([
        T.RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31),
        T.RandomResizedCrop(224, scale=(0.25, 1), interpolation=BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(0.2),
        T.RandomApply([T.GaussianBlur(kernel_size=23, sigma=(0.1, 2.0))], p=0.2),
        T.RandomSolarize(threshold=128, p=0.2),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])
    test = T.Compose([
        T.Resize(224, interpolation=BICUBIC),
        T.CenterCrop(224),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])
    out = {}
    for name, transform in (("train", train), ("test", test)):
        best = float("inf")
        for _ in range(plan["rounds"]):
            t = time.perf_counter()
            for path in plan["files"]:
                transform(Image.open(path).convert("RGB"))
            best = min(best, (time.perf_counter() - t) / len(plan["files"]))
        out[name] = best
    print(json.dumps(out))


if __name__ == "__main__":
    main()
