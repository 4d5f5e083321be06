"""One DIPSY denoising step in the official loop structure, the reference side of bench/dipsy_bench.ts.

Usage: dipsy_bench.py CACHE_DIR THREADS   (driven over stdin/stdout by bench/dipsy_bench.ts)

The first run writes, per case, a UNet (diffusers unet/ folder) and an h94-layout IP-Adapter Plus
file with random weights, plus the step inputs (text states, CLIP image states and their projected
tokens) and the final latents of a short run (io.safetensors), so the TypeScript side loads the
very same weights and inputs and can check that its loop computes the same thing.

A step is structured as the official DIPSY code (eleftsonis/DIPSY; see test/reference/dipsy_ref.py):
three UNet calls of batch 2 (uncond, text), switched with set_ip_adapter_scale,
  [lam, lam] -> ecpn,  [lam, 0] -> ecp,  [0, 0] -> (e0, ec)
  eps = e0 + wT (ec - e0) + wP (ecp - ec) - wN (ecpn - ecp)          (Eq. 9)
then DPMSolverMultistepScheduler.step. Two variants are timed:
  "official": image_embeds are the CLIP states, so every UNet call runs both Plus resamplers
              (what the diffusers pipeline does);
  "tokens":   the resampler outputs are computed once and fed as tokens (what our side does), so
              the two sides differ only in how the four predictions are batched.

Protocol: once ready it answers {"threads", "guidance", "cases"}; then one JSON line per request:
{"op": "load", "case": name}; {"op": "run", "variant": v} runs one image for the case's steps and
answers {"step_s": [wall seconds of each step], "step_cpu_s": [CPU seconds of each step]}; {"op": "flops"} answers the FLOP counts of the full-size
models (meta tensors, nothing allocated) that turn a mid-size step time into a full-size estimate.
"""

import json
import os
import sys
import time
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.loaders.ip_adapter import IPAdapterMixin
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

from cache import ensure_cache  # also puts test/reference on sys.path
from common import SD15_SCHEDULER, SD15_UNET, TINY_UNET
from models_bench import PrecomputedTokens, cross_layers, plus_state_dict, split_h94

# Bump when a model, an input or the layout changes: a stale cache is rebuilt, never reused.
VERSION = "2"
PROTOCOL = sys.stdout

# The dipsy guidance plugin's defaults (the paper's settings): the TypeScript side builds its
# guidance from these values.
GUIDANCE = dict(textScale=7.5, positiveScale=6.0, negativeScale=6.0, adapterScale=0.6)

CASES = {
    # plugins/sd15/unet_config.ts TINY_UNET_CONFIG_JSON with TINY_IP_PLUS: overhead bound
    "tiny": dict(
        config=TINY_UNET,
        latent=16,
        # the tiny CLIP vision tower: 32 px in patches of 4 -> 65 states of width 48
        plus=dict(input=48, seq=65, width=128, heads=2, queries=6),
        steps=12,
        seed=0,
    ),
    # SD1.5's block structure (8 heads, 2 layers, cross 768, groups 32) at 0.4x width, 32x32
    # latent, with the real ip-adapter-plus_sd15 resampler fed ViT-H/14 penultimate states
    "mid": dict(
        config=dict(SD15_UNET, block_out_channels=[128, 256, 512, 512], sample_size=32),
        latent=32,
        plus=dict(input=1280, seq=257, width=768, heads=12, queries=16),
        steps=3,
        seed=1,
    ),
}
TEXT_LEN = 77
NOISE_SEED = 7


def case_info(spec):
    return dict(steps=spec["steps"], latent=spec["latent"], noise_seed=NOISE_SEED)


def attach_two_plus(unet, path):
    """The same Plus file as two adapters (positive, negative), as the official code loads it."""
    sd = split_h94(load_file(path))
    unet._load_ip_adapter_weights([sd, sd], low_cpu_mem_usage=False)


class Loop:
    """One image's denoising loop in the official structure."""

    def __init__(self, unet, io, spec):
        self.unet, self.spec = unet, spec
        self.projection = unet.encoder_hid_proj
        self.precomputed = PrecomputedTokens()
        self.scales = SimpleNamespace(unet=unet)
        self.embeds = torch.cat([io["uncond"], io["text"]])
        # pipeline layout: per adapter [2 (uncond image, image), 1 image, ...]; the uncond-image
        # half only ever meets the uncond text row, whose prediction e0 comes from the [0, 0] call
        self.states = [
            torch.stack([io["image_zero"], io["image_pos"]]),
            torch.stack([io["image_zero"], io["image_neg"]]),
        ]
        tokens_zero = self.projection.image_projection_layers[0](io["image_zero"])
        self.tokens = [
            torch.stack([tokens_zero, io["tokens_pos"]]),
            torch.stack([tokens_zero, io["tokens_neg"]]),
        ]

    def set_scale(self, scale):
        IPAdapterMixin.set_ip_adapter_scale(self.scales, scale)

    def pair(self, x, t, image_embeds):
        cond = {"image_embeds": image_embeds}
        return self.unet(x, t, self.embeds, added_cond_kwargs=cond, return_dict=False)[0].chunk(2)

    def run(self, variant):
        """Returns (wall seconds of each step, CPU seconds of each step, final latents)."""
        official = variant == "official"
        self.unet.encoder_hid_proj = self.projection if official else self.precomputed
        image_embeds = self.states if official else self.tokens
        g = GUIDANCE
        w_t, w_p, w_n, lam = g["textScale"], g["positiveScale"], g["negativeScale"], g["adapterScale"]
        scheduler = DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER)
        scheduler.set_timesteps(self.spec["steps"])
        s = self.spec["latent"]
        noise = torch.randn([1, 4, s, s], generator=torch.Generator().manual_seed(NOISE_SEED))
        latents = noise * scheduler.init_noise_sigma
        self.set_scale([lam, lam])
        wall, cpu = [], []
        for t in scheduler.timesteps:
            t0, c0 = time.perf_counter(), time.process_time()
            x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            _, e_cpn = self.pair(x, t, image_embeds)
            self.set_scale([lam, 0])
            _, e_cp = self.pair(x, t, image_embeds)
            self.set_scale([0, 0])
            e_0, e_c = self.pair(x, t, image_embeds)
            self.set_scale([lam, lam])
            eps = e_0 + w_t * (e_c - e_0) + w_p * (e_cp - e_c) + (-w_n) * (e_cpn - e_cp)
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        return wall, cpu, latents


