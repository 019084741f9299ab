"""Helpers shared by the sampling scripts: model loading, size checks, prompt files, image writing."""
import json
import os
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo


class UsageError(ValueError):
    """Bad user input; the message names the input and the fix."""


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def seed_everything(seed):
    """Seed python, numpy and torch (all devices), like pytorch-lightning's seed_everything."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def check_size(H, W, f):
    """Image sides must be positive multiples of the first stage's downsampling factor f."""
    for name, v in (("--H", H), ("--W", W)):
        if v <= 0 or v % f:
            lo = max(f, (v // f) * f)
            hi = lo + f if v % f else lo
            raise UsageError(f"{name} {v} is not a multiple of {f} (the latent downsampling factor --f); "
                             f"nearest valid sizes: {lo} or {hi}")


def read_prompt_file(path, repeat=1):
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--from-file {path}: no such file")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UsageError(f"--from-file {path}: the file has no prompts (one prompt per non-empty line)")
    return [p for p in prompts for _ in range(repeat)]


def chunk(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def next_free_index(folder, pattern=r"^(\d+)\.png$"):
    """1 + the highest number already used in ``folder``: numbering continues, nothing is overwritten."""
    rx = re.compile(pattern)
    nums = [int(m.group(1)) for name in os.listdir(folder) if (m := rx.match(name))] if os.path.isdir(folder) else []
    return max(nums) + 1 if nums else 0


def to_pil(x):
    """A (C,H,W) tensor in [-1, 1] to an RGB PIL image."""
    x = torch.clamp((x.float() + 1.0) / 2.0, 0.0, 1.0)
    arr = (255.0 * x.permute(1, 2, 0).cpu().numpy()).round().astype(np.uint8)
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr)


def save_png(img, path, metadata=None):
    """Write atomically (temp file + rename) with text metadata: an interrupted run leaves no partial file."""
    path = Path(path)
    info = PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(k, v if isinstance(v, str) else json.dumps(v, sort_keys=True))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        img.save(tmp, pnginfo=info)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def make_grid(images, n_rows):
    """Tile equally sized PIL images, ``n_rows`` images per row, 2 px padding."""
    n_rows = max(1, min(n_rows, len(images)))
    w, h = images[0].size
    cols = n_rows
    rows = (len(images) + cols - 1) // cols
    pad = 2
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (0, 0, 0))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def cast_for_half_precision(model, dtype=torch.float16, cast=None):
    """Store the UNet's and the text encoders' weights in ``dtype`` (run under autocast of the same dtype).

    The VAE and the noise schedule stay float32 (SDXL's VAE overflows float16; the sampler's per-step
    coefficients need float32). Compared with float32 weights under autocast this halves the weight memory:
    SDXL's UNet is 5.1 GB instead of 10.3 GB. ``cast(module, dtype)`` defaults to ``module.to(dtype)``
    (``ldm.fake_cuda.cast_parameters_`` for fake tensors).
    """
    cast = cast or (lambda module, dt: module.to(dt))
    for name in ("model", "cond_stage_model", "conditioner"):
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            cast(module, dtype)
    return model
