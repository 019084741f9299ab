"""FouriScale (Huang et al., ECCV 2024, "FouriScale: A Frequency Perspective on Training-Free High-Resolution
Image Synthesis"), as the authors' release (LeonHLJ/FouriScale) runs it, on this repository's UNet.

Every listed 3x3 convolution of the inner levels runs with one integer dilation
d = max(⌈H/h_base⌉, ⌈W/w_base⌉) (image over base size), and its input is low-pass filtered first, so that the
dilated kernel sees what the original kernel saw at the training size (structure *and* scale):

* the input is zero-padded (bottom/right) to r times the layer's base size, r = max(⌈H/h⌉, ⌈W/w⌉), FFT'd,
  multiplied by a separable ramp mask, inverse FFT'd and cropped back;
* the mask along an axis of n bins passes frequencies up to (n//2)/s (s = d / stride, at least 1), then falls
  linearly to a stop-band value over ``n // 8`` bins ("strong"), or over ``(s-1)·n // (2s)`` bins, i.e. down to
  the Nyquist frequency ("weak");
* progressive: d_i = max((d−1)·(stop−i)/(stop−start) + 1, 1) from step ``start`` on; the convolution runs at
  dilation ⌈d_i⌉, the filter at d_i; from step ``stop`` on the UNet is the original;
* FouriScale guidance: the UNet batch is [uncond, cond, cond] with masks [strong, strong, weak]; every
  self-attention layer gives the third branch the queries and keys of the second (its attention map), and
  classifier-free guidance combines the unconditional and the third branch.

Per family (release): SD 1.x/2.x stop band 0 for both masks, one dilation for all branches; SDXL stop band
0.6, the weak branch's convolutions at dilation ⌈max(d_i/1.5, 1)⌉, the base size from SDXL's aspect-ratio
bucket table (the bucket needing the least padding with equal factors on both sides), and SDXL's size
conditioning set to that base size. Upsampling convolutions are dilated but never filtered.

Built from per-call processors (``ldm.unet_hooks.processors.installed``) and the DDIM sampler's ``guidance`` hook; the UNet
and the sampler are not modified. What differs from the release, and its bugs: docs/fouriscale.md.
"""
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ldm.errors import UsageError
from ldm.guidance import cat_cond as _cat_cond, classifier_free_guidance
from ldm.methods.base import GuidanceMethod, Settings
from ldm.unet_hooks.processors import installed, self_attention_layers
from ldm.unet_hooks.redilation import dilated_conv
from ldm.util import (PRESET_VALUE_RULES, Rule, choice_rule, float_range, nonneg_int, positive_float, positive_int,
                      unit_float)

FILTERS = ("release", "symmetric", "ideal")
LAYER_STYLES = ("sd", "sdxl")
AMP_GUIDANCE = 2.4  # the release's --amp_guidance factor (SDXL script), for steps before start_step

# SDXL's aspect-ratio buckets (height, width) in pixels at its 1024² training size, ratio h/w from 0.25 to 4.
SDXL_BUCKETS = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)
SDXL_BUCKET_SIDE = 1024


# ------------------------------------------------------------------------------------------------
# sizes and schedule


def dilation_factor(height, width, base_h, base_w):
    """The one integer dilation of all listed layers: max(⌈H/h_base⌉, ⌈W/w_base⌉) (any consistent unit)."""
    return max(math.ceil(height / base_h), math.ceil(width / base_w), 1)


def choose_base(height, width, base_side, buckets="square"):
    """(base height, base width, bucket found) in pixels for an image of height x width.

    ``"square"``: the model's training size. ``"sdxl"``: SDXL's bucket table scaled to ``base_side`` (1024 for
    SDXL): among the buckets whose factors ⌈H/h⌉ and ⌈W/w⌉ are equal, the one with the least padding
    (h·s − H) + (w·s − W), the first in table order on ties. No such bucket (extreme aspect ratios): the
    square base, and ``bucket found`` is False."""
    if buckets == "square":
        return float(base_side), float(base_side), False
    if buckets != "sdxl":
        raise ValueError(f"buckets must be 'square' or 'sdxl', got {buckets!r}")
    k = base_side / SDXL_BUCKET_SIDE
    best, best_pad = None, None
    for bh, bw in SDXL_BUCKETS:
        bh, bw = bh * k, bw * k
        sh, sw = math.ceil(height / bh), math.ceil(width / bw)
        if sh != sw:
            continue
        pad = (bh * sh - height) + (bw * sw - width)
        if best is None or pad < best_pad:
            best, best_pad = (bh, bw), pad
    if best is None:
        return float(base_side), float(base_side), False
    return best[0], best[1], True


