"""Reference fixtures for end-to-end DIPSY generation (SD1.5 + dual IP-Adapter guidance).

Usage: python test/reference/dipsy_ref.py OUTDIR

Builds tiny random models with diffusers/transformers and saves them in the real on-disk layouts:
  OUTDIR/model/          an SD1.5 diffusers folder: model_index.json, unet/, vae/ (2x factor),
                         text_encoder/ (CLIPTextModel over the byte-level tokenizer's 520 ids),
                         tokenizer/ (vocab.json + merges.txt + the SD1.5 tokenizer configs),
                         scheduler/scheduler_config.json (SD1.5's file, verbatim)
  OUTDIR/image_encoder/  CLIPVisionModelWithProjection (hidden 48 = the Plus resampler input,
                         projection 16 = the base projection input), image_size 32
  OUTDIR/ip-adapter-plus_tiny.safetensors, OUTDIR/ip-adapter_tiny.safetensors (h94 flat layout)
  OUTDIR/ip-adapter-plus_tiny_b.safetensors   the Plus file with every tensor perturbed (a second
                         adapter of the same kind, for a different file per positive/negative)
  OUTDIR/ip-adapter-plus_tiny_q4.safetensors  a Plus file with 4 tokens instead of 6 (a mismatch)
  OUTDIR/images/*.png    reference images of odd sizes

Then it generates as the official DIPSY code does (eleftsonis/DIPSY,
IPGen/pipeline_stable_diffusion_guidance_scheduler.py): a StableDiffusionPipeline loaded from the
folder, `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`, the IP-Adapter file
loaded twice with `load_ip_adapter`, text CFG with the empty negative prompt, and per step three
UNet calls of batch 2 (uncond, text) switched with `set_ip_adapter_scale`:
  [lam, lam] -> ecpn,  [lam, 0] -> ecp,  [0, 0] -> (e0, ec)
  eps = e0 + wT (ec - e0) + wP (ecp - ec) - wN (ecpn - ecp)          (Eq. 9)
The scales are set explicitly before the first step (the official first-step scale-1.0 quirk is
not reproduced). Each image runs alone, as in the official code; the Deno side batches them.
A case may give the negative image its own adapter file and scale (`weight_name=[pos, neg]`,
`set_ip_adapter_scale([lam, lam_neg])`), as diffusers allows one of each per adapter.

OUTDIR/cases.json describes every case (guidance, options, sampler, adapter file, requests) and
OUTDIR/io.safetensors holds per case `<case>.timesteps` (the scheduler's), `<case>.noise`,
`<case>.latents_step1`, `<case>.latents` (final) and `<case>.image` (decoded, in [0, 1]);
OUTDIR/out/<case>_<i>.png are the decoded images.
"""

import os
import sys

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from common import (
    SD15_SCHEDULER,
    TINY_MERGES,
    TINY_UNET,
    TINY_VAE,
    bpe_vocab,
    build,
    save_model,
    save_tensors,
    write_io,
    write_json,
    write_sd_layout,
)

# Honour OMP_NUM_THREADS (the fixture runner sets it): oversubscribed OpenMP threads spin-wait.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))

SIZE = 32  # pixels; the tiny VAE halves it
STEPS = 10  # < 15: DPM-Solver++ takes its lower-order final steps

UNET = TINY_UNET

TEXT = dict(
    vocab_size=520,
    hidden_size=32,  # = the UNet's cross_attention_dim
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=16,
    bos_token_id=518,
    eos_token_id=519,
    pad_token_id=519,
)

VISION = dict(
    hidden_size=48,  # Plus: the resampler's proj_in input
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=SIZE,
    patch_size=4,
    hidden_act="gelu",
    projection_dim=16,  # base: the projection's input
)

# IP-Adapter projections for cross_attention_dim 32 (plugins/sd15/ip_adapter.ts TINY_IP_*).
PLUS = dict(input=48, width=128, heads=2, queries=6, depth=4, cross=32)
BASE = dict(embed=16, tokens=4, cross=32)

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

PLUS_FILE = "ip-adapter-plus_tiny.safetensors"
BASE_FILE = "ip-adapter_tiny.safetensors"
PLUS_B_FILE = "ip-adapter-plus_tiny_b.safetensors"
PLUS_Q4_FILE = "ip-adapter-plus_tiny_q4.safetensors"

IMAGES = {"a": (37, 29), "b": (23, 41), "c": (45, 45), "d": (31, 50)}

DIPSY_OPTS = dict(textScale=7.5, positiveScale=6.0, negativeScale=6.0, adapterScale=0.6)

