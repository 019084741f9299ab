"""Every registered method runs end to end through scripts/txt2img.py with the samplers beyond DDIM: a
deterministic multistep one (DPM-Solver++(2M) on Karras sigmas), an ancestral one (Euler a) and a second-order one
(Heun, two guidance calls per step). The images record the sampler, and each differs from the method's DDIM image
from the same seed (the sampler reached the method's sampling, cascades and upscaling stages included). A method
added to ldm/methods/ is covered without an edit. Tiny SD 2.x checkpoint with every weight drawn."""
import json

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from ldm import methods
from ldm.samplers import sampler_class
from conftest import REPO_ROOT, load_script

EXTRA = {"multidiffusion": ["--md_stride", "4"], "scalecrafter": ["--dilate", "2", "--dilate_tau", "2"]}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    make = load_script("make_random_checkpoint")
    out = tmp_path_factory.mktemp("live")
    paths = {}
    for name, config, seed in (("sd2", "configs/tiny/tiny-sd2.yaml", 11), ("x4", "configs/tiny/tiny-x4-upscaler.yaml", 12)):
        sd = make.make_random_state_dict(OmegaConf.load(REPO_ROOT / config), seed=seed, std=0.05)
        paths[name] = (REPO_ROOT / config, make.save_checkpoint(sd, out / f"{name}.ckpt"))
    return paths


def _run(ckpts, method, sampler, outdir):
    config, ckpt = ckpts["sd2"]
    extra = list(EXTRA.get(method, []))
    if method == "sdsr":
        extra += ["--sr_config", ckpts["x4"][0], "--sr_ckpt", ckpts["x4"][1], "--sr_steps", "2"]
    flags = ["--ddim_eta", "1.0"] if sampler == "ddim" else ["--sampler", sampler]
    argv = ["--config", config, "--ckpt", ckpt, "--prompt", "a house", "--steps", "3", "--H", "128", "--W", "128",
            "--seed", "7", "--method", method, "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--outdir", outdir,
            *flags, *extra]
    assert load_script("txt2img").main([str(a) for a in argv]) == 0, (method, sampler)
    png = outdir / "samples" / "00000.png"
    return json.loads(Image.open(png).text["parameters"]), np.asarray(Image.open(png), dtype=np.int16)


@pytest.mark.parametrize("method", methods.names())
def test_every_method_with_every_kind_of_sampler(ckpts, tmp_path, method):
    _, ddim = _run(ckpts, method, "ddim", tmp_path / "ddim")
    for sampler in ("dpmpp_2m_karras", "euler_a", "heun"):
        meta, image = _run(ckpts, method, sampler, tmp_path / sampler)
        assert meta["sampler"] == sampler_class(sampler).label and meta["steps"] == 3 and meta["method"] == method
        assert np.abs(image - ddim).max() > 0, (method, sampler)


def test_sdsr_upscaler_with_its_own_sampler(ckpts, tmp_path):
    """SD+SR's x4 stage takes its own --sr_sampler (DDIM by default, as the original scripts): recorded, and another
    image than the DDIM upscaling of the same base image."""
    config, ckpt = ckpts["sd2"]
    runs = {}
    for name in ("ddim", "euler_a"):
        argv = ["--config", config, "--ckpt", ckpt, "--prompt", "a house", "--steps", "2", "--H", "128", "--W", "128",
                "--seed", "7", "--method", "sdsr", "--n_samples", "1", "--n_iter", "1", "--skip_grid",
                "--sr_config", ckpts["x4"][0], "--sr_ckpt", ckpts["x4"][1], "--sr_steps", "2", "--sr_sampler", name,
                "--outdir", tmp_path / name]
        assert load_script("txt2img").main([str(a) for a in argv]) == 0
        png = tmp_path / name / "samples" / "00000.png"
        runs[name] = (json.loads(Image.open(png).text["parameters"]), np.asarray(Image.open(png), dtype=np.int16))
    assert "sampler" not in runs["ddim"][0]["sdsr"] and runs["ddim"][0]["sdsr"]["eta"] == 0.0
    assert runs["euler_a"][0]["sdsr"]["sampler"] == "euler_a" and runs["euler_a"][0]["sdsr"]["eta"] == 1.0
    assert runs["ddim"][0]["sampler"] == runs["euler_a"][0]["sampler"] == "DDIM"  # the base stage's
    assert np.abs(runs["ddim"][1] - runs["euler_a"][1]).max() > 0
