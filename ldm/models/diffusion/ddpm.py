"""``LatentDiffusion``: the Stable Diffusion model container (inference subset, plus the simple
training loss the demo model needs).

State-dict layout is the original's: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*``
(VAE), ``cond_stage_model.*`` (text encoder) and the 12 DDPM schedule buffers at the root. Unlike the
original this is a plain ``nn.Module``: inference does not need pytorch-lightning, and the training
entry point (``main.py``) wraps it in a LightningModule.
"""
import warnings
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import default, instantiate_from_config

SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def disabled_train(self, mode=True):
    """Frozen submodules stay in eval mode whatever ``.train()`` says."""
    return self


def room_for_decoding(model, z, tiling):
    """The UNet's weights wait in host memory while the latent is decoded, when the decoder would otherwise
    have to keep some of its inter-stage tensors in host memory (or would not fit): copying the weights back
    (SDXL's UNet, 4.8 GiB in float16: a fraction of a second) costs far less than decoding over PCIe. The
    host copy is kept for the next time (``ldm.memory.HostWeights``)."""
    from contextlib import nullcontext
    from ldm import memory
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    weight = next(unet.parameters(), None) if isinstance(unet, nn.Module) else None
    if weight is None or weight.device.type != "cuda" or z.device.type != "cuda" or \
            not hasattr(model.first_stage_model, "plan_decoding"):
        return nullcontext()
    plan = model.first_stage_model.plan_decoding(tuple(z.shape), z.device, memory.available_bytes(z.device),
                                                **tiling)
    if not plan.tiled or plan.offload is False:
        return nullcontext()
    key = (weight.dtype, weight.device)
    cached = model.__dict__.get("_parked_unet")
    if cached is None or cached[0] != key:
        model.__dict__["_parked_unet"] = cached = (key, memory.HostWeights(unet, weight.device))
    else:
        cached[1].drop()
    return cached[1].lent_back()


class DiffusionWrapper(nn.Module):
    """Routes the conditioning to the UNet the way ``conditioning_key`` says (``model.diffusion_model``)."""

    def __init__(self, diff_model_config, conditioning_key):
        super().__init__()
        self.diffusion_model = instantiate_from_config(diff_model_config)
        if conditioning_key not in (None, "concat", "crossattn", "hybrid", "adm", "hybrid-adm", "crossattn-adm"):
            raise ValueError(f"unknown conditioning_key {conditioning_key!r}")
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat=None, c_crossattn=None, c_adm=None):
        key = self.conditioning_key
        if key is None:
            return self.diffusion_model(x, t)
        if key == "concat":
            return self.diffusion_model(torch.cat([x] + c_concat, dim=1), t)
        if key == "crossattn":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))
        if key == "hybrid":
            return self.diffusion_model(torch.cat([x] + c_concat, dim=1), t, context=torch.cat(c_crossattn, 1))
        if key == "hybrid-adm":
            return self.diffusion_model(torch.cat([x] + c_concat, dim=1), t, context=torch.cat(c_crossattn, 1),
                                        y=c_adm)
        if key == "crossattn-adm":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1), y=c_adm)
        return self.diffusion_model(x, t, y=c_adm[0] if isinstance(c_adm, list) else c_adm)


