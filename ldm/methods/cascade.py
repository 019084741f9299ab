"""The stage machinery of the cascade methods (FreeScale's self-cascade, DemoFusion's progressive upscaling).

Stage 1 samples at the first stage size (or starts from a given latent: img2img). Each later stage takes the
previous result to the next size (through pixels: decode, bicubic, encode; or by resizing the latent), draws one
noise tensor for the stage, restarts the sampler at ``restart_step`` from the re-noised latent and, before every
step i, applies the skip residual z <- z·(1 − c₁) + noised(z₀, i)·c₁ with c₁ = cosine_factor(t_i)^cosine_scale
(per pixel with a detail mask). Subclasses give each stage its guidance (``stage_guidance``).

Only the sampler contract is used (``run``, ``timesteps``, ``noised``, ``noise``: ``ldm/samplers/base.py``), so a
cascade runs on any sampler.
"""
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F

from ldm.errors import UsageError
from ldm.methods.base import Method, Settings
from ldm.util import missing_file_reason

RESIZES = ("pixel", "latent")


def cosine_factor(t, num_timesteps=1000):
    """½(1 + cos(π(T − t)/T)): 1 at t = T, 0 at t = 0."""
    return 0.5 * (1.0 + math.cos(math.pi * (num_timesteps - float(t)) / num_timesteps))


@dataclass
class CascadeResult:
    latent: torch.Tensor
    stage_latents: List[torch.Tensor] = field(default_factory=list)


