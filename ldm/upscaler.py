"""Sampling with the SD 2.x x4 upscaler (``configs/stable-diffusion/x4-upscaling.yaml``; the model classes are in
``ldm/modules/diffusionmodules/upscaling.py``).

``Upscaler``: DDIM (or any sampler of ``ldm/samplers``) on the v-parameterized model, classifier-free guidance whose unconditional branch keeps the same
noised image and level and only swaps the prompt (as the original demo scripts do), optional overlapping windows
(window-wise guidance, the low-resolution crop matching each window) and tiled VAE decoding for large outputs. The
command-line options are shared by ``scripts/upscale.py`` and ``scripts/txt2img.py --method sdsr``.
"""
import torch
import torch.nn.functional as F

from ldm.modules.diffusionmodules.upscaling import AUTO_TILING_LATENT_PIXELS, UPSCALER_CONFIG, UPSCALER_TARGET  # noqa: F401
from ldm.samplers import SAMPLERS, SPACING_CHOICES, make_sampler, takes_eta
from ldm.windows import MultiDiffusionGuidance


def is_upscaler_config(config):
    """True for a config (whole file or its ``model`` node) of ``LatentUpscaleDiffusion``."""
    node = config.model if "model" in config else config
    return str(node.get("target", "")) == UPSCALER_TARGET


def WindowedUpscaleGuidance(window, stride, window_batch=4):
    """``guidance``: the latent denoised in overlapping windows, each with its crop of the low-resolution image,
    the guided predictions averaged where windows overlap: the window-wise guidance of ``ldm/windows.py``
    (MultiDiffusion's, which crops the "c_concat" condition per window; DDIM is linear in the prediction, so this
    averages the per-window updates). Memory of one UNet call: ``window_batch`` windows × 2 (guidance) × batch."""
    return MultiDiffusionGuidance(window, stride, window_batch)


