"""Paper tables from specs: rows (method + preset + model) x columns (metric + reference set).

``scripts/reproduce_table.py`` is the command line; this module is the library behind it:

* :func:`load_spec` reads a YAML table spec (``configs/tables/*.yaml``) and checks it: every row of one table
  samples the same prompts with the same seed and sampler settings (a row that says otherwise is an error
  naming it), methods are ``scripts/txt2img.py --method`` values (:func:`check_spec`, given the list at run
  time), presets load, metrics and reference sets exist. Errors are :class:`SpecError` and name the row,
  column or key.
* :func:`plan` turns the selected rows into sampling jobs, one per distinct ``txt2img.py --sweep`` command:
  rows that sample the same thing share a job, and the base-resolution samples (the reference of FID_b-type
  columns) are one job per model and prompt set, shared by every row and column that needs them.
* :class:`FeatureStore` computes features once per folder and feature kind (in memory for the run, on disk
  in the evaluation feature cache of :mod:`ldm.evaluation.features` across runs): real-image and
  base-sample references are extracted once, whatever the number of rows.
* :func:`evaluate` computes every cell; :func:`render_markdown`, :func:`write_csv` and the JSON written by
  the script hold the table with N, settings, machine, time per image and peak memory per row.
* Published values: a spec's ``sources:`` say where the papers' numbers were read, a table's ``published:``
  names its source (or says the values were not found), and each row carries its published cells.
  :func:`published_comparison` / :func:`render_published` put every reproduced cell beside the published one
  (ours ÷ published) and compare the rank order of the rows per column (Kendall's τ_b, same best row).
* :func:`estimate` is the dry run's GPU-hour estimate, with the basis of each figure: measured runs in the
  output folder, else the paper's own time of a row of the job, else the spec's ``timing`` entries (a time with
  its basis and source, or a ratio to the direct-sampling estimate at the same size), else extrapolation by
  pixel count.
* Optional rows (``optional: true``: variants beside the paper's protocol) are planned only when asked for
  (:func:`select`).

Spec format: ``docs/evaluation.md`` ("Reproducing the paper tables") and the commented ``configs/tables/``.
"""
from __future__ import annotations

import csv
import datetime
import fnmatch
import hashlib
import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from . import shape_features
from .features import (FeatureSettings, _load_cached, _store_cached, cache_key, default_cache_dir,
                       folder_fingerprint, list_image_files)
from .metrics import EvalError, EvalWarning, fid_from_features, kernel_inception_distance
from .repetition import wilson_interval
from ldm.samplers import SAMPLERS as SAMPLER_NAMES, sampler_class

REPO_ROOT = Path(__file__).resolve().parents[2]


class SpecError(ValueError):
    """A mistake in a table spec; the message names the spec, and the row, column or key."""


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricDef:
    name: str
    label: str
    extractor: str            # "inception" | "shapes"
    kind: str                 # feature kind of that extractor
    stat: str                 # "fid" | "kid" | "rate_multi" | "rate_one" | "rate_none" | "count" | "area"
    needs_reference: bool
    fmt: str
    description: str
    lower_is_better: bool = True


_INC = "standard FID Inception-v3 (local weights), "
METRICS: Dict[str, MetricDef] = {m.name: m for m in (
    MetricDef("fid", "FID", "inception", "pool3", "fid", True, "{:.2f}", _INC + "pool3, clean resize to 299²"),
    MetricDef("kid", "KID", "inception", "pool3", "kid", True, "{:.5f}", _INC + "pool3, cubic-kernel MMD²"),
    MetricDef("pfid", "pFID", "inception", "patch_pool3", "fid", True, "{:.2f}",
              _INC + "pool3 of random native-resolution crops (patch FID; FreeScale's FIDc)"),
    MetricDef("pkid", "pKID", "inception", "patch_pool3", "kid", True, "{:.5f}",
              _INC + "KID of the same crops (FreeScale's KIDc)"),
    MetricDef("sfid", "sFID", "inception", "spatial", "fid", True, "{:.2f}",
              _INC + "mixed_6/conv spatial features (the first 7 channels, 2023-d; Nash et al. 2021) of the image "
                     "resized to 299² (as the ADM evaluator that defines sFID resizes)"),
    MetricDef("skid", "sKID", "inception", "spatial", "kid", True, "{:.5f}",
              _INC + "KID of those spatial features of the resized image"),
    MetricDef("sfid_native", "sFID (native crops)", "inception", "patch_spatial", "fid", True, "{:.2f}",
              _INC + "the same mixed_6/conv spatial features (2023-d), of the native-resolution crops of pFID: "
                     "features before global pooling with no downsampling of the image (docs/evaluation.md §9)"),
    MetricDef("skid_native", "sKID (native crops)", "inception", "patch_spatial", "kid", True, "{:.5f}",
              _INC + "KID of the spatial features of the native-resolution crops"),
    MetricDef("shape_fd", "FD_shape", "shapes", shape_features.KIND, "fid", True, "{:.4f}",
              "Fréchet distance of the 13 shape descriptors (ldm/evaluation/shape_features.py)"),
    MetricDef("shape_kd", "KD_shape", "shapes", shape_features.KIND, "kid", True, "{:.4f}",
              "unbiased cubic-kernel MMD² of the shape descriptors"),
    MetricDef("multi_object_rate", "more than one object", "shapes", shape_features.KIND, "rate_multi", False,
              "{:.1%}", "share of samples in which the counter finds more than one object (95 % Wilson interval)"),
    MetricDef("one_object_rate", "exactly one object", "shapes", shape_features.KIND, "rate_one", False, "{:.1%}",
              "share of samples with exactly one object (95 % Wilson interval)", lower_is_better=False),
    MetricDef("no_object_rate", "no object", "shapes", shape_features.KIND, "rate_none", False, "{:.1%}",
              "share of samples with no object (95 % Wilson interval)"),
    MetricDef("mean_object_count", "mean object count", "shapes", shape_features.KIND, "count", False, "{:.2f}",
              "mean number of objects per sample (ldm/evaluation/repetition.py)"),
    MetricDef("object_area", "object area / image", "shapes", shape_features.KIND, "area", False, "{:.3f}",
              "mean total object area relative to the image (one enlarged object vs several copies)",
              lower_is_better=False),
)}
METRIC_ALIASES = {"fidc": "pfid", "kidc": "pkid", "fid_r": "fid", "kid_r": "kid", "fid_b": "fid", "kid_b": "kid"}


def resolve_metric(name) -> Optional[MetricDef]:
    key = str(name).strip().lower()
    return METRICS.get(METRIC_ALIASES.get(key, key))


# --------------------------------------------------------------------------------------------------
# the spec
# --------------------------------------------------------------------------------------------------
SAMPLER_DEFAULTS = {"batch_size": 1, "precision": "autocast", "negative_prompt": ""}
SAMPLER_REQUIRED = ("steps", "eta", "scale")
SAMPLER_KEYS = SAMPLER_REQUIRED + tuple(SAMPLER_DEFAULTS)
# keys a row may repeat (they must then equal the table's): what every row of a table shares
ROW_SHARED_KEYS = ("seed", "prompts", "images") + SAMPLER_KEYS
ROW_KEYS = {"id", "name", "method", "model", "size", "preset", "options", "notes", "published", "optional"} \
    | set(ROW_SHARED_KEYS)
TABLE_KEYS = {"id", "title", "prompts", "images", "references", "columns", "rows", "notes", "published"}
TOP_KEYS = {"name", "title", "paper", "notes", "models", "prompts", "images", "seed", "sampler", "common_options",
            "features", "references", "columns", "rows", "tables", "timing", "cpu_run", "sources", "published"}
# a row's published values: column ids, plus these keys
PUBLISHED_ROW_KEYS = {"seconds_per_image", "minutes_per_image", "note", "absent", "source"}
NOT_AVAILABLE = "n/a"   # a cell the paper marks as not available (e.g. '-')
TIMING_ENTRY_KEYS = {"match", "seconds_per_image", "ratio_to_direct", "device", "source", "basis"}
TIMING_MATCH_KEYS = {"role", "method", "model", "preset", "rows", "size"}
# txt2img flags a row's options must not set: table-wide settings, or what the runner sets itself
RESERVED_FLAGS = {
    "--steps": "sampler.steps", "--ddim_eta": "sampler.eta", "--scale": "sampler.scale", "--seed": "seed",
    "--sampler": "sampler.name", "--eta": "sampler.eta",
    "--n_samples": "sampler.batch_size", "--precision": "sampler.precision",
    "--negative_prompt": "sampler.negative_prompt", "--n_iter": "images", "--repeat": "images",
    "--from-file": "prompts", "--prompt": "prompts", "--fixed_code": "seed", "--H": "size", "--W": "size",
    "--config": "model", "--ckpt": "model", "--method": "method", "--scalecrafter_config": "preset",
    "--freescale_config": "preset", "--fouri_config": "preset", "--outdir": "(set by reproduce_table.py)",
    "--sweep": "(always on)",
    "--device": "(--device of reproduce_table.py)", "--save_stages": "(extra files would enter the evaluation)",
    "--skip_grid": "(sweeps write no grid)", "--init_image": "(not a text-to-image row)",
}
PRESET_FLAGS = {"scalecrafter": "--scalecrafter_config", "freescale": "--freescale_config",
                "fouriscale": "--fouri_config"}
