"""End to end: original-format checkpoints with random weights -> scripts/txt2img.py -> PNGs with metadata.
Plus the bad-input cases, which must fail with a message that names the input and the fix."""
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO_ROOT, load_script
from ldm.checkpoint import CheckpointError, check_state_dict, load_model_from_config
from ldm.util import instantiate_from_config

TINY_SD2 = REPO_ROOT / "configs/tiny/tiny-sd2.yaml"
TINY_SD1 = REPO_ROOT / "configs/tiny/tiny-sd1.yaml"


txt2img = load_script("txt2img")
make_ckpt = load_script("make_random_checkpoint")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    sd2 = make_ckpt.save_checkpoint(make_ckpt.make_random_state_dict(OmegaConf.load(TINY_SD2), seed=1), d / "tiny-sd2.ckpt")
    sd1 = make_ckpt.save_checkpoint(make_ckpt.make_random_state_dict(OmegaConf.load(TINY_SD1), seed=2),
                                    d / "tiny-sd1.safetensors")
    return {"sd2": sd2, "sd1": sd1}


def run(args):
    return txt2img.main([str(a) for a in args])


def common(ckpt, config, outdir, *extra):
    return ["--config", config, "--ckpt", ckpt, "--outdir", outdir, "--steps", "3", "--H", "64", "--W", "80",
            "--ddim_eta", "1", "--scale", "5", *extra]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network access attempted during a test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_txt2img_end_to_end_offline(ckpts, tmp_path, no_network):
    out = tmp_path / "out"
    assert run(common(ckpts["sd2"], TINY_SD2, out, "--prompt", "a corgi on a beach chair", "--n_samples", "2",
                      "--seed", "51")) == 0
    files = sorted((out / "samples").glob("*.png"))
    assert [f.name for f in files] == ["00000.png", "00001.png"]
    im = Image.open(files[0])
    assert im.size == (80, 64)
    params = json.loads(im.text["parameters"])
    assert im.text["prompt"] == "a corgi on a beach chair" and im.text["seed"] == "51"
    assert params["H"] == 64 and params["W"] == 80 and params["steps"] == 3 and params["sampler"] == "DDIM"
    assert params["config"] == "tiny-sd2.yaml" and params["ckpt"] == "tiny-sd2.ckpt"
    assert (out / "grid-0000.png").is_file()
    # a second run continues the numbering, overwriting nothing; the same seed gives the same image
    assert run(common(ckpts["sd2"], TINY_SD2, out, "--prompt", "a corgi on a beach chair", "--n_samples", "2",
                      "--seed", "51")) == 0
    assert sorted(f.name for f in (out / "samples").glob("*.png")) == [f"{i:05}.png" for i in range(4)]
    assert (out / "grid-0001.png").is_file()
    first = [np.asarray(Image.open(out / f"samples/{i:05}.png")) for i in range(4)]
    assert np.array_equal(first[0], first[2]) and np.array_equal(first[1], first[3])
    assert not np.array_equal(first[0], first[1])


