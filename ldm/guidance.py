"""Classifier-free guidance, the seam between a method and a sampler.

A *guidance* is any callable ``guidance(model, x, t, cond, uncond, scale, step) -> model_output``; a sampler
calls it once per step index with the discrete timestep ``t`` and the 0-based ``step`` in sampling order. Methods
supply their own (re-dilated, windowed, ...) and fall back on :func:`classifier_free_guidance`.
"""
import torch


def cat_cond(uncond, cond):
    """Concatenate unconditional and conditional inputs (tensors, lists of tensors or dicts of them)."""
    if isinstance(cond, dict):
        return {k: cat_cond(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, list):
        return [torch.cat([u, c]) for u, c in zip(uncond, cond)]
    return torch.cat([uncond, cond])


def classifier_free_guidance(model, x, t, cond, uncond, scale, step=None):
    """eps_uncond + scale * (eps_cond - eps_uncond), both branches in one batched UNet call."""
    if uncond is None or scale == 1.0:
        return model.apply_model(x, t, cond)
    out_uncond, out_cond = model.apply_model(torch.cat([x] * 2), torch.cat([t] * 2), cat_cond(uncond, cond)).chunk(2)
    return out_uncond + scale * (out_cond - out_uncond)


# ------------------------------------------------------------------------------------------------
# method schedules by trajectory fraction


def reference_timesteps(num_timesteps, steps):
    """The discrete timesteps of a DDIM run of ``steps`` steps (uniform spacing), in sampling order: the reference a
    method's per-step settings are written for (a preset's ``steps``, or the run's own step count)."""
    from ldm.modules.diffusionmodules.util import make_ddim_timesteps
    return list(reversed(make_ddim_timesteps("uniform", int(steps), int(num_timesteps), False).tolist()))


class TrajectoryClock:
    """Where a sampler is on the noise trajectory, in the step indices of the reference run (``reference_timesteps``).

    A setting written for the reference steps i < τ is active while the noise is above that of reference step τ: at
    a timestep t, the reference step is the number of reference timesteps above t. So a preset made for 50 DDIM steps
    means the same part of the trajectory at 20 steps of another sampler; a DDIM run of the reference's own step
    count gets its own step indices back (bitwise the same run). Second-order samplers call the guidance twice per
    step: each call is placed by its own timestep."""

    def __init__(self, reference):
        self.reference = [float(t) for t in reference]

    def step_of(self, t):
        t = float(t.flatten()[0]) if hasattr(t, "flatten") else float(t)
        return sum(1 for r in self.reference if r > t)

    def run_step_of(self, reference_step, timesteps):
        """The first step of a run (``timesteps`` in sampling order) that is at or past ``reference_step``."""
        for k, t in enumerate(timesteps):
            if self.step_of(t) >= reference_step:
                return k
        return len(timesteps)

    def wrap(self, guidance):
        """``guidance`` called with reference step indices instead of the run's."""
        if guidance is None:
            return None

        def clocked(model, x, t, cond, uncond, scale, step=None):
            return guidance(model, x, t, cond, uncond, scale, self.step_of(t))
        clocked.inner = guidance
        return clocked
