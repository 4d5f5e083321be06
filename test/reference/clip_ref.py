"""Reference fixtures for the CLIP encoders (plugins/clip/).

Usage: .venv/bin/python test/reference/clip_ref.py OUTDIR

Builds small random transformers CLIP models with fixed seeds, saves them in the real on-disk
layouts (config.json + model.safetensors, or sharded with model.safetensors.index.json), runs them
on fixed inputs and writes inputs and outputs to OUTDIR/<name>/io.safetensors:

  text/         CLIPTextModel, SD1.5-like config (quick_gelu, legacy eos_token_id 2), keys as
                transformers 5 saves them (no prefix)
  text_legacy/  the same weights as SD1.5's text_encoder file holds them: under `text_model.`, plus
                the `position_ids` buffer
  vision/       CLIPVisionModelWithProjection shaped like the IP-Adapter image encoder (gelu)
  clip/         CLIPModel (both towers quick_gelu, explicit eos_token_id), with `position_ids`
                buffers like openai/clip-vit-base-patch16
  mid_text/     CLIPTextModelWithProjection, hidden 256, 4 layers, 77 tokens, sharded
  mid_vision/   CLIPVisionModelWithProjection, hidden 256, 4 layers, 224 px / patch 14, sharded
  configs/      real-world config.json files and the values transformers resolves from them
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from common import build, save_model, write_io

torch.set_grad_enabled(False)

VOCAB = 600
BOS, EOS = VOCAB - 2, VOCAB - 1


def token_ids(length, rows, vocab_hi=520, seed=0):
    """BOS, random ids below the byte-level tokenizer's range, EOS, then EOS padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(rows), length), EOS, dtype=torch.int64)
    mask = torch.zeros((len(rows), length), dtype=torch.int64)
    for i, n in enumerate(rows):
        ids[i, 0] = BOS
        ids[i, 1 : n + 1] = torch.randint(0, vocab_hi, (n,), generator=g)
        mask[i, : n + 2] = 1
    return ids, mask


def add_buffers(path, prefixes):
    """Adds the `position_ids` buffers older transformers versions wrote into the file."""
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    for prefix, n in prefixes:
        sd[f"{prefix}embeddings.position_ids"] = torch.arange(n, dtype=torch.int64)[None]
    save_file(sd, f, metadata={"format": "pt"})


