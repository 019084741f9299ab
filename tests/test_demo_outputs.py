"""The demo's measurement and training scripts leave the committed files alone unless asked by name:
scripts/eval_repetition.py writes to outputs/ (docs/ only with --write-docs), shellscripts/train_demo_model.sh
exports to outputs/demo/ (checkpoints/demo/ only with OUT=...), and the README describes what they run."""
import os
import shlex
import stat
import subprocess

import pytest

from conftest import REPO_ROOT, load_script

DOCS = ["docs/demo_results.md", "docs/images/demo_grid.png"]
QUICK = ["--n", "2", "--n_large", "1", "--settings", "32_direct", "--grid_n", "2", "--threads", "1", "--device", "cpu"]


@pytest.fixture
def eval_repetition(monkeypatch, tmp_path):
    mod = load_script("eval_repetition")
    monkeypatch.setattr(mod, "REPO_ROOT", tmp_path)  # relative --out/--grid resolve here, not in the checkout
    return mod


def test_eval_repetition_writes_to_outputs_by_default(eval_repetition, tmp_path):
    before = {p: (REPO_ROOT / p).read_bytes() for p in DOCS}
    assert eval_repetition.main(QUICK) == 0
    out = tmp_path / "outputs" / "demo_results"
    assert sorted(os.listdir(out)) == ["demo_grid.png", "demo_results.md"]
    assert "![demo grid](demo_grid.png)" in (out / "demo_results.md").read_text()
    assert not (tmp_path / "docs").exists()
    assert {p: (REPO_ROOT / p).read_bytes() for p in DOCS} == before


def test_eval_repetition_write_docs(eval_repetition, tmp_path, capsys):
    assert eval_repetition.main(QUICK + ["--write-docs"]) == 0
    md = (tmp_path / "docs" / "demo_results.md").read_text()
    assert (tmp_path / "docs" / "images" / "demo_grid.png").is_file()
    assert "![demo grid](images/demo_grid.png)" in md and "--write-docs" in md
    assert not (tmp_path / "outputs").exists()
    with pytest.raises(SystemExit) as exc:
        eval_repetition.main(["--write-docs", "--out", "elsewhere.md"])
    assert exc.value.code == 2 and "--write-docs" in capsys.readouterr().err


def _train_script_calls(tmp_path, **env):
    """Run shellscripts/train_demo_model.sh with a stand-in python3 that only records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.txt"
    stub = bin_dir / "python3"
    stub.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> {shlex.quote(str(log))}\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    e = {k: v for k, v in os.environ.items() if k not in ("OUT", "STAGE4_STEPS", "THREADS")}
    e.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", LOGDIR=str(tmp_path / "logs"), **env)
    proc = subprocess.run(["bash", str(REPO_ROOT / "shellscripts/train_demo_model.sh")], env=e, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    log.unlink()
    return calls


def test_train_script_exports_to_outputs_unless_out_is_given(tmp_path):
    calls = _train_script_calls(tmp_path)
    train = [c for c in calls if c.startswith("main.py -t ")]
    assert len(train) == 4 and all(" --base " in c for c in train)
    assert [c.split(" --base ")[1].split()[0] for c in train] == [
        "configs/demo/recipe/stage1_eps.yaml", "configs/demo/recipe/stage2_eps_ddpm_schedule.yaml",
        "configs/demo/recipe/stage3_v.yaml", "configs/demo/shapes32.yaml"]
    assert calls[-1].startswith("main.py --base configs/demo/shapes32.yaml --export ")
    assert calls[-1].endswith(" --out outputs/demo/shapes32.ckpt") and len(calls) == 5
    calls = _train_script_calls(tmp_path, OUT="checkpoints/demo/shapes32.ckpt")
    assert calls[-1].endswith(" --out checkpoints/demo/shapes32.ckpt")


def test_readme_describes_the_training_script():
    readme = (REPO_ROOT / "README.md").read_text()
    script = (REPO_ROOT / "shellscripts/train_demo_model.sh").read_text()
    readme = " ".join(readme.split())  # line breaks do not matter
    assert "(about 100 minutes" in script and "about 100 minutes on 2 CPU cores" in readme
    assert "four `python3 main.py -t --base …` runs, `configs/demo/recipe/stage{1,2,3}_*.yaml` and then " \
           "`configs/demo/shapes32.yaml`" in readme
    assert "into `outputs/demo/shapes32.ckpt` (`OUT=checkpoints/demo/shapes32.ckpt`" in readme
