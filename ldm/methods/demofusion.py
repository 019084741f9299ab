"""DemoFusion (Du et al., CVPR 2024): progressive upscaling with skip residuals, MultiDiffusion local paths and
dilated-sampling global paths.

Phase 1 samples at the base size (the target's aspect ratio, long side = base). Phase k (k = 2 … K,
K = max(H, W) // base) upsamples the previous latent bicubically to k times the base, re-noises it to the first
step with one noise tensor, and denoises with

* the skip residual z ← z·(1 − c₁) + q(z₀, t_i, ε)·c₁, c₁ = cos_factor^cosine_scale_1 (3), as in the
  shared cascade machinery (``ldm/methods/cascade.py``, with latent resizing and restart step 0);
* local paths: base-size windows (stride half a window, jitter up to (window − stride)/4 on a zero-padded latent,
  each with its SDXL crop conditioning), averaged;
* global paths: the k×k dilated sub-lattices z[a::k, b::k] of a Gaussian-blurred copy of the latent (kernel 2k − 1,
  σ = sigma·c₃, c₃ = 0.99·cos_factor^cosine_scale_3 + 0.01, re-standardised to the latent's mean and std) as the
  UNet's input, their predictions applied to the unblurred latent;
* fused as (1 − c₂)·local + c₂·global, c₂ = cos_factor^cosine_scale_2 (1);

and at the end of the phase re-standardises the latent to phase 1's mean and std (the reference's anchor).

The step is affine in the model output for a fixed latent, so fusing the per-path denoised latents (as the
reference does) is fusing the model outputs, which is what ``DemoFusionGuidance`` returns to the DDIM sampler.

Differences from the reference (``pipeline_demofusion_sdxl.py``): DDIM by default instead of SDXL's Euler scheduler
(``--sampler euler`` runs the release's; the phases and the skip residual use only the sampler contract); the
last phase is the requested size (the reference's K = int(max(H, W) / 1024) truncates, so 2560 comes out 2048):
when max(H, W) is not a multiple of the base, one more phase at exactly H×W is added; the jitter is drawn from the
run's seed; the final latent is decoded with this repository's tiled VAE (synchronized GroupNorm) instead of its
unsynchronised tiles; phase sides are rounded to multiples of 8 (the reference floors: 80 instead of 88 px for the
first phase of 256x288 at base 96); a latent side shorter than the window (e.g. the short side of the second phase
of 1024x4096) gets one window spanning it, not jittered (the reference keeps a base-size window that overruns into
the zero padding and jitters it, so the UNet sees padding rows). Kept as released: σ = 0.8 (the README's and demos'
value; the signature default is 1.0), window crops conditioned at their padded coordinates, original = target
size = the final image for every path.
The re-standardisations (of the blurred latent, and of each phase's result to phase 1's statistics) use each
image's own mean and std (the reference pools them over the batch: identical for one image per prompt, its default).
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ldm.guidance import classifier_free_guidance
from ldm.errors import UsageError
from ldm.methods.base import Settings
from ldm.methods.cascade import Cascade, CascadeMethod, check_files, cosine_factor
from ldm.util import nonneg_float, positive_float, positive_int
from ldm.windows import SDXLWindowConditioning, fitting_window_batch, gaussian_1d, window_conditions, window_views


def demofusion_stages(height, width, base):
    """Phase sizes (pixels): long side base·k for k = 1 … K (K = max(H, W) // base), short side scaled by the
    aspect ratio (multiples of 8), and H×W exactly as the last phase."""
    long_side, short_side = max(height, width), min(height, width)
    aspect = short_side / long_side
    k_max = max(1, long_side // base)
    stages = []
    for k in range(1, k_max + 1):
        l, s = base * k, max(8, int(round(base * k * aspect / 8)) * 8)
        stages.append((l, s) if height >= width else (s, l))
    if stages[-1] != (height, width):
        if k_max * base == long_side:
            stages[-1] = (height, width)
        else:
            stages.append((height, width))
    return stages


def gaussian_blur_2d(x, kernel_size, sigma):
    """Per-channel zero-padded Gaussian blur of (B, C, H, W), as the reference's conv2d."""
    if kernel_size <= 1:
        return x
    g = gaussian_1d(kernel_size, sigma, x.dtype, x.device)
    k2 = (g[:, None] * g[None, :]).expand(x.shape[1], 1, kernel_size, kernel_size)
    return F.conv2d(x, k2, padding=kernel_size // 2, groups=x.shape[1])


class DemoFusionGuidance:
    def __init__(self, scale_num, window, stride, randint=None, sigma=0.8, cosine_scale_2=1.0, cosine_scale_3=1.0,
                 num_timesteps=1000, window_conditioning=None, view_batch=16):
        self.s = int(scale_num)
        self.window, self.stride = int(window), int(stride)
        self.jitter = (self.window - self.stride) // 4
        self.randint = randint
        self.sigma, self.cs2, self.cs3 = float(sigma), float(cosine_scale_2), float(cosine_scale_3)
        self.T = int(num_timesteps)
        self.window_conditioning = window_conditioning
        self.view_batch = max(1, int(view_batch))

    def local(self, model, x, t, cond, uncond, scale):
        b, _, H, W = x.shape
        j = self.jitter
        geometry = (self.window, self.window, self.stride, self.stride, j, j)
        views = window_views((H, W), geometry, self.randint)  # in the padded latent
        xp = F.pad(x, (j, j, j, j)) if j else x
        value = torch.zeros_like(xp)
        count = torch.zeros(1, 1, xp.shape[2], xp.shape[3], dtype=x.dtype, device=x.device)
        per_call = fitting_window_batch(model, self.view_batch, (self.window, self.window), b, x.device)
        for k in range(0, len(views), per_call):
            chunk = views[k:k + per_call]
            xs = torch.cat([xp[:, :, h0:h1, w0:w1] for h0, h1, w0, w1 in chunk])
            out = classifier_free_guidance(model, xs, t.repeat(len(chunk)),
                                           window_conditions(cond, chunk, self.window_conditioning),
                                           window_conditions(uncond, chunk, self.window_conditioning), scale)
            for (h0, h1, w0, w1), o in zip(chunk, out.split(b)):
                value[:, :, h0:h1, w0:w1] += o
                count[:, :, h0:h1, w0:w1] += 1
        return (value / count.clamp(min=1))[:, :, j:j + H, j:j + W]

    def global_(self, model, x, t, cond, uncond, scale, cf):
        b, _, H, W = x.shape
        s = self.s
        hp, wp = (s - H % s) % s, (s - W % s) % s
        xg = F.pad(x, (wp, 0, hp, 0)) if (hp or wp) else x
        c3 = 0.99 * cf ** self.cs3 + 1e-2
        # statistics per image (the reference pools them over its batch: the same for one image, but an image
        # must not depend on its batch neighbours)
        dims = (1, 2, 3)
        std, mean = xg.std(dim=dims, keepdim=True), xg.mean(dim=dims, keepdim=True)
        blurred = gaussian_blur_2d(xg, 2 * s - 1, self.sigma * c3)
        blurred = (blurred - blurred.mean(dim=dims, keepdim=True)) / blurred.std(dim=dims, keepdim=True) * std + mean
        out = torch.zeros_like(xg)
        lattices = [(a, c) for a in range(s) for c in range(s)]
        per_call = fitting_window_batch(model, self.view_batch, (-(-xg.shape[2] // s), -(-xg.shape[3] // s)), b,
                                        x.device)
        for k in range(0, len(lattices), per_call):
            chunk = lattices[k:k + per_call]
            xs = torch.cat([blurred[:, :, a::s, c::s] for a, c in chunk])
            # the global paths keep the image's own conditioning (crop 0)
            o = classifier_free_guidance(model, xs, t.repeat(len(chunk)), window_conditions(cond, chunk),
                                         window_conditions(uncond, chunk), scale)
            for (a, c), oo in zip(chunk, o.split(b)):
                out[:, :, a::s, c::s] = oo
        return out[:, :, hp:, wp:]

    def __call__(self, model, x, t, cond, uncond, scale, step):
        cf = cosine_factor(int(t.reshape(-1)[0]), self.T)
        local = self.local(model, x, t, cond, uncond, scale)
        if self.s <= 1:
            return local
        c2 = cf ** self.cs2
        return local * (1 - c2) + self.global_(model, x, t, cond, uncond, scale, cf) * c2


@dataclass
class DemoFusionStages:
    """The cascade settings of DemoFusion's phases: latent resize, restart at step 0, skip residual c1."""
    stages: Sequence[Tuple[int, int]]
    base: int
    cosine_scale: float = 3.0
    restart_step: Optional[int] = 0
    cosine_scale_bg: Optional[float] = None
    resize: str = "latent"


class DemoFusion(Cascade):
    """The phases on the shared cascade machinery (``ldm/methods/cascade.py``), DemoFusion's guidance."""

    def __init__(self, model, height, width, base, f=8, tiling=None, stride=None, sigma=0.8, cosine_scales=(3, 1, 1),
                 view_batch=16, stage_callback=None):
        settings = DemoFusionStages(stages=demofusion_stages(height, width, base), base=base,
                                    cosine_scale=float(cosine_scales[0]))
        super().__init__(model, settings, f=f, tiling=tiling, stage_callback=stage_callback)
        self.window = base // f
        self.stride = int(stride) if stride else self.window // 2  # 64 of 128 for SDXL, as released
        self.sigma, self.cs2, self.cs3 = sigma, float(cosine_scales[1]), float(cosine_scales[2])
        self.view_batch = view_batch
        self.window_conditioning = (SDXLWindowConditioning(model, (height, width), f, target="image")
                                    if hasattr(model, "conditioner") else None)

    def sample(self, *args, **kwargs):
        """The cascade, with every upscaling phase's latent re-standardised to the mean and std of phase 1's
        (the reference's ``anchor_mean``/``anchor_std``; per image) before it is upscaled again or returned; done in
        place from the stage callback, so stage_latents and the result carry it."""
        user_callback, anchor, dims = self.stage_callback, [], (1, 2, 3)

        def restandardise(index, size, latent):
            if index == 0:
                anchor[:] = [latent.mean(dim=dims, keepdim=True), latent.std(dim=dims, keepdim=True)]
            else:
                mean, std = latent.mean(dim=dims, keepdim=True), latent.std(dim=dims, keepdim=True)
                latent.copy_((latent - mean) / std * anchor[1] + anchor[0])
            if user_callback:
                user_callback(index, size, latent)
        self.stage_callback = restandardise
        try:
            return super().sample(*args, **kwargs)
        finally:
            self.stage_callback = user_callback

    def describe(self):
        return {"stages": [list(s) for s in self.settings.stages], "window": self.window, "stride": self.stride,
                "sigma": self.sigma, "cosine_scales": [self.settings.cosine_scale, self.cs2, self.cs3]}

    def stage_guidance(self, size, steps, randint):
        scale_num = max(1, math.ceil(max(size) / self.settings.base - 1e-9))
        return DemoFusionGuidance(scale_num, self.window, self.stride, randint, self.sigma, self.cs2, self.cs3,
                                  int(self.model.num_timesteps), self.window_conditioning, self.view_batch)


# ---------------------------------------------------------------------------------------------
# the method (--method demofusion)


class DemoFusionMethod(CascadeMethod):
    name = "demofusion"
    label = "DemoFusion"
    summary = "DemoFusion: progressive upscaling with local windows and dilated global paths"
    img2img = True

    @classmethod
    def add_args(cls, parser):
        g = parser.add_argument_group("DemoFusion (--method demofusion)")
        g.add_argument("--df_stride", type=positive_int, default=None,
                       help="local window stride in latent pixels (default: half a window, 64 for SDXL)")
        g.add_argument("--df_sigma", type=positive_float, default=0.8, help="Gaussian sigma of the global paths")
        g.add_argument("--df_cosine_scales", type=nonneg_float, nargs=3, default=[3.0, 1.0, 1.0], metavar=("C1", "C2", "C3"),
                       help="exponents (>= 0) of the skip residual, the local/global fusion and the blur")
        g.add_argument("--df_view_batch", type=positive_int, default=16, help="windows per UNet call")

    @classmethod
    def settings(cls, opt, info, size):
        values = {"stride": opt.df_stride, "sigma": opt.df_sigma, "cosine_scales": list(opt.df_cosine_scales),
                  "view_batch": opt.df_view_batch, "init_image": getattr(opt, "init_image", None),
                  "save_stages": getattr(opt, "save_stages", False)}
        check_files(values, "init_image")
        stages = demofusion_stages(size[0], size[1], info.base_px)
        values["stages"] = stages
        return Settings(size=tuple(size), sample_size=tuple(stages[0]), values=values)

    @classmethod
    def unet_input(cls, settings, info):
        """Local and global paths: batches of base-size windows (or sub-lattices)."""
        h, w = settings.size[0] // info.f, settings.size[1] // info.f
        return settings.values["view_batch"], min(info.base_latent, h), min(info.base_latent, w)

    def make_cascade(self):
        v = self.settings.values
        h, w = self.settings.size
        try:
            return DemoFusion(self.model, h, w, self.info.base_px, f=self.info.f, tiling=self.tiling,
                              stride=v["stride"], sigma=v["sigma"], cosine_scales=v["cosine_scales"],
                              view_batch=v["view_batch"])
        except ValueError as err:
            raise UsageError(f"DemoFusion: {err}") from None

    @classmethod
    def stages_of(cls, settings):
        return [tuple(s) for s in settings.values["stages"]]

    def describe(self):
        restart = getattr(self.runner, "restart_run_step", None)  # img2img: the run's step
        return {"demofusion": {**self.runner.describe(),
                               "restart_step": self.runner.settings.restart_step if restart is None else restart}}
