"""FreeScale's scale fusion: self-attention as local windows for detail plus global attention for layout.

For a cascade stage at ``s`` times the model's base size, every self-attention layer computes

* **local** attention inside windows of (about) the base resolution's token grid, slid with half-window
  stride and a random jitter, averaged where windows overlap;
* **global** attention over all tokens (``fast_mode``: over the s_h × s_w dilated sub-lattices
  ``x[a::s_h, b::s_w]``, each of which is a base-sized grid);

and fuses them as ``out = G(local) + (global − G(global))``: the low frequencies of the local result (its
objects are base-sized, so no repetition) and the high frequencies of the global one (detail that sees the
whole image). ``G`` is a normalised Gaussian blur, kernel ``2s − 1``, σ = 1, zero padding.

What the authors' release (``scale_attention.py``) does, and what this module does by default:

* ``blur="release"``: G blurs the (h, w, feature) volume, i.e. also across neighbouring feature channels (their
  ``conv3d`` runs over all three axes of the [batch, h, w, d] tensor); ``blur="spatial"`` blurs h and w only,
  as the paper describes it.
* ``window="release"``: window = level grid / max(s_h, s_w) on both axes (for a 2:1 image a window covers
  half the base size on the short axis); ``window="base"``: level grid / (s_h, s_w), the base grid.
* jitter: ``randint(-j, j)`` per view (one-sided at the borders, none for a window spanning an axis),
  j = window // 8, with the grid zero-padded by j so jittered windows stay inside; padded tokens take
  part in the window's attention, as in the release. Draws come from the ``randint`` callable given (in the
  cascade ``random.Random(seed).randint``, so a seed reproduces the image; the release draws from Python's
  unseeded global ``random``, i.e. the same generator type). Their crop ``value[j:-j]`` is empty when j = 0
  (windows under 8 tokens); here j = 0 means no padding and no crop.
* G is applied once, to ``local − global`` (G is linear: G(l) + g − G(g) = g + G(l − g)), and as three 1-D
  passes (the 3-D kernel is separable and zero padding is per axis), instead of two full 3-D convolutions.
"""

import torch
import torch.nn.functional as F

from ldm import memory
from ldm.windows import _jitter, _starts, gaussian_1d, window_views  # noqa: F401

BLURS = ("release", "spatial")
WINDOWS = ("release", "base")


# ------------------------------------------------------------------------------------------------
# geometry


def level_grid(latent_hw, n_tokens):
    """(h, w) of the token grid with ``n_tokens`` tokens inside a UNet run on a latent of ``latent_hw``.

    Each level halves the side with ``ceil`` (stride-2, padding-1 convolutions), so the grid is found by
    walking down from the latent size."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    while h * w > n_tokens:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != n_tokens:
        raise ValueError(f"{n_tokens} tokens are not a level of a {latent_hw[0]}x{latent_hw[1]} latent")
    return h, w


def window_geometry(grid_hw, scale_hw, window="release"):
    """(window_h, window_w, stride_h, stride_w, jitter_h, jitter_w) in tokens for one attention level.

    ``release``: the authors' arithmetic (windows sized from 128-token tiles at their 1024-px scale, which
    works out to the level grid over max(s_h, s_w) on both axes, floored); ``base``: grid // (s_h, s_w).
    Strides are half a window, jitter ranges an eighth. Windows are at least one token on each axis.
    """
    h, w = grid_hw
    s_h, s_w = scale_hw
    if window == "base":
        wh, ww = max(h // s_h, 1), max(w // s_w, 1)
        return wh, ww, max(wh // 2, 1), max(ww // 2, 1), wh // 8, ww // 8
    if window != "release":
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    ratio = s_h / s_w
    sub_h, sub_w = (128, int(128 / ratio)) if ratio > 1 else (int(128 * ratio), 128)
    factor = 128 * s_h / h  # tokens of the 128-tile per token of this level
    # at least one token: at extreme aspect ratios the short axis of a deep level is thinner than a tile's share
    # (e.g. 64x512 on SD: a 1-token-high level, int(16 / 128) = 0), where the release's windows would be empty
    wh, ww = max(int(sub_h / factor), 1), max(int(sub_w / factor), 1)
    sh, sw = int((sub_h // 2) / factor), int((sub_w // 2) / factor)
    return wh, ww, max(sh, 1), max(sw, 1), wh // 8, ww // 8


# ------------------------------------------------------------------------------------------------
# the Gaussian split


def _blur_axis(x, kernel, dim):
    k = kernel.numel()
    moved = x.movedim(dim, -1)
    shape = moved.shape
    out = F.conv1d(moved.reshape(-1, 1, shape[-1]), kernel.view(1, 1, k), padding=k // 2)
    return out.view(shape).movedim(-1, dim)


def gaussian_blur(x, kernel_size, sigma=1.0, blur="release"):
    """G on a [batch, h, w, d] tensor: zero-padded normalised Gaussian over (h, w, d) (``release``) or (h, w)."""
    if blur not in BLURS:
        raise ValueError(f"blur must be one of {BLURS}, got {blur!r}")
    if kernel_size <= 1:
        return x
    kernel = gaussian_1d(kernel_size, sigma, x.dtype, x.device)
    for dim in ((1, 2, 3) if blur == "release" else (1, 2)):
        x = _blur_axis(x, kernel, dim)
    return x


# ------------------------------------------------------------------------------------------------
# the processor


def _attend(attn, tokens, context=None, mask=None):
    """The attention module's own computation (its class forward, bypassing any installed processor)."""
    return type(attn).forward(attn, tokens, context, mask)


