"""HiDiffusion (Zhang et al., ECCV 2024, "HiDiffusion: Unlocking Higher-Resolution Creativity and Efficiency in
Pretrained Diffusion Models"): two changes to the UNet, no extra UNet calls.

* **RAU-Net** (resolution-aware U-Net): during the first sampling steps the UNet's inner levels run at the size
  they were trained at. Two down/up pairs, each switched off after its own step count:
  - a *RAD conv*: one stride-2 downsampling conv runs with stride 4, dilation 2, padding 2 (4x instead of 2x
    downsampling, same weights); the mirror upsampler then enlarges 4x (nearest) because every ``Upsample`` of
    this UNet enlarges to the size of the skip connection it is concatenated with (the release forces the
    same with its ``num_upsamplers += 12`` hack, which makes diffusers forward that size), so it needs no
    processor of its own;
  - a *pool pair*: the first ResBlock+transformer block of level 1 is followed by ``avg_pool2d(2, ceil_mode)``
    (its skip connection is the pooled map), and the second block of the mirror up level is followed by a
    bicubic interpolation back to the size before pooling.
  SD 1.x/2.x (4 levels): RAD conv = level 0's downsampler, switched by T1; pool pair at level 1, by T2.
  SDXL (3 levels): pool pair at level 1, by T1; RAD conv = level 1's downsampler, by T2; below 4096 px (latent
  side < 4x the training latent) the release's *aggressive* schedule: RAD conv for steps [0, int(8/50*N)),
  pool pair for [int(8/50*N), int(T1*N)).
* **MSW-MSA** (multi-scale shifted window self-attention): in the transformers of the top attention level
  (SD: level 0 down and up, SDXL: level 1 down and up) self-attention runs in a 2x2 grid of windows of
  (ceil(H/2), ceil(W/2)) tokens, the grid shifted by a random k/4 of a window, k in {0, 1, 2, 3} per call, via
  ``torch.roll``. Cross-attention and the feed-forward are unchanged. Active at every step.

Switching ratios (T = int(N * ratio) of N steps), by the latent size as in the release: "sd15_1024" T1 0.4 T2 0
and "sd15_2048" T1 0.7 T2 0.3 (SD, split at a latent side of 4x the training latent: 256 for SD 1.5/2.1-base),
"sdxl_2048" T1 0.4 T2 0 and "sdxl_4096" T1 0.7 T2 0.3 (SDXL, split at 512).

Built from per-call processors (``ldm.unet_hooks.processors``) on existing modules (a conv, two UNet blocks, the top
level's ``SpatialTransformer``s and their ``attn1``), installed per sampling step by the sampler's ``guidance``
hook, which also supplies the step index. Differences from megvii-research/HiDiffusion (docs/hidiffusion.md):
the step is the sampler's, not a per-module forward counter; the window shift is drawn from a generator seeded
with (run seed, step), not from the global RNG; the windowed layers read their feature size from the feature
map, not from a formula on the latent size; the preset split is relative to the model's training latent.
"""
import argparse
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.errors import InputWarning, UsageError
from ldm.methods.base import GuidanceMethod, Settings
from ldm.guidance import classifier_free_guidance
from ldm.util import unit_float
from ldm.unet_hooks.processors import call_original, installed

# (T1_ratio, T2_ratio) per preset, as the release's switching_threshold_ratio_dict
SWITCHING_RATIOS = {
    "sd15_1024": (0.4, 0.0),
    "sd15_2048": (0.7, 0.3),
    "sdxl_2048": (0.4, 0.0),
    "sdxl_4096": (0.7, 0.3),
}
AGGRESSIVE_STEP = 8  # the release's aggressive_step, of 50 steps
RAD = {"stride": 4, "padding": 2, "dilation": 2}  # the RAD conv for t < T


# ---------------------------------------------------------------------------------------------
# the modules: diffusers names of the release -> this UNet's


def unet_layout(unet):
    """Block indices of a UNetModel: ``down_res[l]`` (input_blocks of level l's ResBlocks),
    ``down_sample[l]`` (the input block of level l's downsampler, levels but the last), ``up[l]`` (the
    output_blocks of level l, bottom level first in the UNet's order)."""
    nrb = list(unet.num_res_blocks)
    levels = len(nrb)
    down_res, down_sample, up = [], [], {}
    i = 1  # input_blocks.0 is conv_in
    for level in range(levels):
        down_res.append(list(range(i, i + nrb[level])))
        i += nrb[level]
        if level != levels - 1:
            down_sample.append(i)
            i += 1
    o = 0
    for level in reversed(range(levels)):
        up[level] = list(range(o, o + nrb[level] + 1))
        o += nrb[level] + 1
    return {"levels": levels, "down_res": down_res, "down_sample": down_sample, "up": up}


