"""Provenance of oracle.pt: k-diffusion's sampling functions and diffusers' schedulers run on a tiny random-weight
UNet. See README.md in this folder.

NOT part of the test suite and never imported by it: it needs k-diffusion and diffusers, which are not
dependencies of this repository. Run it from a throw-away environment outside the repository:

    python -m venv --system-site-packages /tmp/oracle-venv
    /tmp/oracle-venv/bin/pip install k-diffusion==0.1.1.post1 diffusers==0.42.1
    /tmp/oracle-venv/bin/python tests/reference/samplers/make_oracle.py

The model: the UNet of tests/reference/hidiffusion (SD 1.5's layout, 32 channels, 16-dim context; its 4-bit
weights are read from hidiffusion/oracle_tiny.pt, not stored again), on SD's noise schedule (diffusers'
scaled_linear betas 0.00085 .. 0.012, 1000 steps: the float32 alphas_cumprod are stored and used by all three
sides), its output read as eps or as v, with classifier-free guidance (scale 5) over fixed random contexts.
From this repository the script uses only the UNet class and the weight loader (the model under both libraries);
the schedules, spacings and solver arithmetic are the libraries'.
"""
import math
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import diffusers  # noqa: E402
import k_diffusion  # noqa: E402
from diffusers import (DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,  # noqa: E402
                       EulerDiscreteScheduler, HeunDiscreteScheduler, UniPCMultistepScheduler)
from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_a_module  # noqa: E402
from k_diffusion import external as kd_external, sampling as kd_sampling  # noqa: E402

from conftest import tiny_sd1_oracle_unet  # noqa: E402  (the repository's UNet class + the weight unpacking)

STEPS = 10
SCALE = 5.0
LATENT = (1, 4, 16, 16)  # 16x16: the deepest of the 4 levels is 2x2
SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1)
PREDICTION = {"eps": "epsilon", "v": "v_prediction"}


class Model:
    """What k-diffusion's CompVis wrappers need: alphas_cumprod and apply_model (here with CFG inside)."""

    def __init__(self, unet, alphas_cumprod, cond, uncond):
        self.unet, self.alphas_cumprod, self.cond, self.uncond = unet, alphas_cumprod, cond, uncond
        self.calls = []

    def apply_model(self, x, t, cond=None):
        self.calls.append(t.detach().clone().double().reshape(-1)[0].item())
        out = self.unet(torch.cat([x, x]), torch.cat([t, t]), context=torch.cat([self.uncond, self.cond]))
        u, c = out.chunk(2)
        return u + SCALE * (c - u)


def kd_run(model, parameterization, fn, sigmas, x, quantize, noise=None, **kw):
    wrapper = (kd_external.CompVisVDenoiser if parameterization == "v" else kd_external.CompVisDenoiser)
    den = wrapper(model, quantize=quantize)
    if noise is not None:
        it = iter(noise)
        kw["noise_sampler"] = lambda s, s_next: next(it)
    model.calls = []
    out = fn(den, x.clone(), sigmas, extra_args={"cond": None}, disable=True, **kw)
    return out, list(model.calls)


def diffusers_run(model, scheduler, x, noise=None):
    model.calls = []
    latents = x.clone()
    used = []
    for i, t in enumerate(scheduler.timesteps):
        inp = scheduler.scale_model_input(latents, t)
        out = model.apply_model(inp, t.reshape(1).to(inp.device) if t.ndim == 0 else t, None)
        kwargs = {}
        if isinstance(scheduler, DPMSolverMultistepScheduler) and noise is not None:
            kwargs["variance_noise"] = noise[i]
            used.append(noise[i])
        latents = scheduler.step(out, t, latents, **kwargs).prev_sample
    return latents, list(model.calls)


