"""FreeU (Si et al., 2023) as a switch: amplify backbone features, damp low frequencies of skip features.

The authors' ScaleCrafter release turns it on by default; here it is off unless asked for
(``--freeu``), so that the paper's tables (made before FreeU existed) are reproduced by default.
Implemented with forward pre-hooks on the UNet's output blocks: the UNet itself is unchanged.

Released values: SD 1.5 b1=1.2 b2=1.4 s1=0.9 s2=0.2; SD 2.1 b1=1.1 b2=1.2 s1=0.9 s2=0.2;
SDXL b1=1.1 b2=1.2 s1=0.6 s2=0.4.
"""
from contextlib import contextmanager

import torch

FREEU_DEFAULTS = {
    "sd1": dict(b1=1.2, b2=1.4, s1=0.9, s2=0.2),
    "sd2": dict(b1=1.1, b2=1.2, s1=0.9, s2=0.2),
    "sdxl": dict(b1=1.1, b2=1.2, s1=0.6, s2=0.4),
    "demo": dict(b1=1.1, b2=1.2, s1=0.9, s2=0.2),  # no released values: SD 2.1's (what it got as an "sd2" config)
}


def fourier_filter(x, threshold, scale):
    """Scale the centred (low-frequency) (2·threshold)² block of the spectrum by ``scale``."""
    dtype = x.dtype
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = x.shape[-2:]
    mask = torch.ones_like(freq.real)
    ch, cw = h // 2, w // 2
    mask[..., ch - threshold:ch + threshold, cw - threshold:cw + threshold] = scale
    freq = freq * mask
    out = torch.fft.ifftn(torch.fft.ifftshift(freq, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(dtype)


def _skip_channels(unet):
    """Channels of each skip connection in the order output blocks consume them."""
    chans = []
    for block in unet.input_blocks:
        last = block[-1]
        ch = getattr(last, "out_channels", None) or getattr(last, "in_channels", None)
        if ch is None:  # conv_in
            ch = last.out_channels
        chans.append(ch)
    return chans[::-1]


@contextmanager
def freeu(unet, b1, b2, s1, s2):
    """While active, output blocks whose backbone input has 4·C (resp. 2·C) channels, C = model_channels,
    get their first half of channels scaled by b1 (b2) and their skip feature Fourier-filtered with s1 (s2).
    For SD and SDXL this is the released rule (1280 and 640 channels)."""
    mc = unet.model_channels
    skips = _skip_channels(unet)
    handles = []

    def make_hook(skip_ch):
        def hook(module, args):
            x = args[0]
            h, hs = x[:, :-skip_ch], x[:, -skip_ch:]
            if h.shape[1] == 4 * mc:
                h = torch.cat([h[:, :2 * mc] * b1, h[:, 2 * mc:]], dim=1)
                hs = fourier_filter(hs, 1, s1)
            elif h.shape[1] == 2 * mc:
                h = torch.cat([h[:, :mc] * b2, h[:, mc:]], dim=1)
                hs = fourier_filter(hs, 1, s2)
            else:
                return None
            return (torch.cat([h, hs], dim=1), *args[1:])
        return hook

    try:
        for block, skip_ch in zip(unet.output_blocks, skips):
            handles.append(block.register_forward_pre_hook(make_hook(skip_ch)))
        yield
    finally:
        for h in handles:
            h.remove()