@dataclass
class HiDiffusionModules:
    """The modules HiDiffusion acts on, with their names (ours, and the release's diffusers names)."""
    arch: str                      # "sd" (SD 1.x/2.x layout) or "sdxl"
    rad_conv: nn.Conv2d
    pool_block: nn.Module          # followed by avg_pool2d
    unpool_block: nn.Module        # followed by bicubic interpolation back
    window_transformers: list      # SpatialTransformers whose self-attention is windowed
    names: dict = field(default_factory=dict)


def hidiffusion_modules(unet):
    """HiDiffusion's modules in this UNet (SD 1.x/2.x: 4 levels, SDXL: 3 levels), or ValueError."""
    from ldm.modules.diffusionmodules.openaimodel import Upsample
    lay = unet_layout(unet)
    if lay["levels"] == 4:
        arch, rad_level, window_level = "sd", 0, 0
        diff = {"rad": "down_blocks.0.downsamplers.0.conv", "pool": "down_blocks.1 (after resnets.0+attentions.0)",
                "unpool": "up_blocks.2 (after resnets.1+attentions.1)",
                "windows": "down_blocks.0.attentions.*, up_blocks.3.attentions.*"}
    elif lay["levels"] == 3:
        arch, rad_level, window_level = "sdxl", 1, 1
        diff = {"rad": "down_blocks.1.downsamplers.0.conv", "pool": "down_blocks.1 (after resnets.0+attentions.0)",
                "unpool": "up_blocks.1 (after resnets.1+attentions.1)",
                "windows": "down_blocks.1.attentions.*, up_blocks.1.attentions.*"}
    else:
        raise ValueError(f"HiDiffusion's module mapping is defined for the SD 1.x/2.x UNet (4 levels) and SDXL's "
                         f"(3 levels); this UNet has {lay['levels']}")
    if min(unet.num_res_blocks[:2]) < 2:
        return _reduced_modules(unet, lay)
    di = lay["down_sample"][rad_level]
    rad = _rad_conv_of(unet, di)
    pi, ui = lay["down_res"][1][0], lay["up"][1][1]
    if any(isinstance(m, Upsample) for m in unet.output_blocks[ui]):
        raise ValueError(f"output_blocks.{ui} holds an upsampler; HiDiffusion's mapping does not apply")
    windows, window_names = _window_transformers(unet, lay, window_level)
    names = {"rad_conv": f"input_blocks.{di}.0.op", "pool_block": f"input_blocks.{pi}",
             "unpool_block": f"output_blocks.{ui}", "window_transformers": window_names,
             "release_names": diff}
    return HiDiffusionModules(arch, rad, unet.input_blocks[pi], unet.output_blocks[ui], windows, names)


def _reduced_modules(unet, lay):
    """Other layouts (e.g. the demo model: one ResBlock per level, no self-attention): the RAD conv on level 0's
    downsampler with SD's schedule, no pool pair (it needs two ResBlocks on levels 0 and 1, the mirror up block
    must not hold an upsampler), windowed attention where level 0 has self-attention."""
    di = lay["down_sample"][0]
    rad = _rad_conv_of(unet, di)
    windows, window_names = _window_transformers(unet, lay, 0)
    names = {"rad_conv": f"input_blocks.{di}.0.op", "pool_block": None, "unpool_block": None,
             "window_transformers": window_names,
             "release_names": {"note": "reduced mapping (not an SD 1.x/2.x or SDXL layout): RAD conv only"}}
    return HiDiffusionModules("sd", rad, None, None, windows, names)


def _rad_conv_of(unet, index):
    """The conv of the downsampler ``input_blocks[index]`` (ValueError unless a 3x3 stride-2 conv)."""
    from ldm.modules.diffusionmodules.openaimodel import Downsample
    down = unet.input_blocks[index][0]
    if not (isinstance(down, Downsample) and isinstance(down.op, nn.Conv2d) and down.op.kernel_size == (3, 3)
            and down.op.stride == (2, 2)):
        raise ValueError(f"input_blocks.{index} is not a 3x3 stride-2 conv downsampler: HiDiffusion's RAD conv "
                         "does not apply to this UNet (resblock_updown UNets have none)")
    return down.op


