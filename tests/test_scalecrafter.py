"""Re-dilation, the per-step plan, the released presets, noise-damped CFG and FreeU."""
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.unet_hooks.freeu import fourier_filter, freeu
from ldm.methods.scalecrafter.guidance import ScaleCrafterGuidance
from ldm.unet_hooks.layers import LayerNames, conv_table
from ldm.methods.scalecrafter.plan import LayerSchedule, ScaleCrafterPlan
from ldm.methods.scalecrafter.presets import SettingsError, plan_from_flags, plan_from_preset, read_settings_file
from ldm.unet_hooks.redilation import Dispersion, ReDilation, installed
from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "configs" / "scalecrafter"

TINY = dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2], num_res_blocks=2,
            channel_mult=[1, 2, 2, 2], use_spatial_transformer=True, context_dim=16, num_head_channels=8,
            use_linear_in_transformer=True, legacy=False)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    unet = UNetModel(**TINY).eval()
    with torch.no_grad():  # the zero-initialised output convs would hide everything
        for name, p in unet.named_parameters():
            if p.dim() >= 2 and p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return unet


def meta_unet(config):
    cfg = OmegaConf.load(REPO / "configs/stable-diffusion" / config).model.params.unet_config
    with torch.device("meta"):
        return instantiate_from_config(cfg)


# ---------------------------------------------------------------------------------------------
# the convolution itself

def zero_inserted(weight, d):
    """The kernel a dilation-d conv effectively uses, built explicitly (independent of F.conv2d's dilation)."""
    o, i, k, _ = weight.shape
    big = torch.zeros(o, i, d * (k - 1) + 1, d * (k - 1) + 1, dtype=weight.dtype)
    big[:, :, ::d, ::d] = weight
    return big


@pytest.mark.parametrize("d", [1, 2, 3, 4])
@pytest.mark.parametrize("stride", [1, 2])
def test_integer_redilation_is_dilated_conv(d, stride):
    conv = nn.Conv2d(5, 6, 3, stride=stride, padding=1)
    x = torch.randn(2, 5, 17, 22)
    with torch.no_grad(), installed([(conv, ReDilation(d))]):
        got = conv(x)
    want = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=d, dilation=d)
    explicit = F.conv2d(x, zero_inserted(conv.weight, d), conv.bias, stride=stride, padding=d)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got, explicit, rtol=1e-5, atol=1e-5)
    assert got.shape == conv(x).shape  # sizes stay


@pytest.mark.parametrize("factor", [1.5, 2.5, 3.2])
def test_fractional_redilation_follows_paper_formula(factor):
    conv = nn.Conv2d(4, 3, 3, padding=1)
    x = torch.randn(1, 4, 20, 26)
    with torch.no_grad(), installed([(conv, ReDilation(factor))]):
        got = conv(x)
    # f_d(h) = interp_{1/s}(interp_s(h) ⊗ Φ_⌈d⌉(k)), s = ⌈d⌉/d, computed with an explicitly dilated kernel
    D = math.ceil(factor)
    s = D / factor
    up = F.interpolate(x, size=(round(20 * s), round(26 * s)), mode="bilinear", align_corners=False)
    y = F.conv2d(up, zero_inserted(conv.weight, D), conv.bias, padding=D)
    want = F.interpolate(y, size=(20, 26), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert (got - conv(x)).abs().max() > 1e-3  # it did something


def test_processor_uninstalls_and_never_copies_weights(monkeypatch):
    unet = tiny_unet()
    ptrs = {k: v.data_ptr() for k, v in unet.state_dict().items()}
    plan = plan_from_flags(unet, 2, 5, 0)
    convs = {id(m) for m, _ in plan.processors(0)}
    seen = []
    real = F.conv2d

    def spy(x, w, *a, **k):
        seen.append(w)
        return real(x, w, *a, **k)

    monkeypatch.setattr(F, "conv2d", spy)
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 3, 16)
    with torch.no_grad(), installed(plan.processors(0)):
        unet(x, t, context=c)
    weights = {id(m.weight) for m in unet.modules() if isinstance(m, nn.Conv2d) and id(m) in convs}
    assert weights and weights <= {id(w) for w in seen}  # the convs used their own weight tensors
    assert {k: v.data_ptr() for k, v in unet.state_dict().items()} == ptrs
    assert all("forward" not in m.__dict__ for m in unet.modules())  # processors removed


