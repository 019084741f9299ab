"""FreeScale: scale fusion against the authors' code (recorded outputs), the Gaussian split, restrained dilation,
the cascade's formulas, and the attention processor mechanism."""
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm.methods.freescale import scale_fusion as SF
from ldm.methods.freescale.cascade import (FreeScale, FreeScaleSettings, cosine_factor, default_stages,
                                   restrained_dilation, restrained_layer_names)
from ldm.methods.freescale.presets import PresetError, load_preset, make_settings
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.attention import BasicTransformerBlock
from ldm.unet_hooks.processors import installed
from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
ORACLE = REPO / "tests" / "reference" / "freescale"


def load(name):
    return torch.load(ORACLE / name, weights_only=True)


# ---------------------------------------------------------------------------------------------
# against the release (tests/reference/freescale/README.md: diffusers 0.20.2, their scale_attention.py)


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_gaussian_blur_matches_the_release(k):
    data = load("gaussian_filter.pt")
    got = SF.gaussian_blur(data["input"], k, data["sigma"], blur="release")
    torch.testing.assert_close(got, data["outputs"][k], rtol=1e-5, atol=1e-6)


def test_window_views_match_the_release():
    data = load("get_views.pt")
    assert len(data["cases"]) == 30
    for case in data["cases"]:
        a = case["args"]
        grid, scale = (a["height"], a["width"]), (a["scale_num_h"], a["scale_num_w"])
        geometry = SF.window_geometry(grid, scale, "release")
        assert geometry[4:] == (a["h_jitter_range"], a["w_jitter_range"]), case["name"]
        views = SF.window_views(grid, geometry, random.Random(case["seed"]).randint)
        assert [list(v) for v in views] == [list(v) for v in case["views"]], (case["name"], case["seed"])


def _our_block(oracle_block):
    args = oracle_block["constructor_args"]
    block = BasicTransformerBlock(args["dim"], args["num_attention_heads"], args["attention_head_dim"],
                                  context_dim=args["cross_attention_dim"], gated_ff=True, checkpoint=False)
    block.load_state_dict(oracle_block["state_dict"])  # the same module names as diffusers' block
    return block.eval()


@pytest.mark.parametrize("case", ["2048x2048_grid32x32", "3072x3072_grid24x24", "1024x2048_grid16x32",
                                  "2048x4096_grid32x64", "1024x1024_grid16x16"])
