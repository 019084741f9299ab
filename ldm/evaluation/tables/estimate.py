"""The dry run's time estimates: measured runs in the output folder, else the paper's own time of a row of the job,
else the spec's ``timing`` entries, else extrapolation by pixel count; each figure with its basis and source."""
from __future__ import annotations

import fnmatch
import math
from pathlib import Path
from typing import Dict, List, Optional

from .plan import Job, Plan, images_present, job_complete, job_stats
from .spec import NOT_AVAILABLE, Spec, _size


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
            if (r.method, r.model, r.H, r.W) == ("direct", job.model.name, job.H, job.W):
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
        elif stats["interrupted_seconds_per_image"] is not None:
            got = {"seconds_per_image": stats["interrupted_seconds_per_image"], "basis": "here",
                   "source": f"measured here, in interrupted runs ({stats['images_timed_interrupted']} images)",
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
