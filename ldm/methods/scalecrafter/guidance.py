"""ScaleCrafter's guided prediction for one sampling step, consulted by the DDIM sampler.

Re-dilated (or dispersed) UNet: ε̃. With noise-damped classifier-free guidance (paper eq. 5), for
steps < ndcfg_tau:   ε = ε_base(x_t, ∅) + w·(ε̃(x_t, y) − ε̃(x_t, ∅)),
where ε_base is the UNet under the mild ``ndcfg`` schedule. Only the unconditional branch of ε_base is
evaluated, so such a step costs 1.5 plain CFG steps (the authors' release evaluates both branches and
discards one: 2×). Afterwards plain CFG with the strong schedule.
"""
import torch

from ldm.models.diffusion.ddim import _cat_cond
from ldm.unet_hooks.redilation import installed


class ScaleCrafterGuidance:
    def __init__(self, plan):
        self.plan = plan

    def __call__(self, model, x, t, cond, uncond, scale, step):
        if step >= self.plan.disperse_tau and self.plan._dispersed_weights:
            self.plan.release()  # dispersed kernels are not used after disperse_tau: free them (up to ~1 GB on SDXL)
        with installed(self.plan.processors(step, "strong")):
            if uncond is None or scale == 1.0:
                return model.apply_model(x, t, cond)
            e_uncond, e_cond = model.apply_model(torch.cat([x] * 2), torch.cat([t] * 2),
                                                 _cat_cond(uncond, cond)).chunk(2)
        if self.plan.uses_ndcfg(step):
            with installed(self.plan.processors(step, "ndcfg")):
                e_base = model.apply_model(x, t, uncond)
        else:
            e_base = e_uncond
        return e_base + scale * (e_cond - e_uncond)
