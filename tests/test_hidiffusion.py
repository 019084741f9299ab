"""HiDiffusion (ldm/methods/hidiffusion.py): the windowed attention against brute force, the RAU-Net layers
against hand computations inside a real (tiny) UNet call, the step schedule against the release's formula,
"everything off" against direct sampling bit for bit, and end to end through scripts/txt2img.py."""
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from conftest import load_script
from ldm.methods import hidiffusion as HD
from ldm.models.diffusion.ddim import classifier_free_guidance
from ldm.modules.attention import CrossAttention
from ldm.unet_hooks.processors import call_original, installed
from tools.benchmark_modes import BareUNetModel
from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]


def _unet(name):
    cfg = OmegaConf.load(REPO / f"configs/tiny/tiny-{name}.yaml").model.params.unet_config
    torch.manual_seed(5)
    unet = instantiate_from_config(cfg).eval()
    with torch.no_grad():  # zero_module'd output layers would hide most of the UNet: give them weights
        for p in unet.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(0, 0.05)
    return unet


@pytest.fixture(scope="module")
def unets():
    return {"sd2": _unet("sd2"), "sdxl": _unet("sdxl")}


def _conds(name, batch=1):
    g = torch.Generator().manual_seed(11)
    if name == "sdxl":
        return ({"crossattn": torch.randn(batch, 5, 64, generator=g), "vector": torch.randn(batch, 1568, generator=g)},
                {"crossattn": torch.randn(batch, 5, 64, generator=g), "vector": torch.randn(batch, 1568, generator=g)})
    return torch.randn(batch, 5, 32, generator=g), torch.randn(batch, 5, 32, generator=g)


def _no_processors_left(unet):
    return all("forward" not in m.__dict__ for m in unet.modules())


# ---------------------------------------------------------------------------------------------
# processors on blocks (ldm/unet_hooks/processors.py)


def test_installed_wraps_a_block_and_its_child(unets):
    unet = unets["sd2"]
    block, child = unet.input_blocks[4], unet.input_blocks[4][1]  # TimestepEmbedSequential, SpatialTransformer
    calls = []

    def on_block(b, x, *args, **kwargs):
        calls.append("block")
        return call_original(b, x, *args, **kwargs) * 2

    def on_child(t, x, context=None):
        calls.append("child")
        return call_original(t, x, context) + 1

    x, emb, ctx = torch.randn(1, 32, 4, 4), torch.randn(1, 128), torch.randn(1, 5, 32)
    with torch.no_grad():
        plain = block(x, emb, ctx)
        with installed([(block, on_block), (child, on_child)]):
            got = block(x, emb, ctx)
    assert calls == ["block", "child"]
    torch.testing.assert_close(got, (plain + 1) * 2)
    assert _no_processors_left(unet)


# ---------------------------------------------------------------------------------------------
# MSW-MSA


def _attention(attn, x):
    """Softmax attention written out (no SDPA): q k^T / sqrt(d), per head."""
    b, n, _ = x.shape
    q, k, v = (t.reshape(b, n, attn.heads, attn.dim_head).transpose(1, 2)
               for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x)))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(attn.dim_head), dim=-1)
    return attn.to_out((w @ v).transpose(1, 2).reshape(b, n, attn.heads * attn.dim_head))


def test_windowed_attention_without_shift_is_attention_per_window():
    torch.manual_seed(0)
    attn = CrossAttention(16, heads=2, dim_head=8).eval()
    h, w = 6, 8
    x = torch.randn(2, h * w, 16)
    proc = HD.WindowedSelfAttention(lambda: (h, w), lambda: 0)
    with torch.no_grad():
        with installed([(attn, proc)]):
            got = attn(x).reshape(2, h, w, 16)
            ctx = torch.randn(2, 5, 16)
            cross = attn(x, context=ctx)
        want = torch.zeros_like(got)
        xm = x.reshape(2, h, w, 16)
        for r in (slice(0, 3), slice(3, 6)):
            for c in (slice(0, 4), slice(4, 8)):
                win = xm[:, r, c].reshape(2, -1, 16)
                want[:, r, c] = _attention(attn, win).reshape(2, 3, 4, 16)
        full = _attention(attn, x).reshape(2, h, w, 16)
        assert torch.equal(cross, attn(x, context=ctx))  # cross-attention untouched
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got - full).abs().max() > 1e-3  # windows are not global attention