def text_fixture(out):
    cfg = CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=2,  # as SD1.5's text_encoder/config.json: pooled at the largest id
        pad_token_id=1,
    )
    model = build(lambda: CLIPTextModel(cfg), 10)
    path = os.path.join(out, "text")
    save_model(model, path)
    ids, mask = token_ids(77, [5, 11], seed=1)
    res = model(input_ids=ids, output_hidden_states=True)
    masked = model(input_ids=ids, attention_mask=mask)
    # Left padding leaves the first queries with nothing to attend to; transformers 5 passes such
    # rows to SDPA unchanged, and so must we.
    lengths = mask.sum(1)
    left_ids = torch.stack([torch.roll(r, r.numel() - int(n)) for r, n in zip(ids, lengths)])
    left_mask = torch.stack([torch.roll(r, r.numel() - int(n)) for r, n in zip(mask, lengths)])
    left = model(input_ids=left_ids, attention_mask=left_mask)
    write_io(
        path,
        {
            "input_ids": ids,
            "attention_mask": mask,
            "last_hidden_state": res.last_hidden_state,
            "pooler_output": res.pooler_output,
            "hidden_states_m2": res.hidden_states[-2],
            "masked_last_hidden_state": masked.last_hidden_state,
            "masked_pooler_output": masked.pooler_output,
            "left_input_ids": left_ids,
            "left_attention_mask": left_mask,
            "left_last_hidden_state": left.last_hidden_state,
        },
    )

    # The SD1.5 file layout: keys under `text_model.` plus the position_ids buffer.
    legacy = os.path.join(out, "text_legacy")
    os.makedirs(legacy, exist_ok=True)
    sd = {f"text_model.{k}": v for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    save_file(sd, os.path.join(legacy, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as src, open(os.path.join(legacy, "config.json"), "w") as dst:
        dst.write(src.read())
    again = CLIPTextModel.from_pretrained(legacy).eval()
    assert torch.equal(again(input_ids=ids).last_hidden_state, res.last_hidden_state), "legacy layout"


def vision_fixture(out):
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=4,
        hidden_act="gelu",
        projection_dim=24,
    )
    model = build(lambda: CLIPVisionModelWithProjection(cfg), 20)
    path = os.path.join(out, "vision")
    save_model(model, path)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    res = model(pixel_values=pixels, output_hidden_states=True)
    inner = model.vision_model(pixel_values=pixels)
    write_io(
        path,
        {
            "pixel_values": pixels,
            "last_hidden_state": res.last_hidden_state,
            "pooler_output": inner.pooler_output,
            "image_embeds": res.image_embeds,
            "hidden_states_m2": res.hidden_states[-2],
        },
    )


def clip_fixture(out):
    text = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    vision = dict(
        hidden_size=40,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=5,
        image_size=24,
        patch_size=8,
    )
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=20)
    model = build(lambda: CLIPModel(cfg), 30)
    path = os.path.join(out, "clip")
    save_model(model, path)
    add_buffers(path, [("text_model.", 16), ("vision_model.", 10)])
    again = CLIPModel.from_pretrained(path).eval()
    ids, _ = token_ids(16, [3, 9, 14], seed=3)
    pixels = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(4))
    res = model(input_ids=ids, pixel_values=pixels)
    assert torch.equal(again(input_ids=ids, pixel_values=pixels).logits_per_image, res.logits_per_image)
    write_io(
        path,
        {
            "input_ids": ids,
            "pixel_values": pixels,
            "logits_per_image": res.logits_per_image,
            "text_embeds": res.text_embeds,
            "image_embeds": res.image_embeds,
            "text_features": model.get_text_features(input_ids=ids).pooler_output,
            "image_features": model.get_image_features(pixel_values=pixels).pooler_output,
            "text_last_hidden_state": res.text_model_output.last_hidden_state,
        },
    )


def mid_fixtures(out):
    text_cfg = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        projection_dim=128,
        bos_token_id=998,
        eos_token_id=999,
        pad_token_id=0,
    )
    model = build(lambda: CLIPTextModelWithProjection(text_cfg), 40)
    path = os.path.join(out, "mid_text")
    save_model(model, path, shard="4MB")
    g = torch.Generator().manual_seed(5)
    ids = torch.zeros((2, 77), dtype=torch.int64)  # padded with 0, so only the explicit EOS rule works
    for i, n in enumerate([20, 75]):
        ids[i, 0] = 998
        ids[i, 1 : n + 1] = torch.randint(1, 998, (n,), generator=g)
        ids[i, n + 1] = 999
    res = model(input_ids=ids)
    write_io(
        path,
        {"input_ids": ids, "last_hidden_state": res.last_hidden_state, "text_embeds": res.text_embeds},
    )

    vision_cfg = CLIPVisionConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
        projection_dim=128,
    )
    model = build(lambda: CLIPVisionModelWithProjection(vision_cfg), 50)
    path = os.path.join(out, "mid_vision")
    save_model(model, path, shard="4MB")
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    res = model(pixel_values=pixels, output_hidden_states=True)
    write_io(
        path,
        {
            "pixel_values": pixels,
            "last_hidden_state": res.last_hidden_state,
            "image_embeds": res.image_embeds,
            "hidden_states_m2": res.hidden_states[-2],
        },
    )


