"""MultiDiffusion (Bar-Tal et al., 2023): a large latent denoised as overlapping base-size windows.

Every step, the latent is covered by windows of the model's base latent size (64² for SD, 128² for SDXL) at a
stride (default 8 latent pixels); each window gets a classifier-free-guided prediction of its own (windows are
batched), and the predictions are averaged where windows overlap. The DDIM update is linear in the model
output, so averaging outputs is averaging the per-window denoised latents, which is what the reference does.

Differences from the reference implementation (omerbt/MultiDiffusion, diffusers' panorama pipeline):
* a last window is aligned with the right/bottom edge when (side − window) is not a multiple of the stride;
  the reference leaves that rim uncovered, where ``where(count > 0, value / count, value)`` sets it to zero
  (no effect at the papers' sizes, which are multiples of 64 px); a latent side shorter than the window gets one
  window spanning it (the reference's get_views then returns no views, or, with both sides shorter, windows at
  negative offsets);
* for η > 0 one noise draw per step is shared by all windows (the reference draws per window and averages,
  which lowers the noise variance); for η = 0, as in the reference, the two are the same;
* SDXL: each window is conditioned on its own crop: original size = the whole image, crop = the window's
  offset, target size = the window's size (pixels).
"""
import torch

from ldm.models.diffusion.ddim import classifier_free_guidance


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
        for k in range(0, len(all_views), self.window_batch):
            chunk = all_views[k:k + self.window_batch]
            xs = torch.cat([x[:, :, h0:h1, w0:w1] for h0, h1, w0, w1 in chunk])
            out = classifier_free_guidance(model, xs, t.repeat(len(chunk)),
                                           window_conditions(cond, chunk, self.window_conditioning),
                                           window_conditions(uncond, chunk, self.window_conditioning), scale)
            for (h0, h1, w0, w1), o in zip(chunk, out.split(b)):
                value[:, :, h0:h1, w0:w1] += o
                count[:, :, h0:h1, w0:w1] += 1
        return value / count
