"""Reference fixtures for the SD1.5 UNet with IP-Adapters (diffusers UNet2DConditionModel).

Usage: python test/reference/unet_ref.py OUTDIR
       DIPSY_UNET_FULL=0 python test/reference/unet_ref.py OUTDIR   (skips the real 860M-param UNet)

Models (each OUTDIR/<model>/unet/ is exactly what save_pretrained writes):
  tiny      the shape of the Deno tiny preset: CrossAttnDown, Down, mid, Up, CrossAttnUp
  variant   the config branches: linear projections, downsample padding 0, 2-deep transformers,
            per-block heads / layers, only_cross_attention, centred input, sin-first timestep
            features with freq_shift 1, gelu, mid_block_scale_factor, an odd 7x5 latent
  sd15arch  SD1.5's block structure (3 CrossAttnDown + Down, 8 heads, 2 layers, cross 768,
            groups 32) at reduced widths [64, 128, 256, 256]; with two base adapters sized like
            the real ones, so ip_adapter keys run 1..31 exactly as in ip-adapter_sd15
  sd15full  the real widths [320, 640, 1280, 1280] (3.4 GB; DIPSY_UNET_FULL=0 leaves it out on
            small machines). Built once per fingerprint (config, seed, shapes, library versions)
            into .cache/fixtures/ and hard-linked into OUTDIR, so editing this script does not
            rebuild and rewrite 3.4 GB each time the fixtures are regenerated.

IP-Adapter files are written in h94's flat layout (image_proj.* + ip_adapter.{k}.*) and loaded into
diffusers with unet._load_ip_adapter_weights, so diffusers' own key mapping is the reference.
Per-sample scales are produced by running diffusers once per distinct scale tuple (its scale is
per adapter, not per sample) and taking each row from the run with that row's scales.

OUTDIR/<model>/io.safetensors holds inputs and outputs; OUTDIR/<model>/meta.json lists the cases.
"""

import copy
import hashlib
import json
import os
import shutil
import sys

import diffusers
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from safetensors.torch import save_file

from common import TINY_UNET

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def randomise_small_params(model, seed):
    """Biases and norm affines start at 0 / 1; nudge them so a dropped term cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def cross_layers(unet):
    """(key id, attn2 hidden size) in diffusers' processor order, as _load_ip_adapter_weights counts."""
    out, key_id = [], 1
    for name in unet.attn_processors.keys():
        if name.endswith("attn1.processor"):
            continue
        attn = unet.get_submodule(name[: -len(".processor")])
        out.append((key_id, attn.to_q.out_features))
        key_id += 2
    return out


def ip_state_dict(kind, dims, layers, seed):
    """A flat h94-layout state dict: image_proj.* and ip_adapter.{k}.to_k_ip/to_v_ip."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std=None):
        std = std if std is not None else shape[-1] ** -0.5
        return torch.randn(shape, generator=g) * std

    def ln(prefix, n, sd):
        sd[prefix + ".weight"] = 1 + w(n, std=0.1)
        sd[prefix + ".bias"] = w(n, std=0.1)

    sd = {}
    cross = dims["cross"]
    if kind == "base":
        sd["image_proj.proj.weight"] = w(dims["tokens"] * cross, dims["embed"])
        sd["image_proj.proj.bias"] = w(dims["tokens"] * cross, std=0.1)
        ln("image_proj.norm", cross, sd)
    else:
        width, inner, depth = dims["width"], dims["heads"] * 64, 4
        sd["image_proj.latents"] = w(1, dims["queries"], width)
        sd["image_proj.proj_in.weight"] = w(width, dims["input"])
        sd["image_proj.proj_in.bias"] = w(width, std=0.1)
        for l in range(depth):
            p = f"image_proj.layers.{l}"
            ln(f"{p}.0.norm1", width, sd)
            ln(f"{p}.0.norm2", width, sd)
            sd[f"{p}.0.to_q.weight"] = w(inner, width)
            sd[f"{p}.0.to_kv.weight"] = w(2 * inner, width)
            sd[f"{p}.0.to_out.weight"] = w(width, inner)
            ln(f"{p}.1.0", width, sd)
            sd[f"{p}.1.1.weight"] = w(4 * width, width)
            sd[f"{p}.1.3.weight"] = w(width, 4 * width)
        sd["image_proj.proj_out.weight"] = w(cross, width)
        sd["image_proj.proj_out.bias"] = w(cross, std=0.1)
        ln("image_proj.norm_out", cross, sd)
    for key_id, hidden in layers:
        sd[f"ip_adapter.{key_id}.to_k_ip.weight"] = w(hidden, cross, std=0.5 * cross**-0.5)
        sd[f"ip_adapter.{key_id}.to_v_ip.weight"] = w(hidden, cross, std=2 * cross**-0.5)
    return {k: v.contiguous() for k, v in sd.items()}


def split_h94(flat):
    """What diffusers' load_ip_adapter makes of a flat safetensors file."""
    out = {"image_proj": {}, "ip_adapter": {}}
    for k, v in flat.items():
        head, rest = k.split(".", 1)
        out[head][rest] = v
    return out


