"""Table specs: the schema (metrics, rows, columns, tables, published values, timing entries), :func:`load_spec`
(everything that needs no sampler), :func:`check_spec` (the rows against the method registry, the presets and
txt2img's options) and :func:`select` (rows and columns of a run)."""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from ldm.samplers import SAMPLERS as SAMPLER_NAMES, sampler_class, takes_eta

from .. import shape_features

REPO_ROOT = Path(__file__).resolve().parents[3]


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
TABLE_KEYS = {"id", "title", "prompts", "images", "references", "columns", "rows", "notes", "published", "sampler"}
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
    "--help": "(not a sampling option)", "-h": "(not a sampling option)",
}
# flags that lower safety: only the user's own command line sets them (scripts/reproduce_table.py passes them to
# every job); a spec is a downloaded file like a config, so none of its options may
SAFETY_FLAGS = {
    "--trust_config": "it lets a config build classes outside this package (a config then runs code of its choosing)",
    "--unsafe_load": "it unpickles checkpoints that need it (a checkpoint then runs code of its choosing)",
}
_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")  # a negative number is a value, not an option
PRESET_FLAGS = {"scalecrafter": "--scalecrafter_config", "freescale": "--freescale_config",
                "fouriscale": "--fouri_config"}
BUILTIN_PROMPTS = ("shapes",)
ENTRY_BASES = ("published", "derived", "measured", "structural")  # what a timing entry's seconds_per_image is
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
    sampler: Dict = field(default_factory=dict)    # the spec's sampler with this table's ``sampler:`` keys over it

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

    def table(self, tid: str) -> Table:
        return next(t for t in self.tables if t.id == tid)

    def samplers_differ(self) -> bool:
        """Whether some table samples with other settings than the spec's ``sampler:`` (a table's own ``sampler:``)."""
        return any(t.sampler != self.sampler for t in self.tables)

    def describe_sampler(self, table: Optional[Table] = None) -> str:
        return describe_sampler(self.sampler if table is None else table.sampler)


def describe_sampler(s: Dict) -> str:
    """One line of a sampler's settings (a spec's or a table's)."""
    return (f"{s.get('name', 'ddim')} {s['steps']} steps, eta {s['eta']:g}, classifier-free guidance {s['scale']:g}, batch "
            f"{s['batch_size']}, precision {s['precision']}" +
            (f", negative prompt {s['negative_prompt']!r}" if s["negative_prompt"] else ""))


def _slug(text) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")
    return s or "x"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _size(value, where) -> Tuple[int, int]:
    """[H, W], "HxW" (width x height as the preset names write it: "2048x1024" is W=2048, H=1024) or an int; the
    sides positive."""
    size = None
    if _is_int(value):
        size = (value, value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(-?\d+)\s*[x×]\s*(-?\d+)\s*", value)
        if m:
            size = (int(m.group(2)), int(m.group(1)))
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value):
        size = (int(value[0]), int(value[1]))
    if size is None:
        raise SpecError(f"{where}: size must be [H, W], 'WxH' or an int, got {value!r}")
    if min(size) < 1:
        raise SpecError(f"{where}: size {value!r}: height and width must be positive (pixels)")
    return size


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
    # what the jobs' txt2img.py would refuse, refused here (before a dry run reports a plan that cannot run)
    for key, what in (("steps", "the number of DDIM steps"), ("batch_size", "images per batch")):
        if not _is_int(out[key]) or out[key] < 1:
            raise SpecError(f"{where}.{key}: {out[key]!r}: a positive integer is required ({what})")
    for key in ("eta", "scale"):
        if not isinstance(out[key], (int, float)) or isinstance(out[key], bool) or not math.isfinite(out[key]):
            raise SpecError(f"{where}.{key}: {out[key]!r}: a finite number is required")
        out[key] = float(out[key])
    if not 0.0 <= out["eta"] <= 1.0:
        raise SpecError(f"{where}.eta: {out['eta']!r} is outside [0, 1] (DDIM's eta: 0 deterministic, 1 DDPM-like)")
    if not isinstance(out["negative_prompt"], str):
        raise SpecError(f"{where}.negative_prompt: text is required, got {out['negative_prompt']!r}")
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
    raw_sampler = raw.get("sampler")
    sampler = _sampler(raw_sampler, f"{where}: sampler")
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
    common = check_options(raw.get("common_options"), f"{where}: common_options")
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
        # a table may sample with its own settings (another sampler, its step count): its keys over the spec's
        tsampler = sampler
        if t.get("sampler") is not None:
            if not isinstance(t["sampler"], dict):
                raise SpecError(f"{tw}: sampler: expected a mapping, got {t['sampler']!r}")
            tsampler = _sampler({**dict(raw_sampler or {}), **t["sampler"]}, f"{tw}: sampler")
        rows, ids = [], set()
        for ri, r in enumerate(t.get("rows") or []):
            rows.append(_row(r, ri, tid, tw, models, seed, tsampler, prompts, images, multi))
            rows[-1].published = _row_published(r.get("published"), f"{tw}: row {rows[-1].id!r}", published,
                                                columns, sources)
            if rows[-1].id in ids:
                raise SpecError(f"{tw}: row {rows[-1].id!r}: two rows with this id")
            ids.add(rows[-1].id)
            qids.add(rows[-1].qid)
        if not rows:
            raise SpecError(f"{tw}: no rows")
        tables.append(Table(tid, str(t.get("title", tid)), prompts, images, refs, columns, rows,
                            str(t.get("notes", "") or ""), published, tsampler))
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