def test_off_is_bit_identical_to_the_original_unet():
    unet = tiny_unet()
    x, t, c = torch.randn(2, 4, 16, 24), torch.tensor([10, 900]), torch.randn(2, 3, 16)
    with torch.no_grad():
        plain = unet(x, t, context=c)
        plan = plan_from_flags(unet, 2, 10, 0)
        with installed(plan.processors(10)):  # step == tau: nothing active
            off = unet(x, t, context=c)
        with installed(plan.processors(0)):
            on = unet(x, t, context=c)
        after = unet(x, t, context=c)
    assert torch.equal(plain, off) and torch.equal(plain, after)
    assert (on - plain).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# names and released settings

# hand-written correspondences of the released diffusers names on the SD 1.x/2.x UNet
KNOWN_NAMES = {
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.1.resnets.1.conv2": "input_blocks.5.0.out_layers.3",
    "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
    "down_blocks.3.resnets.0.conv1": "input_blocks.10.0.in_layers.2",
    "mid_block.resnets.0.conv2": "middle_block.0.out_layers.3",
    "mid_block.resnets.1.conv1": "middle_block.2.in_layers.2",
    "up_blocks.0.resnets.2.conv1": "output_blocks.2.0.in_layers.2",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",  # no attention at the deepest level
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",  # after the transformer
    "up_blocks.2.resnets.0.conv1": "output_blocks.6.0.in_layers.2",
    "up_blocks.3.resnets.2.conv2": "output_blocks.11.0.out_layers.3",
}


def test_diffusers_names_map_onto_the_unet():
    unet = meta_unet("v2-inference.yaml")
    names = LayerNames(unet)
    for diff, own in KNOWN_NAMES.items():
        assert names.resolve(diff) == own
        assert names.module(own).kernel_size == (3, 3)
    released = [line.strip() for line in (PRESETS / "settings/dilate_settings/all_valid_convs.txt").read_text().split()]
    assert sorted(released) == sorted(d for _, d, _ in conv_table(unet))


def _parse(path):
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            name, f = line.strip().split(":")
            out[name] = float(f)
    return out


SD_PRESETS = sorted(p.name for p in PRESETS.glob("sd[12].*.yaml"))


@pytest.mark.parametrize("preset", SD_PRESETS)
def test_released_presets_resolve_with_their_schedules(preset):
    cfg = OmegaConf.load(PRESETS / preset)
    unet = meta_unet("v1-inference.yaml" if preset.startswith("sd1") else "v2-inference.yaml")
    names = LayerNames(unet)
    plan = plan_from_preset(unet, PRESETS / preset)
    released = {names.resolve(k): v for k, v in _parse(PRESETS / cfg.dilate_settings).items()}
    tau = cfg.dilate_tau
    assert tau == plan.dilate.tau and len(released) == len(plan.dilate.factors)

    def expected(base, i):
        if i >= tau:
            return None
        return float(max(math.ceil(base * (tau - i) / tau), 2)) if cfg.progressive else base

    for step in (0, tau - 1, tau):
        got = plan.dilate.at(step)
        want = {k: expected(v, step) for k, v in released.items() if expected(v, step) is not None}
        assert got == want, (preset, step)
    if cfg.progressive:
        assert set(plan.dilate.at(tau - 1).values()) == {2.0}
    # noise-damped guidance exactly where the preset turns it on
    assert (plan.ndcfg is not None) == (bool(cfg.get("ndcfg_dilate_settings")) and cfg.ndcfg_tau > 0)
    if plan.ndcfg is not None:
        assert plan.describe(cfg.ndcfg_tau - 1, "ndcfg") and not plan.describe(cfg.ndcfg_tau, "ndcfg")
    # dispersion is applied (unlike the released inflate_tau: 0)
    if cfg.get("disperse_settings"):
        d = plan.describe(0)
        assert sum(v.startswith("Dispersion") for v in d.values()) == len(plan.disperse_layers) > 0
        assert not any(v.startswith("Dispersion") for v in plan.describe(cfg.disperse_tau).values())


def test_sd21_2048x1024_keeps_the_released_ndcfg_off():
    plan = plan_from_preset(meta_unet("v2-inference.yaml"), PRESETS / "sd2.1_2048x1024.yaml")
    assert plan.ndcfg is None
    assert "ndcfg_tau is 0" in (PRESETS / "sd2.1_2048x1024.yaml").read_text()


