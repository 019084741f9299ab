"""The x4 upscaler of Stable Diffusion 2.x (``configs/stable-diffusion/x4-upscaling.yaml``).

1. **Low-scale models** (the classes the original config names, same state-dict layout). The upscaler is
   conditioned on the low-resolution image *in pixels* (``[-1, 1]``), which the low-scale model first noises
   to a chosen level with a DDPM schedule of its own::

       x_aug = sqrt(ᾱ[level]) · x_low + sqrt(1 − ᾱ[level]) · ε

   The 3 channels of ``x_aug`` are concatenated **after** the 4 latent channels (``in_channels: 7``) and the
   level is the UNet's class label (``num_classes: 1000``, an ``nn.Embedding`` added to the timestep
   embedding). The f=4 autoencoder makes the latent exactly as large as the low-resolution image.
2. **Sampling** (``Upscaler``): DDIM on the v-parameterized model, classifier-free guidance whose
   unconditional branch keeps the same noised image and level and only swaps the prompt (as the original
   demo scripts do), optional overlapping windows (MultiDiffusion-style averaging, the low-resolution crop
   matching each window) and tiled VAE decoding for large outputs.
3. **Command-line options** shared by ``scripts/upscale.py`` and ``scripts/txt2img.py --method sdsr``.
"""
import math
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule

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

def _gaussian(shape, device, generator=None):
    """Standard normal noise from the global RNG, one generator, or one generator per batch row."""
    from ldm.models.diffusion.ddim import DDIMSampler
    return DDIMSampler._randn(tuple(shape), device, generator)


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
            noise_level = torch.randint(0, self.max_noise_level, (b,), device=x.device, generator=None
                                        if isinstance(generator, (list, tuple)) else generator)
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


# --------------------------------------------------------------------------------------------------
# 2. sampling
# --------------------------------------------------------------------------------------------------

def is_upscaler_config(config):
    """True for a config (whole file or its ``model`` node) of ``LatentUpscaleDiffusion``."""
    node = config.model if "model" in config else config
    return str(node.get("target", "")) == UPSCALER_TARGET


def WindowedUpscaleGuidance(window, stride, window_batch=4):
    """``guidance`` for the DDIM sampler: the latent denoised in overlapping windows, each with its crop of the
    low-resolution image, the guided predictions averaged where windows overlap: MultiDiffusion's guidance
    (``ldm.baselines.multidiffusion``, which crops the "c_concat" condition per window; DDIM is linear in the
    prediction, so this averages the per-window updates). Memory of one UNet call: ``window_batch`` windows × 2
    (guidance) × batch."""
    from ldm.baselines.multidiffusion import MultiDiffusionGuidance
    return MultiDiffusionGuidance(window, stride, window_batch)


