"""One DataDream training step with transformers + peft, the reference side of bench/train_bench.ts.

Usage: train_bench.py DIR PLAN_JSON   (driven over stdin/stdout by bench/train_bench.ts)

PLAN_JSON: {"ids": [[...]], "labels": [...], "synthetic": [...]}. Writes (once) a CLIPModel shaped
like openai/clip-vit-base-patch16 with seeded random weights to DIR/clip and the batch of images to
DIR/pixels.safetensors, so both sides run identical weights and inputs. The timed step is the one
the TypeScript side times: zero_grad, image + text features, exp(logit_scale) * cosine logits,
0.8 * CE(real) + 0.2 * CE(synthetic), backward, AdamW (LoRA r16 / alpha 32 / dropout 0.1 on q_proj
and v_proj of both towers, lr 1e-4, weight decay 1e-4).

Protocol: once ready it answers {"threads", "logits"} (the untrained classifier's logits, so the
caller can check that both sides compute the same thing), then one JSON line per request line:
{"op": "step", "calls": n} runs n steps and answers {"s": seconds per step};
{"op": "threads", "n": n} sets torch's intra-op thread count.
"""

import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel

BATCH = 8
SEED = 0
BOS, EOS = 518, 519  # the byte-level tokenizer's ids, which the TypeScript side tokenizes with


def b16_config():
    text = dict(
        vocab_size=49408,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=8,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    vision = dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
        hidden_act="quick_gelu",
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=512, logit_scale_init_value=4.6052)


def prepare(out):
    """Weights and pixels, written once per DIR (about 600 MB of float32 weights)."""
    marker = os.path.join(out, "ready")
    if os.path.exists(marker):
        return
    torch.manual_seed(SEED)
    model = CLIPModel(b16_config()).eval()
    model.save_pretrained(os.path.join(out, "clip"), safe_serialization=True)
    pixels = torch.randn(BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(SEED + 1))
    save_file({"pixels": pixels}, os.path.join(out, "pixels.safetensors"))
    with open(marker, "w") as f:
        f.write("ok\n")


def main():
    out, plan = sys.argv[1], json.loads(sys.argv[2])
    protocol = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not reach the protocol stream
    os.makedirs(out, exist_ok=True)
    prepare(out)

    model = CLIPModel.from_pretrained(os.path.join(out, "clip"))
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, config)
    clip = peft_model.base_model.model
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)

    pixels = load_file(os.path.join(out, "pixels.safetensors"))["pixels"]
    ids = torch.tensor(plan["ids"], dtype=torch.int64)
    labels = torch.tensor(plan["labels"], dtype=torch.int64)
    synthetic = torch.tensor(plan["synthetic"], dtype=torch.bool)

    def l2(x):
        return x / x.pow(2).sum(-1, keepdim=True).pow(0.5)

    def logits():
        image = clip.get_image_features(pixel_values=pixels).pooler_output
        text = clip.get_text_features(input_ids=ids).pooler_output
        return l2(image).matmul(l2(text).t()).mul(clip.logit_scale.exp())

    def step():
        opt.zero_grad()
        out = logits()
        real = ~synthetic
        loss = 0.8 * F.cross_entropy(out[real], labels[real]) + (1 - 0.8) * F.cross_entropy(
            out[synthetic], labels[synthetic]
        )
        if not torch.isfinite(loss).item():
            raise SystemExit(f"loss is {loss.item()}")
        loss.backward()
        opt.step()

    def reply(obj):
        protocol.write(json.dumps(obj) + "\n")
        protocol.flush()

    peft_model.eval()
    with torch.no_grad():
        start = logits().tolist()
    peft_model.train()
    reply({"threads": torch.get_num_threads(), "logits": start})
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "threads":
            torch.set_num_threads(req["n"])
            reply({"threads": torch.get_num_threads()})
        elif req["op"] == "step":
            t0 = time.perf_counter()
            for _ in range(req["calls"]):
                step()
            reply({"s": (time.perf_counter() - t0) / req["calls"]})
        else:
            sys.exit(f"unknown request {line!r}")


if __name__ == "__main__":
    main()
