"""Reference fixtures for the samplers: diffusers DDIM, Euler and DPM-Solver++ step by step.

Usage: python test/reference/samplers_ref.py OUTDIR

Writes
  OUTDIR/sd15/scheduler/scheduler_config.json   the SD1.5 scheduler config, byte for byte as the
                          runwayml/stable-diffusion-v1-5 repository ships it (a PNDMScheduler config
                          without `timestep_spacing` or `prediction_type`)
  OUTDIR/cases.json       everything below that is not a tensor
  OUTDIR/tensors.safetensors   float32 tensors (float16 for the *_f16 trajectories):
      schedule.<name>.betas / .alphas_cumprod    the noise schedules
      <case>.sample_in.<i>, <case>.scaled.<i>, <case>.model_output.<i>, <case>.sample_out.<i>
                          per step: the sample handed to the scheduler, scale_model_input of it,
                          the model output fed to step(), and step()'s prev_sample
      add_noise.<sampler>.original / .noise / .noisy    add_noise at one index of a 25-step schedule

cases.json:
  "from_config": how `DPMSolverMultistepScheduler.from_config(...)` resolves the SD1.5 config,
                 built from the raw JSON and from a loaded PNDMScheduler's config (as pipelines do)
  "schedules":   [{"name", "config"}]
  "timesteps":   [{"sampler", "steps", "config", "timesteps", "sigmas", "init_noise_sigma"}] over
                 every spacing, many step counts and both steps_offset values
  "trajectories": [{"name", "sampler", "steps", "options", "eta", "seed", "dtype", "shape", "timesteps",
                 "init_noise_sigma"}]: options are from_config keyword overrides of the SD1.5
                 config; eta > 0 draws the variance noise from torch.Generator().manual_seed(seed)
  "add_noise":   [{"sampler", "steps", "index"}]

Model outputs come from a fake denoiser that points at a fixed clean latent, plus noise, so the
trajectories keep a realistic scale for all 50 steps.
"""

import json
import os
import sys

import diffusers
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

from common import SD15_SCHEDULER, save_tensors, write_json

CLASSES = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}
SHAPE = (2, 4, 8, 8)

out_dir = sys.argv[1]
sched_dir = os.path.join(out_dir, "sd15", "scheduler")
os.makedirs(sched_dir, exist_ok=True)
write_json(os.path.join(sched_dir, "scheduler_config.json"), SD15_SCHEDULER)
SD15 = SD15_SCHEDULER

tensors: dict[str, torch.Tensor] = {}
cases: dict = {
    "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__},
    "from_config": {},
    "schedules": [],
    "timesteps": [],
    "trajectories": [],
    "add_noise": [],
}


def build(sampler: str, **overrides):
    return CLASSES[sampler].from_config(SD15, **overrides)


