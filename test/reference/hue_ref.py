"""Hue fixtures: torchvision's adjust_hue on PIL for every one of the 2^24 RGB colours.

Usage: python test/reference/hue_ref.py OUTDIR

adjust_hue on a PIL image converts to Pillow's 8-bit HSV, shifts the hue byte, and converts back,
in float32 / double arithmetic that plugins/classifiers/pil_ops.ts reproduces through tables. The
input is a 4096 x 4096 image holding each colour once: pixel (x, y) is r = y >> 4,
g = (y & 15) << 4 | x >> 8, b = x & 255. Its outputs (48 MiB each) are kept as one SHA-256 per
row, so a mismatch is located to its row (16 r, g values, all b) without storing the images.

Writes
  OUTDIR/cases.json   {"side": 4096, "cases": [{"factor": f, "rows": [hex digest per row]}]}
  OUTDIR/meta.json    library versions
"""

import hashlib
import json
import os
import sys

import pure_torchvision  # registers torchvision's pure-Python package; must come first
import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torchvision.transforms.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

SIDE = 4096
# 0: the lossy round trip alone; the extremes; small shifts either way, as ColorJitter draws.
FACTORS = [0.0, -0.5, 0.5, 0.1, -0.07]


def every_colour():
    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.uint32)
    rgb = np.stack([y >> 4, ((y & 15) << 4) | (x >> 8), x & 255], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def main(outdir):
    os.makedirs(outdir, exist_ok=True)
    img = every_colour()
    cases = []
    for f in FACTORS:
        out = np.asarray(F.adjust_hue(img, f))
        rows = [hashlib.sha256(out[y].tobytes()).hexdigest() for y in range(SIDE)]
        cases.append({"factor": f, "rows": rows})
    with open(os.path.join(outdir, "cases.json"), "w") as fh:
        json.dump({"side": SIDE, "cases": cases}, fh)
    with open(os.path.join(outdir, "meta.json"), "w") as fh:
        json.dump({"pillow": PIL.__version__, "numpy": np.__version__,
                   "torchvision": pure_torchvision.TORCHVISION}, fh)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: hue_ref.py OUTDIR")
    main(sys.argv[1])