def test_flag_form_blocks_and_progressive_stages():
    unet = meta_unet("v2-inference.yaml")
    plan = plan_from_flags(unet, 4, 20, 4, progressive=True)
    layers = set(plan.dilate.factors)
    assert not any(n.startswith(("input_blocks.0.", "input_blocks.1.", "input_blocks.2.", "input_blocks.3."))
                   for n in layers)
    assert not any(re.match(r"output_blocks\.(8|9|10|11)\.", n) for n in layers)
    assert "input_blocks.4.0.in_layers.2" in layers and "middle_block.1" not in layers
    assert "output_blocks.7.0.out_layers.3" in layers and "output_blocks.5.2.conv" in layers
    # stages 4, 3, 2, each for ceil(20/3) = 7 steps
    assert [set(plan.dilate.at(i).values()) for i in (0, 6, 7, 13, 14, 19)] == \
        [{4.0}, {4.0}, {3.0}, {3.0}, {2.0}, {2.0}]
    assert plan.dilate.at(20) == {}
    flat = plan_from_flags(unet, 2, 20, 4)
    assert set(flat.dilate.at(19).values()) == {2.0} and flat.dilate.at(20) == {}
    # skip 0 adds conv_in, the 4 level-0 ResBlock convs, the level-0 downsample, output blocks 8-11 and
    # the upsample ending output block 8
    assert len(plan_from_flags(unet, 2, 20, 0).dilate.factors) == len(layers) + 1 + 4 + 1 + 8 + 1


def test_settings_file_errors_name_file_line_and_suggestions(tmp_path):
    names = LayerNames(meta_unet("v2-inference.yaml"))
    bad = tmp_path / "bad.txt"
    bad.write_text("down_blocks.1.resnets.0.conv1:2\ndown_blocks.1.resnet.0.conv1:2\n")
    with pytest.raises(SettingsError, match=r"bad.txt:2: .*down_blocks.1.resnets.0.conv1"):
        read_settings_file(bad, names)
    bad.write_text("mid_block.resnets.0.conv1 2\n")
    with pytest.raises(SettingsError, match=r"bad.txt:1: expected 'module_name:factor'"):
        read_settings_file(bad, names)
    bad.write_text("mid_block.resnets.0.conv1:two\n")
    with pytest.raises(SettingsError, match=r"bad.txt:1: factor 'two'"):
        read_settings_file(bad, names)
    bad.write_text("input_blocks.4.0.in_layers.2:2\n")  # own names work too
    assert read_settings_file(bad, names) == {"input_blocks.4.0.in_layers.2": 2.0}


# ---------------------------------------------------------------------------------------------
# noise-damped guidance


class StandIn:
    """A fake LatentDiffusion whose prediction tells which schedule was active and which branch ran."""

    def __init__(self, plan):
        self.plan = plan
        self.calls = []
        self.unet = plan.names.unet

    def apply_model(self, x, t, cond):
        strong = self.plan.names.module("input_blocks.4.0.in_layers.2")
        mild = self.plan.names.module("input_blocks.7.0.in_layers.2")
        tag = 100.0 * ("forward" in strong.__dict__) + 10.0 * ("forward" in mild.__dict__)
        self.calls.append((x.shape[0], tag))
        return x * 0 + cond.reshape(-1, 1, 1, 1) + tag


def _nd_plan():
    unet = tiny_unet()
    names = LayerNames(unet)
    strong = LayerSchedule({"input_blocks.4.0.in_layers.2": 3.0, "input_blocks.7.0.in_layers.2": 3.0}, 4)
    mild = LayerSchedule({"input_blocks.7.0.in_layers.2": 2.0}, 2)
    return ScaleCrafterPlan(names, strong, mild)


def test_ndcfg_formula_and_cost():
    plan = _nd_plan()
    model = StandIn(plan)
    guide = ScaleCrafterGuidance(plan)
    x, t = torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    cond, uncond, w = torch.tensor([5.0, 6.0, 7.0]), torch.tensor([1.0, 2.0, 3.0]), 7.5
    out = guide(model, x, t, cond, uncond, w, step=0)
    # strong pass: tag 110 on both branches; base pass (mild only): tag 10 on the unconditional branch
    eps_base = uncond + 10.0
    eps_cond, eps_uncond = cond + 110.0, uncond + 110.0
    torch.testing.assert_close(out[:, 0, 0, 0], eps_base + w * (eps_cond - eps_uncond))
    assert model.calls == [(6, 110.0), (3, 10.0)]  # one CFG batch + one unconditional batch: 1.5x
    model.calls.clear()
    out = guide(model, x, t, cond, uncond, w, step=2)  # ndcfg over, strong still on: plain CFG
    torch.testing.assert_close(out[:, 0, 0, 0], (uncond + 110) + w * (cond - uncond))
    assert model.calls == [(6, 110.0)]
    model.calls.clear()
    out = guide(model, x, t, cond, uncond, w, step=4)  # everything off
    torch.testing.assert_close(out[:, 0, 0, 0], uncond + w * (cond - uncond))
    assert model.calls == [(6, 0.0)]


