"""Class similarity fixtures: the official calculate_similarity_matrix.py on a tiny CLIP, BMP files
as Pillow reads them, and numpy's .npz files.

Usage: python test/reference/similarity_ref.py OUTDIR

The official DIPSY script (eleftsonis/DIPSY, calculate_similarity_matrix.py) encodes every file of
every class folder with openai CLIP ViT-B/16 after openai CLIP's own `preprocess` transform:
torchvision Resize(224, BICUBIC) of the short side, CenterCrop(224), convert("RGB"), ToTensor(),
Normalize(CLIP mean, std), all on PIL images; it averages a class's embeddings (numpy mean of the
float32 vectors), takes sklearn's cosine_similarity of the class means, and saves
`np.savez(path, similarity_matrix=..., class_names=np.array(class_names))`. The same steps run here
with a tiny random transformers CLIPModel at 224 px standing in for openai CLIP (the weights differ,
the preprocessing and the arithmetic after the encoder do not). The images are square and non-square,
with odd crop excesses where torchvision's rounded crop offset and transformers' floored one part.

Writes
  OUTDIR/clip/                  the tiny CLIPModel (config.json, model.safetensors)
  OUTDIR/data/<class>/<file>    the few-shot images (PNG, JPEG, BMP; RGB, L, P, RGBA)
  OUTDIR/official.npz           the official script's output for OUTDIR/data
  OUTDIR/compressed.npz         np.savez_compressed of arrays of several dtypes (reader test)
  OUTDIR/bmp/<name>.bmp         BMP variants (headers, depths, palettes, bit fields, RLE)
  OUTDIR/expected.safetensors   pixels/<class>/<file> [1, 3, 224, 224] f32, embeds/<class>/<file>
                                [D] f32, bmp/<name> [H, W, 3] uint8 (Pillow's convert("RGB"))
  OUTDIR/cases.json             {"classes", "images": [{"class", "file", "width", "height"}],
                                 "similarity": [[K x K]], "bmp": [{"name", "mode"}],
                                 "bmp_errors": [{"name", "error"}], "compressed": {...}}
"""

import json
import os
import struct
import sys

import numpy as np
import PIL
import torch
from PIL import Image
from safetensors.numpy import save_file
from sklearn.metrics.pairwise import cosine_similarity
from transformers import CLIPConfig, CLIPModel

from common import build, save_model

import pure_torchvision  # noqa: E402  registers torchvision's pure-Python package
import torchvision.transforms as T  # noqa: E402

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

out_dir = sys.argv[1]
rng = np.random.default_rng(20260101)
expected: dict[str, np.ndarray] = {}

# ---------------------------------------------------------------------------------------------
# The tiny CLIP (224 px, so the crop is the real one)

cfg = CLIPConfig(
    text_config=dict(
        vocab_size=520, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=518, eos_token_id=519,
        pad_token_id=519,
    ),
    vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=224, patch_size=16, hidden_act="quick_gelu",
    ),
    projection_dim=16,
)
model = build(lambda: CLIPModel(cfg), 40)
save_model(model, os.path.join(out_dir, "clip"))

# openai CLIP's `_transform(224)`: the convert sits between the crop and ToTensor there; the
# official script also converts before the transform, which changes nothing.
preprocess = T.Compose([
    T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
    T.CenterCrop(224),
    lambda image: image.convert("RGB"),
    T.ToTensor(),
    T.Normalize(MEAN, STD),
])


# ---------------------------------------------------------------------------------------------
# Few-shot images