def _option_names(options: Sequence[str]) -> List[str]:
    """The option names among a list of command-line words (``--name`` of ``--name=value``; values and negative
    numbers left out)."""
    return [o.split("=", 1)[0] for o in options if o.startswith("-") and len(o) > 1 and not _NUMBER.match(o)]


def check_options(value, where, option_names: Optional[Iterable[str]] = None) -> List[str]:
    """A spec's option list (``common_options``, a row's ``options``: a list or one shell-quoted string) as words,
    checked: no option that lowers safety (:data:`SAFETY_FLAGS`: the user's command line gives those) and none that
    the table sets itself (:data:`RESERVED_FLAGS`). Given ``option_names`` (every option string of txt2img.py's
    parser), also no abbreviation of either: argparse would read ``--see 7`` as ``--seed 7``, so a name that is not
    a whole option but begins one of those flags is refused (:func:`check_spec` does this; txt2img's own parser
    then accepts whole option names only)."""
    known = set(option_names) if option_names is not None else None
    if value is None:
        return []
    if isinstance(value, str):
        import shlex
        value = shlex.split(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(o, (str, int, float)) and not isinstance(o, bool)
                                                       for o in value):
        raise SpecError(f"{where}: a list of command-line words (or one string) is required, got {value!r}")
    options = [str(o) for o in value]
    for name in _option_names(options):
        if not name.startswith("--") and name.startswith("-h"):
            name = "-h"  # argparse reads -hX as -h (help) with X attached
        for table, check in ((SAFETY_FLAGS, "safety"), (RESERVED_FLAGS, "reserved")):
            whole = name if name in table else None
            abbrev = [] if whole or known is None or name in known or not name.startswith("--") or len(name) < 3 \
                else [f for f in table if f.startswith(name)]
            hits = [whole] if whole else abbrev
            if not hits:
                continue
            said = name if whole else f"{name} (an abbreviation of {' / '.join(hits)}: options are matched by " \
                                      "their whole name only)"
            if check == "safety":
                raise SpecError(f"{where}: option {said} lowers safety: {SAFETY_FLAGS[hits[0]]}. A table spec cannot "
                                f"switch it on; if you trust the files, give {hits[0]} to scripts/reproduce_table.py "
                                "yourself (it is passed to every job, and --dry-run says so)")
            raise SpecError(f"{where}: option {said} is not a row option: "
                            + "; ".join(f"{f} is set by {RESERVED_FLAGS[f]}" for f in hits))
    return options


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
    options = check_options(r.get("options"), f"{w}: options")
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