def set_scales(unet, scales):
    for proc in unet.attn_processors.values():
        if isinstance(proc, IPAdapterAttnProcessor2_0):
            proc.scale = list(scales)


def build_unet(config, seed):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).eval()
    randomise_small_params(unet, seed + 1)
    return unet


def image_input(kind, dims, batch, g):
    if kind == "base":
        return torch.randn(batch, dims["embed"], generator=g)
    return torch.randn(batch, dims["seq"], dims["input"], generator=g)


def run_ip_case(unet0, io, meta, case, adapters, rows, sample, t, text, g):
    """adapters: list of (file name, kind, dims, flat state dict); rows: per-sample scale tuples."""
    unet = copy.deepcopy(unet0)
    unet._load_ip_adapter_weights([split_h94(sd) for (_, _, _, sd) in adapters], low_cpu_mem_usage=False)
    batch = sample.shape[0]
    inputs = [image_input(kind, dims, batch, g) for (_, kind, dims, _) in adapters]
    # diffusers wants [B, num_images, ...] per adapter; one image each
    embeds = [x.unsqueeze(1) for x in inputs]
    with torch.no_grad():
        tokens = [tok[:, 0] for tok in unet.encoder_hid_proj(embeds)]
        expected = None
        for scales in sorted(set(map(tuple, rows))):
            set_scales(unet, scales)
            out = unet(sample, t, text, added_cond_kwargs={"image_embeds": embeds}).sample
            if expected is None:
                expected = torch.empty_like(out)
            for i, r in enumerate(rows):
                if tuple(r) == scales:
                    expected[i] = out[i]
    for a, x in enumerate(inputs):
        io[f"{case}.image.{a}"] = x
        io[f"{case}.tokens.{a}"] = tokens[a]
    io[f"{case}.scales"] = torch.tensor(rows, dtype=torch.float32)
    io[f"{case}.out"] = expected
    meta["ip_cases"].append({"name": case, "files": [f for (f, _, _, _) in adapters]})


def write_model(outdir, name, config, seed, batch, latent, text_len, ip=None, scalar_t=True):
    d = os.path.join(outdir, name)
    os.makedirs(d, exist_ok=True)
    unet = build_unet(config, seed)
    unet.save_pretrained(os.path.join(d, "unet"), safe_serialization=True)
    g = torch.Generator().manual_seed(seed + 7)
    sample = torch.randn(batch, config.get("in_channels", 4), *latent, generator=g)
    t = torch.tensor([981, 500, 500, 1][:batch], dtype=torch.int64)
    cross = config["cross_attention_dim"]
    text = torch.randn(batch, text_len, cross, generator=g)
    io = {"sample": sample, "timesteps": t.float(), "text": text}
    meta = {"ip_cases": [], "scalar_timestep": 412.5}
    with torch.no_grad():
        io["out"] = unet(sample, t, text).sample
        if scalar_t:
            io["out_scalar_t"] = unet(sample, 412.5, text).sample
    if ip:
        layers = cross_layers(unet)
        meta["cross_layers"] = [k for k, _ in layers]
        files = {}
        for fname, kind, dims, sd_seed in ip["files"]:
            sd = ip_state_dict(kind, dims, layers, sd_seed)
            save_file(sd, os.path.join(d, fname))
            files[fname] = (fname, kind, dims, sd)
        for case, names, rows in ip["cases"]:
            run_ip_case(unet, io, meta, case, [files[n] for n in names], rows, sample, t, text, g)
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(d, "io.safetensors"))
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FULL_CACHE = os.path.join(ROOT, ".cache", "fixtures")


