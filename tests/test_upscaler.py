"""The SD 2.x x4 upscaler (LatentUpscaleDiffusion) and the SD+SR baseline.

* the original config builds with the original state-dict layout (tests/reference/x4_upscaler_*.json, dumped
  from the original code); the low-scale schedule equals the original's buffers;
* the noise augmentation is q_sample with the low-scale schedule (ᾱ computed here from the formula);
* the UNet sees [latent, noised low-resolution image] in that order, the level as its class label, and the
  unconditional branch keeps image and level;
* windows average per-window predictions with the low-resolution crop of each window;
* scripts/upscale.py and scripts/txt2img.py --method sdsr (also --sweep) write images of the requested size
  with their settings; wrong files and configs fail with exit code 2 and a message naming the right config.
"""
import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO_ROOT, load_script
from ldm.checkpoint import CheckpointError, identify_family, load_model_from_config
from ldm.methods.sdsr import sdsr_base_size
from ldm.modules.diffusionmodules.upscaling import ImageConcatWithNoiseAugmentation
from ldm.upscaler import Upscaler, WindowedUpscaleGuidance
from ldm.util import instantiate_from_config

X4_CONFIG = REPO_ROOT / "configs/stable-diffusion/x4-upscaling.yaml"
TINY_X4 = REPO_ROOT / "configs/tiny/tiny-x4-upscaler.yaml"
TINY_SD2 = REPO_ROOT / "configs/tiny/tiny-sd2.yaml"

make_ckpt = load_script("make_random_checkpoint")


@pytest.fixture(scope="module")
def x4_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("x4")
    return make_ckpt.save_checkpoint(make_ckpt.make_random_state_dict(OmegaConf.load(TINY_X4), seed=4), d / "x4.ckpt")


@pytest.fixture(scope="module")
def tiny_x4(x4_ckpt):
    return load_model_from_config(OmegaConf.load(TINY_X4), x4_ckpt)


# ---------------------------------------------------------------------------------------------
# layout and loading


def test_original_config_builds_the_original_layout(ref_dir):
    want = json.load(open(ref_dir / "x4_upscaler_state_dict.json"))
    summary = json.load(open(ref_dir / "x4_upscaler_summary.json"))
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.load(X4_CONFIG).model)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert [k for k in want if k not in got] == [] and [k for k in got if k not in want] == []
    assert [k for k in got if got[k] != want[k]] == []
    assert list(got) == list(want)  # state-dict order, low_scale_model.* last
    unet = sum(p.numel() for p in model.model.diffusion_model.parameters())
    assert unet == summary["tensors_and_elements"]["model.diffusion_model"][1] == 473_398_020
    assert sum(p.numel() for p in model.parameters()) == summary["total_parameters"]
    assert got["model.diffusion_model.input_blocks.0.0.weight"] == [256, 7, 3, 3]  # 4 latent + 3 image channels
    assert got["model.diffusion_model.label_emb.weight"] == [1000, 1024]  # the noise level as a class
    assert model.parameterization == summary["parameterization"] == "v"
    assert model.scale_factor == summary["scale_factor"]
    assert model.low_scale_model.max_noise_level == summary["max_noise_level"] == 350
    assert model.upscale_factor == 4 and model.unet_multiple == 8


def test_low_scale_schedule_equals_the_originals_buffers(ref_dir):
    summary = json.load(open(ref_dir / "x4_upscaler_summary.json"))
    low = instantiate_from_config(OmegaConf.load(X4_CONFIG).model.params.low_scale_config)
    assert low.alphas_cumprod.tolist() == summary["low_scale_alphas_cumprod_float32"]


def test_tiny_config_has_the_original_unet_structure():
    """Same UNet parameter names as the released model (only the widths differ)."""
    with torch.device("meta"):
        full = instantiate_from_config(OmegaConf.load(X4_CONFIG).model)
        tiny = instantiate_from_config(OmegaConf.load(TINY_X4).model)

    def unet_keys(m):
        return [k for k in m.state_dict() if k.startswith("model.diffusion_model.")]
    assert unet_keys(tiny) == unet_keys(full)
    assert [k for k in tiny.state_dict() if k.startswith("low_scale_model.")] == \
        [k for k in full.state_dict() if k.startswith("low_scale_model.")]
    assert tiny.upscale_factor == 4 and tiny.parameterization == "v"


