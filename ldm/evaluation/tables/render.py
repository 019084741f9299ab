"""The written table: Markdown, CSV records, the published table beside the reproduction (ours ÷ published, rank
agreement per column) and the block of a docs file."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .plan import Plan, images_present, job_stats, write_text_atomic
from .spec import BASE, NOT_AVAILABLE, REPO_ROOT, MetricDef, Table


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
                   "n": images_present(job), "job": job.id, "sampler": t.sampler.get("name", "ddim"),
                   "steps": t.sampler["steps"]}
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
              f"- **Sampler**: " + ("per table (each table's line below)" if spec.samplers_differ()
                                    else spec.describe_sampler())
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
                  + (f" Sampler: {spec.describe_sampler(t)}." if spec.samplers_differ() else "")
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
    from ldm.reports import replace_block as write_block
    write_block(path, "table", name, body)
