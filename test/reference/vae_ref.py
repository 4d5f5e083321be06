"""Reference fixtures for the VAE (diffusers AutoencoderKL).

Usage: python test/reference/vae_ref.py OUTDIR

For each case, writes OUTDIR/<case>/vae/ (config.json + diffusion_pytorch_model.safetensors, exactly
as save_pretrained lays them out) and OUTDIR/<case>/io.safetensors with the fixed inputs and the
reference outputs:
  image      [B, 3, H, W] input in [-1, 1]
  latents    [B, C, H/f, W/f] scaled latents (as a sampler would hand them to the decoder)
  mean, logvar   the encoder's DiagonalGaussian parameters for `image`
  sample     posterior.sample(torch.Generator().manual_seed(SAMPLE_SEED))
  decoded    vae.decode(latents).sample (raw, no rescaling)
  decoded_image  (vae.decode(latents / scaling_factor [+ shift]) / 2 + 0.5).clamp(0, 1)
"""

import json
import os
import sys

import torch
from diffusers import AutoencoderKL

from common import TINY_VAE, write_io

SAMPLE_SEED = 1234

CASES = {
    # 2 blocks, groups 8: the shape of the Deno tiny preset.
    "tiny": dict(config=TINY_VAE, image=(2, 3, 32, 32)),
    # 3 blocks, 2 resnets per block, groups 32, shortcut convs in both directions.
    "mid": dict(
        config=dict(
            block_out_channels=[64, 128, 128],
            down_block_types=["DownEncoderBlock2D"] * 3,
            up_block_types=["UpDecoderBlock2D"] * 3,
            layers_per_block=2,
            norm_num_groups=32,
            latent_channels=4,
            sample_size=64,
        ),
        image=(1, 3, 64, 64),
    ),
    # The optional parts switched off, and a shift factor: exercises the config branches.
    "bare": dict(
        config=dict(
            block_out_channels=[16, 32],
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=3,
            sample_size=16,
            scaling_factor=0.5,
            shift_factor=0.1,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        ),
        image=(1, 3, 16, 24),
    ),
}


def perturb_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Default init leaves norm scales at 1 and biases at 0; move them so the test sees them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def build_case(outdir: str, name: str, spec: dict, seed: int) -> None:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**spec["config"]).eval()
    perturb_norms(vae, torch.Generator().manual_seed(seed + 1))
    case_dir = os.path.join(outdir, name)
    vae.save_pretrained(os.path.join(case_dir, "vae"), safe_serialization=True)

    cfg = vae.config
    gen = torch.Generator().manual_seed(seed + 2)
    image = torch.rand(spec["image"], generator=gen) * 2 - 1
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    b, _, h, w = spec["image"]
    latents = torch.randn((b, cfg.latent_channels, h // factor, w // factor), generator=gen)

    with torch.no_grad():
        posterior = vae.encode(image).latent_dist
        sample = posterior.sample(generator=torch.Generator().manual_seed(SAMPLE_SEED))
        decoded = vae.decode(latents).sample
        unscaled = latents / cfg.scaling_factor
        if cfg.shift_factor is not None:
            unscaled = unscaled + cfg.shift_factor
        decoded_image = (vae.decode(unscaled).sample / 2 + 0.5).clamp(0, 1)

    tensors = {
        "image": image,
        "latents": latents,
        "mean": posterior.mean,
        "logvar": posterior.logvar,
        "sample": sample,
        "decoded": decoded,
        "decoded_image": decoded_image,
    }
    write_io(case_dir, tensors)
    with open(os.path.join(case_dir, "meta.json"), "w") as f:
        json.dump({"sample_seed": SAMPLE_SEED}, f)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: vae_ref.py OUTDIR")
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    torch.set_grad_enabled(False)
    for i, (name, spec) in enumerate(CASES.items()):
        build_case(outdir, name, spec, seed=100 * (i + 1))


if __name__ == "__main__":
    main()
