"""Image fixtures: what Pillow and transformers make of image files, resizes and CLIP preprocessing.

Usage: python test/reference/image_ref.py OUTDIR

Writes
  OUTDIR/files/*          encoded inputs: random RGB PNGs (lossless, so decoding is exact), other
                          modes and formats (RGBA, LA, L, P, 1-bit, 16-bit, CMYK JPEG, WebP, GIF,
                          TIFF, EXIF-rotated), and broken files
  OUTDIR/expected.safetensors   every expected array (uint8 images as [H, W, 3], float32 tensors)
  OUTDIR/cases.json       the cases (format below)
  OUTDIR/meta.json        library versions

cases.json:
  "images":  [{"name", "file", "width", "height"}]                 random RGB inputs
  "resize":  [{"image", "filter", "width", "height", "key"}]        PIL Image.resize(size, filter)
  "clip":    [{"image", "flavor", "size", "crop", "key"}]           [1, 3, crop, crop] float32
  "decode":  [{"file", "key", "exif_transpose", "mode", "note"}]    [H, W, 3] uint8
  "errors":  [{"file", "why"}]                                      files that must not decode
  "from_tensor": {"input", "key"}                                   diffusers numpy_to_pil rounding

CLIP "transformers" = CLIPImageProcessorPil (the PIL backend; transformers 5 defaults to a
torchvision backend, but DIPSY used the PIL path of transformers 4, which this class keeps),
cross-checked here against the same steps written out in numpy. "torchvision" = Resize(size,
BICUBIC) + CenterCrop + ToTensor + Normalize on PIL images (the OpenAI CLIP transform), written
out step by step because torchvision is not installed: PIL resize, crop offset
int(round((h - crop) / 2)), float32 x / 255, float32 (x - mean) / std.
"""

import json
import os
import struct
import sys
import zlib

import numpy as np
import PIL
import torch
import transformers
from PIL import Image, ImageCms, ImageOps
from safetensors.numpy import save_file
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

