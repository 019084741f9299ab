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
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def _out_size(size, conv):
    """Output side the *original* conv gives on an input side (the processors must give the same)."""
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def dilated_conv(conv, x, weight, dilation, kernel_size):
    """conv with ``weight`` at an integer ``dilation``, padded so the output size matches the original."""
    pad = dilation * (kernel_size - 1) // 2
    return F.conv2d(x, weight, conv.bias, conv.stride, pad, dilation, conv.groups)


def fractional_dilated_conv(conv, x, weight, factor, kernel_size):
    """Paper eq. 3: stretch the input by s = ⌈d⌉/d, convolve with dilation ⌈d⌉, resize back."""
    d = math.ceil(factor)
    s = d / factor
    h, w = x.shape[-2:]
    out_h, out_w = _out_size(h, conv), _out_size(w, conv)
    x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False)
    y = dilated_conv(conv, x, weight, d, kernel_size)
    return F.interpolate(y, size=(out_h, out_w), mode="bilinear", align_corners=False)


class ReDilation:
    """Processor: run a conv with dilation ``factor`` (integer or fractional, ≥ 1)."""

    def __init__(self, factor):
        if factor < 1:
            raise ValueError(f"dilation factor must be >= 1, got {factor}")
        self.factor = float(factor)

    def __call__(self, conv, x):
        k = conv.kernel_size[0]
        if self.factor == int(self.factor):
            return dilated_conv(conv, x, conv.weight, int(self.factor), k)
        return fractional_dilated_conv(conv, x, conv.weight, self.factor, k)

    def __repr__(self):
        return f"ReDilation({self.factor:g})"


class Dispersion:
    """Processor: dispersed kernel k' = R·k at dilation factor/2.

    With ``cache=None`` (the default of ScaleCrafterPlan) k' is computed on every call and dropped after
    it: the map costs (out·in)·9·25 multiply-adds, a few percent of the 5×5 convolution it feeds, while
    keeping every dispersed kernel alive would hold 25/9× the weights of all listed layers (3.8 GB in fp32
    for SD 2.1's 2048² preset). A dict as ``cache`` keeps them for the run (id(conv) -> kernel).
    """

    def __init__(self, factor, transform, cache=None):
        self.factor = float(factor)
        self.transform = transform  # torch tensor (large², small²)
        self.cache = cache

    def weight(self, conv):
        from ldm.scalecrafter.dispersion import disperse_kernel
        if self.cache is None:
            return disperse_kernel(conv.weight, self.transform.to(conv.weight.device, conv.weight.dtype))
        w = self.cache.get(id(conv))
        if w is None or w.device != conv.weight.device or w.dtype != conv.weight.dtype:
            w = disperse_kernel(conv.weight, self.transform.to(conv.weight.device, conv.weight.dtype))
            self.cache[id(conv)] = w
        return w

    def __call__(self, conv, x):
        w = self.weight(conv)
        k = w.shape[-1]
        d = max(self.factor / 2.0, 1.0)
        if d == int(d):
            return dilated_conv(conv, x, w, int(d), k)
        return fractional_dilated_conv(conv, x, w, d, k)

    def __repr__(self):
        return f"Dispersion(factor={self.factor:g})"


@contextmanager
def installed(modules_and_processors):
    """Give each conv its processor for the duration of the block, then restore the original forward.

    ``modules_and_processors``: iterable of (nn.Conv2d, processor). Installing shadows ``forward`` on the
    instance only; deleting the attribute afterwards brings back the class's own forward exactly.
    """
    touched = []
    try:
        for conv, proc in modules_and_processors:
            if "forward" in conv.__dict__:
                raise RuntimeError("a processor is already installed on this convolution")
            conv.forward = (lambda c, p: (lambda x: p(c, x)))(conv, proc)
            touched.append(conv)
        yield
    finally:
        for conv in touched:
            del conv.forward
