"""Shared machinery of the samplers that work over noise levels sigma (Karras et al. 2022's view of the CompVis
DDPM models), on the sampler contract (``ldm/samplers/base.py``).

**Parameterisation.** These samplers hold x_sigma = x0 + sigma * noise (the variance-exploding form). The model
is fed the DDPM latent x_t = x_sigma * c_in with c_in = 1 / sqrt(sigma^2 + 1) and sigma_t = sqrt((1 - abar_t) /
abar_t), so ``guidance(model, x_t, t, ...)`` sees exactly what DDIM feeds it. Its output is eps (denoised =
x_sigma - sigma * eps) or, for ``model.parameterization == "v"`` (SD 2.1-v, the demo model), v (denoised =
x_sigma / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1)). ``noised(x0, steps, step, noise)`` = x0 + sigma_step *
noise; ``pre_step`` and ``x_T`` (any ``start_step``) are x_sigma. A run from noise starts at
noise * sqrt(sigma_0^2 + 1): the DDPM x_T = noise that DDIM starts from, mapped to x_sigma (what diffusers'
Euler/Heun schedulers start from with "leading" spacing; k-diffusion and diffusers' "trailing"/"linspace" start
at noise * sigma_0, 0.2 % smaller at SD's sigma_max 14.6). ``start_latent(noise, steps)`` gives it (``--fixed_code``).
The run returns x0 (the last step goes to sigma = 0), the same space DDIM returns.

**Spacing** (``spacing=``): which sigmas an S-step run visits, always followed by sigma = 0.

* ``leading``: t = k * (T // S) + steps_offset, k = S-1 .. 0 (diffusers' "leading"; with ``steps_offset`` 1 these
  are DDIM's timesteps). The default: it is how diffusers configures SD 1.5 / 2.1 (PNDM/DDIM, steps_offset 1) and
  SDXL (EulerDiscrete, ``timestep_spacing: leading``, steps_offset 1). (A diffusers Euler/DPM scheduler made
  ``from_config`` of SD 1.5 / 2.1, whose configs name no spacing, falls back to that class's "linspace".)
* ``trailing``: t = round(T - k * T / S) - 1, k = 0 .. S-1 (starts at T - 1).
* ``linspace``: S values from T - 1 to 0, fractional, sigma interpolated linearly in t (diffusers).
* ``karras``: Karras et al.'s rho = 7 schedule between the model's sigma_min = sigma_0 and sigma_max =
  sigma_{T-1} (k-diffusion's ``get_sigmas_karras`` on its CompVis denoiser's sigmas), t = the log-sigma
  interpolated (fractional) timestep.

The multistep solvers (DPM-Solver++, UniPC) take "leading" and "linspace" from S + 1 points and drop the last, as
diffusers' DPMSolverMultistep/UniPC schedulers do (``multistep_grid``). The model sees the spacing's own t:
discrete for leading/trailing, fractional for linspace/karras (``timesteps(steps)`` rounds them).

**Solvers** are short functions ``solver(denoise, x, sigmas, loop, **options) -> x`` in the k-diffusion style:
``denoise(x, i, j)`` is the guided denoised estimate at sigma_j during step i (j = i, or i + 1 for a second-order
solver's second stage), ``loop`` yields the step indices (calling ``callback`` after each) and ``loop.pre(x, i)``
applies ``pre_step``; ``noise(i)`` is step i's unit Gaussian draw (ancestral / SDE solvers).
"""
import math

import numpy as np
import torch
from tqdm import tqdm

from ldm.guidance import classifier_free_guidance
from ldm.modules.diffusionmodules.util import gaussian_noise
from ldm.samplers.base import Sampler, check_finite_run

SPACINGS = ("leading", "trailing", "linspace", "karras")
KARRAS_RHO = 7.0


def model_sigmas(model):
    """sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0 .. T-1, in float64 from the model's alphas_cumprod."""
    ac = torch.as_tensor(model.alphas_cumprod).detach().to("cpu", torch.float64).numpy()
    return np.sqrt((1.0 - ac) / ac)