def resize_images(x, hw):
    """(B, 3, h, w) images in [-1, 1] resized to ``hw`` = (H, W): antialiased bicubic, clamped."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x.float(), size=tuple(int(v) for v in hw), mode="bicubic", antialias=True,
                         align_corners=False).clamp(-1.0, 1.0)


class Upscaler:
    """Upscale a batch of low-resolution images (B, 3, h, w) in [-1, 1] with a ``LatentUpscaleDiffusion``.

    * ``steps``, ``eta``, ``scale``: DDIM and classifier-free guidance (``scale`` 1: no unconditional branch);
    * ``noise_level``: the augmentation level (0 .. ``max_noise_level``; 20 in the original demos, about 100
      recommended by the original README for generated inputs);
    * ``window``: ``None`` (auto: the whole latent up to (4 × the training latent size)² pixels, e.g. 512²
      low-resolution pixels for the released model, windows of the training size beyond), ``0`` (never
      windows) or a window side in latent (= low-resolution) pixels; ``overlap`` (default window // 4);
    * ``tiling``: ``"auto"`` (tiled VAE decoding with synchronized GroupNorm when the latent exceeds 256²
      pixels, i.e. outputs above 1024²), ``None`` / ``{}`` (off) or the keyword arguments of
      ``decode_first_stage`` (tile_size, overlap, sync_gn).

    A low-resolution side that is not a multiple of the UNet's downsampling (8) is padded by repeating the
    edge and the result cropped back. ``__call__`` returns the images at ``factor`` × the input size, or
    resized to ``out_hw``.
    """

    def __init__(self, model, steps=50, scale=9.0, noise_level=20, eta=0.0, negative_prompt="", window=None,
                 overlap=None, window_batch=4, tiling="auto"):
        if not hasattr(model, "low_scale_model"):
            raise ValueError(f"{type(model).__name__} is not an upscaler (LatentUpscaleDiffusion, "
                             f"{UPSCALER_CONFIG})")
        self.model = model
        self.steps, self.scale, self.eta = int(steps), float(scale), float(eta)
        self.noise_level = int(noise_level)
        max_level = int(getattr(model.low_scale_model, "max_noise_level", 0))
        if not 0 <= self.noise_level <= max_level:
            raise ValueError(f"noise level {noise_level} is outside [0, {max_level}], the range the upscaler was "
                             "trained on (20 is the original demos' default; about 100 for generated images)")
        self.negative_prompt = negative_prompt
        self.window = None if window is None else int(window)
        if self.window is not None and self.window < 0:
            raise ValueError(f"window must be 0 (off), positive, or None (auto), got {window}")
        self.overlap = overlap
        self.window_batch = int(window_batch)
        self.tiling = tiling
        self.factor = model.upscale_factor
        self.multiple = model.unet_multiple

    # sizes and plans ------------------------------------------------------------------------------

    def latent_shape(self, h, w):
        """(C, h', w') of the latent for an h × w low-resolution image (padded to the UNet's multiple)."""
        m = self.multiple
        return (self.model.channels, -(-h // m) * m, -(-w // m) * m)

    def plan(self, h, w):
        """How an h × w low-resolution image is processed: the latent size, the window (or None), the stride
        and the VAE tiling."""
        _, hp, wp = self.latent_shape(h, w)
        base = int(self.model.image_size)
        window = self.window
        if window is None:
            window = base if hp * wp > (4 * base) ** 2 else 0
        stride = None
        if window:  # a multiple of the UNet's downsampling, at most the latent's longer side
            window = min(max(self.multiple, window // self.multiple * self.multiple), max(hp, wp))
            overlap = window // 4 if self.overlap is None else int(self.overlap)
            if not 0 <= overlap < window:
                raise ValueError(f"window overlap must be in [0, {window}), got {overlap}")
            stride = window - overlap
            if max(hp, wp) <= window:
                window = 0
        tiling = self.tiling
        if tiling == "auto":  # the decoder's memory grows with the output's pixels, whatever the model
            tiling = {"sync_gn": True} if hp * wp > AUTO_TILING_LATENT_PIXELS else {}
        return {"latent": [hp, wp], "window": window or None, "stride": stride if window else None,
                "tiling": dict(tiling or {})}

    def describe(self):
        return {"steps": self.steps, "scale": self.scale, "eta": self.eta, "noise_level": self.noise_level,
                "negative_prompt": self.negative_prompt, "factor": self.factor,
                "window": "auto" if self.window is None else self.window,
                "window_overlap": "auto" if self.overlap is None else self.overlap,
                "tiled_decoding": self.tiling if self.tiling == "auto" else dict(self.tiling or {})}

    # sampling ---------------------------------------------------------------------------------------

    def conditioning(self, x_low, prompts, generator=None):
        """(cond, uncond) for the sampler: the noised low-resolution image (drawn here, before the starting
        latent), the prompts' embedding and the noise level; the unconditional branch swaps the prompt only."""
        model = self.model
        cond = model.upscale_conditioning(model.get_learned_conditioning(list(prompts)), x_low, self.noise_level,
                                          generator=generator)
        uncond = None
        if self.scale != 1.0:
            uc = model.get_learned_conditioning(len(prompts) * [self.negative_prompt])
            uncond = {**cond, "c_crossattn": [uc]}  # same noised image, same level
        return cond, uncond

    @torch.no_grad()
    def __call__(self, images, prompts, generator=None, x_T=None, out_hw=None, progress=False, callback=None):
        from ldm.models.diffusion.ddim import DDIMSampler
        model = self.model
        device = model.betas.device
        x_low = images.to(device=device, dtype=torch.float32)
        b, _, h, w = x_low.shape
        if isinstance(prompts, str):
            prompts = [prompts] * b
        if len(prompts) != b:
            raise ValueError(f"got {len(prompts)} prompts for {b} images")
        plan = self.plan(h, w)
        hp, wp = plan["latent"]
        if (hp, wp) != (h, w):
            x_low = F.pad(x_low, (0, wp - w, 0, hp - h), mode="replicate")
        cond, uncond = self.conditioning(x_low, prompts, generator)
        guidance = None
        if plan["window"]:
            guidance = WindowedUpscaleGuidance(plan["window"], plan["stride"], self.window_batch)
        samples, _ = DDIMSampler(model).sample(
            S=self.steps, batch_size=b, shape=(model.channels, hp, wp), conditioning=cond, eta=self.eta,
            unconditional_guidance_scale=self.scale, unconditional_conditioning=uncond, guidance=guidance,
            generator=generator, x_T=x_T, verbose=progress, callback=callback)
        # the VAE decoder stays in float32, also under autocast (it breaks in half precision, as the original
        # config notes)
        with torch.autocast(device.type, enabled=False):
            x = model.decode_first_stage(samples.float(), **plan["tiling"])
        x = x[:, :, :h * self.factor, :w * self.factor]
        return resize_images(x, out_hw) if out_hw is not None else x


def load_upscaler(config_path, ckpt, device="cpu", allow_unsafe=False, use_ema=True, trust=False,
                  flag="--config", ckpt_flag="--ckpt"):
    """The upscaler model from its config and checkpoint; a config of another kind is a UsageError naming
    the right one, a checkpoint of another family a CheckpointError (ldm.checkpoint) naming its config."""
    from pathlib import Path

    from ldm.checkpoint import check_checkpoint_file, load_model_from_config
    from ldm.inference import UsageError
    config = load_upscaler_config(config_path, flag, trust=trust)
    if ckpt is None:
        raise UsageError(f"{ckpt_flag} is required: the x4 upscaler checkpoint (x4-upscaler-ema.ckpt, see "
                         "checkpoints/README.md)")
    check_checkpoint_file(ckpt)
    return load_model_from_config(config, ckpt, device=device, allow_unsafe=allow_unsafe, use_ema=use_ema,
                                  config_name=str(Path(config_path)), trust=trust)


def load_upscaler_config(config_path, flag="--config", trust=False):
    """The config file (read and target-checked by ``ldm.util.load_config_file``), checked to be an upscaler's
    (UsageError otherwise)."""
    from pathlib import Path

    from ldm.inference import UsageError
    from ldm.util import load_config_file
    path = Path(config_path)
    if not path.is_file():
        raise UsageError(f"{flag} {config_path}: no such file (the upscaler's config is {UPSCALER_CONFIG})")
    config = load_config_file(path, trust=trust, flag=flag)
    if not is_upscaler_config(config):
        node = config.model if "model" in config else config
        raise UsageError(f"{flag} {config_path} is not an upscaler config (its target is "
                         f"{node.get('target')}, not {UPSCALER_TARGET}); use {UPSCALER_CONFIG}")
    return config


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


SDSR_OPTIONS = ("sr_ckpt", "sr_config", "sr_scale", "sr_noise_level", "sr_steps", "sr_eta", "sr_window",
                "sr_window_overlap", "sr_window_batch")


def add_sdsr_args(parser):
    """``scripts/txt2img.py --method sdsr`` options (``--sr_*``)."""
    g = parser.add_argument_group("SD+SR (--method sdsr): sample at the base model's size, then the SD 2.x x4 "
                                  "upscaler (docs/upscaling.md)")
    g.add_argument("--sr_ckpt", type=str, default=None, help="the upscaler checkpoint (x4-upscaler-ema.ckpt)")
    g.add_argument("--sr_config", type=str, default=UPSCALER_CONFIG, help="the upscaler's YAML config")
    g.add_argument("--sr_scale", type=float, default=9.0, help="the upscaler's classifier-free guidance scale")
    add_args(g, prefix="sr_", defaults={"noise_level": 100})
    return g


def prepare_sdsr(opt, method, base_side, f, sdxl=False):
    """Checks of the --sr_* options before anything is loaded, and the base size (H, W) for --method sdsr
    (None for the other methods). Raises UsageError."""
    from ldm.inference import UsageError, check_size
    defaults = {a.dest: a.default for a in _sdsr_parser()._actions}
    given = [f"--{k}" for k in SDSR_OPTIONS if getattr(opt, k, None) != defaults.get(k)]
    if method != "sdsr":
        if given:
            raise UsageError(f"{', '.join(given)}: SD+SR options; add --method sdsr (got --method {method})")
        return None
    check_args(opt, prefix="sr_")
    load_upscaler_config(opt.sr_config, "--sr_config", trust=getattr(opt, "trust_config", False))
    if opt.sr_ckpt is None:
        raise UsageError("--method sdsr needs --sr_ckpt: the x4 upscaler checkpoint (x4-upscaler-ema.ckpt, see "
                         "checkpoints/README.md)")
    from ldm.checkpoint import check_checkpoint_file
    check_checkpoint_file(opt.sr_ckpt)
    try:
        base = sdsr_base_size(opt.H, opt.W, base_side, multiple=8 * f)
    except ValueError as err:
        raise UsageError(f"--method sdsr: {err}") from None
    check_size(*base, f)
    if sdxl and getattr(opt, "target_size", None) is None:  # SDXL conditions on the size it samples at
        opt.target_size = list(base)
    return base


def _sdsr_parser():
    import argparse
    p = argparse.ArgumentParser(add_help=False)
    add_sdsr_args(p)
    return p


def sdsr_from_args(opt, base_hw, device, tiling=None):
    """Load the upscaler named by --sr_config/--sr_ckpt and return the ``SuperResolutionStage``; ``tiling``:
    the base model's tiled-decoding settings (used for the upscaler's VAE too), else automatic."""
    from pathlib import Path
    model = load_upscaler(opt.sr_config, opt.sr_ckpt, device=device, allow_unsafe=getattr(opt, "unsafe_load", False),
                          use_ema=not getattr(opt, "no_ema", False), trust=getattr(opt, "trust_config", False),
                          flag="--sr_config", ckpt_flag="--sr_ckpt")
    if getattr(opt, "precision", None) == "half" and torch.device(device).type == "cuda":
        from ldm.inference import cast_for_half_precision
        cast_for_half_precision(model, getattr(torch, opt.autocast_dtype))
    up = upscaler_from_args(model, opt, opt.sr_scale, getattr(opt, "negative_prompt", ""),
                            tiling=dict(tiling) if tiling else "auto", prefix="sr_")
    return SuperResolutionStage(up, base_hw, (opt.H, opt.W), Path(opt.sr_config).name, Path(opt.sr_ckpt).name)


# --------------------------------------------------------------------------------------------------
# 3. command-line options
# --------------------------------------------------------------------------------------------------

def add_args(group, prefix="", defaults=None):
    """The upscaler's sampling options on an argparse group, named ``--{prefix}noise_level`` etc.;
    ``defaults`` overrides the defaults (dict by option name without prefix)."""
    d = {"noise_level": 20, "steps": 50, "eta": 0.0, "window": None, "window_overlap": None, "window_batch": 4}
    d.update(defaults or {})
    group.add_argument(f"--{prefix}noise_level", type=int, default=d["noise_level"],
                       help="noise augmentation level of the low-resolution image, 0..350 (the original demos use "
                            "20; the original README recommends about 100 for generated images)")
    group.add_argument(f"--{prefix}steps", type=int, default=d["steps"], help="upscaler DDIM steps")
    group.add_argument(f"--{prefix}eta", type=float, default=d["eta"], help="upscaler DDIM eta in [0, 1]")
    group.add_argument(f"--{prefix}window", type=int, default=d["window"],
                       help="denoise the latent in overlapping windows of this side (low-resolution pixels; 0: "
                            "never; default: whole up to 512² low-resolution pixels, 128-pixel windows beyond)")
    group.add_argument(f"--{prefix}window_overlap", type=int, default=d["window_overlap"],
                       help="window overlap in low-resolution pixels (default: a quarter of the window)")
    group.add_argument(f"--{prefix}window_batch", type=int, default=d["window_batch"],
                       help="windows per UNet call")
    return group


def check_args(opt, prefix=""):
    """The upscaler options' ranges (UsageError naming the flag)."""
    from ldm.inference import UsageError

    def get(name):
        return getattr(opt, prefix + name)
    if not 0 <= get("noise_level") <= 350:
        raise UsageError(f"--{prefix}noise_level {get('noise_level')}: must be in [0, 350], the levels the x4 "
                         "upscaler was trained on (20: the original demos' default; ~100 for generated images)")
    if not 1 <= get("steps") <= 1000:
        raise UsageError(f"--{prefix}steps {get('steps')}: must be between 1 and 1000 (50 is usual)")
    if not 0.0 <= get("eta") <= 1.0:
        raise UsageError(f"--{prefix}eta {get('eta')} is outside [0, 1] (0: deterministic DDIM)")
    if get("window") is not None and get("window") < 0:
        raise UsageError(f"--{prefix}window {get('window')}: 0 (off) or a positive side in pixels")
    if get("window_overlap") is not None and get("window_overlap") < 0:
        raise UsageError(f"--{prefix}window_overlap {get('window_overlap')}: must be >= 0")
    if get("window") and get("window_overlap") is not None and get("window_overlap") >= get("window"):
        raise UsageError(f"--{prefix}window_overlap must be smaller than --{prefix}window")
    if get("window_batch") < 1:
        raise UsageError(f"--{prefix}window_batch {get('window_batch')}: must be at least 1")


def upscaler_from_args(model, opt, scale, negative_prompt="", tiling="auto", prefix=""):
    """An ``Upscaler`` with the options of :func:`add_args`."""
    def get(name):
        return getattr(opt, prefix + name)
    return Upscaler(model, steps=get("steps"), scale=scale, noise_level=get("noise_level"), eta=get("eta"),
                    negative_prompt=negative_prompt, window=get("window"), overlap=get("window_overlap"),
                    window_batch=get("window_batch"), tiling=tiling)