def write_full(outdir):
    """The full-size model through a cache keyed by everything its files depend on: built (one
    copy of the weights in memory, ~3.8 GB peak) only when the key is new, then hard-linked."""
    args = dict(config=SD15, seed=3, batch=1, latent=(8, 8), text_len=77)
    stamp = json.dumps(
        {
            "fixture_version": FULL_FIXTURE_VERSION,
            "args": args,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        },
        sort_keys=True,
    )
    key = "sd15full-" + hashlib.sha256(stamp.encode()).hexdigest()[:16]
    cache = FULL_CACHE
    built = os.path.join(cache, key)
    if not os.path.isdir(built):
        tmp = os.path.join(cache, f".tmp-{key}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_model(tmp, "sd15full", **args, scalar_t=False)
        os.makedirs(cache, exist_ok=True)
        # the rename publishes a complete model; a concurrent run may have published it first
        try:
            os.rename(os.path.join(tmp, "sd15full"), built)
        except OSError:
            if not os.path.isdir(built):
                raise
        shutil.rmtree(tmp, ignore_errors=True)
    for entry in os.listdir(cache):
        if entry.startswith("sd15full-") and entry != key:
            shutil.rmtree(os.path.join(cache, entry), ignore_errors=True)
    link_tree(built, os.path.join(outdir, "sd15full"))


def link_tree(src, dst):
    """Hard links (no bytes copied, no extra disk); copies where the filesystem refuses links."""
    for root, _, files in os.walk(src):
        target = os.path.join(dst, os.path.relpath(root, src))
        os.makedirs(target, exist_ok=True)
        for f in files:
            out = os.path.join(target, f)
            if os.path.exists(out):
                os.remove(out)
            try:
                os.link(os.path.join(root, f), out)
            except OSError:
                shutil.copyfile(os.path.join(root, f), out)



TINY = TINY_UNET

VARIANT = dict(
    act_fn="gelu",
    attention_head_dim=[2, 4],
    block_out_channels=[32, 64],
    cross_attention_dim=24,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    in_channels=3,
    out_channels=5,
    layers_per_block=[1, 2],
    transformer_layers_per_block=2,
    only_cross_attention=[False, True],
    norm_num_groups=16,
    norm_eps=1e-6,
    use_linear_projection=True,
    downsample_padding=0,
    center_input_sample=True,
    flip_sin_to_cos=False,
    freq_shift=1,
    mid_block_scale_factor=1.4142,
    time_embedding_dim=96,
    sample_size=[7, 5],
)

SD15 = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)

TINY_BASE = dict(embed=16, tokens=4, cross=32)
TINY_PLUS = dict(input=48, seq=17, width=128, heads=2, queries=6, cross=32)
SD15_BASE = dict(embed=1024, tokens=4, cross=768)

# Bump when write_model changes what it writes: the cached sd15full model is then rebuilt.
FULL_FIXTURE_VERSION = 1


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: unet_ref.py OUTDIR")
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    s = 0.6
    one = [[0.0], [0.0], [s], [1.0]]
    two = [[0.0, 0.0], [0.0, 0.0], [s, 0.0], [s, s]]
    write_model(
        outdir, "tiny", TINY, seed=0, batch=4, latent=(8, 8), text_len=77,
        ip=dict(
            files=[
                ("ip-adapter_tiny.safetensors", "base", TINY_BASE, 11),
                ("ip-adapter-plus_tiny.safetensors", "plus", TINY_PLUS, 12),
            ],
            cases=[
                ("base1", ["ip-adapter_tiny.safetensors"], one),
                ("base2", ["ip-adapter_tiny.safetensors"] * 2, two),
                ("plus1", ["ip-adapter-plus_tiny.safetensors"], one),
                ("plus2", ["ip-adapter-plus_tiny.safetensors"] * 2, two),
                (
                    "mixed",
                    ["ip-adapter-plus_tiny.safetensors", "ip-adapter_tiny.safetensors"],
                    [[0.0, 0.0], [0.0, 0.7], [s, 0.0], [s, 0.7]],
                ),
            ],
        ),
    )
    write_model(outdir, "variant", VARIANT, seed=1, batch=2, latent=(7, 5), text_len=9)
    sd15_ip = dict(
        files=[("ip-adapter_sd15arch.safetensors", "base", SD15_BASE, 21)],
        cases=[("base2", ["ip-adapter_sd15arch.safetensors"] * 2, [[0.0, 0.0], [s, s]])],
    )
    write_model(
        outdir, "sd15arch", {**SD15, "block_out_channels": [64, 128, 256, 256]},
        seed=2, batch=2, latent=(8, 8), text_len=77, ip=sd15_ip,
    )
    if os.environ.get("DIPSY_UNET_FULL", "1") != "0":
        write_full(outdir)
    print(f"wrote UNet fixtures to {outdir}")


if __name__ == "__main__":
    main()
