"""End-to-end runs of scripts/eval_fid.py on tiny folders with random-weight FID Inception weights.

Kept small for 2 CPU cores: a handful of 64-96 px images; the reference folder's features are cached
by the first run and reused by the later ones.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from ldm.evaluation import features as F_
from ldm.evaluation import metrics as M
from ldm.evaluation.inception import FIDInceptionV3

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import eval_fid  # noqa: E402

cleanfid_fid = pytest.importorskip("cleanfid.fid")

ALL = ["fid", "kid", "pfid", "pkid", "sfid", "skid"]


def _random_weights(path: Path, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    model = FIDInceptionV3()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (2.0 / mod.weight[0].numel()) ** 0.5)
            elif isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.uniform_(-0.5, 0.5, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
    torch.save(model.state_dict(), path)
    return path


def _image(rng, h, w):
    # smooth colour ramp + noise, so images differ in more than noise
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * rng.uniform(80, 255, size=3)
    return np.clip(base + rng.normal(0, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)


def _write(folder: Path, specs, seed):
    rng = np.random.default_rng(seed)
    for rel, (h, w) in specs:
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(rng, h, w)).save(p, quality=95) if rel.endswith(".jpg") else \
            Image.fromarray(_image(rng, h, w)).save(p)
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    weights = _random_weights(root / "random_fid_inception.pth")
    gen = _write(root / "gen", [("a.png", (96, 96)), ("nested/b.png", (96, 96)), ("nested/deeper/c.jpg", (96, 96))], 1)
    ref = _write(root / "ref", [("r0.png", (80, 80)), ("sub/r1.jpg", (80, 80))], 2)
    return {"root": root, "weights": weights, "gen": gen, "ref": ref, "cache": root / "cache"}


def _run(capsys, args):
    rc = eval_fid.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _base(env, gen=None, ref=None):
    return ["--gen", gen or env["gen"], "--ref", ref or env["ref"], "--inception_weights", env["weights"],
            "--cache_dir", env["cache"], "--num_workers", "0", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def first_run(env):
    out_json = env["root"] / "results" / "run1.json"
    args = _base(env) + ["--metrics", ",".join(ALL), "--crop", "48", "--crops_per_image", "1",
                         "--out", out_json, "--name", "tiny"]
    import io
    import contextlib
    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        rc = eval_fid.main([str(a) for a in args])
    return rc, so.getvalue(), se.getvalue(), out_json


def test_all_metrics_json_table_and_values(env, first_run):
    rc, out, err, out_json = first_run
    assert rc == 0, err
    assert "| gen | ref | n_gen | n_ref | FID | KID | pFID | pKID | sFID | sKID |" in out
    assert "| tiny | ref | 3 | 2 |" in out
    res = json.loads(out_json.read_text())
    for m in ALL:
        assert np.isfinite(res["metrics"][m]), m
    assert res["metrics"]["fid"] > 0 and res["metrics"]["sfid"] > 0 and res["metrics"]["pfid"] > 0
    assert res["counts"]["gen"] == {"files": 3, "images": 3, "skipped": 0, "patches": 3}
    assert res["counts"]["ref"] == {"files": 2, "images": 2, "skipped": 0, "patches": 2}
    assert res["settings"]["patches"]["crop"] == 48 and res["settings"]["patches"]["crops_per_image"] == 1
    assert res["settings"]["kid"]["subset_size"] == 1000 and res["metrics"]["kid_subset_size"] == 2
    fe = res["feature_extractor"]
    assert fe["sha256"] == hashlib.sha256(env["weights"].read_bytes()).hexdigest()
    assert fe["name"] == "fid-inception-v3-tf-2015-12-05" and fe["weights_file"] == env["weights"].name
    assert any("subset size reduced" in w for w in res["warnings"])
    assert "subset size reduced" in err and "warning:" in err
    assert res["cache"]["hits"]["gen"] == {"pool3": False, "spatial": False, "patch_pool3": False}

    # the cached features are what the metrics were computed from; check against clean-fid's KID
    settings = F_.FeatureSettings(crop=48, crops_per_image=1, seed=0)
    feats = {}
    for name in ("gen", "ref"):
        folder = env[name]
        fp = F_.folder_fingerprint(folder, F_.list_image_files(folder))
        feats[name] = {k: np.load(env["cache"] / f"{F_.cache_key(fp, k, settings, fe['sha256'])}.npy")
                       for k in ("pool3", "spatial", "patch_pool3")}
    assert feats["gen"]["pool3"].shape == (3, 2048) and feats["gen"]["spatial"].shape == (3, 2023)
    assert feats["gen"]["patch_pool3"].shape == (3, 2048) and feats["ref"]["pool3"].shape == (2, 2048)
    for metric, kind in (("kid", "pool3"), ("skid", "spatial"), ("pkid", "patch_pool3")):
        g, r = feats["gen"][kind].astype(np.float64), feats["ref"][kind].astype(np.float64)
        # subsets of 2 drawn from the 3 generated images: replay our sampler's draws
        rng = np.random.default_rng(0)
        vals = []
        for _ in range(100):
            i1, i2 = rng.choice(len(g), 2, replace=False), rng.choice(len(r), 2, replace=False)
            np.random.seed(0)
            vals.append(cleanfid_fid.kernel_distance(g[i1], r[i2], num_subsets=1, max_subset_size=2))
        ref_val = float(np.mean(vals))
        assert abs(res["metrics"][metric] - ref_val) <= 1e-6 * abs(ref_val), metric
    for metric, kind in (("fid", "pool3"), ("sfid", "spatial"), ("pfid", "patch_pool3")):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            val = M.fid_from_features(feats["gen"][kind], feats["ref"][kind])
        assert abs(res["metrics"][metric] - val) <= 1e-9 * val


def test_script_entry_point_uses_cache(env, first_run):
    out_json = env["root"] / "results" / "run2.json"
    cmd = [sys.executable, "scripts/eval_fid.py"] + [str(a) for a in _base(env)] + [
        "--metrics", "all", "--crop", "48", "--crops_per_image", "1", "--out", str(out_json)]
    e = dict(os.environ)
    e.pop("PYTHONPATH", None)
    proc = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| gen | ref | 3 | 2 |" in proc.stdout
    res2 = json.loads(out_json.read_text())
    res1 = json.loads(first_run[3].read_text())
    assert all(all(v.values()) for v in res2["cache"]["hits"].values())
    for m in ALL:
        assert res2["metrics"][m] == res1["metrics"][m]


def test_missing_weights_is_a_clear_error(env, capsys, monkeypatch):
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS", raising=False)
    args = _base(env)
    args[args.index("--inception_weights") + 1] = env["root"] / "nowhere" / "pt_inception.pth"
    rc, out, err = _run(capsys, args + ["--metrics", "fid"])
    assert rc == 2
    assert "error: FID Inception weights not found" in err
    assert "pt_inception-2015-12-05-6726825d.pth" in err and "FID_INCEPTION_WEIGHTS" in err
    assert "Traceback" not in err


def test_bad_folders_are_clear_errors(env, capsys, tmp_path):
    rc, _, err = _run(capsys, _base(env, gen=tmp_path / "missing") + ["--metrics", "fid"])
    assert rc == 2 and "not a folder" in err
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("x")
    rc, _, err = _run(capsys, _base(env, gen=empty) + ["--metrics", "fid"])
    assert rc == 2 and "no images" in err
    # native-resolution crops larger than the images
    rc, _, err = _run(capsys, _base(env) + ["--metrics", "pfid", "--crop", "299"])
    assert rc == 2 and "smaller than the 299x299 crop" in err and "96x96" in err
    rc, _, err = _run(capsys, _base(env) + ["--metrics", "fid,xyz"])
    assert rc == 2 and "unknown metric" in err


def test_messy_folder_warns_and_skips(env, capsys, tmp_path):
    messy = _write(tmp_path / "messy", [("x0.png", (96, 96)), ("d/x1.jpg", (96, 80))], 3)
    (messy / "broken.png").write_bytes(b"\x89PNG not really an image")
    good = (messy / "x0.png").read_bytes()
    (messy / "d" / "truncated.png").write_bytes(good[: len(good) // 2])
    out_json = tmp_path / "messy.json"
    rc, out, err = _run(capsys, _base(env, gen=messy) + ["--metrics", "fid,kid", "--out", out_json])
    assert rc == 0, err
    assert "unreadable image file(s)" in err and "broken.png" in err and "truncated.png" in err
    assert "2 different sizes" in err
    assert "KID subset size reduced from 1000 to 2" in err
    assert "covariance is singular" in err
    res = json.loads(out_json.read_text())
    assert res["counts"]["gen"] == {"files": 4, "images": 2, "skipped": 2}
    assert sorted(s[0] for s in res["skipped_files"]["gen"]) == ["broken.png", "d/truncated.png"]
    assert res["image_sizes"]["gen"] == {"96x96": 2, "80x96": 1}
    assert res["cache"]["hits"]["ref"] == {"pool3": True}  # reference reused from the first run
    # --strict turns unreadable files into an error
    rc, _, err = _run(capsys, _base(env, gen=messy) + ["--metrics", "fid", "--strict", "--no_cache"])
    assert rc == 2 and "unreadable" in err and "Traceback" not in err


def test_single_image_folder(env, capsys, tmp_path):
    one = _write(tmp_path / "one", [("only.png", (96, 96))], 4)
    rc, _, err = _run(capsys, _base(env, gen=one) + ["--metrics", "fid"])
    assert rc == 2 and "at least 2 images" in err
