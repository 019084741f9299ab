"""FreeScale's tailored self-cascade (Qiu et al., 2024), on this repository's DDIM sampler.

Stage 1 samples at the model's base size. Each later stage

1. decodes the previous stage's latent, resizes the image bicubically in pixel space to the stage size and
   encodes it again (tiled, with synchronized GroupNorm, when tiling options are given) — or, with
   ``resize="latent"``, resizes the latent itself (the paper's choice for video);
2. draws one noise tensor ε for the stage and re-noises: the stage starts at step ``restart_step`` (default
   30 % of the steps, as released) from z_r = q(z₀, t_r, ε);
3. denoises from there; before every step i the **skip residual** pulls the latent toward the re-noised
   stage input, z ← z·(1 − c₁) + q(z₀, t_i, ε)·c₁ with c₁ = (½(1 + cos(π(T − t_i)/T)))^cosine_scale
   (per pixel with a detail mask: cosine_scale inside the mask, cosine_scale_bg outside);
4. runs every UNet call with two kinds of processors: **scale fusion** in each self-attention layer
   (``ldm/methods/freescale/scale_fusion.py``) and the **restrained dilation** of the down and mid blocks
   (an ordinary re-dilation schedule, ``restrained_dilation``) for steps i < dilate_tau.

Differences from the authors' release (``pipeline_freescale.py``), all deliberate:
* the sampler is DDIM by default (the release uses SDXL's default Euler scheduler: ``--sampler euler`` or the preset
  key ``sampler: euler`` runs that), so the stage restarts at the sampler's step ``restart_step`` with its own
  noising; the skip residual and c₁ are the same formulas;
* the dilation factor is max(H, W) // base side (the release divides the *width* by 1024, which gives 1 for
  a tall 2048×1024 stage); ``dilation_from="width"`` restores theirs;
* the jitter of the attention windows comes from a generator seeded from the run's seed (the release uses
  Python's unseeded global ``random``), so a seed gives the same image.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from ldm.guidance import classifier_free_guidance
from ldm.methods.cascade import RESIZES, Cascade, CascadeResult, cosine_factor, encode_image  # noqa: F401
from ldm.methods.freescale import ablations, release_tiling
from ldm.methods.freescale.scale_fusion import BLURS, WINDOWS, ScaleFusion
from ldm.unet_hooks.processors import installed, self_attention_layers
from ldm.unet_hooks.layers import LayerNames
from ldm.unet_hooks.schedule import LayerSchedule
from ldm.unet_hooks.redilation import ReDilation


# ------------------------------------------------------------------------------------------------
# restrained dilation: one more re-dilation schedule


def restrained_layer_names(unet):
    """Diffusers-style names of the convolutions FreeScale dilates: the downsampler into the deepest level,
    the deepest level's down ResBlocks and the middle block. For SDXL (3 levels) this is the release's list
    (down_blocks.1.downsamplers.0.conv, down_blocks.2.resnets.*, mid_block.resnets.*); for the 4-level SD
    UNets and the demo model the same structural positions (the release has no SD 1.5/2.1 list)."""
    levels = len(unet.channel_mult)
    deepest = levels - 1
    names = [f"down_blocks.{deepest - 1}.downsamplers.0.conv"] if deepest > 0 else []
    for j in range(unet.num_res_blocks[deepest]):
        names += [f"down_blocks.{deepest}.resnets.{j}.conv1", f"down_blocks.{deepest}.resnets.{j}.conv2"]
    names += [f"mid_block.resnets.{j}.conv{k}" for j in (0, 1) for k in (1, 2)]
    return names


def restrained_dilation(unet, factor, tau, layer_names=None):
    """The LayerSchedule of FreeScale's restrained dilated convolution (own module names -> factor)."""
    names = LayerNames(unet)
    own = []
    for name in layer_names or restrained_layer_names(unet):
        resolved = names.resolve(name)
        if resolved is None:
            raise ValueError(f"restrained dilation: no convolution named {name!r} in this UNet")
        own.append(resolved)
    return LayerSchedule({n: float(factor) for n in own}, int(tau), progressive=False), names


# ------------------------------------------------------------------------------------------------
# one stage's guidance: processors installed around plain classifier-free guidance


class FreeScaleGuidance:
    """``guidance`` for the DDIM sampler during one cascade stage."""

    def __init__(self, dilation, names, attention_layers, fusion):
        self.dilation = dilation      # LayerSchedule or None
        self.names = names            # LayerNames for the schedule
        self.attention_layers = attention_layers
        self.fusion = fusion          # ScaleFusion or None

    def processors(self, step):
        pairs = []
        if self.dilation is not None:
            pairs += [(self.names.module(n), ReDilation(f)) for n, f in self.dilation.at(step).items()]
        if self.fusion is not None:
            pairs += [(layer, self.fusion) for layer in self.attention_layers]
        return pairs

    def __call__(self, model, x, t, cond, uncond, scale, step):
        with installed(self.processors(step)):
            return classifier_free_guidance(model, x, t, cond, uncond, scale)