def test_scale_fusion_block_matches_the_release(case):
    block = _our_block(load("block.pt"))
    data = load(f"scale_forward_{case}.pt")
    H, W = data["current_hw"]
    for mode, run in data["runs"].items():
        fusion = SF.ScaleFusion(data["grid_hw"], (H // 1024, W // 1024), fast_mode=run["fast_mode"],
                                randint=random.Random(run["seed"]).randint)
        with torch.no_grad(), installed([(block.attn1, fusion)]):
            got = block(data["hidden_states"], context=data["encoder_hidden_states"])
        torch.testing.assert_close(got, run["output"], rtol=1e-5, atol=2e-5, msg=f"{case} {mode}")
    if "ori_forward_output" in data:  # and without the processor: the plain block
        with torch.no_grad():
            plain = block(data["hidden_states"], context=data["encoder_hidden_states"])
        torch.testing.assert_close(plain, data["ori_forward_output"], rtol=1e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# properties


def test_gaussian_split_is_exact_and_preserves_constants():
    x = torch.randn(2, 12, 10, 6, dtype=torch.float64)
    for blur in SF.BLURS:
        g = SF.gaussian_blur(x, 5, blur=blur)
        torch.testing.assert_close(g + (x - g), x)
    const = torch.full((1, 12, 10, 6), 3.0, dtype=torch.float64)
    g = SF.gaussian_blur(const, 5, blur="spatial")
    torch.testing.assert_close(g[:, 2:-2, 2:-2], const[:, 2:-2, 2:-2])  # interior (zero padding at the borders)
    g = SF.gaussian_blur(const, 5, blur="release")
    torch.testing.assert_close(g[:, 2:-2, 2:-2, 2:-2], const[:, 2:-2, 2:-2, 2:-2])


def test_spatial_blur_is_a_2d_gaussian_conv():
    x = torch.randn(3, 9, 11, 4, dtype=torch.float64)
    g1 = SF.gaussian_1d(5, 1.0, torch.float64)
    k2 = (g1[:, None] * g1[None, :])[None, None]
    want = F.conv2d(x.permute(0, 3, 1, 2).reshape(-1, 1, 9, 11), k2, padding=2).reshape(3, 4, 9, 11).permute(0, 2, 3, 1)
    torch.testing.assert_close(SF.gaussian_blur(x, 5, blur="spatial"), want)


def _attention(dim=16, heads=2):
    torch.manual_seed(0)
    from ldm.modules.attention import CrossAttention
    return CrossAttention(dim, heads=heads, dim_head=dim // heads).eval()


def test_one_window_covering_the_image_is_plain_attention(monkeypatch):
    attn = _attention()
    x = torch.randn(2, 12 * 10, 16)
    with torch.no_grad():
        plain = attn(x)
        monkeypatch.setattr(SF, "window_geometry", lambda grid, scale, window: (grid[0], grid[1], 1, 1, 0, 0))
        fusion = SF.ScaleFusion((12, 10), (2, 2), randint=random.Random(0).randint)
        with installed([(attn, fusion)]):
            got = attn(x)
    torch.testing.assert_close(got, plain, rtol=0, atol=1e-6)


def test_base_scale_and_cross_attention_are_untouched():
    attn = _attention()
    x, ctx = torch.randn(2, 64, 16), torch.randn(2, 5, 16)
    with torch.no_grad():
        plain, cross = attn(x), attn(x, context=ctx)
        with installed([(attn, SF.ScaleFusion((8, 8), (1, 1)))]):
            assert torch.equal(attn(x), plain)
        with installed([(attn, SF.ScaleFusion((16, 16), (2, 2), randint=random.Random(0).randint))]):
            assert torch.equal(attn(x, context=ctx), cross)


def test_windows_are_batched_within_the_token_budget():
    attn = _attention()
    x = torch.randn(1, 32 * 32, 16)
    with torch.no_grad():
        outs = []
        for budget in (2 ** 18, 300):  # all 9 windows in one call / one window per call
            fusion = SF.ScaleFusion((32, 32), (2, 2), randint=random.Random(4).randint, max_window_batch_tokens=budget)
            with installed([(attn, fusion)]):
                outs.append(attn(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_level_grid_follows_the_unet_levels():
    assert SF.level_grid((100, 60), 100 * 60) == (100, 60)
    assert SF.level_grid((100, 60), 50 * 30) == (50, 30)
    assert SF.level_grid((101, 61), 26 * 16) == (26, 16)  # ceil at odd sides
    with pytest.raises(ValueError):
        SF.level_grid((64, 64), 1000)


def test_processor_off_is_bit_identical_and_restored():
    cfg = OmegaConf.load(REPO / "configs/tiny/tiny-sd2.yaml").model.params.unet_config
    torch.manual_seed(0)
    unet = instantiate_from_config(cfg).eval()
    with torch.no_grad():  # the zero-initialised output layers would hide every difference
        for p in unet.parameters():
            if p.dim() >= 2 and p.abs().sum() == 0:
                p.normal_(0, 0.05)
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, cfg.params.context_dim)
    with torch.no_grad():
        before = unet(x, t, context=c)
        from ldm.unet_hooks.processors import self_attention_layers
        layers = self_attention_layers(unet)
        assert layers
        with installed([]):
            assert torch.equal(unet(x, t, context=c), before)
        with installed([(m, SF.ScaleFusion((16, 16), (2, 2), randint=random.Random(0).randint)) for m in layers]):
            fused = unet(x, t, context=c)
        after = unet(x, t, context=c)
    assert torch.equal(after, before)
    assert not torch.equal(fused, before)
    assert all("forward" not in m.__dict__ for m in layers)


# ---------------------------------------------------------------------------------------------
# restrained dilation


def _unet(config):
    cfg = OmegaConf.load(REPO / config).model.params.unet_config
    with torch.device("meta"):
        return instantiate_from_config(cfg)


def test_restrained_dilation_is_the_release_list_on_sdxl_and_down_mid_only():
    unet = _unet("configs/tiny/tiny-sdxl.yaml")
    assert restrained_layer_names(unet) == [
        "down_blocks.1.downsamplers.0.conv", "down_blocks.2.resnets.0.conv1", "down_blocks.2.resnets.0.conv2",
        "down_blocks.2.resnets.1.conv1", "down_blocks.2.resnets.1.conv2", "mid_block.resnets.0.conv1",
        "mid_block.resnets.0.conv2", "mid_block.resnets.1.conv1", "mid_block.resnets.1.conv2"]
    for config in ("configs/tiny/tiny-sdxl.yaml", "configs/tiny/tiny-sd2.yaml", "configs/demo/shapes32.yaml"):
        unet = _unet(config)
        schedule, names = restrained_dilation(unet, 3, 35)
        assert schedule.at(0) and set(schedule.at(0).values()) == {3.0} and schedule.at(35) == {}
        for own in schedule.factors:
            assert own.startswith(("input_blocks.", "middle_block.")), own
            assert names.module(own) is not None


def test_dilation_factor_and_scales():
    st = FreeScaleSettings(stages=[(1024, 512), (2048, 1024)], base=1024)
    assert st.dilation_of((2048, 1024)) == 2  # the long side (the release's width // 1024 would give 1)
    assert FreeScaleSettings(stages=[(1, 1)], base=1024, dilation_from="width").dilation_of((2048, 1024)) == 1
    assert st.scale_of((2048, 4096)) == (2, 4) and st.scale_of((512, 512)) == (1, 1)


def test_default_stages_and_presets():
    assert default_stages(2048, 2048, 512) == [(512, 512), (1024, 1024), (2048, 2048)]
    assert default_stages(2048, 4096, 1024) == [(512, 1024), (1024, 2048), (2048, 4096)]
    assert default_stages(1024, 2048, 1024) == [(512, 1024), (1024, 2048)]  # the release's gradio lists
    assert default_stages(512, 512, 512) == [(512, 512)]
    for path in sorted((REPO / "configs/freescale").glob("*.yaml")):
        p = load_preset(path)
        st = make_settings(p["height"], p["width"], p["base"], p)
        assert tuple(st.stages[-1]) == (p["height"], p["width"])
        assert st.stages[0][0] * st.stages[0][1] <= p["base"] ** 2 * 2
    with pytest.raises(PresetError, match="last stage"):
        make_settings(2048, 2048, 1024, stages=[(1024, 1024), (2048, 1024)])


# ---------------------------------------------------------------------------------------------
# the cascade on the demo model


@pytest.fixture(scope="module")
def demo_model():
    from ldm.checkpoint import load_model_from_config
    cfg = OmegaConf.load(REPO / "configs/demo/shapes32.yaml")
    return load_model_from_config(cfg, str(REPO / "checkpoints/demo/shapes32.ckpt"), device="cpu")


def _zero_eps_guidance(model, x, t, cond, uncond, scale, step):
    """The model output that means ε = 0 (for a v-model: v = −√((1 − ᾱ)/ᾱ)·x)."""
    if model.parameterization == "v":
        a = model.alphas_cumprod[t].view(-1, 1, 1, 1).to(x.dtype)
        return -((1 - a) / a).sqrt() * x
    return torch.zeros_like(x)


@pytest.mark.parametrize("restart,cs", [(2, 2.0), (0, 1.0)])
def test_stage_follows_the_skip_residual_formula(demo_model, monkeypatch, restart, cs):
    """With ε ≡ 0 and η = 0 a DDIM step is x ← √(ᾱ_prev/ᾱ_t)·x, so the whole stage is computable by hand."""
    steps = 5  # 1000 % steps == 0: exactly `steps` uniform DDIM timesteps
    st = FreeScaleSettings(stages=[(32, 32), (64, 64)], base=32, restart_step=restart, cosine_scale=cs)
    fs = FreeScale(demo_model, st, f=1)
    z0 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(fs, "upscale", lambda latent, size, generator, sampler: z0)
    monkeypatch.setattr(fs, "stage_guidance", lambda size, steps, randint: _zero_eps_guidance)
    sampler = DDIMSampler(demo_model)
    res = fs.sample(sampler, steps, None, None, 1.0, 2, generator=torch.Generator().manual_seed(5),
                    init_latent=torch.zeros(2, 3, 32, 32))
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(5))
    ac = demo_model.alphas_cumprod.double()
    ts = list(range(0, 1000, 1000 // steps))[:steps]  # uniform DDIM timesteps, +1 as the original
    ts = [t + 1 for t in ts][::-1]
    noised = [ac[t].sqrt() * z0.double() + (1 - ac[t]).sqrt() * eps.double() for t in ts]
    x = noised[restart]
    for i in range(restart, steps):
        c1 = (0.5 * (1 + math.cos(math.pi * (1000 - ts[i]) / 1000))) ** cs
        x = x * (1 - c1) + noised[i] * c1
        a_prev = ac[ts[i + 1]] if i + 1 < steps else ac[0]
        x = (a_prev / ac[ts[i]]).sqrt() * x
    torch.testing.assert_close(res.latent.double(), x, rtol=1e-4, atol=1e-4)
    assert [tuple(z.shape[-2:]) for z in res.stage_latents] == [(32, 32), (64, 64)]


def test_restart_zero_without_residual_is_a_plain_sample_of_the_stage(demo_model, monkeypatch):
    import ldm.methods.cascade as C
    monkeypatch.setattr(C, "cosine_factor", lambda t, T=1000: 0.0)
    st = FreeScaleSettings(stages=[(32, 32), (64, 64)], base=32, restart_step=0)
    fs = FreeScale(demo_model, st, f=1)
    c = demo_model.get_learned_conditioning(["a red circle"])
    uc = demo_model.get_learned_conditioning([""])
    z0 = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(fs, "upscale", lambda latent, size, generator, sampler: z0)
    guidance = fs.stage_guidance((64, 64), 4, random.Random(0).randint)
    monkeypatch.setattr(fs, "stage_guidance", lambda size, steps, randint: guidance)
    sampler = DDIMSampler(demo_model)
    got = fs.sample(sampler, 4, c, uc, 3.0, 1, generator=torch.Generator().manual_seed(9),
                    init_latent=torch.zeros(1, 3, 32, 32)).latent
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(9))
    t0 = torch.tensor([int(sampler.ddim_timesteps[-1])])
    x_T = demo_model.q_sample(z0, t0, eps)
    want, _ = sampler.sample(S=4, conditioning=c, batch_size=1, shape=(3, 64, 64), verbose=False,
                             unconditional_guidance_scale=3.0, unconditional_conditioning=uc, eta=0.0,
                             guidance=guidance, x_T=x_T)
    torch.testing.assert_close(got, want)


def test_cascade_is_deterministic_per_seed(demo_model):
    st = FreeScaleSettings(stages=[(32, 32), (64, 64)], base=32, dilate_tau=3)
    c = demo_model.get_learned_conditioning(["a blue square"])
    outs = []
    for seed in (3, 3, 4):
        fs = FreeScale(demo_model, st, f=1)
        outs.append(fs.sample(DDIMSampler(demo_model, eta=1.0), 5, c, None, 1.0, 1,
                              generator=torch.Generator().manual_seed(seed), jitter_seed=seed).latent)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_detail_mask_sets_the_exponent_per_pixel():
    st = FreeScaleSettings(stages=[(32, 32)], base=32, cosine_scale=3.0, cosine_scale_bg=0.5)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, 4:] = 1
    e = FreeScale.c1_exponent(st, mask, torch.zeros(1, 3, 8, 8))
    assert torch.equal(e[0, 0, :, 4:], torch.full((8, 4), 3.0)) and torch.equal(e[0, 0, :, :4], torch.full((8, 4), 0.5))
    assert FreeScale.c1_exponent(st, None, torch.zeros(1)) == 3.0
    assert cosine_factor(1000) == 1.0 and abs(cosine_factor(0)) < 1e-12


# ---------------------------------------------------------------------------------------------
# scripts/txt2img.py --method freescale (tiny random-weight models in the original layouts: conftest.tiny_ckpts)


def _txt2img(args):
    from conftest import load_script
    return load_script("txt2img").main([str(a) for a in args])


def _params(path):
    import json
    from PIL import Image
    im = Image.open(path)
    return im.size, json.loads(im.text["parameters"])


def test_txt2img_freescale_sdxl_writes_stages_and_is_deterministic(tiny_ckpts, tmp_path):
    config, ckpt = tiny_ckpts["sdxl"]
    args = ["--config", config, "--ckpt", ckpt, "--prompt", "a corgi", "--steps", "4", "--scale", "5",
            "--method", "freescale", "--freescale_stages", "64x64", "128x128", "--H", "128", "--W", "128",
            "--save_stages", "--seed", "7", "--tiled_decoding", "--sync_gn", "--tile_size", "8", "--overlap", "2"]
    assert _txt2img(args + ["--outdir", tmp_path / "a"]) == 0
    assert _txt2img(args + ["--outdir", tmp_path / "b"]) == 0
    size, params = _params(tmp_path / "a/samples/00000.png")
    assert size == (128, 128) and params["method"] == "freescale"
    assert params["freescale"]["stages"] == [[64, 64], [128, 128]] and params["freescale"]["restart_step"] is None
    assert params["size_conditioning"]["target_size_as_tuple"] == [64, 64]  # the first stage's, as released
    assert _params(tmp_path / "a/samples/00000-stage1.png")[0] == (64, 64)
    for name in ("00000.png", "00000-stage1.png"):
        assert (tmp_path / "a/samples" / name).read_bytes() == (tmp_path / "b/samples" / name).read_bytes()


def test_txt2img_freescale_sd2_init_image_mask_and_sweep(tiny_ckpts, tmp_path):
    from PIL import Image
    config, ckpt = tiny_ckpts["sd2"]
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "init.png")
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (8, 0, 16, 16))
    mask.save(tmp_path / "mask.png")
    base = ["--config", config, "--ckpt", ckpt, "--prompt", "a red house", "--steps", "4", "--scale", "5",
            "--method", "freescale", "--H", "128", "--W", "128", "--cosine_scale", "3", "--cosine_scale_bg", "0.5"]
    assert _txt2img(base + ["--outdir", tmp_path / "img2img", "--init_image", tmp_path / "init.png",
                            "--detail_mask", tmp_path / "mask.png"]) == 0
    size, params = _params(tmp_path / "img2img/samples/00000.png")
    assert size == (128, 128) and params["freescale"]["stages"] == [[64, 64], [128, 128]]  # tiny base: 8 x 8
    assert params["freescale"]["init_image"].endswith("init.png")
    assert _txt2img(base + ["--outdir", tmp_path / "sweep", "--sweep", "--n_samples", "2"]) == 0
    assert _params(tmp_path / "sweep/samples/000000_000.png")[0] == (128, 128)
    assert _params(tmp_path / "sweep/samples/000000_001.png")[0] == (128, 128)


@pytest.mark.parametrize("extra,needle", [
    (["--method", "freescale", "--scalecrafter_config", "configs/scalecrafter/sd2.1_1024x1024.yaml"],
     "ScaleCrafter options"),
    (["--save_stages"], "add --method freescale"),
    (["--method", "freescale", "--freescale_config", "configs/freescale/sdxl_2048x2048.yaml"], "preset for sdxl"),
    (["--method", "freescale", "--freescale_stages", "64x64", "96x96"], "last stage"),
    (["--method", "freescale", "--freescale_stages", "64by64", "128x128"], "expected HxW"),
    (["--method", "freescale", "--init_image", "missing.png"], "no such file"),
])
def test_txt2img_freescale_bad_input(tiny_ckpts, tmp_path, capsys, extra, needle):
    config, ckpt = tiny_ckpts["sd2"]
    code = _txt2img(["--config", config, "--ckpt", ckpt, "--H", "128", "--W", "128", "--outdir", tmp_path / "o",
                     "--steps", "2", *extra])
    assert code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_freescale_shell_script_runs(tiny_ckpts, tmp_path):
    import os
    import subprocess
    config, ckpt = tiny_ckpts["sdxl"]
    env = dict(os.environ, MODEL="sdxl", CONFIG=str(config), CKPT=str(ckpt), OUTDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(REPO / "shellscripts/freescale_4096x4096.sh"), "--H", "128", "--W", "128",
                           "--freescale_stages", "64x64", "128x128", "--steps", "3"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    size, params = _params(tmp_path / "samples/00000.png")
    assert size == (128, 128) and params["freescale"]["preset"] == "configs/freescale/sdxl_4096x4096.yaml"
    assert params["freeu"] == {"b1": 1.1, "b2": 1.2, "s1": 0.6, "s2": 0.4} and params["tiled_decoding"]
    assert params["scale"] == 7.5 and params["eta"] == 0.0
    assert params["negative_prompt"] == "blurry, ugly, duplicate, poorly drawn, deformed, mosaic"