def test_family_detection(ref_dir, x4_ckpt, tmp_path):
    x4 = json.load(open(ref_dir / "x4_upscaler_state_dict.json"))
    assert identify_family(x4) == "sd2-x4"
    assert identify_family([k for k in x4 if not k.startswith("low_scale_model.")]) == "sd2-x4"
    assert identify_family(json.load(open(ref_dir / "sd21_base_state_dict.json"))) == "sd2"
    assert identify_family(json.load(open(ref_dir / "sdxl_base_state_dict.json"))) == "sdxl"
    # a file without the (derived) low-scale buffers loads; they are recomputed
    sd = torch.load(x4_ckpt, weights_only=True)["state_dict"]
    slim = make_ckpt.save_checkpoint({k: v for k, v in sd.items() if not k.startswith("low_scale_model.")},
                                     tmp_path / "slim.safetensors")
    model = load_model_from_config(OmegaConf.load(TINY_X4), slim)
    assert torch.equal(model.low_scale_model.alphas_cumprod, sd["low_scale_model.alphas_cumprod"])


def test_wrong_family_names_the_config_to_use(x4_ckpt, tiny_ckpts):
    sd2_config, sd2_ckpt = tiny_ckpts["sd2"]
    with pytest.raises(CheckpointError) as err:
        load_model_from_config(OmegaConf.load(TINY_X4), sd2_ckpt, config_name="tiny-x4-upscaler.yaml")
    assert "SD 2.x checkpoint" in str(err.value) and "v2-inference.yaml" in str(err.value)
    with pytest.raises(CheckpointError) as err:
        load_model_from_config(OmegaConf.load(sd2_config), x4_ckpt, config_name="tiny-sd2.yaml")
    assert "x4 upscaler" in str(err.value) and "configs/stable-diffusion/x4-upscaling.yaml" in str(err.value)


# ---------------------------------------------------------------------------------------------
# conditioning


def alphas_cumprod_from_formula(t, start=1e-4, end=2e-2, n=1000):
    """ᾱ_t of SD's 'linear' schedule (linear in sqrt(β)), in plain Python floats."""
    a = 1.0
    for i in range(t + 1):
        beta = (math.sqrt(start) + i * (math.sqrt(end) - math.sqrt(start)) / (n - 1)) ** 2
        a *= 1.0 - beta
    return a


@pytest.mark.parametrize("level", [0, 20, 100, 349])
def test_noise_augmentation_is_q_sample_of_the_low_scale_schedule(level):
    low = ImageConcatWithNoiseAugmentation({"linear_start": 1e-4, "linear_end": 0.02}, max_noise_level=350)
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 3, 5, 6, generator=g) * 2 - 1
    eps = torch.randn(2, 3, 5, 6, generator=g)
    a = alphas_cumprod_from_formula(level)
    want = math.sqrt(a) * x + math.sqrt(1 - a) * eps
    got, got_level = low(x, level, noise=eps)
    assert got_level.tolist() == [level, level] and got_level.dtype == torch.long
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # the noise drawn from a generator is that generator's first draw
    got2, _ = low(x, torch.tensor([level, level]), generator=torch.Generator().manual_seed(3))
    eps2 = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got2, math.sqrt(a) * x + math.sqrt(1 - a) * eps2, atol=1e-6, rtol=0)


def test_noise_level_out_of_range_is_refused(tiny_x4):
    with pytest.raises(ValueError, match="outside"):
        Upscaler(tiny_x4, noise_level=351)
    with pytest.raises(ValueError, match="noise levels must be in"):
        tiny_x4.low_scale_model(torch.zeros(1, 3, 4, 4), 1000)


