"""Model forwards from diffusers / transformers eager, the reference side of bench/models_bench.ts.

Usage: models_bench.py CACHE_DIR   (driven over stdin/stdout by bench/models_bench.ts)

The first run writes every benchmark model into CACHE_DIR with random weights in the real on-disk
layouts (diffusers unet/ folders, h94 IP-Adapter Plus files, transformers CLIP vision folders) plus
the inputs and this side's outputs (io.safetensors), so the TypeScript side loads the very same
weights and inputs and can check it computes the same thing. Every run then loads the models back
from those files and runs them under torch.no_grad with torch's default thread count, timing
rounds of calls on request (see main), so that the two sides' rounds can alternate.
"""

import json
import os
import sys
import time

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from cache import ensure_cache  # also puts test/reference on sys.path
from common import SD15_UNET, TINY_UNET

# Bump when a model, an input or the layout changes: a stale cache is rebuilt, never reused.
VERSION = "1"
IP_SCALE = 0.6
# The real stdout, kept for the request/answer lines; main points sys.stdout at stderr.
PROTOCOL = sys.stdout

UNETS = {
    # the Deno tiny preset (TINY_UNET_CONFIG_JSON): a forward is a few hundred small ops
    "unet_tiny": dict(
        config=TINY_UNET,
        batch=4,
        latent=8,
        text_len=77,
        # TINY_IP_PLUS: 2 heads of 64, 6 queries, fed 17 CLIP tokens of width 48
        plus=dict(input=48, seq=17, width=128, heads=2, queries=6),
        seed=0,
    ),
    # SD1.5's block structure (8 heads, 2 layers, cross 768, groups 32) at 0.4x width, 32x32 latent
    "unet_mid": dict(
        config=dict(SD15_UNET, block_out_channels=[128, 256, 512, 512], sample_size=32),
        batch=2,
        latent=32,
        text_len=77,
        # the real ip-adapter-plus_sd15 resampler, fed ViT-H/14 penultimate states
        plus=dict(input=1280, seq=257, width=768, heads=12, queries=16),
        seed=1,
    ),
}

CLIPS = {
    # tinyVisionConfig() of plugins/clip/presets.ts
    "clip_vision_tiny": dict(
        config=dict(
            hidden_size=32,
            intermediate_size=64,
            projection_dim=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=4,
            hidden_act="gelu",
        ),
        batch=4,
        seed=2,
    ),
    # ViT-B/16-like geometry (197 tokens) at 6 layers of width 512
    "clip_vision_mid": dict(
        config=dict(
            hidden_size=512,
            intermediate_size=2048,
            projection_dim=512,
            num_hidden_layers=6,
            num_attention_heads=8,
            image_size=224,
            patch_size=16,
            hidden_act="gelu",
        ),
        batch=4,
        seed=3,
    ),
}


def plus_state_dict(dims, cross, layers, seed):
    """A flat h94-layout IP-Adapter Plus state dict sized for `layers` [(key id, hidden)]."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std=None):
        return torch.randn(shape, generator=g) * (std if std is not None else shape[-1] ** -0.5)

    sd = {}

    def ln(prefix, n):
        sd[prefix + ".weight"] = 1 + w(n, std=0.1)
        sd[prefix + ".bias"] = w(n, std=0.1)

    width, inner = dims["width"], dims["heads"] * 64
    sd["image_proj.latents"] = w(1, dims["queries"], width)
    sd["image_proj.proj_in.weight"] = w(width, dims["input"])
    sd["image_proj.proj_in.bias"] = w(width, std=0.1)
    for l in range(4):
        p = f"image_proj.layers.{l}"
        ln(f"{p}.0.norm1", width)
        ln(f"{p}.0.norm2", width)
        sd[f"{p}.0.to_q.weight"] = w(inner, width)
        sd[f"{p}.0.to_kv.weight"] = w(2 * inner, width)
        sd[f"{p}.0.to_out.weight"] = w(width, inner)
        ln(f"{p}.1.0", width)
        sd[f"{p}.1.1.weight"] = w(4 * width, width)
        sd[f"{p}.1.3.weight"] = w(width, 4 * width)
    sd["image_proj.proj_out.weight"] = w(cross, width)
    sd["image_proj.proj_out.bias"] = w(cross, std=0.1)
    ln("image_proj.norm_out", cross)
    for key_id, hidden in layers:
        sd[f"ip_adapter.{key_id}.to_k_ip.weight"] = w(hidden, cross, std=0.5 * cross**-0.5)
        sd[f"ip_adapter.{key_id}.to_v_ip.weight"] = w(hidden, cross)
    return {k: v.contiguous() for k, v in sd.items()}


def cross_layers(unet):
    """(ip_adapter key id, attn2 width) in diffusers' processor order."""
    out, key_id = [], 1
    for name in unet.attn_processors.keys():
        if name.endswith("attn1.processor"):
            continue
        out.append((key_id, unet.get_submodule(name[: -len(".processor")]).to_q.out_features))
        key_id += 2
    return out


def split_h94(flat):
    out = {"image_proj": {}, "ip_adapter": {}}
    for k, v in flat.items():
        head, rest = k.split(".", 1)
        out[head][rest] = v
    return out


class PrecomputedTokens(torch.nn.Module):
    """Stands in for the UNet's image projection: the tokens are projected once, outside the
    timed forward, as the TypeScript side does (a sampler projects once per image, not per step)."""

    def forward(self, tokens):
        return tokens


