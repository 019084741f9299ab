"""First-stage models: the KL autoencoder of Stable Diffusion, and an identity stage for pixel-space models."""
import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config


def _cast_copy(module, dtype):
    """A copy of ``module`` with its floating-point parameters and buffers in ``dtype``, frozen (new tensors are
    put in place rather than converted in place, which also works on fake tensors)."""
    import copy
    memo = {}  # deepcopy takes the converted tensors from here instead of copying the originals
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(p.detach().to(dtype) if p.is_floating_point() else p.detach().clone(),
                                           requires_grad=False)
        for b in m._buffers.values():
            if b is not None and id(b) not in memo:
                memo[id(b)] = b.to(dtype) if b.is_floating_point() else b.clone()
    return copy.deepcopy(module, memo)


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

    # Decoding by memory plan (``decode_auto``). ``overflow_prone``: the VAE's activations leave float16's range
    # (SDXL's VAE does): float16 decoding then runs stage by stage and redoes every tile that overflows in
    # float32. ``compute_dtype``: None = float16 on CUDA, the weights' dtype elsewhere.
    overflow_prone = False
    compute_dtype = None

    def _decoder_in(self, dtype):
        """(decoder, post_quant_conv) with weights in ``dtype``: the modules themselves, or a cached copy (not a
        submodule: the state dict is unchanged), remade when the weights moved or changed dtype."""
        weight = self.post_quant_conv.weight
        if weight.dtype == dtype:
            return self.decoder, self.post_quant_conv
        # remade when the weights move, change dtype or are written in place (their version counter)
        key = (dtype, weight.device, id(weight), weight._version, self.decoder.conv_out.weight._version)
        cache = self.__dict__.get("_cast_copies")
        if cache is None or cache[0] != key:
            self.__dict__["_cast_copies"] = cache = (key, _cast_copy(self.decoder, dtype),
                                                     _cast_copy(self.post_quant_conv, dtype))
        return cache[1], cache[2]

    def decode_dtype(self, device):
        """The dtype ``decode_auto`` computes in on ``device``."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        if torch.device(device).type == "cuda":
            return torch.float16
        return self.post_quant_conv.weight.dtype

    def plan_decoding(self, z_shape, device, available, dtype=None, **tiling):
        """The ``ldm.modules.vae_memory.DecodePlan`` of ``decode_auto`` for a latent of ``z_shape`` on ``device``
        with ``available`` bytes free (``tiling``: the explicit options)."""
        from ldm.modules import vae_memory
        device = torch.device(device)
        dtype = dtype or self.decode_dtype(device)
        explicit = {k: v for k, v in tiling.items() if k != "tile_size"}
        exact = explicit.get("sync_gn", True) and explicit.get("exact", True)
        guarded = dtype == torch.float16 and self.overflow_prone and exact
        return vae_memory.plan_decode(self, tuple(z_shape), dtype, available, device.type,
                                      tiled=True if tiling else None, tile_size=tiling.get("tile_size"),
                                      working_dtype=torch.float32 if guarded else None, staged=guarded,
                                      explicit=explicit)

    @torch.no_grad()
    def decode_auto(self, z, available=None, **tiling):
        """``decode(z)`` in one piece or in tiles, whichever fits the free memory (``ldm.modules.vae_memory``);
        returns float32 images.

        ``tiling`` (the --tiled_decoding options: tile_size, overlap, sync_gn, offload, ...) asks for tiles; a
        missing tile_size is chosen from the memory. ``available``: bytes the decode may use (default: what
        ``ldm.memory.available_bytes`` finds on z's device). Float16 on CUDA (``compute_dtype``): a result
        that is not finite is decoded again in float32; an ``overflow_prone`` VAE checks every tile of every
        stage instead and redoes the ones that overflow in float32 (``tiled_decode``'s ``fallback``; a single
        tile covering the latent when one piece fits). An out-of-memory error (the estimate leaves out cuDNN
        workspaces and fragmentation) is retried once in the smallest tiles with host-memory stores.
        ``self.last_plan`` holds the plan used (with ``report``: the tiles redone in float32).
        """
        import warnings
        from ldm import memory
        from ldm.modules import tiled_vae, vae_memory
        device = z.device
        if available is None:
            available = memory.available_bytes(device)
        explicit = {k: v for k, v in tiling.items() if k != "tile_size"}

        def make_plan(dtype):
            return self.plan_decoding(tuple(z.shape), device, available, dtype, **tiling)

        def run(p):
            dec, pq = self._decoder_in(p.dtype)
            if p.staged:  # float16 with a float32 redo of the stage-tiles that overflow (the latent stays float32:
                dec32, pq32 = self._decoder_in(torch.float32)  # each tile is cast after a range check)
                kw = {k: v for k, v in p.tiling_kwargs().items() if k not in ("sync_gn", "exact")}
                return tiled_vae.tiled_decode(dec, z.float(), pq, fallback=(dec32, pq32), report=p.report, **kw)
            zc = z.to(p.dtype)
            if not p.tiled:
                return dec(pq(zc))
            return tiled_vae.tiled_decode(dec, zc, pq, **p.tiling_kwargs())

        plan = make_plan(self.decode_dtype(device))
        if not plan.fits:
            warnings.warn(f"decoding a {z.shape[-2]}x{z.shape[-1]} latent may not fit the free memory: "
                          f"{plan.describe()}", ResourceWarning, stacklevel=2)
        self.last_plan = plan
        with torch.autocast(device_type=device.type, enabled=False):
            try:
                x = run(plan)
            except torch.OutOfMemoryError:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                retry = vae_memory.DecodePlan(True, plan.dtype, 0, available, vae_memory.TILE_SIZES[-1],
                                              offload=True, staged=plan.staged, explicit=explicit,
                                              reason="retry after running out of memory")
                warnings.warn(f"out of memory decoding a {z.shape[-2]}x{z.shape[-1]} latent ({plan.describe()}); "
                              "decoding it again in the smallest tiles with synchronized GroupNorm and the "
                              "inter-stage tensors in host memory (the same image up to rounding)",
                              ResourceWarning, stacklevel=2)
                self.last_plan = plan = retry
                x = run(plan)
            if plan.dtype != torch.float32 and not plan.staged and not tiled_vae._is_fake(x) \
                    and not bool(torch.isfinite(x).all()):
                warnings.warn(f"{str(plan.dtype).replace('torch.', '')} decoding of a {z.shape[-2]}x{z.shape[-1]} "
                              "latent overflowed; decoding it again in float32", ResourceWarning, stacklevel=2)
                del x
                self.last_plan = plan = make_plan(torch.float32)
                x = run(plan)
        return x.float()

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