def test_sd1_style_safetensors_from_file_with_scalecrafter_flags(ckpts, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    out = tmp_path / "out"
    assert run(common(ckpts["sd1"], TINY_SD1, out, "--from-file", prompts, "--dilate", "2", "--dilate_tau", "2",
                      "--progressive_dilate")) == 0
    files = sorted((out / "samples").glob("*.png"))
    assert [Image.open(f).text["prompt"] for f in files] == ["a red circle", "a blue square"]
    assert json.loads(Image.open(files[0]).text["parameters"])["scalecrafter"]["dilate"] == 2.0


def test_missing_checkpoint_names_the_file_and_its_source(tmp_path, capsys):
    code = run(["--config", REPO_ROOT / "configs/stable-diffusion/v2-inference.yaml",
                "--ckpt", tmp_path / "v2-1_512-ema-pruned.ckpt", "--outdir", tmp_path])
    err = capsys.readouterr().err
    assert code == 2
    assert "v2-1_512-ema-pruned.ckpt" in err and "stable-diffusion-2-1-base" in err and "checkpoints/README.md" in err


def test_size_not_multiple_of_8_names_nearest_sizes(ckpts, tmp_path, capsys):
    code = run(["--config", TINY_SD2, "--ckpt", ckpts["sd2"], "--H", "1000", "--W", "1021", "--outdir", tmp_path])
    assert code == 2
    assert "--W 1021 is not a multiple of 8" in capsys.readouterr().err
    assert txt2img.main(["--config", str(TINY_SD2), "--ckpt", str(ckpts["sd2"]), "--H", "1004", "--W", "64",
                         "--outdir", str(tmp_path)]) == 2
    assert "nearest valid sizes: 1000 or 1008" in capsys.readouterr().err


def test_empty_prompt_file(ckpts, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert run(common(ckpts["sd2"], TINY_SD2, tmp_path, "--from-file", empty)) == 2
    assert "has no prompts" in capsys.readouterr().err


def test_wrong_config_for_checkpoint_names_the_right_config(ckpts, tmp_path, capsys):
    assert run(common(ckpts["sd1"], TINY_SD2, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "first missing" in err and "v1-inference.yaml" in err


def _meta_model(name):
    cfg = OmegaConf.load(REPO_ROOT / "configs/stable-diffusion" / name)
    with torch.device("meta"):
        return instantiate_from_config(cfg.model)


def test_full_size_sd15_file_with_v2_config_says_which_config(ref_dir):
    sd15 = {k: torch.empty(v, device="meta") for k, v in json.load(open(ref_dir / "sd15_state_dict.json")).items()}
    with pytest.raises(CheckpointError, match=r"SD 1\.x checkpoint: use configs/stable-diffusion/v1-inference.yaml"):
        check_state_dict(_meta_model("v2-inference.yaml"), sd15, "v1-5-pruned-emaonly.ckpt", "v2-inference.yaml")
    check_state_dict(_meta_model("v1-inference.yaml"), sd15)  # and the right pair passes
    sd21 = {k: torch.empty(v, device="meta") for k, v in json.load(open(ref_dir / "sd21_base_state_dict.json")).items()}
    with pytest.raises(CheckpointError, match=r"SD 2\.x checkpoint: use configs/stable-diffusion/v2-inference"):
        check_state_dict(_meta_model("v1-inference.yaml"), sd21)
    # files written by newer transformers lack position_ids: still accepted
    sd15.pop("cond_stage_model.transformer.text_model.embeddings.position_ids")
    check_state_dict(_meta_model("v1-inference.yaml"), sd15)


class NotATensor:
    pass


def test_unsafe_pickle_needs_explicit_opt_in(ckpts, tmp_path):
    sd = torch.load(ckpts["sd2"], weights_only=True)
    sd["callbacks"] = NotATensor()
    bad = tmp_path / "pickled.ckpt"
    torch.save(sd, bad)
    config = OmegaConf.load(TINY_SD2)
    with pytest.raises(CheckpointError, match="--unsafe_load"):
        load_model_from_config(config, bad)
    model = load_model_from_config(config, bad, allow_unsafe=True)
    assert model.model.diffusion_model.out[2].weight.shape[0] == 4


def test_ema_weights_are_used_when_present(ckpts, tmp_path):
    sd = torch.load(ckpts["sd2"], weights_only=True)["state_dict"]
    ema = {}
    for k, v in sd.items():
        if k.startswith("model.diffusion_model."):
            ema["model_ema." + k[len("model."):].replace(".", "")] = torch.full_like(v, 0.125)
    ema["model_ema.decay"] = torch.tensor(0.9999)
    ema["model_ema.num_updates"] = torch.tensor(10)
    path = tmp_path / "with-ema.ckpt"
    torch.save({"state_dict": {**sd, **ema}}, path)
    config = OmegaConf.load(TINY_SD2)
    model = load_model_from_config(config, path)
    w = model.model.diffusion_model.input_blocks[0][0].weight
    assert torch.all(w == 0.125)
    raw = load_model_from_config(config, path, use_ema=False)
    assert torch.equal(raw.model.diffusion_model.input_blocks[0][0].weight,
                       sd["model.diffusion_model.input_blocks.0.0.weight"])