# ------------------------------------------------------------------------------------------------
# the cascade


def default_stages(height, width, base):
    """Stage sizes doubling the side from the base size up to (height, width), the last one exact.

    The first stage has the target's aspect ratio with its longer side at about the base side, as the
    release's app does (1024x2048 from 512x1024); e.g. base 512, 2048x2048: 512, 1024, 2048."""
    n = max(0, math.ceil(math.log2(max(height, width) / base - 1e-9)))
    stages = []
    for k in range(n, -1, -1):
        h, w = height / 2 ** k, width / 2 ** k
        stages.append((max(8, int(round(h / 8)) * 8), max(8, int(round(w / 8)) * 8)))
    return stages


@dataclass
class FreeScaleSettings:
    stages: Sequence[Tuple[int, int]]     # pixel sizes, first = the base stage
    base: int = 1024                      # the model's training side
    restart_step: Optional[int] = None    # default: int(0.3 * steps)
    cosine_scale: float = 2.0
    cosine_scale_bg: Optional[float] = None  # with a mask: c1 exponent outside the mask
    dilate_tau: int = 35
    dilation_from: str = "long_side"      # or "width" (the release)
    fast_mode: bool = False
    fusion: bool = True
    blur: str = "release"
    window: str = "release"
    resize: str = "pixel"
    save_stages: bool = False
    dilate_up_blocks: bool = False        # Table 2's "Dilated Up-Blocks" (ldm/methods/freescale/ablations.py)
    vae_tiling: str = "ours"              # "release": the release's blended VAE tiles (release_tiling.py)

    def __post_init__(self):
        self.stages = [tuple(int(v) for v in s) for s in self.stages]
        if not self.stages:
            raise ValueError("FreeScale needs at least one stage size")
        for s in self.stages:
            if s[0] <= 0 or s[1] <= 0:
                raise ValueError(f"stage size {s[0]}x{s[1]} must be positive")
        if self.resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {self.resize!r}")
        if self.blur not in BLURS or self.window not in WINDOWS:
            raise ValueError(f"blur must be one of {BLURS} and window one of {WINDOWS}")
        if self.dilation_from not in ("long_side", "width"):
            raise ValueError(f"dilation_from must be 'long_side' or 'width', got {self.dilation_from!r}")
        if self.vae_tiling not in release_tiling.MODES:
            raise ValueError(f"vae_tiling must be one of {release_tiling.MODES}, got {self.vae_tiling!r}")

    def scale_of(self, size):
        """Integer (s_h, s_w) of a stage over the base size (at least 1)."""
        return max(size[0] // self.base, 1), max(size[1] // self.base, 1)

    def dilation_of(self, size):
        side = max(size) if self.dilation_from == "long_side" else size[1]
        return max(side // self.base, 1)

    def describe(self):
        return {k: (list(map(list, v)) if k == "stages" else v) for k, v in self.__dict__.items()}


class FreeScale(Cascade):
    """FreeScale's cascade: each later stage with restrained dilation and scale fusion (``stage_guidance``).
    ``vae_tiling="release"``: every encode and decode of the run in the release's blended tiles (``vae_scope``)."""

    def __init__(self, model, settings: FreeScaleSettings, f=8, tiling=None, stage_callback=None):
        super().__init__(model, settings, f=f, tiling=tiling, stage_callback=stage_callback)
        self.attention_layers = self_attention_layers(self.unet)

    @contextmanager
    def vae_scope(self):
        """The release's blended VAE tiling on the model's autoencoder for the duration of the run (with
        ``vae_tiling="release"``; nothing otherwise), the autoencoder's own methods again afterwards."""
        installed = self.settings.vae_tiling == "release" and release_tiling.install(self.model, self.settings.base,
                                                                                        self.f)
        try:
            yield
        finally:
            if installed:
                release_tiling.remove(self.model)

    def stage_guidance(self, size, steps, randint):
        st = self.settings
        factor = st.dilation_of(size)
        layers = restrained_layer_names(self.unet) + (ablations.up_block_layer_names(self.unet)
                                                      if st.dilate_up_blocks else [])
        dilation, names = (restrained_dilation(self.unet, factor, min(st.dilate_tau, steps), layers)
                           if factor > 1 else (None, None))
        fusion = None
        if st.fusion and self.attention_layers and max(st.scale_of(size)) > 1:
            fusion = ScaleFusion((size[0] // self.f, size[1] // self.f), st.scale_of(size), st.fast_mode,
                                 randint, st.blur, st.window)
        return FreeScaleGuidance(dilation, names, self.attention_layers, fusion)
