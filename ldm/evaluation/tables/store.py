"""Features of the sample and reference folders (:class:`FeatureStore`: once per folder and kind, cached on disk)
and the cells computed from them (:func:`evaluate`)."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import shape_features
from ..features import (FeatureSettings, _load_cached, _store_cached, cache_key, default_cache_dir,
                        folder_fingerprint, list_image_files)
from ..metrics import EvalError, EvalWarning, fid_from_features, kernel_inception_distance
from ..repetition import wilson_interval
from .plan import Plan
from .spec import MetricDef, SpecError


# --------------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------------
class ShapeExtractor:
    """Shape descriptors (:mod:`ldm.evaluation.shape_features`): no weights, milliseconds per image."""

    name = "shapes"
    kinds = (shape_features.KIND,)

    def __init__(self, **options):
        if options:
            raise SpecError(f"features.shapes takes no options, got {sorted(options)}")

    def identity(self) -> Dict:
        return shape_features.identity()

    def settings(self) -> FeatureSettings:
        return FeatureSettings()

    def compute(self, folder, relpaths, kinds) -> Dict[str, np.ndarray]:
        from ..features import load_rgb
        feats = np.stack([shape_features.describe_image(load_rgb(os.path.join(folder, r))) for r in relpaths])
        return {shape_features.KIND: feats.astype(np.float32)}


PATCH_SPATIAL = "patch_spatial"  # spatial (mixed_6/conv) features of the native-resolution crops of patch_pool3


@dataclass
class TableFeatureSettings(FeatureSettings):
    """:class:`FeatureSettings` whose cache key of ``patch_spatial`` carries the crop settings (as patch_pool3's)."""

    def key_for(self, kind: str) -> Dict[str, object]:
        d = super().key_for(kind)
        if kind == PATCH_SPATIAL:
            d.update(crop=self.crop, crops_per_image=self.crops_per_image, seed=self.seed)
        return d


class _SpatialOfCrops:
    """The Inception network answering a request for pool3 with its spatial features: run through
    ``extract_features(kinds=["patch_pool3"])`` it yields the spatial features of the same native crops."""

    def __init__(self, net):
        self.net = net

    def parameters(self):
        return self.net.parameters()

    def __call__(self, x, outputs=("pool3",)):
        return {"pool3": self.net(x, outputs=("spatial",))["spatial"]}


class InceptionExtractor:
    """The standard FID Inception-v3 (``ldm.evaluation.inception``) from a local weights file; the features and
    their cache are those of ``scripts/eval_fid.py`` (same cache keys), plus ``patch_spatial``: the spatial
    features of the native-resolution crops (sFID/sKID without downsampling the image)."""

    name = "inception"
    kinds = ("pool3", "spatial", "patch_pool3", PATCH_SPATIAL)

    def __init__(self, weights=None, device=None, batch_size=50, num_workers=0, crop=299, crops_per_image=1, seed=0):
        self.weights, self.device, self.batch_size, self.num_workers = weights, device, batch_size, num_workers
        self._settings = TableFeatureSettings(crop=int(crop), crops_per_image=int(crops_per_image), seed=int(seed))
        self._model = self._identity = None

    def identity(self) -> Dict:
        if self._identity is None:
            from ..inception import EXTRACTOR_NAME, file_sha256, resolve_weights_path
            p = resolve_weights_path(self.weights)
            self._identity = {"name": EXTRACTOR_NAME, "weights_file": p.name, "sha256": file_sha256(p),
                              "weights_path": str(p)}
        return self._identity

    def settings(self) -> FeatureSettings:
        return self._settings

    def compute(self, folder, relpaths, kinds) -> Dict[str, np.ndarray]:
        from ..evaluate import default_device
        from ..inception import load_fid_inception
        device = self.device or default_device()
        if self._model is None:
            self._model, ident = load_fid_inception(self.weights, device=device)
            self._identity = {**self.identity(), **ident}
        return self._extract(folder, relpaths, kinds, device)

    def _extract(self, folder, relpaths, kinds, device) -> Dict[str, np.ndarray]:
        from ..features import extract_features
        out = {}
        standard = [k for k in kinds if k != PATCH_SPATIAL]
        if standard:
            out.update(extract_features(folder, self._model, standard, self._settings, device=device,
                                        batch_size=self.batch_size, num_workers=self.num_workers, progress=False,
                                        relpaths=relpaths).features)
        if PATCH_SPATIAL in kinds:  # the crops of patch_pool3 (same draws), through the spatial output
            res = extract_features(folder, _SpatialOfCrops(self._model), ["patch_pool3"], self._settings,
                                   device=device, batch_size=self.batch_size, num_workers=self.num_workers,
                                   progress=False, relpaths=relpaths)
            out[PATCH_SPATIAL] = res.features["patch_pool3"]
        return out


EXTRACTORS: Dict[str, Callable[..., object]] = {"shapes": ShapeExtractor, "inception": InceptionExtractor}


class FeatureStore:
    """Features per (folder, extractor, kind): computed once per run (memory) and once per folder version
    (the disk cache of :mod:`ldm.evaluation.features`, keyed by the folder listing, the kind and its settings,
    and the extractor's sha256). ``computed`` records every extraction that was not a cache hit."""

    def __init__(self, spec_features: Dict, cache_dir=None, use_cache=True, device=None):
        self.options = spec_features or {}
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.use_cache = use_cache
        self.device = device
        self._extractors: Dict[str, object] = {}
        self._memo: Dict[Tuple[str, str, str], np.ndarray] = {}
        self.computed: List[Dict] = []
        self.cache_hits: List[Dict] = []

    def extractor(self, name):
        if name not in self._extractors:
            opts = dict(self.options.get(name) or {})
            if name == "inception" and self.device and "device" not in opts:
                opts["device"] = self.device
            try:
                self._extractors[name] = EXTRACTORS[name](**opts)
            except TypeError as err:
                raise SpecError(f"features.{name}: {err}") from None
        return self._extractors[name]

    def get(self, folder, extractor: str, kinds: Sequence[str]) -> Dict[str, np.ndarray]:
        folder = Path(folder)
        key_folder = str(folder.resolve())
        want = [k for k in dict.fromkeys(kinds) if (key_folder, extractor, k) not in self._memo]
        if want:
            ex = self.extractor(extractor)
            relpaths = list_image_files(folder)
            if not relpaths:
                raise EvalError(f"no images in {folder}")
            fp = folder_fingerprint(folder, relpaths)
            ident = ex.identity()
            todo = []
            for k in want:
                hit = _load_cached(self.cache_dir, cache_key(fp, k, ex.settings(), str(ident["sha256"]))) \
                    if self.use_cache else None
                if hit is not None and hit[0].shape[0] == len(relpaths):
                    self._memo[(key_folder, extractor, k)] = hit[0]
                    self.cache_hits.append({"folder": str(folder), "extractor": extractor, "kind": k})
                else:
                    todo.append(k)
            if todo:
                feats = ex.compute(str(folder), relpaths, todo)
                self.computed.append({"folder": str(folder), "extractor": extractor, "kinds": todo,
                                      "images": len(relpaths)})
                for k in todo:
                    arr = np.asarray(feats[k], dtype=np.float32)
                    self._memo[(key_folder, extractor, k)] = arr
                    if self.use_cache:
                        info = {"folder": key_folder, "kind": k, "n_files": len(relpaths), "n_images": len(relpaths),
                                "skipped": [], "sizes": {}, "settings": ex.settings().key_for(k),
                                "extractor_sha256": str(ident["sha256"]), "extractor": extractor}
                        try:
                            _store_cached(self.cache_dir, cache_key(fp, k, ex.settings(), str(ident["sha256"])),
                                          arr, info)
                        except OSError as err:
                            warnings.warn(f"could not write the feature cache in {self.cache_dir}: {err}", EvalWarning)
        return {k: self._memo[(key_folder, extractor, k)] for k in kinds}


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------
def compute_cell(metric: MetricDef, gen: np.ndarray, ref: Optional[np.ndarray], kid_subsets=100,
                 kid_subset_size=1000, seed=0) -> Dict:
    n = int(gen.shape[0])
    if metric.stat in ("fid", "kid"):
        g, r = gen, ref
        if metric.extractor == "shapes":
            g, r = shape_features.descriptors_for_distance(g), shape_features.descriptors_for_distance(r)
        if metric.stat == "fid":
            return {"value": float(fid_from_features(g, r)), "n": n, "n_ref": int(r.shape[0])}
        res = kernel_inception_distance(g, r, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
        return {"value": res.mean, "std": res.std, "subset_size": res.subset_size, "num_subsets": res.num_subsets,
                "n": n, "n_ref": int(r.shape[0])}
    counts = shape_features.count_column(gen)
    if metric.stat.startswith("rate_"):
        hit = {"rate_multi": counts > 1, "rate_one": counts == 1, "rate_none": counts == 0}[metric.stat]
        k = int(hit.sum())
        lo, hi = wilson_interval(k, n)
        return {"value": k / n if n else float("nan"), "k": k, "n": n, "ci95": [lo, hi]}
    if metric.stat == "count":
        return {"value": float(counts.mean()), "std": float(counts.std()), "n": n}
    if metric.stat == "area":
        return {"value": float(np.asarray(gen)[:, 1].mean()), "n": n}
    raise ValueError(metric.stat)


def evaluate(p: Plan, store: FeatureStore, kid_subsets=100, kid_subset_size=1000, seed=0, log=print) -> Dict:
    """Every cell of the selected table(s): {table id: {row qid: {column id: cell}}} plus what was used."""
    cells: Dict[str, Dict[str, Dict[str, Dict]]] = {}
    caught: List[str] = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", EvalWarning)
        for t in p.spec.tables:
            cells[t.id] = {}
            # one pass per folder and extractor: the kinds every column needs from it
            needs: Dict[Tuple[str, str], set] = {}
            for row in t.rows:
                for c in t.columns:
                    needs.setdefault((str(p.row_job[row.qid].samples), c.metric.extractor), set()).add(c.metric.kind)
                    if c.reference:
                        needs.setdefault((str(p.reference_folder(t, row, c.reference)), c.metric.extractor),
                                         set()).add(c.metric.kind)
            for (folder, ex), kinds in needs.items():
                if not Path(folder).is_dir():
                    raise EvalError(f"table {t.id!r}: {folder} does not exist (a reference folder that is not there, "
                                    "or a sampling job that has not run)")
                store.get(folder, ex, sorted(kinds))
            for row in t.rows:
                cells[t.id][row.qid] = {}
                for c in t.columns:
                    m = c.metric
                    gen = store.get(p.row_job[row.qid].samples, m.extractor, [m.kind])[m.kind]
                    ref = None
                    if c.reference:
                        ref = store.get(p.reference_folder(t, row, c.reference), m.extractor, [m.kind])[m.kind]
                    cells[t.id][row.qid][c.id] = compute_cell(m, gen, ref, kid_subsets, kid_subset_size, seed)
        for w in seen:
            text = str(w.message)
            if text not in caught:
                caught.append(text)
    return {"cells": cells, "warnings": caught}
