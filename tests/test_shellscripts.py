"""Every preset script runs as-is (tiny random-weight model with SD's UNet layout standing in for the
real checkpoint; the size is overridden to stay fast on CPU)."""
import json
import os
import subprocess

import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO_ROOT
from test_txt2img import make_ckpt

CASES = [
    ("sample_1024x1024.sh", "sd2.1", {}),
    ("sample_1280x1280.sh", "sd1.5", {}),
    ("sample_2048x1024.sh", "sd2.1", {}),
    ("sample_2048x2048.sh", "sd1.5", {"FREEU": "1"}),
    ("sample_2048x2048.sh", "sd2.1", {"DISPERSE": "1"}),
    ("sample_2048x2048.sh", "sdxl", {"FREEU": "1"}),
    ("sample_4096x4096.sh", "sdxl", {"CORRECTED": "1", "DISPERSE": "1"}),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    out = {}
    for model, cfg in (("sd1.5", "tiny-sd1.yaml"), ("sd2.1", "tiny-sd2.yaml"), ("sdxl", "tiny-sdxl.yaml")):
        config = REPO_ROOT / "configs/tiny" / cfg
        out[model] = (config, make_ckpt.save_checkpoint(make_ckpt.make_random_state_dict(OmegaConf.load(config)),
                                                         d / f"{model}.ckpt"))
    return out


@pytest.mark.parametrize("script,model,env", CASES)
def test_preset_script_runs(tiny, tmp_path, script, model, env):
    config, ckpt = tiny[model]
    e = dict(os.environ, MODEL=model, CONFIG=str(config), CKPT=str(ckpt), OUTDIR=str(tmp_path), **env)
    proc = subprocess.run(["bash", str(REPO_ROOT / "shellscripts" / script), "--H", "64", "--W", "64", "--steps", "3"],
                          env=e, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    params = json.loads(Image.open(tmp_path / "samples/00000.png").text["parameters"])
    preset = script[len("sample_"):-len(".sh")] + ("_disperse" if env.get("DISPERSE") else "") + \
        ("_corrected" if env.get("CORRECTED") else "")
    assert params["scalecrafter"] == f"configs/scalecrafter/{model}_{preset}.yaml"
    assert params["eta"] == 1.0 and params["scale"] == (5.0 if model == "sdxl" else 7.5) and params["steps"] == 3
    assert (params["freeu"] is not None) == ("FREEU" in env)
    if model == "sdxl":  # SDXL's size conditioning follows --H/--W; the 4096 scripts decode in tiles
        assert params["size_conditioning"]["target_size_as_tuple"] == [64, 64]
        assert (params["tiled_decoding"] is not None) == script.startswith("sample_4096")


def test_unknown_model_is_refused(tmp_path):
    e = dict(os.environ, MODEL="sd3")
    proc = subprocess.run(["bash", str(REPO_ROOT / "shellscripts/sample_1024x1024.sh")], env=e, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "MODEL must be sd2.1, sd1.5 or sdxl" in proc.stderr


def test_sdxl_only_presets_and_corrected_switch(tmp_path):
    e = dict(os.environ, MODEL="sd2.1")
    proc = subprocess.run(["bash", str(REPO_ROOT / "shellscripts/sample_4096x4096.sh")], env=e, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "no ScaleCrafter preset configs/scalecrafter/sd2.1_4096x4096.yaml" in proc.stderr
    e = dict(os.environ, MODEL="sd1.5", CORRECTED="1")
    proc = subprocess.run(["bash", str(REPO_ROOT / "shellscripts/sample_2048x2048.sh")], env=e, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "CORRECTED=1 is for MODEL=sdxl" in proc.stderr