# Real config.json files (values as published), to check that every key is read with the same
# defaults transformers applies.
REAL_CONFIGS = {
    "sd15_text_encoder": {
        "_name_or_path": "openai/clip-vit-large-patch14",
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 1,
        "projection_dim": 768,
        "torch_dtype": "float32",
        "transformers_version": "4.22.0.dev0",
        "vocab_size": 49408,
    },
    "ip_adapter_image_encoder": {
        "_name_or_path": "",
        "architectures": ["CLIPVisionModelWithProjection"],
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": 1280,
        "image_size": 224,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 5120,
        "layer_norm_eps": 1e-05,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_hidden_layers": 32,
        "patch_size": 14,
        "projection_dim": 1024,
        "torch_dtype": "float16",
        "transformers_version": "4.28.0.dev0",
    },
    # openai/clip-vit-base-patch16 (abridged): the *_config_dict entries override *_config.
    "clip_vit_base_patch16": {
        "architectures": ["CLIPModel"],
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": 512,
        "text_config": {
            "bos_token_id": 0,
            "eos_token_id": 2,
            "hidden_size": 512,
            "intermediate_size": 2048,
            "model_type": "clip_text_model",
            "num_attention_heads": 8,
            "pad_token_id": 1,
            "vocab_size": 49408,
        },
        "text_config_dict": {
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_attention_heads": 8,
            "num_hidden_layers": 12,
            "projection_dim": 512,
        },
        "vision_config": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "model_type": "clip_vision_model",
            "num_attention_heads": 12,
            "patch_size": 16,
        },
        "vision_config_dict": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "patch_size": 16,
            "projection_dim": 512,
        },
    },
    "clip_minimal": {"model_type": "clip"},
    "text_minimal": {"model_type": "clip_text_model"},
    "vision_minimal": {"model_type": "clip_vision_model"},
}


def resolved_text(c):
    return {
        "vocabSize": c.vocab_size,
        "hiddenSize": c.hidden_size,
        "intermediateSize": c.intermediate_size,
        "projectionDim": c.projection_dim,
        "numHiddenLayers": c.num_hidden_layers,
        "numAttentionHeads": c.num_attention_heads,
        "maxPositionEmbeddings": c.max_position_embeddings,
        "hiddenAct": c.hidden_act,
        "layerNormEps": c.layer_norm_eps,
        "attentionDropout": c.attention_dropout,
        "bosTokenId": c.bos_token_id,
        "eosTokenId": c.eos_token_id,
        "padTokenId": c.pad_token_id,
    }


def resolved_vision(c):
    return {
        "hiddenSize": c.hidden_size,
        "intermediateSize": c.intermediate_size,
        "projectionDim": c.projection_dim,
        "numHiddenLayers": c.num_hidden_layers,
        "numAttentionHeads": c.num_attention_heads,
        "numChannels": c.num_channels,
        "imageSize": c.image_size,
        "patchSize": c.patch_size,
        "hiddenAct": c.hidden_act,
        "layerNormEps": c.layer_norm_eps,
        "attentionDropout": c.attention_dropout,
    }


def config_fixtures(out):
    path = os.path.join(out, "configs")
    os.makedirs(path, exist_ok=True)
    for name, raw in REAL_CONFIGS.items():
        kind = raw["model_type"]
        if kind == "clip":
            c = CLIPConfig.from_dict(dict(raw))
            resolved = {
                "text": resolved_text(c.text_config),
                "vision": resolved_vision(c.vision_config),
                "projectionDim": c.projection_dim,
                "logitScaleInitValue": c.logit_scale_init_value,
            }
        elif kind == "clip_text_model":
            resolved = resolved_text(CLIPTextConfig.from_dict(dict(raw)))
        else:
            resolved = resolved_vision(CLIPVisionConfig.from_dict(dict(raw)))
        with open(os.path.join(path, f"{name}.json"), "w") as f:
            json.dump(raw, f, indent=2)
        with open(os.path.join(path, f"{name}.resolved.json"), "w") as f:
            json.dump(resolved, f, indent=2)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: clip_ref.py OUTDIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    text_fixture(out)
    vision_fixture(out)
    clip_fixture(out)
    mid_fixtures(out)
    config_fixtures(out)


if __name__ == "__main__":
    main()
