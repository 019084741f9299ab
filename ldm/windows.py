"""Windows over a latent, shared by the methods that denoise in windows (MultiDiffusion, DemoFusion, FreeScale's
local attention, the x4 upscaler's windowed denoising): window positions, jittered views, per-window conditions
(SDXL's size embeddings per window) and the Gaussian kernel of the blurred paths."""
import torch

from ldm.guidance import classifier_free_guidance


def fitting_window_batch(model, requested, window_hw, batch, device):
    """Windows per UNet call: ``requested``, or as many as the free memory takes when fewer
    (``ldm.memory.fitting_batch``; one window's share is the UNet's activation estimate for a guided pair of
    ``batch`` latents of ``window_hw``, ``ldm/modules/unet_memory.py``)."""
    requested = max(1, int(requested))
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if requested == 1 or unet is None or not hasattr(unet, "input_blocks"):
        return requested
    from ldm import memory
    from ldm.modules.unet_memory import unet_peak_bytes
    device = torch.device(device)
    weights = next(unet.parameters(), None)
    half = (weights is not None and weights.dtype in (torch.float16, torch.bfloat16)) or (
        device.type == "cuda" and torch.is_autocast_enabled("cuda"))
    try:
        per = unet_peak_bytes(unet, window_hw, 2 * batch, 2 if half else 4)
    except NotImplementedError:
        return requested
    return memory.fitting_batch(requested, per, device)


def window_starts(size, window, stride):
    """Window starts along one axis: every ``stride``, plus one flush with the end if needed."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def views(height, width, window, stride):
    """(top, bottom, left, right) of every window, row-major."""
    wh, ww = min(window[0], height), min(window[1], width)
    return [(h0, h0 + wh, w0, w0 + ww) for h0 in window_starts(height, wh, stride)
            for w0 in window_starts(width, ww, stride)]


def _repeat(cond, n):
    """A batch of conditions (tensor, list of tensors or dict of them) repeated n times along the batch."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: _repeat(v, n) for k, v in cond.items()}
    if isinstance(cond, list):
        return [_repeat(c, n) for c in cond]
    return cond.repeat(n, *([1] * (cond.dim() - 1)))


def window_conditions(cond, views, window_conditioning=None):
    """The batch of conditions for ``views`` (each repeating the batch): as given, or, with a
    ``window_conditioning`` and a dict condition carrying SDXL's "vector", with each view's own vector; a
    "c_concat" condition (as large as the latent) is cropped to each view."""
    if cond is None:
        return None
    if isinstance(cond, dict) and "c_concat" in cond:  # a spatial condition (the x4 upscaler's low-res image)
        out = window_conditions({k: v for k, v in cond.items() if k != "c_concat"}, views, window_conditioning)
        out["c_concat"] = [torch.cat([c[:, :, h0:h1, w0:w1] for h0, h1, w0, w1 in views]) for c in cond["c_concat"]]
        return out
    if window_conditioning is None or not isinstance(cond, dict) or "vector" not in cond:
        return _repeat(cond, len(views))
    out = _repeat({k: v for k, v in cond.items() if k != "vector"}, len(views))
    out["vector"] = torch.cat([window_conditioning(cond["vector"], v) for v in views])
    return out


class SDXLWindowConditioning:
    """SDXL's vector condition for a window: the text part of the given vector, the size embeddings recomputed
    for (original = whole image, crop = the window's offset, target = the window's size), in pixels.
    ``target="image"``: target = the whole image too (DemoFusion's choice)."""

    SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")

    def __init__(self, model, image_hw, f, target="window"):
        if target not in ("window", "image"):
            raise ValueError(f"target must be 'window' or 'image', got {target!r}")
        self.model, self.image_hw, self.f, self.target = model, tuple(image_hw), int(f), target
        self.cache = {}

    def _size_embeddings(self, window_px, crop_px, device, dtype):
        values = {"original_size_as_tuple": self.image_hw, "crop_coords_top_left": crop_px,
                  "target_size_as_tuple": window_px if self.target == "window" else self.image_hw}
        parts = []
        for emb, key in zip(self.model.conditioner.embedders, self.model.conditioner.input_keys):
            if key in values:
                out = emb(torch.tensor([values[key]], dtype=torch.float32, device=device))
                parts.append((key, out.reshape(1, -1).to(dtype)))
            else:
                parts.append((key, None))  # a text embedder: its slice comes from the given vector
        return parts

    def __call__(self, vector, view):
        h0, h1, w0, w1 = view
        window_px, crop_px = ((h1 - h0) * self.f, (w1 - w0) * self.f), (h0 * self.f, w0 * self.f)
        key = (window_px, crop_px, vector.device, vector.dtype)
        if key not in self.cache:
            self.cache[key] = self._size_embeddings(window_px, crop_px, vector.device, vector.dtype)
        parts = self.cache[key]
        size_dim = sum(p.shape[-1] for _, p in parts if p is not None)
        text_dim = vector.shape[-1] - size_dim
        out, offset = [], 0
        for name, p in parts:
            if p is None:
                out.append(vector[:, offset:offset + text_dim])
                offset += text_dim
                text_dim = 0  # one text embedder carries the pooled vector (SDXL: OpenCLIP bigG)
            else:
                out.append(p.expand(vector.shape[0], -1))
                offset += p.shape[-1]
        return torch.cat(out, dim=1)


