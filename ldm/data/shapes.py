"""Procedural "one coloured shape" dataset for the CPU repetition demo.

Every image holds exactly one filled shape (circle, square or triangle) in one of four saturated
colours on a dark, mildly noisy background. The object is large (35-60 % of the side) and roughly
centred, so a model trained on it has a strong "one object in the middle" prior; sampling above the
training size then shows object repetition clearly, and an objective counter
(:mod:`ldm.evaluation.repetition`) can measure it. Everything is generated from ``(seed, index)``;
nothing is downloaded.

Coordinates: ``center = (x, y)`` in pixels, pixel ``(row i, col j)`` covers ``[j, j+1) x [i, i+1)``,
so the image centre is ``(res / 2, res / 2)``. ``size_px`` is the shape's diameter / side / triangle
base (all three shapes have a ``size_px`` wide bounding box).
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import numpy as np

try:  # the dataset class needs torch; the renderer and the counter tests do not
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover - torch is in requirements.txt
    _TorchDataset = object

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
# saturated RGB in [0, 1]; each has a large max-min channel spread, which is what the counter keys on
COLORS: Dict[str, Tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.78, 0.12),
    "blue": (0.20, 0.32, 0.95),
    "yellow": (0.95, 0.83, 0.08),
}
COLOR_NAMES: Tuple[str, ...] = tuple(COLORS)
NUM_CLASSES = len(SHAPES) * len(COLOR_NAMES)

# label = shape_index * len(COLOR_NAMES) + color_index
CAPTIONS = [f"a {c} {s}" for s in SHAPES for c in COLOR_NAMES]
VOCAB = ["a", *COLOR_NAMES, *SHAPES]

# geometry as fractions of the image side (12-20 px diameter, +-4 px jitter at 32x32)
SIZE_RANGE = (0.375, 0.625)
JITTER = 0.125
# background: dark grey level drawn per image, plus mild per-pixel, per-channel Gaussian noise
BG_LEVEL_RANGE = (0.06, 0.14)
NOISE_STD = 0.025
SUPERSAMPLE = 4  # sub-samples per pixel side for anti-aliased coverage


def label_of(shape: str, color: str) -> int:
    return SHAPES.index(shape) * len(COLOR_NAMES) + COLOR_NAMES.index(color)


def caption_of(shape: str, color: str) -> str:
    return CAPTIONS[label_of(shape, color)]


def _inside(shape: str, x: np.ndarray, y: np.ndarray, size_px: float, cx: float, cy: float) -> np.ndarray:
    half = size_px / 2.0
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        # equilateral, pointing up, bounding box centred on (cx, cy)
        h = size_px * math.sqrt(3.0) / 2.0
        depth = dy + h / 2.0  # distance below the apex
        return (depth >= 0) & (depth <= h) & (np.abs(dx) <= depth * half / h)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def shape_coverage(shape: str, size_px: float, center: Sequence[float], resolution,
                   supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel covered by the shape (float32 HxW in [0, 1]); supersampled for soft edges."""
    h, w = (resolution, resolution) if np.isscalar(resolution) else tuple(resolution)
    s = int(supersample)
    offs = (np.arange(s) + 0.5) / s
    ys = (np.arange(h)[:, None] + offs[None, :]).reshape(-1)
    xs = (np.arange(w)[:, None] + offs[None, :]).reshape(-1)
    inside = _inside(shape, xs[None, :], ys[:, None], float(size_px), float(center[0]), float(center[1]))
    return inside.reshape(h, s, w, s).sum(axis=(1, 3), dtype=np.float32) / np.float32(s * s)


def shape_mask(shape: str, size_px: float, center: Sequence[float], resolution) -> np.ndarray:
    """Boolean ground-truth mask (coverage >= 0.5); independent of the counter, used to check it."""
    return shape_coverage(shape, size_px, center, resolution) >= 0.5


