"""Reference fixtures for the CLIP LoRA classifier (plugins/classifiers/).

Usage: .venv/bin/python test/reference/classifier_ref.py OUTDIR

Everything the DataDream recipe computes in one training step, done by transformers + peft on a
tiny CLIPModel, so the TypeScript trainer can be compared number for number:

  clip/            tiny CLIPModel in the HF layout (config.json + model.safetensors)
  tokenizer/       the byte-level vocab.json + merges.txt that ClipTokenizer.byteLevel() embeds
  adapter_init/    peft save_pretrained() of the starting LoRA (lora_B random, not zero, so every
                   LoRA weight gets a gradient from the first step)
  io.safetensors   pixels, labels, is_synthetic, prompt ids; logits, loss and every LoRA gradient
                   of step 1; the loss before and every LoRA weight after each of 3 AdamW steps
  meta.json        class names, prompts, LoRA and optimiser settings, the iterations stepped
  schedule.json    learning rates of several small runs, from DataDream's array construction
                   (numpy, classify/utils.py cosine_scheduler) and from the closed form
"""

import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from common import TINY_MERGES, bpe_vocab, build, write_json, write_vocab_merges

CLASS_NAMES = ["red", "green", "blue"]
DATASET = "eurosat"
PROMPTS = [f"a satellite photo of a {c}" for c in CLASS_NAMES]
RANK, ALPHA = 4, 8
LAMBDA = 0.8
LR, MIN_LR, WD = 1e-4, 1e-8, 1e-4
# Schedule of the stepped run: 10 epochs of 2 iterations, 3 warm-up epochs; the three AdamW steps
# are iterations 6-8, the first ones after the warm-up, where the rate is near its peak.
RUN = dict(epochs=10, warmup_epochs=3, iters_per_epoch=2)
FIRST_IT, STEPS = 6, 3


def datadream_schedule(base, final, epochs, niter, warmup_epochs, start):
    """DataDream's classify/utils.py cosine_scheduler, rebuilt: numpy linspace warm-up, then a
    half cosine over the remaining iterations, in float64."""
    warmup_iters = warmup_epochs * niter
    warm = np.linspace(start, base, warmup_iters) if warmup_epochs > 0 else np.array([])
    rest = np.arange(epochs * niter - warmup_iters)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * rest / len(rest)))
    out = np.concatenate((warm, cos))
    assert len(out) == epochs * niter
    return out


def closed_form(it, base, final, epochs, niter, warmup_epochs, start):
    """The same rates one iteration at a time (plugins/classifiers/optim.ts implements this)."""
    w = warmup_epochs * niter
    if it < w:
        if w == 1:
            return start
        if it == w - 1:
            return base
        return it * ((base - start) / (w - 1)) + start
    n = epochs * niter - w
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (it - w) / n))


def schedule_cases():
    cases = []
    for epochs, warmup, niter in [(10, 3, 7), (10, 3, 1), (10, 0, 5), (2, 1, 3), (1, 0, 1), (10, 3, 63),
                                  (3, 3, 4), (10, 3, 2)]:
        arr = datadream_schedule(LR, MIN_LR, epochs, niter, warmup, MIN_LR)
        closed = [closed_form(i, LR, MIN_LR, epochs, niter, warmup, MIN_LR) for i in range(epochs * niter)]
        worst = max(abs(a - b) for a, b in zip(arr.tolist(), closed))
        assert worst <= 1e-19, (epochs, warmup, niter, worst)
        cases.append(
            dict(
                epochs=epochs,
                warmupEpochs=warmup,
                itersPerEpoch=niter,
                baseLr=LR,
                finalLr=MIN_LR,
                warmupStartLr=MIN_LR,
                datadream=arr.tolist(),
                closedForm=closed,
            )
        )
    return cases