class LatentDiffusion(nn.Module):
    def __init__(self, first_stage_config, cond_stage_config, unet_config, num_timesteps_cond=None,
                 cond_stage_key="image", cond_stage_trainable=False, conditioning_key=None, scale_factor=1.0,
                 scale_by_std=False, timesteps=1000, beta_schedule="linear", linear_start=1e-4, linear_end=2e-2,
                 cosine_s=8e-3, given_betas=None, parameterization="eps", use_ema=True, v_posterior=0.0,
                 image_size=256, channels=3, first_stage_key="image", log_every_t=100, monitor=None,
                 ckpt_path=None, ignore_keys=(), loss_type="l2", cond_stage_forward=None, **ignored):
        super().__init__()
        if parameterization not in ("eps", "x0", "v"):
            raise ValueError(f"parameterization must be eps, x0 or v, not {parameterization!r}")
        self.parameterization = parameterization
        self.num_timesteps_cond = default(num_timesteps_cond, 1)
        self.cond_stage_key = cond_stage_key
        self.first_stage_key = first_stage_key
        self.cond_stage_trainable = cond_stage_trainable
        self.conditioning_key = conditioning_key
        self.image_size = image_size
        self.channels = channels
        self.log_every_t = log_every_t
        self.loss_type = loss_type
        self.v_posterior = v_posterior
        self.cond_stage_forward = cond_stage_forward
        if monitor is not None:
            self.monitor = monitor
        self.use_ema = use_ema  # EMA weights in a checkpoint are applied by the loader (ldm.checkpoint)
        self.scale_by_std = scale_by_std
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        else:
            self.scale_factor = scale_factor

        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                               linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self.first_stage_model.eval()
        self.first_stage_model.train = partial(disabled_train, self.first_stage_model)
        for p in self.first_stage_model.parameters():
            p.requires_grad = False
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        if self.cond_stage_model is not None and not cond_stage_trainable:
            self.cond_stage_model.eval()
            self.cond_stage_model.train = partial(disabled_train, self.cond_stage_model)
            for p in self.cond_stage_model.parameters():
                p.requires_grad = False
        if ckpt_path is not None:
            from ldm.checkpoint import load_checkpoint_into
            load_checkpoint_into(self, ckpt_path, ignore_keys=ignore_keys)

    # ------------------------------------------------------------------------------------------
    # schedule

    def register_schedule(self, given_betas=None, beta_schedule="linear", timesteps=1000, linear_start=1e-4,
                          linear_end=2e-2, cosine_s=8e-3):
        betas = np.asarray(given_betas, dtype=np.float64) if given_betas is not None else \
            make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_timesteps = int(betas.shape[0])
        self.linear_start, self.linear_end = linear_start, linear_end
        to_torch = partial(torch.tensor, dtype=torch.float32)
        v = self.v_posterior
        posterior_variance = (1 - v) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod) + v * betas
        values = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            # the variance is 0 at t=0, hence the clip before the log
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        }
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, to_torch(values[name]))
        # the original computes these weights from the float32 buffers
        if self.parameterization == "eps":
            lvlb = self.betas ** 2 / (2 * self.posterior_variance * to_torch(alphas) * (1 - self.alphas_cumprod))
        elif self.parameterization == "x0":
            lvlb = 0.5 * torch.sqrt(self.alphas_cumprod) / (2.0 * 1 - self.alphas_cumprod)
        else:  # v: uniform weights
            lvlb = torch.ones_like(self.betas)
        lvlb = lvlb.clone()
        lvlb[0] = lvlb[1]  # inf at t=0
        self.register_buffer("lvlb_weights", lvlb, persistent=False)

    # ------------------------------------------------------------------------------------------
    # conversions between parameterizations

    def predict_start_from_noise(self, x_t, t, noise):
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def predict_start_from_z_and_v(self, x_t, t, v):
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)

    def predict_eps_from_z_and_v(self, x_t, t, v):
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * v
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t)

    def q_sample(self, x_start, t, noise=None):
        noise = default(noise, lambda: torch.randn_like(x_start))
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def get_v(self, x, noise, t):
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x.shape) * noise
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * x)

    # ------------------------------------------------------------------------------------------
    # first and conditioning stages

    def get_learned_conditioning(self, c):
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        if hasattr(self.cond_stage_model, "encode") and callable(self.cond_stage_model.encode):
            c = self.cond_stage_model.encode(c)
            return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c
        return self.cond_stage_model(c)

    @torch.no_grad()
    def decode_first_stage(self, z, **tiling):
        """Latents -> images in [-1, 1]. ``tiling`` (tile_size, overlap, sync_gn) asks for tiled decoding; without
        it the KL autoencoder decodes in one piece or in tiles, whichever fits the free memory
        (``AutoencoderKL.decode_auto``, ``ldm/modules/vae_memory.py``)."""
        z = z / self.scale_factor
        fs = self.first_stage_model
        if hasattr(fs, "decode_auto") and not {"decode", "decode_tiled"} & set(vars(fs)):  # not patched (FreeScale
            with room_for_decoding(self, z, tiling):  # --fs_release_tiling replaces them on the instance)
                return fs.decode_auto(z, **tiling)
        if tiling and hasattr(self.first_stage_model, "decode_tiled"):
            return self.first_stage_model.decode_tiled(z, **tiling)
        if tiling:
            raise ValueError(f"{type(self.first_stage_model).__name__} has no tiled decoding")
        try:
            return self.first_stage_model.decode(z)
        except torch.OutOfMemoryError:
            # a one-piece decode of a large image can need far more memory than sampling did (SDXL 2048²: about
            # 50 GiB in float32); rather than lose the finished latent, decode it in tiles with synchronized
            # GroupNorm, which gives the same image up to rounding
            if not hasattr(self.first_stage_model, "decode_tiled"):
                raise
            if z.is_cuda:
                torch.cuda.empty_cache()
            warnings.warn(f"out of memory decoding a {z.shape[-2]}x{z.shape[-1]} latent in one piece; decoding it in "
                          "tiles with synchronized GroupNorm instead (the same image up to rounding; pass "
                          "--tiled_decoding to start that way)", ResourceWarning, stacklevel=2)
            return self.first_stage_model.decode_tiled(z, sync_gn=True)

    @torch.no_grad()
    def encode_first_stage(self, x):
        """Images -> the first stage's posterior; in tiles with synchronized GroupNorm (the same result up to
        rounding) when the one-piece encoder would not fit the free memory."""
        fs = self.first_stage_model
        if hasattr(fs, "encode_tiled") and hasattr(fs, "encoder") and "encode" not in vars(fs):
            from ldm import memory
            from ldm.modules.vae_memory import plan_encode
            # under CUDA autocast the activations mix float16 and float32: count them as float32
            autocast = x.device.type == "cuda" and torch.is_autocast_enabled("cuda")
            dtype = torch.float32 if autocast or not x.is_floating_point() else x.dtype
            tile = plan_encode(fs, tuple(x.shape), dtype, memory.available_bytes(x.device), x.device.type)
            if tile is not None:
                return fs.encode_tiled(x, tile_size=tile)
        return fs.encode(x)

    def get_first_stage_encoding(self, encoder_posterior, generator=None):
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator=generator)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise NotImplementedError(f"encoder_posterior of type '{type(encoder_posterior)}' not yet implemented")
        return self.scale_factor * z

    # ------------------------------------------------------------------------------------------
    # denoiser

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        if not isinstance(cond, dict):
            if not isinstance(cond, list):
                cond = [cond]
            key = "c_concat" if self.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        return self.model(x_noisy, t, **cond)

    def training_loss(self, x_start, cond, t=None, noise=None):
        """The simple denoising loss (L2 on the model's target), averaged over the batch."""
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x_start.shape[0],), device=x_start.device).long()
        noise = default(noise, lambda: torch.randn_like(x_start))
        x_noisy = self.q_sample(x_start, t, noise)
        out = self.apply_model(x_noisy, t, cond)
        target = {"eps": noise, "x0": x_start, "v": self.get_v(x_start, noise, t)}[self.parameterization]
        if self.loss_type == "l1":
            return (out - target).abs().mean()
        return F.mse_loss(out, target)

    @contextmanager
    def ema_scope(self, context=None):
        # EMA weights are swapped in at load time; kept for scripts written against the original API
        yield


