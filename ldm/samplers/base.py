"""The sampler contract: what pipelines and methods may ask of any sampler.

A sampler is built on a model (``Sampler(model, **options)``) and never owns a method. Methods reach it only
through these calls:

* ``run(steps, cond, uncond, scale, *, batch_size, shape | x_T, guidance, start_step, pre_step, generator,
  callback)`` -> the final latent. ``guidance(model, x, t, cond, uncond, scale, step)`` (``ldm/guidance.py``) is
  called once per step index with the discrete timestep ``t``; ``start_step`` > 0 starts at that step of the
  ``steps``-step run with ``x_T`` as the latent there (img2img, re-noised cascade stages); ``pre_step(x, step, t)
  -> x`` edits the latent before each step (skip residuals); ``generator`` is None (global RNG), one generator,
  or one per batch row (row i draws only from ``generator[i]``, so an image does not depend on its batch).
* ``timesteps(steps)``: the discrete timestep of each step index, in sampling order;
* ``noised(x0, steps, step, noise)``: a clean latent noised to what the sampler holds at ``step``;
* ``noise(shape, device, generator)``: the sampler's Gaussian draw (same generator conventions as ``run``);
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

    def describe(self):
        return {"sampler": self.name}


def check_finite_run(latent, step_flags, steps, timesteps, start_step=0):
    """Raise :class:`NonFiniteError` unless ``latent`` (a run's result) is finite. ``step_flags``: one 0-dim bool
    tensor per step run (``torch.isfinite(x).all()`` after the step, kept on the device: no sync per step), so
    the message names the first step whose latent held a NaN or an infinity. ``timesteps``: the run's discrete
    timesteps in sampling order (``Sampler.timesteps(steps)``). Fake tensors (``tools/fake_cuda.py``: shapes
    only) pass."""
    from torch._subclasses.fake_tensor import is_fake
    if is_fake(latent) or bool(torch.isfinite(latent).all()):
        return latent
    step = None
    if step_flags:
        bad = (~torch.stack([f.to("cpu") for f in step_flags])).nonzero()
        step = start_step + int(bad[0]) if len(bad) else None
    total = len(timesteps)  # the steps actually run (DDIM's uniform spacing can give one more than asked for)
    where = (f"at sampling step {step + 1} of {total} (timestep {int(timesteps[step])})" if step is not None
             else f"in a run of {total} steps")
    raise NonFiniteError(
        f"the latent became NaN or infinite {where}: the images would be black, so nothing is written for this "
        "batch. Usual causes: a guidance scale or method setting far outside its usual range, or float16 "
        "overflow on CUDA (try --precision full)")