def test_shift_is_roll_then_unroll():
    torch.manual_seed(1)
    attn = CrossAttention(16, heads=2, dim_head=8).eval()
    h, w = 8, 12                        # windows 4x6: shifts k * (1, 1)
    assert HD.shift_for(2, HD.window_size((h, w))) == (2, 2)
    x = torch.randn(1, h * w, 16)
    plain = HD.WindowedSelfAttention(lambda: (h, w), lambda: 0)
    shifted = HD.WindowedSelfAttention(lambda: (h, w), lambda: 2)
    with torch.no_grad():
        with installed([(attn, shifted)]):
            got = attn(x)
        rolled = torch.roll(x.reshape(1, h, w, 16), (-2, -2), dims=(1, 2)).reshape(1, h * w, 16)
        with installed([(attn, plain)]):
            want = torch.roll(attn(rolled).reshape(1, h, w, 16), (2, 2), dims=(1, 2)).reshape(1, h * w, 16)
        unshifted = attn(x)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, unshifted)
    # partition / reverse are inverse for every shift
    for k in range(4):
        s = HD.shift_for(k, HD.window_size((h, w)))
        assert torch.equal(HD.window_reverse(HD.window_partition(x, (h, w), s), (h, w), s), x)


def test_shift_values_and_odd_sizes():
    assert [HD.shift_for(k, (32, 48)) for k in range(4)] == [(0, 0), (8, 12), (16, 24), (24, 36)]
    assert HD.shift_for(3, (9, 13)) == (6, 9)          # (9 // 4) * 3, (13 // 4) * 3
    assert HD.shift_for(3, (3, 16)) == (0, 0)          # the release: no roll when the row shift is 0
    assert HD.window_size((7, 10)) == (4, 5)
    # odd side: resized (bicubic) to twice the window, and back
    attn = CrossAttention(16, heads=2, dim_head=8).eval()
    x = torch.randn(1, 5 * 8, 16)
    proc = HD.WindowedSelfAttention(lambda: (5, 8), lambda: 1)
    with torch.no_grad(), installed([(attn, proc)]), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = attn(x)
        attn(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert sum("does not split into 2x2 windows" in str(w.message) for w in caught) == 1  # once


def test_window_shifts_are_seeded_per_run_seed_and_step(unets):
    unet = unets["sd2"]

    def guide_draws(seed, step):
        g = HD.HiDiffusionGuidance(unet, 10, 8, apply_raunet=False, seed=seed)
        g._rng = torch.Generator().manual_seed(HD.shift_seed(seed, step))
        return [g._draw() for _ in range(40)]
    a, b = guide_draws(3, 5), guide_draws(3, 5)
    assert a == b and set(a) == {0, 1, 2, 3}
    assert guide_draws(4, 5) != a and guide_draws(3, 6) != a
    # the same seed gives the same UNet output, another seed another one
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([600])
    cond, _ = _conds("sd2")
    outs = []
    with torch.no_grad():
        for seed in (3, 3, 4):
            g = HD.HiDiffusionGuidance(unet, 10, 8, apply_raunet=False, seed=seed)
            outs.append(g(BareUNetModel(unet), x, t, cond, None, 1.0, 2))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


# ---------------------------------------------------------------------------------------------
# the step schedule


def test_presets_by_latent_size():
    assert HD.preset_name("sd", (128, 128), 64) == "sd15_1024"
    assert HD.preset_name("sd", (256, 256), 64) == "sd15_2048"
    assert HD.preset_name("sd", (256, 128), 64) == "sd15_1024"  # the release: either side below 256
    assert HD.preset_name("sdxl", (256, 256), 128) == "sdxl_2048"
    assert HD.preset_name("sdxl", (512, 512), 128) == "sdxl_4096"
    assert HD.SWITCHING_RATIOS == {"sd15_1024": (0.4, 0.0), "sd15_2048": (0.7, 0.3),
                                   "sdxl_2048": (0.4, 0.0), "sdxl_4096": (0.7, 0.3)}


@pytest.mark.parametrize("steps", [1, 7, 10, 25, 30, 50, 77])
def test_step_schedule_is_the_release_formula(steps):
    # the release: active while the counter is below T = int(steps * ratio); SDXL's aggressive RAU-Net: the
    # downsampler while below int(8 / 50 * steps), the cross-attention blocks from there to int(steps * T1)
    for arch, t1, t2, aggressive in (("sd", 0.4, 0.0, False), ("sd", 0.7, 0.3, False),
                                     ("sdxl", 0.4, 0.0, True), ("sdxl", 0.7, 0.3, False), ("sdxl", 0.55, 0.2, False)):
        s = HD.step_schedule(arch, steps, t1, t2, aggressive)
        for i in range(steps):
            rad = s["rad"][0] <= i < s["rad"][1]
            pool = s["pool"][0] <= i < s["pool"][1]
            if arch == "sd":
                assert rad == (i < int(steps * t1)) and pool == (i < int(steps * t2))
            elif aggressive:
                assert rad == (i < int(8 / 50 * steps))
                assert pool == (int(8 / 50 * steps) <= i < int(steps * t1))
            else:
                assert pool == (i < int(steps * t1)) and rad == (i < int(steps * t2))
    if steps == 50:
        assert HD.step_schedule("sd", 50, 0.7, 0.3) == {"rad": (0, 35), "pool": (0, 15)}
        assert HD.step_schedule("sdxl", 50, 0.4, 0.0, True) == {"rad": (0, 8), "pool": (8, 20)}
        assert HD.step_schedule("sdxl", 50, 0.7, 0.3) == {"rad": (0, 15), "pool": (0, 35)}
    with pytest.raises(ValueError):
        HD.step_schedule("sd", steps, 0.4, 0.0, aggressive=True)


@pytest.mark.parametrize("name,latent,rad,pool", [
    ("sd2", (32, 32), (0, 7), (0, 3)),       # 4x the tiny training latent (8): the "2048" preset
    ("sd2", (16, 16), (0, 4), (0, 0)),
    ("sdxl", (16, 16), (0, 1), (1, 4)),      # aggressive: int(8/50 * 10) = 1
    ("sdxl", (32, 32), (0, 3), (0, 7)),
])
def test_guidance_installs_the_scheduled_processors(unets, name, latent, rad, pool):
    unet = unets[name]
    mods = HD.hidiffusion_modules(unet)
    seen = []

    class Spy:
        def apply_model(self, x, t, c):
            seen.append(("forward" in mods.rad_conv.__dict__, "forward" in mods.pool_block.__dict__,
                         "forward" in mods.unpool_block.__dict__,
                         all("forward" in m.__dict__ for m in mods.window_transformers)))
            return x
    g = HD.HiDiffusionGuidance(unet, 10, 8, seed=0)
    x = torch.zeros(1, 4, *latent)
    for step in range(10):
        g(Spy(), x, torch.tensor([999 - 100 * step]), None, None, 1.0, step)
    assert seen == [(rad[0] <= i < rad[1], pool[0] <= i < pool[1], pool[0] <= i < pool[1], True) for i in range(10)]
    assert _no_processors_left(unet)
    d = g.describe(latent)
    assert (tuple(d["rad_steps"]), tuple(d["pool_steps"])) == (rad, pool)


# ---------------------------------------------------------------------------------------------
# RAU-Net inside a UNet call


def _capture(modules):
    """Forward hooks recording (input, output) of named modules; returns (records, handles)."""
    rec, handles = {}, []
    for name, m in modules.items():
        handles.append(m.register_forward_hook(lambda mod, args, out, n=name: rec.__setitem__(n, (args[0], out))))
    return rec, handles


def _rad_by_taps(x, weight, bias):
    """A 3x3 conv with stride 4, dilation 2, padding 2, as a sum over its taps (no conv call)."""
    xp = F.pad(x, (2, 2, 2, 2))
    ho, wo = (x.shape[-2] + 4 - 5) // 4 + 1, (x.shape[-1] + 4 - 5) // 4 + 1
    out = bias.view(1, -1, 1, 1).expand(x.shape[0], -1, ho, wo).clone()
    for a in range(3):
        for b in range(3):
            patch = xp[:, :, 2 * a: 2 * a + 4 * (ho - 1) + 1: 4, 2 * b: 2 * b + 4 * (wo - 1) + 1: 4]
            out += torch.einsum("oi,bihw->bohw", weight[:, :, a, b], patch)
    return out


def test_raunet_sd_layers_against_hand_computation(unets):
    unet = unets["sd2"]
    ub, ib = unet.output_blocks, unet.input_blocks
    rec, handles = _capture({"rad": ib[3][0].op, "pool": ib[4], "pool_inner": ib[4][1], "unpool": ub[7],
                             "unpool_inner": ub[7][1], "up": ub[8][2], "in5": ib[5], "out6": ub[6]})
    g = HD.HiDiffusionGuidance(unet, 10, 8, apply_window_attn=False, t1_ratio=0.7, t2_ratio=0.3)
    x = torch.randn(1, 4, 16, 24)  # step 0: RAD conv and pool pair
    cond, _ = _conds("sd2")
    try:
        with torch.no_grad():
            out = g(BareUNetModel(unet), x, torch.tensor([900]), cond, None, 1.0, 0)
    finally:
        for h in handles:
            h.remove()
    assert out.shape == x.shape
    rad_in, rad_out = rec["rad"]
    assert rad_in.shape[-2:] == (16, 24) and rad_out.shape[-2:] == (4, 6)  # 4x down
    torch.testing.assert_close(rad_out, _rad_by_taps(rad_in, ib[3][0].op.weight, ib[3][0].op.bias),
                               rtol=1e-4, atol=1e-5)
    inner = rec["pool_inner"][1]
    assert inner.shape[-2:] == (4, 6)
    torch.testing.assert_close(rec["pool"][1], inner.reshape(*inner.shape[:2], 2, 2, 3, 2).mean(dim=(3, 5)))
    assert rec["in5"][1].shape[-2:] == (2, 3) and rec["out6"][1].shape[-2:] == (2, 3)
    torch.testing.assert_close(rec["unpool"][1], F.interpolate(rec["unpool_inner"][1], size=(4, 6), mode="bicubic"))
    assert rec["unpool"][1].shape[-2:] == (4, 6)
    # the mirror upsampler: nearest 4x to the skip's size, then its own conv
    up_in, up_out = rec["up"]
    conv = ub[8][2].conv
    near = up_in.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    torch.testing.assert_close(up_out, F.conv2d(near, conv.weight, conv.bias, padding=1), rtol=1e-4, atol=1e-5)
    assert _no_processors_left(unet)


def test_raunet_sdxl_shapes(unets):
    unet = unets["sdxl"]
    ib, ub = unet.input_blocks, unet.output_blocks
    names = {f"in{i}": b for i, b in enumerate(ib)} | {f"out{i}": b for i, b in enumerate(ub)}
    g = HD.HiDiffusionGuidance(unet, 10, 8)  # 16x16: sdxl_2048, aggressive: RAD at step 0, pool at 1..3
    cond, _ = _conds("sdxl")
    x = torch.randn(1, 4, 16, 16)
    got = {}
    for step in (0, 1, 5):
        rec, handles = _capture(names)
        try:
            with torch.no_grad():
                out = g(BareUNetModel(unet), x, torch.tensor([500]), cond, None, 1.0, step)
        finally:
            for h in handles:
                h.remove()
        assert out.shape == x.shape
        got[step] = [tuple(rec[f"in{i}"][1].shape[-2:]) for i in range(9)] + \
                    [tuple(rec[f"out{i}"][1].shape[-2:]) for i in range(9)]
    s16, s8, s4, s2 = (16, 16), (8, 8), (4, 4), (2, 2)
    assert got[0] == [s16, s16, s16, s8, s8, s8, s2, s2, s2] + [s2, s2, s8, s8, s8, s16, s16, s16, s16]
    assert got[1] == [s16, s16, s16, s8, s4, s4, s2, s2, s2] + [s2, s2, s4, s4, s8, s16, s16, s16, s16]
    assert got[5] == [s16, s16, s16, s8, s8, s8, s4, s4, s4] + [s4, s4, s8, s8, s8, s16, s16, s16, s16]


# ---------------------------------------------------------------------------------------------
# off = direct


@pytest.mark.parametrize("name", ["sd2", "sdxl"])
def test_everything_off_is_plain_guidance_bit_for_bit(unets, name):
    unet = unets[name]
    model = BareUNetModel(unet)
    cond, uncond = _conds(name)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([700])
    with torch.no_grad():
        want = classifier_free_guidance(model, x, t, cond, uncond, 6.0)
        for kw in ({"apply_raunet": False, "apply_window_attn": False},
                   {"t1_ratio": 0.0, "t2_ratio": 0.0, "apply_window_attn": False, "aggressive": False}):
            g = HD.HiDiffusionGuidance(unet, 10, 8, **kw)
            assert torch.equal(g(model, x, t, cond, uncond, 6.0, 0), want)
        changed = HD.HiDiffusionGuidance(unet, 10, 8)(model, x, t, cond, uncond, 6.0, 0)
    assert not torch.allclose(changed, want)  # the defaults do change it


def test_bad_settings():
    unet = _unet("sd2")
    with pytest.raises(ValueError, match="ratio"):
        HD.HiDiffusionGuidance(unet, 10, 8, t1_ratio=1.5)
    with pytest.raises(ValueError, match="aggressive"):
        HD.HiDiffusionGuidance(unet, 10, 8, aggressive=True)


def test_reduced_mapping_on_the_demo_unet():
    """One ResBlock per level and no self-attention (the demo model): the RAD conv on level 0's downsampler with
    SD's schedule, no pool pair, no windows (with a warning); the RAD step equals the UNet with that conv run
    at stride 4 / dilation 2 / padding 2 by hand."""
    torch.manual_seed(0)
    demo = instantiate_from_config(OmegaConf.load(REPO / "configs/demo/shapes32.yaml").model.params.unet_config).eval()
    m = HD.hidiffusion_modules(demo)
    assert m.names["rad_conv"] == "input_blocks.2.0.op" and m.pool_block is None and m.window_transformers == []
    with pytest.warns(Warning, match="no self-attention"):
        g = HD.HiDiffusionGuidance(demo, 10, 32)
    # a 64² latent is 2x the demo's 32²: the "sd15_1024" preset, RAD conv for steps [0, int(0.4 * 10))
    assert g.processors(0, (64, 64)) == [(demo.input_blocks[2][0].op, HD.rad_conv)]
    assert g.processors(3, (64, 64)) != [] and g.processors(4, (64, 64)) == []
    conv = demo.input_blocks[2][0].op
    x = torch.randn(1, 3, 64, 64)
    t = torch.tensor([500])
    ctx = torch.randn(1, 4, 64)
    with torch.no_grad():
        with installed([(conv, HD.rad_conv)]):
            got = demo(x, t, context=ctx)
        conv.forward = lambda inp: torch.nn.functional.conv2d(inp, conv.weight, conv.bias, stride=4, padding=2,
                                                              dilation=2)
        try:
            want = demo(x, t, context=ctx)
        finally:
            del conv.forward
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# end to end


def _run(args):
    return load_script("txt2img").main([str(a) for a in args])


def _params(path):
    im = Image.open(path)
    return im, json.loads(im.text["parameters"])


@pytest.mark.parametrize("model", ["sd2", "sdxl"])
def test_txt2img_hidiffusion_metadata(tiny_ckpts, tmp_path, model):
    config, ckpt = tiny_ckpts[model]
    assert _run(["--config", config, "--ckpt", ckpt, "--prompt", "a house", "--steps", "3", "--H", "128", "--W",
                 "128", "--seed", "5", "--outdir", tmp_path, "--method", "hidiffusion"]) == 0
    im, params = _params(tmp_path / "samples/00000.png")
    assert im.size == (128, 128) and params["method"] == "hidiffusion"
    hd = params["hidiffusion"]
    assert hd["raunet"] and hd["window_attn"] and hd["shift_seed"] == 5 and hd["steps"] == 3
    if model == "sd2":  # T1 = int(3 * 0.4) = 1
        assert (hd["preset"], hd["rad_conv"], hd["rad_steps"], hd["pool_steps"]) == \
            ("sd15_1024", "input_blocks.3.0.op", [0, 1], [0, 0])
        assert hd["window_transformers"] == ["input_blocks.1.1", "input_blocks.2.1", "output_blocks.9.1",
                                             "output_blocks.10.1", "output_blocks.11.1"]
    else:  # aggressive: int(8/50 * 3) = 0, T1 = 1
        assert (hd["preset"], hd["aggressive"], hd["pool_block"], hd["unpool_block"], hd["rad_steps"],
                hd["pool_steps"]) == ("sdxl_2048", True, "input_blocks.4", "output_blocks.4", [0, 0], [0, 1])


@pytest.fixture(scope="module")
def weighted_sd2_ckpt(tmp_path_factory):
    """The tiny SD 2 model with every weight drawn (tiny_ckpts keeps the UNet's zero-initialised output conv, so
    its noise prediction is 0 whatever the method)."""
    make = load_script("make_random_checkpoint")
    config = REPO / "configs/tiny/tiny-sd2.yaml"
    sd = make.make_random_state_dict(OmegaConf.load(config), seed=3, std=0.05)
    return config, make.save_checkpoint(sd, tmp_path_factory.mktemp("hd") / "sd2w.ckpt")


def test_txt2img_hidiffusion_off_is_direct_and_runs_repeat(weighted_sd2_ckpt, tmp_path):
    config, ckpt = weighted_sd2_ckpt
    base = ["--config", config, "--ckpt", ckpt, "--prompt", "a house", "--steps", "3", "--H", "128", "--W", "128",
            "--seed", "5", "--ddim_eta", "1", "--skip_grid"]
    hd = ["--method", "hidiffusion", "--hidiff_T1_ratio", "0.7", "--hidiff_T2_ratio", "0.4"]
    assert _run(base + hd + ["--outdir", tmp_path / "a"]) == 0
    assert _run(base + hd + ["--outdir", tmp_path / "b"]) == 0
    assert _run(base + ["--outdir", tmp_path / "off", "--method", "hidiffusion", "--no-hidiff_raunet",
                        "--no-hidiff_window_attn"]) == 0
    assert _run(base + ["--outdir", tmp_path / "direct"]) == 0
    a, params = _params(tmp_path / "a/samples/00000.png")
    assert (params["hidiffusion"]["rad_steps"], params["hidiffusion"]["pool_steps"]) == ([0, 2], [0, 1])
    assert (tmp_path / "a/samples/00000.png").read_bytes() == (tmp_path / "b/samples/00000.png").read_bytes()
    off, p_off = _params(tmp_path / "off/samples/00000.png")
    direct = np.asarray(Image.open(tmp_path / "direct/samples/00000.png"))
    assert not p_off["hidiffusion"]["raunet"] and not p_off["hidiffusion"]["window_attn"]
    assert np.array_equal(np.asarray(off), direct)
    assert np.abs(np.asarray(a).astype(int) - direct).max() > 8


def test_txt2img_hidiffusion_sweep(tiny_ckpts, tmp_path):
    config, ckpt = tiny_ckpts["sd2"]
    assert _run(["--config", config, "--ckpt", ckpt, "--prompt", "a house", "--steps", "2", "--H", "128", "--W", "128",
                 "--method", "hidiffusion", "--no-hidiff_raunet", "--outdir", tmp_path, "--sweep",
                 "--n_samples", "2"]) == 0
    im, params = _params(tmp_path / "samples/000000_001.png")
    assert im.size == (128, 128) and params["hidiffusion"]["raunet"] is False