FILTERS = {
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

out_dir = sys.argv[1]
files_dir = os.path.join(out_dir, "files")
os.makedirs(files_dir, exist_ok=True)
rng = np.random.default_rng(20240601)
expected: dict[str, np.ndarray] = {}
cases: dict = {"images": [], "resize": [], "clip": [], "decode": [], "errors": []}


def random_rgb(w: int, h: int) -> np.ndarray:
    """Noise over a smooth gradient: clipping-heavy edges and ordinary mid-tones in one image."""
    y, x = np.mgrid[0:h, 0:w]
    smooth = np.stack(
        [128 + 100 * np.sin(x / 7.0 + c) * np.cos(y / 11.0 - c) for c in range(3)], axis=-1
    )
    noise = rng.normal(0, 40, (h, w, 3))
    mask = rng.random((h, w, 1)) < 0.3
    return np.clip(smooth + noise * mask, 0, 255).astype(np.uint8)


# --- random RGB images, resizes, CLIP preprocessing ---------------------------------------

SIZES = {
    "tiny1x1": (1, 1),
    "strip1x7": (1, 7),
    "strip9x1": (9, 1),
    "odd37x53": (37, 53),
    "wide300x200": (300, 200),
    "square224": (224, 224),
    "photo500x333": (500, 333),
    "odd227x224": (227, 224),  # odd crop excess after the CLIP resize: the flavours differ
    "odd224x231": (224, 231),
}

images = {}
for name, (w, h) in SIZES.items():
    arr = random_rgb(w, h)
    file = f"files/{name}.png"
    Image.fromarray(arr).save(os.path.join(out_dir, file))
    images[name] = Image.open(os.path.join(out_dir, file)).convert("RGB")
    assert np.array_equal(np.array(images[name]), arr)
    cases["images"].append({"name": name, "file": file, "width": w, "height": h})


def resize_targets(w: int, h: int) -> list[tuple[int, int]]:
    """Down, up, mixed, one axis unchanged and a 1x1 output; photo-sized inputs get fewer and
    smaller targets to keep the fixture small (CLIP preprocessing covers their big resizes)."""
    if w * h > 20000:
        return sorted({(w // 3, h // 2), (224, 224), (w // 2 + 1, h + 4)})
    t = {
        (max(1, w // 3), max(1, h // 2)),
        (w * 2 + 1, h * 3),
        (max(1, w // 2), h * 2),
        (w, h + 5),
        (w + 3, h),
        (1, 1),
        (224, 224),
    }
    return sorted(t)


for name, img in images.items():
    for fname, f in FILTERS.items():
        for tw, th in resize_targets(img.width, img.height):
            key = f"resize/{name}/{fname}/{tw}x{th}"
            expected[key] = np.array(img.resize((tw, th), f))
            cases["resize"].append(
                {"image": name, "filter": fname, "width": tw, "height": th, "key": key}
            )


def shortest_edge(w: int, h: int, size: int) -> tuple[int, int]:
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


def clip_transformers_by_hand(img: Image.Image, size: int, crop: int) -> np.ndarray:
    w, h = shortest_edge(img.width, img.height, size)
    a = np.array(img.resize((w, h), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    top, left = (h - crop) // 2, (w - crop) // 2
    a = a[:, top : top + crop, left : left + crop]
    x = (a.astype(np.float64) * (1 / 255)).astype(np.float32)
    m = np.array(MEAN, dtype=np.float32)[:, None, None]
    s = np.array(STD, dtype=np.float32)[:, None, None]
    return ((x - m) / s)[None]


def clip_torchvision_by_hand(img: Image.Image, size: int, crop: int) -> np.ndarray:
    w, h = shortest_edge(img.width, img.height, size)
    r = img.resize((w, h), Image.Resampling.BICUBIC)
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    r = r.crop((left, top, left + crop, top + crop))
    t = torch.from_numpy(np.array(r)).permute(2, 0, 1).to(torch.float32).div(255)
    t = t.sub(torch.tensor(MEAN).view(3, 1, 1)).div(torch.tensor(STD).view(3, 1, 1))
    return t[None].numpy()


# Every image through the default processor; a few through a 256 -> 224 one and torchvision's steps.
CLIP_CASES = [("transformers", 224, 224, name) for name in images] + [
    ("transformers", 256, 224, name) for name in ("tiny1x1", "odd37x53", "photo500x333")
] + [
    ("torchvision", 224, 224, name)
    for name in ("odd37x53", "photo500x333", "odd227x224", "odd224x231")
]
for flavor, size, crop, name in CLIP_CASES:
    img = images[name]
    if flavor == "transformers":
        proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size=crop)
        value = proc(images=[img], return_tensors="np")["pixel_values"]
        assert value.dtype == np.float32, value.dtype
        assert np.array_equal(value, clip_transformers_by_hand(img, size, crop)), name
    else:
        value = clip_torchvision_by_hand(img, size, crop)
    key = f"clip/{flavor}/{size}/{crop}/{name}"
    expected[key] = np.ascontiguousarray(value)
    cases["clip"].append({"image": name, "flavor": flavor, "size": size, "crop": crop, "key": key})


# --- decoding: modes and formats, against PIL's convert("RGB") ------------------------------

def png16(path: str, arr: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG (Pillow cannot write 16-bit colour PNGs)."""
    h, w = arr.shape[:2]
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header))
        f.write(chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


base = random_rgb(61, 43)
alpha = rng.integers(0, 256, (43, 61, 1), dtype=np.uint8)
srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
exif = Image.Exif()
exif[0x0112] = 6  # rotate 90 degrees clockwise to display

writers = {
    "rgba.png": lambda p: Image.fromarray(np.concatenate([base, alpha], 2)).save(p),
    "la.png": lambda p: Image.fromarray(base).convert("LA").save(p),
    "gray.png": lambda p: Image.fromarray(base[..., 1]).save(p),
    "palette.png": lambda p: Image.fromarray(base).quantize(37).save(p),
    "palette_trns.png": lambda p: Image.fromarray(base).quantize(20).save(p, transparency=3),
    "bilevel.png": lambda p: Image.fromarray(base[..., 0] > 120).save(p),
    "rgb_colorkey.png": lambda p: Image.fromarray(base).save(p, transparency=(1, 2, 3)),
    "icc_srgb.png": lambda p: Image.fromarray(base).save(p, icc_profile=srgb),
    "rgb16.png": lambda p: png16(p, rng.integers(0, 65536, (43, 61, 3)), 2),
    "rgba16.png": lambda p: png16(p, rng.integers(0, 65536, (43, 61, 4)), 6),
    "la16.png": lambda p: png16(p, rng.integers(0, 65536, (43, 61, 2)), 4),
    "gray16.png": lambda p: png16(p, rng.integers(0, 65536, (43, 61)), 0),
    "rgb.jpg": lambda p: Image.fromarray(base).save(p, quality=85),
    "rgb444.jpg": lambda p: Image.fromarray(base).save(p, quality=90, subsampling=0),
    "progressive.jpg": lambda p: Image.fromarray(base).save(p, quality=80, progressive=True),
    "gray.jpg": lambda p: Image.fromarray(base[..., 2]).save(p, quality=85),
    "cmyk.jpg": lambda p: Image.fromarray(np.concatenate([base, alpha], 2), "CMYK").save(
        p, quality=90
    ),
    "exif6.jpg": lambda p: Image.fromarray(base).save(p, quality=85, exif=exif),
    "exif6.png": lambda p: Image.fromarray(base).save(p, exif=exif),
    "lossless.webp": lambda p: Image.fromarray(base).save(p, lossless=True),
    "lossy.webp": lambda p: Image.fromarray(base).save(p, quality=80),
    "rgba.webp": lambda p: Image.fromarray(np.concatenate([base, alpha], 2)).save(
        p, lossless=True
    ),
    "palette.gif": lambda p: Image.fromarray(base).save(p),
    "rgb.tif": lambda p: Image.fromarray(base).save(p),
}
NOTES = {
    "gray16.png": "Pillow saturates I;16 to 255 on convert('RGB'); we keep the high byte "
    "(value >> 8) like Pillow does for 16-bit RGB",
}

for file, write in writers.items():
    path = os.path.join(files_dir, file)
    write(path)
    im = Image.open(path)
    for transpose in (False, True) if file.startswith("exif") else (False,):
        if file in NOTES:
            want = (np.array(im, dtype=np.uint16) >> 8).astype(np.uint8)[..., None].repeat(3, 2)
        else:
            src = ImageOps.exif_transpose(im) if transpose else im
            want = np.array(src.convert("RGB"))
        key = f"decode/{file}" + ("/exif_transpose" if transpose else "")
        expected[key] = want
        cases["decode"].append(
            {
                "file": f"files/{file}",
                "key": key,
                "exif_transpose": transpose,
                "mode": im.mode,
                "note": NOTES.get(file, ""),
            }
        )

# Broken inputs: PIL refuses each of them.
with open(os.path.join(files_dir, "rgb.jpg"), "rb") as f:
    jpeg = f.read()
with open(os.path.join(files_dir, "rgba.png"), "rb") as f:
    png = f.read()
broken = {
    "truncated.png": png[: len(png) // 2],
    "truncated.jpg": jpeg[: len(jpeg) // 2],
    "notes.txt": b"class names, not pixels\n",
    "fake.png": b"not really a png at all, just text with the wrong extension",
    "empty.jpg": b"",
}
for file, data in broken.items():
    path = os.path.join(files_dir, file)
    with open(path, "wb") as f:
        f.write(data)
    try:
        Image.open(path).convert("RGB")
    except Exception as e:  # noqa: BLE001 - any refusal counts
        cases["errors"].append({"file": f"files/{file}", "why": f"{type(e).__name__}: {e}"})
    else:
        raise AssertionError(f"PIL decoded {file}")


# --- tensor -> image rounding (diffusers VaeImageProcessor.numpy_to_pil) ---------------------

vals = rng.random((2, 3, 5, 7), dtype=np.float32)
# Exact halves after * 255 (round half to even) and values just off them.
halves = (np.arange(35, dtype=np.float32) + 0.5) / np.float32(255)
vals[0, 0] = halves.reshape(5, 7)
vals[0, 1] = np.nextafter(halves, np.float32(1)).reshape(5, 7)
vals[1, 2, 0, :3] = [0.0, 1.0, 0.5]
expected["from_tensor/input"] = vals
expected["from_tensor/round"] = (vals.transpose(0, 2, 3, 1) * 255).round().astype("uint8")
cases["from_tensor"] = {"input": "from_tensor/input", "key": "from_tensor/round"}

save_file(
    {k: np.ascontiguousarray(v) for k, v in expected.items()},
    os.path.join(out_dir, "expected.safetensors"),
)
with open(os.path.join(out_dir, "cases.json"), "w") as f:
    json.dump(cases, f, indent=1)
with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(
        {
            "pillow": PIL.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
        },
        f,
        indent=1,
    )
print(
    f"image fixtures: {len(cases['resize'])} resizes, {len(cases['clip'])} CLIP inputs, "
    f"{len(cases['decode'])} decodes, {len(cases['errors'])} broken files"
)
