"""Train-transform fixtures: the classifier's DataDream augmentations done by torchvision on PIL.

Usage: python test/reference/train_transforms_ref.py OUTDIR

plugins/classifiers/transforms.ts reproduces torchvision's PIL code paths (Pillow's ImageEnhance,
ImageOps, convert and affine engines, and the tensor path of gaussian_blur) byte for byte. These
fixtures apply torchvision's own functional ops with fixed parameters, one op at a time, and run the
real transform classes (RandAugment, RandomResizedCrop, ..., in the spec's order) with torch's RNG
while recording every decision they make, so that the TypeScript side can replay the record.

torchvision's transforms come from pure_torchvision.py (see there why it is not installed).

Writes
  OUTDIR/data.bin     every image, raw 8-bit RGB rows (HWC), one after another
  OUTDIR/cases.json   {"images": [...], "ops": [...], "space": [...], "chains": [...]};
                      images and op outputs have "offset", "length", "width", "height" into
                      data.bin; ops add "image" (input index), "op" and "args"; space entries are
                      {"height", "width", "bins", "magnitudes": {op: [float, ...]}, "signed": {op:
                      bool}}; chains add "image", "params" (a TrainTransformParams record) and
                      "config", and for a few "normalized" ({"offset", "length"} in floats
                      into normalized.bin)
  OUTDIR/normalized.bin  float32 little-endian: ToTensor() + Normalize(CLIP mean, std) of those
                      chain outputs, [3, H, W] each
  OUTDIR/meta.json    library versions
"""

import json
import os
import sys

import pure_torchvision  # registers torchvision's pure-Python package; must come first
import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
import torchvision.transforms.autoaugment as AA  # noqa: E402
import torchvision.transforms.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.transforms import InterpolationMode, RandAugment  # noqa: E402

NEAREST = InterpolationMode.NEAREST
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = InterpolationMode.BICUBIC


