"""scripts/reproduce_table.py: table specs -> deduplicated, resumable sampling jobs -> metrics -> Markdown/CSV/JSON.

On the demo model at tiny sizes (3 DDIM steps, 4 images per row) with a stand-in for the Inception network
(per-image colour statistics: the metric code and its cache are the real ones, only the network is replaced)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO_ROOT, load_script
from ldm.evaluation import tables

rt = load_script("reproduce_table")

SPEC = {
    "name": "tiny",
    "title": "tiny table",
    "models": {"demo": {"config": "configs/demo/shapes32.yaml", "ckpt": "checkpoints/demo/shapes32.ckpt"}},
    "prompts": {"builtin": "shapes"},
    "images": 4,
    "seed": 5,
    "sampler": {"steps": 3, "eta": 1.0, "scale": 3.0, "batch_size": 2, "precision": "full"},
    "columns": [{"id": "fid_b", "metric": "fid", "reference": "base"},
                {"id": "multi", "metric": "multi_object_rate"}],
    "rows": [{"id": "direct", "method": "direct", "size": [64, 64]},
             {"id": "dilated", "method": "scalecrafter", "size": [64, 64],
              "options": ["--dilate", "2", "--dilate_tau", "2"]}],
}


class StandInInception:
    """Replaces the FID Inception (no weights here): 6-d colour statistics per image. Counts its calls."""

    name = "inception"
    kinds = ("pool3", "spatial", "patch_pool3")
    calls = []

    def __init__(self, **options):
        self.options = options

    def identity(self):
        return {"name": "stand-in", "sha256": "0" * 64}

    def settings(self):
        from ldm.evaluation.features import FeatureSettings
        return FeatureSettings()

    def compute(self, folder, relpaths, kinds):
        from ldm.evaluation.features import load_rgb
        StandInInception.calls.append((str(Path(folder).resolve()), tuple(kinds)))
        feats = []
        for r in relpaths:
            x = load_rgb(os.path.join(folder, r)).astype(np.float64) / 255.0
            feats.append(np.concatenate([x.mean(axis=(0, 1)), x.std(axis=(0, 1))]))
        return {k: np.asarray(feats, np.float32) for k in kinds}


@pytest.fixture(autouse=True)
def stand_in(monkeypatch):
    monkeypatch.setitem(tables.EXTRACTORS, "inception", StandInInception)
    StandInInception.calls = []
    monkeypatch.delenv(rt.STOP_AFTER_ENV, raising=False)
    yield


def write_spec(path, **changes):
    spec = json.loads(json.dumps(SPEC))
    for k, v in changes.items():
        spec[k] = v
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run(spec, out, cache, *extra):
    return rt.main([str(spec), "--out", str(out), "--cache_dir", str(cache), "--threads", "1", "--kid_subsets", "10",
                    *extra])


def read_table(out):
    with open(out / "table.csv") as fh:
        rows = list(csv.DictReader(fh))
    return {r["row"]: r for r in rows}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted run: the table every other run of the same spec must reproduce."""
    import pytest as _pytest
    mp = _pytest.MonkeyPatch()
    mp.setitem(tables.EXTRACTORS, "inception", StandInInception)
    StandInInception.calls = []
    d = tmp_path_factory.mktemp("reference")
    spec = write_spec(d / "tiny.yaml")
    rc = run(spec, d / "out", d / "cache")
    calls = list(StandInInception.calls)
    mp.undo()
    assert rc == 0
    return {"dir": d, "spec": spec, "out": d / "out", "calls": calls,
            "json": json.loads((d / "out" / "table.json").read_text())}


