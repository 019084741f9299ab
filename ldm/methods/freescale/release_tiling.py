"""The VAE tiling of FreeScale's release, as an option of this repository's FreeScale (preset key
``vae_tiling: release``).

What the release does (ali-vilab/FreeScale, every commit up to d5a2256, ``pipeline_freescale.py``: its
``__init__`` calls ``self.vae.enable_tiling()``; pinned diffusers 0.20.2): every ``vae.encode`` of an image
larger than one tile and every ``vae.decode`` of a latent larger than one tile runs diffusers'
``AutoencoderKL.tiled_encode`` / ``tiled_decode``. In FreeScale that is the decode of each stage's latent above
1024 px, the encode of the resized image of every stage after the first, and the final decodes. The geometry
(diffusers ``AutoencoderKL``: ``tile_sample_min_size`` = the VAE config's ``sample_size``, 1024 for SDXL;
``tile_latent_min_size`` = that over 2^(levels−1), 128; ``tile_overlap_factor`` 0.25):

* the input is cut into tiles of ``tile`` (pixels for encoding, latent pixels for decoding) starting every
  ``int(tile · 0.75)`` along each axis (tiles at the far edges are cut short by the image border);
* each tile goes through the whole encoder (+ ``quant_conv``: the posterior's moments) or the whole decoder
  (after ``post_quant_conv``) on its own — every GroupNorm sees only its tile;
* tiles are taken in raster order; each one's first ``e`` rows are cross-faded with the last ``e`` rows of
  the (already blended) tile above, and its first ``e`` columns with the (already blended) tile to its left:
  ``b[k] = a[−e + k]·(1 − k/e) + b[k]·k/e`` for k = 0 … e − 1, where e = ``int(out_tile · 0.25)`` (32
  latent pixels when encoding, 256 pixels when decoding), reduced to the smaller tile's extent at the edges;
* each tile is then cropped to its first ``out_tile − e`` rows and columns and the crops are concatenated.

Encoding blends the moments (mean and log-variance) before the posterior is formed; the cascade then draws
its sample as usual. This repository's own tiled VAE (``ldm/modules/tiled_vae.py``, ``--tiled_decoding
--sync_gn``) instead synchronizes GroupNorm over the tiles and gives the whole-image result up to rounding,
and without tiling the VAE runs on the whole image; both differ from what the release computes above one tile
(docs/freescale.md). This module is written from the description above, not from the diffusers code.

``install(model, tile_px, f)`` puts the release's behaviour on a LatentDiffusion's autoencoder for the rest of
the process (its ``encode``/``decode`` and their tiled variants): ``scripts/txt2img.py`` decodes the final
image outside the cascade, and a run samples with one method, so the whole run then encodes and decodes as
the release does. ``remove(model)`` undoes it.
"""
import torch

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

MODES = ("ours", "release")   # FreeScaleSettings.vae_tiling
OVERLAP = 0.25                # diffusers AutoencoderKL.tile_overlap_factor


def tile_starts(size, tile, overlap=OVERLAP):
    """Start offsets of the tiles along one axis of length ``size`` (the last ones may be cut short)."""
    stride = int(tile * (1 - overlap))
    if stride < 1:
        raise ValueError(f"tile {tile} with overlap {overlap} leaves no stride")
    return list(range(0, int(size), stride))


def _cross_fade(prev, cur, extent, dim):
    """Blend the first ``extent`` slices of ``cur`` along ``dim`` (in place) with the last ones of ``prev``."""
    e = min(prev.shape[dim], cur.shape[dim], int(extent))
    if e <= 0:
        return cur
    shape = [1] * cur.dim()
    shape[dim] = e
    w = (torch.arange(e, device=cur.device, dtype=torch.float64) / e).to(cur.dtype).reshape(shape)
    head = cur.narrow(dim, 0, e)
    tail = prev.narrow(dim, prev.shape[dim] - e, e)
    head.copy_(tail * (1 - w) + head * w)
    return cur