# jittered windows (FreeScale's and DemoFusion's local paths)

def _starts(size, window, stride):
    """Window starts along one axis: every ``stride``, the last one moved back to end at ``size``."""
    if size <= window:
        return [0]
    count = int((size - window) / stride - 1e-6) + 2
    return [min(i * stride, size - window) for i in range(count)]


def _jitter(start, end, size, j, randint):
    if j == 0:
        return 0
    if start != 0 and end != size:
        return randint(-j, j)
    if start == 0 and end != size:
        return randint(-j, 0)
    if start != 0 and end == size:
        return randint(0, j)
    return 0


def window_views(grid_hw, geometry, randint=None):
    """Views (h0, h1, w0, w1) in the grid padded by the jitter ranges; jittered when ``randint`` is given.

    Row-major over the windows; per window the width jitter is drawn before the height jitter (the release's
    order, so the same draws give the same windows)."""
    h, w = grid_hw
    wh, ww, sh, sw, jh, jw = geometry
    wh, ww = min(wh, h), min(ww, w)
    views = []
    for h0 in _starts(h, wh, sh):
        for w0 in _starts(w, ww, sw):
            h1, w1 = h0 + wh, w0 + ww
            dw = _jitter(w0, w1, w, jw, randint) if randint else 0
            dh = _jitter(h0, h1, h, jh, randint) if randint else 0
            views.append((h0 + dh + jh, h1 + dh + jh, w0 + dw + jw, w1 + dw + jw))
    return views


def gaussian_1d(kernel_size, sigma=1.0, dtype=torch.float32, device=None):
    x = torch.arange(kernel_size, dtype=torch.float64)
    g = torch.exp(-((x - (kernel_size - 1) / 2) ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).to(dtype=dtype, device=device)


# window-wise guidance (MultiDiffusion; the x4 upscaler's windowed denoising)

class MultiDiffusionGuidance:
    """``guidance`` for the DDIM sampler: window-wise classifier-free guidance, averaged over overlaps."""

    def __init__(self, window, stride=8, window_batch=8, window_conditioning=None):
        self.window = (int(window[0]), int(window[1])) if isinstance(window, (tuple, list)) else (int(window),) * 2
        self.stride = int(stride)
        self.window_batch = max(1, int(window_batch))
        self.window_conditioning = window_conditioning  # e.g. SDXLWindowConditioning
        if min(self.window) < 1 or self.stride < 1:
            raise ValueError(f"window and stride must be positive, got {window} and {stride}")

    def __call__(self, model, x, t, cond, uncond, scale, step=None):
        b, _, height, width = x.shape
        value = torch.zeros_like(x)
        count = torch.zeros(1, 1, height, width, dtype=x.dtype, device=x.device)
        all_views = views(height, width, self.window, self.stride)
        wh, ww = all_views[0][1] - all_views[0][0], all_views[0][3] - all_views[0][2]
        per_call = fitting_window_batch(model, self.window_batch, (wh, ww), b, x.device)
        for k in range(0, len(all_views), per_call):
            chunk = all_views[k:k + per_call]
            xs = torch.cat([x[:, :, h0:h1, w0:w1] for h0, h1, w0, w1 in chunk])
            out = classifier_free_guidance(model, xs, t.repeat(len(chunk)),
                                           window_conditions(cond, chunk, self.window_conditioning),
                                           window_conditions(uncond, chunk, self.window_conditioning), scale)
            for (h0, h1, w0, w1), o in zip(chunk, out.split(b)):
                value[:, :, h0:h1, w0:w1] += o
                count[:, :, h0:h1, w0:w1] += 1
        return value / count