def _window_transformers(unet, lay, level):
    """(SpatialTransformers with self-attention in ``level``'s down and up blocks, their names)."""
    from ldm.modules.attention import SpatialTransformer
    windows, names = [], []
    for prefix, idx in (("input_blocks", lay["down_res"][level]), ("output_blocks", lay["up"][level])):
        blocks = unet.input_blocks if prefix == "input_blocks" else unet.output_blocks
        for i in idx:
            for j, m in enumerate(blocks[i]):
                if isinstance(m, SpatialTransformer) and any(not b.disable_self_attn for b in m.transformer_blocks):
                    windows.append(m)
                    names.append(f"{prefix}.{i}.{j}")
    return windows, names


# ---------------------------------------------------------------------------------------------
# schedule


def preset_name(arch, latent_hw, base_latent):
    """The release's switching-ratio preset: the high one when both latent sides reach 4x the training
    latent (SD 1.5/2.1-base: 256, SDXL: 512)."""
    big = min(latent_hw) >= 4 * int(base_latent)
    return {"sd": ("sd15_1024", "sd15_2048"), "sdxl": ("sdxl_2048", "sdxl_4096")}[arch][big]


def step_schedule(arch, steps, t1_ratio, t2_ratio, aggressive=False):
    """{"rad": (start, end), "pool": (start, end)}: the half-open step ranges in which the RAD conv and the pool
    pair are active, of ``steps`` sampling steps, as the release computes them (T = int(steps * ratio))."""
    steps = int(steps)
    t1, t2 = int(steps * t1_ratio), int(steps * t2_ratio)
    if arch == "sd":
        if aggressive:
            raise ValueError("the aggressive RAU-Net schedule is SDXL's (the release uses it for SDXL only)")
        return {"rad": (0, t1), "pool": (0, t2)}
    if arch != "sdxl":
        raise ValueError(f"arch must be 'sd' or 'sdxl', got {arch!r}")
    if aggressive:
        start = int(AGGRESSIVE_STEP / 50 * steps)
        return {"rad": (0, start), "pool": (start, t1)}
    return {"rad": (0, t2), "pool": (0, t1)}


# ---------------------------------------------------------------------------------------------
# RAU-Net processors


def rad_conv(conv, x):
    """The resolution-aware downsampler: the conv's weights with stride 4, dilation 2, padding 2."""
    return F.conv2d(x, conv.weight, conv.bias, groups=conv.groups, **RAD)


class _PoolPair:
    """avg_pool2d after one block and bicubic interpolation back to the size before pooling after its mirror."""

    def __init__(self):
        self.size = None

    def pool(self, block, x, *args, **kwargs):
        h = call_original(block, x, *args, **kwargs)
        self.size = tuple(h.shape[-2:])
        return F.avg_pool2d(h, kernel_size=(2, 2), ceil_mode=True)

    def unpool(self, block, x, *args, **kwargs):
        h = call_original(block, x, *args, **kwargs)
        if self.size is None:
            raise RuntimeError("HiDiffusion: the up block of the pool pair ran before its down block")
        return F.interpolate(h, size=self.size, mode="bicubic")


# ---------------------------------------------------------------------------------------------
# MSW-MSA


