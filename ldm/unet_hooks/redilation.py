"""Re-dilated convolution: the same weights, a larger receptive field, at inference time only.

A *processor* replaces one ``nn.Conv2d``'s forward for the duration of one UNet call; the module, its
weights and its state dict are never touched. With no processor installed the UNet is bit-identical
to the original.

* integer factor d: the conv runs with dilation d and padding d·(k−1)/2, so sizes stay;
* fractional factor d (paper, eq. 3): f_d(h) = interp_{1/s}(interp_s(h) ⊗ Φ_⌈d⌉(k)), s = ⌈d⌉/d, bilinear;
* dispersed (paper, sec. 3.3): the 3×3 kernel k becomes k' = R·k (5×5) whose receptive field is about
  twice as large, so a target factor d is reached with dilation d/2 on k' (fractional if d/2 is).
"""
import math

import torch.nn.functional as F

from ldm.unet_hooks.processors import installed  # noqa: F401  (the one install mechanism; re-exported)


def _out_size(size, conv):
    """Output side the *original* conv gives on an input side (the processors must give the same)."""
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def dilated_conv(conv, x, weight, dilation, kernel_size):
    """conv with ``weight`` at an integer ``dilation``, padded so the output size matches the original."""
    pad = dilation * (kernel_size - 1) // 2
    return F.conv2d(x, weight, conv.bias, conv.stride, pad, dilation, conv.groups)


def at_factor(conv, x, factor, run):
    """``run(x, d)`` (a conv at integer dilation d) at a possibly fractional ``factor``.

    Integer: run directly. Fractional (paper, eq. 3): stretch the input by s = ⌈d⌉/d, run at ⌈d⌉, resize
    the output back to the original conv's size; bilinear both ways.
    """
    if factor == int(factor):
        return run(x, int(factor))
    d = math.ceil(factor)
    s = d / factor
    h, w = x.shape[-2:]
    out_h, out_w = _out_size(h, conv), _out_size(w, conv)
    x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False)
    y = run(x, d)
    return F.interpolate(y, size=(out_h, out_w), mode="bilinear", align_corners=False)


def fractional_dilated_conv(conv, x, weight, factor, kernel_size):
    """Paper eq. 3 with an explicit weight (see :func:`at_factor`)."""
    return at_factor(conv, x, factor, lambda x, d: dilated_conv(conv, x, weight, d, kernel_size))


class ReDilation:
    """Processor: run a conv with dilation ``factor`` (integer or fractional, ≥ 1)."""

    def __init__(self, factor):
        if factor < 1:
            raise ValueError(f"dilation factor must be >= 1, got {factor}")
        self.factor = float(factor)

    def __call__(self, conv, x):
        k = conv.kernel_size[0]
        return at_factor(conv, x, self.factor, lambda x, d: dilated_conv(conv, x, conv.weight, d, k))

    def __repr__(self):
        return f"ReDilation({self.factor:g})"


# Transient budget of the basis path's (batch, in·r², H, W) intermediate; larger inputs are chunked
# over input channels (the 1x1 outputs are summed), so memory stays bounded at any resolution.
BASIS_MAX_INTERMEDIATE_BYTES = 256 * 2 ** 20