def test_unet_sees_latent_then_noised_image_and_the_level_as_label(tiny_x4):
    """Hooks on the UNet's first convolution, its label embedding and the wrapper's conditioning."""
    model = tiny_x4
    unet = model.model.diffusion_model
    seen = {}

    def keep(name, value):
        seen.setdefault(name, value)  # the first call (1 step: the only one)

    hooks = [unet.input_blocks[0][0].register_forward_pre_hook(lambda m, a: keep("conv_in", a[0])),
             unet.label_emb.register_forward_pre_hook(lambda m, a: keep("label", a[0])),
             model.model.register_forward_pre_hook(lambda m, a, k: keep("cond", k), with_kwargs=True)]
    try:
        x_low = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
        x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
        up = Upscaler(model, steps=1, scale=5.0, noise_level=37, tiling={})
        up(x_low, ["a cat"], generator=torch.Generator().manual_seed(9), x_T=x_T)
    finally:
        for h in hooks:
            h.remove()
    a = alphas_cumprod_from_formula(37)
    eps = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(9))  # the generator's first draw
    x_aug = math.sqrt(a) * x_low + math.sqrt(1 - a) * eps
    h = seen["conv_in"]
    assert h.shape == (2, 7, 16, 16)  # unconditional and conditional branch in one batch
    for branch in range(2):
        torch.testing.assert_close(h[branch, :4], x_T[0])  # the latent first ...
        torch.testing.assert_close(h[branch, 4:], x_aug[0], atol=1e-5, rtol=0)  # ... then the noised image
    assert seen["label"].tolist() == [37, 37]
    ctx = seen["cond"]["c_crossattn"][0]
    torch.testing.assert_close(ctx[0], model.get_learned_conditioning([""])[0])  # uncond: the prompt only changes
    torch.testing.assert_close(ctx[1], model.get_learned_conditioning(["a cat"])[0])


class _PointwiseModel:
    """A stand-in denoiser whose output at a pixel depends only on that pixel's inputs and the batch's
    conditions: windowed averaging must then reproduce the whole-image output exactly."""

    def apply_model(self, x, t, cond):
        img = cond["c_concat"][0]
        level = cond["c_adm"].float()[:, None, None, None]
        text = cond["c_crossattn"][0].mean(dim=(1, 2))[:, None, None, None]
        return x * 0.5 + img.sum(1, keepdim=True) + level + text


def test_windows_use_each_windows_crop_of_the_low_resolution_image():
    from ldm.models.diffusion.ddim import classifier_free_guidance
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 24, 40, generator=g)
    img = torch.randn(2, 3, 24, 40, generator=g)
    cond = {"c_concat": [img], "c_crossattn": [torch.randn(2, 5, 8, generator=g)], "c_adm": torch.tensor([3, 9])}
    uncond = {"c_concat": [img], "c_crossattn": [torch.randn(2, 5, 8, generator=g)], "c_adm": torch.tensor([3, 9])}
    t = torch.tensor([500, 500])
    model = _PointwiseModel()
    whole = classifier_free_guidance(model, x, t, cond, uncond, 4.0)
    windowed = WindowedUpscaleGuidance(16, 8, window_batch=3)(model, x, t, cond, uncond, 4.0)
    torch.testing.assert_close(windowed, whole)
    # a guidance that gave every window the top-left crop would differ
    shifted = dict(cond, c_concat=[torch.roll(img, 8, dims=-1)])
    assert not torch.allclose(WindowedUpscaleGuidance(16, 8)(model, x, t, shifted, uncond, 4.0), whole)


def test_plan_and_sizes(tiny_x4):
    up = Upscaler(tiny_x4, tiling="auto")
    assert up.latent_shape(20, 28) == (4, 24, 32)  # padded to the UNet's multiple of 8
    assert up.plan(64, 64)["window"] is None and up.plan(72, 64)["window"] == 16  # image_size 16: whole up to 64²
    assert up.plan(256, 256)["tiling"] == {} and up.plan(264, 256)["tiling"] == {"sync_gn": True}
    assert Upscaler(tiny_x4, tiling={}).plan(264, 256)["tiling"] == {}
    assert Upscaler(tiny_x4, window=8, overlap=2).plan(24, 24)["stride"] == 6
    assert sdsr_base_size(1024, 1024, 512) == (512, 512)  # x4 to 2048, then x2 by resizing
    assert sdsr_base_size(2048, 2048, 512) == (512, 512)
    assert sdsr_base_size(2048, 1024, 512) == (704, 384)
    assert sdsr_base_size(4096, 4096, 1024) == (1024, 1024)
    with pytest.raises(ValueError, match="more than 4x"):
        sdsr_base_size(4096, 4096, 512)