BUILTIN_PROMPTS = ("shapes",)
BASE = "base"


@dataclass
class Model:
    name: str
    config: str
    ckpt: str
    base_size: Optional[Tuple[int, int]] = None  # (H, W) of the base-resolution reference samples
    label: str = ""


@dataclass
class Reference:
    name: str
    kind: str                     # "folder" | "dataset" | "base"
    folder: Optional[str] = None
    dataset: Optional[Dict] = None
    description: str = ""


@dataclass
class Column:
    id: str
    name: str
    metric: MetricDef
    reference: Optional[str]


@dataclass
class Row:
    table: str
    id: str
    name: str
    method: str
    model: str
    H: int
    W: int
    preset: Optional[str] = None
    options: List[str] = field(default_factory=list)
    notes: str = ""
    qid: str = ""
    preset_flag: Optional[str] = None  # the txt2img option that takes the preset (set by check_spec)
    published: Optional[Dict] = None   # the paper's values of this row: {column id: value | "n/a", ...}
    optional: bool = False             # planned only when selected (--rows) or with --with-optional


@dataclass
class Table:
    id: str
    title: str
    prompts: Dict
    images: int
    references: Dict[str, Reference]
    columns: List[Column]
    rows: List[Row]
    notes: str = ""
    published: Dict = field(default_factory=dict)  # {source: id, notes} | {not_found: why} | {} (not a paper table)

    def prompt_list(self) -> List[str]:
        return resolve_prompts(self.prompts, self.images, f"table {self.id!r}")


@dataclass
class Spec:
    path: Path
    name: str
    title: str
    paper: str
    notes: str
    models: Dict[str, Model]
    seed: int
    sampler: Dict
    common_options: List[str]
    features: Dict
    tables: List[Table]
    timing: Dict
    multi: bool
    cpu_run: Dict = field(default_factory=dict)  # defaults of --parallel/--threads when sampling on a CPU
    sources: Dict[str, Dict] = field(default_factory=dict)  # published sources: id -> {cite, read_from, device}

    def rows(self) -> List[Row]:
        return [r for t in self.tables for r in t.rows]

    def describe_sampler(self) -> str:
        s = self.sampler
        return (f"{s.get('name', 'ddim')} {s['steps']} steps, eta {s['eta']:g}, classifier-free guidance {s['scale']:g}, batch "
                f"{s['batch_size']}, precision {s['precision']}" +
                (f", negative prompt {s['negative_prompt']!r}" if s["negative_prompt"] else ""))


def _slug(text) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")
    return s or "x"


def _size(value, where) -> Tuple[int, int]:
    """[H, W], "HxW" (width x height as the preset names write it: "2048x1024" is W=2048, H=1024) or an int."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\d+)\s*", value)
        if m:
            return (int(m.group(2)), int(m.group(1)))
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise SpecError(f"{where}: size must be [H, W], 'WxH' or an int, got {value!r}")


def _rel(path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


def resolve_prompts(prompts: Dict, n: int, where: str) -> List[str]:
    """The first ``n`` prompts of a prompt set: ``{builtin: shapes}`` (the demo captions in turn),
    ``{file: path}`` (one prompt per non-empty line) or ``{list: [...]}``."""
    if "builtin" in prompts:
        from ldm.data.shapes import CAPTIONS
        return [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    if "list" in prompts:
        items = [str(p).strip() for p in prompts["list"] if str(p).strip()]
        source = "its list"
    else:
        path = _rel(prompts["file"])
        if not path.is_file():
            raise SpecError(f"{where}: prompt file {prompts['file']} not found"
                            + (f" ({prompts['how']})" if prompts.get("how") else ""))
        items = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
        source = str(prompts["file"])
    if len(items) < n:
        raise SpecError(f"{where}: {n} images need {n} prompts, {source} has {len(items)}")
    return items[:n]


def _check_prompts(value, where) -> Dict:
    if isinstance(value, str):
        value = {"builtin": value} if value in BUILTIN_PROMPTS else {"file": value}
    if not isinstance(value, dict) or len({"builtin", "file", "list"} & set(value)) != 1:
        raise SpecError(f"{where}: prompts must be {{builtin: shapes}}, {{file: PATH}} or {{list: [...]}}, got {value!r}")
    if "builtin" in value and value["builtin"] not in BUILTIN_PROMPTS:
        raise SpecError(f"{where}: unknown builtin prompt set {value['builtin']!r}; known: {list(BUILTIN_PROMPTS)}")
    return dict(value)


def _check_keys(d, known, where):
    if not isinstance(d, dict):
        raise SpecError(f"{where}: expected a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")


def sampler_flags(s) -> List[str]:
    """txt2img's flags of a spec's sampler: DDIM's --ddim_eta, or --sampler NAME --eta (0 for the noiseless)."""
    if "name" not in s:
        return ["--ddim_eta", repr(float(s["eta"]))]
    return ["--sampler", s["name"], "--eta", repr(float(s["eta"]))]


def _sampler(value, where) -> Dict:
    value = dict(value or {})
    _check_keys(value, SAMPLER_KEYS + ("name",), where)  # name: ldm/samplers' registry (ddim if absent)
    missing = [k for k in SAMPLER_REQUIRED if k not in value]
    if missing:
        raise SpecError(f"{where}: missing {missing} (every table states its sampler settings)")
    out = {**SAMPLER_DEFAULTS, **value}
    try:
        out["steps"], out["batch_size"] = int(out["steps"]), int(out["batch_size"])
        out["eta"], out["scale"] = float(out["eta"]), float(out["scale"])
    except (TypeError, ValueError) as err:
        raise SpecError(f"{where}: {err}") from None
    if out.get("name", "ddim") == "ddim":  # DDIM's jobs keep their fingerprints
        out.pop("name", None)
    elif out["name"] not in SAMPLER_NAMES:
        raise SpecError(f"{where}: name {out['name']!r} is not a sampler; known: {', '.join(SAMPLER_NAMES)}")
    elif out["eta"] and not sampler_class(out["name"]).stochastic:
        raise SpecError(f"{where}: eta {out['eta']:g} with {out['name']}, which draws no noise (make it 0)")
    if out["precision"] not in ("full", "autocast", "half"):
        raise SpecError(f"{where}: precision must be full, autocast or half, got {out['precision']!r}")
    return out


def _references(value, where) -> Dict[str, Reference]:
    out = {}
    for name, ref in (value or {}).items():
        w = f"{where}.{name}"
        if name == BASE:
            raise SpecError(f"{w}: 'base' is the built-in reference (base-resolution samples); choose another name")
        if isinstance(ref, str):
            ref = {"folder": ref}
        _check_keys(ref, {"folder", "dataset", "size", "n", "seed", "description", "how"}, w)
        if ("folder" in ref) == ("dataset" in ref):
            raise SpecError(f"{w}: give either folder: PATH (real images) or dataset: shapes (rendered here)")
        if "dataset" in ref:
            if ref["dataset"] != "shapes":
                raise SpecError(f"{w}: the only renderable dataset is 'shapes' (ldm/data/shapes.py), got {ref['dataset']!r}")
            ds = {"dataset": "shapes", "size": int(ref.get("size", 32)), "n": int(ref.get("n", 1000)),
                  "seed": int(ref.get("seed", 1))}
            out[name] = Reference(name, "dataset", dataset=ds, description=str(ref.get("description", "")))
        else:
            desc = str(ref.get("description", ""))
            if ref.get("how"):
                desc = (desc + "; " if desc else "") + f"how: {ref['how']}"
            out[name] = Reference(name, "folder", folder=str(ref["folder"]), description=desc)
    return out


