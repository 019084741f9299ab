"""Folder-vs-folder evaluation: the metrics of the ScaleCrafter tables in one call.

=========  =====================  ==========================================================
metric     features               distance
=========  =====================  ==========================================================
``fid``    pool3, clean 299²      Fréchet distance
``kid``    pool3, clean 299²      unbiased cubic-kernel MMD², mean over subsets
``pfid``   pool3 of native crops  Fréchet distance (patch FID, Chai et al. 2022)
``pkid``   pool3 of native crops  KID on the same crops
``sfid``   mixed_6/conv[:7]       Fréchet distance (sFID, Nash et al. 2021)
``skid``   mixed_6/conv[:7]       KID on the spatial features
=========  =====================  ==========================================================
"""
from __future__ import annotations

import os
import platform
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from .features import (IMAGE_EXTENSIONS, RESIZE_ID, FeatureSettings, FolderFeatures, default_cache_dir,
                       folder_features, list_image_files)
from .inception import load_fid_inception
from .metrics import EvalError, fid_from_features, kernel_inception_distance

ALL_METRICS = ("fid", "kid", "pfid", "pkid", "sfid", "skid")
METRIC_FEATURES = {
    "fid": "pool3", "kid": "pool3",
    "pfid": "patch_pool3", "pkid": "patch_pool3",
    "sfid": "spatial", "skid": "spatial",
}
METRIC_LABELS = {"fid": "FID", "kid": "KID", "pfid": "pFID", "pkid": "pKID", "sfid": "sFID", "skid": "sKID"}


def parse_metrics(spec) -> List[str]:
    """``"fid,kid"`` / ``["fid", "kid"]`` / ``"all"`` -> ordered, validated metric names."""
    if isinstance(spec, str):
        items = [s.strip().lower() for s in spec.split(",") if s.strip()]
    else:
        items = [str(s).strip().lower() for s in spec]
    if items == ["all"]:
        return list(ALL_METRICS)
    unknown = [m for m in items if m not in ALL_METRICS]
    if unknown or not items:
        raise EvalError(f"unknown metric(s) {unknown or spec!r}; choose from {','.join(ALL_METRICS)} or 'all'")
    return [m for m in ALL_METRICS if m in items]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_metrics(
    gen: FolderFeatures,
    ref: FolderFeatures,
    metrics: Sequence[str],
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    device=None,
) -> Dict[str, float]:
    """Metric values from already extracted features (``gen`` first, ``ref`` second)."""
    values: Dict[str, float] = {}
    for m in metrics:
        kind = METRIC_FEATURES[m]
        fg, fr = gen.features[kind], ref.features[kind]
        label = METRIC_LABELS[m]
        if m.endswith("fid"):
            values[m] = fid_from_features(
                fg, fr, names=(f"{label}: generated set ({gen.folder})", f"{label}: reference set ({ref.folder})"))
        else:
            res = kernel_inception_distance(fg, fr, num_subsets=kid_subsets, subset_size=kid_subset_size,
                                            seed=seed, device=device)
            values[m] = res.mean
            values[f"{m}_std"] = res.std
            values[f"{m}_subset_size"] = res.subset_size
            values[f"{m}_num_subsets"] = res.num_subsets
    return values


