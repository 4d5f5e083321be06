"""Augment fixtures: DIPSY's reference-image augmentation done by Pillow.

Usage: python test/reference/augment_ref.py OUTDIR

The official DIPSY code (manage.py, _augment_image) augments PIL images: transpose(FLIP_LEFT_RIGHT)
with p = 0.5; crop((x, y, x + s, y + s)) with s = min(W, H) for non-square images; rotate(angle)
with Pillow's defaults (NEAREST, expand=False, black fill; torchvision's F.rotate calls the same
method for PIL inputs); then a centre crop of side int(max(W, H) / 2 ** 0.5) at (W - side) // 2.
Here the random draws are replaced by recorded parameters, so the TypeScript port can be compared
byte for byte.

Writes
  OUTDIR/data.bin     every image, raw 8-bit RGB rows (HWC), one after another
  OUTDIR/cases.json   {"images": [...], "rotate": [...], "augment": [...]} where each entry has
                      "offset" and "length" into data.bin plus "width" and "height"; rotate cases
                      add "image" (input index) and "angle"; augment cases add "image", "flip",
                      "crop" ([x, y, side] or null) and "angle"
  OUTDIR/meta.json    library versions
"""

import json
import os
import sys

import numpy as np
import PIL
from PIL import Image


def augment(img, flip, crop, angle):
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if crop is not None:
        x, y, s = crop
        img = img.crop((x, y, x + s, y + s))
    img = img.rotate(angle, expand=False)
    width, height = img.size
    size = int(max(width, height) / (2**0.5))
    left = (width - size) // 2
    top = (height - size) // 2
    return img.crop((left, top, left + size, top + size))


def main(outdir):
    os.makedirs(outdir, exist_ok=True)
    rng = np.random.RandomState(1234)
    blob = bytearray()

    def put(img):
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        entry = {"offset": len(blob), "length": arr.size, "width": img.size[0], "height": img.size[1]}
        blob.extend(arr.tobytes())
        return entry

    sizes = [(37, 37), (64, 48), (48, 64), (50, 31), (17, 16), (100, 100), (33, 80), (16, 16),
             (1, 1), (2, 3), (120, 90)]
    images = []
    pil_images = []
    for w, h in sizes:
        arr = rng.randint(0, 256, size=(h, w, 3), dtype=np.uint8)
        img = Image.fromarray(arr, "RGB")
        pil_images.append(img)
        images.append(put(img))

    # Pillow's fast paths (0, 180, 90/270 when square), the pure-scaling path (an angle so small
    # that the rounded sine is 0), negative and large angles, and the U(-20, 20) range.
    special = [0.0, -0.0, 360.0, -360.0, 180.0, -180.0, 90.0, -90.0, 270.0, 450.0, 45.0, -45.0,
               20.0, -20.0, 1e-14, -1e-17, 179.99999999999997, 13.7, -7.25, 1000.5, 0.5, 30.0]
    rotate = []
    for i, img in enumerate(pil_images):
        angles = special + [float(a) for a in rng.uniform(-20, 20, size=6)]
        for angle in angles:
            entry = put(img.rotate(angle))
            entry.update({"image": i, "angle": angle})
            rotate.append(entry)

    augment_cases = []
    for i, img in enumerate(pil_images):
        w, h = img.size
        if min(w, h) < 2:
            continue  # the final crop would be empty
        for _ in range(8):
            flip = bool(rng.rand() < 0.5)
            crop = None
            if w != h:
                s = min(w, h)
                crop = [int(rng.randint(0, w - s + 1)), int(rng.randint(0, h - s + 1)), s]
            angle = float(rng.uniform(-20, 20))
            out = augment(img, flip, crop, angle)
            entry = put(out)
            entry.update({"image": i, "flip": flip, "crop": crop, "angle": angle})
            augment_cases.append(entry)

    with open(os.path.join(outdir, "data.bin"), "wb") as f:
        f.write(bytes(blob))
    with open(os.path.join(outdir, "cases.json"), "w") as f:
        json.dump({"images": images, "rotate": rotate, "augment": augment_cases}, f)
    with open(os.path.join(outdir, "meta.json"), "w") as f:
        json.dump({"pillow": PIL.__version__, "numpy": np.__version__}, f)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: augment_ref.py OUTDIR")
    main(sys.argv[1])