def _columns(value, where, references) -> List[Column]:
    if not value:
        raise SpecError(f"{where}: no columns")
    out, seen = [], set()
    for i, c in enumerate(value):
        if isinstance(c, str):
            c = {"metric": c}
        w = f"{where}[{i}]"
        _check_keys(c, {"id", "name", "metric", "reference"}, w)
        if "metric" not in c:
            raise SpecError(f"{w}: a column needs a metric")
        cid = str(c.get("id") or (c["metric"] + (f"_{c['reference']}" if c.get("reference") else "")))
        w = f"column {cid!r}"
        m = resolve_metric(c["metric"])
        if m is None:
            raise SpecError(f"{w}: unknown metric {c['metric']!r}; known: {sorted(METRICS)} "
                            f"(aliases: {sorted(METRIC_ALIASES)})")
        ref = c.get("reference")
        if m.needs_reference and not ref:
            raise SpecError(f"{w}: metric {m.name} compares two sets: give reference: base (base-resolution "
                            f"samples) or one of {sorted(references)}")
        if not m.needs_reference and ref:
            raise SpecError(f"{w}: metric {m.name} is computed on the row's samples alone; remove reference: {ref}")
        if ref and ref != BASE and ref not in references:
            raise SpecError(f"{w}: unknown reference {ref!r}; known: {[BASE] + sorted(references)}")
        if cid in seen:
            raise SpecError(f"{w}: two columns with this id")
        seen.add(cid)
        out.append(Column(cid, str(c.get("name") or (m.label + (f" vs {ref}" if ref else ""))), m, ref))
    return out


def load_spec(path) -> Spec:
    """Read and check a table spec (everything that does not need ``txt2img.py``; see :func:`check_spec`)."""
    from ldm.util import ConfigError, read_yaml_mapping
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"table spec not found: {path} (the specs are in configs/tables/)")
    try:  # one line naming the file (and line): syntax errors, duplicate keys, tags, a top level that is no mapping
        raw = read_yaml_mapping(path, "table spec")
    except ConfigError as err:
        raise SpecError(str(err)) from None
    where = str(path)
    _check_keys(raw, TOP_KEYS, where)
    if ("rows" in raw) == ("tables" in raw):
        raise SpecError(f"{where}: give either rows: (one table) or tables: (several, each with rows:)")
    name = str(raw.get("name") or path.stem)
    seed = raw.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise SpecError(f"{where}: seed: an integer is required (every row samples the same seeds), got {seed!r}")
    from ldm.inference import UsageError, check_seed
    try:
        check_seed(seed, "seed:")
    except UsageError as err:
        raise SpecError(f"{where}: {err}") from None
    sampler = _sampler(raw.get("sampler"), f"{where}: sampler")
    models = {}
    for mname, m in (raw.get("models") or {}).items():
        w = f"{where}: models.{mname}"
        _check_keys(m, {"config", "ckpt", "base_size", "label"}, w)
        if "config" not in m or "ckpt" not in m:
            raise SpecError(f"{w}: a model needs config: and ckpt:")
        models[mname] = Model(mname, str(m["config"]), str(m["ckpt"]),
                              _size(m["base_size"], w) if m.get("base_size") is not None else None,
                              str(m.get("label", mname)))
    if not models:
        raise SpecError(f"{where}: models: at least one model (config + ckpt)")
    common = [str(o) for o in (raw.get("common_options") or [])]
    features = dict(raw.get("features") or {})
    _check_keys(features, {"inception", "shapes"}, f"{where}: features")
    timing = _timing(raw.get("timing"), f"{where}: timing")
    sources = _sources(raw.get("sources"), f"{where}: sources")
    top_published = _table_published(raw.get("published"), f"{where}: published", sources)
    cpu_run = dict(raw.get("cpu_run") or {})
    _check_keys(cpu_run, {"parallel", "threads"}, f"{where}: cpu_run")
    for k, v in cpu_run.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SpecError(f"{where}: cpu_run.{k}: a positive integer is required, got {v!r}")
    top_refs = _references(raw.get("references"), f"{where}: references")
    multi = "tables" in raw
    table_defs = raw["tables"] if multi else [{"id": name, "title": raw.get("title", name), "rows": raw["rows"]}]
    if not multi and "published" in raw:
        table_defs[0]["published"] = raw["published"]
    tables, qids = [], set()
    for ti, t in enumerate(table_defs):
        tw = f"{where}: tables[{ti}]"
        _check_keys(t, TABLE_KEYS, tw)
        tid = str(t.get("id") or f"t{ti}")
        tw = f"{where}: table {tid!r}"
        prompts = _check_prompts(t.get("prompts", raw.get("prompts")), f"{tw}: prompts")
        images = t.get("images", raw.get("images"))
        if not isinstance(images, int) or images < 1:
            raise SpecError(f"{tw}: images: a positive integer (images per row) is required, got {images!r}")
        refs = {**top_refs, **_references(t.get("references"), f"{tw}: references")}
        columns = _columns(t.get("columns", raw.get("columns")), f"{tw}: columns", refs)
        published = (_table_published(t["published"], f"{tw}: published", sources) if "published" in t
                     else dict(top_published))
        rows, ids = [], set()
        for ri, r in enumerate(t.get("rows") or []):
            rows.append(_row(r, ri, tid, tw, models, seed, sampler, prompts, images, multi))
            rows[-1].published = _row_published(r.get("published"), f"{tw}: row {rows[-1].id!r}", published,
                                                columns, sources)
            if rows[-1].id in ids:
                raise SpecError(f"{tw}: row {rows[-1].id!r}: two rows with this id")
            ids.add(rows[-1].id)
            qids.add(rows[-1].qid)
        if not rows:
            raise SpecError(f"{tw}: no rows")
        tables.append(Table(tid, str(t.get("title", tid)), prompts, images, refs, columns, rows,
                            str(t.get("notes", "") or ""), published))
    return Spec(path, name, str(raw.get("title", name)), str(raw.get("paper", "") or ""),
                str(raw.get("notes", "") or ""), models, seed, sampler, common, features, tables, timing, multi,
                cpu_run, sources)


# --------------------------------------------------------------------------------------------------
# published values and timing entries
# --------------------------------------------------------------------------------------------------
def _sources(value, where) -> Dict[str, Dict]:
    """``sources:`` id -> {cite, read_from, device, notes}: where published numbers were read."""
    out = {}
    for sid, src in (value or {}).items():
        w = f"{where}.{sid}"
        _check_keys(src, {"cite", "read_from", "device", "notes"}, w)
        for key in ("cite", "read_from"):
            if not str(src.get(key) or "").strip():
                raise SpecError(f"{w}: {key}: required (what the numbers are, and where they were read)")
        out[str(sid)] = {k: " ".join(str(v).split()) for k, v in src.items()}
    return out


def _table_published(value, where, sources) -> Dict:
    """A table's ``published:``: {source: ID, notes} (the rows carry the values) or {not_found: WHY}."""
    if value is None:
        return {}
    _check_keys(value, {"source", "not_found", "notes"}, where)
    if ("source" in value) == ("not_found" in value):
        raise SpecError(f"{where}: give either source: (an id of sources:) or not_found: (why no value is given)")
    if "source" in value and str(value["source"]) not in sources:
        raise SpecError(f"{where}: unknown source {value['source']!r}; sources: {sorted(sources)}")
    if "not_found" in value and not str(value["not_found"]).strip():
        raise SpecError(f"{where}: not_found: say what was searched and not found")
    return {k: " ".join(str(v).split()) for k, v in value.items()}


def _row_published(value, where, table_published, columns, sources) -> Optional[Dict]:
    """A row's ``published:`` values, checked against the table's columns (or None)."""
    if value is None:
        if table_published.get("source"):
            raise SpecError(f"{where}: the table has published values ({table_published['source']}): give "
                            "published: {COLUMN: VALUE, ...} (n/a where the paper marks the cell unavailable) or "
                            "published: {absent: WHY} for a row that is not in the paper's table")
        return None
    if not table_published.get("source"):
        what = ("its published values were not found" if table_published.get("not_found") else
                "it has no published: {source: ...}")
        raise SpecError(f"{where}: published values in a table without a source ({what})")
    col_ids = [c.id for c in columns]
    _check_keys(value, set(col_ids) | PUBLISHED_ROW_KEYS, f"{where}: published (columns: {col_ids})")
    out = {}
    for k, v in value.items():
        if k in ("note", "absent"):
            out[k] = " ".join(str(v).split())
        elif k == "source":
            if str(v) not in sources:
                raise SpecError(f"{where}: published.source: unknown source {v!r}; sources: {sorted(sources)}")
            out[k] = str(v)
        elif isinstance(v, str) and v.strip().lower() in (NOT_AVAILABLE, "-", "n.a."):
            out[k] = NOT_AVAILABLE
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
        else:  # a number written as text keeps the paper's digits ("0.020")
            try:
                out[k] = float(str(v))
            except ValueError:
                raise SpecError(f"{where}: published.{k}: a number or {NOT_AVAILABLE!r}, got {v!r}") from None
    if "absent" in out and any(k in col_ids or k.endswith("_per_image") for k in out):
        raise SpecError(f"{where}: published: absent (not a row of the paper) and values at once")
    if "minutes_per_image" in out:
        if "seconds_per_image" in out:
            raise SpecError(f"{where}: published: give seconds_per_image or minutes_per_image, not both")
        m = out.pop("minutes_per_image")
        out["seconds_per_image"] = m if m == NOT_AVAILABLE else m * 60.0
        out["time_as_published"] = f"{value['minutes_per_image']} min"
    elif "seconds_per_image" in out:
        out["time_as_published"] = f"{value['seconds_per_image']} s"
    out["as_written"] = {k: str(value[k]) for k in value if k in col_ids}
    return out


