"""scripts/upscale.py --method scalecrafter | freescale | demofusion: image-to-image upscaling with a base model.

* strength 0 writes exactly the input, resized (PIL bicubic) to the output size, encoded (posterior sample from the
  image's seed) and decoded, computed here without the script's code path;
* the latent handed to the sampler is q(z0, t, eps) with t the timestep of step steps - floor(strength x steps)
  (the noise schedule computed here from the config's formula), the sampler starts at that step, and ScaleCrafter's
  re-dilation plan is consulted by the absolute step index;
* each method writes an image of the requested size with its settings (input name and sha256, strength, the
  method's plan) in the PNG metadata; the methods give different images from a live UNet;
* bad input is one ``error:`` line and exit code 2, before anything is loaded or written.

A UNet with every weight drawn (make_random_state_dict with std=0.05; tiny_ckpts' UNet has a zero output conv, so
its prediction is 0 whatever the method). The model is loaded once per module (see ``upscale``).
"""
import hashlib
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO_ROOT, load_script

TINY_SD2 = REPO_ROOT / "configs/tiny/tiny-sd2.yaml"
TINY_X4 = REPO_ROOT / "configs/tiny/tiny-x4-upscaler.yaml"


@pytest.fixture(scope="module")
def weighted(tmp_path_factory):
    make = load_script("make_random_checkpoint")
    sd = make.make_random_state_dict(OmegaConf.load(TINY_SD2), seed=3, std=0.05)
    return make.save_checkpoint(sd, tmp_path_factory.mktemp("img2img") / "sd2w.ckpt")


@pytest.fixture(scope="module")
def loaded():
    return {}