class Cascade:
    """Runs the stages for one batch. ``settings`` carries ``stages`` (pixel sizes, first = entry stage),
    ``restart_step`` (None: 30 % of the steps), ``cosine_scale``, ``cosine_scale_bg`` and ``resize``
    ('pixel' | 'latent'). ``f``: the first stage's downsampling factor (8 for SD, 1 for the demo model);
    ``tiling``: keyword arguments of tiled VAE decoding/encoding, or {} for whole-image passes;
    ``stage_callback(index, size, latent)`` is called after every stage."""

    def __init__(self, model, settings, f=8, tiling=None, stage_callback=None):
        self.model = model
        self.settings = settings
        self.f = int(f)
        self.tiling = dict(tiling or {})
        self.unet = model.model.diffusion_model
        self.stage_callback = stage_callback
        for size in settings.stages:
            if size[0] % self.f or size[1] % self.f:
                raise ValueError(f"stage size {size[0]}x{size[1]} is not a multiple of the latent factor {self.f}")

    def latent_shape(self, size):
        return (self.unet.in_channels, size[0] // self.f, size[1] // self.f)

    def stage_guidance(self, size, steps, randint):
        """The guidance of a later stage (size in pixels); ``randint`` draws the stage's window jitter."""
        raise NotImplementedError

    def upscale(self, latent, size, generator, sampler):
        """The previous stage's latent at the next stage size: through pixels (decode, bicubic, encode) or
        resized directly (``resize='latent'``)."""
        target = (size[0] // self.f, size[1] // self.f)
        if self.settings.resize == "latent":
            return F.interpolate(latent, size=target, mode="bicubic", align_corners=False)
        image = self.model.decode_first_stage(latent, **self.tiling)
        image = F.interpolate(image.float(), size=tuple(size), mode="bicubic", align_corners=False)
        return encode_image(self.model, image, self.tiling, generator, sampler.noise)

    @staticmethod
    def c1_exponent(settings, mask, latent):
        """cosine_scale as a scalar, or per pixel from a mask (1 = foreground) resized to the latent."""
        if mask is None:
            return settings.cosine_scale
        bg = settings.cosine_scale_bg if settings.cosine_scale_bg is not None else settings.cosine_scale
        m = F.interpolate(mask.to(latent.device, torch.float32), size=latent.shape[-2:], mode="bilinear",
                          align_corners=False).clamp(0, 1)
        return (m * settings.cosine_scale + (1 - m) * bg).to(latent.dtype)

    def restart_of(self, steps, timesteps=None, clock=None):
        """The run step the later stages restart at: ``restart_step`` (None: 30 %) of the reference steps, placed on
        this run's trajectory by ``clock``; an img2img start (``restart_run_step``) is a step of this run."""
        if getattr(self, "restart_run_step", None) is not None:
            restart, limit = int(self.restart_run_step), steps
        else:
            limit = len(clock.reference) if clock is not None else steps
            restart = self.settings.restart_step
            restart = int(0.3 * limit) if restart is None else int(restart)
        if not 0 <= restart < limit:
            raise ValueError(f"restart_step {restart} must be in [0, {limit})")
        if clock is not None and getattr(self, "restart_run_step", None) is None:
            restart = min(clock.run_step_of(restart, timesteps), steps - 1)
        return restart

    def sample(self, sampler, steps, cond, uncond, scale, batch_size, generator=None, x_T=None, init_latent=None,
               mask=None, guidance=None, jitter_seed=0, disable_progress=True, callback=None, clock=None):
        """The whole cascade. Returns CascadeResult (final latent, one latent per stage).

        init_latent: start from this latent of the first stage size instead of sampling stage 1 (image to
        image: the user's image, encoded). guidance: what stage 1 uses (plain CFG by default).
        jitter_seed: seeds the window jitter of the later stages. clock: the ``TrajectoryClock`` of the settings'
        reference steps (restart step, per-step stage settings); None: the settings are in this run's steps."""
        st = self.settings
        stage_latents = []
        run = dict(batch_size=batch_size, generator=generator, disable_progress=disable_progress, callback=callback)
        if init_latent is None:
            latent = sampler.run(steps, cond, uncond, scale, shape=self.latent_shape(st.stages[0]), x_T=x_T,
                                 guidance=guidance, **run)
        else:
            latent = init_latent
        stage_latents.append(latent)
        if self.stage_callback:
            self.stage_callback(0, st.stages[0], latent)
        times = sampler.timesteps(steps)
        restart = self.restart_of(steps, times, clock)
        reference_steps = len(clock.reference) if clock is not None else steps
        jitter = random.Random(int(jitter_seed))  # python ints only: also runs on fake tensors (benchmark)
        T = int(self.model.num_timesteps)
        for k, size in enumerate(st.stages[1:], start=1):
            z0 = self.upscale(latent, size, generator, sampler)
            noise = sampler.noise(z0.shape, z0.device, generator).to(z0.dtype)
            exponent = self.c1_exponent(st, mask, z0)

            def noised(i, z0=z0, noise=noise):
                return sampler.noised(z0, steps, i, noise)

            def skip_residual(z, i, ts, noised=noised, exponent=exponent):
                c1 = cosine_factor(times[i], T) ** exponent
                if not torch.is_tensor(c1) and c1 == 0:
                    return z
                return z * (1 - c1) + noised(i) * c1

            stage_guidance = self.stage_guidance(size, reference_steps, jitter.randint)
            latent = sampler.run(steps, cond, uncond, scale, shape=self.latent_shape(size), x_T=noised(restart),
                                 guidance=clock.wrap(stage_guidance) if clock is not None else stage_guidance,
                                 start_step=restart, pre_step=skip_residual, **run)
            stage_latents.append(latent)
            if self.stage_callback:
                self.stage_callback(k, size, latent)
        return CascadeResult(latent, stage_latents)


def encode_image(model, image, tiling=None, generator=None, noise=None):
    """Images in [-1, 1] -> scaled latents, sampling the posterior with ``generator`` (one, or one per image);
    ``noise(shape, device, generator)`` is the sampler's draw (DDIM's by default).

    Tiled (synchronized GroupNorm) when ``tiling`` is given and the autoencoder can; in float32 with autocast
    off for models whose VAE must stay in float32 (SDXL)."""
    if noise is None:
        from ldm.samplers.ddim import DDIMSampler
        noise = DDIMSampler._randn
    fs = model.first_stage_model
    params = next(iter(fs.parameters()), None)
    if params is not None:
        image = image.to(params.dtype)
    guard = (torch.autocast(device_type=image.device.type, enabled=False)
             if getattr(model, "vae_fp32", False) else nullcontext())
    with torch.no_grad(), guard:
        if tiling and hasattr(fs, "encode_tiled"):
            posterior = fs.encode_tiled(image, **tiling)
        else:
            posterior = model.encode_first_stage(image)
    if isinstance(posterior, torch.Tensor):
        return model.get_first_stage_encoding(posterior)
    eps = noise(posterior.mean.shape, posterior.mean.device, generator).to(posterior.mean.dtype)
    return model.scale_factor * (posterior.mean + posterior.std * eps)


# ------------------------------------------------------------------------------------------------
# the cascade methods' common part (FreeScale, DemoFusion)


def read_image_tensor(path, size, device):
    """An image file as (1, 3, h, w) in [-1, 1] at ``size`` = (h, w) pixels (PIL bicubic resize)."""
    import numpy as np
    from PIL import Image

    from ldm.image_io import read_rgb
    h, w = size
    img = read_rgb(path).resize((w, h), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    return x.to(device)


def read_mask_tensor(path, device):
    """A greyscale image as a (1, 1, h, w) mask in [0, 1]."""
    import numpy as np

    from ldm.image_io import read_rgb
    m = torch.from_numpy(np.asarray(read_rgb(path).convert("L"), dtype=np.float32) / 255.0)
    return m[None, None].to(device)


class CascadeMethod(Method):
    """A method whose ``sample`` is a cascade (``make_cascade``); it starts from ``--init_image`` (encoded at the
    first stage) when given, and returns the earlier stages' latents with ``--save_stages``."""
    accepts = ("init_image", "save_stages")

    def __init__(self, model, settings, info, tiling=None, opt=None):
        super().__init__(model, settings, info, tiling, opt)
        self.runner = self.make_cascade()
        entry = settings.values.get("entry")
        if entry:  # img2img: from the entry stage on
            self.runner.settings.stages = list(self.runner.settings.stages)[entry:]
        device = model.betas.device
        self.mask = self.init_pixels = None
        if settings.values.get("detail_mask"):
            self.mask = read_mask_tensor(settings.values["detail_mask"], device)
        if settings.values.get("init_image"):
            self.init_pixels = read_image_tensor(settings.values["init_image"], self.runner.settings.stages[0],
                                                 device)

    def make_cascade(self):
        raise NotImplementedError

    # -- image to image (scripts/upscale.py): the image enters the cascade at one of its stages ----------------

    @classmethod
    def stages_of(cls, settings):
        """The cascade's stage sizes (pixels) for these settings."""
        raise NotImplementedError

    @classmethod
    def default_strength(cls, settings, steps):
        return 1.0

    @classmethod
    def entering_at(cls, settings, k, init_image):
        """The settings of a run that starts at stage k from ``init_image`` (the later stages re-noised)."""
        values = {**settings.values, "init_image": init_image, "entry": k}
        return Settings(size=settings.size, sample_size=tuple(cls.stages_of(settings)[k]),
                        size_conditioning=dict(settings.size_conditioning), freeu=settings.freeu, values=values)

    def restart_at(self, restart_step):
        """Later stages restart at this step of the run (img2img: steps - floor(strength x steps); None: the
        settings' restart step)."""
        self.runner.restart_run_step = restart_step

    def sample_shape(self):
        return self.runner.latent_shape(self.runner.settings.stages[0])

    def stage_images(self):
        return bool(self.settings.values.get("save_stages"))

    def sample(self, sampler, steps, cond, uncond, scale, *, batch_size, generator=None, x_T=None, jitter_seed=0,
               init_latent=None, start_step=0, callback=None):
        if init_latent is None and self.init_pixels is not None:
            init_latent = encode_image(self.model, self.init_pixels.expand(batch_size, -1, -1, -1), self.tiling,
                                       generator, sampler.noise)
        result = self.runner.sample(sampler, steps, cond, uncond, scale, batch_size, generator=generator, x_T=x_T,
                                    init_latent=init_latent, mask=self.mask, jitter_seed=jitter_seed,
                                    callback=callback, clock=self.clock())
        return result.latent, (result.stage_latents[:-1] if self.stage_images() else [])


def check_files(values, *keys):
    """--init_image / --detail_mask name existing files (before the model loads)."""
    for key in keys:
        if values.get(key) and not Path(values[key]).is_file():
            raise UsageError(f"--{key} {values[key]}: {missing_file_reason(values[key])}")