def smooth_noise(width, height, channels=3):
    """Low-frequency structure plus noise, so that a one-pixel shift of the crop shows."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.zeros((height, width, channels))
    for c in range(channels):
        fx, fy, ph = rng.uniform(0.02, 0.2, 2).tolist() + [rng.uniform(0, 6.3)]
        base[..., c] = 127 + 90 * np.sin(xx * fx + yy * fy + ph)
    base += rng.normal(0, 25, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


# (class, file, width, height, mode, format). After the short-side resize to 224, the long side
# is 227 (excess 3), 231 (7), 303 (79) or 299 (75): offsets 2/1, 4/3, 40/39, 38/37 for
# torchvision / transformers.
IMAGES = [
    ("a_square", "square.png", 256, 256, "RGB", "PNG"),
    ("a_square", "wide3.png", 227, 224, "RGB", "PNG"),
    ("a_square", "gray.png", 180, 240, "L", "PNG"),
    ("b_wide", "wide7.png", 231, 224, "RGB", "PNG"),
    ("b_wide", "resized.jpg", 401, 300, "RGB", "JPEG"),
    ("b_wide", "palette.png", 300, 210, "P", "PNG"),
    ("c_tall", "tall79.bmp", 224, 303, "RGB", "BMP"),
    ("c_tall", "alpha.png", 160, 120, "RGBA", "PNG"),
    ("c_tall", "small.bmp", 97, 64, "RGB", "BMP"),
]

images = []
for cls, name, w, h, mode, fmt in IMAGES:
    folder = os.path.join(out_dir, "data", cls)
    os.makedirs(folder, exist_ok=True)
    if mode == "L":
        img = Image.fromarray(smooth_noise(w, h, 1)[..., 0], "L")
    elif mode == "RGBA":
        img = Image.fromarray(smooth_noise(w, h, 4), "RGBA")
    else:
        img = Image.fromarray(smooth_noise(w, h), "RGB")
        if mode == "P":
            img = img.quantize(64)
    img.save(os.path.join(folder, name), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    images.append({"class": cls, "file": name, "width": w, "height": h})

# The official loop, verbatim in its arithmetic.
data_root = os.path.join(out_dir, "data")
class_embeddings = {}
with torch.no_grad():
    for class_name in sorted(os.listdir(data_root)):
        class_folder = os.path.join(data_root, class_name)
        if not os.path.isdir(class_folder):
            continue
        embeddings = []
        for img_name in sorted(os.listdir(class_folder)):
            pixels = preprocess(Image.open(os.path.join(class_folder, img_name)).convert("RGB"))
            pixels = pixels.unsqueeze(0)
            embedding = model.get_image_features(pixel_values=pixels).pooler_output
            embedding = embedding.cpu().numpy().flatten()
            expected[f"pixels/{class_name}/{img_name}"] = pixels.numpy()
            expected[f"embeds/{class_name}/{img_name}"] = embedding
            embeddings.append(embedding)
        class_embeddings[class_name] = np.mean(embeddings, axis=0)
class_names = list(class_embeddings.keys())
similarity = cosine_similarity(np.array([class_embeddings[c] for c in class_names]))
np.savez(
    os.path.join(out_dir, "official.npz"),
    similarity_matrix=similarity,
    class_names=np.array(class_names),
)

# Other dtypes and layouts for the reader; deflated, as np.savez_compressed writes them.
compressed = {
    "f4_fortran": np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4) / 7),
    "f8_3d": (np.arange(24, dtype=np.float64).reshape(2, 3, 4) - 5.5) / 3,
    "i8": np.array([-3, 0, 2**40], dtype=np.int64),
    "u1": np.array([0, 7, 255], dtype=np.uint8),
    "be_f8": np.array([1.5, -2.25], dtype=">f8"),
    "bool": np.array([True, False, True]),
    "unicode": np.array(["F/A-18", "Ł\u00f3d\u017a", "\U0001f600x", ""]),
    "scalar": np.array(2.5),
}
np.savez_compressed(os.path.join(out_dir, "compressed.npz"), **compressed)


def flat(a):
    a = np.asarray(a)
    return [str(v) for v in a.reshape(-1, order="C")] if a.dtype.kind == "U" else (
        a.astype(np.float64).reshape(-1, order="C").tolist())


compressed_cases = {k: {"shape": list(v.shape), "data": flat(v)} for k, v in compressed.items()}

# ---------------------------------------------------------------------------------------------
# BMP files, written byte by byte (Pillow saves only a few of these layouts)

bmp_dir = os.path.join(out_dir, "bmp")
os.makedirs(bmp_dir, exist_ok=True)


def bmp_file(header, pixels, palette=b"", masks=b"", offset=None):
    """File header + info header (+ masks) + palette + pixel data."""
    start = 14 + len(header) + len(masks) + len(palette)
    off = start if offset is None else offset
    body = header + masks + palette + b"\0" * (off - start) + pixels
    return b"BM" + struct.pack("<IHHI", 14 + len(body), 0, 0, off) + body


def info_header(width, height, bits, compression=0, colors=0, size=40, masks=None):
    h = struct.pack("<IiiHHIIiiII", size, width, height, 1, bits, compression, 0, 2835, 2835,
                    colors, 0)
    if size > 40:
        extra = b""
        if masks is not None:
            extra = struct.pack("<4I", *(list(masks) + [0] * (4 - len(masks))))
        h += extra + b"\0" * (size - 40 - len(extra))
    return h


def rows(data, width, bits):
    """Rows padded to 4 bytes; data is a list of rows of packed bytes."""
    stride = ((width * bits + 31) >> 3) & ~3
    return b"".join(r + b"\0" * (stride - len(r)) for r in data)


def pack_bits(indices, bits):
    out = bytearray()
    per = 8 // bits
    for i in range(0, len(indices), per):
        b = 0
        for j, v in enumerate(indices[i:i + per]):
            b |= v << (8 - bits * (j + 1))
        out.append(b)
    return bytes(out)


def rand_bytes(n):
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def palette_of(n, entry=4, gray=False):
    out = b""
    for i in range(n):
        c = [i, i, i] if gray else rng.integers(0, 256, 3).tolist()
        out += bytes(c) + (b"\0" if entry == 4 else b"")
    return out


bmps = {}
W, H = 7, 5
bmps["rgb24_bottom_up"] = bmp_file(info_header(W, H, 24),
                                   rows([rand_bytes(3 * W) for _ in range(H)], W, 24))
bmps["rgb24_top_down"] = bmp_file(info_header(W, -H, 24),
                                  rows([rand_bytes(3 * W) for _ in range(H)], W, 24))
bmps["rgb32_bgrx"] = bmp_file(info_header(W, H, 32), rand_bytes(4 * W * H))
bmps["rgb16_555"] = bmp_file(info_header(W, H, 16),
                             rows([rand_bytes(2 * W) for _ in range(H)], W, 16))
bmps["rgb16_565_masks"] = bmp_file(info_header(W, H, 16, compression=3),
                                   rows([rand_bytes(2 * W) for _ in range(H)], W, 16),
                                   masks=struct.pack("<3I", 0xF800, 0x7E0, 0x1F))
bmps["rgba32_v4"] = bmp_file(info_header(W, H, 32, compression=3, size=108,
                                         masks=(0xFF0000, 0xFF00, 0xFF, 0xFF000000)),
                             rand_bytes(4 * W * H))
bmps["xbgr32_v5"] = bmp_file(info_header(W, H, 32, compression=3, size=124,
                                         masks=(0xFF000000, 0xFF0000, 0xFF00, 0)),
                             rand_bytes(4 * W * H))
bmps["pal8"] = bmp_file(info_header(W, H, 8, colors=256),
                        rows([rand_bytes(W) for _ in range(H)], W, 8), palette=palette_of(256))
bmps["pal8_short_palette"] = bmp_file(info_header(W, H, 8, colors=16),
                                      rows([rand_bytes(W) for _ in range(H)], W, 8),
                                      palette=palette_of(16))
bmps["gray8"] = bmp_file(info_header(W, H, 8),
                         rows([rand_bytes(W) for _ in range(H)], W, 8),
                         palette=palette_of(256, gray=True))
bmps["pal4"] = bmp_file(
    info_header(W, H, 4, colors=16),
    rows([pack_bits(rng.integers(0, 16, W).tolist(), 4) for _ in range(H)], W, 4),
    palette=palette_of(16))
bmps["pal1_colour"] = bmp_file(
    info_header(13, H, 1, colors=2),
    rows([pack_bits(rng.integers(0, 2, 13).tolist(), 1) for _ in range(H)], 13, 1),
    palette=palette_of(2))
bmps["bw1"] = bmp_file(
    info_header(13, H, 1, colors=2),
    rows([pack_bits(rng.integers(0, 2, 13).tolist(), 1) for _ in range(H)], 13, 1),
    palette=b"\0\0\0\0\xff\xff\xff\0")
bmps["gap_before_pixels"] = bmp_file(info_header(W, H, 24),
                                     rows([rand_bytes(3 * W) for _ in range(H)], W, 24),
                                     offset=14 + 40 + 10)
# RLE8: runs, an odd absolute run (padded), a delta, end of line, end of bitmap.
rle8 = (bytes([3, 5, 0, 3, 9, 8, 7, 0, 1, 2, 0, 0]) + bytes([0, 2, 2, 1]) + bytes([4, 200])
        + bytes([0, 0]) + bytes([7, 42, 0, 0]) + bytes([7, 43, 0, 0]) + bytes([0, 1]))
bmps["rle8"] = bmp_file(info_header(W, H, 8, compression=1, colors=256), rle8,
                        palette=palette_of(256))
rle4 = (bytes([5, 0x12, 0, 3, 0x34, 0x50, 0, 0]) + bytes([0, 0]) + bytes([7, 0xAB, 0, 0])
        + bytes([0, 5, 0x12, 0x34, 0x50, 0, 2, 0x9C, 0, 0]) + bytes([7, 0xF0, 0, 0])
        + bytes([7, 0x0F, 0, 1]))
bmps["rle4"] = bmp_file(info_header(W, H, 4, compression=2, colors=16), rle4,
                        palette=palette_of(16))
os2 = struct.pack("<IHHHH", 12, W, H, 1, 24)
bmps["os2_rgb24"] = bmp_file(os2, rows([rand_bytes(3 * W) for _ in range(H)], W, 24))
os2p = struct.pack("<IHHHH", 12, W, H, 1, 8)
bmps["os2_pal8"] = bmp_file(os2p, rows([rand_bytes(W) for _ in range(H)], W, 8),
                            palette=palette_of(256, entry=3))
# What Pillow itself writes.
for mode in ["RGB", "L", "P", "1"]:
    img = Image.fromarray(smooth_noise(11, 6), "RGB")
    img = img.convert(mode) if mode != "P" else img.quantize(20)
    path = os.path.join(bmp_dir, f"pillow_{mode}.bmp")
    img.save(path, "BMP")
    with open(path, "rb") as f:
        bmps[f"pillow_{mode}"] = f.read()

bmp_errors = {
    "bad_masks": bmp_file(info_header(W, H, 32, compression=3),
                          rand_bytes(4 * W * H), masks=struct.pack("<3I", 0xF00, 0xF0, 0xF)),
    "truncated": bmp_file(info_header(W, H, 24), rand_bytes(3 * W * 2)),
    "jpeg_inside": bmp_file(info_header(W, H, 24, compression=4), rand_bytes(64)),
    "rle8_cut": bmp_file(info_header(W, H, 8, compression=1, colors=256), bytes([3, 5, 0, 1]),
                         palette=palette_of(256)),
}

bmp_cases, bmp_error_cases = [], []
for name, data in bmps.items():
    path = os.path.join(bmp_dir, f"{name}.bmp")
    with open(path, "wb") as f:
        f.write(data)
    with Image.open(path) as img:
        mode = img.mode
        expected[f"bmp/{name}"] = np.asarray(img.convert("RGB"))
    bmp_cases.append({"name": name, "mode": mode})
for name, data in bmp_errors.items():
    path = os.path.join(bmp_dir, f"{name}.bmp")
    with open(path, "wb") as f:
        f.write(data)
    try:
        with Image.open(path) as img:
            img.convert("RGB")
    except Exception as e:  # what Pillow says; the test only needs that it refuses
        bmp_error_cases.append({"name": name, "error": f"{type(e).__name__}: {e}"})
    else:
        raise SystemExit(f"Pillow read {name}.bmp, which should be refused")

save_file({k: np.ascontiguousarray(v) for k, v in expected.items()},
          os.path.join(out_dir, "expected.safetensors"))
with open(os.path.join(out_dir, "cases.json"), "w") as f:
    json.dump({
        "classes": class_names,
        "images": images,
        "similarity": similarity.astype(np.float64).tolist(),
        "similarity_dtype": str(similarity.dtype),
        "bmp": bmp_cases,
        "bmp_errors": bmp_error_cases,
        "compressed": compressed_cases,
        "versions": {"pillow": PIL.__version__, "torch": torch.__version__,
                     "numpy": np.__version__, "torchvision": pure_torchvision.TORCHVISION},
    }, f, indent=1)