def background(resolution, rng: np.random.Generator) -> np.ndarray:
    """Dark grey float HxWx3 canvas in [0, 1] (noise is added later, by :func:`finish`)."""
    h, w = (resolution, resolution) if np.isscalar(resolution) else tuple(resolution)
    level = rng.uniform(*BG_LEVEL_RANGE)
    return np.full((h, w, 3), level, dtype=np.float32)


def _blend(canvas: np.ndarray, coverage: np.ndarray, color) -> np.ndarray:
    rgb = np.asarray(COLORS[color] if isinstance(color, str) else color, dtype=np.float32)
    cov = coverage[..., None]
    canvas *= 1.0 - cov
    canvas += cov * rgb
    return canvas


def paint_shape(canvas: np.ndarray, shape: str, color, size_px: float, center: Sequence[float]) -> np.ndarray:
    """Alpha-blend one filled shape onto a float HxWx3 canvas in place (also returned)."""
    return _blend(canvas, shape_coverage(shape, size_px, center, canvas.shape[:2]), color)


def finish(canvas: np.ndarray, rng: np.random.Generator, noise_std: float = NOISE_STD) -> np.ndarray:
    """Add the mild sensor-like noise and quantise to uint8, like a real image file."""
    noisy = canvas + rng.normal(0.0, noise_std, size=canvas.shape).astype(np.float32)
    return np.clip(np.round(noisy * 255.0), 0, 255).astype(np.uint8)


def render_shape(shape: str, color, size_px: float, center: Sequence[float], resolution,
                 rng: np.random.Generator) -> np.ndarray:
    """One image: background + one shape + noise, uint8 HxWx3. ``rng`` drives background and noise."""
    canvas = background(resolution, rng)
    paint_shape(canvas, shape, color, size_px, center)
    return finish(canvas, rng)


def sample_spec(rng: np.random.Generator, resolution: int) -> dict:
    """Draw shape, colour, size and jittered centre for one image at ``resolution``."""
    si = int(rng.integers(len(SHAPES)))
    ci = int(rng.integers(len(COLOR_NAMES)))
    size_px = float(rng.uniform(*SIZE_RANGE)) * resolution
    jx, jy = rng.uniform(-JITTER, JITTER, size=2) * resolution
    center = (resolution / 2.0 + float(jx), resolution / 2.0 + float(jy))
    shape, color = SHAPES[si], COLOR_NAMES[ci]
    return {
        "shape": shape,
        "color": color,
        "size_px": size_px,
        "center": center,
        "label": si * len(COLOR_NAMES) + ci,
        "caption": caption_of(shape, color),
    }


class ShapesDataset(_TorchDataset):
    """Infinite-style procedural dataset; item ``i`` depends only on ``(seed, i)``.

    Returns CompVis-style dicts: ``image`` float32 HxWx3 in [-1, 1] (channels last, as the LDM
    datasets return it), ``caption`` str and ``label`` int (index into :data:`CAPTIONS`).
    """

    def __init__(self, size: int = 32, length: int = 100000, seed: int = 0):
        self.size = int(size)
        self.length = int(length)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.length

    def _rng(self, i: int) -> np.random.Generator:
        # SeedSequence over (seed, i): independent streams per item, no dependence on worker order
        return np.random.default_rng([self.seed, int(i)])

    def render(self, i: int) -> Tuple[np.ndarray, np.ndarray, dict]:
        """uint8 image, its ground-truth boolean mask, and the spec of item ``i``."""
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = self._rng(i)
        spec = sample_spec(rng, self.size)
        # same draws and result as render_shape(), but the coverage is computed once for image and mask
        canvas = background(self.size, rng)
        cov = shape_coverage(spec["shape"], spec["size_px"], spec["center"], self.size)
        img = finish(_blend(canvas, cov, spec["color"]), rng)
        return img, cov >= 0.5, spec

    def __getitem__(self, i: int) -> dict:
        img, _, spec = self.render(i)
        return {
            "image": (img.astype(np.float32) / 127.5 - 1.0),
            "caption": spec["caption"],
            "label": spec["label"],
        }