# ---------------------------------------------------------------------------------------------
# dispersion inside the plan


def test_dispersed_layer_uses_5x5_kernel_at_half_the_dilation(monkeypatch):
    from ldm.unet_hooks.dispersion import disperse_kernel, get_dispersion_transform
    R = torch.as_tensor(get_dispersion_transform(), dtype=torch.float32)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 18, 18)
    cache = {}
    with torch.no_grad(), installed([(conv, Dispersion(4, R, cache, path="direct"))]):
        got = conv(x)
    k5 = disperse_kernel(conv.weight.detach(), R)
    want = F.conv2d(x, zero_inserted(k5, 2), conv.bias, padding=4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(cache) == 1  # computed once per run, reused by later steps


def _dispersed_reference(conv, x, R, factor):
    """float64 reference: the 5x5 kernel R·k formed with numpy, zero-inserted for the dilation, and (for a
    fractional dilation) the paper's resize-convolve-resize done by hand around it."""
    w = conv.weight.detach().double().numpy()
    k5 = torch.from_numpy((w.reshape(*w.shape[:2], 9) @ R.double().numpy().T).reshape(*w.shape[:2], 5, 5))
    d = factor / 2
    dd = math.ceil(d)
    xx = x.double()
    h, wd = x.shape[-2:]
    if dd != d:
        xx = F.interpolate(xx, size=(round(h * dd / d), round(wd * dd / d)), mode="bilinear", align_corners=False)
    y = F.conv2d(xx, zero_inserted(k5, dd), conv.bias.double(), conv.stride, 2 * dd)
    if dd != d:
        s = conv.stride[0]
        y = F.interpolate(y, size=((h - 1) // s + 1, (wd - 1) // s + 1), mode="bilinear", align_corners=False)
    return y


@pytest.mark.parametrize("factor", [2, 4, 6, 5, 3])  # dilations 1, 2, 3 and the fractional 2.5, 1.5
@pytest.mark.parametrize("stride", [1, 2])
def test_both_dispersion_paths_match_the_formed_kernel(factor, stride):
    from ldm.unet_hooks.dispersion import get_dispersion_transform
    R = torch.as_tensor(get_dispersion_transform(), dtype=torch.float32)
    torch.manual_seed(factor * 10 + stride)
    conv = nn.Conv2d(24, 40, 3, stride, 1)
    x = torch.randn(2, 24, 17, 15)
    want = _dispersed_reference(conv, x, R, factor)
    with torch.no_grad():
        direct = Dispersion(factor, R, path="direct")(conv, x)
        basis = Dispersion(factor, R, path="basis")(conv, x)
    assert basis.shape == direct.shape == want.shape
    scale = want.abs().max().item()
    for got in (direct, basis):
        assert (got.double() - want).abs().max().item() <= 1e-5 * scale
    assert (basis - direct).abs().max().item() <= 1e-5 * scale


def test_basis_path_chunks_channels_within_its_memory_budget(monkeypatch):
    import ldm.unet_hooks.redilation as rd
    from ldm.unet_hooks.dispersion import get_dispersion_transform
    R = torch.as_tensor(get_dispersion_transform(), dtype=torch.float32)
    torch.manual_seed(3)
    conv = nn.Conv2d(10, 6, 3, 1, 1)
    x = torch.randn(2, 10, 9, 9)
    calls = []
    real_conv2d = F.conv2d

    def recording_conv2d(inp, weight, *args, **kwargs):
        out = real_conv2d(inp, weight, *args, **kwargs)
        calls.append(tuple(out.shape))
        return out

    with torch.no_grad():
        whole = rd.basis_dispersed_conv(conv, x, R, 2)
        budget = 3 * (2 * 9 * 9 * 9 * 4)  # three input channels' worth of the (batch, 9, H, W) intermediate
        monkeypatch.setattr(rd.F, "conv2d", recording_conv2d)
        chunked = rd.basis_dispersed_conv(conv, x, R, 2, max_bytes=budget)
    depthwise = [c for c in calls if c[1] != 6]
    assert [c[1] for c in depthwise] == [27, 27, 27, 9]  # 3+3+3+1 input channels, 9 basis maps each
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert (chunked - _dispersed_reference(conv, x, R, 4).float()).abs().max() < 1e-5


def test_dispersion_path_rule_and_validation():
    from ldm.unet_hooks.redilation import BASIS_MIN_OUT_CHANNELS, choose_dispersion_path
    x = torch.zeros(1, 8, 4, 4)
    wide = nn.Conv2d(8, BASIS_MIN_OUT_CHANNELS["cpu"], 3, padding=1)
    narrow = nn.Conv2d(8, BASIS_MIN_OUT_CHANNELS["cpu"] // 2, 3, padding=1)
    assert choose_dispersion_path(wide, x) == "basis"
    assert choose_dispersion_path(narrow, x) == "direct"
    assert choose_dispersion_path(nn.Conv2d(8, BASIS_MIN_OUT_CHANNELS["cpu"], 3, padding=1, groups=8), x) == "direct"
    with pytest.raises(ValueError, match="path"):
        Dispersion(4, torch.zeros(25, 9), path="fast")


def test_preset_dispersion_path_reaches_the_processors():
    from ldm.methods.scalecrafter.presets import load_preset
    unet = meta_unet("v2-inference.yaml")
    cfg = load_preset(PRESETS / "sd2.1_2048x2048_disperse.yaml")
    assert "disperse_path" not in cfg  # the shipped presets use the automatic choice
    assert {p.path for _, p in plan_from_preset(unet, cfg).processors(0) if isinstance(p, Dispersion)} == {"auto"}
    authors_R = np.loadtxt(REPO / "tests" / "reference" / "scalecrafter_R20to1_new.txt")
    for name in ("sd2.1_2048x2048_disperse.yaml", "sd1.5_2048x2048_disperse.yaml"):  # the released transform
        plan = plan_from_preset(unet, PRESETS / name)
        np.testing.assert_allclose(plan.disperse_transform.double().numpy(), authors_R, atol=1e-7)
    for path in ("basis", "direct"):
        plan = plan_from_preset(unet, {**cfg, "disperse_path": path})
        procs = [p for _, p in plan.processors(0) if isinstance(p, Dispersion)]
        assert len(procs) == 23 and {p.path for p in procs} == {path}
    with pytest.raises(SettingsError, match="disperse_path"):
        plan_from_preset(unet, {**cfg, "disperse_path": "fastest"})


# ---------------------------------------------------------------------------------------------
# FreeU


def test_fourier_filter_matches_numpy():
    x = torch.randn(2, 3, 8, 10)
    f = np.fft.fftshift(np.fft.fft2(x.numpy()), axes=(-2, -1))
    f[..., 3:5, 4:6] *= 0.3
    want = np.fft.ifft2(np.fft.ifftshift(f, axes=(-2, -1))).real
    np.testing.assert_allclose(fourier_filter(x, 1, 0.3).numpy(), want, atol=1e-5)


def test_freeu_hooks_match_a_manual_forward():
    unet = tiny_unet()
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([300]), torch.randn(1, 3, 16)
    b1, b2, s1, s2 = 1.3, 1.2, 0.5, 0.7
    mc = unet.model_channels
    from ldm.modules.diffusionmodules.util import timestep_embedding
    with torch.no_grad():
        emb = unet.time_embed(timestep_embedding(t, mc))
        hs, h = [], x
        for m in unet.input_blocks:
            h = m(h, emb, c)
            hs.append(h)
        h = unet.middle_block(h, emb, c)
        for m in unet.output_blocks:
            skip = hs.pop()
            if h.shape[1] == 4 * mc:
                h = h.clone()
                h[:, :2 * mc] *= b1
                skip = fourier_filter(skip, 1, s1)
            elif h.shape[1] == 2 * mc:
                h = h.clone()
                h[:, :mc] *= b2
                skip = fourier_filter(skip, 1, s2)
            h = m(torch.cat([h, skip], 1), emb, c, output_size=hs[-1].shape[-2:] if hs else None)
        want = unet.out(h)
        with freeu(unet, b1, b2, s1, s2):
            got = unet(x, t, context=c)
        plain = unet(x, t, context=c)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3