def attach_two_plus(unet, path):
    """Loads the same Plus file as two adapters (DIPSY's default), both at IP_SCALE."""
    sd = split_h94(load_file(path))
    unet._load_ip_adapter_weights([sd, sd], low_cpu_mem_usage=False)
    for proc in unet.attn_processors.values():
        if isinstance(proc, IPAdapterAttnProcessor2_0):
            proc.scale = [IP_SCALE, IP_SCALE]
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    unet.encoder_hid_proj = PrecomputedTokens()
    return projection


def write_unet(d, spec):
    torch.manual_seed(spec["seed"])
    unet = UNet2DConditionModel(**spec["config"]).eval()
    unet.save_pretrained(os.path.join(d, "unet"), safe_serialization=True)
    cross = spec["config"]["cross_attention_dim"]
    plus = plus_state_dict(spec["plus"], cross, cross_layers(unet), spec["seed"] + 10)
    save_file(plus, os.path.join(d, "ip-adapter-plus.safetensors"))
    g = torch.Generator().manual_seed(spec["seed"] + 20)
    b, s = spec["batch"], spec["latent"]
    io = {
        "sample": torch.randn(b, 4, s, s, generator=g),
        "timesteps": torch.linspace(981, 1, b),
        "text": torch.randn(b, spec["text_len"], cross, generator=g),
        "image": torch.randn(b, spec["plus"]["seq"], spec["plus"]["input"], generator=g),
    }
    with torch.no_grad():
        io["out"] = unet(io["sample"], io["timesteps"], io["text"]).sample
        projection = attach_two_plus(unet, os.path.join(d, "ip-adapter-plus.safetensors"))
        io["tokens"] = projection(io["image"])
        tokens = [io["tokens"], io["tokens"]]
        io["out_ip2"] = unet(
            io["sample"], io["timesteps"], io["text"], added_cond_kwargs={"image_embeds": tokens}
        ).sample
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(d, "io.safetensors"))


def write_clip(d, spec):
    torch.manual_seed(spec["seed"])
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**spec["config"])).eval()
    model.save_pretrained(d, safe_serialization=True)
    c = spec["config"]
    g = torch.Generator().manual_seed(spec["seed"] + 20)
    pixels = torch.randn(spec["batch"], 3, c["image_size"], c["image_size"], generator=g)
    with torch.no_grad():
        out = model(pixel_values=pixels)
    io = {"pixels": pixels, "last_hidden_state": out.last_hidden_state, "image_embeds": out.image_embeds}
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(d, "io.safetensors"))


def ensure_models(cache):
    def write(tmp):
        for name, spec in UNETS.items():
            write_unet(os.path.join(tmp, name), spec)
        for name, spec in CLIPS.items():
            write_clip(os.path.join(tmp, name), spec)
    ensure_cache(cache, VERSION, write)


def load_group(cache, group):
    """Every case of one model, as {case: forward}; each forward feeds the inputs ours gets."""
    d = os.path.join(cache, group)
    if group in CLIPS:
        pixels = load_file(os.path.join(d, "io.safetensors"))["pixels"]
        model = CLIPVisionModelWithProjection.from_pretrained(d).eval()
        return {group: lambda: model(pixel_values=pixels)}
    io = load_file(os.path.join(d, "io.safetensors"))
    x, t, text = io["sample"], io["timesteps"], io["text"]
    plain = UNet2DConditionModel.from_pretrained(os.path.join(d, "unet")).eval()
    # diffusers cannot switch loaded adapters off, so the IP cases get their own copy
    with_ip = UNet2DConditionModel.from_pretrained(os.path.join(d, "unet")).eval()
    projection = attach_two_plus(with_ip, os.path.join(d, "ip-adapter-plus.safetensors"))
    cond = {"image_embeds": [io["tokens"], io["tokens"]]}
    return {
        group: lambda: plain(x, t, text),
        f"{group}_ip2": lambda: with_ip(x, t, text, added_cond_kwargs=cond),
        f"{group}_plus_resampler": lambda: projection(io["image"]),
    }


def seconds_per_call(fn, calls):
    """Wall and process CPU seconds per call."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls, (time.process_time() - c0) / calls


def main():
    """Answers one JSON request per stdin line with one JSON line on stdout:
    {"op": "load", "group": name} loads a model's cases (and frees the previous model's);
    {"op": "run", "case": name, "calls": n} runs the case n times and answers {"s": seconds per
    call, "cpu_s": process CPU seconds per call}, so the caller can interleave its own rounds with
    ours under the same machine load."""
    if len(sys.argv) != 2:
        sys.exit("usage: models_bench.py CACHE_DIR")
    cache = sys.argv[1]
    sys.stdout = sys.stderr
    ensure_models(cache)
    torch.set_grad_enabled(False)  # what torch.no_grad does, for the whole session
    reply({"threads": torch.get_num_threads()})
    table = {}
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "load":
            table = {}
            table = load_group(cache, req["group"])
            reply({"cases": sorted(table)})
        elif req["op"] == "run":
            wall, cpu = seconds_per_call(table[req["case"]], req["calls"])
            reply({"s": wall, "cpu_s": cpu})
        else:
            sys.exit(f"unknown request {line!r}")


def reply(obj):
    PROTOCOL.write(json.dumps(obj) + "\n")
    PROTOCOL.flush()


if __name__ == "__main__":
    main()