def spaced_timesteps(spacing, steps, T, steps_offset=1, multistep_grid=False):
    """The (descending, float64) timesteps of an S-step run for spacing leading | trailing | linspace (diffusers'
    definitions; ``multistep_grid``: leading/linspace over S + 1 points, the last dropped, as its multistep
    schedulers do)."""
    n = steps + 1 if multistep_grid else steps
    if spacing == "leading":
        return (np.arange(n - steps, n) * (T // n))[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)) - 1.0
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n)[::-1]
        return np.round(ts)[:steps] if multistep_grid else ts.copy()
    raise ValueError(f"unknown spacing {spacing!r}; known: {', '.join(SPACINGS)}")


def karras_sigmas(steps, sigma_min, sigma_max, rho=KARRAS_RHO):
    """Karras et al. (2022), eq. 5: S sigmas from sigma_max to sigma_min, evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, steps)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def schedule(sigmas_t, spacing, steps, steps_offset=1, multistep_grid=False):
    """(sigmas: float32 tensor of S + 1 values ending in 0, ts: the float64 timesteps the model is given)."""
    T = len(sigmas_t)
    if spacing == "karras":
        s32 = sigmas_t.astype(np.float32).astype(np.float64)  # the model's sigmas as a float32 buffer holds them
        sig = karras_sigmas(steps, s32[0], s32[-1])
        ts = np.interp(np.log(sig), np.log(s32), np.arange(T))  # log sigma is increasing in t
    else:
        ts = spaced_timesteps(spacing, steps, T, steps_offset, multistep_grid)
        if not (0 <= ts.min() and ts.max() <= T - 1):
            raise ValueError(f"{spacing} spacing with steps_offset {steps_offset} leaves timesteps 0..{T - 1} "
                             f"for {steps} steps")
        sig = np.interp(ts, np.arange(T), sigmas_t)
    return torch.tensor(np.append(sig, 0.0), dtype=torch.float32), ts


class Denoiser:
    """x_sigma -> the guided denoised estimate, through ``guidance(model, x_sigma * c_in, t, ...)``."""

    def __init__(self, model, guidance, cond, uncond, scale, sigmas, ts):
        self.model, self.guidance = model, guidance or classifier_free_guidance
        self.cond, self.uncond, self.scale = cond, uncond, scale
        self.sigmas, self.ts = sigmas, ts
        self.v = getattr(model, "parameterization", "eps") == "v"
        self.finite = []  # (step index, is the estimate finite) per call, on the device (base.check_finite_run)

    def __call__(self, x, i, j):
        """The denoised estimate at sigmas[j] (timestep ts[j]) for step index i."""
        sigma, t = float(self.sigmas[j]), float(self.ts[j])
        integral = t == round(t)
        tt = torch.full((x.shape[0],), round(t) if integral else t, device=x.device,
                        dtype=torch.long if integral else torch.float32)
        out = self.guidance(self.model, x * (1.0 / math.sqrt(sigma ** 2 + 1)), tt, self.cond, self.uncond,
                            self.scale, i).to(x.dtype)
        self.finite.append((i, torch.isfinite(out).all()))
        if self.v:
            return x * (1.0 / (sigma ** 2 + 1)) - out * (sigma / math.sqrt(sigma ** 2 + 1))
        return x - out * sigma


class Loop:
    """The step indices start .. S-1 (a progress bar unless disabled); ``callback(i)`` after each step,
    ``pre(x, i)`` = ``pre_step(x, i, t_i)``."""

    def __init__(self, start, steps, ts, pre_step=None, callback=None, desc="", disable=True):
        self.start, self.steps, self.ts = start, steps, ts
        self.pre_step, self.callback, self.desc, self.disable = pre_step, callback, desc, disable

    def __iter__(self):
        for i in tqdm(range(self.start, self.steps), desc=self.desc, disable=self.disable, leave=False):
            yield i
            if self.callback:
                self.callback(i)

    def pre(self, x, i):
        if self.pre_step is None:
            return x
        t = torch.full((x.shape[0],), int(round(float(self.ts[i]))), device=x.device, dtype=torch.long)
        return self.pre_step(x, i, t)


def ancestral_step(sigma_from, sigma_to, eta=1.0):
    """(sigma_down, sigma_up) of an ancestral step: deterministic to sigma_down, then noise of std sigma_up."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2))
    return math.sqrt(sigma_to ** 2 - sigma_up ** 2), sigma_up


class KDiffusionSampler(Sampler):
    """A sampler over sigmas: subclasses set ``name``, ``label``, ``solver`` (a function, see the module doc),
    ``stochastic`` (draws noise each step; takes ``eta``) and ``multistep_grid``."""
    label = ""
    solver = None
    stochastic = False
    multistep_grid = False
    default_spacing = "leading"

    def __init__(self, model, spacing=None, steps_offset=1, eta=1.0, **ignored):
        self.model = model
        self.spacing = spacing or self.default_spacing
        if self.spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {self.spacing!r}; known: {', '.join(SPACINGS)}")
        self.steps_offset = int(steps_offset)
        self.eta = float(eta)
        if self.stochastic and self.eta < 0:
            raise ValueError(f"eta must be >= 0 (0: no noise, 1: the full ancestral/SDE noise), got {eta}")
        self._sigmas_t = model_sigmas(model)

    def schedule(self, steps):
        """(sigmas, ts): the S + 1 sigmas of an S-step run (last 0) and the S timesteps the model sees."""
        return schedule(self._sigmas_t, self.spacing, steps, self.steps_offset, self.multistep_grid)

    def timesteps(self, steps):
        return [int(round(float(t))) for t in self.schedule(steps)[1]]

    def noised(self, x0, steps, step, noise):
        return x0 + noise * float(self.schedule(steps)[0][step])

    def noise(self, shape, device, generator=None):
        return gaussian_noise(shape, device, generator)

    def start_latent(self, noise, steps):
        return noise * math.sqrt(float(self.schedule(steps)[0][0]) ** 2 + 1)

    def run(self, steps, cond, uncond, scale, *, batch_size, shape=None, x_T=None, guidance=None, start_step=0,
            pre_step=None, generator=None, callback=None, disable_progress=True):
        if not 0 <= int(start_step) < steps:
            raise ValueError(f"start_step must be in [0, {steps}), got {start_step}")
        if start_step and x_T is None:
            raise ValueError("start_step > 0 needs x_T: the latent at that step (x0 + sigma * noise)")
        device = self.model.betas.device
        sigmas, ts = self.schedule(steps)
        if x_T is None:
            x = self.start_latent(self.noise((batch_size, *shape), device, generator), steps)
        else:
            x = x_T.to(device)
        denoise = Denoiser(self.model, guidance, cond, uncond, scale, sigmas, ts)
        loop = Loop(int(start_step), steps, ts, pre_step, callback, self.label, disable_progress)
        options = {}
        if self.stochastic:
            options = dict(eta=self.eta, noise=lambda i: self.noise(x.shape, device, generator).to(x.dtype))
        with torch.no_grad():
            out = type(self).solver(denoise, x, sigmas, loop, **options)
        return check_finite_run(out, denoise.finite, steps, self.timesteps(steps), int(start_step))

    def describe(self):
        out = {"sampler": self.label, "spacing": self.spacing}
        if self.spacing == "leading":
            out["steps_offset"] = self.steps_offset
        if self.stochastic:
            out["eta"] = self.eta
        return out
