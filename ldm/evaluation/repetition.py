"""Objective object counter for the repetition demo, and its statistics.

An "object" is a connected blob of saturated colour: the per-pixel channel spread ``max(R,G,B) -
min(R,G,B)`` of a lightly blurred image is above :data:`SPREAD_THRESHOLD`. Grey or dark backgrounds
(however noisy, once blurred) have a small spread; the four demo colours have a large one. This keys
on colour rather than brightness because sampled backgrounds drift from black to mid grey.

Defaults at side ``s`` (``s = sqrt(H*W)``, so 32, 64, 128 for the square demo sizes):

* blur sigma ``0.75 * sqrt(s / 32)`` px (0.75 / 1.06 / 1.5): enough to average per-pixel colour noise
  away and to keep one soft object in one piece, small enough that two copies a few pixels apart stay
  separate. It grows only with the square root of the side because repeated copies keep the
  *training* size in pixels, so a blur proportional to the side would merge them at 128x128.
* minimum blob area ``8 * s / 32`` px (8 / 16 / 32): removes noise specks and soft-edge fragments
  but stays well below the smallest training-size object (a 12 px triangle, ~62 px), which is what a
  repeated copy looks like at any resolution.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

SPREAD_THRESHOLD = 0.25  # in [0, 1] units (64/255); demo colours have spread >= 0.66, grey noise ~0
BLUR_SIGMA_32 = 0.75     # blur sigma in px at a 32 px side
MIN_AREA_32 = 8          # minimum blob area in px at a 32 px side
Z_95 = 1.959963984540054


def _side(h: int, w: int) -> float:
    return math.sqrt(h * w)


def default_blur(h: int, w: int) -> float:
    return BLUR_SIGMA_32 * math.sqrt(_side(h, w) / 32.0)


def default_min_area(h: int, w: int) -> float:
    return MIN_AREA_32 * _side(h, w) / 32.0


def _to_float01(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {img.shape}")
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    return img.astype(np.float32)  # assume float in [0, 1]


def object_mask(img: np.ndarray, blur: Optional[float] = None,
                threshold: float = SPREAD_THRESHOLD) -> np.ndarray:
    """Boolean HxW mask of saturated-colour pixels after the light blur (uint8, or float in [0, 1])."""
    x = _to_float01(img)
    h, w = x.shape[:2]
    sigma = default_blur(h, w) if blur is None else float(blur)
    if sigma > 0:
        x = ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest")
    return (x.max(axis=-1) - x.min(axis=-1)) >= threshold


def count_objects(img: np.ndarray, min_area: Optional[float] = None, blur: Optional[float] = None,
                  threshold: float = SPREAD_THRESHOLD) -> Tuple[int, int, List[int]]:
    """Count colour blobs in one HxWx3 image.

    Returns ``(n_objects, total_area_px, areas)`` with ``areas`` the kept blob sizes in px, largest
    first. Blobs are 8-connected; those smaller than ``min_area`` are ignored.
    """
    mask = object_mask(img, blur=blur, threshold=threshold)
    h, w = mask.shape
    min_area = default_min_area(h, w) if min_area is None else float(min_area)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return 0, 0, []
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    areas = sorted((int(a) for a in sizes if a >= min_area), reverse=True)
    return len(areas), int(sum(areas)), areas


def wilson_interval(k: int, n: int, z: float = Z_95) -> Tuple[float, float]:
    """Wilson score interval for a binomial share k/n; sane at k = 0 or k = n, unlike the normal one."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


CountLike = Union[int, Tuple[int, int, Sequence[int]]]


def summarize_counts(counts: Iterable[CountLike], total_areas: Optional[Sequence[float]] = None,
                     image_area: Optional[float] = None, z: float = Z_95) -> Dict[str, object]:
    """Shares of samples with exactly one / more than one / no object, each with a Wilson interval.

    ``counts`` holds ints or :func:`count_objects` results (then total areas are taken from them).
    With ``image_area`` (H*W px) the mean total object area relative to the image is reported too,
    which tells one enlarged object (area grows) apart from repeated copies (count grows).
    """
    ns: List[int] = []
    areas: List[float] = []
    for c in counts:
        if isinstance(c, (tuple, list)):
            ns.append(int(c[0]))
            areas.append(float(c[1]))
        else:
            ns.append(int(c))
    if total_areas is not None:
        areas = [float(a) for a in total_areas]
        if len(areas) != len(ns):
            raise ValueError("total_areas and counts differ in length")
    n = len(ns)
    arr = np.asarray(ns, dtype=np.int64)
    k_one, k_multi, k_none = int((arr == 1).sum()), int((arr > 1).sum()), int((arr == 0).sum())
    out: Dict[str, object] = {"n": n, "n_one": k_one, "n_multi": k_multi, "n_none": k_none}
    for name, k in (("one", k_one), ("multi", k_multi), ("none", k_none)):
        out[f"share_{name}"] = k / n if n else float("nan")
        out[f"ci_{name}"] = wilson_interval(k, n, z)
    out["mean_count"] = float(arr.mean()) if n else float("nan")
    if areas and image_area:
        out["mean_area_frac"] = float(np.mean(areas)) / float(image_area)
    else:
        out["mean_area_frac"] = None
    return out


def summarize_images(images: Iterable[np.ndarray], **count_kwargs) -> Dict[str, object]:
    """Count every image (all the same size) and summarise; convenience for evaluation scripts."""
    results, image_area = [], None
    for img in images:
        image_area = img.shape[0] * img.shape[1]
        results.append(count_objects(img, **count_kwargs))
    return summarize_counts(results, image_area=image_area)


def _fmt_share(s: Mapping[str, object], name: str, digits: int) -> str:
    lo, hi = s[f"ci_{name}"]
    return f"{s[f'share_{name}']:.{digits}f} [{lo:.2f}, {hi:.2f}]"


def format_table(rows: Sequence[Union[Tuple[str, Mapping], Mapping]], digits: int = 3,
                 label: str = "setting") -> str:
    """Markdown table of summaries; ``rows`` are ``(name, summary)`` pairs or summaries with a ``label`` key."""
    header = f"| {label} | n | exactly one [95% CI] | more than one [95% CI] | none [95% CI] | mean count | object area / image |"
    lines = [header, "|---|---:|---|---|---|---:|---:|"]
    for row in rows:
        name, s = (row[0], row[1]) if isinstance(row, (tuple, list)) else (row[label], row)
        area = s.get("mean_area_frac")
        area_txt = "–" if area is None else f"{area:.3f}"
        lines.append(
            f"| {name} | {s['n']} | {_fmt_share(s, 'one', digits)} | {_fmt_share(s, 'multi', digits)} | "
            f"{_fmt_share(s, 'none', digits)} | {s['mean_count']:.2f} | {area_txt} |"
        )
    return "\n".join(lines) + "\n"