def basis_dispersed_conv(conv, x, transform, dilation, max_bytes=BASIS_MAX_INTERMEDIATE_BYTES):
    """conv(x, R·k) at integer ``dilation`` without forming R·k.

    R·k is linear in k: with the r² fixed large filters B_j (columns of R, reshaped), conv(x, R·k) =
    Σ_j k_j ⊛ conv(x, B_j). So: a depthwise conv of every input channel with the r² basis filters
    (channel c·r² + j = conv(x_c, B_j), at the layer's stride and dilation), then a 1×1 conv whose weight
    is k viewed as (out, in·r²). Multiply-adds: those of the r×r conv plus a depthwise term of
    (large²/out) of it; no dispersed kernel exists.
    """
    weight = conv.weight
    out_ch, in_ch, r, _ = weight.shape
    large = int(round(math.sqrt(transform.shape[0])))
    taps = r * r
    basis = transform.to(x.device, x.dtype).t().reshape(taps, 1, large, large)
    pad = dilation * (large - 1) // 2
    w1 = weight.reshape(out_ch, in_ch * taps, 1, 1)  # a view: channel c·r² + j is tap j of input c

    def depthwise(xc):
        dw = basis.repeat(xc.shape[1], 1, 1, 1)
        return F.conv2d(xc, dw, None, conv.stride, pad, dilation, xc.shape[1])

    out_h, out_w = _out_size(x.shape[-2], conv), _out_size(x.shape[-1], conv)  # 'same' padding keeps sizes
    per_channel = x.shape[0] * taps * out_h * out_w * x.element_size()
    step = max(1, min(in_ch, max_bytes // max(per_channel, 1)))
    if step >= in_ch:
        return F.conv2d(depthwise(x), w1, conv.bias)
    y = None
    for c0 in range(0, in_ch, step):
        c1 = min(c0 + step, in_ch)
        part = F.conv2d(depthwise(x[:, c0:c1]), w1[:, c0 * taps:c1 * taps], conv.bias if c0 == 0 else None)
        y = part if y is None else y.add_(part)
    return y


# Measured rule for choosing the path (scripts/benchmark.py dispersion-layers; docs/benchmarks.md): the
# basis path wins when the dense 1×1 work dominates its depthwise term, i.e. with many output channels. On
# the 2-core CPU it was faster for every 640- and 1280-channel layer measured (8² to 64²) and for two of three
# 320-channel ones, so the threshold is 640. CUDA: no GPU measurement yet, so the direct path (the one the
# authors timed) stays the default there until `benchmark.py dispersion-layers --device cuda` gives one.
BASIS_MIN_OUT_CHANNELS = {"cpu": 640}


def choose_dispersion_path(conv, x):
    """'basis' or 'direct' for this layer and input (see BASIS_MIN_OUT_CHANNELS)."""
    threshold = BASIS_MIN_OUT_CHANNELS.get(x.device.type)
    if threshold is None or conv.groups != 1:
        return "direct"
    return "basis" if conv.out_channels >= threshold else "direct"


class Dispersion:
    """Processor: dispersed kernel k' = R·k at dilation factor/2.

    Two exact paths (equal up to rounding):
    * ``"direct"``: form k' = R·k and run the large conv. With ``cache=None`` (the default of
      ScaleCrafterPlan) k' is computed on every call and dropped after it; keeping every dispersed kernel
      alive would hold 25/9× the weights of all listed layers (3.8 GB in fp32 for SD 2.1's 2048² preset).
      A dict as ``cache`` keeps them for the run (id(conv) -> kernel).
    * ``"basis"``: :func:`basis_dispersed_conv`, no k' at all; cheaper for wide layers.
    ``path="auto"`` picks per call with :func:`choose_dispersion_path`.
    """

    PATHS = ("auto", "direct", "basis")

    def __init__(self, factor, transform, cache=None, path="auto"):
        if path not in self.PATHS:
            raise ValueError(f"dispersion path must be one of {self.PATHS}, got {path!r}")
        self.factor = float(factor)
        self.transform = transform  # torch tensor (large², small²)
        self.cache = cache
        self.path = path

    def weight(self, conv):
        from ldm.unet_hooks.dispersion import disperse_kernel
        if self.cache is None:
            return disperse_kernel(conv.weight, self.transform.to(conv.weight.device, conv.weight.dtype))
        w = self.cache.get(id(conv))
        if w is None or w.device != conv.weight.device or w.dtype != conv.weight.dtype:
            w = disperse_kernel(conv.weight, self.transform.to(conv.weight.device, conv.weight.dtype))
            self.cache[id(conv)] = w
        return w

    def __call__(self, conv, x):
        d = max(self.factor / 2.0, 1.0)
        path = choose_dispersion_path(conv, x) if self.path == "auto" else self.path
        if path == "basis":
            return at_factor(conv, x, d, lambda x, dd: basis_dispersed_conv(conv, x, self.transform, dd))
        w = self.weight(conv)
        k = w.shape[-1]
        return at_factor(conv, x, d, lambda x, dd: dilated_conv(conv, x, w, dd, k))

    def __repr__(self):
        return f"Dispersion(factor={self.factor:g})"