def test_windowed_upscale_runs_and_pads(tiny_x4):
    up = Upscaler(tiny_x4, steps=1, scale=3.0, window=8, overlap=2, tiling={})
    assert up.plan(6, 12) == {"latent": [8, 16], "window": 8, "stride": 6, "tiling": {}}
    out = up(torch.zeros(2, 3, 6, 12), ["a", "b"], generator=[torch.Generator().manual_seed(i) for i in range(2)],
             out_hw=(15, 30))
    assert out.shape == (2, 3, 15, 30) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# scripts


def _image(path, h, w):
    g = torch.Generator().manual_seed(0)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(arr).save(path)
    return path


def test_upscale_script_writes_the_requested_size_with_metadata(x4_ckpt, tmp_path, capsys):
    upscale = load_script("upscale")
    src = _image(tmp_path / "in.png", 20, 28)
    out = tmp_path / "out"
    code = upscale.main([str(a) for a in ["--image", src, "--config", TINY_X4, "--ckpt", x4_ckpt, "--prompt",
                                          "a cat", "--steps", "2", "--noise_level", "30", "--scale", "2",
                                          "--scale_cfg", "4", "--outdir", out, "--seed", "5"]])
    assert code == 0, capsys.readouterr().err
    im = Image.open(out / "00000.png")
    assert im.size == (56, 40)  # x4 by the model, then x2 by resizing
    params = json.loads(im.text["parameters"])
    assert im.text["prompt"] == "a cat" and im.text["seed"] == "5"
    assert params["upscaler"]["noise_level"] == 30 and params["upscaler"]["steps"] == 2
    assert params["scale_cfg"] == 4.0 and params["input_size"] == [20, 28] and params["resized_from"] == [80, 112]
    assert params["ckpt"] == "x4.ckpt" and params["config"] == "tiny-x4-upscaler.yaml"


@pytest.mark.parametrize("case,needle", [
    ("missing_image", "no such file"),
    ("missing_ckpt", "x4-upscaler-ema.ckpt"),
    ("not_an_upscaler_config", "not an upscaler config"),
    ("wrong_family", "v2-inference.yaml"),
    ("too_large", "more than x4"),
    ("noise_level", "--noise_level 400"),
])
def test_upscale_script_errors(case, needle, x4_ckpt, tiny_ckpts, tmp_path, capsys):
    upscale = load_script("upscale")
    src = _image(tmp_path / "in.png", 16, 16)
    args = {"--image": src, "--config": TINY_X4, "--ckpt": x4_ckpt, "--steps": 1, "--outdir": tmp_path / "out"}
    extra = []
    if case == "missing_image":
        args["--image"] = tmp_path / "nope.png"
    elif case == "missing_ckpt":
        args["--ckpt"] = tmp_path / "x4-upscaler-ema.ckpt"
    elif case == "not_an_upscaler_config":
        args["--config"] = TINY_SD2
    elif case == "wrong_family":
        args["--ckpt"] = tiny_ckpts["sd2"][1]
    elif case == "too_large":
        extra = ["--W", "80"]
    else:
        extra = ["--noise_level", "400"]
    argv = [str(a) for kv in args.items() for a in kv] + extra
    assert upscale.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err, err


