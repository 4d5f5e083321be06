"""Builders and writers shared by the test/reference/*_ref.py fixture scripts.

The fixture bootstrap (native/bootstrap.ts) hashes this file into every fixture's stamp, so a
change here regenerates every fixture.
"""

import json
import os

import torch
from safetensors.torch import save_file

# ---------------------------------------------------------------------------------------------
# Tensors and models


def save_tensors(path, tensors):
    """A safetensors file of `tensors` (name -> tensor), made contiguous as save_file wants."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def write_io(folder, tensors):
    """`folder`/io.safetensors: a fixture's reference inputs and outputs (test/util.ts loadIO)."""
    save_tensors(os.path.join(folder, "io.safetensors"), tensors)


def perturb(model, seed, bias_std=0.1):
    """Default inits leave norm affines at 1/0 and biases at 0; move them (norm weights by 0.1 x
    N(0, 1), biases by `bias_std` x N(0, 1)) so that a dropped or misread term shows.

    Draws one N(0, 1) tensor per parameter, in `named_parameters()` order, from `seed`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(bias_std * noise)


def build(make, seed, bias_std=0.1):
    """`make()` (a model) initialised under torch.manual_seed(seed), in eval mode, perturbed with
    seed + 1."""
    torch.manual_seed(seed)
    model = make().eval()
    perturb(model, seed + 1, bias_std)
    return model


def save_model(model, path, shard=None):
    """save_pretrained in safetensors, sharded at `shard` (e.g. "4MB") when given."""
    kwargs = {"safe_serialization": True}
    if shard:
        kwargs["max_shard_size"] = shard
    model.save_pretrained(path, **kwargs)


# plugins/sd15/vae_config.ts TINY_VAE_CONFIG: 2 blocks, groups 8.
TINY_VAE = dict(
    block_out_channels=[32, 64],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=32,
)

# plugins/sd15/unet_config.ts TINY_UNET_CONFIG_JSON: the Deno tiny preset's UNet.
TINY_UNET = dict(
    act_fn="silu",
    attention_head_dim=2,
    block_out_channels=[32, 64],
    cross_attention_dim=32,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=8,
)

# SD1.5's UNet structure (unet/config.json's architecture keys); benches scale its widths down.
SD15_UNET = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=64,
)

# SD1.5's scheduler/scheduler_config.json as the Hub ships it (no timestep_spacing key: each
# scheduler class falls back to its own default through from_config); write_json writes it byte for
# byte as runwayml/stable-diffusion-v1-5 has it.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# ---------------------------------------------------------------------------------------------
# JSON and CLIP tokenizer folders

MAX_LENGTH = 77
SOT = "<|startoftext|>"
EOT = "<|endoftext|>"

# Mirrored in plugins/clip/tokenizer.ts (TINY_MERGES); the test checks both agree.
TINY_MERGES = [
    "t h",
    "th e</w>",
    "a t</w>",
    "c at</w>",
    "o f</w>",
    "\u00c3 \u00a9",
]


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def bytes_to_unicode():
    # Same table as OpenAI's simple_tokenizer.py / GPT-2: printable bytes map to themselves,
    # the rest to U+0100 onwards, so every byte is a visible, non-whitespace character.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def bpe_vocab(merges):
    """CLIP's vocabulary layout: 256 byte tokens, 256 byte+</w> tokens (both in code point order),
    one token per merge, then SOT and EOT."""
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split(" ")) for m in merges]
    vocab += [SOT, EOT]
    assert len(set(vocab)) == len(vocab), "duplicate vocab entries"
    return {tok: i for i, tok in enumerate(vocab)}


def write_vocab_merges(folder, vocab, merges):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))


def added_token(content, with_type):
    tok = {"content": content, "lstrip": False, "normalized": True, "rstrip": False}
    tok["single_word"] = False
    if with_type:
        tok = {"__type": "AddedToken", **tok}
    return tok


def sd15_configs(pad=EOT, name="openai/clip-vit-large-patch14"):
    # Field-for-field what runwayml/stable-diffusion-v1-5 tokenizer/ ships (SD2 differs in pad).
    config = {
        "add_prefix_space": False,
        "bos_token": added_token(SOT, True),
        "do_lower_case": True,
        "eos_token": added_token(EOT, True),
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "name_or_path": name,
        "pad_token": pad,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added_token(EOT, True),
    }
    special = {
        "bos_token": added_token(SOT, False),
        "eos_token": added_token(EOT, False),
        "pad_token": pad,
        "unk_token": added_token(EOT, False),
    }
    return config, special


def write_sd_layout(folder, vocab, merges, pad=EOT):
    """A diffusers SD1.5 `tokenizer/` folder: vocab.json, merges.txt and the two configs."""
    write_vocab_merges(folder, vocab, merges)
    config, special = sd15_configs(pad)
    write_json(os.path.join(folder, "tokenizer_config.json"), config)
    write_json(os.path.join(folder, "special_tokens_map.json"), special)
