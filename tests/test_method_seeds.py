"""Seeds are reproducible across batch sizes: a --sweep renders the same images whether they come in one batch
of two or in two batches of one, for every method (windows, jitter, random window shifts and extra guidance
branches included). Uses a tiny SD 2.x checkpoint with every weight drawn (the ``tiny_ckpts`` ones keep the
UNet's zero output convolution, which would make every method's images the same).

The window methods run the UNet on 8² latent windows of the tiny model, where its random-weight numerics alone
differ by 1e-2 between a batch of two and two batches of one (plain guidance does too at that size: float
rounding amplified, not the method). For them the UNet is replaced by a stand-in that is exactly per-sample and
non-local (``_StandIn``), so that what is tested is the method: its windows, jitter seeds and statistics."""
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from ldm import methods
from conftest import REPO_ROOT, load_script

import torch

# every registered method (a method added to ldm/methods/ is tested here without an edit); extra flags where a
# method needs them (small windows/strides so that the tiny 16² latent has several; ScaleCrafter's settings)
EXTRA = {
    "multidiffusion": ["--md_stride", "4"],
    "scalecrafter": ["--dilate", "2", "--dilate_tau", "2"],
}


# a well-conditioned stand-in for the tiny random UNet where its float32 rounding of batched calls is amplified
# past one level: windows (multidiffusion, demofusion, freescale), and SD+SR, whose base stage runs at the tiny
# model's 8x8 training latent (checked in float64: the rows are independent, 0 levels)
STAND_IN = {"multidiffusion", "demofusion", "freescale", "sdsr"}


class _StandIn:
    """apply_model of a per-sample function that mixes the whole (window) input: a fixed 3x3 convolution, the
    sample's spatial mean, its timestep and its conditioning."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.weight = torch.randn(4, 4, 3, 3, generator=g) * 0.1

    def __call__(self, x, t, cond):
        out = torch.nn.functional.conv2d(x, self.weight.to(x), padding=1)
        out = out + 0.3 * x.mean(dim=(2, 3), keepdim=True) + (t.float() / 2000).view(-1, 1, 1, 1).to(x)
        return out + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1).to(x)


@pytest.fixture(scope="module")
def live_sd2_ckpt(tmp_path_factory):
    make = load_script("make_random_checkpoint")
    config = REPO_ROOT / "configs/tiny/tiny-sd2.yaml"
    sd = make.make_random_state_dict(OmegaConf.load(config), seed=11, std=0.05)
    return config, make.save_checkpoint(sd, tmp_path_factory.mktemp("live") / "sd2.ckpt")


@pytest.fixture(scope="module")
def live_x4_ckpt(tmp_path_factory):
    make = load_script("make_random_checkpoint")
    config = REPO_ROOT / "configs/tiny/tiny-x4-upscaler.yaml"
    sd = make.make_random_state_dict(OmegaConf.load(config), seed=12, std=0.05)
    return config, make.save_checkpoint(sd, tmp_path_factory.mktemp("live") / "x4.ckpt")


@pytest.mark.parametrize("method", methods.names())
def test_sweep_images_do_not_depend_on_the_batch_size(live_sd2_ckpt, live_x4_ckpt, tmp_path, monkeypatch, method):
    config, ckpt = live_sd2_ckpt
    txt2img = load_script("txt2img")
    if method in STAND_IN:
        from ldm.pipelines import txt2img as pipeline
        load = pipeline.load_model_from_config

        def load_with_stand_in(*args, **kwargs):
            model = load(*args, **kwargs)
            if not hasattr(model, "low_scale_model"):  # the base model (SD+SR's upscaler loads through here too)
                model.apply_model = _StandIn()
            return model
        monkeypatch.setattr(pipeline, "load_model_from_config", load_with_stand_in)
    extra = EXTRA.get(method, [])
    if method == "sdsr":
        extra = ["--sr_config", live_x4_ckpt[0], "--sr_ckpt", live_x4_ckpt[1], "--sr_steps", "2"]
    common = ["--config", config, "--ckpt", ckpt, "--prompt", "a house", "--steps", "3", "--H", "128", "--W", "128",
              "--seed", "7", "--sweep", "--method", method, "--ddim_eta", "1.0", *extra]
    one_batch = tmp_path / "one_batch"
    two_batches = tmp_path / "two_batches"
    assert txt2img.main([str(a) for a in common + ["--n_samples", "2", "--n_iter", "1", "--outdir", one_batch]]) == 0
    assert txt2img.main([str(a) for a in common + ["--n_samples", "1", "--n_iter", "2", "--outdir", two_batches]]) == 0
    files = sorted(p.name for p in (one_batch / "samples").glob("*.png"))
    assert len(files) == 2 and files == sorted(p.name for p in (two_batches / "samples").glob("*.png"))
    images = [[np.asarray(Image.open(d / "samples" / f), dtype=np.int16) for f in files]
              for d in (one_batch, two_batches)]
    assert not np.array_equal(images[0][0], images[0][1])  # two different seeds: two different images
    for a, b in zip(*images):
        # the same image up to float rounding of batched vs single convolutions (one level of 255)
        assert np.abs(a - b).max() <= 1, method