def _model_family(model: Model, cache: Dict) -> Optional[str]:
    """The family (sd1, sd2, sdxl, demo) of a spec model's config, as txt2img names it; None when the config does
    not load here untrusted (the job reports that itself)."""
    if model.name not in cache:
        from ldm.pipelines.txt2img import model_family
        from ldm.util import ConfigError, load_config_file
        try:
            cache[model.name] = model_family(load_config_file(_rel(model.config), trust=False))
        except (ConfigError, OSError, ValueError, KeyError, AttributeError):
            cache[model.name] = None
    return cache[model.name]


def check_spec(spec: Spec, methods: Sequence[str], option_check: Optional[Callable[[List[str]], None]] = None,
               selected: Optional[Sequence[Row]] = None, preset_flags: Optional[Dict[str, str]] = None,
               option_names: Optional[Iterable[str]] = None) -> List[str]:
    """Checks of the rows against the sampler: ``methods`` (the method registry's names), the presets
    (exist, load, made for the row's size and the table's steps) and the row options (``option_check`` raises
    ValueError with a message for flags txt2img does not take; ``option_names``: txt2img's option strings, against
    which abbreviations of the reserved and safety flags are refused, see :func:`check_options`). Selected rows
    (default: all) raise :class:`SpecError` naming the row; for the others an unknown method is returned as a
    warning line (a row for a method that is still being added does not block the other rows)."""
    selected_ids = None if selected is None else {r.qid for r in selected}
    preset_flags = dict(PRESET_FLAGS, **(preset_flags or {}))
    warnings_out, families = [], {}
    if option_names is not None:
        option_names = set(option_names)
        check_options(spec.common_options, f"{spec.path}: common_options", option_names)
    for row in spec.rows():
        w = f"{spec.path}: row {row.qid!r}"
        is_selected = selected_ids is None or row.qid in selected_ids
        sampler = spec.table(row.table).sampler
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
            family = _model_family(spec.models[row.model], families) if preset.get("base_model") else None
            if family is not None and str(preset["base_model"]) != family:  # what the job would refuse, found now
                raise SpecError(f"{w}: preset {row.preset} is a preset for {preset['base_model']} but model "
                                f"{row.model} ({spec.models[row.model].config}) is a {family} model; use a "
                                f"{family} preset")
            ph, pw = preset.get("height"), preset.get("width")
            if row.H is None:
                if ph is None or pw is None:
                    raise SpecError(f"{w}: preset {row.preset} names no size; give size: [H, W]")
                row.H, row.W = int(ph), int(pw)
            elif ph is not None and (int(ph), int(pw)) != (row.H, row.W):
                raise SpecError(f"{w}: preset {row.preset} is made for {pw}x{ph} (WxH), the row samples "
                                f"{row.W}x{row.H}")
            if preset.get("steps") is not None and int(preset["steps"]) != sampler["steps"] and is_selected:
                # the preset's schedules count its own steps (dilate_tau, ndcfg_tau, ...): txt2img places them on
                # the table's steps by trajectory fraction (ldm.guidance.TrajectoryClock, docs/samplers.md)
                warnings_out.append(f"{w}: preset {row.preset} is made for {preset['steps']} steps, the table "
                                    f"samples {sampler['steps']}: its schedules are placed by trajectory fraction "
                                    "(docs/samplers.md)")
            if preset.get("negative_prompt") is not None and str(preset["negative_prompt"]) != \
                    sampler["negative_prompt"] and is_selected:
                warnings_out.append(f"{w}: preset {row.preset} was released with negative prompt "
                                    f"{preset['negative_prompt']!r}; the row samples with the table's "
                                    f"{sampler['negative_prompt']!r}")
            # eta means nothing to a sampler that draws no noise (the table's eta is then 0 by rule)
            stochastic = takes_eta(sampler.get("name", "ddim"))
            for key in ("scale", "eta") if stochastic else ("scale",):
                if preset.get(key) is not None and float(preset[key]) != float(sampler[key]) and is_selected:
                    warnings_out.append(f"{w}: preset {row.preset} was released with {key} {preset[key]}; the row "
                                        f"samples with the table's {key} {sampler[key]} (every row of a table "
                                        "shares the sampler settings)")
        if option_names is not None:
            check_options(row.options, f"{w}: options", option_names)
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