@pytest.fixture
def upscale(monkeypatch, loaded):
    """scripts/upscale.py, loading each (config, checkpoint) once per module (the tests check the model is not
    changed by a run: every method's processors are scoped to its UNet calls)."""
    from ldm.pipelines import upscale as mod  # the pipeline behind scripts/upscale.py (its loader is patched)
    real = mod.load_model_from_config
    mod.load_calls = []

    def cached(config, ckpt, **kwargs):
        key = str(ckpt)
        if config is not None:
            mod.load_calls.append(key)
        if key not in loaded:
            loaded[key] = real(config, ckpt, **kwargs)
        return loaded[key]
    monkeypatch.setattr(mod, "load_model_from_config", cached)
    return mod


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A 48 x 40 (height x width) RGB image with structure at every scale."""
    path = tmp_path_factory.mktemp("in") / "in.png"
    g = torch.Generator().manual_seed(11)
    y, x = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 40), indexing="ij")
    base = torch.stack([y, x, (x + y) / 2], -1) * 180 + torch.rand(48, 40, 3, generator=g) * 75
    Image.fromarray(base.round().clamp(0, 255).to(torch.uint8).numpy()).save(path)
    return path


def _args(image, ckpt, outdir, *extra):
    return [str(a) for a in ["--image", image, "--config", TINY_SD2, "--ckpt", ckpt, "--prompt", "a red house",
                             "--outdir", outdir, "--seed", 5, *extra]]


def _read(path):
    im = Image.open(path)
    return np.asarray(im.convert("RGB")), json.loads(im.text["parameters"]), im


def _encode_decode(model, path, size, seed, n=1):
    """The input at ``size`` (PIL bicubic), its posterior sampled with CPU generators seeded seed, seed + 1, ...
    (one per batch element; a batch of n, as the script runs it: CPU convolutions may round differently for
    another batch size), decoded: (the first PNG's pixels, z0, the first generator after the draw), or with n > 1
    the list of PNG pixels."""
    h, w = size
    im = Image.open(path).convert("RGB").resize((w, h), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None].repeat(n, 1, 1, 1)
    gens = [torch.Generator().manual_seed(seed + j) for j in range(n)]
    with torch.no_grad():
        post = model.first_stage_model.encode(x)
        noise = torch.stack([torch.randn(post.mean.shape[1:], generator=g) for g in gens])
        z0 = model.scale_factor * (post.mean + post.std * noise)
        y = model.first_stage_model.decode(z0 / model.scale_factor)
    y = torch.clamp((y + 1.0) / 2.0, 0.0, 1.0)
    pngs = [(255.0 * yy.permute(1, 2, 0).numpy()).round().astype(np.uint8) for yy in y]
    return pngs if n > 1 else (pngs[0], z0, gens[0])


def _alphas_cumprod(T=1000, start=0.00085, end=0.012):
    """tiny-sd2.yaml's schedule ('linear': linear in sqrt(beta)), in float64."""
    betas = np.linspace(start ** 0.5, end ** 0.5, T, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


# ---------------------------------------------------------------------------------------------
# strength 0: the input's encode/decode


@pytest.mark.parametrize("method,extra", [
    ("scalecrafter", ["--dilate", "2", "--dilate_tau", "3", "--scale", "2", "--n_samples", "2"]),
    ("freescale", ["--W", "80"]),
    ("demofusion", ["--H", "96", "--W", "80"]),
])
def test_strength_0_is_the_inputs_encode_decode(upscale, weighted, image, tmp_path, method, extra):
    out = tmp_path / "out"
    assert upscale.main(_args(image, weighted, out, "--method", method, "--strength", "0", "--steps", "4",
                              *extra)) == 0
    model = upscale.load_model_from_config(None, weighted)
    n = 2 if "--n_samples" in extra else 1
    wants = _encode_decode(model, image, (96, 80), seed=5, n=2) if n == 2 else [_encode_decode(model, image,
                                                                                             (96, 80), seed=5)[0]]
    for j, want in enumerate(wants):
        got, params, _ = _read(out / f"{j:05}.png")
        assert got.shape == (96, 80, 3)
        assert np.array_equal(got, want), np.abs(got.astype(int) - want).max()
        assert params["strength"] == 0 and params["t_enc"] == 0 and params["start_step"] is None
        assert params["resized_to"] == [96, 80] and params["image_seed"] == 5 + j
        assert got.std() > 10  # an image, not a constant
    if n == 2:  # each result draws its posterior sample from its own seed
        assert not np.array_equal(_read(out / "00000.png")[0], _read(out / "00001.png")[0])


def test_tiled_encoding_matches_the_whole_image(upscale, weighted, image, tmp_path):
    common = ["--method", "scalecrafter", "--dilate", "2", "--dilate_tau", "3", "--strength", "0", "--W", "80"]
    assert upscale.main(_args(image, weighted, tmp_path / "whole", *common)) == 0
    assert upscale.main(_args(image, weighted, tmp_path / "tiled", *common, "--tile_size", "4")) == 0
    whole, p_whole, _ = _read(tmp_path / "whole/00000.png")
    tiled, p_tiled, _ = _read(tmp_path / "tiled/00000.png")
    assert p_whole["tiled_decoding"] is None
    assert p_tiled["tiled_decoding"] == {"overlap": 24, "sync_gn": True, "tile_size": 4}
    assert np.abs(tiled.astype(int) - whole).max() <= 2  # synchronized GroupNorm: exact up to rounding


# ---------------------------------------------------------------------------------------------
# where the sampler starts, from what latent


@pytest.mark.parametrize("steps,strength,want_steps,want_t", [
    (10, 0.35, [7, 8, 9], [201, 101, 1]),     # t_enc = 3: the last 3 of 10 steps (timesteps 1, 101, ..., 901)
    (4, 1.0, [0, 1, 2, 3], [751, 501, 251, 1]),  # the whole schedule, from q(z0, 751, eps)
])
def test_noised_latent_start_step_and_plan_steps(upscale, weighted, image, tmp_path, monkeypatch, steps, strength,
                                                 want_steps, want_t):
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.methods.scalecrafter.guidance import ScaleCrafterGuidance
    seen, calls = {}, []
    real_sample, real_guide = DDIMSampler.sample, ScaleCrafterGuidance.__call__

    def spy_sample(self, S, batch_size, shape, **kwargs):
        seen.update(S=S, x_T=kwargs["x_T"].clone(), start_step=kwargs["start_step"])
        return real_sample(self, S, batch_size, shape, **kwargs)

    def spy_guide(self, model, x, t, cond, uncond, scale, step):
        calls.append((step, int(t[0]), bool(self.plan.processors(step))))
        return real_guide(self, model, x, t, cond, uncond, scale, step)
    monkeypatch.setattr(DDIMSampler, "sample", spy_sample)
    monkeypatch.setattr(ScaleCrafterGuidance, "__call__", spy_guide)
    tau = 8
    assert upscale.main(_args(image, weighted, tmp_path, "--method", "scalecrafter", "--dilate", "2", "--dilate_tau",
                              tau, "--H", "96", "--W", "80", "--steps", steps, "--strength", strength,
                              "--scale_cfg", "1")) == 0
    t_enc = len(want_steps)
    assert seen["S"] == steps and seen["start_step"] == steps - t_enc
    assert [c[0] for c in calls] == want_steps and [c[1] for c in calls] == want_t
    # the plan is asked with the absolute step index: re-dilated for steps < tau only
    assert [c[2] for c in calls] == [s < tau for s in want_steps]
    # x_T = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps: z0 the posterior sample, then eps, from the image's generator
    model = upscale.load_model_from_config(None, weighted)
    _, z0, g = _encode_decode(model, image, (96, 80), seed=5)
    eps = torch.randn(z0.shape[1:], generator=g)[None]
    abar = _alphas_cumprod()[want_t[0]]
    want = (np.sqrt(abar) * z0.double() + np.sqrt(1 - abar) * eps.double()).float()
    assert torch.allclose(seen["x_T"], want, atol=1e-5), (seen["x_T"] - want).abs().max()
    params = _read(tmp_path / "00000.png")[1]
    assert (params["t_enc"], params["start_step"], params["start_timestep"]) == (t_enc, steps - t_enc, want_t[0])


def test_t_enc_is_the_floor_of_strength_times_steps():
    from ldm.pipelines import upscale
    assert [upscale.t_enc_of(s, 100) for s in (0.0, 0.004, 0.29, 0.5, 0.999, 1.0)] == [0, 0, 29, 50, 99, 100]
    assert upscale.t_enc_of(0.7, 10) == 7 and upscale.t_enc_of(0.75, 50) == 37
    # the cascades' entry stage: the largest stage before the last that fits in the image
    stages = [(64, 64), (128, 128), (256, 256)]
    assert [upscale.entry_stage(stages, h, w) for h, w in ((40, 40), (64, 64), (130, 200), (300, 300))] == [0, 0, 1, 1]


# ---------------------------------------------------------------------------------------------
# every method end to end


def test_each_method_writes_the_requested_size_with_metadata(upscale, weighted, image, tmp_path, capsys):
    common = ["--W", "80", "--steps", "3", "--strength", "0.7", "--scale_cfg", "3"]
    extra = {"scalecrafter": ["--dilate", "2", "--dilate_tau", "3"], "freescale": [], "demofusion": []}
    images = {}
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    for method in extra:
        out = tmp_path / method
        assert upscale.main(_args(image, weighted, out, "--method", method, *common, *extra[method])) == 0
        assert f"{method} in.png" in capsys.readouterr().err  # the progress bar
        pixels, params, im = _read(out / "00000.png")
        assert im.size == (80, 96) and im.text["prompt"] == "a red house" and im.text["seed"] == "5"
        assert (params["method"], params["mode"], params["image"], params["image_sha256"]) == \
            (method, "img2img", "in.png", digest)
        assert params["input_size"] == [48, 40] and (params["H"], params["W"]) == (96, 80)
        assert (params["strength"], params["t_enc"], params["start_step"], params["steps"]) == (0.7, 2, 1, 3)
        assert params["scale_cfg"] == 3.0 and params["ckpt"] == "sd2w.ckpt" and params["config"] == "tiny-sd2.yaml"
        images[method] = pixels
    sc = _read(tmp_path / "scalecrafter/00000.png")[1]
    assert sc["scalecrafter"] == {"dilate": 2.0, "dilate_tau": 3, "dilate_skip": 0, "progressive_dilate": False}
    assert sc["resized_to"] == [96, 80]
    fs = _read(tmp_path / "freescale/00000.png")[1]
    # default stages for 96x80 from the 64 px base: 48x40, 96x80; the image (48x40) enters at the first
    assert fs["freescale"]["stages"] == [[48, 40], [96, 80]] and fs["freescale"]["restart_step"] == 1
    assert fs["cascade_entry"] == {"stage": 0, "size": [48, 40]} and fs["resized_to"] == [48, 40]
    df = _read(tmp_path / "demofusion/00000.png")[1]
    assert df["demofusion"]["stages"] == [[64, 56], [96, 80]] and df["demofusion"]["restart_step"] == 1
    assert df["cascade_entry"] == {"stage": 0, "size": [64, 56]}
    strength0, _, _ = _encode_decode(upscale.load_model_from_config(None, weighted), image, (96, 80), 5)
    names = list(images)
    for i, a in enumerate(names):  # each method does something, and something different
        assert np.abs(images[a].astype(int) - strength0).mean() > 1, a
        for b in names[i + 1:]:
            assert np.abs(images[a].astype(int) - images[b]).mean() > 1, (a, b)


def test_default_strengths_and_a_second_image(upscale, weighted, image, tmp_path):
    """freescale: 1 - restart/steps (int(0.3 x 3) = 0: the whole schedule); demofusion: 1; several --image."""
    other = tmp_path / "other.png"
    Image.open(image).transpose(Image.Transpose.ROTATE_90).save(other)  # 40 x 48
    assert upscale.main(_args(image, weighted, tmp_path / "fs", "--method", "freescale", "--W", "80", "--steps",
                              "3", "--scale_cfg", "1")) == 0
    assert _read(tmp_path / "fs/00000.png")[1]["strength"] == 1.0
    args = _args(image, weighted, tmp_path / "df", "--method", "demofusion", "--scale", "2", "--steps", "2",
                 "--scale_cfg", "1")
    assert upscale.main([*args[:2], str(other), *args[2:]]) == 0
    first, second = _read(tmp_path / "df/00000.png"), _read(tmp_path / "df/00001.png")
    assert first[1]["strength"] == 1.0 and first[1]["demofusion"]["restart_step"] == 0
    assert first[2].size == (80, 96) and second[2].size == (96, 80) and second[1]["image"] == "other.png"
    assert first[1]["scale"] == 2.0


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("extra,needle", [
    (["--image", "MISSING"], "no such file"),
    (["--strength", "1.5"], "--strength 1.5 is outside [0, 1]"),
    (["--strength", "-0.1"], "outside [0, 1]"),
    (["--H", "100", "--W", "80"], "--H 100 is not a multiple of 8"),
    (["--scalecrafter_config", "configs/scalecrafter/sdxl_2048x2048.yaml"], "preset for sdxl"),
    (["--method", "freescale", "--freescale_config", "configs/freescale/sdxl_2048x2048.yaml"], "preset for sdxl"),
    (["--method", "freescale", "--restart_step", "2"], "give --strength"),
    (["--method", "freescale", "--init_image", "IMAGE"], "the image is --image"),
    (["--n_iter", "2"], "--n_iter: a scripts/txt2img.py option that upscale.py does not use"),
    (["--method", "freescale", "--H", "64", "--W", "64"], "single stage"),
    (["--method", "demofusion", "--dilate", "2", "--dilate_tau", "2"], "ScaleCrafter options"),
    (["--method", "scalecrafter"], "needs its settings"),
    (["--config", "X4"], "use --method sr"),
    (["--method", "freescale", "--H", None, "--W", None], "give the output size"),
])
def test_errors(upscale, weighted, image, tmp_path, capsys, extra, needle):
    args = {"--method": "scalecrafter", "--image": image, "--config": TINY_SD2, "--ckpt": weighted, "--steps": 2,
            "--outdir": tmp_path / "o", "--H": 96, "--W": 80}
    if "--method" not in extra or extra[extra.index("--method") + 1] == "scalecrafter":
        if "--scalecrafter_config" not in extra and extra != ["--method", "scalecrafter"]:
            args.update({"--dilate": 2, "--dilate_tau": 2})
    if extra == ["--method", "scalecrafter"]:
        extra = []
    for key, value in zip(extra[::2], extra[1::2]):
        args[key] = {"MISSING": tmp_path / "nope.png", "IMAGE": image, "X4": TINY_X4}.get(value, value)
    argv = [str(a) for k, v in args.items() if v is not None for a in (k, v)]
    assert upscale.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "o").exists() and upscale.load_calls == []  # refused before loading


def test_scalecrafter_warns_when_the_start_is_after_its_plan(upscale, weighted, image, tmp_path, capsys):
    """Re-dilation is for steps < tau of the whole schedule: a later start is plain img2img, and says so."""
    assert upscale.main(_args(image, weighted, tmp_path, "--method", "scalecrafter", "--dilate", "2", "--dilate_tau",
                              "1", "--steps", "2", "--strength", "0.5", "--W", "80", "--scale_cfg", "1")) == 0
    err = capsys.readouterr().err
    assert "warning: --strength 0.5 starts at step 1 of 2, after ScaleCrafter's re-dilation (steps < 1)" in err, err