def floats(t) -> list[float]:
    return [float(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


# --- what the official DIPSY construction resolves to --------------------------------------

dpm = DPMSolverMultistepScheduler.from_config(SD15)
dpm.set_timesteps(50)
pndm = PNDMScheduler.from_pretrained(os.path.join(out_dir, "sd15"), subfolder="scheduler")
dpm_via_pipe = DPMSolverMultistepScheduler.from_config(pndm.config)
dpm_via_pipe.set_timesteps(50)
assert dpm_via_pipe.timesteps.tolist() == dpm.timesteps.tolist()
keys = [
    "timestep_spacing", "steps_offset", "algorithm_type", "solver_order", "solver_type",
    "lower_order_final", "euler_at_final", "final_sigmas_type", "prediction_type", "beta_schedule",
    "beta_start", "beta_end", "num_train_timesteps", "use_karras_sigmas", "thresholding",
]
cases["from_config"] = {
    "config": {k: dpm.config[k] for k in keys},
    "pipeline_config_spacing": dpm_via_pipe.config.timestep_spacing,
    "pndm_spacing": pndm.config.timestep_spacing,
    "timesteps_50": dpm.timesteps.tolist(),
    "ddim_spacing": DDIMScheduler.from_config(pndm.config).config.timestep_spacing,
    "euler_spacing": EulerDiscreteScheduler.from_config(pndm.config).config.timestep_spacing,
}

# --- noise schedules ----------------------------------------------------------------------

SCHEDULES = {
    "sd15": {},
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "linear500": dict(beta_schedule="linear", num_train_timesteps=500),
}
for name, cfg in SCHEDULES.items():
    s = build("ddim", **cfg)
    tensors[f"schedule.{name}.betas"] = s.betas.clone()
    tensors[f"schedule.{name}.alphas_cumprod"] = s.alphas_cumprod.clone()
    cases["schedules"].append({"name": name, "config": cfg})

# --- timesteps over spacings and step counts -----------------------------------------------

STEP_COUNTS = [1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 13, 14, 15, 16, 20, 21, 25, 30, 33, 37, 49, 50,
               51, 64, 75, 99, 100, 128, 150, 250, 333, 500, 999, 1000]
for sampler in CLASSES:
    for spacing in ["leading", "linspace", "trailing"]:
        for offset in [0, 1]:
            for n in STEP_COUNTS:
                cfg = dict(timestep_spacing=spacing, steps_offset=offset)
                s = build(sampler, **cfg)
                s.set_timesteps(n)
                entry = {"sampler": sampler, "steps": n, "config": cfg,
                         "timesteps": floats(s.timesteps)}
                if sampler != "ddim":
                    entry["sigmas"] = floats(s.sigmas)
                if sampler == "euler":
                    entry["init_noise_sigma"] = float(s.init_noise_sigma)
                cases["timesteps"].append(entry)

# --- trajectories ---------------------------------------------------------------------------

data_gen = torch.Generator().manual_seed(20240607)
x0_star = torch.randn(SHAPE, generator=data_gen, dtype=torch.float64) * 0.8


def fake_model_output(sched, sampler: str, i: int, sample: torch.Tensor, prediction: str):
    """What a perfect denoiser of x0_star would predict, plus 10% noise, in float64."""
    x = sample.double()
    if sampler == "euler":
        sigma = float(sched.sigmas[i])
        alpha, sig = 1 / (sigma**2 + 1) ** 0.5, sigma / (sigma**2 + 1) ** 0.5
        eps = (x - x0_star) / sigma
    else:
        a = float(sched.alphas_cumprod[int(sched.timesteps[i])])
        alpha, sig = a**0.5, (1 - a) ** 0.5
        eps = (x - alpha * x0_star) / sig
    eps = eps + 0.1 * torch.randn(SHAPE, generator=data_gen, dtype=torch.float64)
    if prediction == "epsilon":
        out = eps
    elif prediction == "v_prediction":
        out = alpha * eps - sig * x0_star
    else:
        out = x0_star + 0.1 * torch.randn(SHAPE, generator=data_gen, dtype=torch.float64)
    return out.float()


def trajectory(name: str, sampler: str, steps: int, options=None, eta=0.0, seed=None, dtype="float32"):
    options = options or {}
    dt = getattr(torch, dtype)
    sched = build(sampler, **options)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    prediction = sched.config.prediction_type
    x = (torch.randn(SHAPE, generator=data_gen) * sched.init_noise_sigma).to(dt)
    for i, t in enumerate(sched.timesteps):
        tensors[f"{name}.sample_in.{i}"] = x.clone()
        scaled = sched.scale_model_input(x, t)
        tensors[f"{name}.scaled.{i}"] = scaled.clone()
        mo = fake_model_output(sched, sampler, i, x, prediction).to(dt)
        tensors[f"{name}.model_output.{i}"] = mo.clone()
        extra = {"eta": eta, "generator": gen} if sampler == "ddim" else {}
        x = sched.step(mo, t, x, **extra).prev_sample
        tensors[f"{name}.sample_out.{i}"] = x.clone()
    cases["trajectories"].append({
        "name": name, "sampler": sampler, "steps": steps, "options": options, "eta": eta,
        "seed": seed, "dtype": dtype, "shape": list(SHAPE), "timesteps": floats(sched.timesteps),
        "init_noise_sigma": float(sched.init_noise_sigma),
    })


for n in [50, 25, 10]:
    trajectory(f"dpm{n}", "dpm", n)
    trajectory(f"ddim{n}", "ddim", n)
    trajectory(f"ddim{n}_eta1", "ddim", n, eta=1.0, seed=1000 + n)
    trajectory(f"euler{n}", "euler", n)
# Configuration branches, 10 steps each.
trajectory("dpm_v", "dpm", 10, {"prediction_type": "v_prediction"})
trajectory("dpm_order3", "dpm", 10, {"solver_order": 3})  # lower_order_second (steps < 15)
trajectory("dpm_order3_20", "dpm", 20, {"solver_order": 3})  # third order up to the last step
trajectory("dpm_heun_leading", "dpm", 10, {"solver_type": "heun", "timestep_spacing": "leading"})
trajectory("dpm_sigma_min", "dpm", 10, {"final_sigmas_type": "sigma_min", "lower_order_final": False})
trajectory("dpm_euler_final_cosine", "dpm", 10,
           {"euler_at_final": True, "final_sigmas_type": "sigma_min", "beta_schedule": "squaredcos_cap_v2"})
trajectory("ddim_v_clip_one", "ddim", 10,
           {"prediction_type": "v_prediction", "clip_sample": True, "set_alpha_to_one": True})
trajectory("ddim_sample_trailing_eta", "ddim", 10,
           {"prediction_type": "sample", "timestep_spacing": "trailing", "clip_sample": True,
            "clip_sample_range": 0.5}, eta=0.5, seed=7)
trajectory("ddim_linspace", "ddim", 10, {"timestep_spacing": "linspace"})
trajectory("euler_v", "euler", 10, {"prediction_type": "v_prediction"})
trajectory("euler_leading", "euler", 10, {"timestep_spacing": "leading"})
trajectory("euler_trailing_linear", "euler", 10,
           {"timestep_spacing": "trailing", "beta_schedule": "linear", "beta_start": 0.0001,
            "beta_end": 0.02})

# Half precision (DIPSY samples in fp16 on GPU): which tensors diffusers upcasts, and when.
trajectory("dpm10_f16", "dpm", 10, dtype="float16")
trajectory("ddim10_eta1_f16", "ddim", 10, eta=1.0, seed=99, dtype="float16")
trajectory("euler10_f16", "euler", 10, dtype="float16")

# --- add_noise (img2img) ---------------------------------------------------------------------

for sampler in CLASSES:
    sched = build(sampler)
    sched.set_timesteps(25)
    index = 7
    original = torch.randn(SHAPE, generator=data_gen)
    noise = torch.randn(SHAPE, generator=data_gen)
    t = sched.timesteps[index : index + 1].repeat(SHAPE[0])
    tensors[f"add_noise.{sampler}.original"] = original
    tensors[f"add_noise.{sampler}.noise"] = noise
    tensors[f"add_noise.{sampler}.noisy"] = sched.add_noise(original, noise, t)
    cases["add_noise"].append({"sampler": sampler, "steps": 25, "index": index})

save_tensors(os.path.join(out_dir, "tensors.safetensors"), tensors)
with open(os.path.join(out_dir, "cases.json"), "w") as f:
    json.dump(cases, f)
print(f"samplers fixtures: {len(cases['trajectories'])} trajectories, "
      f"{len(cases['timesteps'])} timestep schedules -> {out_dir}")