def write_case(d, spec):
    torch.manual_seed(spec["seed"])
    unet = UNet2DConditionModel(**spec["config"]).eval()
    unet.save_pretrained(os.path.join(d, "unet"), safe_serialization=True)
    cross = spec["config"]["cross_attention_dim"]
    plus = plus_state_dict(spec["plus"], cross, cross_layers(unet), spec["seed"] + 10)
    save_file(plus, os.path.join(d, "ip-adapter-plus.safetensors"))
    attach_two_plus(unet, os.path.join(d, "ip-adapter-plus.safetensors"))
    g = torch.Generator().manual_seed(spec["seed"] + 20)
    p = spec["plus"]
    io = {k: torch.randn(1, TEXT_LEN, cross, generator=g) for k in ("uncond", "text")}
    for k in ("image_zero", "image_pos", "image_neg"):
        io[k] = torch.randn(1, p["seq"], p["input"], generator=g)
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    io["tokens_pos"] = projection(io["image_pos"])
    io["tokens_neg"] = projection(io["image_neg"])
    io["latents"] = Loop(unet, io, spec).run("official")[2]
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(d, "io.safetensors"))


def ensure_models(cache):
    def write(tmp):
        for name, spec in CASES.items():
            write_case(os.path.join(tmp, name), spec)
    ensure_cache(cache, VERSION, write)


def load_case(cache, name):
    d = os.path.join(cache, name)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(d, "unet")).eval()
    attach_two_plus(unet, os.path.join(d, "ip-adapter-plus.safetensors"))
    return Loop(unet, load_file(os.path.join(d, "io.safetensors")), CASES[name])


def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def unet_flops(config, latent, batch):
    """One UNet forward without adapters (their 16 image tokens add well under 1%)."""
    unet = UNet2DConditionModel(**config)
    x = torch.randn(batch, 4, latent, latent)
    text = torch.randn(batch, TEXT_LEN, config["cross_attention_dim"])
    return count_flops(lambda: unet(x, torch.tensor(500.0), text))


def full_size_flops():
    """FLOPs of one step's UNet work (mid and full size, batch 4), of the conditioning encoders for
    one image (the empty and the class prompt through CLIP ViT-L/14 text, the positive and the
    negative image through ViT-H/14 and the Plus resampler) and of one VAE decode at 512 px."""
    with torch.device("meta"):
        out = {
            "unet_mid_b4": unet_flops(CASES["mid"]["config"], CASES["mid"]["latent"], 4),
            "unet_full_b4": unet_flops(SD15_UNET, 64, 4),
        }
        text = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=TEXT_LEN,
            )
        )
        ids = torch.zeros(2, TEXT_LEN, dtype=torch.long)
        # ViT-H/14 as in h94/IP-Adapter models/image_encoder; Plus reads the penultimate states
        vision = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=16,
                image_size=224,
                patch_size=14,
            )
        )
        pixels = torch.randn(2, 3, 224, 224)
        p = CASES["mid"]["plus"]
        resampler = IPAdapterPlusImageProjection(
            embed_dims=p["input"],
            output_dims=768,
            hidden_dims=p["width"],
            heads=p["heads"],
            num_queries=p["queries"],
        )
        states = torch.randn(2, p["seq"], p["input"])
        out["encode"] = (
            count_flops(lambda: text(ids))
            + count_flops(lambda: vision(pixels, output_hidden_states=True))
            + count_flops(lambda: resampler(states))
        )
        vae = AutoencoderKL(
            block_out_channels=[128, 256, 512, 512],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        latents = torch.randn(1, 4, 64, 64)
        out["decode"] = count_flops(lambda: vae.decode(latents))
    return out



def main():
    if len(sys.argv) != 3:
        sys.exit("usage: dipsy_bench.py CACHE_DIR THREADS")
    cache = sys.argv[1]
    torch.set_num_threads(int(sys.argv[2]))
    sys.stdout = sys.stderr
    torch.set_grad_enabled(False)  # what torch.no_grad does, for the whole session
    ensure_models(cache)
    cases = {k: case_info(v) for k, v in CASES.items()}
    reply({"threads": torch.get_num_threads(), "guidance": GUIDANCE, "cases": cases})
    loop = None
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "load":
            loop = None
            loop = load_case(cache, req["case"])
            reply({"case": req["case"]})
        elif req["op"] == "run":
            wall, cpu, _ = loop.run(req["variant"])
            reply({"step_s": wall, "step_cpu_s": cpu})
        elif req["op"] == "flops":
            reply(full_size_flops())
        else:
            sys.exit(f"unknown request {line!r}")


def reply(obj):
    PROTOCOL.write(json.dumps(obj) + "\n")
    PROTOCOL.flush()


if __name__ == "__main__":
    main()