def _timing(value, where) -> Dict:
    timing = dict(value or {})
    _check_keys(timing, {"entries", "exponent", "exponent_source", "notes"}, where)
    for i, e in enumerate(timing.get("entries") or []):
        w = f"{where}.entries[{i}]"
        _check_keys(e, TIMING_ENTRY_KEYS, w)
        _check_keys(e.get("match") or {}, TIMING_MATCH_KEYS, f"{w}.match")
        if ("seconds_per_image" in e) == ("ratio_to_direct" in e):
            raise SpecError(f"{w}: give seconds_per_image or ratio_to_direct (times the direct-sampling estimate "
                            "at the same model and size)")
        if not str(e.get("source") or "").strip():
            raise SpecError(f"{w}: source: required (where the figure comes from)")
        if "ratio_to_direct" in e and (e.get("match") or {}).get("method") == "direct":
            raise SpecError(f"{w}: ratio_to_direct on direct sampling itself")
        if "seconds_per_image" in e and e.get("basis") not in ENTRY_BASES:
            raise SpecError(f"{w}: basis: one of {list(ENTRY_BASES)} (what the seconds are), got {e.get('basis')!r}")
    return timing


def _row(r, index, tid, tw, models, seed, sampler, prompts, images, multi) -> Row:
    if not isinstance(r, dict):
        raise SpecError(f"{tw}: rows[{index}]: expected a mapping, got {r!r}")
    rid = str(r.get("id") or _slug(r.get("name") or f"row{index}"))
    w = f"{tw}: row {rid!r}"
    _check_keys(r, ROW_KEYS, w)
    # every row of a table shares prompts, seeds and sampler settings: a row may repeat them, not change them
    shared = {"seed": seed, "prompts": prompts, "images": images, **sampler}
    for key in ROW_SHARED_KEYS:
        if key in r:
            mine = _check_prompts(r[key], w) if key == "prompts" else r[key]
            if key in ("eta", "scale"):
                ok = isinstance(mine, (int, float)) and float(mine) == float(shared[key])
            else:
                ok = mine == shared[key]
            if not ok:
                raise SpecError(f"{w}: {key} {mine!r} differs from the table's {shared[key]!r}; every row of a table "
                                "samples the same prompts with the same seed and sampler settings (make it another "
                                "table, or change the table's setting)")
    if "method" not in r:
        raise SpecError(f"{w}: a row needs a method (a scripts/txt2img.py --method value)")
    if "model" in r:
        model = str(r["model"])
        if model not in models:
            raise SpecError(f"{w}: unknown model {model!r}; the spec's models: {sorted(models)}")
    elif len(models) == 1:
        model = next(iter(models))
    else:
        raise SpecError(f"{w}: give model: (the spec has several: {sorted(models)})")
    options = r.get("options") or []
    if isinstance(options, str):
        import shlex
        options = shlex.split(options)
    options = [str(o) for o in options]
    for opt in options:
        flag = opt.split("=", 1)[0]
        if flag in RESERVED_FLAGS:
            raise SpecError(f"{w}: option {flag} is not a row option: it is set by {RESERVED_FLAGS[flag]}")
    preset = str(r["preset"]) if r.get("preset") else None
    if "size" in r:
        H, W = _size(r["size"], w)
    elif preset:
        H = W = None
    else:
        raise SpecError(f"{w}: give size: [H, W] (or a preset that names its size)")
    optional = r.get("optional", False)
    if not isinstance(optional, bool):
        raise SpecError(f"{w}: optional: true or false, got {optional!r}")
    row = Row(tid, rid, str(r.get("name") or rid), str(r["method"]), model, H, W, preset, options,
              str(r.get("notes", "") or ""), f"{tid}/{rid}" if multi else rid, optional=optional)
    return row


# --------------------------------------------------------------------------------------------------
# checks that need scripts/txt2img.py (method list, option parser) and the presets
# --------------------------------------------------------------------------------------------------
def _load_preset_for(method, path):
    """The preset dict of a preset file, read by the method's own loader (the method registry)."""
    from ldm import methods
    return methods.method_class(method).read_preset(path)


def check_spec(spec: Spec, methods: Sequence[str], option_check: Optional[Callable[[List[str]], None]] = None,
               selected: Optional[Sequence[Row]] = None, preset_flags: Optional[Dict[str, str]] = None) -> List[str]:
    """Checks of the rows against the sampler: ``methods`` (the method registry's names), the presets
    (exist, load, made for the row's size and the table's steps) and the row options (``option_check`` raises
    ValueError with a message for flags txt2img does not take). Selected rows (default: all) raise
    :class:`SpecError` naming the row; for the others an unknown method is returned as a warning line (a row
    for a method that is still being added does not block the other rows)."""
    selected_ids = None if selected is None else {r.qid for r in selected}
    preset_flags = dict(PRESET_FLAGS, **(preset_flags or {}))
    warnings_out = []
    for row in spec.rows():
        w = f"{spec.path}: row {row.qid!r}"
        is_selected = selected_ids is None or row.qid in selected_ids
        if row.method not in methods:
            msg = (f"{w}: unknown method {row.method!r}; scripts/txt2img.py --method takes {', '.join(methods)}")
            if is_selected:
                raise SpecError(msg + " (select the other rows with --rows)")
            warnings_out.append(msg + " (row not selected)")
            continue
        if row.preset:
            flag = row.preset_flag = preset_flags.get(row.method)
            if flag is None:
                raise SpecError(f"{w}: method {row.method} takes no preset (presets: "
                                f"{', '.join(f'{m}: {f}' for m, f in preset_flags.items())}); use options:")
            path = _rel(row.preset)
            if not path.is_file():
                raise SpecError(f"{w}: unknown preset {row.preset}: no such file")
            try:
                preset = _load_preset_for(row.method, path)
            except Exception as err:  # the loaders raise their own error classes
                raise SpecError(f"{w}: preset {row.preset} does not load: {err}") from None
            ph, pw = preset.get("height"), preset.get("width")
            if row.H is None:
                if ph is None or pw is None:
                    raise SpecError(f"{w}: preset {row.preset} names no size; give size: [H, W]")
                row.H, row.W = int(ph), int(pw)
            elif ph is not None and (int(ph), int(pw)) != (row.H, row.W):
                raise SpecError(f"{w}: preset {row.preset} is made for {pw}x{ph} (WxH), the row samples "
                                f"{row.W}x{row.H}")
            if preset.get("steps") is not None and int(preset["steps"]) != spec.sampler["steps"]:
                # the preset's schedules count steps (dilate_tau, ndcfg_tau, ...): another step count changes them
                raise SpecError(f"{w}: preset {row.preset} is made for steps {preset['steps']} (its schedules count "
                                f"steps), the table samples with steps {spec.sampler['steps']}")
            if preset.get("negative_prompt") is not None and str(preset["negative_prompt"]) != \
                    spec.sampler["negative_prompt"] and is_selected:
                warnings_out.append(f"{w}: preset {row.preset} was released with negative prompt "
                                    f"{preset['negative_prompt']!r}; the row samples with the table's "
                                    f"{spec.sampler['negative_prompt']!r}")
            for key in ("scale", "eta"):
                if preset.get(key) is not None and float(preset[key]) != float(spec.sampler[key]) and is_selected:
                    warnings_out.append(f"{w}: preset {row.preset} was released with {key} {preset[key]}; the row "
                                        f"samples with the table's {key} {spec.sampler[key]} (every row of a table "
                                        "shares the sampler settings)")
        if option_check is not None and (row.options or spec.common_options):
            try:
                option_check(list(spec.common_options) + list(row.options))
            except ValueError as err:
                raise SpecError(f"{w}: options {row.options}: {err}") from None
        if row.H is None:
            raise SpecError(f"{w}: no size")
    return warnings_out


