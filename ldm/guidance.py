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