def resize_images(x, hw):
    """(B, 3, h, w) images in [-1, 1] resized to ``hw`` = (H, W): antialiased bicubic, clamped."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x.float(), size=tuple(int(v) for v in hw), mode="bicubic", antialias=True,
                         align_corners=False).clamp(-1.0, 1.0)


class Upscaler:
    """Upscale a batch of low-resolution images (B, 3, h, w) in [-1, 1] with a ``LatentUpscaleDiffusion``.

    * ``steps``, ``eta``, ``scale``: the sampler's steps and noise, classifier-free guidance (``scale`` 1: no
      unconditional branch);
    * ``sampler``, ``spacing``: a sampler of ``ldm/samplers`` (DDIM, as the original scripts, by default) and the
      timestep spacing of the others; ``eta`` None is DDIM's 0 (the original scripts') and the full noise (1) of
      euler_a / dpmpp_2m_sde;
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

    def __init__(self, model, steps=50, scale=9.0, noise_level=20, eta=None, negative_prompt="", window=None,
                 overlap=None, window_batch=4, tiling="auto", sampler="ddim", spacing=None):
        if not hasattr(model, "low_scale_model"):
            raise ValueError(f"{type(model).__name__} is not an upscaler (LatentUpscaleDiffusion, "
                             f"{UPSCALER_CONFIG})")
        self.model = model
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
        noisy = takes_eta(sampler)
        if eta is None:
            eta = 0.0 if sampler == "ddim" or not noisy else 1.0
        elif not noisy and eta:
            raise ValueError(f"eta {eta:g}: the sampler {sampler} draws no noise (eta is for ddim, euler_a and "
                             "dpmpp_2m_sde)")
        if spacing is not None and sampler == "ddim":
            raise ValueError(f"spacing {spacing}: DDIM takes its own uniform timesteps; spacing is for the other "
                             "samplers")
        self.sampler, self.spacing = sampler, spacing
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

    def make_sampler(self):
        options = {} if self.spacing is None else {"spacing": self.spacing}
        if takes_eta(self.sampler):
            options["eta"] = self.eta
        return make_sampler(self.sampler, self.model, **options)

    def describe(self):
        return {**({} if self.sampler == "ddim" else {"sampler": self.sampler, "spacing": self.spacing}),
                "steps": self.steps, "scale": self.scale, "eta": self.eta, "noise_level": self.noise_level,
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
        sampler = self.make_sampler()
        if x_T is not None:  # the noise, mapped to the sampler's starting latent (DDIM: the noise itself)
            x_T = sampler.start_latent(x_T, self.steps)
        samples = sampler.run(
            self.steps, cond, uncond, self.scale, batch_size=b, shape=(model.channels, hp, wp), guidance=guidance,
            generator=generator, x_T=x_T, disable_progress=not progress, callback=callback)
        # the VAE decoder stays in float32, also under autocast (it breaks in half precision, as the original
        # config notes)
        with torch.autocast(device.type, enabled=False):
            x = model.decode_first_stage(samples.float(), **plan["tiling"])
        x = x[:, :, :h * self.factor, :w * self.factor]
        return resize_images(x, out_hw) if out_hw is not None else x


def load_upscaler(config_path, ckpt, device="cpu", allow_unsafe=False, use_ema=True, trust=False,
                  flag="--config", ckpt_flag="--ckpt", loader=None, weights_dtype=None):
    """The upscaler model from its config and checkpoint; a config of another kind is a UsageError naming
    the right one, a checkpoint of another family a CheckpointError (ldm.checkpoint) naming its config.
    ``weights_dtype``: the loader casts the UNet and text encoder to it before moving the model to ``device``."""
    from pathlib import Path

    from ldm.checkpoint import check_checkpoint_file, load_model_from_config
    from ldm.errors import UsageError
    config = load_upscaler_config(config_path, flag, trust=trust)
    if ckpt is None:
        raise UsageError(f"{ckpt_flag} is required: the x4 upscaler checkpoint (x4-upscaler-ema.ckpt, see "
                         "checkpoints/README.md)")
    check_checkpoint_file(ckpt)
    return (loader or load_model_from_config)(config, ckpt, device=device, allow_unsafe=allow_unsafe,
                                              use_ema=use_ema, config_name=str(Path(config_path)), trust=trust,
                                              **({"weights_dtype": weights_dtype} if weights_dtype is not None
                                                 else {}))


def load_upscaler_config(config_path, flag="--config", trust=False):
    """The config file (read and target-checked by ``ldm.util.load_config_file``), checked to be an upscaler's
    (UsageError otherwise)."""
    from pathlib import Path

    from ldm.errors import UsageError
    from ldm.util import load_config_file
    path = Path(config_path)
    if not path.is_file():
        from ldm.util import missing_file_reason
        raise UsageError(f"{flag} {config_path}: {missing_file_reason(path)} (the upscaler's config is "
                         f"{UPSCALER_CONFIG})")
    config = load_config_file(path, trust=trust, flag=flag)
    if not is_upscaler_config(config):
        node = config.model if "model" in config else config
        raise UsageError(f"{flag} {config_path} is not an upscaler config (its target is "
                         f"{node.get('target')}, not {UPSCALER_TARGET}); use {UPSCALER_CONFIG}")
    return config


# --------------------------------------------------------------------------------------------------
# 3. command-line options
# --------------------------------------------------------------------------------------------------

def add_args(group, prefix="", defaults=None):
    """The upscaler's sampling options on an argparse group, named ``--{prefix}noise_level`` etc.;
    ``defaults`` overrides the defaults (dict by option name without prefix)."""
    d = {"noise_level": 20, "steps": 50, "eta": None, "window": None, "window_overlap": None, "window_batch": 4}
    d.update(defaults or {})
    group.add_argument(f"--{prefix}noise_level", type=int, default=d["noise_level"],
                       help="noise augmentation level of the low-resolution image, 0..350 (the original demos use "
                            "20; the original README recommends about 100 for generated images)")
    group.add_argument(f"--{prefix}steps", type=int, default=d["steps"], help="upscaler sampling steps")
    group.add_argument(f"--{prefix}sampler", choices=list(SAMPLERS), default="ddim",
                       help="the upscaler's sampler (default ddim, as the original scripts; the others: see "
                            "--sampler of scripts/txt2img.py)")
    group.add_argument(f"--{prefix}spacing", choices=SPACING_CHOICES, default=None,
                       help="timestep spacing of the upscaler's sampler when it is not ddim (default: the sampler's)")
    from ldm.util import finite_float
    group.add_argument(f"--{prefix}eta", type=finite_float, default=d["eta"],
                       help="the upscaler sampler's noise in [0, 1]: DDIM's eta (default 0), or that of euler_a / "
                            "dpmpp_2m_sde (default 1)")
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
    from ldm.errors import UsageError

    def get(name):
        return getattr(opt, prefix + name)
    if not 0 <= get("noise_level") <= 350:
        raise UsageError(f"--{prefix}noise_level {get('noise_level')}: must be in [0, 350], the levels the x4 "
                         "upscaler was trained on (20: the original demos' default; ~100 for generated images)")
    if not 1 <= get("steps") <= 1000:
        raise UsageError(f"--{prefix}steps {get('steps')}: must be between 1 and 1000 (50 is usual)")
    name, eta, spacing = get("sampler"), get("eta"), get("spacing")
    if eta is not None and not 0.0 <= eta <= 1.0:
        raise UsageError(f"--{prefix}eta {eta} is outside [0, 1] (0: deterministic DDIM, or no ancestral noise)")
    if eta and not takes_eta(name):
        raise UsageError(f"--{prefix}eta {eta:g}: --{prefix}sampler {name} draws no noise; the noise is for ddim, "
                         "euler_a and dpmpp_2m_sde")
    if spacing is not None and name == "ddim":
        raise UsageError(f"--{prefix}spacing {spacing}: DDIM takes its own uniform timesteps; --{prefix}spacing is "
                         f"for the other --{prefix}sampler values")
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
                    window_batch=get("window_batch"), tiling=tiling, sampler=get("sampler"), spacing=get("spacing"))
