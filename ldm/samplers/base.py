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
"""
from typing import ClassVar


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
