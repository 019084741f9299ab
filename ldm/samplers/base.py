"""The sampler contract: what pipelines and methods may ask of any sampler.

A sampler is built on a model (``Sampler(model, **options)``) and never owns a method. Methods reach it only
through these calls:

* ``run(steps, cond, uncond, scale, *, batch_size, shape | x_T, guidance, start_step, pre_step, generator,
  callback)`` -> the final latent. ``guidance(model, x, t, cond, uncond, scale, step)`` (``ldm/guidance.py``) is
  called with the model-space input x_t (the DDPM latent: DDIM's own; x_sigma * c_in for the samplers over
  sigmas, ``ldm/samplers/kdiff.py``), a timestep tensor ``t`` (discrete for first-order solvers on discrete
  spacings; fractional for linspace/Karras spacing and a second-order solver's second stage) and the 0-based step
  index ``step`` (a second-order solver calls it twice with the same index: Heun's stage 1 at t_i, stage 2 at
  t_{i+1}). It returns the final latent in the model's latent space (x0). ``start_step`` > 0 starts at that step
  of the ``steps``-step run with ``x_T`` as the latent there (img2img, re-noised cascade stages); ``x_T`` (any
  ``start_step``) and ``pre_step(x, step, t) -> x`` (edits the latent before each step: skip residuals) are in the
  sampler's own parameterisation (DDIM: the DDPM x_t; the sigma samplers: x0 + sigma * noise); ``generator`` is
  None (global RNG), one generator, or one per batch row (row i draws only from ``generator[i]``, so an image does
  not depend on its batch), for the start noise and any per-step noise.
* ``timesteps(steps)``: the discrete timestep of each step index, in sampling order;
* ``noised(x0, steps, step, noise)``: a clean latent noised to what the sampler holds at ``step``;
* ``noise(shape, device, generator)``: the sampler's Gaussian draw (same generator conventions as ``run``);
* ``start_latent(noise, steps)``: the latent a run from noise starts from, for a unit-variance ``noise`` (what
  ``run`` does when ``x_T`` is None; ``--fixed_code`` passes it as ``x_T``). DDIM: the noise itself;
* ``describe()``: the sampler's settings for PNG metadata and manifests.

``run`` raises :class:`ldm.errors.NonFiniteError` when its result holds a NaN or an infinity, naming the step where
they first appeared (:func:`check_finite_run`: one flag per step, no device sync per step).
"""
from typing import ClassVar

import torch

from ldm.errors import NonFiniteError


class Sampler:
    name: ClassVar[str] = ""

    def run(self, steps, cond, uncond, scale, *, batch_size, shape=None, x_T=None, guidance=None, start_step=0,
            pre_step=None, generator=None, callback=None, disable_progress=True):
        raise NotImplementedError

    def timesteps(self, steps):
        raise NotImplementedError

    def noised(self, x0, steps, step, noise):
        raise NotImplementedError

    def noise(self, shape, device, generator=None):
        raise NotImplementedError

    def start_latent(self, noise, steps):
        return noise

    def describe(self):
        return {"sampler": self.name}


def check_finite_run(latent, step_flags, steps, timesteps, start_step=0):
    """Raise :class:`NonFiniteError` unless ``latent`` (a run's result) is finite. ``step_flags``: one 0-dim bool
    tensor per step run (``torch.isfinite(x).all()`` after the step, kept on the device: no sync per step), or
    (step index, flag) pairs (a sampler that checks its model calls, several per step), so the message names the
    first step whose latent held a NaN or an infinity. ``timesteps``: the run's discrete timesteps in sampling order
    (``Sampler.timesteps(steps)``). Fake tensors (``tools/fake_cuda.py``: shapes only) pass."""
    from torch._subclasses.fake_tensor import is_fake
    if is_fake(latent) or bool(torch.isfinite(latent).all()):
        return latent
    step = None
    if step_flags:
        pairs = [f if isinstance(f, tuple) else (start_step + k, f) for k, f in enumerate(step_flags)]
        bad = (~torch.stack([f.to("cpu") for _, f in pairs])).nonzero()
        step = pairs[int(bad[0])][0] if len(bad) else None
    total = len(timesteps)  # the steps actually run (DDIM's uniform spacing can give one more than asked for)
    where = (f"at sampling step {step + 1} of {total} (timestep {int(timesteps[step])})" if step is not None
             else f"in a run of {total} steps")
    raise NonFiniteError(
        f"the latent became NaN or infinite {where}: the images would be black, so nothing is written for this "
        "batch. Usual causes: a guidance scale or method setting far outside its usual range, or float16 "
        "overflow on CUDA (try --precision full)")
