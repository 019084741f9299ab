#!/usr/bin/env python
"""Pick the paper's LAION evaluation subset from local metadata: prompt file + reference image folder.

    python scripts/prepare_eval_set.py --metadata laion_meta.parquet --image_root /data/laion \
        --resolution 2048 --n 10000 --seed 0 --outdir data/eval_2048

reads a metadata table (parquet, TSV or CSV) with one row per locally stored LAION image -- caption,
path of the image file (absolute or relative to --image_root) and, if available, width and height --
and writes

  <outdir>/prompts.txt      one caption per line, for `scripts/txt2img.py --from-file`
  <outdir>/reference/       the matching images, resized (shorter side to the target) and
                            centre-cropped to exactly H x W, as 00000.png, 00001.png, ...
  <outdir>/selection.tsv    index, caption, source path, original size of every selected row
  <outdir>/selection.json   settings and counts

Rows are kept when the caption is non-empty and the image is at least H x W (checked from the table
when it has sizes, and always on the decoded image); they are shuffled with --seed and the first
--n usable ones are taken, so the subset is reproducible.  Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ldm.image_io import ImageReadError, image_size, list_files, read_rgb  # noqa: E402
from ldm.inference import finite_float, seed_arg  # noqa: E402

CAPTION_COLUMNS = ("caption", "text", "prompt", "TEXT", "captions")
PATH_COLUMNS = ("path", "filepath", "file_path", "image_path", "local_path", "file", "filename", "image")
WIDTH_COLUMNS = ("width", "WIDTH", "original_width", "w")
HEIGHT_COLUMNS = ("height", "HEIGHT", "original_height", "h")


class PrepareError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------
def _pick_column(columns: Sequence[str], wanted: Optional[str], candidates: Sequence[str], what: str,
                 required: bool) -> Optional[str]:
    if wanted:
        if wanted not in columns:
            raise PrepareError(f"column {wanted!r} ({what}) not in the metadata; columns: {', '.join(columns)}")
        return wanted
    lower = {c.lower(): c for c in columns}
    for c in candidates:
        if c in columns:
            return c
        if c.lower() in lower:
            return lower[c.lower()]
    if required:
        raise PrepareError(f"no {what} column found (tried {', '.join(candidates)}); columns: "
                           f"{', '.join(columns)} -- name it with --{what}_col")
    return None


def read_metadata(path, sep: Optional[str] = None, columns: Optional[Sequence[str]] = None
                  ) -> Tuple[List[str], Dict[str, list]]:
    """Read a parquet / TSV / CSV table into ``(column names, {column: list of values})``."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"metadata file not found: {path}")
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() == ".gz" else path.suffix.lower()
    if suffix.startswith(".parquet") or suffix == ".pq":
        return _read_parquet(path, columns)
    if sep is None:
        sep = "\t" if suffix.startswith((".tsv", ".txt", ".tab")) else ","
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    opener = open
    if path.suffix.lower() == ".gz":
        import gzip
        opener = gzip.open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=sep)
        try:
            header = next(reader)
        except StopIteration:
            raise PrepareError(f"{path} is empty")
        header = [h.strip() for h in header]
        keep = [i for i, h in enumerate(header) if columns is None or h in columns]
        data: Dict[str, list] = {header[i]: [] for i in keep}
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise PrepareError(f"{path}:{line_no}: {len(row)} fields, header has {len(header)} "
                                   f"(wrong separator? use --sep)")
            for i in keep:
                data[header[i]].append(row[i])
    return list(header), data


def _read_parquet(path: Path, columns):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        schema_names = pq.read_schema(path).names
        cols = [c for c in schema_names if columns is None or c in columns]
        table = pq.read_table(path, columns=cols)
        return list(schema_names), {c: table.column(c).to_pylist() for c in cols}
    try:
        import pandas as pd
        df = pd.read_parquet(path)
    except ImportError:
        raise PrepareError(
            f"{path}: reading parquet needs pyarrow (pip install pyarrow); alternatively export the "
            "metadata to TSV/CSV (columns: caption, path, width, height) and pass that file")
    except Exception as e:  # pandas present but no parquet engine
        raise PrepareError(f"{path}: could not read parquet ({e}); pip install pyarrow, or use TSV/CSV")
    cols = [c for c in df.columns if columns is None or c in columns]
    return [str(c) for c in df.columns], {c: df[c].tolist() for c in cols}


def _to_int(v) -> Optional[int]:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if np.isfinite(f) else None


