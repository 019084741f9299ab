"""First-stage models: the KL autoencoder of Stable Diffusion, and an identity stage for pixel-space models."""
import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config


class AutoencoderKL(nn.Module):
    """Inference part of the original ``AutoencoderKL`` (training losses are not part of this project).

    ``lossconfig`` is instantiated as in the original (inference configs use ``torch.nn.Identity``) so
    that state-dict layouts match.
    """

    def __init__(self, ddconfig, lossconfig=None, embed_dim=4, ckpt_path=None, ignore_keys=(), image_key="image",
                 colorize_nlabels=None, monitor=None, ema_decay=None, learn_logvar=False, **ignored):
        super().__init__()
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig) if lossconfig is not None else nn.Identity()
        if not ddconfig["double_z"]:
            raise ValueError("AutoencoderKL needs double_z: true (mean and log-variance)")
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            from ldm.checkpoint import load_state_dict_file
            sd = load_state_dict_file(ckpt_path)
            sd = {k: v for k, v in sd.items() if not any(k.startswith(ik) for ik in ignore_keys)}
            self.load_state_dict(sd, strict=False)

    def encode(self, x):
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def decode_tiled(self, z, tile_size=64, overlap=24, sync_gn=True, **kwargs):
        """``decode(z)`` tile by tile with bounded memory; see ``ldm.modules.tiled_vae.tiled_decode``.

        tile_size, overlap: latent pixels. With sync_gn (default) every GroupNorm uses whole-image
        statistics and each stage fetches its exact halo, so the result equals ``decode(z)`` up to rounding.
        Extra keyword arguments (exact, offload, device_budget, blend, ...) go to ``tiled_decode``.
        """
        from ldm.modules.tiled_vae import tiled_decode
        return tiled_decode(self.decoder, z, self.post_quant_conv, tile_size=tile_size, overlap=overlap,
                            sync_gn=sync_gn, **kwargs)

    def encode_tiled(self, x, tile_size=64, overlap=24, sync_gn=True, **kwargs):
        """``encode(x)`` tile by tile (tile_size and overlap in latent pixels); returns the posterior."""
        from ldm.modules.tiled_vae import tiled_encode
        moments = tiled_encode(self.encoder, x, self.quant_conv, tile_size=tile_size, overlap=overlap,
                               sync_gn=sync_gn, **kwargs)
        return DiagonalGaussianDistribution(moments)

    def forward(self, input, sample_posterior=True):
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class IdentityFirstStage(nn.Module):
    """First stage of a pixel-space model: latents are the images themselves (f = 1)."""

    def __init__(self, *args, vq_interface=False, **kwargs):
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x, *args, **kwargs):
        return x

    def decode(self, x, *args, **kwargs):
        return x

    def forward(self, x, *args, **kwargs):
        return x