def main():
    torch.set_num_threads(1)
    weights = torch.load(REPO / "tests/reference/hidiffusion/oracle_tiny.pt", weights_only=True)["weights"]
    unet = tiny_sd1_oracle_unet(weights)
    g = torch.Generator().manual_seed(20260707)
    cond = torch.randn(1, 7, 16, generator=g)
    uncond = torch.randn(1, 7, 16, generator=g)
    noise0 = torch.randn(LATENT, generator=g)
    step_noise = torch.randn(STEPS, *LATENT, generator=g)  # per-step noise of the ancestral / SDE runs

    base = EulerDiscreteScheduler(**SD_CONFIG)
    alphas_cumprod = base.alphas_cumprod.clone().float()
    model = Model(unet, alphas_cumprod, cond, uncond)
    out = {"versions": {"diffusers": diffusers.__version__, "k_diffusion": "0.1.1.post1",
                        "torch": str(torch.__version__), "numpy": str(np.__version__)},
           "steps": STEPS, "scale": SCALE, "cond": cond, "uncond": uncond, "noise": noise0,
           "step_noise": step_noise, "alphas_cumprod": alphas_cumprod, "sd_config": dict(SD_CONFIG),
           "kdiff": {}, "diffusers": {}}

    def start(sigma0):  # the repository's start convention: noise * sqrt(sigma_0^2 + 1)
        return noise0 * math.sqrt(float(sigma0) ** 2 + 1)

    # --- k-diffusion: its sampling functions on its CompVis denoiser's sigmas --------------------------
    kd_fns = {"euler": (kd_sampling.sample_euler, False), "euler_a": (kd_sampling.sample_euler_ancestral, True),
              "heun": (kd_sampling.sample_heun, False), "dpmpp_2m": (kd_sampling.sample_dpmpp_2m, False),
              "dpmpp_2m_sde": (kd_sampling.sample_dpmpp_2m_sde, True)}
    grids = {"euler": EulerDiscreteScheduler, "euler_a": EulerDiscreteScheduler, "heun": EulerDiscreteScheduler,
             "dpmpp_2m": DPMSolverMultistepScheduler, "dpmpp_2m_sde": DPMSolverMultistepScheduler}
    den = kd_external.CompVisDenoiser(model)
    for param in ("eps", "v"):
        for name, (fn, stochastic) in kd_fns.items():
            for spacing in ("leading", "karras"):
                if spacing == "karras":
                    sigmas = kd_sampling.get_sigmas_karras(STEPS, den.sigma_min, den.sigma_max)
                    quantize = False  # k-diffusion's default: fractional t = sigma_to_t(sigma)
                else:  # diffusers' leading timesteps (steps_offset 1), k-diffusion's sigmas at them
                    sch = grids[name](**SD_CONFIG, timestep_spacing="leading")
                    sch.set_timesteps(STEPS)
                    ts = sch.timesteps.long()
                    sigmas = kd_sampling.append_zero(den.sigmas[ts])
                    quantize = True  # t exactly the discrete timestep
                x = start(sigmas[0])
                noise = list(step_noise[:STEPS - 1]) if stochastic else None
                res, calls = kd_run(model, param, fn, sigmas, x, quantize, noise)
                out["kdiff"][f"{name}/{spacing}/{param}"] = {"sigmas": sigmas.float(), "x": x, "out": res,
                                                             "t": torch.tensor(calls, dtype=torch.float64)}
                print("k-diffusion", name, spacing, param, float(res.std()))

    # --- diffusers: its schedulers as the SD/SDXL pipelines step them --------------------------------------
    cases = [("euler", EulerDiscreteScheduler, {}, ("leading", "trailing", "linspace")),
             ("euler_a", EulerAncestralDiscreteScheduler, {}, ("leading", "trailing")),
             ("heun", HeunDiscreteScheduler, {}, ("leading", "linspace")),
             ("dpmpp_2m", DPMSolverMultistepScheduler, {}, ("leading", "trailing", "linspace")),
             ("dpmpp_2m_karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, ("leading",)),
             ("dpmpp_2m_sde", DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}, ("leading",)),
             ("unipc", UniPCMultistepScheduler, {}, ("leading", "trailing", "linspace"))]
    for param in ("eps", "v"):
        for name, cls, extra, spacings in cases:
            for spacing in spacings:
                sch = cls(**SD_CONFIG, timestep_spacing=spacing, prediction_type=PREDICTION[param], **extra)
                sch.set_timesteps(STEPS)
                vp = cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler)  # they hold the DDPM x_t
                sigmas = sch.sigmas.clone().double()
                ts = sch.timesteps.clone().double()
                if cls is HeunDiscreteScheduler:  # interleaved: [s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0]
                    sigmas = torch.cat([sigmas[0::2], sigmas[-1:]])
                    ts = ts[0::2]
                x = noise0.clone() if vp else start(sigmas[0])
                noise = None
                if name in ("euler_a", "dpmpp_2m_sde"):
                    noise = list(step_noise)
                if name == "euler_a":  # the scheduler draws with randn_tensor each step: replay step_noise
                    it = iter(noise)
                    real = euler_a_module.randn_tensor
                    euler_a_module.randn_tensor = lambda *a, **k: next(it).clone()
                try:
                    res, calls = diffusers_run(model, sch, x, noise)
                finally:
                    if name == "euler_a":
                        euler_a_module.randn_tensor = real
                entry = {"sigmas": sigmas.float(), "timesteps": ts, "x": x, "out": res,
                         "t": torch.tensor(calls, dtype=torch.float64), "holds": "x_t" if vp else "x_sigma"}
                if not vp:
                    entry["init_noise_sigma"] = float(sch.init_noise_sigma)
                out["diffusers"][f"{name}/{spacing}/{param}"] = entry
                print("diffusers", name, spacing, param, float(res.std()), ts[:4].tolist())
    torch.save(out, HERE / "oracle.pt")
    print("wrote", HERE / "oracle.pt", (HERE / "oracle.pt").stat().st_size, "bytes")


if __name__ == "__main__":
    with torch.no_grad():
        main()
