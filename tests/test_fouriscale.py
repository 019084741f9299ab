"""FouriScale (--method fouriscale): masks against hand-computed values, the low-pass filter against an
independent numpy implementation of the release's construction, the schedule against its formula, Q/K sharing
against a brute-force attention, the guidance against direct inference and against ScaleCrafter's re-dilation,
and end to end through scripts/txt2img.py."""
import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO_ROOT, load_script
from ldm.methods import fouriscale as FS
from ldm.models.diffusion.ddim import DDIMSampler, classifier_free_guidance
from ldm.modules.attention import CrossAttention
from ldm.unet_hooks.processors import installed


# ---------------------------------------------------------------------------------------------
# masks, by hand


def _fft_order(positive, negative):
    """A mask in FFT bin order from its values at frequencies 0, 1, … and at −n/2 … −1."""
    return np.array(list(positive) + list(negative))


def test_ramp_mask_hand_computed():
    # n = 32, s = 2, stop band 0: half = 16, pass up to 16/2 + 1 = 9, ramp of 32 // 8 = 4 bins: .75 .5 .25 0
    got = FS.ramp_mask_1d(32, 2.0).numpy()
    pos = [1] * 10 + [.75, .5, .25] + [0] * 3                      # k = 0 … 15
    neg_release = [0] * 3 + [.25, .5, .75] + [1] * 10               # k = −16 … −1: the value at |k| − 1
    np.testing.assert_allclose(got, _fft_order(pos, neg_release), atol=1e-12)
    neg_sym = [0] * 4 + [.25, .5, .75] + [1] * 9                     # k = −16 … −1: the value at |k|
    np.testing.assert_allclose(FS.ramp_mask_1d(32, 2.0, kind="symmetric").numpy(), _fft_order(pos, neg_sym),
                               atol=1e-12)
    # weak: ramp over (s−1)·n // (2s) = 8 bins, from 1 at 9 to 1/8 at 16
    weak = FS.ramp_mask_1d(32, 2.0, weak=True).numpy()
    pos_w = [1] * 10 + [7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8]
    neg_w = [2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8] + [1] * 10      # k = −16 … −1 → values at 15 … 0
    np.testing.assert_allclose(weak, _fft_order(pos_w, neg_w), atol=1e-12)
    # SDXL's stop band 0.6: slope 0.4 / 4 per bin, floor 0.6
    xl = FS.ramp_mask_1d(32, 2.0, value=0.6).numpy()
    np.testing.assert_allclose(xl[:16], [1] * 10 + [.9, .8, .7, .6, .6, .6], atol=1e-12)
    # a fractional scale (progressive steps): n = 24, s = 1.5 → pass up to 12/1.5 + 1 = 9, ramp 3 bins
    np.testing.assert_allclose(FS.ramp_mask_1d(24, 1.5).numpy()[:12], [1] * 10 + [2 / 3, 1 / 3], atol=1e-12)
    # weak at s = 1.5: (0.5 · 24) // 3 = 4 bins
    np.testing.assert_allclose(FS.ramp_mask_1d(24, 1.5, weak=True).numpy()[:12], [1] * 10 + [.75, .5],
                               atol=1e-12)
    # ideal: a brick wall at half / s = 8
    ideal = FS.ramp_mask_1d(32, 2.0, value=0.25, kind="ideal").numpy()
    np.testing.assert_allclose(ideal, _fft_order([1] * 9 + [.25] * 7, [.25] * 8 + [1] * 8), atol=1e-12)


def test_masks_are_all_pass_at_scale_one_and_weak_mask_reaches_nyquist():
    for n in (7, 8, 16, 33):
        for kind in FS.FILTERS:
            assert bool((FS.ramp_mask_1d(n, 1.0, kind=kind) == 1).all())
            assert bool((FS.ramp_mask_1d(n, 1.0, weak=True, kind=kind) == 1).all())
    w = FS.ramp_mask_1d(64, 4.0, weak=True)  # R = 3·64 // 8 = 24: from 1 at 9, (9 − i)/24 + 1 at i
    assert float(w[31]) == pytest.approx(1 / 12) and float(w.min()) > 0


