"""The x4 upscaler of Stable Diffusion 2.x (``configs/stable-diffusion/x4-upscaling.yaml``).

**Low-scale models** (the classes the original config names, same state-dict layout). The upscaler is
   conditioned on the low-resolution image *in pixels* (``[-1, 1]``), which the low-scale model first noises
   to a chosen level with a DDPM schedule of its own::

       x_aug = sqrt(ᾱ[level]) · x_low + sqrt(1 − ᾱ[level]) · ε

   The 3 channels of ``x_aug`` are concatenated **after** the 4 latent channels (``in_channels: 7``) and the
   level is the UNet's class label (``num_classes: 1000``, an ``nn.Embedding`` added to the timestep
   embedding). The f=4 autoencoder makes the latent exactly as large as the low-resolution image.
Sampling with the upscaler (DDIM, windowed denoising, tiled decoding) is ``ldm/upscaler.py``; SD+SR is
``ldm/methods/sdsr.py``.
"""
import math
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.diffusionmodules.util import extract_into_tensor, gaussian_noise as _gaussian, make_beta_schedule

# persistent buffers of a low-scale model, in state-dict order
LOW_SCALE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
)
UPSCALER_TARGET = "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion"
UPSCALER_CONFIG = "configs/stable-diffusion/x4-upscaling.yaml"
AUTO_TILING_LATENT_PIXELS = 256 * 256  # tiled VAE decoding beyond this latent area (outputs above 1024² at f=4)


# --------------------------------------------------------------------------------------------------
# 1. low-scale models
# --------------------------------------------------------------------------------------------------

class AbstractLowScaleModel(nn.Module):
    """Base of the low-resolution conditionings: an optional noise schedule (buffers) and ``q_sample``.
    ``forward(x)`` returns ``(conditioning image, noise level or None)``."""

    def __init__(self, noise_schedule_config=None):
        super().__init__()
        if noise_schedule_config is not None:
            self.register_schedule(**noise_schedule_config)

    def register_schedule(self, beta_schedule="linear", timesteps=1000, linear_start=1e-4, linear_end=2e-2,
                          cosine_s=8e-3):
        betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end,
                                   cosine_s=cosine_s)
        alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
        values = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": np.append(1.0, alphas_cumprod[:-1]),
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        }
        self.num_timesteps = int(betas.shape[0])
        self.linear_start, self.linear_end = linear_start, linear_end
        to_torch = partial(torch.tensor, dtype=torch.float32)  # float64 arithmetic, float32 buffers
        for name in LOW_SCALE_BUFFERS:
            self.register_buffer(name, to_torch(values[name]))

    def q_sample(self, x_start, t, noise=None):
        """``x_start`` noised to level ``t`` (a (B,) long tensor): sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·noise."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def forward(self, x):
        return x, None

    def decode(self, x):
        return x


class SimpleImageConcat(AbstractLowScaleModel):
    """The low-resolution image as it is, with a constant noise level 0."""

    def __init__(self):
        super().__init__(noise_schedule_config=None)
        self.max_noise_level = 0

    def forward(self, x):
        return x, torch.zeros(x.shape[0], device=x.device, dtype=torch.long)


class ImageConcatWithNoiseAugmentation(AbstractLowScaleModel):
    """Noise augmentation of the low-resolution image (``max_noise_level``: the levels seen in training are
    ``0 .. max_noise_level - 1``; the released model uses 350).

    ``forward(x, noise_level=None, noise=None, generator=None)``: without a level, one is drawn per image
    uniformly from ``[0, max_noise_level)`` (training); a level may be an int or a (B,) tensor. ``noise``
    (the ε above) is drawn from ``generator`` (a ``torch.Generator``, a list of one per image, or None for
    the global RNG) unless given. Returns ``(x_aug, noise_level)``, the level as a (B,) long tensor.
    """

    def __init__(self, noise_schedule_config, max_noise_level=1000, to_cuda=False):
        super().__init__(noise_schedule_config=noise_schedule_config)
        self.max_noise_level = max_noise_level

    def forward(self, x, noise_level=None, noise=None, generator=None):
        b = x.shape[0]
        if noise_level is None:
            if isinstance(generator, (list, tuple)):  # one level per row, from that row's generator
                noise_level = torch.cat([torch.randint(0, self.max_noise_level, (1,), generator=g, device=g.device)
                                         for g in generator]).to(x.device)
            else:
                noise_level = torch.randint(0, self.max_noise_level, (b,), device=x.device, generator=generator)
        elif not isinstance(noise_level, torch.Tensor):
            noise_level = torch.full((b,), int(noise_level), device=x.device, dtype=torch.long)
        noise_level = noise_level.to(device=x.device, dtype=torch.long).reshape(-1)
        if noise_level.shape[0] != b:
            raise ValueError(f"got {noise_level.shape[0]} noise levels for a batch of {b}")
        if bool((noise_level < 0).any()) or bool((noise_level >= self.num_timesteps).any()):
            raise ValueError(f"noise levels must be in [0, {self.num_timesteps}), got {noise_level.tolist()}")
        if noise is None:
            noise = torch.randn_like(x) if generator is None else _gaussian(x.shape, x.device, generator).to(x.dtype)
        return self.q_sample(x, noise_level, noise), noise_level