def window_size(hw):
    """2x2 windows: (ceil(H/2), ceil(W/2)) tokens."""
    return (-(-int(hw[0]) // 2), -(-int(hw[1]) // 2))


def shift_for(k, window):
    """The grid shift for draw k in {0, 1, 2, 3}: k quarters of a window (rounded down per quarter). As the
    release, nothing is shifted when the row shift is 0 (windows under 4 rows)."""
    shift = ((window[0] // 4) * k, (window[1] // 4) * k)
    return shift if shift[0] > 0 else (0, 0)


def window_partition(x, hw, shift=(0, 0)):
    """(B, H*W, C) tokens -> (4B, h*w, C): the 2x2 windows (row-major per image) of the map rolled by -shift.
    A side that is odd is bicubic-resized to twice the window first (the release does the same, with a warning)."""
    b, n, c = x.shape
    h, w = int(hw[0]), int(hw[1])
    if n != h * w:
        raise ValueError(f"{n} tokens are not a {h}x{w} map")
    wh, ww = window_size(hw)
    x = x.reshape(b, h, w, c)
    if (h, w) != (2 * wh, 2 * ww):
        x = F.interpolate(x.permute(0, 3, 1, 2), size=(2 * wh, 2 * ww), mode="bicubic").permute(0, 2, 3, 1)
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    return x.reshape(b, 2, wh, 2, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(4 * b, wh * ww, c)


def window_reverse(windows, hw, shift=(0, 0)):
    """The inverse of :func:`window_partition`: (4B, h*w, C) -> (B, H*W, C)."""
    h, w = int(hw[0]), int(hw[1])
    wh, ww = window_size(hw)
    c = windows.shape[-1]
    b = windows.shape[0] // 4
    x = windows.reshape(b, 2, 2, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * wh, 2 * ww, c)
    if any(shift):
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    if (h, w) != (2 * wh, 2 * ww):
        x = F.interpolate(x.permute(0, 3, 1, 2), size=(h, w), mode="bicubic").permute(0, 2, 3, 1)
    return x.reshape(b, h * w, c)


class _FeatureSize:
    """Processor on a SpatialTransformer: records the (H, W) of its input for its windowed attention layers."""

    def __init__(self):
        self.hw = None

    def __call__(self, transformer, x, *args, **kwargs):
        self.hw = tuple(x.shape[-2:])
        return call_original(transformer, x, *args, **kwargs)


class WindowedSelfAttention:
    """Processor on a self-attention ``CrossAttention``: attention within the 2x2 windows of the feature map,
    the grid shifted by ``shift_for(draw(), window)``. ``hw``: a callable giving the map's (H, W)."""

    def __init__(self, hw, draw):
        self.hw, self.draw = hw, draw
        self.warned = False

    def __call__(self, attn, x, context=None, mask=None):
        if context is not None or mask is not None:  # not self-attention: unchanged
            return call_original(attn, x, context, mask)
        hw = self.hw()
        if (hw[0] % 2 or hw[1] % 2) and not self.warned:
            self.warned = True
            warnings.warn(f"HiDiffusion: a {hw[0]}x{hw[1]} feature map does not split into 2x2 windows; it is "
                          f"resized (bicubic) for the windowed attention, as the release does, which lowers the "
                          f"quality: use latent sides divisible by a higher power of 2, or "
                          f"--no-hidiff_window_attn", InputWarning)
        shift = shift_for(self.draw(), window_size(hw))
        out = call_original(attn, window_partition(x, hw, shift))
        return window_reverse(out, hw, shift)


def shift_seed(seed, step):
    """The seed of the window-shift generator at ``step`` of a run with seed ``seed``."""
    return int(np.random.SeedSequence([int(seed) % (1 << 64), int(step)]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------
# the guidance hook


class HiDiffusionGuidance:
    """``guidance`` for the DDIM sampler: RAU-Net and MSW-MSA processors for the step, then plain CFG.

    ``steps``: the number of sampling steps (T = int(steps * ratio)); ``base_latent``: the model's training
    latent side (the preset split); ``t1_ratio``/``t2_ratio``: None for the preset's; ``aggressive``: None for
    the release's choice (SDXL below the 4096 preset); ``seed``: the window shifts' seed.
    """

    def __init__(self, unet, steps, base_latent, apply_raunet=True, apply_window_attn=True, t1_ratio=None,
                 t2_ratio=None, aggressive=None, seed=0):
        self.modules = hidiffusion_modules(unet)
        for name, r in (("T1", t1_ratio), ("T2", t2_ratio)):
            if r is not None and not 0.0 <= float(r) <= 1.0:
                raise ValueError(f"the {name} ratio must be in [0, 1], got {r}")
        if aggressive and self.modules.arch != "sdxl":
            raise ValueError("the aggressive RAU-Net schedule is SDXL's (the release uses it for SDXL only)")
        if apply_window_attn and not self.modules.window_transformers:
            warnings.warn("this UNet has no self-attention at HiDiffusion's window level: the windowed attention "
                          "has nothing to act on (--no-hidiff_window_attn says so)", InputWarning)
            apply_window_attn = False
        self.steps, self.base_latent = int(steps), int(base_latent)
        self.apply_raunet, self.apply_window_attn = bool(apply_raunet), bool(apply_window_attn)
        self.t1_ratio, self.t2_ratio, self.aggressive = t1_ratio, t2_ratio, aggressive
        self.seed = int(seed)
        self._rng = None
        self._pair = _PoolPair()
        self._window_procs = []
        for transformer in self.modules.window_transformers:
            size = _FeatureSize()
            self._window_procs.append((transformer, size))
            proc = WindowedSelfAttention(lambda s=size: s.hw, self._draw)
            self._window_procs += [(b.attn1, proc) for b in transformer.transformer_blocks if not b.disable_self_attn]

    def _draw(self):
        return int(torch.randint(4, (1,), generator=self._rng))

    def settings(self, latent_hw):
        """(preset, T1 ratio, T2 ratio, aggressive, schedule) for a latent of ``latent_hw``."""
        arch = self.modules.arch
        preset = preset_name(arch, latent_hw, self.base_latent)
        t1, t2 = SWITCHING_RATIOS[preset]
        t1 = t1 if self.t1_ratio is None else float(self.t1_ratio)
        t2 = t2 if self.t2_ratio is None else float(self.t2_ratio)
        aggressive = (arch == "sdxl" and preset == "sdxl_2048") if self.aggressive is None else bool(self.aggressive)
        return preset, t1, t2, aggressive, step_schedule(arch, self.steps, t1, t2, aggressive)

    def processors(self, step, latent_hw):
        """The (module, processor) pairs of ``step`` for a latent of ``latent_hw``."""
        out = list(self._window_procs) if self.apply_window_attn else []
        if self.apply_raunet:
            schedule = self.settings(latent_hw)[-1]
            m = self.modules
            if schedule["rad"][0] <= step < schedule["rad"][1]:
                out.append((m.rad_conv, rad_conv))
            if m.pool_block is not None and schedule["pool"][0] <= step < schedule["pool"][1]:
                out += [(m.pool_block, self._pair.pool), (m.unpool_block, self._pair.unpool)]
        return out

    def __call__(self, model, x, t, cond, uncond, scale, step):
        if step is None:
            raise ValueError("HiDiffusion needs the sampling step (DDIMSampler passes it)")
        self._rng = torch.Generator().manual_seed(shift_seed(self.seed, step))
        self._pair.size = None
        with installed(self.processors(step, tuple(x.shape[-2:]))):
            return classifier_free_guidance(model, x, t, cond, uncond, scale)

    def describe(self, latent_hw):
        """The settings for the PNG metadata, for a latent of ``latent_hw``."""
        preset, t1, t2, aggressive, schedule = self.settings(latent_hw)
        out = {"raunet": self.apply_raunet, "window_attn": self.apply_window_attn, "arch": self.modules.arch,
               "steps": self.steps, "shift_seed": self.seed}
        if self.apply_raunet:
            out.update({"preset": preset, "T1_ratio": t1, "T2_ratio": t2, "aggressive": aggressive,
                        "rad_steps": list(schedule["rad"]), "pool_steps": list(schedule["pool"]),
                        "rad_conv": self.modules.names["rad_conv"], "pool_block": self.modules.names["pool_block"],
                        "unpool_block": self.modules.names["unpool_block"]})
        if self.apply_window_attn:
            out["window_transformers"] = self.modules.names["window_transformers"]
        return out


# ---------------------------------------------------------------------------------------------
# the method (--method hidiffusion)


class HiDiffusionMethod(GuidanceMethod):
    name = "hidiffusion"
    label = "HiDiffusion"
    summary = "HiDiffusion: RAU-Net and MSW-MSA (shifted-window self-attention)"

    @classmethod
    def add_args(cls, parser):
        g = parser.add_argument_group("HiDiffusion (--method hidiffusion)")
        g.add_argument("--hidiff_raunet", action=argparse.BooleanOptionalAction, default=True,
                       help="RAU-Net (resolution-aware down/upsampling in the first steps; the release's "
                            "apply_raunet, on by default)")
        g.add_argument("--hidiff_window_attn", action=argparse.BooleanOptionalAction, default=True,
                       help="MSW-MSA shifted-window self-attention in the top level (the release's "
                            "apply_window_attn, on by default)")
        g.add_argument("--hidiff_T1_ratio", type=unit_float, default=None, metavar="R",
                       help="T1 = int(steps * R) (default by latent size as the release: 0.4 below 4x the "
                            "training side, else 0.7)")
        g.add_argument("--hidiff_T2_ratio", type=unit_float, default=None, metavar="R",
                       help="T2 = int(steps * R) (default: 0 below 4x the training side, else 0.3)")
        g.add_argument("--hidiff_aggressive", choices=("auto", "on", "off"), default="auto",
                       help="SDXL's aggressive RAU-Net schedule (auto: below the 4096 preset, as the release)")

    @classmethod
    def settings(cls, opt, info, size):
        values = {"apply_raunet": opt.hidiff_raunet, "apply_window_attn": opt.hidiff_window_attn,
                  "t1_ratio": opt.hidiff_T1_ratio, "t2_ratio": opt.hidiff_T2_ratio,
                  "aggressive": {"auto": None, "on": True, "off": False}[opt.hidiff_aggressive]}
        return Settings(size=tuple(size), values=values)

    def make_guidance(self):
        try:
            return HiDiffusionGuidance(self.model.model.diffusion_model, self.info.steps, self.info.base_latent,
                                       seed=self.info.seed, **self.settings.values)
        except ValueError as err:
            raise UsageError(str(err)) from None

    def describe(self):
        h, w = self.settings.size
        return {"hidiffusion": self.guidance().describe((h // self.info.f, w // self.info.f))}
