"""Reference guidance combinations, written the way the DIPSY / diffusers code writes them.

Usage: python guidance_ref.py OUTDIR -> OUTDIR/guidance.safetensors
"""
import os
import sys

import torch
from safetensors.torch import save_file


def main(out):
    g = torch.Generator().manual_seed(7)
    e0, ec, ecp, ecpn, ecn, e0n = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(6))
    wT, wP, wN = 7.5, 6.0, 6.0
    # Official DIPSY loop: signed image weight for the second adapter (guidance_image_two = -6).
    dipsy = e0 + wT * (ec - e0) + wP * (ecp - ec) + (-wN) * (ecpn - ecp)
    single = e0 + wT * (ec - e0) + wP * (ecp - ec)
    cfg = e0 + wT * (ec - e0)
    neg_text = e0 + wT * (ec - e0) + wP * (ecp - ec) - wN * (ecn - ec)
    diffusers_style = e0n + wT * (ecp - e0n)
    custom = e0 + 3.0 * (ec - e0) + 2.0 * (ecp - ec) - 1.5 * (ecpn - ecp)
    save_file(
        {
            "uncond": e0, "text": ec, "text+pos": ecp, "text+pos+neg": ecpn, "text+neg": ecn,
            "uncond+neg": e0n, "out.dipsy": dipsy, "out.single-ip": single, "out.cfg": cfg,
            "out.neg-text-relative": neg_text, "out.diffusers-style": diffusers_style,
            "out.dipsy.custom": custom,
        },
        os.path.join(out, "guidance.safetensors"),
    )


if __name__ == "__main__":
    os.makedirs(sys.argv[1], exist_ok=True)
    main(sys.argv[1])