class ScaleFusion:
    """Attention processor for a self-attention ``CrossAttention`` (``attn1``) at one cascade stage.

    latent_hw: the stage's latent size (the token grid of each level follows from it).
    scale_hw: (s_h, s_w), the stage's integer scale over the base size per axis.
    randint: jitter source, ``randint(a, b)`` inclusive (``random.Random(seed).randint``); None: no jitter.
    max_window_batch_tokens: windows are evaluated in batches of at most this many query tokens, so memory
    stays bounded at any size (the attention itself is the fused SDPA kernel; no N×N matrix is formed).
    """

    def __init__(self, latent_hw, scale_hw, fast_mode=False, randint=None, blur="release", window="release",
                 sigma=1.0, max_window_batch_tokens=2 ** 18):
        if blur not in BLURS:
            raise ValueError(f"blur must be one of {BLURS}, got {blur!r}")
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
        self.latent_hw = tuple(int(v) for v in latent_hw)
        self.scale_hw = (max(int(scale_hw[0]), 1), max(int(scale_hw[1]), 1))
        self.fast_mode = bool(fast_mode)
        self.randint = randint
        self.blur = blur
        self.window = window
        self.sigma = sigma
        self.max_window_batch_tokens = int(max_window_batch_tokens)

    def __repr__(self):
        return (f"ScaleFusion(scale={self.scale_hw[0]}x{self.scale_hw[1]}, fast_mode={self.fast_mode}, "
                f"blur={self.blur}, window={self.window})")

    def __call__(self, attn, x, context=None, mask=None):
        s = max(self.scale_hw)
        if context is not None or s <= 1:  # cross-attention, or a stage at the base size: unchanged
            return _attend(attn, x, context, mask)
        b, n, c = x.shape
        h, w = level_grid(self.latent_hw, n)
        grid = x.reshape(b, h, w, c)
        local = self.local_attention(attn, grid)
        glob = self.global_attention(attn, grid)
        fused = glob + gaussian_blur(local - glob, 2 * s - 1, self.sigma, self.blur)
        return fused.reshape(b, n, -1)

    def local_attention(self, attn, grid):
        b, h, w, c = grid.shape
        geometry = window_geometry((h, w), self.scale_hw, self.window)
        jh, jw = geometry[4], geometry[5]
        views = window_views((h, w), geometry, self.randint)
        padded = F.pad(grid, (0, 0, jw, jw, jh, jh)) if (jh or jw) else grid
        value = None
        count = torch.zeros(1, padded.shape[1], padded.shape[2], 1, dtype=grid.dtype, device=grid.device)
        wh, ww = views[0][1] - views[0][0], views[0][3] - views[0][2]
        per_batch = max(1, self.max_window_batch_tokens // max(b * wh * ww, 1))
        # and what the free memory takes: a window's tokens, q, k, v, the attention output, its transposed copy
        # and the projection (about 8 tensors of its size)
        per_batch = memory.fitting_batch(per_batch, 8 * b * wh * ww * c * grid.element_size(), grid.device)
        for k in range(0, len(views), per_batch):
            chunk = views[k:k + per_batch]
            tokens = torch.cat([padded[:, h0:h1, w0:w1].reshape(b, wh * ww, c) for h0, h1, w0, w1 in chunk])
            out = _attend(attn, tokens).reshape(len(chunk), b, wh, ww, -1)
            if value is None:
                value = padded.new_zeros(b, padded.shape[1], padded.shape[2], out.shape[-1])
            for (h0, h1, w0, w1), o in zip(chunk, out):
                value[:, h0:h1, w0:w1] += o
                count[:, h0:h1, w0:w1] += 1
        value = value[:, jh:jh + h, jw:jw + w]
        count = count[:, jh:jh + h, jw:jw + w]
        return torch.where(count > 0, value / count.clamp(min=1), value)

    def global_attention(self, attn, grid):
        b, h, w, c = grid.shape
        if not self.fast_mode:
            return _attend(attn, grid.reshape(b, h * w, c)).reshape(b, h, w, -1)
        s_h, s_w = self.scale_hw
        out = None
        for a in range(min(s_h, h)):
            for d in range(min(s_w, w)):
                sub = grid[:, a::s_h, d::s_w]
                o = _attend(attn, sub.reshape(b, -1, c)).reshape(b, sub.shape[1], sub.shape[2], -1)
                if out is None:
                    out = grid.new_zeros(b, h, w, o.shape[-1])
                out[:, a::s_h, d::s_w] = o
        return out