def tiny_clip():
    text = dict(
        vocab_size=520,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=518,
        eos_token_id=519,
        pad_token_id=519,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    model = build(lambda: CLIPModel(cfg), 50)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # the trained CLIP value
    return model


def l2_normalize(x):
    return x / x.pow(2).sum(-1, keepdim=True).pow(0.5)


def class_logits(clip, pixels, ids):
    """exp(logit_scale) * cosine(image features, text features): the DataDream head."""
    image = clip.get_image_features(pixel_values=pixels).pooler_output
    text = clip.get_text_features(input_ids=ids).pooler_output
    return l2_normalize(image).matmul(l2_normalize(text).t()).mul(clip.logit_scale.exp())


def mixed_loss(logits, labels, synthetic):
    real = ~synthetic
    return LAMBDA * F.cross_entropy(logits[real], labels[real]) + (1 - LAMBDA) * F.cross_entropy(
        logits[synthetic], labels[synthetic]
    )


def our_name(peft_name):
    """base_model.model.X.lora_A.default.weight -> X.lora_A.weight (plugins/classifiers/lora.ts)."""
    return peft_name.removeprefix("base_model.model.").replace(".default.", ".")


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    # The fixture runner sets OMP_NUM_THREADS (1, as the tests run): split reductions round apart.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))

    model = tiny_clip()
    model.save_pretrained(os.path.join(out, "clip"), safe_serialization=True)

    tok_dir = os.path.join(out, "tokenizer")
    write_vocab_merges(tok_dir, bpe_vocab(TINY_MERGES), TINY_MERGES)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    ids = tokenizer(PROMPTS, padding="longest", return_tensors="pt").input_ids

    torch.manual_seed(52)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(53)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(os.path.join(out, "adapter_init"))
    clip = peft_model.base_model.model
    params = {our_name(n): p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(params) == 2 * 2 * 2 * 2, sorted(params)  # towers x layers x (q, v) x (A, B)

    gen = torch.Generator().manual_seed(54)
    pixels = torch.randn(6, 3, 32, 32, generator=gen)
    labels = torch.tensor([0, 1, 2, 2, 0, 1], dtype=torch.int64)
    synthetic = torch.tensor([False, True, True, False, True, True])

    io = {
        "pixels": pixels,
        "labels": labels,
        "is_synthetic": synthetic.to(torch.uint8),
        "input_ids": ids,
    }
    for name, p in params.items():
        io[f"init.{name}"] = p.detach().clone()

    sched = datadream_schedule(LR, MIN_LR, RUN["epochs"], RUN["iters_per_epoch"], RUN["warmup_epochs"], MIN_LR)
    opt = torch.optim.AdamW(list(params.values()), lr=LR, weight_decay=WD, foreach=False)
    lrs = []
    for k in range(1, STEPS + 1):
        opt.zero_grad()
        logits = class_logits(clip, pixels, ids)
        loss = mixed_loss(logits, labels, synthetic)
        loss.backward()
        if k == 1:
            io["logits"] = logits.detach()
            io["loss"] = loss.detach()
            io["loss_real"] = F.cross_entropy(logits[~synthetic], labels[~synthetic]).detach()
            io["loss_synthetic"] = F.cross_entropy(logits[synthetic], labels[synthetic]).detach()
            for name, p in params.items():
                io[f"grad.{name}"] = p.grad.detach().clone()
        io[f"step{k}.loss"] = loss.detach()
        lr = float(sched[FIRST_IT + k - 1])
        lrs.append(lr)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        for name, p in params.items():
            io[f"step{k}.{name}"] = p.detach().clone()
    with torch.no_grad():
        io["final_logits"] = class_logits(clip, pixels, ids)

    save_file({k: v.contiguous().clone() for k, v in io.items()}, os.path.join(out, "io.safetensors"))
    meta = dict(
        classNames=CLASS_NAMES,
        dataset=DATASET,
        prompts=PROMPTS,
        rank=RANK,
        alpha=ALPHA,
        lambda_=LAMBDA,
        lr=LR,
        minLr=MIN_LR,
        weightDecay=WD,
        run=RUN,
        firstIteration=FIRST_IT,
        steps=STEPS,
        stepLrs=lrs,
        params=sorted(params),
    )
    write_json(os.path.join(out, "meta.json"), meta)
    write_json(os.path.join(out, "schedule.json"), schedule_cases())
    print(f"classifier_ref.py: wrote {len(io)} tensors to {out}")


if __name__ == "__main__":
    main()
