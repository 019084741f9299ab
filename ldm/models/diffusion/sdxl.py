"""SDXL base as a :class:`LatentDiffusion`: the same sampler, UNet class, VAE and ScaleCrafter code as SD 1.x/2.x.

What differs from SD, and where it lives:
* the UNet variant (vector conditioning through ``label_emb``, a transformer depth per level, no attention at
  the first level) is ``UNetModel`` with SDXL's kwargs (configs/stable-diffusion/sdxl-base-inference.yaml);
* the conditioning comes from a ``GeneralConditioner`` (``conditioner.embedders.N``: CLIP ViT-L/14 and
  OpenCLIP ViT-bigG/14 text, size/crop embeddings) as ``{"crossattn": context, "vector": y}``;
  :meth:`apply_model` passes ``context`` and ``y`` to the UNet (``conditioning_key: crossattn-adm``);
* the state-dict layout is that of ``sd_xl_base_1.0.safetensors``: ``model.diffusion_model.*``,
  ``denoiser.sigmas``, ``conditioner.embedders.*``, ``first_stage_model.*``, and no DDPM schedule buffers
  (they are still computed, as non-persistent buffers, for the sampler);
* the latent scale factor is 0.13025, and the VAE decodes in float32 outside autocast (its activations
  overflow float16).

Sampling is DDIM on the discrete schedule SDXL was trained with: 1000 steps, betas linear in sqrt(beta)
from 0.00085 to 0.012 (the SD schedule), eps-prediction. ``denoiser.sigmas`` holds the same schedule as
sqrt((1 - ᾱ_t) / ᾱ_t).
"""
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn

from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS, LatentDiffusion
from ldm.modules.diffusionmodules.util import make_beta_schedule
from ldm.util import instantiate_from_config

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


class DiscreteDenoiser(nn.Module):
    """Holds ``sigmas`` (float32, one per DDPM timestep), the persistent buffer SDXL files carry as
    ``denoiser.sigmas``. Sampling here does not read it; it is kept so the layout is the released one."""

    def __init__(self, sigmas):
        super().__init__()
        self.register_buffer("sigmas", torch.as_tensor(sigmas, dtype=torch.float32))


def sigmas_from_alphas_cumprod(alphas_cumprod):
    """sqrt((1 - ᾱ) / ᾱ): the ratio in float64, rounded to float32, the root in float32 (bit-identical to the
    released ``denoiser.sigmas``)."""
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    return torch.tensor((1.0 - ac) / ac, dtype=torch.float32) ** 0.5


