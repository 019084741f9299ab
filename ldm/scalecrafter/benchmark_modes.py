"""What one sampling step costs in each benchmark mode (used by scripts/benchmark.py).

All modes run one guided DDIM step's UNet work on ``batch`` latents (batch 2 = one CFG pair), with
the SD 2.1 2048² presets at their first (most expensive) step:
  plain            classifier-free guidance, the original UNet
  redilate         the same with the re-dilation of sd2.1_2048x2048.yaml (integer factors 2/3/4)
  redilate_frac    re-dilation at the fractional factor 2.5 of sd2.1_1280x1280.yaml
  redilate_ndcfg   re-dilation + noise-damped CFG (one extra unconditional pass)
  disperse         sd2.1_2048x2048_disperse.yaml without ndcfg: dispersed 5x5 kernels where listed
"""
from pathlib import Path

import torch

from ldm.scalecrafter.guidance import ScaleCrafterGuidance
from ldm.scalecrafter.presets import load_preset, plan_from_preset

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "scalecrafter"
MODES = ("plain", "redilate", "redilate_frac", "redilate_ndcfg", "disperse")


class _Direct:
    """Minimal stand-in for LatentDiffusion.apply_model on a bare UNet."""

    def __init__(self, unet):
        self.unet = unet

    def apply_model(self, x, t, cond):
        return self.unet(x, t, context=cond)


def _plan(unet, preset, ndcfg):
    cfg = load_preset(PRESETS / preset)
    if not ndcfg:
        cfg["ndcfg_tau"] = 0
    return plan_from_preset(unet, cfg)


def make_step(mode, unet, size, batch, device, dtype):
    if batch % 2:
        raise ValueError("batch must be even (conditional + unconditional halves)")
    half = batch // 2
    x = torch.randn(half, unet.in_channels, size, size, device=device, dtype=dtype)
    t = torch.full((half,), 981, device=device, dtype=torch.long)
    ctx_dim = unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features
    cond = torch.randn(half, 77, ctx_dim, device=device, dtype=dtype)
    uncond = torch.randn(half, 77, ctx_dim, device=device, dtype=dtype)
    model = _Direct(unet)
    if mode == "plain":
        from ldm.models.diffusion.ddim import classifier_free_guidance
        return lambda i: classifier_free_guidance(model, x, t, cond, uncond, 7.5)
    preset, ndcfg = {"redilate": ("sd2.1_2048x2048.yaml", False),
                     "redilate_frac": ("sd2.1_1280x1280.yaml", False),
                     "redilate_ndcfg": ("sd2.1_2048x2048.yaml", True),
                     "disperse": ("sd2.1_2048x2048_disperse.yaml", False)}[mode]
    guide = ScaleCrafterGuidance(_plan(unet, preset, ndcfg))
    return lambda i: guide(model, x, t, cond, uncond, 7.5, step=0)