def test_txt2img_sdsr_end_to_end_and_sweep(x4_ckpt, tiny_ckpts, tmp_path, capsys):
    txt2img = load_script("txt2img")
    sd2_config, sd2_ckpt = tiny_ckpts["sd2"]
    common = ["--config", sd2_config, "--ckpt", sd2_ckpt, "--prompt", "a house", "--steps", "1", "--method", "sdsr",
              "--sr_config", TINY_X4, "--sr_ckpt", x4_ckpt, "--sr_steps", "1", "--sr_noise_level", "50",
              "--H", "128", "--W", "128", "--seed", "3", "--scale", "1"]  # (guided base sampling: test_txt2img)
    out = tmp_path / "plain"
    assert txt2img.main([str(a) for a in [*common, "--outdir", out]]) == 0, capsys.readouterr().err
    im = Image.open(out / "samples/00000.png")
    assert im.size == (128, 128)
    params = json.loads(im.text["parameters"])
    assert params["method"] == "sdsr" and params["H"] == 128 and params["ckpt"] == "sd2.ckpt"
    sr = params["sdsr"]
    assert sr["base_size"] == [64, 64] and sr["upscaled_size"] == [256, 256] and sr["resized_to"] == [128, 128]
    assert sr["noise_level"] == 50 and sr["steps"] == 1 and sr["sr_ckpt"] == "x4.ckpt"
    # --sweep: the same pipeline, per-image generators, the final size in the manifest
    out = tmp_path / "sweep"
    assert txt2img.main([str(a) for a in [*common, "--outdir", out, "--sweep", "--sr_scale", "1"]]) == 0, \
        capsys.readouterr().err
    im = Image.open(out / "samples/000000_000.png")
    assert im.size == (128, 128)
    line = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert line["settings"]["sdsr"]["base_size"] == [64, 64] and line["settings"]["sdsr"]["scale"] == 1.0


@pytest.mark.parametrize("extra,needle", [
    (["--sr_noise_level", "50"], "add --method sdsr"),
    (["--method", "sdsr"], "needs --sr_ckpt"),
    (["--method", "sdsr", "--sr_ckpt", "X4", "--sr_config", TINY_SD2], "not an upscaler config"),
    (["--method", "sdsr", "--sr_ckpt", "SD2"], "SD 2.x checkpoint"),
    (["--method", "sdsr", "--sr_ckpt", "X4", "--H", "512", "--W", "512"], "upscales once"),
])
def test_txt2img_sdsr_errors(extra, needle, x4_ckpt, tiny_ckpts, tmp_path, capsys):
    txt2img = load_script("txt2img")
    sd2_config, sd2_ckpt = tiny_ckpts["sd2"]
    extra = [{"X4": x4_ckpt, "SD2": sd2_ckpt}.get(a, a) for a in extra]
    argv = ["--config", sd2_config, "--ckpt", sd2_ckpt, "--steps", "1", "--outdir", tmp_path / "o", "--H", "128",
            "--W", "128", *extra]
    if "--sr_config" not in extra:
        argv += ["--sr_config", TINY_X4] if "--method" in extra else []
    assert txt2img.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert needle in err, err


def test_txt2img_refuses_the_upscaler_as_base_model(x4_ckpt, tmp_path, capsys):
    txt2img = load_script("txt2img")
    assert txt2img.main([str(a) for a in ["--config", TINY_X4, "--ckpt", x4_ckpt, "--steps", "1", "--outdir",
                                          tmp_path / "o", "--H", "64", "--W", "64"]]) == 2
    assert "scripts/upscale.py" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the x4 upscaler with the samplers beyond DDIM


@pytest.fixture(scope="module")
def live_x4(tmp_path_factory):
    """Every weight drawn (the tiny checkpoints keep the UNet's zero output convolution: v would be 0)."""
    sd = make_ckpt.make_random_state_dict(OmegaConf.load(TINY_X4), seed=4, std=0.05)
    return load_model_from_config(OmegaConf.load(TINY_X4),
                                  make_ckpt.save_checkpoint(sd, tmp_path_factory.mktemp("x4live") / "x4.ckpt"))