def select(spec: Spec, rows: Optional[Sequence[str]] = None, columns: Optional[Sequence[str]] = None,
           include_optional: bool = False) -> Spec:
    """A copy of ``spec`` with the rows and columns whose id (or table/id) matches one of the patterns
    (fnmatch); an unmatched pattern is an error listing the ids. Optional rows (``optional: true``: variants a
    spec offers beside the paper's protocol) are left out unless ``include_optional`` or a pattern without
    wildcards names them (``--rows 2048x2048/scalecrafter_release``)."""
    import copy
    out = copy.copy(spec)
    out.tables = []
    used_r, used_c = set(), set()

    def wanted(r):
        if not r.optional or include_optional:
            return not rows or _match(rows, (r.qid, r.id), used_r)
        exact = [p for p in rows or [] if not any(ch in p for ch in "*?[")]
        return _match(exact, (r.qid, r.id), used_r)

    for t in spec.tables:
        tc = copy.copy(t)
        tc.rows = [r for r in t.rows if wanted(r)]
        if columns:
            tc.columns = [c for c in t.columns if _match(columns, (c.id, f"{t.id}/{c.id}"), used_c)]
        if tc.rows and tc.columns:
            out.tables.append(tc)
    for pats, used, what, known in ((rows, used_r, "row", [r.qid + (" (optional)" if r.optional else "")
                                                          for r in spec.rows()]),
                                    (columns, used_c, "column", sorted({c.id for t in spec.tables for c in t.columns}))):
        for p in pats or []:
            if p not in used:
                if what == "row" and any(_match([p], (r.qid, r.id), set()) for r in spec.rows() if r.optional):
                    raise SpecError(f"--rows {p}: matches only optional rows of {spec.path}; add --with-optional, "
                                    "or name each one exactly")
                raise SpecError(f"--{what}s {p}: matches no {what} of {spec.path}; {what}s: {', '.join(known)}")
    if not out.tables:
        raise SpecError("the selection leaves no row and column")
    return out


def _match(patterns, names, used) -> bool:
    hit = False
    for p in patterns:
        if any(fnmatch.fnmatchcase(n, p) for n in names):
            used.add(p)
            hit = True
    return hit


# --------------------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------------------
@dataclass
class Job:
    id: str
    table: str
    model: Model
    H: int
    W: int
    method: str
    preset: Optional[str]
    options: List[str]
    role: str                      # "row" | "base"
    prompts_file: Path
    n_images: int
    argv: List[str]                # scripts/txt2img.py arguments, --outdir included
    outdir: Path
    rows: List[str] = field(default_factory=list)
    key: Dict = field(default_factory=dict)

    @property
    def samples(self) -> Path:
        return self.outdir / "samples"

    def describe(self) -> str:
        what = "base-resolution reference" if self.role == BASE else self.method
        return f"{self.model.name} {self.W}x{self.H} {what}" + (f" ({Path(self.preset).name})" if self.preset else "")


@dataclass
class Plan:
    spec: Spec
    out: Path
    jobs: List[Job]
    row_job: Dict[str, Job]
    base_job: Dict[Tuple[str, str], Job]       # (table id, model name) -> job
    prompt_files: Dict[str, Tuple[Path, List[str]]]
    dataset_refs: Dict[Tuple[str, str], Path]  # (table id, reference name) -> folder

    def reference_folder(self, table: Table, row: Row, ref: str) -> Path:
        if ref == BASE:
            return self.base_job[(table.id, row.model)].samples
        r = table.references[ref]
        if r.kind == "dataset":
            return self.dataset_refs[(table.id, ref)]
        return _rel(r.folder)


def base_size(spec: Spec, model: Model) -> Tuple[int, int]:
    """(H, W) of the model's base-resolution samples: ``base_size`` in the spec, else the config's latent
    size times the first-stage factor (512 for SD 1.x/2.x-base, 1024 for SDXL, 32 for the demo model)."""
    if model.base_size:
        return model.base_size
    from ldm.util import ConfigError, load_config_file
    try:  # read and checked as txt2img.py will (a config it would refuse stops the plan, before any sampling)
        cfg = load_config_file(_rel(model.config))
    except ConfigError as err:
        raise SpecError(f"models.{model.name}: {err}") from None
    params = cfg.model.params
    fs = params.first_stage_config
    f = 2 ** (len(fs.params.ddconfig.ch_mult) - 1) if "ddconfig" in fs.get("params", {}) else 1
    side = int(params.get("image_size", 64)) * f
    return (side, side)


def _job_id(job_key: Dict, slug: str) -> str:
    digest = hashlib.sha256(json.dumps(job_key, sort_keys=True).encode()).hexdigest()[:10]
    return f"{_slug(slug)}-{digest}"


def plan(spec: Spec, out, device: str = "auto", prompts_cache: Optional[Dict] = None) -> Plan:
    """Sampling jobs of the selected rows (deduplicated) and the references they need. Nothing is written."""
    out = Path(out)
    jobs: Dict[str, Job] = {}
    row_job, base_job, prompt_files, dataset_refs = {}, {}, {}, {}
    s = spec.sampler
    for t in spec.tables:
        try:
            prompts = t.prompt_list()
        except SpecError:
            prompts = None  # the dry run still plans (and reports the missing file); running stops before sampling
        pdigest = hashlib.sha256(json.dumps(prompts if prompts is not None else [str(t.prompts), t.images])
                                 .encode()).hexdigest()
        pfile = out / "prompts" / f"{_slug(t.id)}-{pdigest[:10]}.txt"
        prompt_files[t.id] = (pfile, prompts)

        def add(role, model, H, W, method, preset, options, row=None, preset_flag=None):
            m = spec.models[model]
            key = {"config": m.config, "ckpt": m.ckpt, "H": H, "W": W, "method": method, "preset": preset,
                   "options": list(spec.common_options) + list(options), "seed": spec.seed, "sampler": s,
                   "prompts_sha256": pdigest, "images": t.images}
            slug = f"{model}-{W}x{H}-" + ("base" if role == BASE else method + (f"-{Path(preset).stem}" if preset else ""))
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
            if digest not in jobs:  # the same sampling for another row (or the base reference): the same job
                jid = _job_id(key, slug)
                jdir = out / "jobs" / jid
                argv = ["--sweep", "--from-file", str(pfile), "--config", str(_rel(m.config)), "--ckpt",
                        str(_rel(m.ckpt)), "--H", str(H), "--W", str(W), "--method", method,
                        "--steps", str(s["steps"]), *sampler_flags(s), "--scale", repr(float(s["scale"])),
                        "--seed", str(spec.seed), "--n_samples", str(s["batch_size"]), "--n_iter", "1",
                        "--precision", s["precision"], "--negative_prompt", s["negative_prompt"],
                        "--device", device]
                if preset:
                    argv += [preset_flag or PRESET_FLAGS.get(method, f"--{method}_config"), str(_rel(preset))]
                argv += list(spec.common_options) + list(options) + ["--outdir", str(jdir)]
                jobs[digest] = Job(jid, t.id, m, H, W, method, preset, list(options), role, pfile, t.images, argv,
                                   jdir, key=key)
            if row is not None:
                jobs[digest].rows.append(row.qid)
            return jobs[digest]

        if BASE in {c.reference for c in t.columns}:  # first, so that a row sampling the same is this job too
            for model in dict.fromkeys(r.model for r in t.rows):
                bh, bw = base_size(spec, spec.models[model])
                base_job[(t.id, model)] = add(BASE, model, bh, bw, "direct", None, [])
        for row in t.rows:
            row_job[row.qid] = add("row", row.model, row.H, row.W, row.method, row.preset, row.options, row,
                                   row.preset_flag)
        for c in t.columns:
            if c.reference and c.reference != BASE:
                r = t.references[c.reference]
                if r.kind == "dataset":
                    ds = r.dataset
                    dataset_refs[(t.id, r.name)] = (out / "references" /
                                                    f"{ds['dataset']}{ds['size']}-n{ds['n']}-seed{ds['seed']}")
    return Plan(spec, out, list(jobs.values()), row_job, base_job, prompt_files, dataset_refs)


def expected_files(job: Job) -> List[str]:
    from ldm.pipelines.sweep import image_name
    return [image_name(p, 0) for p in range(job.n_images)]


def images_present(job: Job) -> int:
    if not job.samples.is_dir():
        return 0
    have = set(os.listdir(job.samples))
    return sum(1 for f in expected_files(job) if f in have)


COMPLETE_FILE = "complete.json"
RUNS_FILE = "runs.jsonl"


def job_complete(job: Job) -> bool:
    """A finished job: its completion marker (written after a successful sweep) is there and so is every
    image of its work list. Anything less re-runs the sweep, which renders only what is missing."""
    marker = job.outdir / COMPLETE_FILE
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return False
    return info.get("key") == _normalise(job.key) and images_present(job) == job.n_images


def _normalise(obj):
    return json.loads(json.dumps(obj, sort_keys=True))


