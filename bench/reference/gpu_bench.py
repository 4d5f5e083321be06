"""The official DIPSY loop in diffusers, eager, on a GPU: the reference side of bench/gpu_bench.ts.

Usage: gpu_bench.py [--smoke] IMAGES_PER_BATCH [IMAGES_PER_BATCH ...]

Builds SD1.5 at its real shapes with random weights directly on the GPU in float16 (no downloads):
the UNet with the same IP-Adapter Plus attached twice (positive and negative), the CLIP ViT-L/14
text encoder, the ViT-H/14 image encoder and the VAE. One image batch is what the official
pipeline (eleftsonis/DIPSY, IPGen/pipeline_stable_diffusion_guidance_scheduler.py) does per call:
encode the prompt and the empty prompt, encode both reference images and their zero images
(Plus reads the penultimate hidden states), then 50 DPM-Solver++ steps of three UNet calls of
batch 2 x images, switched with set_ip_adapter_scale,
  [lam, lam] -> ecpn,  [lam, 0] -> ecp,  [0, 0] -> (e0, ec)
  eps = e0 + wT (ec - e0) + wP (ecp - ec) - wN (ecpn - ecp)          (Eq. 9)
with the image embeddings going through both Plus resamplers inside every UNet call, as the
pipeline passes them, and finally the VAE decode and the copy of the images to the host.

Prints one JSON line per batch size: {"images": n, "s_per_image": seconds, "runs": [...]} (the
first batch of each size is warm-up, left out), then {"peak_bytes": ...}. `--smoke` runs the tiny
shapes on the CPU in float32 for 2 steps: it checks this code on any machine and measures nothing.
"""

import json
import os
import sys
import time

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.loaders.ip_adapter import IPAdapterMixin
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cache import ensure_cache  # noqa: F401,E402  (puts test/reference on sys.path)
from common import SD15_SCHEDULER, SD15_UNET, TINY_UNET, TINY_VAE  # noqa: E402
from models_bench import cross_layers, plus_state_dict, split_h94  # noqa: E402

# The dipsy guidance plugin's defaults, the paper's settings (bench/reference/dipsy_bench.py).
W_TEXT, W_POS, W_NEG, LAM = 7.5, 6.0, 6.0, 0.6
TIMED_RUNS = {1: 3, 8: 1}

# SD1.5 at 512 px with h94/IP-Adapter's ViT-H/14 image encoder and ip-adapter-plus_sd15, on the GPU
# in float16; "smoke": the tiny shapes on the CPU in float32, 2 steps, to check this code anywhere.
PLANS = {
    "full": dict(
        device="cuda",
        dtype=torch.float16,
        steps=50,
        size=512,
        unet=SD15_UNET,
        plus=dict(input=1280, seq=257, width=768, heads=12, queries=16),
        text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77),
        vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                    num_attention_heads=16, image_size=224, patch_size=14, projection_dim=1024,
                    hidden_act="gelu"),
        vae=dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4,
                 sample_size=512),
    ),
    "smoke": dict(
        device="cpu",
        dtype=torch.float32,
        steps=2,
        size=32,
        unet=TINY_UNET,
        plus=dict(input=48, seq=65, width=128, heads=2, queries=6),
        text=dict(vocab_size=520, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77, bos_token_id=518,
                  eos_token_id=519, pad_token_id=519),
        vision=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=4, projection_dim=16, hidden_act="gelu"),
        vae=TINY_VAE,
    ),
}