def main(outdir):
    os.makedirs(outdir, exist_ok=True)
    rng = np.random.RandomState(4321)
    blob = bytearray()

    def put(img):
        assert img.mode == "RGB", img.mode
        arr = np.asarray(img, dtype=np.uint8)
        entry = {"offset": len(blob), "length": arr.size, "width": img.size[0], "height": img.size[1]}
        blob.extend(arr.tobytes())
        return entry

    def noise(w, h):
        return Image.fromarray(rng.randint(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")

    def gradient(w, h):
        # Smooth colour ramps with a little noise: most pixels have distinct hues and saturations,
        # and neighbours differ by a few levels (where blur and sharpness rounding is decided).
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        r = 255 * x / max(w - 1, 1)
        g = 255 * y / max(h - 1, 1)
        b = 127.5 + 127.5 * np.sin((x + 2 * y) / 7.0)
        arr = np.stack([r, g, b], axis=-1) + rng.uniform(-3, 3, size=(h, w, 3))
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "RGB")

    def narrow(w, h):
        # A low-contrast image (levels 60..139): autocontrast and equalize have work to do.
        return Image.fromarray(rng.randint(60, 140, size=(h, w, 3), dtype=np.uint8), "RGB")

    pil = [
        noise(37, 29),
        gradient(64, 48),
        gradient(48, 64),
        noise(50, 31),
        gradient(33, 80),
        narrow(40, 40),
        Image.new("RGB", (16, 13), (90, 200, 30)),  # flat: the "nothing to do" paths
        noise(2, 3),  # smaller than the 3x3 smoothing kernel
        noise(3, 3),
        gradient(301, 203),  # chain input larger than the crop
    ]
    images = [put(img) for img in pil]
    tiny = {7, 8}
    chain_only = {9}

    ops = []

    def case(op, i, out, **args):
        entry = put(out)
        entry.update({"op": op, "image": i, "args": args})
        ops.append(entry)

    factors = [0.0, 0.1, 0.37, 0.6, 1.0, 1.1, 1.4, 1.9, 2.5]
    for i, img in enumerate(pil):
        if i in chain_only:
            continue
        for f in factors:
            case("brightness", i, F.adjust_brightness(img, f), factor=f)
            case("contrast", i, F.adjust_contrast(img, f), factor=f)
            case("saturation", i, F.adjust_saturation(img, f), factor=f)
        for f in [0.0, 0.1, 0.5, 1.0, 1.4, 1.9, 3.0]:
            case("sharpness", i, F.adjust_sharpness(img, f), factor=f)
        for f in [-0.5, -0.37, -0.1, -0.05, -0.003, 0.0, 0.002, 0.05, 0.1, 0.25, 0.5]:
            case("hue", i, F.adjust_hue(img, f), factor=f)
        case("grayscale", i, F.rgb_to_grayscale(img, 3))
        for t in [0, 1, 127.99, 128, 178.5, 255, 256]:
            case("solarize", i, F.solarize(img, t), threshold=t)
        for bits in range(1, 9):
            case("posterize", i, F.posterize(img, bits), bits=bits)
        case("autocontrast", i, F.autocontrast(img))
        case("equalize", i, F.equalize(img))
        case("hflip", i, F.hflip(img))

        w, h = img.size
        # F.affine on PIL with its default centre (the image centre), and with RandAugment's
        # shear centre (0, 0).
        affines = [
            dict(angle=0.0, translate=[3, 0], scale=1.0, shear=[0.0, 0.0]),
            dict(angle=0.0, translate=[0, -5], scale=1.0, shear=[0.0, 0.0]),
            dict(angle=0.0, translate=[0, 0], scale=1.0, shear=[16.7, 0.0], center=[0, 0]),
            dict(angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, -5.1], center=[0, 0]),
            dict(angle=12.5, translate=[2, -1], scale=1.0, shear=[4.0, -3.0]),
            dict(angle=-30.0, translate=[0, 0], scale=1.3, shear=[0.0, 0.0]),
            dict(angle=90.0, translate=[1, 1], scale=0.8, shear=[10.0, 0.0], center=[3, 5]),
        ]
        for a in affines:
            out = F.affine(img, interpolation=NEAREST, **a)
            case("affine", i, out, **a)
        for angle in [0.0, 9.0, -9.0, 30.0, -27.5, 90.0, 180.0]:
            case("rotate", i, F.rotate(img, angle, interpolation=NEAREST), angle=angle)

        # Every RandAugment op through its own dispatch (_apply_op) at magnitude 9 of 31 bins, and
        # at a few other bins, both signs where signed.
        space = RandAugment()._augmentation_space(31, (h, w))
        for name, (mags, signed) in space.items():
            bins = [9] if mags.ndim == 0 else [0, 9, 17, 30]
            for b in bins:
                m = float(mags[b].item()) if mags.ndim > 0 else 0.0
                for sign in ([1.0, -1.0] if signed else [1.0]):
                    out = AA._apply_op(img, name, sign * m, interpolation=NEAREST, fill=None)
                    case("randaugment", i, out, name=name, magnitude=sign * m)

        if i in tiny:
            continue
        for sigma in [0.1, 0.5, 1.0, 1.7, 2.0]:
            case("blur", i, F.gaussian_blur(img, [23, 23], [sigma, sigma]), kernel=23, sigma=sigma)
        for k, sigma in [(3, 0.8), (5, 1.3), (9, 0.35)]:
            case("blur", i, F.gaussian_blur(img, [k, k], [sigma, sigma]), kernel=k, sigma=sigma)
        # Pillow 13 picks the order of its two resampling passes from the sizes: boxes that
        # lose more than twice as many rows as columns, and narrow boxes widened while losing
        # rows, take the vertical pass first.
        boxes = [(0, 0, h, w, 32), (1, 2, h - 3, w - 5, 24), (h // 3, w // 4, h // 2, w // 2, 40),
                 (0, 0, h, w, w), (0, 1, h, w // 4, h // 2), (2, 0, h - 2, w, (w + h) // 3)]
        for top, left, ch, cw, size in boxes:
            out = F.resized_crop(img, top, left, ch, cw, [size, size], BICUBIC)
            case("resizedCrop", i, out, top=top, left=left, height=ch, width=cw, size=size)

    spaces = []
    for h, w in [(29, 37), (48, 64), (64, 48), (224, 224), (203, 301), (1, 1), (375, 500), (333, 1000)]:
        for bins in [31, 10]:
            sp = RandAugment()._augmentation_space(bins, (h, w))
            spaces.append({
                "height": h,
                "width": w,
                "bins": bins,
                "magnitudes": {k: [float(x) for x in (v.reshape(-1).tolist())] for k, (v, _) in sp.items()},
                "signed": {k: s for k, (_, s) in sp.items()},
            })

    chains = []
    floats = []
    normalize = T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    for seed in range(14):
        config = "datadream" if seed < 10 else "always"
        i = [9, 1, 3, 4, 2][seed % 5]
        out, params = run_pipeline(pil[i], seed, config)
        entry = put(out)
        entry.update({"image": i, "params": params, "config": config})
        if seed < 3:
            x = normalize(out).numpy().astype(np.float32).reshape(-1)
            entry["normalized"] = {"offset": sum(len(f) for f in floats), "length": int(x.size)}
            floats.append(x)
        chains.append(entry)

    with open(os.path.join(outdir, "data.bin"), "wb") as f:
        f.write(bytes(blob))
    with open(os.path.join(outdir, "normalized.bin"), "wb") as f:
        f.write(np.concatenate(floats).astype("<f4").tobytes())
    with open(os.path.join(outdir, "cases.json"), "w") as f:
        json.dump({"images": images, "ops": ops, "space": spaces, "chains": chains}, f)
    with open(os.path.join(outdir, "meta.json"), "w") as f:
        json.dump({"pillow": PIL.__version__, "numpy": np.__version__, "torch": torch.__version__,
                   "torchvision": pure_torchvision.TORCHVISION}, f)


JITTER_NAMES = ["brightness", "contrast", "saturation", "hue"]


def run_pipeline(img, seed, config):
    """The spec's train transform (minus ToTensor/Normalize) with torchvision's own classes and
    torch's RNG, recording each decision as a TrainTransformParams record. "always" sets every
    probability to 1 (grayscale to 0.5) so the later steps are exercised together."""
    p = {"flip": 0.5, "jitter": 0.8, "gray": 0.2, "blur": 0.2, "solarize": 0.2}
    if config == "always":
        p = {"flip": 1.0, "jitter": 1.0, "gray": 0.5, "blur": 1.0, "solarize": 1.0}
    pipeline = T.Compose([
        RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31),
        T.RandomResizedCrop(224, scale=(0.25, 1), interpolation=BICUBIC),
        T.RandomHorizontalFlip(p["flip"]),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=p["jitter"]),
        T.RandomGrayscale(p["gray"]),
        T.RandomApply([T.GaussianBlur(kernel_size=23, sigma=(0.1, 2.0))], p=p["blur"]),
        T.RandomSolarize(threshold=128, p=p["solarize"]),
    ])
    rec = {"size": 224, "randAugment": [], "crop": None, "flip": False, "jitter": None,
           "grayscale": False, "blur": None, "solarize": None}
    inside_op = [False]

    # Wrap the functions the classes call at run time (module attributes, looked up per call).
    orig_apply_op = AA._apply_op
    orig_rrc = T.RandomResizedCrop.get_params
    orig_cj = T.ColorJitter.get_params
    orig_gb = T.GaussianBlur.get_params
    orig_hflip = F.hflip
    orig_gray = F.rgb_to_grayscale
    orig_solarize = F.solarize

    def apply_op(img, op_name, magnitude, interpolation, fill):
        rec["randAugment"].append({"op": op_name, "magnitude": magnitude})
        inside_op[0] = True
        try:
            return orig_apply_op(img, op_name, magnitude, interpolation, fill)
        finally:
            inside_op[0] = False

    def rrc(img, scale, ratio):
        i, j, h, w = orig_rrc(img, scale, ratio)
        rec["crop"] = {"top": int(i), "left": int(j), "height": int(h), "width": int(w)}
        return i, j, h, w

    def cj(b, c, s, h):
        fn_idx, *factors = orig_cj(b, c, s, h)
        rec["jitter"] = [{"op": JITTER_NAMES[k], "factor": factors[k]} for k in fn_idx.tolist()
                         if factors[k] is not None]
        return (fn_idx, *factors)

    def gb(lo, hi):
        sigma = orig_gb(lo, hi)
        rec["blur"] = {"kernel": 23, "sigma": sigma}
        return sigma

    def hflip(img):
        rec["flip"] = True
        return orig_hflip(img)

    def gray(img, num_output_channels=1):
        rec["grayscale"] = True
        return orig_gray(img, num_output_channels)

    def solarize(img, threshold):
        if not inside_op[0]:
            rec["solarize"] = {"threshold": threshold}
        return orig_solarize(img, threshold)

    AA._apply_op = apply_op
    T.RandomResizedCrop.get_params = staticmethod(rrc)
    T.ColorJitter.get_params = staticmethod(cj)
    T.GaussianBlur.get_params = staticmethod(gb)
    F.hflip = hflip
    F.rgb_to_grayscale = gray
    F.solarize = solarize
    try:
        torch.manual_seed(seed)
        out = pipeline(img)
    finally:
        AA._apply_op = orig_apply_op
        T.RandomResizedCrop.get_params = staticmethod(orig_rrc)
        T.ColorJitter.get_params = staticmethod(orig_cj)
        T.GaussianBlur.get_params = staticmethod(orig_gb)
        F.hflip = orig_hflip
        F.rgb_to_grayscale = orig_gray
        F.solarize = orig_solarize
    return out, rec


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: train_transforms_ref.py OUTDIR")
    main(sys.argv[1])
