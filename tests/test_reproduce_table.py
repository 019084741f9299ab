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


def test_preset_made_for_another_step_count_is_placed_by_trajectory_fraction(tmp_path, capsys):
    """A preset's schedules count its own steps; at the table's step count txt2img places them by trajectory
    fraction (ldm.guidance.TrajectoryClock), so the table runs the row and the dry run says so, naming it."""
    spec = write_spec(tmp_path / "tiny.yaml", rows=_rows(options=[], preset="configs/scalecrafter/demo_64x64.yaml"))
    assert run(spec, tmp_path / "out", tmp_path / "cache", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "row 'dilated'" in out and "made for 25 steps, the table samples 3" in out and "trajectory fraction" in out


def test_preset_for_another_model_family_names_the_row_at_load(tmp_path, capsys):
    """A preset's base_model must be the row's model's family: the dry run says so, naming the row, before any job
    (the SD 2.1 preset on the demo model)."""
    rows = _rows(options=[], preset="configs/scalecrafter/sd2.1_1024x1024.yaml")
    del rows[1]["size"]
    err = _error(tmp_path, capsys, rows=rows)
    assert "row 'dilated'" in err and "is a preset for sd2" in err and "is a demo model" in err


def _two_sampler_spec(tmp_path, second, rows2=None):
    """The tiny spec as two tables: ``ddim`` (the spec's DDIM sampler) and ``other`` (its own ``sampler:``)."""
    t = {"rows": [{"id": "direct", "method": "direct", "size": [64, 64]}]}
    return write_spec(tmp_path / "two.yaml", rows=None, tables=[
        {"id": "ddim", **t}, {"id": "other", "sampler": second, "rows": rows2 or t["rows"]}])


def _job_argv(plan, qid):
    argv = plan.row_job[qid].argv
    return {k: argv[argv.index(k) + 1] for k in ("--steps", "--sampler", "--ddim_eta", "--eta") if k in argv}


def test_tables_with_their_own_sampler(tmp_path, capsys):
    """A table's ``sampler:`` keys go over the spec's: its rows and its base reference sample with them (their own
    jobs), the other tables keep the spec's; the row check and the eta rule use the table's settings."""
    spec_path = _two_sampler_spec(tmp_path, {"name": "euler_a", "steps": 4})
    raw = yaml.safe_load(spec_path.read_text())
    del raw["rows"]
    spec_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    spec = tables.load_spec(spec_path)
    ddim, other = spec.tables
    assert ddim.sampler == spec.sampler and "name" not in ddim.sampler
    assert other.sampler == {**spec.sampler, "name": "euler_a", "steps": 4}  # eta 1.0, scale 3.0 inherited
    p = tables.plan(spec, tmp_path / "out")
    assert _job_argv(p, "ddim/direct") == {"--steps": "3", "--ddim_eta": "1.0"}
    assert _job_argv(p, "other/direct") == {"--steps": "4", "--sampler": "euler_a", "--eta": "1.0"}
    assert p.base_job[("ddim", "demo")] is not p.base_job[("other", "demo")]
    assert "--sampler" in p.base_job[("other", "demo")].argv
    assert len(p.jobs) == 4  # two rows, two base references: nothing shared across samplers
    assert spec.samplers_differ() and "euler_a 4 steps" in spec.describe_sampler(other)
    # a row of the other table may repeat the table's steps, not the spec's
    for steps, ok in ((4, True), (3, False)):
        path = _two_sampler_spec(tmp_path, {"name": "euler_a", "steps": 4},
                                 [{"id": "direct", "method": "direct", "size": [64, 64], "steps": steps}])
        raw = yaml.safe_load(path.read_text())
        del raw["rows"]
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        if ok:
            tables.load_spec(path)
        else:
            with pytest.raises(tables.SpecError, match="row 'direct': steps 3 differs from the table's 4"):
                tables.load_spec(path)
    # the spec's eta 1.0 reaches a noiseless sampler unless the table sets eta 0
    for second, needle in (({"name": "heun", "steps": 4}, "draws no noise"), ({"name": "heun", "eta": "x"}, "eta")):
        path = _two_sampler_spec(tmp_path, second)
        raw = yaml.safe_load(path.read_text())
        del raw["rows"]
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        with pytest.raises(tables.SpecError, match=f"table 'other': sampler.*{needle}"):
            tables.load_spec(path)


def test_table_sampler_end_to_end(tmp_path):
    """Two tables, DDIM and Euler a, through the runner: each image's PNG metadata names its table's sampler and
    step count, and the rendered table states each table's sampler."""
    from PIL import Image
    path = _two_sampler_spec(tmp_path, {"name": "euler_a", "steps": 4})
    raw = yaml.safe_load(path.read_text())
    del raw["rows"]
    raw["images"] = 2
    raw["columns"] = [{"id": "multi", "metric": "multi_object_rate"}]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert run(path, tmp_path / "out", tmp_path / "cache") == 0
    rows = read_table(tmp_path / "out")
    assert set(rows) == {"ddim/direct", "other/direct"}
    for qid, rec in rows.items():
        name, label, steps = {"ddim/direct": ("ddim", "DDIM", 3), "other/direct": ("euler_a", "Euler a", 4)}[qid]
        assert (rec["sampler"], int(rec["steps"])) == (name, steps)
        pngs = sorted((tmp_path / "out" / "jobs" / rec["job"] / "samples").glob("*.png"))
        assert len(pngs) == 2
        for png in pngs:
            meta = json.loads(Image.open(png).text["parameters"])
            assert (meta["sampler"], meta["steps"]) == (label, steps)
    md = (tmp_path / "out" / "table.md").read_text()
    assert "Sampler**: per table" in md and "Sampler: euler_a 4 steps" in md and "Sampler: ddim 3 steps" in md


# ------------------------------------------------------------------------------------------------------
# dry run, SLURM, the committed specs
# ------------------------------------------------------------------------------------------------------
def test_dry_run_lists_jobs_and_estimate(tmp_path, capsys):
    timing = {"entries": [{"match": {"method": "direct", "size": [64, 64]}, "seconds_per_image": 2.0,
                           "basis": "measured", "device": "test CPU", "source": "made up for the test"}]}
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
                           "basis": "measured", "device": "test CPU", "source": "made up for the test"}]}
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