CASES = [
    dict(
        name="dipsy",
        guidance="dipsy",
        options=DIPSY_OPTS,
        sampler="dpm-solver++",
        ip_adapter=PLUS_FILE,
        requests=[
            dict(prompt="A photo of the cat", seed=7, positive="a", negative="b"),
            dict(prompt="The CAT at the caf\u00e9", seed=1234, positive="c", negative="a"),
        ],
    ),
    dict(
        name="single-ip",
        guidance="single-ip",
        options=dict(textScale=7.5, positiveScale=6.0, adapterScale=0.6),
        sampler="dpm-solver++",
        ip_adapter=PLUS_FILE,
        requests=[dict(prompt="a photo of the cat", seed=3, positive="d")],
    ),
    dict(
        name="cfg",
        guidance="cfg",
        options=dict(textScale=7.5),
        sampler="dpm-solver++",
        ip_adapter=None,
        requests=[dict(prompt="the cat of the hat", seed=5)],
    ),
    dict(
        name="dipsy-ddim",
        guidance="dipsy",
        options=DIPSY_OPTS,
        sampler="ddim",
        ip_adapter=PLUS_FILE,
        requests=[dict(prompt="a cat", seed=9, positive="d", negative="c")],
    ),
    dict(
        name="dipsy-euler",
        guidance="dipsy",
        options=DIPSY_OPTS,
        sampler="euler",
        ip_adapter=PLUS_FILE,
        requests=[dict(prompt="a cat", seed=9, positive="d", negative="c")],
    ),
    dict(
        name="dipsy-base",
        guidance="dipsy",
        options=DIPSY_OPTS,
        sampler="dpm-solver++",
        ip_adapter=BASE_FILE,
        requests=[dict(prompt="the hat", seed=21, positive="b", negative="d")],
    ),
    # Per-adapter settings: the negative image through another file at another scale.
    dict(
        name="dipsy-two-adapters",
        guidance="dipsy",
        options={**DIPSY_OPTS, "negativeAdapterScale": 0.9},
        sampler="dpm-solver++",
        ip_adapter=PLUS_FILE,
        negative_ip_adapter=PLUS_B_FILE,
        requests=[
            dict(prompt="A photo of the cat", seed=7, positive="a", negative="b"),
            dict(prompt="The CAT at the caf\u00e9", seed=1234, positive="c", negative="a"),
        ],
    ),
    dict(
        name="dipsy-negative-scale",
        guidance="dipsy",
        options={**DIPSY_OPTS, "negativeAdapterScale": 0.25},
        sampler="dpm-solver++",
        ip_adapter=PLUS_FILE,
        requests=[dict(prompt="A photo of the cat", seed=7, positive="a", negative="b")],
    ),
]

SCHEDULERS = {
    "dpm-solver++": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
}

# ---------------------------------------------------------------------------------------------
# Models


def byte_level_vocab():
    """The vocabulary of the byte-level tokenizer (plugins/clip/tokenizer.ts byteLevelFiles())."""
    vocab = bpe_vocab(TINY_MERGES)
    assert len(vocab) == TEXT["vocab_size"]
    return vocab


def cross_layers(unet):
    """(h94 key id, attn2 width) in diffusers' processor order (down, up, mid): ids 1, 3, 5, ..."""
    out = []
    for name in unet.attn_processors.keys():
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name[: -len(".processor")])
            out.append((2 * len(out) + 1, attn.to_q.out_features))
    return out


def ip_state_dict(kind, dims, layers, seed):
    """A flat h94-layout IP-Adapter: image_proj.* and ip_adapter.{k}.to_k_ip / to_v_ip."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std=None):
        return torch.randn(shape, generator=g) * (shape[-1] ** -0.5 if std is None else std)

    def ln(prefix, n):
        sd[prefix + ".weight"] = 1 + w(n, std=0.1)
        sd[prefix + ".bias"] = w(n, std=0.1)

    sd = {}
    cross = dims["cross"]
    if kind == "base":
        sd["image_proj.proj.weight"] = w(dims["tokens"] * cross, dims["embed"])
        sd["image_proj.proj.bias"] = w(dims["tokens"] * cross, std=0.1)
        ln("image_proj.norm", cross)
    else:
        width, inner = dims["width"], dims["heads"] * 64
        sd["image_proj.latents"] = w(1, dims["queries"], width)
        sd["image_proj.proj_in.weight"] = w(width, dims["input"])
        sd["image_proj.proj_in.bias"] = w(width, std=0.1)
        for l in range(dims["depth"]):
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
        sd[f"ip_adapter.{key_id}.to_v_ip.weight"] = w(hidden, cross, std=2 * cross**-0.5)
    return sd


def perturbed(sd, seed, amount=0.3):
    """Every tensor moved by `amount` of its own spread: same shapes, clearly other weights."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(sd):
        v = sd[k]
        spread = v.std() if v.numel() > 1 else v.abs()
        out[k] = v + amount * spread * torch.randn(v.shape, generator=g)
    return out