def step_dilation(dilation, step, start_step, stop_step, progressive=True):
    """The (float) dilation at sampling step ``step`` (0-based), or None from ``stop_step`` on (original UNet)."""
    if step >= stop_step:
        return None
    if progressive and step >= start_step:
        return max((dilation - 1.0) * (stop_step - step) / (stop_step - start_step) + 1.0, 1.0)
    return float(dilation)


# ------------------------------------------------------------------------------------------------
# the low-pass filter


def _signed_bins(n):
    """Signed frequency of each bin of an n-point FFT, in FFT order (0, 1, …, −1); −n/2 for the Nyquist bin."""
    j = torch.arange(n)
    return torch.where(j < n - n // 2, j, j - n)


def ramp_mask_1d(n, scale, value=0.0, weak=False, kind="release"):
    """The mask along one axis of n bins (float64, FFT bin order), for a dilation/stride ratio ``scale`` ≥ 1.

    With half = n//2 and i = |frequency| in bins, the profile is clamp((1 − v)/R · (half/s + 1 − i) + 1, v, 1):
    1 up to half/s + 1, then a ramp of R bins down to the stop-band value v; R = max(n//8, 1) (strong) or
    ⌊(s−1)·n / (2s)⌋ (weak; R = 0: all-pass). ``kind``:
    * ``"release"``: negative frequency −k gets the profile at k−1 (the release mirrors the half-profile about
      the centre of the shifted spectrum, one bin off from DC);
    * ``"symmetric"``: −k gets the profile at k (a zero-phase filter);
    * ``"ideal"``: the strong mask is a brick wall, 1 for |k| ≤ half/s and v beyond (the weak mask stays the
      symmetric ramp).
    """
    scale = max(float(scale), 1.0)
    k = _signed_bins(n)
    half = n // 2
    if kind not in FILTERS:
        raise ValueError(f"filter must be one of {FILTERS}, got {kind!r}")
    if kind == "ideal" and not weak:
        return torch.where(k.abs().double() <= half / scale, 1.0, float(value)).double()
    width = max(n // 8, 1) if not weak else ((scale - 1) * n) // (scale * 2)
    i = torch.arange(half + 1, dtype=torch.float64)
    if width == 0:
        profile = torch.ones_like(i)
    else:
        profile = ((1 - value) / width * (half / scale + 1 - i) + 1).clamp(min=value, max=1.0)
    index = torch.where(k >= 0, k, -k - 1) if kind == "release" else k.abs()
    return profile[index]


def real_mask(mask_h, mask_w):
    """The 2-D mask outer(mask_h, mask_w) as it acts on a real input when only the real part of the inverse FFT
    is kept: (M(k) + M(−k)) / 2, in ``rfft2`` layout (n_h, n_w//2 + 1). For a mask with M(−k) = M(k) this is M."""
    neg_h = (-torch.arange(len(mask_h))) % len(mask_h)
    neg_w = (-torch.arange(len(mask_w))) % len(mask_w)
    m = torch.outer(mask_h, mask_w)
    m = 0.5 * (m + torch.outer(mask_h[neg_h], mask_w[neg_w]))
    return m[:, :len(mask_w) // 2 + 1]


def padded_size(height, width, base_h, base_w):
    """The release's padding target: r·(h, w), r = max(⌈H/h⌉, ⌈W/w⌉) (int(), as it truncates float bases)."""
    r = max(math.ceil(height / base_h), math.ceil(width / base_w))
    return max(int(base_h * r), height), max(int(base_w * r), width)


def lowpass(x, base_hw, scales, masks, value=0.0, kind="release"):
    """The FouriScale low-pass filter of a batch made of ``len(masks)`` equal branches.

    ``x``: (branches·b, C, H, W); ``base_hw``: this layer's base size (h, w) in its own pixels; ``scales``:
    (s_h, s_w) = dilation / stride per axis; ``masks``: per branch "strong" or "weak". Zero-pad bottom/right to
    :func:`padded_size`, filter in float32 (float64 inputs in float64), crop, return in x's dtype. The FFT is
    real-to-complex (rfft2) with the mask of :func:`real_mask`: the same result as the release's complex FFT,
    shifted mask and ``.real``.
    """
    h, w = x.shape[-2:]
    ph, pw = padded_size(h, w, *base_hw)
    m = torch.stack([real_mask(ramp_mask_1d(ph, scales[0], value, kind_ == "weak", kind),
                               ramp_mask_1d(pw, scales[1], value, kind_ == "weak", kind)) for kind_ in masks])
    if bool((m == 1).all()):
        return x  # all-pass: the identity, not an FFT round trip
    dtype = x.dtype
    xf = x if dtype == torch.float64 else x.float()
    xf = torch.nn.functional.pad(xf, (0, pw - w, 0, ph - h))
    spec = torch.fft.rfft2(xf, dim=(-2, -1))
    nb = len(masks)
    spec = spec.reshape(nb, -1, *spec.shape[1:]) * m.to(spec.device, xf.dtype)[:, None, None]
    out = torch.fft.irfft2(spec.reshape(-1, *spec.shape[2:]), s=(ph, pw), dim=(-2, -1))
    return out[..., :h, :w].to(dtype)


# ------------------------------------------------------------------------------------------------
# processors


class FouriConv:
    """Processor for an ``nn.Conv2d`` inside a FouriScale batch of ``branches`` ("strong"/"weak", one chunk each):
    low-pass filter the input per branch (unless ``filter_input`` is False: upsampling convs), then convolve at
    dilation ⌈d⌉ (strong branches) or ⌈max(d / weak_dilation_div, 1)⌉ (weak branch)."""

    def __init__(self, dilation, base_hw, branches, filter_input=True, stopband=0.0, kind="release",
                 weak_dilation_div=1.0):
        if dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {dilation}")
        self.dilation = float(dilation)
        self.base_hw = tuple(float(v) for v in base_hw)
        self.branches = tuple(branches)
        self.filter_input = bool(filter_input)
        self.stopband = float(stopband)
        self.kind = kind
        self.weak_dilation_div = float(weak_dilation_div)

    def __repr__(self):
        return (f"FouriConv(d={self.dilation:g}, base={self.base_hw}, branches={self.branches}, "
                f"filter={self.filter_input})")

    def conv_dilation(self, branch):
        d = self.dilation / self.weak_dilation_div if branch == "weak" else self.dilation
        return int(math.ceil(max(d, 1.0)))

    def __call__(self, conv, x):
        if self.filter_input:
            scales = (max(self.dilation / conv.stride[0], 1.0), max(self.dilation / conv.stride[1], 1.0))
            x = lowpass(x, self.base_hw, scales, self.branches, self.stopband, self.kind)
        k = conv.kernel_size[0]
        dilations = [self.conv_dilation(b) for b in self.branches]
        if len(set(dilations)) == 1:
            return dilated_conv(conv, x, conv.weight, dilations[0], k)
        return torch.cat([dilated_conv(conv, chunk, conv.weight, d, k)
                          for chunk, d in zip(x.chunk(len(self.branches)), dilations)])


class SharedQueryKey:
    """Processor for self-attention ``CrossAttention`` layers inside a FouriScale batch of ``n_branches`` equal
    chunks: the last chunk attends with the queries and keys of the one before it (its attention map), and its
    own values. Cross-attention (a context) is unchanged."""

    def __init__(self, n_branches):
        if n_branches < 2:
            raise ValueError("Q/K sharing needs at least two branches")
        self.n_branches = int(n_branches)

    def __call__(self, attn, x, context=None, mask=None):
        if context is not None:
            return type(attn).forward(attn, x, context, mask)
        b, n, _ = x.shape
        m = b // self.n_branches
        # the last branch's own Q and K are never used: project the others, repeat the second-to-last
        q, k = attn.to_q(x[:b - m]), attn.to_k(x[:b - m])
        q, k = torch.cat([q, q[-m:]]), torch.cat([k, k[-m:]])
        v = attn.to_v(x)
        q, k, v = (t.reshape(b, n, attn.heads, attn.dim_head).transpose(1, 2) for t in (q, k, v))
        if mask is not None:
            mask = mask.reshape(b, 1, 1, -1).bool()
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attn.to_out(out.transpose(1, 2).reshape(b, n, attn.heads * attn.dim_head))


# ------------------------------------------------------------------------------------------------
# layers


def default_layers(unet, style):
    """Diffusers names of the convs the release lists, derived from the UNet's structure (L levels):
    ``"sd"``: down levels ≥ L−2 (with their downsampler), the middle block, up_blocks 0…L−2 (with upsamplers)
    (SD 1.x/2.x: 34 convs); ``"sdxl"``: the ResBlocks of the deepest down level, the middle block, up_blocks.0
    with its upsampler, the ResBlocks of up_blocks.1 (SDXL: 21 convs)."""
    from ldm.unet_hooks.layers import conv_table
    if style not in LAYER_STYLES:
        raise ValueError(f"layer style must be one of {LAYER_STYLES}, got {style!r}")
    levels = len(unet.channel_mult)
    names = []
    for _, diff, _ in conv_table(unet):
        part = diff.split(".")
        if part[0] == "mid_block":
            keep = True
        elif part[0] == "down_blocks":
            lvl = int(part[1])
            keep = lvl >= levels - 2 if style == "sd" else (lvl == levels - 1 and part[2] == "resnets")
        else:
            up = int(part[1])
            keep = up <= levels - 2 if style == "sd" else (up == 0 or (up == 1 and part[2] == "resnets"))
        if keep:
            names.append(diff)
    return names


def _level(diffusers_name, levels):
    """Resolution level (0 = full latent size) of the conv's input."""
    part = diffusers_name.split(".")
    if part[0] == "mid_block":
        return levels - 1
    if part[0] == "down_blocks":
        return int(part[1])
    if part[0] == "up_blocks":
        up = int(part[1])
        return levels - 1 - up - (1 if part[2] == "upsamplers" else 0)  # upsampler convs run after the 2x
    return 0


def resolve_layers(unet, layers):
    """[(own name, diffusers name or own name, level, conv)] for a style ("sd"/"sdxl") or a settings file of
    names (own or diffusers, one per line, ``#`` comments)."""
    from ldm.unet_hooks.layers import LayerNames
    from ldm.unet_hooks.layers import read_settings_file
    names = LayerNames(unet)
    levels = len(unet.channel_mult)
    own_to_diff = {own: diff for own, diff, _ in names.rows}
    if layers in LAYER_STYLES:
        own_names = [names.resolve(n) for n in default_layers(unet, layers)]
    else:
        own_names = sorted(read_settings_file(layers, names, with_factor=False),
                           key=list(names.all_3x3).index)
    out = []
    for own in own_names:
        diff = own_to_diff.get(own, own)
        out.append((own, diff, _level(diff, levels), names.module(own)))
    return out


# ------------------------------------------------------------------------------------------------
# settings and guidance


@dataclass
class FouriScaleSettings:
    """Everything a run needs; ``describe()`` is what lands in the PNG metadata.

    ``base_hw``: base size in latent pixels (per layer: divided by 2**level); ``dilation``: d;
    ``full_batch``: also run the three-branch batch at steps where the branches are the same computation
    (d = 1, or from ``stop_step`` on) instead of plain guidance, as the release does (slower, same result up to
    rounding)."""
    dilation: int
    base_hw: tuple
    start_step: int
    stop_step: int
    progressive: bool = True
    filter: str = "release"
    stopband: float = 0.0
    weak_dilation_div: float = 1.0
    amp_guidance: float = 1.0
    layers: str = "sd"
    full_batch: bool = False
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {self.dilation}")
        if not 0 <= self.start_step <= self.stop_step:
            raise ValueError(f"need 0 <= start_step <= stop_step, got {self.start_step} and {self.stop_step}")
        if self.filter not in FILTERS:
            raise ValueError(f"filter must be one of {FILTERS}, got {self.filter!r}")
        if not 0.0 <= self.stopband <= 1.0:
            raise ValueError(f"stopband must be in [0, 1], got {self.stopband}")
        if self.weak_dilation_div < 1.0:
            raise ValueError(f"weak_dilation_div must be >= 1, got {self.weak_dilation_div}")
        if self.amp_guidance <= 0:
            raise ValueError(f"amp_guidance must be positive, got {self.amp_guidance}")

    def dilation_at(self, step):
        return step_dilation(self.dilation, step, self.start_step, self.stop_step, self.progressive)

    def describe(self):
        out = {k: v for k, v in asdict(self).items() if k != "info"}
        out["base_hw"] = [float(v) for v in self.base_hw]
        out.update(self.info)
        return out


class FouriScaleGuidance:
    """``guidance`` for the DDIM sampler (see the module doc)."""

    def __init__(self, unet, settings):
        self.settings = settings
        self.layers = resolve_layers(unet, settings.layers)
        self.attention = self_attention_layers(unet)

    def describe(self):
        return {**self.settings.describe(), "n_layers": len(self.layers)}

    def processors(self, d, branches):
        s = self.settings
        procs = []
        for own, diff, level, conv in self.layers:
            base = (s.base_hw[0] / 2 ** level, s.base_hw[1] / 2 ** level)
            procs.append((conv, FouriConv(d, base, branches, filter_input="upsamplers" not in diff,
                                          stopband=s.stopband, kind=s.filter,
                                          weak_dilation_div=s.weak_dilation_div)))
        return procs

    def __call__(self, model, x, t, cond, uncond, scale, step):
        s = self.settings
        d = s.dilation_at(step)
        if step < s.start_step:
            scale = scale * s.amp_guidance
        with_uncond = uncond is not None and scale != 1.0
        if not s.full_batch and (d is None or s.dilation == 1):
            # the strong and weak branches are the same computation: Q/K sharing is the identity, CFG is plain
            return classifier_free_guidance(model, x, t, cond, uncond, scale)
        branches = ("strong", "strong", "weak") if with_uncond else ("strong", "weak")
        conds = _cat_cond(_cat_cond(uncond, cond), cond) if with_uncond else _cat_cond(cond, cond)
        nb = len(branches)
        procs = self.processors(d, branches) if d is not None else []
        procs += [(layer, SharedQueryKey(nb)) for layer in self.attention]
        with installed(procs):
            out = model.apply_model(torch.cat([x] * nb), torch.cat([t] * nb), conds)
        out = out.chunk(nb)
        if not with_uncond:
            return out[-1]
        return out[0] + scale * (out[-1] - out[0])


# ------------------------------------------------------------------------------------------------
# presets and command line (scripts/txt2img.py --method fouriscale)

FOLDER = "configs/fouriscale/"
BUCKETS = ("auto", "sdxl", "square")
SIZE_CONDS = ("auto", "base", "image")
# the schema of a FouriScale preset (configs/fouriscale/*.yaml): every key, its type and range
SCHEMA = {
    **{k: PRESET_VALUE_RULES[k] for k in ("base_model", "height", "width", "steps", "start_step", "stop_step",
                                          "stopband", "weak_dilation_div", "notes")},
    "progressive": Rule(lambda v: isinstance(v, bool) or v in ("on", "off"), "true or false (on or off)"),
    "layers": Rule(lambda v: isinstance(v, str) and bool(v), f"one of {', '.join(LAYER_STYLES + ('auto',))} or a "
                                                             "file of layer names (relative to the preset)"),
    "filter": choice_rule(*FILTERS),
    "amp_guidance": Rule(lambda v: v is True or positive_float.ok(v), f"true ({AMP_GUIDANCE}) or a positive number"),
    "buckets": choice_rule(*BUCKETS),
    "size_cond": choice_rule(*SIZE_CONDS),
}
PRESET_KEYS = SCHEMA  # (the name other modules use)


def load_preset(path):
    """A FouriScale preset checked against :data:`SCHEMA` (start_step <= stop_step, a layer file that exists and
    parses); ValueError naming the file and key otherwise."""
    from ldm.unet_hooks.layers import SettingsError, parse_settings_file
    from ldm.util import load_yaml_preset
    cfg = load_yaml_preset(path, SCHEMA, "FouriScale", FOLDER)
    where = cfg["_path"]
    if cfg.get("start_step") is not None and cfg.get("stop_step") is not None and cfg["start_step"] > cfg["stop_step"]:
        raise ValueError(f"{where}: start_step {cfg['start_step']} is after stop_step {cfg['stop_step']}; the "
                         "dilation decreases from the start step and ends at the stop step")
    layers = cfg.get("layers")
    if layers is not None and layers not in LAYER_STYLES + ("auto",):
        cfg["layers"] = str(Path(cfg["_path"]).parent / layers)
        try:
            parse_settings_file(cfg["layers"], with_factor=False)
        except SettingsError as err:
            raise ValueError(f"{where}: layers: {err}") from None
    return cfg


def add_args(parser):
    g = parser.add_argument_group("FouriScale (--method fouriscale; docs/fouriscale.md)")
    g.add_argument("--fouri_config", type=str, default=None,
                   help="a preset YAML, e.g. configs/fouriscale/sd2.1_2048x2048.yaml (its height/width become the "
                        "defaults for --H/--W)")
    g.add_argument("--fouri_start_step", type=nonneg_int, default=None,
                   help="first step of the progressive decrease of the dilation (default: the preset's, else "
                        "20%% of --steps for SD up to 2.5x the base side, 40%% otherwise: 10 or 20 of 50)")
    g.add_argument("--fouri_stop_step", type=nonneg_int, default=None,
                   help="from this step on the UNet is the original (default: the preset's, else 60%% / 70%% of "
                        "--steps: 30 or 35 of 50)")
    g.add_argument("--fouri_progressive", choices=("on", "off"), default=None,
                   help="lower the dilation linearly from start to stop step (default: on, as released)")
    g.add_argument("--fouri_dilation", type=positive_int, default=None,
                   help="the integer dilation (default: max(ceil(H/h_base), ceil(W/w_base)))")
    g.add_argument("--fouri_filter", choices=FILTERS, default=None,
                   help="low-pass mask: the release's ramp (release), the same ramp exactly symmetric about DC "
                        "(symmetric), or a brick wall at the subsampled Nyquist frequency (ideal) (default: release)")
    g.add_argument("--fouri_stopband", type=unit_float, default=None,
                   help="mask value above the cut-off (default: 0 for SD, 0.6 for SDXL, as released)")
    g.add_argument("--fouri_weak_dilation_div", type=float_range(1), default=None,
                   help="the weak (guidance) branch convolves at dilation ceil(d / DIV) (default: 1 for SD, 1.5 for "
                        "SDXL, as released)")
    g.add_argument("--fouri_amp_guidance", type=positive_float, nargs="?", const=AMP_GUIDANCE, default=None, metavar="FACTOR",
                   help=f"multiply the guidance scale by FACTOR before the start step (the release's SDXL "
                        f"--amp_guidance; {AMP_GUIDANCE} when given without a value; default: off)")
    g.add_argument("--fouri_buckets", choices=("auto", "sdxl", "square"), default=None,
                   help="base size: SDXL's aspect-ratio bucket with the least padding, or the square training size "
                        "(default auto: sdxl for SDXL models, square otherwise)")
    g.add_argument("--fouri_size_cond", choices=("auto", "base", "image"), default=None,
                   help="SDXL: condition on original = target size = the base size (base, as released) or leave "
                        "SDXL's size conditioning to --original_size/--target_size (image) (default auto: base)")
    g.add_argument("--fouri_layers", type=str, default=None,
                   help="which convs: sd, sdxl, or a file of layer names (default: the model family's list)")
    g.add_argument("--fouri_full_batch", action="store_true",
                   help="run the three-branch batch at every step, as the release, also where its branches are "
                        "identical (d = 1, steps from the stop step on); same result up to rounding, slower")
    return g


def _value(opt, preset, key, default):
    v = getattr(opt, f"fouri_{key}", None)
    if v is not None:
        return v
    return preset.get(key, default) if preset else default


def _buckets(opt, preset, sdxl):
    b = _value(opt, preset, "buckets", "auto")
    return ("sdxl" if sdxl else "square") if b == "auto" else b


def settings_from_args(opt, sdxl, base_latent, image_hw, f, preset=None, steps=None):
    """FouriScaleSettings from the command line, the preset and the release's defaults (``sdxl``: the model is SDXL;
    before loading, from the config); ``steps``: the step count the start/stop steps are for (default --steps; a
    preset's own count is scaled to it). ValueError for a setting out of range."""
    if preset is None:
        preset = load_preset(opt.fouri_config) if opt.fouri_config else {}
    height, width = image_hw
    base_px = base_latent * f
    buckets = _buckets(opt, preset, sdxl)
    bh, bw, found = choose_base(height, width, base_px, buckets)
    dilation = opt.fouri_dilation or dilation_factor(height, width, bh, bw)
    steps = int(steps or opt.steps)
    start, stop = opt.fouri_start_step, opt.fouri_stop_step
    if start is None or stop is None:
        if preset.get("start_step") is not None and preset.get("stop_step") is not None:
            ref = int(preset.get("steps", steps))
            p_start, p_stop = int(preset["start_step"]), int(preset["stop_step"])
            if ref != steps:
                from ldm.errors import InputWarning
                p_start, p_stop = round(p_start * steps / ref), round(p_stop * steps / ref)
                warnings.warn(f"{opt.fouri_config}: start/stop steps are for {ref} steps; with --steps {steps} "
                              f"they are scaled to {p_start}/{p_stop}", InputWarning, stacklevel=2)
        else:  # the release's rule: 10/30 of 50 for SD 1024² and 1280², 20/35 otherwise
            small = not sdxl and max(height, width) <= 2.5 * base_px
            p_start, p_stop = (round(0.2 * steps), round(0.6 * steps)) if small else \
                (round(0.4 * steps), round(0.7 * steps))
        start = p_start if start is None else start
        stop = p_stop if stop is None else stop
    layers = _value(opt, preset, "layers", "auto")
    if layers == "auto":
        layers = "sdxl" if sdxl else "sd"
    amp = opt.fouri_amp_guidance if opt.fouri_amp_guidance is not None else preset.get("amp_guidance") or 1.0
    if amp is True:
        amp = AMP_GUIDANCE
    info = {"preset": opt.fouri_config, "image_hw": [height, width], "base_px": [bh, bw],
            "buckets": buckets if found or buckets == "square" else "square (no SDXL bucket fits)"}
    if sdxl:
        size_cond = _value(opt, preset, "size_cond", "auto")
        info["size_cond"] = "image" if size_cond == "image" else "base"
    return FouriScaleSettings(
        dilation=int(dilation), base_hw=(bh / f, bw / f), start_step=int(start), stop_step=int(stop),
        progressive=_value(opt, preset, "progressive", "on") in ("on", True),
        filter=_value(opt, preset, "filter", "release"),
        stopband=float(_value(opt, preset, "stopband", 0.6 if sdxl else 0.0)),
        weak_dilation_div=float(_value(opt, preset, "weak_dilation_div", 1.5 if sdxl else 1.0)),
        amp_guidance=float(amp), layers=layers, full_batch=bool(opt.fouri_full_batch), info=info)


# ---------------------------------------------------------------------------------------------
# the method (--method fouriscale)


class FouriScaleMethod(GuidanceMethod):
    name = "fouriscale"
    label = "FouriScale"
    summary = "FouriScale: dilated convolutions on low-pass filtered inputs (--fouri_config)"
    preset_flag = "--fouri_config"
    preset_dir = "fouriscale"

    @classmethod
    def add_args(cls, parser):
        add_args(parser)

    @classmethod
    def read_preset(cls, path):
        return load_preset(path)

    @classmethod
    def settings(cls, opt, info, size):
        """SDXL (size_cond base, as the release): original and target size = the base (bucket) size."""
        preset = cls.preset(opt, info) or {}
        if opt.fouri_layers is not None and opt.fouri_layers not in LAYER_STYLES + ("auto",):
            from ldm.unet_hooks.layers import SettingsError, parse_settings_file
            try:
                parse_settings_file(opt.fouri_layers, with_factor=False)
            except SettingsError as err:
                raise UsageError(f"--fouri_layers: {err}") from None
        reference = preset.get("steps") if preset.get("start_step") is not None else None
        try:  # every value checked now, before the model loads
            fs = settings_from_args(opt, info.sdxl, info.base_latent, tuple(size), info.f, preset, steps=reference)
        except ValueError as err:
            raise UsageError(f"FouriScale: {err}") from None
        conditioning = {}
        size_cond = _value(opt, preset, "size_cond", "auto")
        if info.sdxl and size_cond in ("auto", "base") and opt.original_size is None and opt.target_size is None:
            bh, bw, _ = choose_base(size[0], size[1], info.base_px, _buckets(opt, preset, True))
            conditioning = {"original_size": [int(round(bh)), int(round(bw))],
                            "target_size": [int(round(bh)), int(round(bw))]}
        return Settings(size=tuple(size), size_conditioning=conditioning, values={"opt": opt, "fouriscale": fs},
                        reference_steps=reference)

    @classmethod
    def memory_estimate(cls, settings, info, batch_size, scale=2.0, tiling=None, bytes_per_value=4):
        """The largest low-pass filter: at every filtered level the input is zero-padded to r times the level's
        base size (r = the larger of the two side ratios, so an extreme aspect ratio pads to a large square, as
        the release does) and filtered in float32. One filter call holds about 5 tensors of the padded size
        (the padded input, the rfft2 spectrum and the FFT's working copies, the masked spectrum, the output:
        measured 5.1 on CPU), each branches x batch x channels x padded area x 4 bytes; the widest filtered
        input of a level is an up-path ResBlock's, its channels plus the skip connection's."""
        best = super().memory_estimate(settings, info, batch_size, scale, tiling, bytes_per_value)
        fs = settings.values["fouriscale"]
        if fs.dilation <= 1 or not info.unet_channels:
            return best
        chans = info.unet_channels
        levels = len(chans)
        h, w = settings.size[0] // info.f, settings.size[1] // info.f
        branches = 3 if scale != 1.0 else 2
        for level in range(max(levels - 2, 0), levels):  # the inner levels (both layer styles of the release)
            lh, lw = h, w
            for _ in range(level):
                lh, lw = (lh + 1) // 2, (lw + 1) // 2
            ph, pw = padded_size(lh, lw, fs.base_hw[0] / 2 ** level, fs.base_hw[1] / 2 ** level)
            c = chans[level] + chans[min(level + 1, levels - 1)]
            need = 5 * branches * batch_size * c * ph * pw * 4
            if need > best[0]:
                best = (need, f"FouriScale's low-pass filter at {settings.size[0]}x{settings.size[1]} (it zero-pads "
                              f"the {lh}x{lw} feature maps of UNet level {level} to {ph}x{pw} and filters them in "
                              f"float32: up to {c} channels x {branches} branches x {batch_size} image(s), about 5 "
                              "copies)")
        return best

    def make_guidance(self):
        return FouriScaleGuidance(self.model.model.diffusion_model, self.settings.values["fouriscale"])

    def describe(self):
        return {"fouriscale": self.guidance().describe()}
