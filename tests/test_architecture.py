"""The shape of the code (docs/architecture.md): a method is one module plus one registry line, and nothing else
changes. A toy method registered from this test shows up in txt2img's --help, runs in a plain run and a sweep, is
accepted by a table spec and measured by the benchmark, with no edit to those files; the library never loads a
script, and --method is dispatched by the registry only."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, load_script
from ldm import methods
from ldm.guidance import classifier_free_guidance
from ldm.methods.base import GuidanceMethod, Settings

DEMO = ["--config", str(REPO_ROOT / "configs/demo/shapes32.yaml"),
        "--ckpt", str(REPO_ROOT / "checkpoints/demo/shapes32.ckpt")]
RUN = ["--prompt", "a red circle", "--H", "64", "--W", "64", "--steps", "3", "--scale", "3", "--ddim_eta", "1",
       "--seed", "4", "--skip_grid"]


class ToyMethod(GuidanceMethod):
    """Classifier-free guidance times --toy_gain: gain 1 is direct sampling exactly, any other gain is not."""
    name = "toy"
    label = "Toy"
    summary = "a test method: guided prediction times --toy_gain"

    @classmethod
    def add_args(cls, parser):
        g = parser.add_argument_group("toy (--method toy)")
        g.add_argument("--toy_gain", type=float, default=1.0, help="factor on the guided prediction")

    @classmethod
    def settings(cls, opt, info, size):
        return Settings(size=tuple(size), values={"gain": opt.toy_gain})

    def make_guidance(self):
        gain = self.settings.values["gain"]

        def guidance(model, x, t, cond, uncond, scale, step):
            return classifier_free_guidance(model, x, t, cond, uncond, scale) * gain
        return guidance

    def describe(self):
        return {"toy": dict(self.settings.values)}


@pytest.fixture
def toy():
    methods.register("toy", ToyMethod)  # the one line a new method adds to ldm/methods/__init__.py
    yield ToyMethod
    methods.unregister("toy")


def _pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_toy_method_in_txt2img_help_plain_run_and_sweep(toy, tmp_path, capsys):
    txt2img = load_script("txt2img")
    with pytest.raises(SystemExit):
        txt2img.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "toy:" in help_text and "--toy_gain" in help_text
    assert txt2img.main(DEMO + RUN + ["--method", "direct", "--outdir", str(tmp_path / "direct")]) == 0
    assert txt2img.main(DEMO + RUN + ["--method", "toy", "--outdir", str(tmp_path / "toy1")]) == 0
    assert txt2img.main(DEMO + RUN + ["--method", "toy", "--toy_gain", "0.5", "--outdir", str(tmp_path / "toy2")]) == 0
    direct, same, other = (_pixels(tmp_path / d / "samples/00000.png") for d in ("direct", "toy1", "toy2"))
    assert np.array_equal(direct, same)  # gain 1: the toy's guidance is classifier-free guidance exactly
    assert np.abs(direct - other).max() > 10  # its option reaches its guidance
    meta = json.loads(Image.open(tmp_path / "toy2/samples/00000.png").text["parameters"])
    assert meta["method"] == "toy" and meta["toy"] == {"gain": 0.5}
    # its option under another method is refused, naming the method it belongs to
    assert txt2img.main(DEMO + RUN + ["--toy_gain", "2", "--outdir", str(tmp_path / "bad")]) == 2
    assert "--toy_gain: Toy options; add --method toy" in capsys.readouterr().err
    # a sweep of two images
    assert txt2img.main(DEMO + RUN + ["--method", "toy", "--sweep", "--n_samples", "1", "--n_iter", "2",
                                      "--outdir", str(tmp_path / "sweep")]) == 0
    assert sorted(p.name for p in (tmp_path / "sweep/samples").glob("*.png")) == ["000000_000.png", "000000_001.png"]
    manifest = [json.loads(line) for line in (tmp_path / "sweep/manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 2


def test_toy_method_in_a_table_spec_and_the_benchmark(toy, tmp_path, capsys):
    import yaml
    rt = load_script("reproduce_table")
    spec = {"name": "toy", "title": "toy table",
            "models": {"demo": {"config": "configs/demo/shapes32.yaml", "ckpt": "checkpoints/demo/shapes32.ckpt"}},
            "prompts": {"builtin": "shapes"}, "images": 2, "seed": 5,
            "sampler": {"steps": 3, "eta": 1.0, "scale": 3.0, "batch_size": 2, "precision": "full"},
            "columns": [{"id": "multi", "metric": "multi_object_rate"}],
            "rows": [{"id": "toy", "method": "toy", "size": [64, 64], "options": ["--toy_gain", "0.5"]}]}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert rt.main([str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 sampling job(s)" in out and "| toy --toy_gain 0.5 | 2 |" in out
    bench = load_script("benchmark")
    rows = bench.main(["methods", *DEMO, "--size", "64", "--steps", "2", "--methods", "toy", "--prompt", "a red circle",
                       "--write", str(tmp_path / "bench.md")])
    assert [r["method"] for r in rows] == ["direct", "toy"] and all("error" not in r for r in rows)
    table = (tmp_path / "bench.md").read_text()
    assert re.search(r"\| toy \| .*\| 4 \|", table)  # 2 guided steps = 4 UNet evaluations, as direct


def test_every_registered_method_is_one_module_that_imports_no_other_method():
    """The registry names a class per method; a method's module imports no other method's module (the static
    contract is .importlinter's, run in CI; this is the same rule as a fast test)."""
    names = methods.names()
    assert set(names) >= {"direct", "scalecrafter", "freescale", "attn_scale", "multidiffusion", "demofusion",
                          "hidiffusion", "fouriscale", "sdsr"}
    modules = {methods.method_class(n).__module__.split(".")[2] for n in names}
    root = REPO_ROOT / "ldm" / "methods"
    for mod in modules:
        files = list((root / mod).rglob("*.py")) if (root / mod).is_dir() else [root / f"{mod}.py"]
        for f in files:
            text = f.read_text()
            for other in modules - {mod}:
                assert not re.search(rf"ldm\.methods\.{other}\b|from ldm\.methods import {other}\b", text), \
                    f"{f} imports method {other}"


def test_the_library_loads_no_script_and_dispatches_methods_only_in_the_registry():
    offenders = []
    for f in (REPO_ROOT / "ldm").rglob("*.py"):
        text = f.read_text()
        if "spec_from_file_location" in text or re.search(r"^\s*(import|from) (txt2img|upscale|demo)\b", text, re.M):
            offenders.append(str(f))
    assert offenders == []
    dispatch = []
    for folder in ("ldm", "scripts"):
        for f in (REPO_ROOT / folder).rglob("*.py"):
            if f == REPO_ROOT / "ldm/methods/__init__.py":
                continue
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if re.search(r"\bmethod ==|\bmethod in \(", line):
                    dispatch.append(f"{f.relative_to(REPO_ROOT)}:{n}: {line.strip()}")
    assert dispatch == []