def blended_tiles(x, fn, tile, out_tile, overlap=OVERLAP):
    """``fn`` over the overlapping ``tile``² tiles of ``x`` (N, C, H, W), each output tile ``out_tile``² (fewer at
    the borders), cross-faded and cropped as the release's VAE tiling does; returns the assembled output."""
    extent = int(out_tile * overlap)
    keep = out_tile - extent
    starts_h, starts_w = tile_starts(x.shape[-2], tile, overlap), tile_starts(x.shape[-1], tile, overlap)
    rows = [[fn(x[..., i:i + tile, j:j + tile]) for j in starts_w] for i in starts_h]
    assembled = []
    for r, row in enumerate(rows):
        pieces = []
        for c, t in enumerate(row):
            if r > 0:
                _cross_fade(rows[r - 1][c], t, extent, t.dim() - 2)
            if c > 0:
                _cross_fade(row[c - 1], t, extent, t.dim() - 1)
            pieces.append(t[..., :keep, :keep])
        assembled.append(torch.cat(pieces, dim=-1))
    return torch.cat(assembled, dim=-2)


def encode(first_stage, x, tile_px, f, plain_encode=None):
    """The release's ``vae.encode``: the posterior of ``x``, tiled and blended when ``x`` exceeds ``tile_px``."""
    if x.shape[-1] <= tile_px and x.shape[-2] <= tile_px:
        if plain_encode is not None:
            return plain_encode(x)
        return DiagonalGaussianDistribution(first_stage.quant_conv(first_stage.encoder(x)))
    moments = blended_tiles(x, lambda t: first_stage.quant_conv(first_stage.encoder(t)), tile_px, tile_px // f)
    return DiagonalGaussianDistribution(moments)


def decode(first_stage, z, tile_px, f, plain_decode=None):
    """The release's ``vae.decode``: tiled and blended when ``z`` exceeds ``tile_px / f`` latent pixels."""
    tile = tile_px // f
    if z.shape[-1] <= tile and z.shape[-2] <= tile:
        if plain_decode is not None:
            return plain_decode(z)
        return first_stage.decoder(first_stage.post_quant_conv(z))
    return blended_tiles(z, lambda t: first_stage.decoder(first_stage.post_quant_conv(t)), tile, tile_px)


def install(model, tile_px, f):
    """Make ``model.first_stage_model`` encode and decode as the release does (see the module docstring).
    Returns False (and changes nothing) for a model without a KL autoencoder (the demo model's first stage is
    the identity)."""
    fs = getattr(model, "first_stage_model", None)
    if fs is None or not all(hasattr(fs, a) for a in ("encoder", "decoder", "quant_conv", "post_quant_conv")):
        return False
    tile_px, f = int(tile_px), int(f)
    if tile_px % f:
        raise ValueError(f"VAE tile {tile_px} px is not a multiple of the latent factor {f}")
    current = getattr(fs, "_release_tiling", None)
    if current is not None:
        if current["tile_px"] == tile_px:
            return True
        remove(model)
    plain_encode, plain_decode = fs.encode, fs.decode  # the class's own methods, bound
    fs._release_tiling = {"tile_px": tile_px, "f": f, "overlap": OVERLAP}
    fs.encode = lambda x: encode(fs, x, tile_px, f, plain_encode)
    fs.decode = lambda z: decode(fs, z, tile_px, f, plain_decode)
    fs.encode_tiled = lambda x, **_: encode(fs, x, tile_px, f, plain_encode)   # --tiled_decoding's options
    fs.decode_tiled = lambda z, **_: decode(fs, z, tile_px, f, plain_decode)   # do not apply to this tiling
    return True


def remove(model):
    """Undo :func:`install` (the autoencoder's own methods again)."""
    fs = getattr(model, "first_stage_model", None)
    if fs is None or getattr(fs, "_release_tiling", None) is None:
        return
    for name in ("encode", "decode", "encode_tiled", "decode_tiled", "_release_tiling"):
        fs.__dict__.pop(name, None)