class Models:
    def __init__(self, plan):
        self.plan = plan
        device, dtype = plan["device"], plan["dtype"]
        torch.manual_seed(0)
        # Made on the device: initialising SD1.5's 1.7 billion weights on the CPU would take longer
        # than the measurement. The adapter weights are drawn on the CPU (plus_state_dict).
        with torch.device(device):
            unet = UNet2DConditionModel(**plan["unet"])
        cross = plan["unet"]["cross_attention_dim"]
        plus = plus_state_dict(plan["plus"], cross, cross_layers(unet), 1)
        unet._load_ip_adapter_weights([split_h94(plus), split_h94(plus)], low_cpu_mem_usage=False)
        self.unet = unet.to(device, dtype).eval()
        with torch.device(device):
            self.text = CLIPTextModel(CLIPTextConfig(**plan["text"])).to(dtype).eval()
            self.vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**plan["vision"]))
            self.vision = self.vision.to(dtype).eval()
            self.vae = AutoencoderKL(**plan["vae"]).to(dtype).eval()
        self.factor = 2 ** (len(plan["vae"]["block_out_channels"]) - 1)
        self.scales = type("Scales", (), {"unet": self.unet})()

    def set_scale(self, scale):
        IPAdapterMixin.set_ip_adapter_scale(self.scales, scale)

    def image_states(self, pixels):
        """Plus's input as the pipeline lays it out: the penultimate hidden states of the zero
        images and of the images, [2 n, 1 image each, 257, 1280]."""
        cond = self.vision(pixels, output_hidden_states=True).hidden_states[-2]
        zero = self.vision(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        return torch.cat([zero, cond]).unsqueeze(1)

    def batch(self, n, seed):
        """n images as the official pipeline makes them; returns the images on the host."""
        p = self.plan
        device, dtype, vocab = p["device"], p["dtype"], p["text"]["vocab_size"]
        side = p["vision"]["image_size"]
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (n, 77), generator=g).to(device)
        empty = torch.randint(0, vocab, (n, 77), generator=g).to(device)
        embeds = torch.cat([self.text(empty)[0], self.text(ids)[0]])
        pos = torch.randn(n, 3, side, side, generator=g).to(device, dtype)
        neg = torch.randn(n, 3, side, side, generator=g).to(device, dtype)
        cond = {"image_embeds": [self.image_states(pos), self.image_states(neg)]}
        scheduler = DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER)
        scheduler.set_timesteps(p["steps"], device=device)
        latent = p["size"] // self.factor
        latents = torch.randn(n, 4, latent, latent, generator=g).to(device, dtype)
        latents = latents * scheduler.init_noise_sigma

        def pair(x, t):
            out = self.unet(x, t, embeds, added_cond_kwargs=cond, return_dict=False)[0]
            return out.chunk(2)

        self.set_scale([LAM, LAM])
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            _, e_cpn = pair(x, t)
            self.set_scale([LAM, 0])
            _, e_cp = pair(x, t)
            self.set_scale([0, 0])
            e_0, e_c = pair(x, t)
            self.set_scale([LAM, LAM])
            eps = e_0 + W_TEXT * (e_c - e_0) + W_POS * (e_cp - e_c) + (-W_NEG) * (e_cpn - e_cp)
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
        images = self.vae.decode(latents / 0.18215, return_dict=False)[0]
        return (images / 2 + 0.5).clamp(0, 1).float().cpu()


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


PROTOCOL = sys.stdout


def reply(obj):
    PROTOCOL.write(json.dumps(obj) + "\n")
    PROTOCOL.flush()


def main():
    args = sys.argv[1:]
    plan = PLANS["smoke" if "--smoke" in args else "full"]
    sizes = [int(a) for a in args if a != "--smoke"] or [1]
    sys.stdout = sys.stderr  # stdout carries the answers only
    torch.set_grad_enabled(False)
    models = Models(plan)
    device = plan["device"]
    for n in sizes:
        runs = []
        for r in range(1 + TIMED_RUNS.get(n, 1)):
            synchronize(device)
            t0 = time.perf_counter()
            models.batch(n, 100 + r)
            synchronize(device)
            runs.append((time.perf_counter() - t0) / n)
        timed = sorted(runs[1:])
        reply({"images": n, "s_per_image": timed[len(timed) // 2], "runs": runs})
    if device == "cuda":
        reply({"peak_bytes": torch.cuda.max_memory_allocated()})


if __name__ == "__main__":
    main()