def test_euler_follows_ddim_on_the_v_model_and_each_ends_as_derived(live_x4):
    """DDIM (eta 0) and Euler on DDIM's timesteps are the same first-order step in x/sqrt(alpha) and sigma, so on the
    v-parameterized upscaler the two runs feed the UNet the same latents at the same timesteps; they differ only in
    their last update, which is derived here from the last guided prediction v at timestep t (alpha = alphas_cumprod):
    x0 = sqrt(alpha_t) x_t - sqrt(1 - alpha_t) v, eps = sqrt(alpha_t) v + sqrt(1 - alpha_t) x_t;
    Euler ends at sigma 0 (x0), DDIM at alphas_cumprod[0] (sqrt(a0) x0 + sqrt(1 - a0) eps)."""
    model = live_x4
    calls, latents = [], []
    apply_model, decode = model.apply_model, model.decode_first_stage

    def recording(x, t, cond, *a, **k):
        out = apply_model(x, t, cond, *a, **k)
        calls[-1].append((x.double(), t.clone(), out.double()))
        return out

    def decoding(z, **k):
        latents.append(z.double())
        return decode(z, **k)
    model.apply_model, model.decode_first_stage = recording, decoding
    try:
        img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        noise = torch.randn(1, *Upscaler(model).latent_shape(16, 16), generator=torch.Generator().manual_seed(1))
        scale = 5.0
        for name in ("ddim", "euler"):
            calls.append([])
            Upscaler(model, steps=8, scale=scale, sampler=name)(img, "a cat", x_T=noise,
                                                                 generator=torch.Generator().manual_seed(3))
    finally:
        model.apply_model, model.decode_first_stage = apply_model, decode
    ddim, euler = calls
    assert len(ddim) == len(euler) == 8  # one batched call (unconditional, conditional) per step
    for (xd, td, _), (xe, te, _) in zip(ddim, euler):
        assert torch.equal(td, te)
        # float32 rounding of two algebraically equal updates over 8 steps, relative to the latent's size
        assert (xd - xe).abs().max() <= 1e-5 * xd.abs().max()
    ac = model.alphas_cumprod.double()
    for (x, t, out), z, a_end in ((ddim[-1], latents[0], ac[0]), (euler[-1], latents[1], None)):
        v_u, v_c = out.chunk(2)
        v = v_u + scale * (v_c - v_u)
        x_t, a = x.chunk(2)[0], ac[int(t[0])]
        x0 = a.sqrt() * x_t - (1 - a).sqrt() * v
        eps = a.sqrt() * v + (1 - a).sqrt() * x_t
        want = x0 if a_end is None else a_end.sqrt() * x0 + (1 - a_end).sqrt() * eps
        assert (z - want).abs().max() <= 1e-5 * want.abs().max()
    # the two last updates differ by far more than the tolerance: the checks above can tell DDIM's from Euler's
    assert (latents[0] - latents[1]).abs().max() > 10 * 1e-5 * latents[0].abs().max()


@pytest.mark.parametrize("sampler", ["dpmpp_2m_karras", "euler_a"])
def test_upscale_script_with_a_sampler(x4_ckpt, tmp_path, sampler):
    """scripts/upscale.py (x4) with --sampler: the PNG records it; flags that do not fit are refused first."""
    img = tmp_path / "low.png"
    Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8)).save(img)
    upscale = load_script("upscale")
    argv = ["--image", str(img), "--config", str(TINY_X4), "--ckpt", str(x4_ckpt), "--steps", "3", "--device", "cpu",
            "--prompt", "a cat", "--outdir", str(tmp_path / "out"), "--sampler", sampler]
    assert upscale.main(argv) == 0
    meta = json.loads(Image.open(tmp_path / "out" / "00000.png").text["parameters"])
    from ldm.samplers import sampler_class
    assert meta["sampler"] == sampler_class(sampler).label and meta["upscaler"]["sampler"] == sampler
    assert meta["upscaler"]["eta"] == (1.0 if sampler == "euler_a" else 0.0)


@pytest.mark.parametrize("flags,needle", [(["--sampler", "heun", "--eta", "0.5"], "draws no noise"),
                                          (["--spacing", "trailing"], "DDIM takes its own uniform timesteps")])
def test_upscale_sampler_flags_refused(x4_ckpt, tmp_path, capsys, flags, needle):
    img = tmp_path / "low.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    argv = ["--image", str(img), "--config", str(TINY_X4), "--ckpt", str(x4_ckpt), "--outdir", str(tmp_path / "out")]
    assert load_script("upscale").main(argv + flags) == 2
    assert needle in capsys.readouterr().err and not (tmp_path / "out").exists()
