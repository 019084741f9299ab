"""scripts/prepare_eval_set.py on a tiny synthetic LAION-style TSV (local files only)."""
import csv
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import prepare_eval_set as P  # noqa: E402


@pytest.fixture()
def laion(tmp_path):
    """Images of various sizes + a metadata TSV with a few bad rows."""
    rng = np.random.default_rng(0)
    img_dir = tmp_path / "images"
    (img_dir / "00000").mkdir(parents=True)
    rows = []
    sizes = {"big_a": (300, 200), "big_b": (256, 256), "exact": (128, 128), "wide": (400, 130),
             "narrow": (100, 300), "big_c": (150, 170), "lies": (90, 90)}
    for i, (key, (w, h)) in enumerate(sizes.items()):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img_dir / "00000" / f"{key}.jpg")
        # "lies" claims to be large in the table but is not
        tw, th = (1000, 1000) if key == "lies" else (w, h)
        rows.append((f"a photo of {key}\twith a tab", f"00000/{key}.jpg", tw, th))
    rows.append(("missing file", "00000/gone.jpg", 512, 512))
    (img_dir / "00000" / "corrupt.jpg").write_bytes(b"garbage")
    rows.append(("corrupt file", "00000/corrupt.jpg", 512, 512))
    rows.append(("", "00000/big_a.jpg", 300, 200))  # empty caption
    meta = tmp_path / "meta.tsv"
    with open(meta, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["caption", "path", "width", "height", "aesthetic"])
        for i, r in enumerate(rows):
            w.writerow(list(r) + [6.0 + 0.1 * i])
    return tmp_path, meta, img_dir


def _run(args, capsys):
    rc = P.main([str(a) for a in args])
    return rc, capsys.readouterr().err


def test_selects_resizes_and_writes_prompts(laion, capsys):
    tmp, meta, img_dir = laion
    out = tmp / "eval128"
    args = ["--metadata", meta, "--image_root", img_dir, "--resolution", 128, "--n", 4, "--seed", 0,
            "--outdir", out, "--workers", 1]
    rc, err = _run(args, capsys)
    assert rc == 0, err
    prompts = (out / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 4 and all(p.startswith("a photo of ") for p in prompts)
    assert not any("\t" in p for p in prompts)
    refs = sorted((out / "reference").iterdir())
    assert [p.name for p in refs] == [f"{i:05d}.png" for i in range(4)]
    for p in refs:
        with Image.open(p) as im:
            assert im.size == (128, 128) and im.mode == "RGB"
    with open(out / "selection.tsv", newline="") as f:
        sel = list(csv.DictReader(f, delimiter="\t"))
    assert [r["caption"] for r in sel] == prompts
    keys = [Path(r["source"]).stem for r in sel]
    assert "narrow" not in keys and "lies" not in keys  # too small (table / decoded image)
    assert all(int(r["width"]) >= 128 and int(r["height"]) >= 128 for r in sel)

    # same seed -> same subset and identical pixels; other seed -> different order
    out2 = tmp / "again"
    rc, _ = _run(args[:-4] + ["--outdir", out2, "--workers", 2], capsys)
    assert rc == 0
    assert (out2 / "prompts.txt").read_text() == (out / "prompts.txt").read_text()
    for a, b in zip(refs, sorted((out2 / "reference").iterdir())):
        assert a.read_bytes() == b.read_bytes()
    out3 = tmp / "seed1"
    rc, _ = _run(args[:-6] + ["--seed", 1, "--outdir", out3, "--workers", 1], capsys)
    assert rc == 0 and (out3 / "prompts.txt").read_text() != (out / "prompts.txt").read_text()


def test_fewer_qualifying_than_requested(laion, capsys):
    tmp, meta, img_dir = laion
    out = tmp / "all"
    rc, err = _run(["--metadata", meta, "--image_root", img_dir, "--resolution", 128, "--n", 50,
                    "--outdir", out, "--workers", 1], capsys)
    assert rc == 0
    # 5 usable: big_a, big_b, exact, wide, big_c (narrow too small, lies/corrupt/missing rejected)
    assert len((out / "prompts.txt").read_text().splitlines()) == 5
    assert "only 5 of the requested 50" in err
    assert "missing file" in err and "unreadable" in err and "too small" in err
    # refuses to overwrite a non-empty reference folder
    rc, err = _run(["--metadata", meta, "--image_root", img_dir, "--resolution", 128, "--n", 2,
                    "--outdir", out, "--workers", 1], capsys)
    assert rc == 2 and "not empty" in err


def test_csv_no_images_aesthetic_and_errors(laion, capsys, tmp_path):
    tmp, meta, img_dir = laion
    rows = list(csv.reader(open(meta, newline=""), delimiter="\t"))
    csv_path = tmp / "meta.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([["TEXT", "filepath", "WIDTH", "HEIGHT", "aesthetic"]] + rows[1:])
    out = tmp / "prompts_only"
    rc, err = _run(["--metadata", csv_path, "--image_root", img_dir, "--H", 128, "--W", 256, "--n", 10,
                    "--no_images", "--outdir", out, "--min_aesthetic", 6.15], capsys)
    assert rc == 0, err
    prompts = (out / "prompts.txt").read_text().splitlines()
    # width >= 256 and height >= 128 per the table (files are not opened), score >= 6.15
    assert sorted(prompts) == ["a photo of lies with a tab", "a photo of wide with a tab",
                               "corrupt file", "missing file"]
    assert not (out / "reference").exists()

    rc, err = _run(["--metadata", meta, "--path_col", "nope", "--resolution", 64, "--outdir", tmp / "x"], capsys)
    assert rc == 2 and "column 'nope'" in err and "caption" in err
    rc, err = _run(["--metadata", tmp / "none.tsv", "--resolution", 64, "--outdir", tmp / "x"], capsys)
    assert rc == 2 and "not found" in err
    rc, err = _run(["--metadata", meta, "--resolution", 4096, "--outdir", tmp / "x"], capsys)
    assert rc == 2 and "no rows" in err


def test_parquet_needs_pyarrow(tmp_path, capsys):
    try:
        import pyarrow  # noqa: F401
        pytest.skip("pyarrow installed; the error path is not reachable")
    except ImportError:
        pass
    try:
        import pandas  # noqa: F401
        pytest.skip("pandas installed")
    except ImportError:
        pass
    p = tmp_path / "meta.parquet"
    p.write_bytes(b"PAR1")
    rc, err = _run(["--metadata", p, "--resolution", 64, "--outdir", tmp_path / "o"], capsys)
    assert rc == 2 and "pip install pyarrow" in err and "TSV" in err
