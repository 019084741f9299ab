"""Peak activation memory of one UNet evaluation, from the UNet's layers (``openaimodel.UNetModel``).

Used where a run must decide before it starts: how many windows a MultiDiffusion/DemoFusion batch can take
(``ldm/windows.py``, ``ldm/methods/demofusion.py``) and whether the text encoders must leave the GPU so that the
sampling fits (the pipelines). It follows ``UNetModel.forward`` as eager PyTorch holds tensors:

* every input block's output stays alive as a skip connection until its output block pops it;
* a ``ResBlock`` (cᵢ → cₒ) holds its input, the GroupNorm32 temporaries (a float32 copy of a half-precision
  input and the float32 result), the SiLU output and conv1's output, then h, h + emb, the second norm's
  temporaries, SiLU and conv2, then the skip projection and the sum: at most (cᵢ + 4cₒ) activations plus the
  float32 norm temporaries;
* a ``SpatialTransformer`` (c channels, inner width d) holds its input for the final residual and each transformer
  block's input while the block runs; its feed-forward (GEGLU, 4d inner) holds x, the norm output, the 8d
  projection, the 4d GELU of the gate and the 4d product; attention goes through ``scaled_dot_product_attention`` (fused: no N×N matrix) and holds x, the norm
  output, q, k, v, its output, the transposed copy and the projection;
* an output block concatenates h with the popped skip (a new tensor, alive until the block returns: the caller's
  ``h``) before its ResBlock; upsampling holds the 4× copy and the convolution's output.

``dtype_bytes``: the activations' size (2 under float16 autocast or float16 weights, 4 in float32); normalisation
outputs are float32 under autocast (``float32_norms``). Per-call processors of the methods (scale fusion,
re-dilation) and FreeU add their own temporaries on top; the estimate is the plain UNet's. Checked against
``tools/fake_cuda.py`` simulations in ``tests/test_vae_memory.py``.
"""
import math

import torch.nn as nn

__all__ = ["unet_peak_bytes"]


def _norm_extra(c, e, float32_norms):
    """Temporaries of a GroupNorm32 on c channels (besides its input): a float32 copy of a half input and the
    float32 result, then the result cast back while the float32 one lives."""
    if e >= 4:
        return 4 * c
    return max(8 * c, 4 * c + e * c)


def _resblock(m, n, e, f32):
    ci, co = m.channels, m.out_channels
    skip = co if ci != co else 0
    phases = [
        e * ci + _norm_extra(ci, e, f32),                 # x, norm1 temporaries
        e * 3 * ci,                                      # x, norm1 output, SiLU
        e * (2 * ci + co),                               # x, SiLU, conv1
        e * (ci + 2 * co) + _norm_extra(co, e, f32),     # x, h, h + emb, norm2 temporaries
        e * (ci + 4 * co),                               # x, h, h + emb, SiLU, conv2
        e * (ci + 2 * co + skip + co),                   # x, conv2, skip projection, sum
    ]
    return max(phases) * n


def _transformer(m, n, e, f32):
    c = m.in_channels
    blocks = list(m.transformer_blocks)
    d = blocks[0].attn1.heads * blocks[0].attn1.dim_head if blocks else c
    en = 4 if (f32 or e >= 4) else e
    pre = e * c + en * c + e * c + e * d  # input, norm, a contiguous copy for proj_in, proj_in's output
    # the transformer's input, the block's input (its caller's x), x after the previous sub-layer, the norm, then
    attn = e * c + 2 * e * d + en * d + 6 * e * d  # q k v, out, transposed copy, projection
    ff = e * c + 2 * e * d + en * d + 16 * e * d   # GEGLU projection 8d, GELU of the gate 4d, product 4d
    post = e * c + 3 * e * d + e * c            # input, x, transposed copy, projection, sum
    return max(pre, attn, ff, post) * n


def _block(block, c, hw, e, f32, held=0.0):
    """(peak bytes of the block's own temporaries incl. its input and output, out channels, out hw). ``held``:
    bytes of the block's input that stay alive after its first layer (the caller still refers to it)."""
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample
    h, w = hw
    peak = 0.0
    for i, layer in enumerate(block):
        n = h * w
        base = held if i >= 1 else 0.0
        peak0 = peak
        peak = 0.0
        if isinstance(layer, ResBlock):
            peak = max(peak, _resblock(layer, n, e, f32))
            c = layer.out_channels
        elif isinstance(layer, SpatialTransformer):
            peak = max(peak, _transformer(layer, n, e, f32))
        elif isinstance(layer, Downsample):
            ho, wo = (h + 1) // 2, (w + 1) // 2
            peak = max(peak, e * (c * n + layer.out_channels * ho * wo))
            h, w, c = ho, wo, layer.out_channels
        elif isinstance(layer, Upsample):
            n4 = 4 * n
            peak = max(peak, e * (c * n + c * n4 + layer.out_channels * n4))
            h, w, c = 2 * h, 2 * w, layer.out_channels
        elif isinstance(layer, nn.Conv2d):
            peak = max(peak, e * (layer.in_channels + layer.out_channels) * n)
            c = layer.out_channels
        else:
            raise NotImplementedError(f"UNet memory estimate: unknown layer {type(layer).__name__}")
        peak = max(peak0, base + peak)
    return peak, c, (h, w)


def unet_peak_bytes(unet, latent_hw, batch=2, dtype_bytes=2, float32_norms=True) -> int:
    """Peak bytes of the activations of one ``unet`` evaluation on a batch of ``batch`` latents of ``latent_hw``
    (the weights and the caller's input not included)."""
    e, f32 = int(dtype_bytes), bool(float32_norms)
    h, w = (int(v) for v in latent_hw)
    c = unet.in_channels
    live = e * c * h * w  # the input cast to the UNet's dtype
    skips = []
    peak = 0.0
    for block in unet.input_blocks:
        p, c, (h, w) = _block(block, c, (h, w), e, f32)
        peak = max(peak, sum(skips) + p)
        skips.append(e * c * h * w)
    p, c, (h, w) = _block(unet.middle_block, c, (h, w), e, f32)
    peak = max(peak, sum(skips) + p)
    for block in unet.output_blocks:
        s = skips.pop()
        sc = int(round(s / (e * h * w)))
        cat = e * (c + sc) * h * w
        peak = max(peak, sum(skips) + s + e * c * h * w + cat)  # h, the skip and their concatenation
        p, c, (h, w) = _block(block, c + sc, (h, w), e, f32, held=cat)  # the caller's h: the concatenation
        peak = max(peak, sum(skips) + p)
    n = h * w
    peak = max(peak, e * c * n + _norm_extra(c, e, f32) * n, 3 * e * c * n)  # out: norm, SiLU, conv
    return int(math.ceil((peak + live) * batch))