def reference_image(size, seed):
    """A smooth RGB pattern plus noise: resampling and cropping both matter."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.05, 0.4), rng.uniform(0.05, 0.4), rng.uniform(0, 6.3)
        chans.append(0.5 + 0.4 * np.sin(fx * x + fy * y + ph))
    img = np.stack(chans, -1) + rng.normal(0, 0.08, (h, w, 3))
    return Image.fromarray(np.clip(np.round(img * 255), 0, 255).astype(np.uint8), "RGB")


def write_models(out):
    model = os.path.join(out, "model")
    os.makedirs(model, exist_ok=True)
    write_json(os.path.join(model, "model_index.json"), MODEL_INDEX)

    # Norm affines start at 1/0 and biases at 0: build() moves them so that a dropped term shows.
    unet = build(lambda: UNet2DConditionModel(**UNET), 100, bias_std=0.05)
    save_model(unet, os.path.join(model, "unet"))
    vae = build(lambda: AutoencoderKL(**TINY_VAE), 200, bias_std=0.05)
    save_model(vae, os.path.join(model, "vae"))
    text = build(lambda: CLIPTextModel(CLIPTextConfig(**TEXT)), 300, bias_std=0.05)
    save_model(text, os.path.join(model, "text_encoder"))
    # SD1.5's tokenizer/ files around the byte-level vocabulary.
    write_sd_layout(os.path.join(model, "tokenizer"), byte_level_vocab(), TINY_MERGES)
    os.makedirs(os.path.join(model, "scheduler"), exist_ok=True)
    write_json(os.path.join(model, "scheduler", "scheduler_config.json"), SD15_SCHEDULER)

    encoder = build(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)), 400, bias_std=0.05)
    save_model(encoder, os.path.join(out, "image_encoder"))
    layers = cross_layers(unet)
    save_tensors(os.path.join(out, PLUS_FILE), ip_state_dict("plus", PLUS, layers, 500))
    save_tensors(os.path.join(out, BASE_FILE), ip_state_dict("base", BASE, layers, 600))
    plus = ip_state_dict("plus", PLUS, layers, 500)
    save_tensors(os.path.join(out, PLUS_B_FILE), perturbed(plus, 510))
    save_tensors(os.path.join(out, PLUS_Q4_FILE), ip_state_dict("plus", {**PLUS, "queries": 4}, layers, 520))

    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    for i, (name, size) in enumerate(IMAGES.items()):
        reference_image(size, 700 + i).save(os.path.join(out, "images", f"{name}.png"))


# ---------------------------------------------------------------------------------------------
# Generation, structured as the official DIPSY pipeline


def load_pipeline(out, ip_file, adapters, negative_file=None):
    encoder = CLIPVisionModelWithProjection.from_pretrained(os.path.join(out, "image_encoder")).eval()
    size = encoder.config.image_size
    pipe = StableDiffusionPipeline.from_pretrained(
        os.path.join(out, "model"),
        safety_checker=None,
        requires_safety_checker=False,
        image_encoder=encoder,
        feature_extractor=CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        ),
    )
    pipe.set_progress_bar_config(disable=True)
    if ip_file:
        names = [ip_file] * adapters
        if negative_file and adapters > 1:
            names[1] = negative_file
        pipe.load_ip_adapter(out, subfolder="", weight_name=names, image_encoder_folder=None)
    return pipe


def unet_pair(pipe, x, t, embeds, image_embeds):
    kwargs = {"added_cond_kwargs": {"image_embeds": image_embeds}} if image_embeds is not None else {}
    return pipe.unet(x, t, encoder_hidden_states=embeds, return_dict=False, **kwargs)[0].chunk(2)


def generate_one(pipe, case, req, images):
    """One image: returns (initial noise, latents after step 1, final latents, timesteps)."""
    o = case["options"]
    w_t, lam = o["textScale"], o.get("adapterScale", 0.0)
    lam_n = o.get("negativeAdapterScale")
    lam_n = lam if lam_n is None else lam_n
    w_p, w_n = o.get("positiveScale", 0.0), o.get("negativeScale", 0.0)
    guidance = case["guidance"]

    scheduler = SCHEDULERS[case["sampler"]].from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    # Empty negative prompt: encode_prompt's default with CFG on.
    cond, uncond = pipe.encode_prompt(req["prompt"], "cpu", 1, True, negative_prompt=None)
    embeds = torch.cat([uncond, cond])
    image_embeds = None
    if guidance == "dipsy":
        adapter_images = [images[req["positive"]], images[req["negative"]]]
    elif guidance == "single-ip":
        adapter_images = [images[req["positive"]]]
    else:
        adapter_images = None
    if adapter_images:
        image_embeds = pipe.prepare_ip_adapter_image_embeds(adapter_images, None, "cpu", 1, True)

    noise = torch.randn([1, 4, SIZE // 2, SIZE // 2], generator=torch.Generator().manual_seed(req["seed"]))
    latents = noise * scheduler.init_noise_sigma
    if guidance == "dipsy":
        pipe.set_ip_adapter_scale([lam, lam_n])
    elif guidance == "single-ip":
        pipe.set_ip_adapter_scale([lam])
    after_first = None
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        if guidance == "dipsy":
            _, e_cpn = unet_pair(pipe, x, t, embeds, image_embeds)
            pipe.set_ip_adapter_scale([lam, 0])
            _, e_cp = unet_pair(pipe, x, t, embeds, image_embeds)
            pipe.set_ip_adapter_scale([0, 0])
            e_0, e_c = unet_pair(pipe, x, t, embeds, image_embeds)
            pipe.set_ip_adapter_scale([lam, lam_n])
            # The official call passes the negative weight signed: guidance_image_two = -wN.
            eps = e_0 + w_t * (e_c - e_0) + w_p * (e_cp - e_c) + (-w_n) * (e_cpn - e_cp)
        elif guidance == "single-ip":
            _, e_cp = unet_pair(pipe, x, t, embeds, image_embeds)
            pipe.set_ip_adapter_scale([0])
            e_0, e_c = unet_pair(pipe, x, t, embeds, image_embeds)
            pipe.set_ip_adapter_scale([lam])
            eps = e_0 + w_t * (e_c - e_0) + w_p * (e_cp - e_c)
        elif guidance == "cfg":
            e_0, e_c = unet_pair(pipe, x, t, embeds, None)
            eps = e_0 + w_t * (e_c - e_0)
        else:
            raise ValueError(guidance)
        latents = scheduler.step(eps, t, latents, return_dict=False)[0]
        if i == 0:
            after_first = latents.clone()
    return noise, after_first, latents, scheduler.timesteps.to(torch.float64)


def decode(pipe, latents):
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1)


def to_png(image, path):
    arr = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr, "RGB").save(path)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: dipsy_ref.py OUTDIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    write_models(out)
    images = {k: Image.open(os.path.join(out, "images", f"{k}.png")).convert("RGB") for k in IMAGES}

    io, meta = {}, []
    os.makedirs(os.path.join(out, "out"), exist_ok=True)
    with torch.no_grad():
        for case in CASES:
            adapters = {"dipsy": 2, "single-ip": 1}.get(case["guidance"], 0)
            pipe = load_pipeline(
                out, case["ip_adapter"] if adapters else None, adapters, case.get("negative_ip_adapter")
            )
            runs = [generate_one(pipe, case, r, images) for r in case["requests"]]
            name = case["name"]
            io[f"{name}.noise"] = torch.cat([r[0] for r in runs])
            io[f"{name}.latents_step1"] = torch.cat([r[1] for r in runs])
            io[f"{name}.latents"] = torch.cat([r[2] for r in runs])
            io[f"{name}.timesteps"] = runs[0][3]
            io[f"{name}.image"] = decode(pipe, io[f"{name}.latents"])
            for i, img in enumerate(io[f"{name}.image"]):
                to_png(img, os.path.join(out, "out", f"{name}_{i}.png"))
            scale = io[f"{name}.latents"].abs().max().item()
            print(f"{name}: final latents max |x| = {scale:.3f}")
            meta.append(
                {
                    **{k: v for k, v in case.items() if k != "requests"},
                    "adapters": adapters,
                    "steps": STEPS,
                    "width": SIZE,
                    "height": SIZE,
                    "requests": [
                        {
                            "prompt": r["prompt"],
                            "seed": r["seed"],
                            **{k: f"images/{r[k]}.png" for k in ("positive", "negative") if k in r},
                        }
                        for r in case["requests"]
                    ],
                }
            )
    write_io(out, io)
    write_json(os.path.join(out, "cases.json"), {"model": "model", "image_encoder": "image_encoder", "cases": meta})
    print(f"wrote DIPSY fixtures to {out}")


if __name__ == "__main__":
    main()