def test_two_rows_two_columns_end_to_end(reference_run):
    out, doc = reference_run["out"], reference_run["json"]
    table = read_table(out)
    assert set(table) == {"direct", "dilated"}
    for row in table.values():
        assert row["n"] == "4"
        assert float(row["fid_b"]) >= 0.0 and 0.0 <= float(row["multi"]) <= 1.0
        assert float(row["seconds_per_image"]) > 0 and float(row["peak_memory_gib"]) > 0
    # the two rows sample different images (ScaleCrafter's dilation changes them), from the same seeds
    assert table["direct"]["fid_b"] != table["dilated"]["fid_b"]
    md = (out / "table.md").read_text()
    assert "| direct | direct | 64x64 | 4 |" in md and "s / image" in md and "seed `ldm.pipelines.sweep.derive_seed(5" in md
    # three jobs: the two rows and one base-resolution (32x32) reference shared by both
    roles = sorted(j["role"] for j in doc["jobs"])
    assert roles == ["base", "row", "row"]
    base = next(j for j in doc["jobs"] if j["role"] == "base")
    assert "--H 32 --W 32" in base["command"] and "--method direct" in base["command"]
    for j in doc["jobs"]:
        manifest = Path(j["command"].split("--outdir ")[1]) / "manifest.jsonl"
        assert len(manifest.read_text().splitlines()) == 4
    assert doc["cells"]["tiny"]["direct"]["multi"]["n"] == 4


def test_shared_reference_is_computed_once(reference_run, tmp_path):
    calls = reference_run["calls"]
    folders = [c[0] for c in calls]
    base = [f for f in folders if "-base-" in f]
    assert len(base) == 1, calls  # two rows use the base samples: one extraction
    assert len(folders) == 3 and len(set(folders)) == 3
    # a second evaluation of the same folders reads the feature cache: no extraction at all
    StandInInception.calls = []
    d = reference_run["dir"]
    before = read_table(reference_run["out"])
    assert run(reference_run["spec"], reference_run["out"], d / "cache", "--evaluate-only") == 0
    assert StandInInception.calls == []
    assert read_table(reference_run["out"]) == before


def _png_state(job_dir):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted((job_dir / "samples").glob("*.png"))}


def test_interrupted_run_resumes_without_redoing_finished_jobs(reference_run, tmp_path, monkeypatch):
    spec = write_spec(tmp_path / "tiny.yaml")
    out = tmp_path / "out"
    monkeypatch.setenv(rt.STOP_AFTER_ENV, "1")
    assert run(spec, out, tmp_path / "cache") == 130
    monkeypatch.delenv(rt.STOP_AFTER_ENV)
    done = [d for d in (out / "jobs").iterdir() if (d / tables.COMPLETE_FILE).is_file()]
    assert len(done) == 1 and not (out / "table.csv").exists()
    before = _png_state(done[0])
    assert len(before) == 4
    assert run(spec, out, tmp_path / "cache") == 0
    assert _png_state(done[0]) == before  # not rendered again
    doc = json.loads((out / "table.json").read_text())
    ran = {j["id"]: j["run_now"] for j in doc["jobs"]}
    assert ran[done[0].name] is False and sum(ran.values()) == 2
    assert len(tables.read_runs(next(j for j in tables.plan(
        tables.select(tables.load_spec(spec)), out).jobs if j.id == done[0].name))) == 1
    # the same table as the uninterrupted run (same images: per-image seeds, same batches)
    ref = read_table(reference_run["out"])
    got = read_table(out)
    for row in ("direct", "dilated"):
        assert got[row]["fid_b"] == ref[row]["fid_b"] and got[row]["multi"] == ref[row]["multi"]


def test_killed_process_resumes_with_the_same_table(reference_run, tmp_path):
    """A real kill: the whole process is SIGKILLed after the 3rd image of its first job (ldm/pipelines/sweep.py's hook);
    the re-run renders the missing images only and gives the uninterrupted run's table."""
    spec = write_spec(tmp_path / "tiny.yaml", columns=[{"id": "multi", "metric": "multi_object_rate"},
                                                       {"id": "fd_b", "metric": "shape_fd", "reference": "base"}])
    out = tmp_path / "out"
    env = dict(os.environ, SCALECRAFTER_SWEEP_KILL_AFTER="3", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "reproduce_table.py"), str(spec), "--out",
                           str(out), "--cache_dir", str(tmp_path / "cache"), "--threads", "1"], env=env,
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = [d for d in (out / "jobs").iterdir() if (d / "samples").is_dir()]
    assert len(partial) == 1 and not (partial[0] / tables.COMPLETE_FILE).exists()
    assert len(list((partial[0] / "samples").glob("*.png"))) == 3
    kept = _png_state(partial[0])
    assert run(spec, out, tmp_path / "cache") == 0
    after = _png_state(partial[0])
    assert len(after) == 4
    # the first batch (2 images) was complete before the kill and is kept; the half-written second batch is
    # rendered whole again
    assert [after[n] == kept[n] for n in sorted(kept)][:2] == [True, True]
    ref = read_table(reference_run["out"])
    got = read_table(out)
    for row in ("direct", "dilated"):
        assert got[row]["multi"] == ref[row]["multi"]


