"""Loads LoRA adapters written by plugins/classifiers/lora.ts with peft and checks their logits.

Usage: .venv/bin/python test/reference/peft_load_check.py FIXTURE_DIR ADAPTER_DIR [ADAPTER_DIR ...]

FIXTURE_DIR is test/fixtures/classifier (from classifier_ref.py): the tiny CLIPModel, its tokenizer
and the class prompts. Each ADAPTER_DIR holds what the TypeScript side saved (adapter_config.json +
adapter_model.safetensors) and `expected.safetensors` with the `pixels` it ran and the `logits` it
got. Every adapter is loaded into a fresh CLIPModel with `PeftModel.from_pretrained`; the script
checks that peft took every saved tensor, and prints one JSON line:
{"results": [{"adapter", "keys", "max_abs_err"}]}.
"""

import json
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPTokenizer

from classifier_ref import class_logits


def check(fixture, adapter, ids):
    model = CLIPModel.from_pretrained(os.path.join(fixture, "clip")).eval()
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    live = {
        n.replace(".default.", "."): p for n, p in peft_model.named_parameters() if "lora_" in n
    }
    if sorted(live) != sorted(saved):
        missing = sorted(set(saved) - set(live))[:4]
        extra = sorted(set(live) - set(saved))[:4]
        raise SystemExit(f"{adapter}: peft built other LoRA layers (file only: {missing}, model only: {extra})")
    for k, v in saved.items():
        if not torch.equal(live[k].detach(), v):
            raise SystemExit(f"{adapter}: {k} was not loaded")
    expected = load_file(os.path.join(adapter, "expected.safetensors"))
    with torch.no_grad():
        logits = class_logits(peft_model.base_model.model, expected["pixels"], ids)
    err = (logits - expected["logits"]).abs().max().item()
    return {"adapter": adapter, "keys": len(saved), "max_abs_err": err}


def main():
    fixture, adapters = sys.argv[1], sys.argv[2:]
    with open(os.path.join(fixture, "meta.json")) as f:
        meta = json.load(f)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(fixture, "tokenizer"))
    ids = tokenizer(meta["prompts"], padding="longest", return_tensors="pt").input_ids
    print(json.dumps({"results": [check(fixture, a, ids) for a in adapters]}))


if __name__ == "__main__":
    main()