class LatentUpscaleDiffusion(LatentDiffusion):
    """The x4 upscaler of Stable Diffusion 2.x (``configs/stable-diffusion/x4-upscaling.yaml``).

    A ``LatentDiffusion`` with ``conditioning_key: hybrid-adm`` and a frozen ``low_scale_model``
    (``ldm.modules.diffusionmodules.upscaling``) that noises the low-resolution image; the condition is
    ``{"c_concat": [noised image], "c_crossattn": [text], "c_adm": noise level}``: the UNet input is the latent
    followed by the noised image (channels 4 + 3) and the level is its class label. The low-scale model's
    schedule buffers follow the rest of the state dict (``low_scale_model.betas``, ...), as in the original.
    """

    def __init__(self, *args, low_scale_config, low_scale_key="LR", noise_level_key=None, **kwargs):
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        super().__init__(*args, **kwargs)
        if self.cond_stage_trainable:
            raise ValueError("LatentUpscaleDiffusion needs cond_stage_trainable: false")
        self.low_scale_model = instantiate_from_config(low_scale_config).eval()
        self.low_scale_model.train = partial(disabled_train, self.low_scale_model)
        for p in self.low_scale_model.parameters():
            p.requires_grad = False
        self.low_scale_key = low_scale_key
        self.noise_level_key = noise_level_key
        if hasattr(self.first_stage_model, "compute_dtype"):  # "the decoder seems to break in half precision" (the
            self.first_stage_model.compute_dtype = torch.float32  # original config's note): float32, also on CUDA
        if ckpt_path is not None:
            from ldm.checkpoint import load_checkpoint_into
            load_checkpoint_into(self, ckpt_path, ignore_keys=ignore_keys)

    @property
    def upscale_factor(self):
        """Output pixels per latent (= low-resolution) pixel: the first stage's downsampling factor (4)."""
        return 2 ** (self.first_stage_model.decoder.num_resolutions - 1)

    @property
    def unet_multiple(self):
        """What the latent sides must be a multiple of for the UNet's downsamplings (8)."""
        return 2 ** (len(self.model.diffusion_model.channel_mult) - 1)

    def low_scale_conditioning(self, x_low, noise_level=None, noise=None, generator=None):
        """(noised low-resolution image, noise level) for ``x_low`` (B, 3, h, w) in [-1, 1]."""
        return self.low_scale_model(x_low, noise_level, noise=noise, generator=generator)

    def upscale_conditioning(self, c, x_low, noise_level=None, noise=None, generator=None):
        """The sampler's condition for text embeddings ``c`` and low-resolution images ``x_low``."""
        x_aug, level = self.low_scale_conditioning(x_low, noise_level, noise=noise, generator=generator)
        return {"c_concat": [x_aug], "c_crossattn": [c], "c_adm": level}