class SDXLDiffusion(LatentDiffusion):
    """SDXL base. ``get_learned_conditioning(prompts)`` returns ``{"crossattn", "vector"}``; the size/crop
    conditioning comes from :meth:`set_size_conditioning` (or pass a batch dict with the sgm keys
    ``txt``, ``original_size_as_tuple``, ``crop_coords_top_left``, ``target_size_as_tuple``).

    ``zero_empty_prompt``: an empty prompt ("") gets all-zero text embeddings (context and the pooled part
    of ``y``) instead of the encoding of "". SDXL learned its unconditional branch that way (conditioning
    dropout zeroes the embeddings), and its reference sampler zeroes the unconditional text embeddings;
    a non-empty negative prompt is encoded as usual.
    """

    def __init__(self, conditioner_config, first_stage_config, unet_config, scale_factor=0.13025,
                 conditioning_key="crossattn-adm", zero_empty_prompt=True, text_key="txt", vae_fp32=True,
                 ckpt_path=None, ignore_keys=(), **kwargs):
        kwargs.pop("cond_stage_config", None)
        super().__init__(first_stage_config=first_stage_config, cond_stage_config="__is_unconditional__",
                         unet_config=unet_config, conditioning_key=conditioning_key, scale_factor=scale_factor,
                         **kwargs)
        if conditioning_key != "crossattn-adm":
            raise ValueError(f"SDXL needs conditioning_key: crossattn-adm (context and y), not {conditioning_key!r}")
        # submodule order = state-dict order of the released file: model, denoiser, conditioner, first_stage_model
        first_stage = self._modules.pop("first_stage_model")
        self.denoiser = DiscreteDenoiser(self._sigmas)
        del self._sigmas
        self.conditioner = instantiate_from_config(conditioner_config)
        self.first_stage_model = first_stage
        self.zero_empty_prompt = zero_empty_prompt
        self.text_key = text_key
        self.vae_fp32 = vae_fp32
        # its activations leave float16's range: float16 decoding redoes the tiles that overflow in float32
        self.first_stage_model.overflow_prone = bool(vae_fp32)
        self.size_conditioning = None
        if ckpt_path is not None:
            from ldm.checkpoint import load_checkpoint_into
            load_checkpoint_into(self, ckpt_path, ignore_keys=ignore_keys)

    def register_schedule(self, given_betas=None, beta_schedule="linear", timesteps=1000, linear_start=1e-4,
                          linear_end=2e-2, cosine_s=8e-3):
        super().register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                                  linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
        for name in SCHEDULE_BUFFERS:  # SDXL files do not carry them: computed, not saved
            self.register_buffer(name, getattr(self, name), persistent=False)
        betas = np.asarray(given_betas, dtype=np.float64) if given_betas is not None else \
            make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self._sigmas = sigmas_from_alphas_cumprod(np.cumprod(1.0 - betas))

    # ------------------------------------------------------------------------------------------
    # conditioning

    def set_size_conditioning(self, target_size, original_size=None, crop_coords_top_left=(0, 0)):
        """SDXL's micro-conditioning, in pixels, (height, width) and (top, left). The default original size is
        the target size and the default crop (0, 0): an uncropped image shot at the size being generated."""
        target = tuple(int(v) for v in target_size)
        original = tuple(int(v) for v in (original_size or target))
        crop = tuple(int(v) for v in crop_coords_top_left)
        for name, v in (("target_size", target), ("original_size", original), ("crop_coords_top_left", crop)):
            if len(v) != 2:
                raise ValueError(f"{name} must be two numbers, got {v}")
        self.size_conditioning = {"original_size_as_tuple": original, "crop_coords_top_left": crop,
                                  "target_size_as_tuple": target}
        return dict(self.size_conditioning)

    def conditioning_batch(self, prompts):
        """The conditioner's input for a list of prompts, with the size conditioning set on the model."""
        if self.size_conditioning is None:
            raise ValueError("SDXL conditions on the image size: call model.set_size_conditioning((H, W)) first "
                             "(scripts/txt2img.py does this from --H/--W)")
        device = self.betas.device
        batch = {self.text_key: list(prompts)}
        for key in self.conditioner.input_keys:
            if key != self.text_key:
                if key not in self.size_conditioning:
                    raise KeyError(f"no value for the conditioner input {key!r}")
                batch[key] = torch.tensor([self.size_conditioning[key]] * len(prompts), dtype=torch.float32,
                                          device=device)
        return batch

    def get_learned_conditioning(self, c):
        """Prompts (str or list of str) or an sgm-style batch dict -> {"crossattn": (B, 77, 2048), "vector": (B, 2816)}."""
        if isinstance(c, str):
            c = [c]
        batch = dict(c) if isinstance(c, Mapping) else self.conditioning_batch(c)
        zero = None
        prompts = batch.get(self.text_key)
        if self.zero_empty_prompt and prompts is not None and not isinstance(prompts, torch.Tensor):
            rows = torch.tensor([p == "" for p in prompts], dtype=torch.bool)
            if bool(rows.any()):
                zero = {self.text_key: rows}
        return self.conditioner(batch, force_zero_embeddings=zero)

    # ------------------------------------------------------------------------------------------
    # denoiser and first stage

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        if isinstance(cond, Mapping) and "crossattn" in cond:
            return self.model(x_noisy, t, c_crossattn=[cond["crossattn"]], c_adm=cond.get("vector"))
        return super().apply_model(x_noisy, t, cond)

    @torch.no_grad()
    def decode_first_stage(self, z, **tiling):
        """As for SD, with autocast off: SDXL's VAE overflows in float16. Keep the VAE's weights in float32
        (scripts/txt2img.py --precision half does); ``AutoencoderKL.decode_auto`` decodes in float16 on CUDA
        and redoes every tile that overflows in float32 (``overflow_prone``)."""
        if not self.vae_fp32:
            return super().decode_first_stage(z, **tiling)
        dtype = next(self.first_stage_model.parameters()).dtype
        with torch.autocast(device_type=z.device.type, enabled=False):
            return super().decode_first_stage(z.to(dtype), **tiling)
