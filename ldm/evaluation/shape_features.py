"""Shape descriptors: the demo model's stand-in for Inception features (no weights, no training).

The demo dataset (:mod:`ldm.data.shapes`) is procedural and its factors of variation are known exactly:
one object per image, one of three shapes and four colours, 37.5-62.5 % of the side, centred within
+-12.5 %, on a dark, mildly noisy background. A descriptor of those factors is a feature space in which
"how far is this set of images from the training distribution" has a meaning, which a randomly
initialised Inception does not give (and downloadable weights are not available offline).

Every image is described at its own resolution by the object counter of
:mod:`ldm.evaluation.repetition` (colour blobs, with blur and minimum area scaled to the side), in units
that do not depend on the image size (fractions of the image), so 32x32 references and 64x64/128x128
samples are compared without resizing. The 13 columns (:data:`DESCRIPTOR_NAMES`):

=====  ======================  ===========================================================================
 col   name                    what it measures (training distribution)
=====  ======================  ===========================================================================
 0     ``log2_count``          log2(1 + number of objects) (1.0: one object; 2.0: three; 3.0: seven)
 1     ``area``                total object area / image area (~0.1-0.4)
 2     ``largest_area``        area of the largest object / image area
 3     ``second_area``         area of the second largest object / image area (0 in training)
 4     ``fill``                largest object: area / bounding-box area (circle 0.79, square 1, triangle 0.5)
 5     ``aspect``              largest object: min(w, h) / max(w, h) of its bounding box (~1)
 6-8   ``r``, ``g``, ``b``     largest object: mean colour in [0, 1] (the four saturated colours)
 9-10  ``cx``, ``cy``          largest object: centroid / (width, height) (0.5 +- 0.125)
 11    ``bg_level``            mean grey level of the background (0.06-0.14)
 12    ``bg_noise``            std of the background minus its 3x3 median (~0.02: the pixel noise)
=====  ======================  ===========================================================================

Columns of an image with no object are 0 except the background ones. The raw descriptors are what the
feature cache stores; :func:`descriptors_for_distance` is what the Fréchet and kernel distances see
(the same here: every column is already in comparable, bounded units; a count of 1 -> 3 objects moves
column 0 by 1.0, as a change of the whole image area would move an area column).
"""
from __future__ import annotations

import hashlib
import inspect
from typing import Dict, Sequence

import numpy as np
from scipy import ndimage

from . import repetition

DESCRIPTOR_NAMES = ("log2_count", "area", "largest_area", "second_area", "fill", "aspect", "r", "g", "b",
                    "cx", "cy", "bg_level", "bg_noise")
DIM = len(DESCRIPTOR_NAMES)
KIND = "shape_descriptors"
VERSION = 1


def describe_image(img: np.ndarray) -> np.ndarray:
    """The 13 descriptors of one HxWx3 uint8 image (float64)."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {img.shape}")
    x = img.astype(np.float64) / 255.0 if img.dtype == np.uint8 else img.astype(np.float64)
    h, w = x.shape[:2]
    mask = repetition.object_mask(img)
    min_area = repetition.default_min_area(h, w)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    out = np.zeros(DIM, dtype=np.float64)
    kept = []
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        kept = sorted(((int(a), lab + 1) for lab, a in enumerate(sizes) if a >= min_area), reverse=True)
    total = float(h * w)
    out[0] = np.log2(1.0 + len(kept))
    if kept:
        out[1] = sum(a for a, _ in kept) / total
        area, lab = kept[0]
        out[2] = area / total
        out[3] = kept[1][0] / total if len(kept) > 1 else 0.0
        blob = labels == lab
        rows, cols = np.nonzero(blob)
        bh, bw = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        out[4] = area / float(bh * bw)
        out[5] = min(bh, bw) / float(max(bh, bw))
        out[6:9] = x[blob].mean(axis=0)
        out[9] = (cols.mean() + 0.5) / w
        out[10] = (rows.mean() + 0.5) / h
    bg = ~mask
    if bg.any():
        grey = x.mean(axis=-1)
        out[11] = float(grey[bg].mean())
        resid = grey - ndimage.median_filter(grey, size=3, mode="nearest")
        out[12] = float(resid[bg].std())
    return out


def describe_images(images: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack([describe_image(im) for im in images]) if len(images) else np.zeros((0, DIM))


def count_column(features: np.ndarray) -> np.ndarray:
    """Object counts (ints) back from column 0."""
    return np.rint(np.exp2(np.asarray(features)[:, 0]) - 1.0).astype(np.int64)


def descriptors_for_distance(features: np.ndarray) -> np.ndarray:
    return np.asarray(features, dtype=np.float64)


def identity() -> Dict[str, object]:
    """Name, version and a hash of this module's descriptor code and the counter's constants: the feature
    cache key (a change to the descriptor invalidates cached features)."""
    src = inspect.getsource(describe_image) + repr((repetition.SPREAD_THRESHOLD, repetition.BLUR_SIGMA_32,
                                                    repetition.MIN_AREA_32, VERSION, DESCRIPTOR_NAMES))
    return {"name": "shape-descriptors", "version": VERSION, "dim": DIM, "columns": list(DESCRIPTOR_NAMES),
            "sha256": hashlib.sha256(src.encode()).hexdigest(),
            "based_on": "ldm.evaluation.repetition.object_mask (colour blobs, side-scaled blur and minimum area)"}


__all__ = ["DESCRIPTOR_NAMES", "DIM", "KIND", "describe_image", "describe_images", "count_column",
           "descriptors_for_distance", "identity"]
