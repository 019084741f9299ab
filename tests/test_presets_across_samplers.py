"""Presets keep their meaning across samplers and step counts (#23): the guidance of a method sees the steps of its
preset's own DDIM run, placed by timestep; a FreeScale preset may name the sampler its release runs (``sampler:``),
used unless --sampler is given."""
import json

import pytest
import yaml
from PIL import Image

from conftest import REPO_ROOT, load_script

DEMO = ["--config", str(REPO_ROOT / "configs/demo/shapes32.yaml"),
        "--ckpt", str(REPO_ROOT / "checkpoints/demo/shapes32.ckpt"), "--prompt", "a red circle", "--scale", "3",
        "--seed", "2", "--skip_grid"]


def test_scalecrafter_guidance_sees_the_presets_steps_under_another_sampler(tmp_path, monkeypatch):
    """configs/scalecrafter/demo_64x64.yaml is written for 25 DDIM steps (t = 961 - 40 i). Euler at 50 steps with
    leading spacing visits t_k = 981 - 20 k; the guidance must get, per call, the number of the preset's timesteps
    above t_k (computed here by hand), not k."""
    from ldm.methods.scalecrafter import guidance as G
    seen = []
    real = G.ScaleCrafterGuidance.__call__

    def spy(self, model, x, t, cond, uncond, scale, step):
        seen.append((int(t.flatten()[0]), step))
        return real(self, model, x, t, cond, uncond, scale, step)
    monkeypatch.setattr(G.ScaleCrafterGuidance, "__call__", spy)
    txt2img = load_script("txt2img")
    assert txt2img.main(DEMO + ["--H", "64", "--W", "64", "--steps", "50", "--sampler", "euler",
                                "--scalecrafter_config", "configs/scalecrafter/demo_64x64.yaml",
                                "--outdir", str(tmp_path / "o")]) == 0
    preset_t = [961 - 40 * i for i in range(25)]
    assert [t for t, _ in seen] == [981 - 20 * k for k in range(50)]
    assert [s for _, s in seen] == [sum(1 for r in preset_t if r > 981 - 20 * k) for k in range(50)]
    # re-dilation for the preset's steps < 15 of 25 (t >= 401): Euler's steps k with t_k >= 401, the first 30 of 50
    assert sum(1 for _, s in seen if s < 15) == 30


@pytest.fixture
def euler_preset(tmp_path):
    cfg = yaml.safe_load((REPO_ROOT / "configs/freescale/demo_64x64.yaml").read_text())
    cfg["sampler"] = "euler"
    path = tmp_path / "demo_64x64_euler.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _meta(folder):
    return json.loads(Image.open(folder / "samples/00000.png").text["parameters"])


def test_a_freescale_preset_names_its_sampler_and_the_flag_overrides_it(euler_preset, tmp_path, capsys):
    txt2img = load_script("txt2img")
    common = DEMO + ["--steps", "6", "--method", "freescale", "--freescale_config", str(euler_preset)]
    assert txt2img.main(common + ["--outdir", str(tmp_path / "a")]) == 0
    assert txt2img.main(common + ["--sampler", "ddim", "--outdir", str(tmp_path / "b")]) == 0
    assert _meta(tmp_path / "a")["sampler"].lower().startswith("euler")
    assert _meta(tmp_path / "b")["sampler"] == "DDIM"
    bad = yaml.safe_load(euler_preset.read_text())
    bad["sampler"] = "euler_x"
    euler_preset.write_text(yaml.safe_dump(bad))
    assert txt2img.main(common + ["--outdir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "sampler 'euler_x' is not one of" in err and not (tmp_path / "c").exists()
