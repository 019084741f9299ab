"""MultiDiffusion (Bar-Tal et al., 2023): a large latent denoised as overlapping base-size windows.

Every step, the latent is covered by windows of the model's base latent size (64² for SD, 128² for SDXL) at a
stride (default 8 latent pixels); each window gets a classifier-free-guided prediction of its own (windows are
batched), and the predictions are averaged where windows overlap. The DDIM update is linear in the model
output, so averaging outputs is averaging the per-window denoised latents, which is what the reference does.

Differences from the reference implementation (omerbt/MultiDiffusion, diffusers' panorama pipeline):
* a last window is aligned with the right/bottom edge when (side − window) is not a multiple of the stride;
  the reference leaves that rim uncovered, where ``where(count > 0, value / count, value)`` sets it to zero
  (no effect at the papers' sizes, which are multiples of 64 px); a latent side shorter than the window gets one
  window spanning it (the reference's get_views then returns no views, or, with both sides shorter, windows at
  negative offsets);
* for η > 0 one noise draw per step is shared by all windows (the reference draws per window and averages,
  which lowers the noise variance); for η = 0, as in the reference, the two are the same;
* SDXL: each window is conditioned on its own crop: original size = the whole image, crop = the window's
  offset, target size = the window's size (pixels).
"""
from ldm.errors import UsageError
from ldm.methods.base import GuidanceMethod, Settings
from ldm.util import positive_int
from ldm.windows import (MultiDiffusionGuidance, SDXLWindowConditioning, views, window_conditions,  # noqa: F401
                         window_starts)




class MultiDiffusion(GuidanceMethod):
    name = "multidiffusion"
    label = "MultiDiffusion"
    summary = "MultiDiffusion: base-size windows denoised and averaged every step"

    @classmethod
    def add_args(cls, parser):
        g = parser.add_argument_group("MultiDiffusion (--method multidiffusion)")
        g.add_argument("--md_window", type=positive_int, nargs="+", default=None, metavar="LATENT",
                       help="window side(s) in latent pixels (default: the model's base latent size)")
        g.add_argument("--md_stride", type=positive_int, default=8, help="window stride in latent pixels")
        g.add_argument("--md_batch", type=positive_int, default=8, help="windows per UNet call")

    @classmethod
    def settings(cls, opt, info, size):
        window = opt.md_window or [info.base_latent]
        window = (window[0], window[-1])
        if min(window) < 1 or opt.md_stride < 1 or opt.md_batch < 1:
            raise UsageError("--md_window, --md_stride and --md_batch must be positive")
        return Settings(size=tuple(size), values={"window": window, "stride": opt.md_stride, "batch": opt.md_batch})

    @classmethod
    def unet_input(cls, settings, info):
        v = settings.values
        h, w = settings.size[0] // info.f, settings.size[1] // info.f
        return v["batch"], min(v["window"][0], h), min(v["window"][1], w)

    def make_guidance(self):
        v = self.settings.values
        self.per_window = (SDXLWindowConditioning(self.model, self.settings.size, self.info.f)
                           if hasattr(self.model, "conditioner") else None)
        return MultiDiffusionGuidance(v["window"], v["stride"], v["batch"], self.per_window)

    def describe(self):
        v = self.settings.values
        return {"multidiffusion": {"window": list(v["window"]), "stride": v["stride"],
                                   "sdxl_window_crops": hasattr(self.model, "conditioner")}}
