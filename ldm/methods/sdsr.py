"""SD+SR (the papers' "SD + super-resolution" baseline, --method sdsr): the base model samples at its training
area, then the SD 2.x x4 upscaler (``ldm/upscaler.py``) takes the decoded images to the requested size with the
same prompts (resized when the request is not exactly 4x the base size)."""
import math
import warnings
from pathlib import Path

import torch

from ldm.errors import InputWarning, UsageError
from ldm.methods.base import GuidanceMethod, Settings
from ldm.upscaler import UPSCALER_CONFIG, add_args, check_args, load_upscaler, load_upscaler_config, upscaler_from_args
from ldm.util import cast_for_half_precision, check_size, finite_float

SDSR_OPTIONS = ("sr_ckpt", "sr_config", "sr_scale", "sr_noise_level", "sr_steps", "sr_sampler", "sr_spacing", "sr_eta", "sr_window",
                "sr_window_overlap", "sr_window_batch")


def sdsr_base_size(height, width, base_side, multiple=64, factor=4):
    """The size SD+SR samples at before the x4 upscaler: (height, width) scaled down to the base model's
    training area (``base_side``²), sides rounded to ``multiple``. Raises ValueError when the target needs
    more than one x4 pass."""
    s = max(1.0, math.sqrt(height * width) / float(base_side))
    bh = max(multiple, int(round(height / s / multiple)) * multiple)
    bw = max(multiple, int(round(width / s / multiple)) * multiple)
    if height > factor * bh or width > factor * bw:
        raise ValueError(f"{height}x{width} is more than {factor}x the base model's size ({bh}x{bw}, from its "
                         f"{base_side}² training size): SD+SR upscales once, by {factor}")
    return bh, bw


class SuperResolutionStage:
    """The second stage of SD+SR (``scripts/txt2img.py --method sdsr``): the base model's decoded images
    (``base_hw``) through the x4 upscaler with the same prompts, then resized to ``out_hw`` when that is not
    exactly 4 × ``base_hw`` (e.g. x2 by resizing)."""

    def __init__(self, upscaler, base_hw, out_hw, config_name=None, ckpt_name=None):
        self.upscaler = upscaler
        self.base_hw, self.out_hw = tuple(int(v) for v in base_hw), tuple(int(v) for v in out_hw)
        self.config_name, self.ckpt_name = config_name, ckpt_name

    def __call__(self, images, prompts, generator=None):
        return self.upscaler(images, list(prompts), generator=generator, out_hw=self.out_hw)

    def describe(self):
        f = self.upscaler.factor
        upscaled = [self.base_hw[0] * f, self.base_hw[1] * f]
        return {"base_size": list(self.base_hw), "upscaled_size": upscaled,
                "resized_to": list(self.out_hw) if list(self.out_hw) != upscaled else None,
                "sr_config": self.config_name, "sr_ckpt": self.ckpt_name, **self.upscaler.describe(),
                "plan": self.upscaler.plan(*self.base_hw)}




class SDSR(GuidanceMethod):
    name = "sdsr"
    label = "SD+SR"
    summary = "SD+SR: the base model at its training size, then the SD 2.x x4 upscaler (--sr_*)"

    @classmethod
    def add_args(cls, parser):
        g = parser.add_argument_group("SD+SR (--method sdsr): sample at the base model's size, then the SD 2.x x4 "
                                      "upscaler (docs/upscaling.md)")
        g.add_argument("--sr_ckpt", type=str, default=None, help="the upscaler checkpoint (x4-upscaler-ema.ckpt)")
        g.add_argument("--sr_config", type=str, default=UPSCALER_CONFIG, help="the upscaler's YAML config")
        g.add_argument("--sr_scale", type=finite_float, default=9.0, help="the upscaler's classifier-free guidance scale")
        add_args(g, prefix="sr_", defaults={"noise_level": 100})

    @classmethod
    def settings(cls, opt, info, size):
        """The --sr_* files and ranges are checked here, before anything is loaded."""
        check_args(opt, prefix="sr_")
        load_upscaler_config(opt.sr_config, "--sr_config", trust=opt.trust_config)
        if opt.sr_ckpt is None:
            raise UsageError("--method sdsr needs --sr_ckpt: the x4 upscaler checkpoint (x4-upscaler-ema.ckpt, see "
                             "checkpoints/README.md)")
        from ldm.checkpoint import check_checkpoint_file
        check_checkpoint_file(opt.sr_ckpt)
        try:
            base = sdsr_base_size(size[0], size[1], info.base_px, multiple=8 * info.f)
        except ValueError as err:
            raise UsageError(f"--method sdsr: {err}") from None
        check_size(*base, info.f)
        if size[0] * size[1] <= info.base_px ** 2:  # sdsr_base_size samples at the requested size itself
            warnings.warn(f"--method sdsr at {size[0]}x{size[1]}: that is not above the base model's "
                          f"{info.base_px}x{info.base_px} area, so the base model samples {base[0]}x{base[1]} and "
                          f"the x4 upscaler's {4 * base[0]}x{4 * base[1]} result is shrunk to "
                          f"{size[0]}x{size[1]}; SD+SR is "
                          "meant for larger sizes (--method direct gives this size without the upscaler)",
                          InputWarning, stacklevel=2)
        conditioning = {"target_size": list(base)} if info.sdxl else {}  # SDXL conditions on the size it samples at
        return Settings(size=tuple(size), sample_size=tuple(base), size_conditioning=conditioning)

    @classmethod
    def memory_estimate(cls, settings, info, batch_size, scale=2.0, tiling=None, bytes_per_value=4):
        """The base model's run at its base size (the x4 upscaler decodes in tiles above 1024x1024 by default)."""
        from dataclasses import replace
        return super().memory_estimate(replace(settings, size=settings.sample_size), info, batch_size, scale,
                                       tiling, bytes_per_value)

    def prepare(self):
        """Load the upscaler named by --sr_config/--sr_ckpt (the base model's tiled-decoding settings are used for
        the upscaler's VAE too, else automatic tiling)."""
        opt, device = self.opt, self.model.betas.device
        half = opt.precision == "half" and device.type == "cuda"
        model = load_upscaler(opt.sr_config, opt.sr_ckpt, device=device, allow_unsafe=opt.unsafe_load,
                              use_ema=not opt.no_ema, trust=opt.trust_config, flag="--sr_config",
                              ckpt_flag="--sr_ckpt", loader=self.loader,
                              weights_dtype=getattr(torch, opt.autocast_dtype) if half else None)
        if half:  # (a loader that ignores weights_dtype)
            cast_for_half_precision(model, getattr(torch, opt.autocast_dtype))
        up = upscaler_from_args(model, opt, opt.sr_scale, opt.negative_prompt,
                                tiling=dict(self.tiling) if self.tiling else "auto", prefix="sr_")
        self.stage = SuperResolutionStage(up, self.settings.sample_size, self.settings.size,
                                          Path(opt.sr_config).name, Path(opt.sr_ckpt).name)
        print(f"Loaded {opt.sr_ckpt} with {opt.sr_config} (SD+SR: {self.settings.sample_size[0]}x"
              f"{self.settings.sample_size[1]} -> {self.settings.size[0]}x{self.settings.size[1]})")

    def finish(self, images, prompts, generator=None):
        return self.stage(images, list(prompts), generator=generator)

    def describe(self):
        return {"sdsr": self.stage.describe()}
