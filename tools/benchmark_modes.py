"""What one sampling step costs in each benchmark mode (used by scripts/benchmark.py).

All modes run one guided DDIM step's UNet work on ``batch`` latents (batch 2 = one CFG pair), with a
ScaleCrafter preset at its first (most expensive) step. For SD 2.1 (``family="sd2"``):
  plain            classifier-free guidance, the original UNet
  redilate         the same with the re-dilation of sd2.1_2048x2048.yaml (integer factors 2/3/4)
  redilate_frac    re-dilation at the fractional factor 2.5 of sd2.1_1280x1280.yaml
  redilate_ndcfg   re-dilation + noise-damped CFG (one extra unconditional pass)
  disperse         sd2.1_2048x2048_disperse.yaml without ndcfg: dispersed 5x5 kernels where listed, each
                   layer on the path redilation.choose_dispersion_path picks
  disperse_direct  the same, every dispersed layer on the direct path (5x5 kernel R·k formed per call)
  disperse_basis   the same, every dispersed layer on the basis path (depthwise basis conv + 1x1)
  preset           the preset made for this image size (e.g. sd2.1_2048x2048.yaml at a 256² latent), as it runs
For SDXL (``family="sdxl"``) the same modes use sdxl_4096x4096.yaml (redilate, redilate_ndcfg),
sdxl_2560x2560.yaml (redilate_frac), sdxl_4096x4096_disperse.yaml (disperse) and sdxl_<size>.yaml (preset),
plus ``preset_corrected`` (sdxl_<size>_corrected.yaml). SDXL's UNet also gets the vector condition y.
"""
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from ldm.methods.scalecrafter.guidance import ScaleCrafterGuidance
from ldm.methods.scalecrafter.presets import load_preset, plan_from_preset

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "scalecrafter"
MODES = ("plain", "redilate", "redilate_frac", "redilate_ndcfg", "disperse", "disperse_direct", "disperse_basis",
         "preset", "preset_corrected")
DISPERSION_PATH = {"disperse": "auto", "disperse_direct": "direct", "disperse_basis": "basis"}
PREFIX = {"sd2": "sd2.1", "sdxl": "sdxl"}
FIXED = {  # mode -> (preset name without the family prefix, with noise-damped CFG)
    "sd2": {"redilate": ("2048x2048", False), "redilate_frac": ("1280x1280", False),
            "redilate_ndcfg": ("2048x2048", True), "disperse": ("2048x2048_disperse", False),
            "disperse_direct": ("2048x2048_disperse", False), "disperse_basis": ("2048x2048_disperse", False)},
    "sdxl": {"redilate": ("4096x4096", False), "redilate_frac": ("2560x2560", False),
             "redilate_ndcfg": ("4096x4096", True), "disperse": ("4096x4096_disperse", False),
             "disperse_direct": ("4096x4096_disperse", False), "disperse_basis": ("4096x4096_disperse", False)},
}


class BareUNetModel:
    """The part of LatentDiffusion that guidance hooks use, on a bare UNet: ``apply_model`` (SD: a context
    tensor; SDXL: {"crossattn", "vector"}) and ``model.diffusion_model``."""

    def __init__(self, unet):
        self.unet = unet
        self.model = SimpleNamespace(diffusion_model=unet)

    def apply_model(self, x, t, cond):
        if isinstance(cond, dict):
            return self.unet(x, t, context=cond["crossattn"], y=cond["vector"])
        return self.unet(x, t, context=cond)


def preset_path(mode, size, family="sd2"):
    """The preset file a mode runs at a latent side ``size`` (None for plain; may not exist)."""
    if mode == "plain":
        return None
    if mode in ("preset", "preset_corrected"):
        side = 8 * size
        suffix = "_corrected" if mode == "preset_corrected" else ""
        return PRESETS / f"{PREFIX[family]}_{side}x{side}{suffix}.yaml"
    return PRESETS / f"{PREFIX[family]}_{FIXED[family][mode][0]}.yaml"


def mode_available(mode, size, family="sd2"):
    path = preset_path(mode, size, family)
    return path is None or path.is_file()


def _plan(unet, path, ndcfg, dispersion_path="auto"):
    cfg = load_preset(path)
    if not ndcfg:
        cfg["ndcfg_tau"] = 0
    cfg["disperse_path"] = dispersion_path
    with warnings.catch_warnings():  # the released SDXL files' dead names (documented in the presets)
        warnings.simplefilter("ignore")
        return plan_from_preset(unet, cfg)


def _context_dim(unet):
    for m in unet.modules():
        if hasattr(m, "attn2"):
            return m.attn2.to_k.in_features
    raise ValueError("the UNet has no cross-attention")


def make_step(mode, unet, size, batch, device, dtype, family="sd2"):
    if batch % 2:
        raise ValueError("batch must be even (conditional + unconditional halves)")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {MODES}")
    half = batch // 2
    x = torch.randn(half, unet.in_channels, size, size, device=device, dtype=dtype)
    t = torch.full((half,), 981, device=device, dtype=torch.long)
    ctx_dim = _context_dim(unet)
    cond = torch.randn(half, 77, ctx_dim, device=device, dtype=dtype)
    uncond = torch.randn(half, 77, ctx_dim, device=device, dtype=dtype)
    if unet.num_classes == "sequential":  # SDXL: the vector condition y
        adm = unet.label_emb[0][0].in_features
        cond = {"crossattn": cond, "vector": torch.randn(half, adm, device=device, dtype=dtype)}
        uncond = {"crossattn": uncond, "vector": torch.randn(half, adm, device=device, dtype=dtype)}
    model = BareUNetModel(unet)
    if mode == "plain":
        from ldm.guidance import classifier_free_guidance
        return lambda i: classifier_free_guidance(model, x, t, cond, uncond, 7.5)
    path = preset_path(mode, size, family)
    if not path.is_file():
        raise ValueError(f"mode {mode} at a {size}² latent needs {path.name}, which does not exist")
    ndcfg = True if mode in ("preset", "preset_corrected") else FIXED[family][mode][1]
    guide = ScaleCrafterGuidance(_plan(unet, path, ndcfg, DISPERSION_PATH.get(mode, "auto")))
    return lambda i: guide(model, x, t, cond, uncond, 7.5, step=0)