def test_parallel_jobs_in_subprocesses_give_the_same_table(reference_run, tmp_path):
    """--parallel 2: two sampling jobs at a time, each in its own process (records per process)."""
    spec = write_spec(tmp_path / "tiny.yaml")
    out = tmp_path / "out"
    assert run(spec, out, tmp_path / "cache", "--parallel", "2") == 0
    ref, got = read_table(reference_run["out"]), read_table(out)
    for row in ("direct", "dilated"):
        assert got[row]["fid_b"] == ref[row]["fid_b"] and got[row]["multi"] == ref[row]["multi"]
    doc = json.loads((out / "table.json").read_text())
    assert all(j["run_now"] and j["stats"]["runs"] == 1 and j["stats"]["peak_memory_kind"] == "rss_hwm"
               for j in doc["jobs"])


# ------------------------------------------------------------------------------------------------------
# spec errors: each names the row or column
# ------------------------------------------------------------------------------------------------------
def _error(tmp_path, capsys, **changes):
    spec = write_spec(tmp_path / "bad.yaml", **changes)
    rc = run(spec, tmp_path / "out", tmp_path / "cache", "--dry-run")
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not (tmp_path / "out" / "jobs").exists()
    return err


def _rows(**second):
    return [SPEC["rows"][0], {**SPEC["rows"][1], **second}]


def test_unknown_method_names_the_row(tmp_path, capsys):
    err = _error(tmp_path, capsys, rows=_rows(method="scalecraftr"))
    assert "row 'dilated'" in err and "unknown method 'scalecraftr'" in err and "direct" in err


def test_unknown_preset_names_the_row(tmp_path, capsys):
    err = _error(tmp_path, capsys, rows=_rows(options=[], preset="configs/scalecrafter/demo_96x96.yaml"))
    assert "row 'dilated'" in err and "demo_96x96.yaml" in err


def test_unknown_metric_names_the_column(tmp_path, capsys):
    err = _error(tmp_path, capsys, columns=[SPEC["columns"][0], {"id": "sharp", "metric": "sharpness"}])
    assert "column 'sharp'" in err and "unknown metric 'sharpness'" in err


@pytest.mark.parametrize("key,value", [("seed", 6), ("steps", 4), ("scale", 7.5)])
def test_row_with_other_sampler_settings_names_the_row(tmp_path, capsys, key, value):
    err = _error(tmp_path, capsys, rows=_rows(**{key: value}))
    assert "row 'dilated'" in err and key in err and "differs from the table's" in err
    # the same value as the table's is allowed
    same = SPEC["seed"] if key == "seed" else SPEC["sampler"][key]
    spec = write_spec(tmp_path / "ok.yaml", rows=_rows(**{key: same}))
    assert run(spec, tmp_path / "out2", tmp_path / "cache", "--dry-run") == 0


def test_row_options_that_set_table_settings_are_refused(tmp_path, capsys):
    err = _error(tmp_path, capsys, rows=_rows(options=["--steps", "10"]))
    assert "row 'dilated'" in err and "--steps" in err
    err = _error(tmp_path, capsys, rows=_rows(options=["--no_such_flag"]))
    assert "row 'dilated'" in err and "--no_such_flag" in err


def test_preset_made_for_another_step_count_names_the_row(tmp_path, capsys):
    err = _error(tmp_path, capsys, rows=_rows(options=[], preset="configs/scalecrafter/demo_64x64.yaml"))
    assert "row 'dilated'" in err and "steps 25" in err