def write_text_atomic(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def materialize_prompts(p: Plan):
    """Write each table's prompt file (the first N prompts, one per line) if it is not there already."""
    for tid, (path, prompts) in p.prompt_files.items():
        if prompts is None:
            t = next(t for t in p.spec.tables if t.id == tid)
            t.prompt_list()  # raises the SpecError that explains what is missing
        text = "".join(pr + "\n" for pr in prompts)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            write_text_atomic(path, text)


def render_dataset_references(p: Plan, log=print):
    """Render the ``dataset: shapes`` references (training-distribution images, drawn here) once."""
    from PIL import Image

    from ldm.data.shapes import ShapesDataset
    for (tid, name), folder in p.dataset_refs.items():
        ref = next(t for t in p.spec.tables if t.id == tid).references[name]
        ds = ref.dataset
        names = [f"{i:06d}.png" for i in range(ds["n"])]
        if folder.is_dir() and set(names) <= set(os.listdir(folder)):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        data = ShapesDataset(size=ds["size"], length=ds["n"], seed=ds["seed"])
        for i, n in enumerate(names):
            if not (folder / n).is_file():
                img = data.render(i)[0]
                tmp = folder / f".{n}.tmp.png"
                Image.fromarray(img).save(tmp)
                os.replace(tmp, folder / n)
        log(f"rendered reference {name}: {ds['n']} images of ldm.data.shapes at {ds['size']}x{ds['size']} "
            f"(seed {ds['seed']}) -> {folder}")


# --------------------------------------------------------------------------------------------------
# run records (written by the job runner), time per image and peak memory
# --------------------------------------------------------------------------------------------------
def read_runs(job: Job) -> List[Dict]:
    path = job.outdir / RUNS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def job_stats(job: Job) -> Dict:
    """Time per image (device-seconds: wall time of the sampling command x its processes, over the images it
    wrote) and peak memory (largest over runs and processes) from the job's run records."""
    runs = read_runs(job)
    by_run: Dict[str, List[Dict]] = {}
    for r in runs:
        by_run.setdefault(r.get("run", "?"), []).append(r)
    seconds = generated = cpu = 0.0
    peak, kind, devices, machines = None, None, set(), set()
    for recs in by_run.values():
        gen = max((r.get("generated") or 0) for r in recs)
        cpu += sum(float(r.get("cpu_s") or 0.0) for r in recs)
        if gen > 0:
            seconds += sum(float(r.get("wall_s", 0.0)) for r in recs)
            generated += gen
        for r in recs:
            if r.get("peak_memory_bytes") is not None and (peak is None or r["peak_memory_bytes"] > peak):
                peak, kind = r["peak_memory_bytes"], r.get("peak_memory_kind")
            if r.get("device_name"):
                devices.add(r["device_name"])
            if r.get("machine"):
                machines.add(r["machine"])
    return {"seconds_per_image": seconds / generated if generated else None, "images_timed": int(generated),
            "device_seconds": seconds, "cpu_seconds": cpu, "peak_memory_bytes": peak, "peak_memory_kind": kind,
            "devices": sorted(devices), "machines": sorted(machines), "runs": len(by_run)}


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
        from .features import load_rgb
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
            from .inception import EXTRACTOR_NAME, file_sha256, resolve_weights_path
            p = resolve_weights_path(self.weights)
            self._identity = {"name": EXTRACTOR_NAME, "weights_file": p.name, "sha256": file_sha256(p),
                              "weights_path": str(p)}
        return self._identity

    def settings(self) -> FeatureSettings:
        return self._settings

    def compute(self, folder, relpaths, kinds) -> Dict[str, np.ndarray]:
        from .evaluate import default_device
        from .inception import load_fid_inception
        device = self.device or default_device()
        if self._model is None:
            self._model, ident = load_fid_inception(self.weights, device=device)
            self._identity = {**self.identity(), **ident}
        return self._extract(folder, relpaths, kinds, device)

    def _extract(self, folder, relpaths, kinds, device) -> Dict[str, np.ndarray]:
        from .features import extract_features
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


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------
def format_cell(metric: MetricDef, cell: Optional[Dict]) -> str:
    if not cell or cell.get("value") is None or (isinstance(cell["value"], float) and math.isnan(cell["value"])):
        return "–"
    value = cell["value"]
    if metric.stat == "fid" and -1e-6 < value < 0:  # a Fréchet distance is >= 0: float rounding (of a set vs itself)
        value = 0.0
    text = metric.fmt.format(value)
    if metric.stat.startswith("rate_"):
        lo, hi = cell["ci95"]
        text = f"{100 * cell['value']:.1f} % [{100 * lo:.0f}, {100 * hi:.0f}]"
    return text


def _fmt_seconds(s) -> str:
    if s is None:
        return "–"
    return f"{s:.3g}" if s < 100 else f"{s:.0f}"


def _fmt_mem(b) -> str:
    return "–" if b is None else f"{b / 2 ** 30:.2f}"


def table_rows(p: Plan, results: Dict) -> List[Dict]:
    """One flat record per row (what the CSV holds)."""
    out = []
    for t in p.spec.tables:
        cmp = {r["row"]: r for r in published_comparison(p, results, t)["rows"]}
        for row in t.rows:
            job = p.row_job[row.qid]
            stats = job_stats(job)
            rec = {"table": t.id, "row": row.qid, "name": row.name, "method": row.method, "preset": row.preset or "",
                   "options": " ".join(row.options), "model": row.model, "H": row.H, "W": row.W,
                   "n": images_present(job), "job": job.id}
            for c in t.columns:
                cell = results["cells"][t.id][row.qid][c.id]
                rec[c.id] = cell.get("value")
                for extra in ("std", "ci95"):
                    if extra in cell:
                        rec[f"{c.id}_{extra}"] = cell[extra]
            rec.update({"seconds_per_image": stats["seconds_per_image"], "peak_memory_gib":
                        None if stats["peak_memory_bytes"] is None else stats["peak_memory_bytes"] / 2 ** 30,
                        "peak_memory_kind": stats["peak_memory_kind"], "device": "; ".join(stats["devices"]),
                        "machine": "; ".join(stats["machines"])})
            if row.qid in cmp:  # a paper table with a source: the published value and ours ÷ published
                for cid, c in cmp[row.qid]["cells"].items():
                    key = "seconds_per_image" if cid == "time" else cid
                    rec[f"{key}_published"] = c["published"]
                    rec[f"{key}_ratio_to_published"] = c["ratio"]
                rec["published_absent"] = cmp[row.qid]["absent"]
            out.append(rec)
    return out


def write_csv(records: List[Dict], path: Path):
    keys: List[str] = []
    for r in records:
        for k in r:
            if k not in keys:
                keys.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in records:
        w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else v))
                    for k, v in r.items()})
    write_text_atomic(path, buf.getvalue())


def _describe_reference(p: Plan, t: Table, ref: str, results_counts: Dict[str, int]) -> str:
    if ref == BASE:
        models = sorted({r.model for r in t.rows})
        parts = []
        for m in models:
            job = p.base_job[(t.id, m)]
            parts.append(f"`{m}` at {job.W}x{job.H}, direct sampling, the same prompts, seeds and sampler "
                         f"(N = {images_present(job)})")
        return "base-resolution samples: " + "; ".join(parts)
    r = t.references[ref]
    if r.kind == "dataset":
        ds = r.dataset
        return (f"{ds['n']} training-distribution images rendered by `ldm.data.shapes` at {ds['size']}x{ds['size']} "
                f"(seed {ds['seed']}; the model was trained on seed 0)")
    return f"real images in `{r.folder}`" + (f" ({r.description})" if r.description else "") + \
        (f", N = {results_counts.get(ref)}" if results_counts.get(ref) else "")