# ------------------------------------------------------------------------------------------------------
# published values beside ours, rank agreement, sourced estimates, the paper specs' protocols
# ------------------------------------------------------------------------------------------------------
PAPER_SPECS = ["freescale_table1", "freescale_table2", "scalecrafter_rebuttal", "scalecrafter_sd15",
               "scalecrafter_sd21", "scalecrafter_sdxl"]


def checked(name, with_optional=False, tmp=None):
    spec = tables.load_spec(REPO_ROOT / "configs" / "tables" / f"{name}.yaml")
    sel = tables.select(spec, include_optional=with_optional)
    tables.check_spec(spec, rt.methods_names(), rt.option_check, sel.rows(), rt.preset_flags())
    sel = tables.select(spec, include_optional=with_optional)
    return spec, tables.plan(sel, tmp or (REPO_ROOT / "outputs" / "tables" / "_never_written"))


def test_kendall_tau_b_known_values():
    assert tables.kendall_tau_b([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert tables.kendall_tau_b([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert tables.kendall_tau_b([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert tables.kendall_tau_b([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 6 ** 0.5)  # scipy: 0.8165
    assert tables.kendall_tau_b([1, 1], [1, 2]) is None
    assert tables.rank_order(["a", "b", "c"], [2.0, 1.0, 2.0]) == [["b"], ["a", "c"]]
    assert tables.rank_order(["a", "b"], [2.0, 1.0], lower_is_better=False) == [["a"], ["b"]]


def _published_spec(tmp_path, **changes):
    spec = json.loads(json.dumps(SPEC))
    spec["sources"] = {"paper": {"cite": "A. Author, Paper, Table 9", "read_from": "https://example.org/t9",
                                 "device": "GPU-X"}}
    spec["published"] = {"source": "paper"}
    spec["columns"] = [{"id": "fid_b", "metric": "fid", "reference": "base"},
                       {"id": "area", "metric": "object_area"}, {"id": "multi", "metric": "multi_object_rate"}]
    spec["rows"] = [{"id": "a", "method": "direct", "size": [64, 64],
                     "published": {"fid_b": "10", "area": "0.30", "multi": "0.5", "seconds_per_image": "2"}},
                    {"id": "b", "method": "direct", "size": [32, 64],
                     "published": {"fid_b": "20", "area": "n/a", "minutes_per_image": "0.5", "note": "b's note"}},
                    {"id": "c", "method": "direct", "size": [64, 32], "published": {"fid_b": "30", "area": "0.10"}},
                    {"id": "d", "method": "direct", "size": [96, 96], "published": {"absent": "our extra row"}}]
    spec.update(changes)
    return write_spec_dict(tmp_path / "pub.yaml", spec)


def write_spec_dict(path, spec):
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_published_beside_reproduced_and_rank_agreement(tmp_path):
    """A synthetic result against hand-written published values: each cell 'ours / published (×ratio)', n/a and
    absent rows, the rank order per column and Kendall's τ_b."""
    spec = tables.load_spec(_published_spec(tmp_path))
    tables.check_spec(spec, rt.methods_names(), rt.option_check)
    p = tables.plan(tables.select(spec), tmp_path / "out")
    ours = {"a": (12.0, 0.25), "b": (25.0, 0.5), "c": (22.0, 0.2), "d": (5.0, 0.9)}
    results = {"cells": {"tiny": {r: {"fid_b": {"value": v[0]}, "area": {"value": v[1]},
                                      "multi": {"value": 0.25, "k": 1, "n": 4, "ci95": [0.05, 0.7]}}
                                  for r, v in ours.items()}}, "warnings": []}
    md = tables.render_markdown(p, results, {})
    assert "**Published beside reproduced**: A. Author, Paper, Table 9 (read from https://example.org/t9)" in md
    assert "| row | FID vs base | object area / image | more than one object | s / image |" in md
    assert "| a | 12.00 / 10 (×1.20) | 0.250 / 0.30 (×0.83) | 25.0 % [5, 70] / 0.5 (×0.50) | – / 2 s |" in md
    assert "| b | 25.00 / 20 (×1.25) | 0.500 / n/a | 25.0 % [5, 70] / – | – / 0.5 min |" in md
    assert "| c | 22.00 / 30 (×0.73) | 0.200 / 0.10 (×2.00) | 25.0 % [5, 70] / – | – / – |" in md
    assert ("| d | 5.00 / not in the paper | 0.900 / not in the paper | 25.0 % [5, 70] / not in the paper | – / not "
            "in the paper |") in md
    assert "- **d**: our extra row" in md and "- **b**: b's note" in md
    # FID (lower is better), best first: published a, b, c; ours a, c, b: one discordant pair of three
    assert ("- **FID vs base**: published a, b, c; ours a, c, b; Kendall τ_b = 0.33 over 3 rows; best row the "
            "same.") in md
    # area (higher is better): published a, c (b is n/a); ours a, c
    assert "- **object area / image**: published a, c; ours a, c; Kendall τ_b = 1.00 over 2 rows; best row the same." \
        in md
    recs = {r["row"]: r for r in tables.table_rows(p, results)}
    assert recs["a"]["fid_b_published"] == 10.0 and recs["a"]["fid_b_ratio_to_published"] == pytest.approx(1.2)
    assert recs["b"]["area_published"] == "n/a" and recs["b"]["seconds_per_image_published"] == 30.0
    assert recs["d"]["published_absent"] == "our extra row"
    # the paper's own time is the dry run's estimate (30 s from 0.5 min), labelled as published
    est = {e["job"].rows[0]: e for e in tables.estimate(p) if e["job"].rows}
    assert est["b"]["seconds_per_image"] == 30.0 and est["b"]["basis"] == "published"
    assert "A. Author, Paper, Table 9: b, 0.5 min per image" in est["b"]["source"] and est["b"]["device"] == "GPU-X"


def test_published_values_are_checked(tmp_path, capsys):
    rows = json.loads(json.dumps(SPEC["rows"]))
    err = _error(tmp_path, capsys, sources={"p": {"cite": "x", "read_from": "y"}}, published={"source": "p"},
                 rows=rows)
    assert "row 'direct'" in err and "published" in err  # a paper table's row must say what was published
    rows[0]["published"] = {"fid_b": "1.0", "multi": "0.5"}
    rows[1]["published"] = {"fid_c": "1.0"}
    err = _error(tmp_path, capsys, sources={"p": {"cite": "x", "read_from": "y"}}, published={"source": "p"},
                 rows=rows)
    assert "row 'dilated'" in err and "fid_c" in err
    err = _error(tmp_path, capsys, published={"not_found": "searched everywhere"},
                 rows=[{**SPEC["rows"][0], "published": {"fid_b": 1.0}}, SPEC["rows"][1]])
    assert "row 'direct'" in err and "without a source" in err
    err = _error(tmp_path, capsys, published={"source": "nowhere"})
    assert "unknown source 'nowhere'" in err


def test_timing_entries_must_say_what_they_are(tmp_path, capsys):
    entry = {"match": {"method": "direct"}, "seconds_per_image": 1.0, "source": "s"}
    err = _error(tmp_path, capsys, timing={"entries": [entry]})
    assert "basis" in err
    err = _error(tmp_path, capsys, timing={"entries": [{"match": {"method": "direct"}, "seconds_per_image": 1.0,
                                                         "basis": "published"}]})
    assert "source" in err


def test_ratio_to_direct_estimate(tmp_path):
    timing = {"exponent": 1.0, "entries": [
        {"match": {"method": "direct", "size": [64, 64]}, "seconds_per_image": 2.0, "basis": "measured", "source": "d"},
        {"match": {"method": "scalecrafter"}, "ratio_to_direct": 1.5, "source": "r"}]}
    spec = tables.load_spec(write_spec(tmp_path / "tiny.yaml", timing=timing,
                                       rows=SPEC["rows"] + [{"id": "big", "method": "scalecrafter", "size": [128, 64],
                                                            "options": ["--dilate", "2", "--dilate_tau", "2"]}]))
    tables.check_spec(spec, rt.methods_names(), rt.option_check)
    est = {e["job"].rows[0] if e["job"].rows else "base": e for e in tables.estimate(tables.plan(tables.select(spec),
                                                                                                 tmp_path / "o"))}
    assert est["dilated"]["seconds_per_image"] == pytest.approx(3.0) and est["dilated"]["basis"] == "ratio"
    # no direct row at 128x64: direct is extrapolated (x2 pixels, exponent 1), then x1.5
    assert est["big"]["seconds_per_image"] == pytest.approx(6.0)
    assert est["base"]["basis"] == "extrapolated"


def test_optional_rows_are_planned_only_when_asked(tmp_path):
    rows = SPEC["rows"] + [{"id": "variant", "method": "direct", "size": [96, 96], "optional": True}]
    spec = tables.load_spec(write_spec(tmp_path / "tiny.yaml", rows=rows))
    assert [r.id for r in tables.select(spec).rows()] == ["direct", "dilated"]
    assert [r.id for r in tables.select(spec, include_optional=True).rows()] == ["direct", "dilated", "variant"]
    assert [r.id for r in tables.select(spec, rows=["variant"]).rows()] == ["variant"]
    assert [r.id for r in tables.select(spec, rows=["*"]).rows()] == ["direct", "dilated"]
    assert [r.id for r in tables.select(spec, rows=["var*"], include_optional=True).rows()] == ["variant"]
    with pytest.raises(tables.SpecError, match="only optional rows"):
        tables.select(spec, rows=["var*"])


@pytest.mark.parametrize("name", PAPER_SPECS)
def test_paper_specs_are_sourced(name):
    """Every table of a paper spec either records the published values (every row says what it is) or says they
    were not found; every job of the dry run has an estimate with its basis and source."""
    spec, p = checked(name, with_optional=True)
    for t in spec.tables:
        assert t.published, (name, t.id)
        if t.published.get("source"):
            src = spec.sources[t.published["source"]]
            assert src["cite"] and src["read_from"]
            assert all(r.published for r in t.rows), (name, t.id)
        else:
            assert len(t.published["not_found"]) > 20
    for e in tables.estimate(p):
        assert e["seconds_per_image"] and e["basis"] in tables.BASIS_LABELS, (name, e["job"].id, e["source"])
        assert e["source"] and not e["source"].startswith("no estimate")


def _hours(p, **match):
    return sum(e["hours"] for e in tables.estimate(p)
               if all(getattr(e["job"], k) == v for k, v in match.items()))


def test_freescale_estimates_are_the_papers_minutes():
    """Table 1's ten times (minutes per image, the paper), 1024 images each: 45.598 min x 1024 / 60 hours."""
    minutes = [0.648, 0.653, 1.441, 1.224, 0.853, 5.456, 9.255, 11.382, 8.446, 6.240]
    _, p = checked("freescale_table1")
    est = tables.estimate(p)
    assert all(e["basis"] == "published" for e in est)
    assert sum(e["hours"] for e in est) == pytest.approx(sum(minutes) * 1024 / 60)
    fs = next(e for e in est if e["job"].rows == ["2048x2048/freescale"])
    assert fs["seconds_per_image"] == pytest.approx(0.853 * 60)
    _, p2 = checked("freescale_table2")
    assert sum(e["hours"] for e in tables.estimate(p2)) == pytest.approx(
        (0.614 + 0.861 + 0.840 + 0.853 + 4.566 + 6.245 + 6.113 + 6.240) * 1024 / 60)


def test_freescale_rows_run_as_released_and_table2_shares_the_full_job():
    for name in ("freescale_table1", "freescale_table2"):
        spec, p = checked(name)
        fs_rows = [r for r in spec.rows() if r.method == "freescale"]
        assert fs_rows and all(r.options == ["--freeu"] for r in fs_rows)
        from ldm.methods.freescale.presets import load_preset
        assert all(load_preset(REPO_ROOT / r.preset)["vae_tiling"] == "release" for r in fs_rows)
    _, p1 = checked("freescale_table1")
    _, p2 = checked("freescale_table2")
    for size in ("2048x2048", "4096x4096"):
        assert p1.row_job[f"{size}/freescale"].id == p2.row_job[f"{size}/full"].id
    t2 = tables.load_spec(REPO_ROOT / "configs/tables/freescale_table2.yaml")
    assert [r.name for r in t2.tables[0].rows] == ["w/o Scale Fusion", "Dilated Up-Blocks", "Latent Space Upsampling",
                                                    "Ours"]


@pytest.mark.parametrize("name", ["scalecrafter_sd15", "scalecrafter_sd21", "scalecrafter_sdxl"])
def test_scalecrafter_8x_16x_rows_use_ndcfg_and_dispersion(name):
    """The rebuttal: above 1280x1280 (6.25x the training area) the settings add noise-damped guidance and the
    dispersed convolution; the release presets without them are optional rows."""
    from ldm.methods.scalecrafter.presets import load_preset
    spec, _ = checked(name, with_optional=True)
    base = 512 if "sdxl" not in name else 1024
    for r in spec.rows():
        if r.method != "scalecrafter" or r.table.startswith("table2"):
            continue
        pre = load_preset(REPO_ROOT / r.preset)
        big = r.H * r.W > 6.25 * base * base
        full = bool(pre.get("disperse_settings")) and int(pre.get("disperse_tau", 0)) > 0 \
            and int(pre.get("ndcfg_tau", 0)) > 0
        assert full == (big and not r.optional), (name, r.qid, r.preset)
        if r.optional:
            assert big and r.id == "scalecrafter_release"


def test_sd21_sdsr_is_its_own_table_and_its_time_does_not_scale():
    spec, p = checked("scalecrafter_sd21", with_optional=True)
    for t in spec.tables:
        sdsr = [r for r in t.rows if r.method == "sdsr"]
        if not t.id.startswith("table2"):
            assert not sdsr, t.id
        else:
            assert sdsr and not any(c.reference == "base" for c in t.columns)
            assert sdsr[0].optional == (t.id != "table2_1024x1024")
    sdsr_jobs = [e for e in tables.estimate(p) if e["job"].method == "sdsr"]
    assert len(sdsr_jobs) == 4 and {e["seconds_per_image"] for e in sdsr_jobs} == {9.5}


def test_paper_spec_totals():
    """The dry-run totals from the sourced per-row times (hours on each device), checked by hand:
    SD 2.1: base 1.5 s, direct 4.55 s at 1024² scaled by (pixels)^1.28, Attn-SF 1.10x, ScaleCrafter 5.6 s / 1.23x
    / 1.52x direct, SD+SR 9.5 s."""
    d = {1024 * 1024: 4.55}
    for h, w in ((1280, 1280), (1024, 2048), (2048, 2048)):
        d[h * w] = 4.55 * (h * w / 1024 ** 2) ** 1.28
    sd21 = (30000 * (1.5 + 4.55 + 4.55 * 1.10 + 5.6 + 9.5)
            + 10000 * (3 * 1.5 + sum(d[k] * (1 + 1.10) for k in list(d)[1:])
                       + d[1280 * 1280] * 1.23 + (d[1024 * 2048] + d[2048 * 2048]) * 1.52)) / 3600
    _, p = checked("scalecrafter_sd21")
    assert sum(e["hours"] for e in tables.estimate(p)) == pytest.approx(sd21, rel=1e-3)
    # SDXL (A800 hours): FreeScale Table 1's SDXL-DI and ScaleCrafter times at 2048² and 4096², direct sampling
    # at 2560² and 4096x2048 by (pixels)^1.54 from 2048², Attn-SF 1.01x, ScaleCrafter 1.01x (2560²), 1.80x
    # (4096x2048) and 590.3 s (4096², with dispersion); the 1024² references 6.5 s on the A100
    d2560, d4096x2048 = 38.9 * (2560 ** 2 / 2048 ** 2) ** 1.54, 38.9 * 2 ** 1.54
    a800 = (30000 * (38.9 * 2.01 + 39.2) + 10000 * (d2560 * (1 + 1.01 + 1.01) + d4096x2048 * (1 + 1.01 + 1.80)
                                                    + 327.4 * 2.01 + 590.3)) / 3600
    _, p = checked("scalecrafter_sdxl")
    by_device = {}
    for e in tables.estimate(p):
        by_device[e["device"]] = by_device.get(e["device"], 0.0) + e["hours"]
    assert by_device == pytest.approx({"A800": a800, "A100 40G, 16-bit": 6.5 * 60000 / 3600}, rel=1e-3)
    _, p = checked("scalecrafter_rebuttal")
    assert sum(e["hours"] for e in tables.estimate(p)) == pytest.approx(30000 * (6.5 + 9.5 + 5.6) / 3600)


def test_demo_table_keeps_its_rows():
    spec = tables.load_spec(REPO_ROOT / "configs/tables/demo.yaml")
    assert [r.id for r in spec.rows()] == [
        "32_direct", "64_direct", "64_sc", "64_sc_ndcfg", "64_sc_disperse", "64_sc_freeu", "64_freescale",
        "64_attn_scale", "64_multidiffusion", "64_demofusion", "64_fouriscale", "64_hidiffusion", "128_direct",
        "128_sc", "128_sc_ndcfg", "128_sc_disperse", "128_sc_freeu", "128_freescale", "128_multidiffusion",
        "128_demofusion", "128_fouriscale", "128_hidiffusion"]
    assert not any(t.published for t in spec.tables) and not any(r.optional for r in spec.rows())
    _, p = checked("demo")
    assert {e["basis"] for e in tables.estimate(p)} == {"measured"}
    assert tables.render_published(p, {"cells": {}}, spec.tables[0]) == []


@pytest.mark.filterwarnings("ignore:.*different sizes")
def test_native_crop_sfid_features(tmp_path):
    """sFID without downsampling: the spatial (mixed_6/conv) features of the native-resolution crops of pFID. For
    an image of exactly the crop size they are the resized image's spatial features; for a larger one, those of
    its crop (drawn as pFID's)."""
    from PIL import Image

    from ldm.evaluation.features import crop_boxes
    from ldm.evaluation.inception import FIDInceptionV3
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (299, 299, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    big = rng.integers(0, 256, (310, 330, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "b.png")
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    ex = tables.InceptionExtractor(device="cpu", crop=299, crops_per_image=1, seed=3)
    ex._model = net
    feats = ex._extract(str(tmp_path), ["a.png", "b.png"], ["spatial", tables.PATCH_SPATIAL], "cpu")
    def rel(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())

    assert feats[tables.PATCH_SPATIAL].shape == (2, 2023)
    assert rel(feats[tables.PATCH_SPATIAL][0], feats["spatial"][0]) < 1e-4
    (left, top), = crop_boxes("b.png", 330, 310, 299, 1, seed=3)
    crop = torch.from_numpy(big[top:top + 299, left:left + 299].astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        want = net(crop, outputs=("spatial",))["spatial"][0].numpy()
    assert rel(feats[tables.PATCH_SPATIAL][1], want) < 1e-4
    assert rel(feats[tables.PATCH_SPATIAL][1], feats["spatial"][1]) > 1e-2  # the crop, not the resized image
    # the cache key of the crop features carries the crop settings (as patch_pool3's)
    key = ex.settings().key_for(tables.PATCH_SPATIAL)
    assert key["crop"] == 299 and key["seed"] == 3 and key["crops_per_image"] == 1
    assert tables.resolve_metric("sfid_native").kind == tables.PATCH_SPATIAL


# ------------------------------------------------------------------------------------------------------
# issue #26 item 2: what lowers safety comes from the user's command line only, never from a spec
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["common", "row"])
@pytest.mark.parametrize("flag", ["--trust_config", "--unsafe_load", "--unsafe_load=1", "--trust", "--unsafe_l"])
def test_spec_cannot_switch_off_safety(tmp_path, capsys, where, flag):
    """The flags (and their abbreviations, which argparse would take) are refused in common_options and in a row's
    options, naming the spec, the row (or common_options) and the option; nothing is written."""
    changes = {"common_options": [flag]} if where == "common" else {"rows": _rows(options=["--dilate", "2", flag])}
    err = _error(tmp_path, capsys, **changes)
    assert str(tmp_path / "bad.yaml") in err and flag.split("=")[0] in err and "lowers safety" in err
    assert ("common_options" in err) if where == "common" else ("row 'dilated'" in err)
    whole = "--trust_config" if flag.startswith("--t") else "--unsafe_load"
    assert f"give {whole} to scripts/reproduce_table.py yourself" in err
    assert len(err.strip().splitlines()) == 1


def _pickle_payload_ckpt(path, marker):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": Payload()}, path)
    return path


def test_issue_repro_pickle_payload_in_a_spec_does_not_run(tmp_path, capsys):
    """The issue: a spec with --unsafe_load and a pickle payload as its checkpoint ran the payload and finished
    with exit 0. Now the spec is refused; without the user's own --unsafe_load the job loads the checkpoint safely
    and refuses the payload (exit 1, the job failed), and the payload never runs."""
    marker = tmp_path / "payload-ran"
    ckpt = _pickle_payload_ckpt(tmp_path / "evil.ckpt", marker)
    models = {"demo": {"config": "configs/demo/shapes32.yaml", "ckpt": str(ckpt), "base_size": [32, 32]}}
    columns = [{"id": "multi", "metric": "multi_object_rate"}]
    rows = [{"id": "direct", "method": "direct", "size": [32, 32], "options": ["--unsafe_load"]}]
    spec = write_spec(tmp_path / "evil.yaml", models=models, columns=columns, rows=rows, images=2)
    assert run(spec, tmp_path / "out", tmp_path / "cache") == 2
    assert "row 'direct'" in capsys.readouterr().err and not (tmp_path / "out").exists()
    spec = write_spec(tmp_path / "evil.yaml", models=models, columns=columns, rows=[{**rows[0], "options": []}],
                      images=2)
    assert run(spec, tmp_path / "out", tmp_path / "cache") == 1
    assert "--unsafe_load" in capsys.readouterr().err  # the loader's refusal says what would allow it
    assert not marker.exists()


def test_safety_flags_of_the_command_line_reach_every_job_and_the_dry_run_says_so(tmp_path, capsys):
    spec_path = write_spec(tmp_path / "tiny.yaml")
    assert run(spec_path, tmp_path / "out", tmp_path / "cache", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "safety: configs may build only this package's classes" in out and "given on this command line" not in out
    assert run(spec_path, tmp_path / "out", tmp_path / "cache", "--dry-run", "--unsafe_load", "--trust_config") == 0
    out = capsys.readouterr().out
    assert "safety: --trust_config --unsafe_load given on this command line: every job gets them" in out
    assert not (tmp_path / "out").exists()
    spec = tables.load_spec(spec_path)
    tables.check_spec(spec, rt.methods_names(), rt.option_check, option_names=rt.option_names())
    plain = tables.plan(tables.select(spec), tmp_path / "out")
    trusting = tables.plan(tables.select(spec), tmp_path / "out", safety=["--trust_config", "--unsafe_load"])
    for a, b in zip(plain.jobs, trusting.jobs):
        assert "--trust_config" not in a.argv and "--unsafe_load" not in a.argv
        assert b.argv == a.argv[:-2] + ["--trust_config", "--unsafe_load"] + a.argv[-2:]  # before --outdir DIR
        assert a.id == b.id  # the flags change no pixel: the same jobs
    with pytest.raises(ValueError, match="not safety flags"):
        tables.plan(tables.select(spec), tmp_path / "out", safety=["--seed"])


# ------------------------------------------------------------------------------------------------------
# issue #26 item 10: whole option names only; values a job would refuse are refused by --dry-run
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,named", [
    (["--see", "7", "--ste", "2"], "--see (an abbreviation of --seed"),
    (["--ste", "2"], "--ste (an abbreviation of --steps"),
    (["--from", "prompts.txt"], "--from (an abbreviation of --from-file"),
    (["--out=elsewhere"], "--out (an abbreviation of --outdir"),
    (["--seed=7"], "option --seed is not a row option: --seed is set by seed"),
    (["-h"], "option -h is not a row option"),
    (["-hx"], "option -h is not a row option"),
])
def test_reserved_options_and_their_abbreviations_are_refused(tmp_path, capsys, options, named):
    err = _error(tmp_path, capsys, rows=_rows(options=options))
    assert "row 'dilated'" in err and named in err, err


def test_options_are_whole_names_for_txt2img_too(tmp_path, capsys):
    """An abbreviation of an ordinary option is not taken either (the job parser has allow_abbrev=False), and a
    whole option that begins a reserved flag's name (--f, the latent factor) is not an abbreviation."""
    err = _error(tmp_path, capsys, rows=_rows(options=["--dilate_t", "2", "--dilate", "2"]))
    assert "row 'dilated'" in err and "does not take --dilate_t" in err and "--dilate_tau" in err
    with pytest.raises(ValueError, match="does not take --se"):
        rt.option_check(["--se", "7"])
    with pytest.raises(ValueError, match="help"):
        rt.option_check(["--help"])
    spec = write_spec(tmp_path / "f.yaml", rows=_rows(options=["--dilate", "2", "--dilate_tau", "2", "--f", "1"]))
    assert run(spec, tmp_path / "out", tmp_path / "cache", "--dry-run") == 0


def test_a_job_file_with_an_abbreviation_does_not_run(tmp_path, capsys):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"argv": ["--sweep", "--see", "7", "--outdir", str(tmp_path / "o")],
                               "outdir": str(tmp_path / "o"), "files": [], "key": {}}))
    assert rt.main(["--run-job", str(job)]) == 2
    assert "does not take --see" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("changes,named", [
    ({"sampler": {**SPEC["sampler"], "steps": -1}}, "sampler.steps: -1"),
    ({"sampler": {**SPEC["sampler"], "steps": 2.5}}, "sampler.steps: 2.5"),
    ({"sampler": {**SPEC["sampler"], "batch_size": 0}}, "sampler.batch_size: 0"),
    ({"sampler": {**SPEC["sampler"], "eta": 1.5}}, "sampler.eta: 1.5"),
    ({"sampler": {**SPEC["sampler"], "scale": float("nan")}}, "sampler.scale: nan"),
    ({"rows": _rows(size=[-64, 64])}, "row 'dilated': size [-64, 64]"),
    ({"rows": _rows(size="64x0")}, "row 'dilated': size '64x0'"),
    ({"rows": _rows(size=0)}, "row 'dilated': size 0"),
    ({"models": {"demo": {**SPEC["models"]["demo"], "base_size": [0, 32]}}}, "models.demo: size [0, 32]"),
    # found by the job's own checks (txt2img plan_run): the demo model has 1000 training timesteps
    ({"sampler": {**SPEC["sampler"], "steps": 1001}}, "--steps 1001"),
])
def test_values_a_job_would_refuse_fail_the_dry_run(tmp_path, capsys, changes, named):
    err = _error(tmp_path, capsys, **changes)
    assert named in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------------------------------------------
# issue #26 item 10: a stopped or killed runner takes its job processes along; interrupted runs are not timed
# ------------------------------------------------------------------------------------------------------
def _children(pid):
    """The live (not zombie) processes whose parent is ``pid``."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d.name))
    return out


def _alive(pid):
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_stopped_or_killed_runner_ends_its_parallel_jobs(tmp_path, how):
    """--parallel 2: the runner is stopped (SIGTERM: it stops its jobs' process groups) or killed outright (SIGKILL:
    each job sees its runner gone and stops). Either way no job process survives it to finish its job (before the
    fix they ran on, and a re-run started beside them counted their images and time twice)."""
    import signal
    import time
    spec = write_spec(tmp_path / "tiny.yaml", images=8, columns=[{"id": "multi", "metric": "multi_object_rate"},
                                                                 {"id": "fd_b", "metric": "shape_fd", "reference": "base"}])
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "scripts" / "reproduce_table.py"), str(spec), "--out",
                             str(out), "--cache_dir", str(tmp_path / "cache"), "--threads", "1", "--parallel", "2"],
                            cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        children = []
        while len(children) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
            children = _children(proc.pid)
        assert len(children) == 2, (children, proc.poll())
        proc.send_signal(getattr(signal, how))
        rc = proc.wait(60)
        err = proc.stderr.read()
        assert rc == (130 if how == "SIGTERM" else -9), err[-2000:]
        if how == "SIGTERM":
            assert "interrupted (SIGTERM)" in err
        deadline = time.time() + 60
        while any(_alive(c) for c in children) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(c) for c in children)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not list(out.glob(f"jobs/*/{tables.COMPLETE_FILE}"))  # stopped, not finished
    for runs in out.glob(f"jobs/*/{tables.RUNS_FILE}"):
        assert all(json.loads(line)["rc"] != 0 for line in runs.read_text().splitlines())


def test_interrupted_runs_are_not_summed_with_the_run_that_completes_the_job(tmp_path):
    """s / image from the records of finished runs only, images counted per process; hand-made records."""
    from types import SimpleNamespace

    def rec(run, rc, wall, generated, rank=0, by="process"):
        return {"run": run, "rc": rc, "wall_s": wall, "generated": generated, "generated_by": by, "rank": rank,
                "cpu_s": 1.0, "peak_memory_bytes": 1, "peak_memory_kind": "rss_hwm"}

    job = SimpleNamespace(outdir=tmp_path)
    records = [rec("a", 130, 30.0, 3),                              # stopped after 3 images, 30 s
               rec("b", 0, 4.0, 1)]                                 # the re-run: the last image, 4 s
    (tmp_path / tables.RUNS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    stats = tables.job_stats(job)
    assert stats["seconds_per_image"] == 4.0 and stats["images_timed"] == 1  # not (30 + 4) / 4
    assert stats["interrupted_seconds_per_image"] == 10.0 and stats["runs_interrupted"] == 1
    assert stats["device_seconds"] == 34.0
    # two processes of one finished run (torchrun): each wrote 2 images in 10 s -> 20 device-seconds / 4 images;
    # with run b: (4 + 20) / 5
    records += [rec("c", 0, 10.0, 2, rank=0), rec("c", 0, 10.0, 2, rank=1)]
    # an older record (images counted in the folder by rank 0): 6 s for 2 images
    records += [rec("d", 0, 6.0, 2, by=None), {**rec("d", 0, 6.0, None, rank=1), "generated_by": None}]
    (tmp_path / tables.RUNS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    stats = tables.job_stats(job)
    assert stats["seconds_per_image"] == pytest.approx((4.0 + 20.0 + 12.0) / (1 + 4 + 2))


def test_run_records_count_the_images_of_the_process(reference_run):
    for runs in reference_run["out"].glob(f"jobs/*/{tables.RUNS_FILE}"):
        (record,) = [json.loads(line) for line in runs.read_text().splitlines()]
        assert record["rc"] == 0 and record["generated_by"] == "process" and record["generated"] == 4


# ------------------------------------------------------------------------------------------------------
# issue #26 item 3: jobs keyed by the content of their files and code, not by their paths
# ------------------------------------------------------------------------------------------------------
def test_changed_checkpoint_or_preset_is_sampled_again(tmp_path, capsys):
    """The issue: replacing the checkpoint (retraining) or editing a preset, then re-running, printed "complete,
    skipped" and showed the old numbers. Now the jobs of the changed files are sampled again, into new folders, and
    the log says which file changed; the old folders are kept and named."""
    import shutil
    ckpt = tmp_path / "demo.ckpt"
    shutil.copy(REPO_ROOT / "checkpoints/demo/shapes32.ckpt", ckpt)
    (tmp_path / "p/settings").mkdir(parents=True)
    settings = tmp_path / "p/settings/inner_x2.txt"
    shutil.copy(REPO_ROOT / "configs/scalecrafter/settings/demo/inner_x2.txt", settings)
    preset = tmp_path / "p/sc64.yaml"
    preset.write_text("base_model: demo\nheight: 64\nwidth: 64\nsteps: 3\ndilate_settings: settings/inner_x2.txt\n"
                      "dilate_tau: 2\n")  # (base_model: required, issue #26 item 7)
    spec = write_spec(tmp_path / "tiny.yaml", images=2,
                      models={"demo": {"config": "configs/demo/shapes32.yaml", "ckpt": str(ckpt)}},
                      columns=[{"id": "multi", "metric": "multi_object_rate"}],
                      rows=[{"id": "direct", "method": "direct", "size": [64, 64]},
                            {"id": "sc", "method": "scalecrafter", "preset": str(preset)}])
    out = tmp_path / "out"

    def jobs():
        doc = json.loads((out / "table.json").read_text())
        return {j["rows"][0]: (j["id"], j["run_now"]) for j in doc["jobs"]}

    assert run(spec, out, tmp_path / "cache") == 0
    first = jobs()
    assert run(spec, out, tmp_path / "cache") == 0
    assert jobs() == {r: (i, False) for r, (i, _) in first.items()}
    capsys.readouterr()

    settings.write_text(settings.read_text().replace(":2\n", ":3\n", 1))  # the preset's settings file edited
    assert run(spec, out, tmp_path / "cache") == 0
    log = capsys.readouterr().out
    second = jobs()
    assert second["direct"] == (first["direct"][0], False)
    assert second["sc"][1] is True and second["sc"][0] != first["sc"][0]
    assert (f"job {second['sc'][0]}: sampled again: since {first['sc'][0]} was sampled, preset file "
            f"{settings.as_posix()} changed (content). Its images stay in {out / 'jobs' / first['sc'][0]}") in log
    assert (out / "jobs" / first["sc"][0] / "samples").is_dir()  # kept

    sd = torch.load(ckpt, map_location="cpu", weights_only=True)  # retrained: other weights at the same path
    name = next(k for k, v in sd["state_dict"].items() if v.is_floating_point())
    sd["state_dict"][name] = sd["state_dict"][name] * 0.5
    torch.save(sd, ckpt)
    assert run(spec, out, tmp_path / "cache", "--dry-run") == 0
    dry = capsys.readouterr().out
    assert "sampled again (its files or code changed since an earlier run in OUT):" in dry
    assert dry.count(f"the checkpoint {ckpt.as_posix()} changed (") == 2
    assert run(spec, out, tmp_path / "cache") == 0
    third = jobs()
    assert all(third[r][1] and third[r][0] not in (first[r][0], second[r][0]) for r in ("direct", "sc"))
    assert "complete (2 images), skipped" not in capsys.readouterr().out


def test_job_made_before_content_keys_is_sampled_again_with_the_reason(reference_run, tmp_path, capsys):
    """A job folder of an older version (no content key: its job.json has only the key) is not taken as complete."""
    import shutil
    spec = write_spec(tmp_path / "tiny.yaml")
    out = tmp_path / "out"
    p = tables.plan(tables.select(tables.load_spec(spec)), out)
    job = p.row_job["direct"]
    old = out / "jobs" / (job.id.rsplit("-", 1)[0] + "-0123456789")  # an id computed from the key alone
    shutil.copytree(reference_run["out"] / "jobs" / job.id, old)
    info = json.loads((old / "job.json").read_text())
    del info["content"]
    (old / "job.json").write_text(json.dumps(info))
    marker = json.loads((old / tables.COMPLETE_FILE).read_text())
    del marker["content"]
    (old / tables.COMPLETE_FILE).write_text(json.dumps(marker))
    assert tables.earlier_versions(job) == [(old, None)]
    assert not tables.job_complete(job)
    assert run(spec, out, tmp_path / "cache", "--dry-run") == 0
    assert (f"{job.id}: since {old.name} was sampled, it was made before content keys were recorded"
            in capsys.readouterr().out)