# ------------------------------------------------------------------------------------------------------
# dry run, SLURM, the committed specs
# ------------------------------------------------------------------------------------------------------
def test_dry_run_lists_jobs_and_estimate(tmp_path, capsys):
    timing = {"entries": [{"match": {"method": "direct", "size": [64, 64]}, "seconds_per_image": 2.0,
                           "device": "test CPU", "source": "made up for the test"}]}
    spec = write_spec(tmp_path / "tiny.yaml", timing=timing)
    assert run(spec, tmp_path / "out", tmp_path / "cache", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "3 sampling job(s) (1 base-resolution" in out
    assert "images: 12 in all, 12 still to sample" in out
    assert "made up for the test" in out and "extrapolated" in out
    # 4 images x 2 s (direct 64²) + 4 x 2 s (dilated, from direct's figure) + 4 x 0.5 s (32², by pixel count)
    assert "estimate: 0.01 hours (18 s) on test CPU" in out
    assert not (tmp_path / "out").exists()


def test_cpu_run_sets_parallel_and_threads_unless_given(tmp_path, capsys, monkeypatch):
    """A spec's cpu_run gives --parallel/--threads on a CPU when the command line gives neither."""
    timing = {"entries": [{"match": {"method": "direct", "size": [64, 64]}, "seconds_per_image": 2.0,
                           "device": "test CPU", "source": "made up for the test"}]}
    spec = write_spec(tmp_path / "tiny.yaml", timing=timing, cpu_run={"parallel": 2, "threads": 1})
    threads = torch.get_num_threads()
    try:
        assert rt.main([str(spec), "--out", str(tmp_path / "out"), "--dry-run", "--device", "cpu"]) == 0
        out = capsys.readouterr().out
        assert "--parallel 2 --threads 1 from the spec's cpu_run" in out
        assert "with --parallel 2: about" in out
        assert rt.main([str(spec), "--out", str(tmp_path / "out"), "--dry-run", "--device", "cpu",
                        "--parallel", "3"]) == 0  # the command line wins
        out = capsys.readouterr().out
        assert "from the spec's cpu_run" not in out and "with --parallel 3: about" in out
    finally:
        torch.set_num_threads(threads)
    bad = write_spec(tmp_path / "bad.yaml", cpu_run={"parallel": 0})
    assert rt.main([str(bad), "--dry-run"]) != 0
    assert "cpu_run.parallel: a positive integer is required" in capsys.readouterr().err


def test_rows_sampling_the_same_share_a_job(tmp_path):
    """A row at the training size samples what the base reference samples: one job for both; two rows with the
    same method, size and options are one job too."""
    rows = SPEC["rows"] + [{"id": "native", "method": "direct", "size": [32, 32]},
                           {"id": "direct_again", "name": "the same as 'direct'", "method": "direct", "size": [64, 64]}]
    spec = tables.load_spec(write_spec(tmp_path / "tiny.yaml", rows=rows))
    tables.check_spec(spec, rt.methods_names(), rt.option_check)
    p = tables.plan(tables.select(spec), tmp_path / "out")
    assert len(p.jobs) == 3
    assert p.row_job["native"] is p.base_job[("tiny", "demo")] and p.base_job[("tiny", "demo")].role == "base"
    assert p.row_job["direct_again"] is p.row_job["direct"]
    assert sorted(p.row_job["direct"].rows) == ["direct", "direct_again"]


def test_slurm_writes_array_scripts(tmp_path):
    spec = write_spec(tmp_path / "tiny.yaml")
    d = tmp_path / "slurm"
    assert run(spec, tmp_path / "out", tmp_path / "cache", "--slurm", str(d), "--rows", "dilated") == 0
    jobs = (d / "jobs.txt").read_text().split()
    assert len(jobs) == 2  # the row and its base reference
    sample = (d / "sample.sbatch").read_text()
    assert "#SBATCH --array=0-1" in sample and "--run-job" in sample
    assert "--evaluate-only" in (d / "evaluate.sbatch").read_text()
    assert "--dependency=afterok" in (d / "submit.sh").read_text()
    for f in ("sample.sbatch", "evaluate.sbatch", "submit.sh"):
        subprocess.run(["bash", "-n", str(d / f)], check=True)
    info = json.loads(Path(jobs[0]).read_text())
    assert info["argv"][0] == "--sweep" and "--outdir" in info["argv"]
    assert not any((Path(j).parent / "samples").exists() for j in jobs)  # nothing sampled


@pytest.mark.parametrize("spec", sorted((REPO_ROOT / "configs" / "tables").glob("*.yaml")), ids=lambda p: p.stem)
def test_committed_specs_plan(spec, tmp_path, capsys):
    assert run(spec, tmp_path / "out", tmp_path / "cache", "--dry-run") == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "sampling job(s)" in out and "images:" in out