# --------------------------------------------------------------------------------------------------
# the published table beside the reproduction
# --------------------------------------------------------------------------------------------------
def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Kendall's τ_b of two equally long sequences (ties allowed); None when undefined (fewer than two
    values, or one sequence constant)."""
    n = len(x)
    if n != len(y):
        raise ValueError("kendall_tau_b: sequences of different length")
    conc = disc = tied_x = tied_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx = (x[i] > x[j]) - (x[i] < x[j])
            dy = (y[i] > y[j]) - (y[i] < y[j])
            tied_x += dx == 0
            tied_y += dy == 0
            if dx and dy:
                conc += dx == dy
                disc += dx != dy
    pairs = n * (n - 1) // 2
    denom = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return None if denom == 0 else (conc - disc) / denom


def rank_order(names: Sequence[str], values: Sequence[float], lower_is_better=True) -> List[List[str]]:
    """Rows grouped by value, best first (equal values share a group)."""
    order = sorted(range(len(values)), key=lambda i: values[i] if lower_is_better else -values[i])
    groups: List[List[str]] = []
    last = None
    for i in order:
        if groups and values[i] == last:
            groups[-1].append(names[i])
        else:
            groups.append([names[i]])
        last = values[i]
    return groups


def _ordinary(v) -> Optional[float]:
    return None if v is None or isinstance(v, str) or (isinstance(v, float) and math.isnan(v)) else float(v)


def published_comparison(p: Plan, results: Dict, t: Table) -> Dict:
    """The paper's values of table ``t`` beside ours: per row and column (ours, published, ours ÷ published) and,
    per column with at least two rows having both, the rank order of the rows published vs ours (Kendall τ_b,
    whether the best row is the same). The time column compares seconds per image (different GPUs)."""
    pub = t.published or {}
    out = {"source": None, "not_found": pub.get("not_found"), "notes": pub.get("notes"), "rows": [], "ranks": []}
    if not pub.get("source"):
        return out
    src = p.spec.sources[pub["source"]]
    out["source"] = {"id": pub["source"], **src}
    columns = [(c.id, c.name, c.metric.lower_is_better) for c in t.columns] + [("time", "s / image", True)]
    for row in t.rows:
        rp = row.published or {}
        rec = {"row": row.qid, "name": row.name, "absent": rp.get("absent"), "note": rp.get("note"),
               "source": rp.get("source"), "cells": {}}
        ours_time = job_stats(p.row_job[row.qid])["seconds_per_image"]
        for cid, _, _ in columns:
            cell = None if cid == "time" else results["cells"].get(t.id, {}).get(row.qid, {}).get(cid)
            ours = ours_time if cid == "time" else (cell or {}).get("value")
            if cid == "time":
                published = rp.get("seconds_per_image")
                written = rp.get("time_as_published")
            else:
                published = rp.get(cid)
                written = (rp.get("as_written") or {}).get(cid)
            o, q = _ordinary(ours), _ordinary(published)
            rec["cells"][cid] = {"ours": o, "published": published, "as_written": written,
                                 "ratio": None if o is None or not q else o / q, "ours_cell": cell}
        out["rows"].append(rec)
    for cid, cname, lower in columns:
        both = [(r["name"], r["cells"][cid]["published"], r["cells"][cid]["ours"]) for r in out["rows"]
                if _ordinary(r["cells"][cid]["published"]) is not None and r["cells"][cid]["ours"] is not None]
        if len(both) < 2:
            continue
        names = [b[0] for b in both]
        pv, ov = [float(b[1]) for b in both], [float(b[2]) for b in both]
        pub_order, our_order = rank_order(names, pv, lower), rank_order(names, ov, lower)
        tau = kendall_tau_b(pv, ov)
        out["ranks"].append({"column": cid, "name": cname, "n": len(both), "published_order": pub_order,
                             "ours_order": our_order, "tau_b": tau,
                             "best_agrees": bool(set(pub_order[0]) & set(our_order[0]))})
    return out


def _fmt_order(groups) -> str:
    return ", ".join(" = ".join(g) for g in groups)


def render_published(p: Plan, results: Dict, t: Table) -> List[str]:
    """Markdown lines: the paper's table beside ours, and the rank agreement per column (nothing for a table that
    is not a paper table)."""
    pub = t.published or {}
    if not pub:
        return []
    if pub.get("not_found"):
        return ["", f"**Published values: not found.** {pub['not_found']}"]
    cmp = published_comparison(p, results, t)
    src = cmp["source"]
    lines = ["", f"**Published beside reproduced**: {src['cite']} (read from {src['read_from']})"
             + (f"; published times on {src['device']}" if src.get("device") else "")
             + (f". {cmp['notes']}" if cmp.get("notes") else "") + ". Each cell: ours / published "
             "(ours ÷ published); n/a: the paper marks the cell unavailable; –: no value.", ""]
    metric_of = {c.id: c.metric for c in t.columns}
    names = [c.name for c in t.columns] + ["s / image"]
    lines.append("| row | " + " | ".join(names) + " |")
    lines.append("|---|" + "|".join(["---:"] * len(names)) + "|")
    footnotes = []
    for rec in cmp["rows"]:
        cells = []
        for cid in [c.id for c in t.columns] + ["time"]:
            c = rec["cells"][cid]
            ours = ("–" if c["ours"] is None else _fmt_seconds(c["ours"])) if cid == "time" else \
                format_cell(metric_of[cid], c["ours_cell"])
            if rec["absent"]:
                theirs = "not in the paper"
            elif c["published"] == NOT_AVAILABLE:
                theirs = "n/a"
            elif c["published"] is None:
                theirs = "–"
            else:
                theirs = c["as_written"] or f"{c['published']:g}"
            ratio = f" (×{c['ratio']:.2f})" if c["ratio"] is not None else ""
            cells.append(f"{ours} / {theirs}{ratio}")
        lines.append(f"| {rec['name']} | " + " | ".join(cells) + " |")
        for what in ("absent", "note"):
            if rec[what]:
                footnotes.append(f"- **{rec['name']}**: {rec[what]}")
        if rec["source"] and rec["source"] != src["id"]:
            other = p.spec.sources[rec["source"]]
            footnotes.append(f"- **{rec['name']}**: published values from {other['cite']} (read from "
                             f"{other['read_from']})")
    if footnotes:
        lines += [""] + footnotes
    if cmp["ranks"]:
        lines += ["", "Rank order of the rows, best first (rows with both a published and a reproduced value; ties "
                      "share a place):", ""]
        for r in cmp["ranks"]:
            tau = "undefined" if r["tau_b"] is None else f"{r['tau_b']:.2f}"
            lines.append(f"- **{r['name']}**: published {_fmt_order(r['published_order'])}; ours "
                         f"{_fmt_order(r['ours_order'])}; Kendall τ_b = {tau} over {r['n']} rows; best row "
                         + ("the same" if r["best_agrees"] else "differs") + ".")
    return lines


def render_markdown(p: Plan, results: Dict, meta: Dict, heading: str = "#") -> str:
    spec = p.spec
    lines = [f"{heading} {spec.title}", ""]
    if meta.get("command"):
        stats = [job_stats(j) for j in p.jobs]
        sampling, cpu = sum(s["device_seconds"] for s in stats), sum(s["cpu_seconds"] for s in stats)
        lines += [f"Generated by `{meta['command']}` on {meta.get('date', '?')}"
                  + (f"; this invocation took {meta['wall_s'] / 60:.1f} min" if meta.get("wall_s") is not None else "")
                  + (f"; its {len(p.jobs)} sampling jobs took {sampling / 60:.1f} min (wall time per job, summed over "
                     "jobs and their runs; jobs may have run in parallel or in earlier invocations)"
                     + (f" and {cpu / 60:.1f} min of CPU time (user + system)" if cpu else "")
                     if sampling else "") + ".", ""]
    lines += [f"- **Spec**: `{os.path.relpath(spec.path, REPO_ROOT) if str(spec.path).startswith(str(REPO_ROOT)) else spec.path}`"
              + (f" ({spec.paper})" if spec.paper else ""),
              f"- **Seed**: {spec.seed} (image p of a row: seed `ldm.pipelines.sweep.derive_seed({spec.seed}, p, 0)`, the same for "
              "every row: rows at one latent size start from the same noise)",
              f"- **Sampler**: {spec.describe_sampler()}"
              + (f"; every job also gets `{' '.join(spec.common_options)}`" if spec.common_options else ""),
              f"- **Machine**: {meta.get('machine', '?')}"]
    if spec.notes:
        lines += ["", "**Notes.** " + " ".join(spec.notes.split())]
    for t in spec.tables:
        if spec.multi:
            lines += ["", f"{heading}# {t.title}"]
        prompt_desc = ("the 12 demo captions in turn" if "builtin" in t.prompts else
                       f"`{t.prompts.get('file')}`" if "file" in t.prompts else "the spec's list")
        lines += ["", f"N = {t.images} images per row, one per prompt ({prompt_desc}, first {t.images})."
                  + (" " + " ".join(t.notes.split()) if t.notes else ""), ""]
        head = ["row", "method", "size", "N"] + [c.name for c in t.columns] + ["s / image", "peak mem (GiB)"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|")
        for row in t.rows:
            job = p.row_job[row.qid]
            stats = job_stats(job)
            method = row.method + (f" `{Path(row.preset).name}`" if row.preset else "") + \
                (f" `{' '.join(row.options)}`" if row.options else "")
            cells = [format_cell(c.metric, results["cells"][t.id][row.qid][c.id]) for c in t.columns]
            lines.append("| " + " | ".join([row.name, method, f"{row.W}x{row.H}", str(images_present(job))] + cells
                                           + [_fmt_seconds(stats["seconds_per_image"]),
                                              _fmt_mem(stats["peak_memory_bytes"])]) + " |")
        lines += ["", "Columns:", ""]
        for c in t.columns:
            ref = f" Reference: {_describe_reference(p, t, c.reference, {})}." if c.reference else ""
            lines.append(f"- **{c.name}** (`{c.metric.name}`): {c.metric.description}.{ref}")
        kinds = sorted({job_stats(p.row_job[r.qid])['peak_memory_kind'] or '' for r in t.rows} - {''})
        lines.append("- **s / image**: wall time of the row's sampling command (model loading included) times its "
                     "processes, over the images it wrote; **peak mem**: "
                     + ", ".join({"cuda_max_allocated": "`torch.cuda.max_memory_allocated` (largest process)",
                                  "rss_hwm": "peak resident memory of the process during the job (VmHWM, weights "
                                             "and the evaluating process included)",
                                  "ru_maxrss": "peak resident memory of the process (ru_maxrss, whole process)"}
                                 .get(k, k) for k in kinds or ["–"]) + ".")
        row_notes = [(r.name, r.notes) for r in t.rows if r.notes]
        if row_notes:
            lines += ["", "Rows:", ""] + [f"- **{n}**: {' '.join(x.split())}" for n, x in row_notes]
        lines += render_published(p, results, t)
    if results.get("warnings"):
        lines += ["", "Warnings of the metric code:", ""] + [f"- {w}" for w in results["warnings"]]
    return "\n".join(lines) + "\n"


def replace_block(path: Path, name: str, body: str):
    """Write ``body`` between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` in ``path`` (appended if absent)."""
    start, end = f"<!-- table:{name} -->", f"<!-- /table:{name} -->"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        i, j = text.index(start), text.index(end) + len(end)
        text = text[:i] + block + text[j:]
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + block + "\n"
    write_text_atomic(path, text)


# --------------------------------------------------------------------------------------------------
# estimates (dry run)
# --------------------------------------------------------------------------------------------------
def _entry_matches(entry: Dict, job: Job, ignore_size=False) -> bool:
    m = entry.get("match", {})
    if "role" in m and m["role"] != job.role:
        return False
    if "method" in m:
        methods = m["method"] if isinstance(m["method"], list) else [m["method"]]
        if job.method not in methods:
            return False
    if "model" in m and m["model"] != job.model.name:
        return False
    if "preset" in m and not any(fnmatch.fnmatch(Path(job.preset or "").name, pat) for pat in
                                 (m["preset"] if isinstance(m["preset"], list) else [m["preset"]])):
        return False
    if "rows" in m and not any(fnmatch.fnmatchcase(r, m["rows"]) for r in job.rows):
        return False
    if not ignore_size and "size" in m:
        sizes = m["size"] if isinstance(m["size"], list) and m["size"] and isinstance(m["size"][0], (list, str)) \
            else [m["size"]]
        if (job.H, job.W) not in [_size(s, "timing") for s in sizes]:
            return False
    return True


BASIS_LABELS = {"here": "measured in OUT", "published": "a paper's own time", "measured": "measured (see source)",
                "ratio": "ratio to direct sampling", "structural": "structural estimate",
                "derived": "a paper's time x a measured ratio",
                "extrapolated": "extrapolated by pixel count"}
ENTRY_BASES = ("published", "derived", "measured", "structural")  # what a timing entry's seconds_per_image is


def _row_table(spec: Spec, qid: str):
    for t in spec.tables:
        for r in t.rows:
            if r.qid == qid:
                return t, r
    return None, None


def published_time(spec: Spec, job) -> Optional[Dict]:
    """The paper's own time per image for a job: the first row of the job with a published time."""
    for qid in getattr(job, "rows", []):
        t, r = _row_table(spec, qid)
        if r is None or not r.published or r.published.get("seconds_per_image") in (None, NOT_AVAILABLE):
            continue
        src = spec.sources[r.published.get("source") or t.published["source"]]
        return {"seconds_per_image": float(r.published["seconds_per_image"]), "basis": "published",
                "device": src.get("device", "?"),
                "source": f"{src['cite']}: {r.name}, {r.published['time_as_published']} per image"}
    return None


def _job_seconds(spec: Spec, job, depth: int = 0) -> Optional[Dict]:
    """Seconds per image of ``job`` (a Job or anything with model, H, W, method, preset, role, rows) before any
    run: the paper's own time of one of its rows, else the spec's timing entry for it (a time, or a ratio to
    the direct-sampling estimate at the same model and size), else an entry for the same method (or direct
    sampling) at another size scaled by (pixel ratio)^exponent. Each result says where it comes from."""
    timing = spec.timing or {}
    entries = timing.get("entries") or []
    exponent = float(timing.get("exponent", 1.0))
    hit = published_time(spec, job)
    if hit is not None:
        return hit
    entry = next((e for e in entries if _entry_matches(e, job)), None)
    if entry is not None:
        if "ratio_to_direct" in entry:
            if depth > 2:
                return None
            direct = _direct_seconds(spec, job, depth + 1)
            if direct is None:
                return None
            r = float(entry["ratio_to_direct"])
            return {"seconds_per_image": r * direct["seconds_per_image"], "basis": "ratio",
                    "device": direct["device"],
                    "source": f"{r:g} x direct sampling at {job.W}x{job.H} ({entry['source']}); direct: "
                              f"{direct['seconds_per_image']:.3g} s/image [{BASIS_LABELS[direct['basis']]}: "
                              f"{direct['source']}]"}
        return {"seconds_per_image": float(entry["seconds_per_image"]), "device": str(entry.get("device", "?")),
                "basis": str(entry["basis"]), "source": str(entry["source"])}
    same = [e for e in entries if _entry_matches(e, job, ignore_size=True) and "size" in e.get("match", {})
            and "seconds_per_image" in e]
    direct = [e for e in entries if e.get("match", {}).get("method") == "direct" and "seconds_per_image" in e
              and e.get("match", {}).get("model", job.model.name) == job.model.name and "size" in e.get("match", {})]
    for near, what in ((same, "the same method"), (direct, "direct sampling")):
        if near:
            e = min(near, key=lambda e: abs(math.log(_pixels(e) / (job.H * job.W))))
            ratio = (job.H * job.W) / _pixels(e)
            eh, ew = _size(e["match"]["size"], "timing")
            return {"seconds_per_image": float(e["seconds_per_image"]) * ratio ** exponent, "basis": "extrapolated",
                    "device": str(e.get("device", "?")),
                    "source": (f"{what} at {ew}x{eh} ({e['seconds_per_image']} s/image: {e.get('source', '?')}) x "
                               f"(pixel ratio {ratio:.3g})^{exponent:g}"
                               + (f" ({timing['exponent_source']})" if timing.get("exponent_source") else "")
                               + ("" if what == "the same method" else f"; {job.method}'s own cost not included"))}
    return None


def _direct_seconds(spec: Spec, job, depth: int) -> Optional[Dict]:
    """The direct-sampling estimate at ``job``'s model and size (a direct job of the plan when there is one)."""
    from types import SimpleNamespace
    proxy = SimpleNamespace(model=job.model, H=job.H, W=job.W, method="direct", preset=None, role="row", rows=[])
    for t in spec.tables:
        for r in t.rows:
            if r.method == "direct" and r.model == job.model.name and (r.H, r.W) == (job.H, job.W):
                proxy.rows.append(r.qid)
    return _job_seconds(spec, proxy, depth)


def estimate(p: Plan) -> List[Dict]:
    """Seconds per image of each job and where the figure comes from: measured in this output folder, else
    :func:`_job_seconds` (published, a measured ratio to direct sampling, or extrapolated); ``basis`` names which."""
    out = []
    for job in p.jobs:
        have = images_present(job)
        remaining = 0 if job_complete(job) else job.n_images - have
        stats = job_stats(job)
        if stats["seconds_per_image"] is not None:
            got = {"seconds_per_image": stats["seconds_per_image"], "basis": "here",
                   "source": f"measured here ({stats['images_timed']} images)",
                   "device": "; ".join(stats["devices"]) or "?"}
        else:
            got = _job_seconds(p.spec, job) or {}
        sec = got.get("seconds_per_image")
        out.append({"job": job, "images": job.n_images, "present": have, "remaining": remaining,
                    "seconds_per_image": sec, "basis": got.get("basis"),
                    "source": got.get("source") or "no estimate (add a timing entry to the spec)",
                    "device": got.get("device") or "?",
                    "hours": None if sec is None else remaining * sec / 3600.0,
                    "hours_total": None if sec is None else job.n_images * sec / 3600.0})
    return out


def _pixels(entry) -> float:
    h, w = _size(entry["match"]["size"], "timing")
    return float(h * w)


def machine_description(device: str = "cpu") -> str:
    import platform

    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return f"{name} x{torch.cuda.device_count()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


__all__ = ["SpecError", "MetricDef", "METRICS", "METRIC_ALIASES", "resolve_metric", "Spec", "Table", "Row", "Column",
           "Model", "Reference", "Job", "Plan", "load_spec", "check_spec", "select", "plan", "base_size",
           "materialize_prompts", "render_dataset_references", "job_complete", "images_present", "expected_files",
           "job_stats", "read_runs", "FeatureStore", "ShapeExtractor", "InceptionExtractor", "EXTRACTORS",
           "compute_cell", "evaluate", "table_rows", "write_csv", "render_markdown", "replace_block", "estimate",
           "published_comparison", "render_published", "kendall_tau_b", "rank_order", "published_time",
           "machine_description", "now_utc", "write_text_atomic", "COMPLETE_FILE", "RUNS_FILE", "BASE"]
