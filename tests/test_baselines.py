"""Comparison methods: attention scaling (Jin et al.) and MultiDiffusion, against formulas and brute-force
re-computations, and end to end through scripts/txt2img.py --method."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import load_script
from ldm.methods import attention_scaling as AS
from ldm.methods import multidiffusion as MD
from ldm.modules.attention import CrossAttention
from ldm.unet_hooks.processors import installed

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# attention scaling


def test_scale_factor_formulas():
    n = 128 * 128  # a 64x64-latent level at 2x the side: area ratio 4
    assert AS.scale_factor(n, 4.0) == pytest.approx(math.sqrt(math.log(n) / math.log(n / 4)))
    assert AS.scale_factor(n, 4.0, "release") == pytest.approx(math.sqrt(math.log(n) / math.log(n / 2)))
    assert AS.scale_factor(4096, 1.0) == 1.0
    assert AS.scale_factor(n, 4.0) > AS.scale_factor(n, 4.0, "release") > 1.0
    with pytest.raises(ValueError):
        AS.scale_factor(n, 4.0, "paper")


def test_attention_scaling_is_scaled_softmax_attention():
    torch.manual_seed(0)
    attn = CrossAttention(16, heads=2, dim_head=8).eval()
    x, ctx = torch.randn(2, 36, 16), torch.randn(2, 5, 16)
    factor = AS.scale_factor(36, 9.0)
    with torch.no_grad():
        q, k, v = (t.reshape(2, -1, 2, 8).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x)))
        w = torch.softmax(factor * (q @ k.transpose(-1, -2)) / math.sqrt(8), dim=-1)
        want = attn.to_out((w @ v).transpose(1, 2).reshape(2, 36, 16))
        plain_cross = attn(x, context=ctx)
        with installed([(attn, AS.AttentionScaling(9.0))]):
            got = attn(x)
            cross = attn(x, context=ctx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(cross, plain_cross)


# ---------------------------------------------------------------------------------------------
# MultiDiffusion


def test_views_cover_everything_with_the_stride():
    for (h, w), win, stride in (((64, 64), 64, 8), ((96, 128), 64, 8), ((100, 70), 64, 8), ((40, 40), 64, 8),
                                ((256, 256), 128, 8)):
        vs = MD.views(h, w, (win, win), stride)
        cover = torch.zeros(h, w)
        for h0, h1, w0, w1 in vs:
            assert h1 - h0 == min(win, h) and w1 - w0 == min(win, w)
            cover[h0:h1, w0:w1] += 1
        assert cover.min() >= 1
        if (h - win) % stride == 0 and (w - win) % stride == 0 and h >= win and w >= win:  # the reference's grid
            assert len(vs) == ((h - win) // stride + 1) * ((w - win) // stride + 1)


class _WindowMean:
    """Stand-in model whose output is the mean of its (window) input, per batch element and channel, plus t/1000:
    a non-local function, so the averaging over overlapping windows is visible."""

    parameterization = "eps"

    def apply_model(self, x, t, cond):
        c = cond if torch.is_tensor(cond) else cond["crossattn"]
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x) + (t.float() / 1000).view(-1, 1, 1, 1) \
            + c.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_multidiffusion_averages_window_predictions():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 20, 28)
    t = torch.tensor([500, 500])
    cond, uncond = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    guide = MD.MultiDiffusionGuidance((12, 12), stride=4, window_batch=3)
    got = guide(_WindowMean(), x, t, cond, uncond, 7.0, 0)
    # brute force: every window position (the grid plus the flush last window), one window at a time
    value, count = torch.zeros_like(x), torch.zeros_like(x)
    starts_h = sorted(set(list(range(0, 20 - 12 + 1, 4)) + [20 - 12]))
    starts_w = sorted(set(list(range(0, 28 - 12 + 1, 4)) + [28 - 12]))
    for h0 in starts_h:
        for w0 in starts_w:
            win = x[:, :, h0:h0 + 12, w0:w0 + 12]
            e_c = win.mean(dim=(2, 3), keepdim=True) + 0.5 + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1)
            e_u = win.mean(dim=(2, 3), keepdim=True) + 0.5 + uncond.mean(dim=(1, 2)).view(-1, 1, 1, 1)
            value[:, :, h0:h0 + 12, w0:w0 + 12] += e_u + 7.0 * (e_c - e_u)
            count[:, :, h0:h0 + 12, w0:w0 + 12] += 1
    torch.testing.assert_close(got, value / count, rtol=1e-5, atol=1e-5)


def test_multidiffusion_with_one_window_is_plain_guidance():
    from ldm.models.diffusion.ddim import classifier_free_guidance
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    cond, uncond = torch.randn(1, 4, 5), torch.randn(1, 4, 5)
    got = MD.MultiDiffusionGuidance((16, 16))(_WindowMean(), x, t, cond, uncond, 5.0, 0)
    torch.testing.assert_close(got, classifier_free_guidance(_WindowMean(), x, t, cond, uncond, 5.0))


@pytest.fixture(scope="module")
def tiny_sdxl():
    from ldm.util import instantiate_from_config
    torch.manual_seed(0)
    return instantiate_from_config(OmegaConf.load(REPO / "configs/tiny/tiny-sdxl.yaml").model).eval()


def test_sdxl_window_conditioning_is_the_models_own_size_conditioning(tiny_sdxl):
    model = tiny_sdxl
    model.set_size_conditioning((256, 320))
    with torch.no_grad():
        full = model.get_learned_conditioning(["a corgi", "a cat"])["vector"]
        per_window = MD.SDXLWindowConditioning(model, (256, 320), f=8)
        # a window the size of the image at (0, 0): the image's own conditioning
        torch.testing.assert_close(per_window(full, (0, 32, 0, 40)), full)
        # a window at latent (5, 8), 16x16: original = the image, crop = (40, 64) px, target = 128x128 px
        model.set_size_conditioning((128, 128), original_size=(256, 320), crop_coords_top_left=(40, 64))
        want = model.get_learned_conditioning(["a corgi", "a cat"])["vector"]
        torch.testing.assert_close(per_window(full, (5, 21, 8, 24)), want)


# ---------------------------------------------------------------------------------------------
# end to end (tiny_ckpts: conftest.py)


@pytest.mark.parametrize("model", ["sd2", "sdxl"])
@pytest.mark.parametrize("method,extra,key", [
    ("attn_scale", ["--attn_scale_variant", "release"], {"variant": "release", "area_ratio": 4.0}),
    ("multidiffusion", ["--md_stride", "4"], {"window": [8, 8], "stride": 4}),
])
def test_txt2img_comparison_methods(tiny_ckpts, tmp_path, model, method, extra, key):
    config, ckpt = tiny_ckpts[model]
    txt2img = load_script("txt2img")
    code = txt2img.main([str(a) for a in ["--config", config, "--ckpt", ckpt, "--prompt", "a house", "--steps", "3",
                                          "--H", "128", "--W", "128", "--outdir", tmp_path, "--method", method,
                                          *extra]])
    assert code == 0
    im = Image.open(tmp_path / "samples/00000.png")
    params = json.loads(im.text["parameters"])
    assert im.size == (128, 128) and params["method"] == method
    assert {k: params[method][k] for k in key} == key
    if method == "multidiffusion":
        assert params[method]["sdxl_window_crops"] == (model == "sdxl")


# ---------------------------------------------------------------------------------------------
# DemoFusion


def test_demofusion_phases():
    from ldm.methods.demofusion import demofusion_stages
    assert demofusion_stages(2048, 2048, 1024) == [(1024, 1024), (2048, 2048)]
    assert demofusion_stages(4096, 4096, 1024) == [(1024, 1024), (2048, 2048), (3072, 3072), (4096, 4096)]
    assert demofusion_stages(2048, 4096, 1024) == [(512, 1024), (1024, 2048), (1536, 3072), (2048, 4096)]
    # the release truncates 2560 to 2048; here one more phase reaches the requested size
    assert demofusion_stages(2560, 2560, 1024) == [(1024, 1024), (2048, 2048), (2560, 2560)]


def test_demofusion_blur_is_the_gaussian_conv():
    from ldm.methods.demofusion import gaussian_blur_2d
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    k, sigma = 5, 0.7
    g = torch.tensor([math.exp(-((i - 2) ** 2) / (2 * sigma ** 2)) for i in range(k)], dtype=torch.float64)
    g = g / g.sum()
    want = torch.zeros_like(x)
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for a in range(k):
        for b in range(k):
            want += g[a] * g[b] * xp[:, :, a:a + 9, b:b + 11]
    torch.testing.assert_close(gaussian_blur_2d(x, k, sigma), want)


def test_demofusion_guidance_fuses_local_and_global_paths():
    """Brute force with the window-mean stand-in: local windows on the zero-padded latent (no jitter), global
    paths on the blurred, re-standardised sub-lattices, fused with c2 = cos_factor."""
    from ldm.methods.demofusion import DemoFusionGuidance, gaussian_blur_2d
    from ldm.methods.freescale.cascade import cosine_factor
    torch.manual_seed(2)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([700])
    cond, uncond = torch.randn(1, 4, 5), torch.randn(1, 4, 5)
    model = _WindowMean()
    guide = DemoFusionGuidance(2, window=8, stride=4, randint=None, sigma=0.8, view_batch=3)
    got = guide(model, x, t, cond, uncond, 4.0, 0)

    def cfg(inp):
        e_c = model.apply_model(inp, t, cond)
        e_u = model.apply_model(inp, t, uncond)
        return e_u + 4.0 * (e_c - e_u)
    j = (8 - 4) // 4
    xp = torch.nn.functional.pad(x, (j,) * 4)
    value, count = torch.zeros_like(xp), torch.zeros_like(xp)
    for h0 in (0, 4, 8):
        for w0 in (0, 4, 8):
            sl = (slice(None), slice(None), slice(h0 + j, h0 + j + 8), slice(w0 + j, w0 + j + 8))
            value[sl] += cfg(xp[sl])
            count[sl] += 1
    local = (value / count)[:, :, j:j + 16, j:j + 16]
    cf = cosine_factor(700)
    blurred = gaussian_blur_2d(x, 3, 0.8 * (0.99 * cf + 0.01))
    blurred = (blurred - blurred.mean()) / blurred.std() * x.std() + x.mean()
    glob = torch.zeros_like(x)
    for a in range(2):
        for b in range(2):
            glob[:, :, a::2, b::2] = cfg(blurred[:, :, a::2, b::2])
    torch.testing.assert_close(got, local * (1 - cf) + glob * cf, rtol=1e-5, atol=1e-5)


def test_demofusion_guidance_with_one_window_and_no_global_path_is_plain_guidance():
    """c2 = 0 (scale 1: no global path) and one window covering the latent (stride = window: no jitter)."""
    from ldm.methods.demofusion import DemoFusionGuidance
    from ldm.models.diffusion.ddim import classifier_free_guidance
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([300, 300])
    cond, uncond = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    got = DemoFusionGuidance(1, window=16, stride=16)(_WindowMean(), x, t, cond, uncond, 6.0, 0)
    assert torch.equal(got, classifier_free_guidance(_WindowMean(), x, t, cond, uncond, 6.0))


@pytest.mark.parametrize("model", ["sd2", "sdxl"])
def test_demofusion_with_one_phase_is_direct_sampling(tiny_ckpts, tmp_path, model):
    """At the base size DemoFusion has one phase (plain sampling, no skip residual): the same PNG as direct."""
    config, ckpt = tiny_ckpts[model]
    txt2img = load_script("txt2img")
    side = int(OmegaConf.load(config).model.params.image_size) * 8
    args = ["--config", config, "--ckpt", ckpt, "--prompt", "a house", "--steps", "3", "--H", side, "--W", side,
            "--seed", "5", "--skip_grid"]
    for method in ("direct", "demofusion"):
        assert txt2img.main([str(a) for a in args + ["--method", method, "--outdir", tmp_path / method]]) == 0
    a, b = Image.open(tmp_path / "direct/samples/00000.png"), Image.open(tmp_path / "demofusion/samples/00000.png")
    assert json.loads(b.text["parameters"])["demofusion"]["stages"] == [[side, side]]
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("model", ["sd2", "sdxl"])
def test_txt2img_demofusion(tiny_ckpts, tmp_path, model):
    config, ckpt = tiny_ckpts[model]
    txt2img = load_script("txt2img")
    args = ["--config", config, "--ckpt", ckpt, "--prompt", "a house", "--steps", "3", "--H", "128", "--W", "128",
            "--method", "demofusion", "--save_stages", "--seed", "3"]
    assert txt2img.main([str(a) for a in args + ["--outdir", tmp_path / "a"]]) == 0
    assert txt2img.main([str(a) for a in args + ["--outdir", tmp_path / "b"]]) == 0
    im = Image.open(tmp_path / "a/samples/00000.png")
    params = json.loads(im.text["parameters"])
    assert im.size == (128, 128) and params["method"] == "demofusion"
    assert params["demofusion"]["stages"] == [[64, 64], [128, 128]] and params["demofusion"]["stride"] == 4
    assert Image.open(tmp_path / "a/samples/00000-stage1.png").size == (64, 64)
    assert (tmp_path / "a/samples/00000.png").read_bytes() == (tmp_path / "b/samples/00000.png").read_bytes()


@pytest.mark.parametrize("setting", ["method:multidiffusion", "method:demofusion", "method:hidiffusion",
                                     "method:fouriscale"])
def test_demo_model_runs_the_comparison_settings(setting):
    from ldm.pipelines import demo
    model = demo.load_demo_model()
    imgs = demo.sample_images(model, ["a red circle"], [0], 64, setting, steps=3)
    assert len(imgs) == 1 and imgs[0].shape == (64, 64, 3)
    assert {s[3] for s in demo.COMPARISON_SETTINGS} >= {"method:multidiffusion", "method:demofusion",
                                                        "method:hidiffusion"}


def test_attention_scaling_on_the_demo_model_is_direct_sampling():
    """The demo UNet has no self-attention (cross-attention only), so attention scaling changes nothing: its
    demo row is direct sampling's."""
    from ldm.pipelines import demo
    model = demo.load_demo_model()
    direct = demo.sample_images(model, ["a red circle"], [4], 64, None, steps=3)
    scaled = demo.sample_images(model, ["a red circle"], [4], 64, "method:attn_scale", steps=3)
    assert np.array_equal(direct[0], scaled[0])