def evaluate_folders(
    gen,
    ref,
    metrics: Iterable[str] = ALL_METRICS,
    inception_weights: Optional[str] = None,
    device=None,
    batch_size: int = 50,
    num_workers: Optional[int] = None,
    crop: int = 299,
    crops_per_image: int = 1,
    seed: int = 0,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    cache_dir=None,
    use_cache: bool = True,
    progress: bool = True,
    strict: bool = False,
    model=None,
    identity: Optional[Dict[str, object]] = None,
) -> Dict[str, object]:
    """Compute ``metrics`` of the images under ``gen`` against those under ``ref``.

    Returns a JSON-serialisable dict: ``metrics`` (values; KIDs with ``*_std``), ``counts`` per
    folder, ``settings``, ``feature_extractor`` identity, image sizes, skipped files and cache hits.
    ``model``/``identity`` may be passed to reuse an already loaded network.
    """
    metrics = parse_metrics(metrics)
    for name, folder in (("gen", gen), ("ref", ref)):
        if not os.path.isdir(folder):
            raise EvalError(f"--{name} is not a folder: {folder}")
    if crop < 1 or crops_per_image < 1 or batch_size < 1:
        raise EvalError("crop, crops_per_image and batch_size must be positive")
    # cheap checks before the network is loaded
    for name, folder in (("gen", gen), ("ref", ref)):
        n_files = len(list_image_files(folder))
        if n_files == 0:
            raise EvalError(f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) found under {folder}")
        if n_files < 2:
            raise EvalError(f"--{name} {folder} holds {n_files} image; FID/KID need at least 2 images per set")
    device = torch.device(device) if device is not None else default_device()
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    if model is None:
        model, identity = load_fid_inception(inception_weights, device=device)
    else:
        model = model.to(device)
        if identity is None:
            raise ValueError("pass the identity dict together with a preloaded model")
    kinds = list(dict.fromkeys(METRIC_FEATURES[m] for m in metrics))
    settings = FeatureSettings(crop=crop, crops_per_image=crops_per_image, seed=seed)
    common = dict(device=device, batch_size=batch_size, num_workers=num_workers, progress=progress,
                  strict=strict)
    cache_dir = cache_dir or default_cache_dir()
    ff = {}
    for name, folder in (("gen", gen), ("ref", ref)):
        ff[name] = folder_features(folder, model, str(identity["sha256"]), kinds, settings,
                                   cache_dir=cache_dir, use_cache=use_cache, desc=f"{name} features",
                                   **common)
    values = compute_metrics(ff["gen"], ff["ref"], metrics, kid_subsets=kid_subsets,
                             kid_subset_size=kid_subset_size, seed=seed, device=device)
    settings_out: Dict[str, object] = {
        "metrics": metrics,
        "resize": RESIZE_ID,
        "input_size": 299,
        "kid": {"num_subsets": kid_subsets, "subset_size": kid_subset_size, "kernel": "(x.y/d + 1)^3",
                "estimator": "unbiased MMD^2", "seed": seed},
        "device": str(device),
        "batch_size": batch_size,
    }
    if any(METRIC_FEATURES[m] == "patch_pool3" for m in metrics):
        settings_out["patches"] = {"crop": crop, "crops_per_image": crops_per_image, "seed": seed,
                                   "placement": "uniform random, at native resolution",
                                   "resized_to_299": crop != 299}
    if any(METRIC_FEATURES[m] == "spatial" for m in metrics):
        settings_out["spatial"] = "mixed_6/conv channels 0-6 (17x17x7 = 2023-d)"
    return {
        "gen": os.path.abspath(gen),
        "ref": os.path.abspath(ref),
        "metrics": values,
        "counts": {k: v.summary() for k, v in ff.items()},
        "settings": settings_out,
        "feature_extractor": identity,
        "image_sizes": {k: v.sizes for k, v in ff.items()},
        "skipped_files": {k: [list(s) for s in v.skipped[:100]] for k, v in ff.items()},
        "cache": {"dir": str(cache_dir) if use_cache else None,
                  "hits": {k: v.cached for k, v in ff.items()}},
        "software": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "pillow": _pil_version()},
    }


def _pil_version() -> str:
    import PIL
    return getattr(PIL, "__version__", "?")


def format_table(results: Sequence[Dict[str, object]], names: Optional[Sequence[str]] = None,
                 header: bool = True) -> str:
    """Markdown table rows: name, image counts and each metric (FID-like 2 decimals, KID-like 5)."""
    metric_cols: List[str] = []
    for r in results:
        for m in r["settings"]["metrics"]:
            if m not in metric_cols:
                metric_cols.append(m)
    metric_cols = [m for m in ALL_METRICS if m in metric_cols]
    lines = []
    if header:
        cols = ["gen", "ref", "n_gen", "n_ref"] + [METRIC_LABELS[m] for m in metric_cols]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
    for i, r in enumerate(results):
        name = names[i] if names else os.path.basename(str(r["gen"]).rstrip("/"))
        cells = [name, os.path.basename(str(r["ref"]).rstrip("/")),
                 str(r["counts"]["gen"]["images"]), str(r["counts"]["ref"]["images"])]
        for m in metric_cols:
            v = r["metrics"].get(m)
            if v is None:
                cells.append("-")
            elif m.endswith("fid"):
                cells.append(f"{v:.2f}")
            else:
                cells.append(f"{v:.5f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["ALL_METRICS", "METRIC_FEATURES", "parse_metrics", "compute_metrics", "evaluate_folders",
           "format_table", "default_device"]