# ---------------------------------------------------------------------------------------------
# the low-pass filter, against an independent numpy implementation of the release's construction


def _np_profile(i, n_full, s, v, weak):
    """The ramp at |frequency| i (bins) of an n_full-point axis (the release's formula, written out)."""
    half = n_full // 2
    r = max(n_full // 8, 1) if not weak else math.floor((s - 1) * n_full / (2 * s))
    if r == 0:
        return 1.0
    return min(max((1 - v) / r * (half / s + 1 - i) + 1, v), 1.0)


def _np_release_mask(n_h, n_w, s_h, s_w, v, weak, symmetric=False):
    """The mask on the fftshift'ed spectrum. Release: the half-profiles' outer product, mirrored left and up
    (even sizes only). Symmetric: the profile at |k|, k = position − n//2."""
    if symmetric:
        ph = [_np_profile(abs(p - n_h // 2), n_h, s_h, v, weak) for p in range(n_h)]
        pw = [_np_profile(abs(p - n_w // 2), n_w, s_w, v, weak) for p in range(n_w)]
        return np.outer(ph, pw)
    ph = np.array([_np_profile(i, n_h, s_h, v, weak) for i in range(n_h // 2)])
    pw = np.array([_np_profile(i, n_w, s_w, v, weak) for i in range(n_w // 2)])
    m = np.outer(ph, pw)
    m = np.concatenate([m[:, ::-1], m], axis=1)
    return np.concatenate([m[::-1, :], m], axis=0)


def _np_lowpass(x, base_hw, scales, masks, v, symmetric=False):
    x = x.astype(np.float64)
    h, w = x.shape[-2:]
    r = max(math.ceil(h / base_hw[0]), math.ceil(w / base_hw[1]))
    ph, pw = int(base_hw[0] * r), int(base_hw[1] * r)
    xp = np.zeros(x.shape[:-2] + (ph, pw))
    xp[..., :h, :w] = x
    spec = np.fft.fftshift(np.fft.fft2(xp), axes=(-2, -1))
    nb = len(masks)
    spec = spec.reshape(nb, -1, *spec.shape[1:])
    for i, kind in enumerate(masks):
        spec[i] *= _np_release_mask(ph, pw, scales[0], scales[1], v, kind == "weak", symmetric)
    out = np.fft.ifft2(np.fft.ifftshift(spec.reshape(-1, *spec.shape[2:]), axes=(-2, -1))).real
    return out[..., :h, :w]


@pytest.mark.parametrize("shape,base,scales,value", [
    ((20, 28), (8, 8), (2.0, 2.0), 0.0),       # padded to 32 x 32 (r = 4)
    ((16, 24), (8, 8), (3.0, 3.0), 0.0),       # padded to 24 x 24 (r = 3)
    ((12, 12), (6.5, 9.0), (1.7, 1.7), 0.6),   # SDXL-like bucket base: padded to 13 x 18 → int() → odd 13…
    ((16, 16), (4, 4), (2.6, 2.6), 0.6),       # no padding, fractional progressive scale
])
def test_lowpass_matches_the_release_construction(shape, base, scales, value):
    torch.manual_seed(0)
    x = torch.randn(3 * 2, 3, *shape)
    masks = ("strong", "strong", "weak")
    ph, pw = FS.padded_size(*shape, *base)
    symmetric = ph % 2 == 1 or pw % 2 == 1  # the release cannot mirror odd sizes: compare the symmetric kind
    got = FS.lowpass(x, base, scales, masks, value, kind="symmetric" if symmetric else "release")
    want = _np_lowpass(x.numpy(), base, scales, masks, value, symmetric)
    assert got.shape == x.shape and got.dtype == x.dtype
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(want, x.numpy(), atol=1e-3)  # the filter does something here


def test_lowpass_removes_the_energy_above_the_cutoff():
    torch.manual_seed(1)
    x = torch.randn(1, 2, 32, 32, dtype=torch.float64)  # float64 stays float64
    for kind, stop_from in (("release", 14), ("symmetric", 13)):
        y = FS.lowpass(x, (32, 32), (2.0, 2.0), ("strong",), 0.0, kind)
        spec_x, spec_y = torch.fft.fft2(x), torch.fft.fft2(y)
        k = torch.fft.fftfreq(32, d=1 / 32).abs()
        kh, kw = k[:, None].expand(32, 32), k[None, :].expand(32, 32)
        stop = (kh >= stop_from) | (kw >= stop_from)  # past the ramp (pass to 9, ramp of 4 bins)
        passed = (kh <= 9) & (kw <= 9)
        assert spec_y[..., stop].abs().max() < 1e-9 * spec_x.abs().max()
        torch.testing.assert_close(spec_y[..., passed], spec_x[..., passed])
        assert spec_x[..., stop].abs().pow(2).sum() > 0.2 * spec_x.abs().pow(2).sum()  # there was energy to remove


def test_all_pass_is_the_identity():
    x = torch.randn(3, 2, 10, 14)
    assert FS.lowpass(x, (10, 14), (1.0, 1.0), ("strong", "strong", "weak")) is x


# ---------------------------------------------------------------------------------------------
# schedule, sizes, layers


def test_progressive_schedule_is_the_formula():
    d, start, stop = 4, 20, 35
    for step in range(50):
        got = FS.step_dilation(d, step, start, stop, progressive=True)
        if step >= stop:
            assert got is None
        elif step < start:
            assert got == 4.0
        else:
            assert got == pytest.approx(3 * (35 - step) / 15 + 1)
    assert FS.step_dilation(4, 27, 20, 35) == pytest.approx(2.6)
    assert FS.step_dilation(4, 34, 20, 35) == pytest.approx(1.2)
    assert FS.step_dilation(4, 34, 20, 35, progressive=False) == 4.0
    assert FS.step_dilation(2, 29, 10, 30) == pytest.approx(1.05)
    # conv dilations: ⌈d_i⌉, the SDXL weak branch ⌈max(d_i / 1.5, 1)⌉
    conv = FS.FouriConv(2.6, (8, 8), ("strong", "strong", "weak"), weak_dilation_div=1.5)
    assert conv.conv_dilation("strong") == 3 and conv.conv_dilation("weak") == 2
    assert FS.FouriConv(1.2, (8, 8), ("strong", "weak"), weak_dilation_div=1.5).conv_dilation("weak") == 1
    assert FS.FouriConv(1.05, (8, 8), ("strong", "weak")).conv_dilation("strong") == 2


def test_base_size_and_dilation():
    # SD: square base 512 (64 latent)
    assert FS.dilation_factor(1024, 1024, 512, 512) == 2
    assert FS.dilation_factor(1280, 1280, 512, 512) == 3
    assert FS.dilation_factor(1024, 2048, 512, 512) == 4
    # SDXL buckets (hand-checked): 2048² → 1024²; 2048x4096 → 704x1408 (×3, padding 64 + 128);
    # 2560² → 896x1088 (×3, padding 128 + 704 = 832, the first of the four buckets with 832)
    assert FS.choose_base(2048, 2048, 1024, "sdxl") == (1024, 1024, True)
    assert FS.choose_base(2048, 4096, 1024, "sdxl") == (704, 1408, True)
    assert FS.choose_base(2560, 2560, 1024, "sdxl") == (896, 1088, True)
    assert FS.dilation_factor(2560, 2560, 896, 1088) == 3
    assert FS.choose_base(4096, 4096, 1024, "sdxl") == (1024, 1024, True)
    assert FS.choose_base(128, 128, 64, "sdxl") == (64, 64, True)  # scaled to a 64-px base
    assert FS.choose_base(5120, 512, 1024, "sdxl") == (1024, 1024, False)  # no bucket fits: square
    assert FS.padded_size(20, 28, 8, 8) == (32, 32) and FS.padded_size(12, 12, 6.5, 9.0) == (13, 18)


def _release_sd_names():
    names = [f"down_blocks.{b}.resnets.{j}.conv{c}" for b in (2, 3) for j in range(2) for c in (1, 2)]
    names.insert(4, "down_blocks.2.downsamplers.0.conv")
    for b in range(3):
        names += [f"up_blocks.{b}.resnets.{j}.conv{c}" for j in range(3) for c in (1, 2)]
        names.append(f"up_blocks.{b}.upsamplers.0.conv")
    return names + [f"mid_block.resnets.{j}.conv{c}" for j in range(2) for c in (1, 2)]


def _release_sdxl_names():
    names = [f"down_blocks.2.resnets.{j}.conv{c}" for j in range(2) for c in (1, 2)]
    names += [f"up_blocks.0.resnets.{j}.conv{c}" for j in range(3) for c in (1, 2)] + ["up_blocks.0.upsamplers.0.conv"]
    names += [f"up_blocks.1.resnets.{j}.conv{c}" for j in range(3) for c in (1, 2)]
    return names + [f"mid_block.resnets.{j}.conv{c}" for j in range(2) for c in (1, 2)]


@pytest.fixture(scope="module")
def tiny_models():
    """The tiny SD2 model with every weight random (a fresh UNet's output conv is zero: eps = 0), and the tiny
    SDXL UNet (for its structure)."""
    from ldm.util import instantiate_from_config
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(REPO_ROOT / "configs/tiny/tiny-sd2.yaml").model).eval()
    with torch.no_grad():
        for p in model.model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    xl = instantiate_from_config(OmegaConf.load(REPO_ROOT / "configs/tiny/tiny-sdxl.yaml").model.params.unet_config)
    return {"sd2": model, "sdxl_unet": xl}


def test_layer_lists_are_the_releases(tiny_models):
    sd, xl = tiny_models["sd2"].model.diffusion_model, tiny_models["sdxl_unet"]
    assert sorted(FS.default_layers(sd, "sd")) == sorted(_release_sd_names()) and len(_release_sd_names()) == 34
    assert sorted(FS.default_layers(xl, "sdxl")) == sorted(_release_sdxl_names()) and len(_release_sdxl_names()) == 21
    layers = {diff: (level, conv) for _, diff, level, conv in FS.resolve_layers(sd, "sd")}
    assert layers["down_blocks.2.downsamplers.0.conv"][0] == 2 and layers["mid_block.resnets.0.conv1"][0] == 3
    assert layers["up_blocks.2.resnets.0.conv1"][0] == 1 and layers["up_blocks.0.upsamplers.0.conv"][0] == 2
    assert layers["down_blocks.2.downsamplers.0.conv"][1].stride == (2, 2)


# ---------------------------------------------------------------------------------------------
# processors


def test_dilation_one_all_pass_conv_is_the_conv_bit_for_bit():
    torch.manual_seed(2)
    for stride in (1, 2):
        conv = torch.nn.Conv2d(4, 6, 3, stride=stride, padding=1)
        x = torch.randn(6, 4, 12, 10)
        with torch.no_grad():
            assert torch.equal(FS.FouriConv(1, (6, 5), ("strong", "strong", "weak"))(conv, x), conv(x))


def test_fouri_conv_is_filter_then_dilated_conv():
    """SDXL-like: stop band 0.6, weak branch at ⌈3/1.5⌉ = 2, strong at 3; against numpy filter + F.conv2d."""
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(3 * 2, 3, 16, 16)
    proc = FS.FouriConv(3.0, (8, 8), ("strong", "strong", "weak"), stopband=0.6, weak_dilation_div=1.5)
    with torch.no_grad():
        got = proc(conv, x)
        filt = torch.from_numpy(_np_lowpass(x.numpy(), (8, 8), (3.0, 3.0), ("strong", "strong", "weak"), 0.6)).float()
        strong = torch.nn.functional.conv2d(filt[:4], conv.weight, conv.bias, padding=3, dilation=3)
        weak = torch.nn.functional.conv2d(filt[4:], conv.weight, conv.bias, padding=2, dilation=2)
    torch.testing.assert_close(got, torch.cat([strong, weak]), rtol=1e-4, atol=1e-4)
    # an upsampling conv: dilated, not filtered
    proc = FS.FouriConv(2.0, (8, 8), ("strong", "weak"), filter_input=False)
    with torch.no_grad():
        want = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=2, dilation=2)
        torch.testing.assert_close(proc(conv, x), want)


def test_shared_query_key_against_brute_force():
    torch.manual_seed(4)
    attn = CrossAttention(16, heads=2, dim_head=8).eval()
    b, n = 2, 12
    x = torch.randn(3 * b, n, 16)  # [uncond, strong, weak] branches, all different
    ctx = torch.randn(3 * b, 5, 16)
    with torch.no_grad():
        with installed([(attn, FS.SharedQueryKey(3))]):
            got = attn(x)
            cross = attn(x, context=ctx)
        plain, plain_cross = attn(x), attn(x, context=ctx)

        def heads(t):
            return t.reshape(t.shape[0], n, 2, 8).transpose(1, 2)
        q, k, v = heads(attn.to_q(x)), heads(attn.to_k(x)), heads(attn.to_v(x))
        q[2 * b:], k[2 * b:] = q[b:2 * b], k[b:2 * b]  # the weak branch's attention map is the strong one's
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
        attn_out = attn.to_out((p @ v).transpose(1, 2).reshape(3 * b, n, 16))
    torch.testing.assert_close(got, attn_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:2 * b], plain[:2 * b], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[2 * b:], plain[2 * b:], atol=1e-3)
    assert torch.equal(cross, plain_cross)  # cross-attention (to the text) is unchanged


# ---------------------------------------------------------------------------------------------
# guidance


def _settings(**kw):
    base = dict(dilation=1, base_hw=(8, 8), start_step=1, stop_step=3)
    base.update(kw)
    return FS.FouriScaleSettings(**base)


def test_dilation_one_equals_direct_inference_bit_for_bit(tiny_models):
    """At the base size (d = 1) every filter is all-pass and every conv runs at dilation 1. The fast path is
    direct inference bit for bit; the three-branch batch (``full_batch``, as the release runs it) is direct
    inference on that batch bit for bit ([uncond, cond, cond], guidance from the first and the last: CPU kernels
    round a batch of 3 differently from a batch of 2 in the last bits, so that is the exact reference)."""
    model = tiny_models["sd2"]
    unet = model.model.diffusion_model
    torch.manual_seed(5)
    cond, uncond = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    x_T = torch.randn(1, 4, 8, 8)
    sampler = DDIMSampler(model)

    def direct_on_three(model, x, t, c, u, scale, step):
        out = model.apply_model(torch.cat([x] * 3), torch.cat([t] * 3), torch.cat([u, c, c])).chunk(3)
        return out[0] + scale * (out[2] - out[0])

    def sample(guidance, x_T=x_T, steps=2):
        out, _ = sampler.sample(S=steps, batch_size=1, shape=tuple(x_T.shape[1:]), conditioning=cond, x_T=x_T,
                                verbose=False, unconditional_guidance_scale=5.0, unconditional_conditioning=uncond,
                                guidance=guidance)
        return out
    with torch.no_grad():
        direct = sample(None)
        assert direct.abs().max() > 0 and not torch.allclose(direct, x_T, atol=0.1)
        assert torch.equal(sample(FS.FouriScaleGuidance(unet, _settings(stop_step=1))), direct)
        full = sample(FS.FouriScaleGuidance(unet, _settings(full_batch=True, stop_step=1)))
        assert torch.equal(full, sample(direct_on_three))
        torch.testing.assert_close(full, direct, rtol=1e-4, atol=1e-4)
        # at twice the side the method acts
        x2 = torch.randn(1, 4, 16, 16)
        fouri2 = sample(FS.FouriScaleGuidance(unet, _settings(dilation=2, stop_step=1)), x2, 1)
        assert not torch.allclose(sample(None, x2, 1), fouri2, atol=1e-2)


def test_guidance_with_all_pass_filter_is_redilation_with_plain_cfg(tiny_models):
    """Stop band 1 (no filtering) and one dilation for all branches: the weak and strong branches are the same,
    so FouriScale guidance must equal plain CFG on a UNet whose listed convs run at ⌈d_i⌉ (ScaleCrafter's
    re-dilation processors, an independent path). With the filter on, it must not."""
    from ldm.unet_hooks.redilation import ReDilation
    model = tiny_models["sd2"]
    unet = model.model.diffusion_model
    torch.manual_seed(6)
    x, t = torch.randn(1, 4, 8, 24), torch.tensor([700])
    cond, uncond = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    settings = _settings(dilation=3, start_step=1, stop_step=4, stopband=1.0)
    guide = FS.FouriScaleGuidance(unet, settings)
    with torch.no_grad():
        for step, d in ((0, 3), (2, 3)):  # step 2: d_2 = 2·(4−2)/3 + 1 = 2.33 → conv at 3
            got = guide(model, x, t, cond, uncond, 5.0, step)
            with installed([(conv, ReDilation(d)) for _, _, _, conv in guide.layers]):
                want = classifier_free_guidance(model, x, t, cond, uncond, 5.0)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        after = guide(model, x, t, cond, uncond, 5.0, 4)  # from the stop step on: the original UNet
        assert torch.equal(after, classifier_free_guidance(model, x, t, cond, uncond, 5.0))
        filtered = FS.FouriScaleGuidance(unet, _settings(dilation=3, start_step=1, stop_step=4))
        assert not torch.allclose(filtered(model, x, t, cond, uncond, 5.0, 0), want, atol=1e-3)
        # amp guidance multiplies the scale before the start step only
        amp = FS.FouriScaleGuidance(unet, _settings(dilation=3, start_step=1, stop_step=4, stopband=1.0,
                                                    amp_guidance=2.4))
        with installed([(conv, ReDilation(3)) for _, _, _, conv in guide.layers]):
            want_amp = classifier_free_guidance(model, x, t, cond, uncond, 12.0)
        torch.testing.assert_close(amp(model, x, t, cond, uncond, 5.0, 0), want_amp, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# end to end (tiny_ckpts: conftest.py)


@pytest.mark.parametrize("model,extra", [("sd2", ["--fouri_filter", "symmetric"]),
                                         ("sdxl", ["--fouri_amp_guidance"])])
def test_txt2img_fouriscale(tiny_ckpts, tmp_path, model, extra):
    config, ckpt = tiny_ckpts[model]
    txt2img = load_script("txt2img")
    args = ["--config", config, "--ckpt", ckpt, "--prompt", "a house", "--steps", "3", "--H", "128", "--W", "128",
            "--outdir", tmp_path, "--method", "fouriscale", "--fouri_start_step", "1", "--fouri_stop_step", "2",
            "--skip_grid", *extra]
    assert txt2img.main([str(a) for a in args]) == 0
    im = Image.open(tmp_path / "samples/00000.png")
    params = json.loads(im.text["parameters"])
    fs = params["fouriscale"]
    assert im.size == (128, 128) and params["method"] == "fouriscale"
    assert fs["dilation"] == 2 and fs["start_step"] == 1 and fs["stop_step"] == 2 and fs["progressive"] is True
    if model == "sd2":
        assert fs["filter"] == "symmetric" and fs["stopband"] == 0.0 and fs["n_layers"] == 34
        assert fs["weak_dilation_div"] == 1.0 and fs["buckets"] == "square"
    else:
        assert fs["stopband"] == 0.6 and fs["weak_dilation_div"] == 1.5 and fs["amp_guidance"] == 2.4
        assert fs["n_layers"] == 21 and fs["base_px"] == [64.0, 64.0] and fs["size_cond"] == "base"
        assert params["size_conditioning"]["target_size_as_tuple"] == [64, 64]  # the base size, as released


def test_txt2img_fouriscale_sweep_and_preset_errors(tiny_ckpts, tmp_path):
    config, ckpt = tiny_ckpts["sd2"]
    txt2img = load_script("txt2img")
    common = ["--config", config, "--ckpt", ckpt, "--prompt", "a house", "--steps", "2", "--H", "64", "--W", "128"]
    assert txt2img.main([str(a) for a in common + ["--outdir", tmp_path / "s", "--method", "fouriscale",
                                                   "--sweep"]]) == 0
    im = Image.open(tmp_path / "s/samples/000000_000.png")
    assert im.size == (128, 64)
    params = json.loads(im.text["parameters"])
    assert params["fouriscale"]["dilation"] == 2 and params["fouriscale"]["stop_step"] == 1  # 60 % of 2 steps
    # FouriScale options without the method, and an SDXL preset on an SD model, are usage errors
    assert txt2img.main([str(a) for a in common + ["--outdir", tmp_path / "e", "--fouri_filter", "ideal"]]) == 2
    assert txt2img.main([str(a) for a in common + ["--outdir", tmp_path / "e", "--method", "fouriscale",
                                                   "--fouri_config", "configs/fouriscale/sdxl_2048x2048.yaml"]]) == 2


def test_presets_load_and_mirror_the_release():
    expected = {"sd1.5_1024x1024": (1024, 1024, 10, 30), "sd1.5_1280x1280": (1280, 1280, 10, 30),
                "sd1.5_2048x1024": (1024, 2048, 20, 35), "sd1.5_2048x2048": (2048, 2048, 20, 35),
                "sd2.1_1024x1024": (1024, 1024, 10, 30), "sd2.1_1280x1280": (1280, 1280, 10, 30),
                "sd2.1_2048x1024": (1024, 2048, 20, 35), "sd2.1_2048x2048": (2048, 2048, 20, 35),
                "sdxl_2048x2048": (2048, 2048, 20, 35), "sdxl_2560x2560": (2560, 2560, 20, 35),
                "sdxl_4096x2048": (2048, 4096, 20, 35), "sdxl_4096x4096": (4096, 4096, 20, 35)}
    for name, (h, w, start, stop) in expected.items():
        p = FS.load_preset(REPO_ROOT / f"configs/fouriscale/{name}.yaml")
        assert (p["height"], p["width"], p["start_step"], p["stop_step"], p["steps"]) == (h, w, start, stop, 50)
        assert p.get("progressive", True) is True
    demo = FS.load_preset(REPO_ROOT / "configs/fouriscale/demo_64x64.yaml")
    assert demo["base_model"] == "demo" and (demo["height"], demo["width"]) == (64, 64)


def test_demo_preset_runs_on_the_demo_model(tmp_path):
    txt2img = load_script("txt2img")
    args = ["--config", REPO_ROOT / "configs/demo/shapes32.yaml",
            "--ckpt", REPO_ROOT / "checkpoints/demo/shapes32.ckpt",
            "--prompt", "a red circle", "--steps", "4", "--ddim_eta", "1", "--scale", "3", "--method", "fouriscale",
            "--fouri_config", REPO_ROOT / "configs/fouriscale/demo_64x64.yaml", "--outdir", tmp_path, "--skip_grid"]
    assert txt2img.main([str(a) for a in args]) == 0
    im = Image.open(tmp_path / "samples/00000.png")
    params = json.loads(im.text["parameters"])["fouriscale"]
    assert im.size == (64, 64) and params["dilation"] == 2 and params["preset"].endswith("demo_64x64.yaml")