def _to_float(v) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def clean_caption(c) -> str:
    if c is None:
        return ""
    return " ".join(str(c).split())


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------
def resize_center_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale so the image covers ``width x height`` (Lanczos, antialiased), then centre-crop."""
    w, h = img.size
    scale = max(width / w, height / h)
    if (w, h) != (width, height) and scale != 1.0:
        nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
        img = img.resize((nw, nh), resample=Image.Resampling.LANCZOS)
        w, h = nw, nh
    left, top = (w - width) // 2, (h - height) // 2
    return img.crop((left, top, left + width, top + height))


def _process(job) -> Tuple[int, str, Optional[Tuple[int, int]]]:
    """Worker: open, check, resize/crop and save one candidate to a temporary file."""
    cand, src, dst, width, height, fmt = job
    try:
        size = image_size(src)  # as read_rgb returns the image (EXIF orientation applied)
        if size[0] < width or size[1] < height:
            return cand, f"too small ({size[0]}x{size[1]})", size
        rgb = read_rgb(src)  # 16-bit, transparency (over white), CMYK, EXIF orientation: ldm/image_io.py
        out = resize_center_crop(rgb, width, height)
        if fmt == "png":
            out.save(dst, format="PNG")
        else:
            out.save(dst, format="JPEG", quality=95)
        return cand, "", size
    except FileNotFoundError:
        return cand, "missing file", None
    except ImageReadError as e:
        return cand, "missing file" if not os.path.exists(src) else f"unreadable ({e})", None
    except Exception as e:
        return cand, f"unreadable ({type(e).__name__}: {e})", None


def _index_by_name(root: Path) -> Dict[str, str]:
    index: Dict[str, str] = {}
    for rel in list_files(root):  # the package's one folder walker (links followed, no loops, no duplicates)
        index.setdefault(rel.rsplit("/", 1)[-1], os.path.join(root, rel))
    return index


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--metadata", required=True, help="parquet / TSV / CSV table of local LAION images")
    p.add_argument("--image_root", default=None, help="folder that relative image paths start from "
                   "(default: the metadata file's folder)")
    p.add_argument("--sep", default=None, help="field separator for text tables (default: tab for .tsv, comma otherwise)")
    p.add_argument("--caption_col", default=None, help=f"caption column (default: first of {', '.join(CAPTION_COLUMNS)})")
    p.add_argument("--path_col", default=None, help=f"image path column (default: first of {', '.join(PATH_COLUMNS)})")
    p.add_argument("--path_format", default=None,
                   help="build the path from columns instead, e.g. '{key}.jpg' (img2dataset layout, with --find_by_name)")
    p.add_argument("--find_by_name", action="store_true",
                   help="look image files up by file name anywhere under --image_root")
    p.add_argument("--width_col", default=None, help="width column (default: auto; sizes are re-checked on the image)")
    p.add_argument("--height_col", default=None, help="height column (default: auto)")
    p.add_argument("--aesthetic_col", default=None, help="optional score column, e.g. 'aesthetic'")
    p.add_argument("--min_aesthetic", type=finite_float, default=None, help="keep rows with score >= this (e.g. 6.5)")
    p.add_argument("--resolution", type=int, default=None, help="square target resolution (sets --H and --W)")
    p.add_argument("--H", type=int, default=None, help="target height")
    p.add_argument("--W", type=int, default=None, help="target width")
    p.add_argument("--n", type=int, default=10000, help="number of images/prompts to select")
    p.add_argument("--seed", type=seed_arg, default=0, help="shuffle seed")
    p.add_argument("--outdir", required=True, help="output folder")
    p.add_argument("--prompts", default=None, help="prompt file (default: <outdir>/prompts.txt)")
    p.add_argument("--ref_dir", default=None, help="reference image folder (default: <outdir>/reference)")
    p.add_argument("--format", choices=("png", "jpg"), default="png", help="reference image format")
    p.add_argument("--no_images", action="store_true",
                   help="only write prompts/selection (sizes are then taken from the table only)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="resize/encode processes")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty reference folder")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    # local LAION originals can be very large (trusted files): PIL's own limit off, ldm.image_io.MAX_PIXELS applies
    Image.MAX_IMAGE_PIXELS = None
    H = args.H or args.resolution
    W = args.W or args.resolution
    if not H or not W:
        raise PrepareError("give the target size with --resolution or --H/--W")
    if args.n < 1:
        raise PrepareError("--n must be positive")
    meta_path = Path(args.metadata)
    root = Path(args.image_root) if args.image_root else meta_path.parent
    header, data = read_metadata(meta_path, args.sep)
    cap_c = _pick_column(header, args.caption_col, CAPTION_COLUMNS, "caption", True)
    path_c = None if args.path_format else _pick_column(header, args.path_col, PATH_COLUMNS, "path", True)
    w_c = _pick_column(header, args.width_col, WIDTH_COLUMNS, "width", False)
    h_c = _pick_column(header, args.height_col, HEIGHT_COLUMNS, "height", False)
    a_c = None
    if args.min_aesthetic is not None:
        a_c = _pick_column(header, args.aesthetic_col, ("aesthetic", "AESTHETIC_SCORE", "aesthetic_score"),
                           "aesthetic", True)
    n_rows = len(data[cap_c])
    if n_rows == 0:
        raise PrepareError(f"{meta_path} has no rows")

    index = _index_by_name(root) if args.find_by_name else None
    cands = []  # (row, caption, path, w, h)
    reasons = {"empty caption": 0, "smaller than target (table)": 0, "below aesthetic threshold": 0,
               "no path": 0}
    for r in range(n_rows):
        cap = clean_caption(data[cap_c][r])
        if not cap:
            reasons["empty caption"] += 1
            continue
        w = _to_int(data[w_c][r]) if w_c else None
        h = _to_int(data[h_c][r]) if h_c else None
        if (w is not None and w < W) or (h is not None and h < H):
            reasons["smaller than target (table)"] += 1
            continue
        if a_c is not None:
            score = _to_float(data[a_c][r])
            if score is None or score < args.min_aesthetic:
                reasons["below aesthetic threshold"] += 1
                continue
        if args.path_format:
            try:
                rel = args.path_format.format(**{k: data[k][r] for k in data})
            except (KeyError, IndexError, ValueError) as e:
                raise PrepareError(f"--path_format {args.path_format!r}: {e}")
        else:
            rel = str(data[path_c][r] or "")
        if not rel:
            reasons["no path"] += 1
            continue
        if index is not None:
            src = index.get(os.path.basename(rel), str(root / rel))
        else:
            src = rel if os.path.isabs(rel) else str(root / rel)
        cands.append((r, cap, src, w, h))
    print(f"{n_rows} rows, {len(cands)} candidates at >= {W}x{H}"
          + "".join(f", {v} {k}" for k, v in reasons.items() if v), file=sys.stderr)
    if not cands:
        raise PrepareError(f"no rows of {meta_path} qualify for {W}x{H} (see counts above)")

    order = np.random.default_rng(args.seed).permutation(len(cands))
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    prompts_path = Path(args.prompts) if args.prompts else outdir / "prompts.txt"
    ref_dir = Path(args.ref_dir) if args.ref_dir else outdir / "reference"

    selected = []  # (cand, actual size)
    rejected: Dict[str, int] = {}
    if args.no_images:
        selected = [(int(i), (cands[i][3], cands[i][4])) for i in order[: args.n]]
    else:
        ref_dir.mkdir(parents=True, exist_ok=True)
        if any(ref_dir.iterdir()) and not args.overwrite:
            raise PrepareError(f"{ref_dir} is not empty; pass --overwrite or choose another --ref_dir")
        ext = "png" if args.format == "png" else "jpg"
        chunk = max(4 * max(1, args.workers), 16)
        pool = cf.ProcessPoolExecutor(args.workers) if args.workers > 1 else None
        try:
            pos = last_report = 0
            while len(selected) < args.n and pos < len(order):
                need = args.n - len(selected)
                batch = [int(i) for i in order[pos: pos + min(need, chunk)]]
                pos += len(batch)
                jobs = [(c, cands[c][2], str(ref_dir / f".tmp_{c}.{ext}"), W, H, args.format) for c in batch]
                results = list(pool.map(_process, jobs)) if pool else [_process(j) for j in jobs]
                for (c, err, size), job in zip(results, jobs):
                    if err or len(selected) >= args.n:
                        if err:
                            key = err.split(" (")[0]
                            rejected[key] = rejected.get(key, 0) + 1
                        if os.path.exists(job[2]):
                            os.remove(job[2])
                        continue
                    os.replace(job[2], ref_dir / f"{len(selected):05d}.{ext}")
                    selected.append((c, size))
                if len(selected) // 500 != last_report // 500 or len(selected) >= args.n:
                    print(f"  {len(selected)}/{args.n} reference images written", file=sys.stderr)
                    last_report = len(selected)
        finally:
            if pool is not None:
                pool.shutdown()

    with open(prompts_path, "w", encoding="utf-8") as f:
        for c, _ in selected:
            f.write(cands[c][1] + "\n")
    with open(outdir / "selection.tsv", "w", encoding="utf-8", newline="") as f:
        wr = csv.writer(f, delimiter="\t")
        wr.writerow(["index", "row", "caption", "source", "width", "height"])
        for k, (c, size) in enumerate(selected):
            r, cap, src, _, _ = cands[c]
            wr.writerow([k, r, cap, src, size[0] if size else "", size[1] if size else ""])
    summary = {
        "metadata": str(meta_path.resolve()), "image_root": str(root.resolve()),
        "target": {"width": W, "height": H}, "n_requested": args.n, "n_selected": len(selected),
        "seed": args.seed, "rows": n_rows, "candidates": len(cands), "filtered": reasons,
        "rejected_on_read": rejected, "prompts": str(prompts_path),
        "reference_dir": None if args.no_images else str(ref_dir),
        "resize": "shorter side to target with PIL Lanczos, centre crop" if not args.no_images else None,
        "columns": {"caption": cap_c, "path": path_c, "width": w_c, "height": h_c, "aesthetic": a_c},
        "min_aesthetic": args.min_aesthetic,
    }
    (outdir / "selection.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {len(selected)} prompts to {prompts_path}"
          + ("" if args.no_images else f" and reference images to {ref_dir}"), file=sys.stderr)
    if rejected:
        print("skipped while reading: " + ", ".join(f"{v} {k}" for k, v in rejected.items()), file=sys.stderr)
    if len(selected) < args.n:
        print(f"warning: only {len(selected)} of the requested {args.n} images qualify", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
