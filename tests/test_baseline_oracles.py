"""MultiDiffusion and DemoFusion against numbers recorded from the authors' code.

The data in tests/reference/multidiffusion/ and tests/reference/demofusion/ was recorded by running the authors'
``panorama.py`` (omerbt/MultiDiffusion) and ``pipeline_demofusion_sdxl.py`` (PRIS-CV/DemoFusion) outside this
project, with a deterministic stand-in UNet (``standin_eps`` below; the READMEs there say how). Here the same
stand-in is fed to our implementations through ``apply_model`` and the results are compared: window layouts
(with the recorded jitter draws), the Gaussian blur, the cosine factors, single denoising steps, the dilated
global path, and whole DemoFusion runs (every phase). Where our code deliberately differs from the reference
(module docstrings of ldm/methods/multidiffusion.py and demofusion.py), the documented relationship is tested.
"""
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.methods import demofusion as DF
from ldm.methods import multidiffusion as MD
from ldm.methods.freescale.cascade import cosine_factor
from ldm.methods.freescale.scale_fusion import gaussian_1d, window_views
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm import LatentDiffusion

REF = Path(__file__).resolve().parent / "reference"
MD_DIR, DF_DIR = REF / "multidiffusion", REF / "demofusion"
POOLED = 10  # the stand-in's pooled text embedding size (DemoFusion runs)
TOL = dict(rtol=1e-5, atol=1e-5)


def load(path):
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------------------------------------
# the stand-in model


def standin_eps(x, t, ctx, vec, w):
    """The recorded runs' UNet: 3x3 conv (zero padding) + 0.5·spatial mean + gain·sin(t/150)
    + mean(ctx over tokens)·W_ctx (+ vec·W_vec with SDXL's vector: pooled text + the six size ids in pixels)."""
    n = x.shape[0]
    t = torch.as_tensor(t).reshape(-1)[0].float()
    out = F.conv2d(x, w["conv"], padding=1) + 0.5 * x.mean(dim=(2, 3), keepdim=True)
    out = out + (w["t_gain"] * torch.sin(t / 150.0)).view(1, -1, 1, 1)
    out = out + (ctx.mean(dim=1) @ w["ctx"]).view(n, -1, 1, 1)
    if vec is not None:
        out = out + (vec @ w["vec"]).view(n, -1, 1, 1)
    return out


class StandinModel(nn.Module):
    """Our LatentDiffusion's interface around ``standin_eps``: ``apply_model``, SD's DDPM schedule
    (``LatentDiffusion.register_schedule``, linear in sqrt(β) from 0.00085 to 0.012), ``q_sample``. With ``sdxl``
    a conditioner whose size embedders return their input, so that the vector condition is [pooled text,
    original (h, w), crop (top, left), target (h, w)] in pixels: the reference's ``text_embeds`` followed by its
    ``time_ids``."""

    parameterization = "eps"
    q_sample = LatentDiffusion.q_sample

    def __init__(self, w, sdxl=False):
        super().__init__()
        self.w = w
        self.v_posterior = 0.0
        self.model = nn.Module()
        self.model.diffusion_model = nn.Module()
        self.model.diffusion_model.in_channels = 4
        LatentDiffusion.register_schedule(self, beta_schedule="linear", timesteps=1000, linear_start=0.00085,
                                          linear_end=0.012)
        if sdxl:
            ident = lambda v: v  # noqa: E731
            self.conditioner = SimpleNamespace(
                embedders=[None, ident, ident, ident],
                input_keys=["txt", "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"])
        self.calls = []

    def apply_model(self, x, t, cond):
        ctx, vec = (cond["crossattn"], cond["vector"]) if isinstance(cond, dict) else (cond, None)
        self.calls.append({"x": x, "vec": vec})
        return standin_eps(x, t, ctx, vec, self.w)


def replay(draws):
    """A ``randint`` that returns the reference's recorded draws, checking that the same ranges are asked for."""
    queue = list(draws)

    def randint(a, b):
        assert queue, "more jitter draws than the reference made"
        ra, rb, v = queue.pop(0)
        assert (a, b) == (ra, rb), f"asked randint({a}, {b}), the reference drew randint({ra}, {rb})"
        return v
    randint.left = queue
    return randint


def ddim_step(model, x, t, index, steps, cond, uncond, scale, guidance):
    sampler = DDIMSampler(model)
    sampler.make_schedule(steps, ddim_eta=0.0, verbose=False)
    ts = torch.full((x.shape[0],), int(t), dtype=torch.long)
    with torch.no_grad():
        out, _ = sampler.p_sample_ddim(x, cond, ts, index=index, step=0, unconditional_guidance_scale=scale,
                                       unconditional_conditioning=uncond, guidance=guidance)
    return out


def test_standin_reproduces_the_recorded_unet_calls():
    for run in load(MD_DIR / "panorama_runs.pt").values():
        c = run["first_unet_call"]
        torch.testing.assert_close(standin_eps(c["sample"], c["t"], c["ctx"], None, run["standin"]), c["out"],
                                   rtol=1e-6, atol=1e-6)
    for name in ("square_288", "wide_192x384", "odd_256x288"):
        run = load(DF_DIR / f"run_{name}.pt")
        c = run["first_unet_call"]
        torch.testing.assert_close(standin_eps(c["sample"], c["t"], c["ctx"], c["vec"], run["standin"]), c["out"],
                                   rtol=1e-6, atol=1e-6)


def test_schedule_and_timesteps_match_the_reference_ddim_scheduler():
    """Our SD schedule (float64, then float32) vs diffusers' DDIMScheduler (float32 cumprod), and the DDIM
    timesteps ('leading' spacing + steps_offset 1 = our 'uniform' + 1)."""
    model = StandinModel(load(MD_DIR / "panorama_runs.pt")["run5_20x28"]["standin"])
    run = load(DF_DIR / "run_square_288.pt")
    torch.testing.assert_close(model.alphas_cumprod, run["alphas_cumprod"], rtol=2e-6, atol=0)
    sampler = DDIMSampler(model)
    sampler.make_schedule(run["steps"], verbose=False)
    assert list(reversed(sampler.ddim_timesteps.tolist())) == run["timesteps"]
    md = load(MD_DIR / "panorama_runs.pt")["run5_20x28"]
    sampler.make_schedule(md["num_inference_steps"], verbose=False)
    assert list(reversed(sampler.ddim_timesteps.tolist())) == md["timesteps"]


# ---------------------------------------------------------------------------------------------
# MultiDiffusion (panorama.py)


def _coverage(views, h, w):
    cover = torch.zeros(h, w, dtype=torch.long)
    for h0, h1, w0, w1 in views:
        cover[h0:h1, w0:w1] += 1
    return cover


def test_multidiffusion_views_contain_the_references():
    """Equal where (side − window) is a multiple of the stride; otherwise ours adds the windows flush with the
    bottom/right edge that the reference lacks (it leaves that rim uncovered). Latents smaller than the window:
    the reference returns no views at all, ours one window clamped to the latent."""
    cases = json.loads((MD_DIR / "get_views.json").read_text())["cases"]
    assert len(cases) == 16
    for case in cases:
        (h, w), win, stride = case["latent_hw"], case["window"], case["stride"]
        theirs = [tuple(v) for v in case["views"]]
        ours = MD.views(h, w, (win, win), stride)
        assert _coverage(ours, h, w).min() >= 1, case
        if h < win or w < win:
            assert theirs == [] and ours == [(0, min(h, win), w0, w0 + min(w, win))
                                             for w0 in MD.window_starts(w, min(w, win), stride)], case
            continue
        assert set(theirs) <= set(ours), case
        assert theirs == [v for v in ours if v in set(theirs)], case  # same (row-major) order
        divisible = (h - win) % stride == 0 and (w - win) % stride == 0
        if divisible:
            assert ours == theirs, case
        else:
            assert len(ours) > len(theirs), case
            assert all(v[0] == h - win or v[2] == w - win for v in set(ours) - set(theirs)), case
            assert _coverage(theirs, h, w).min() == 0, case  # the reference's uncovered rim


def _md_inputs(run):
    return StandinModel(run["standin"]), run["cond"], run["uncond"]


def test_multidiffusion_step_matches_the_reference():
    """One DDIM step of the panorama loop (t = 801 of 5 steps): view-wise CFG prediction, DDIM step per view,
    averaged — ours averages the predictions and steps once (the step is affine in the prediction)."""
    run = load(MD_DIR / "panorama_runs.pt")["step_16x28"]
    model, cond, uncond = _md_inputs(run)
    guide = MD.MultiDiffusionGuidance((run["window"],) * 2, stride=run["stride"], window_batch=3)
    assert [list(v) for v in MD.views(*run["latent_hw"], guide.window, guide.stride)] == run["views"]
    got = ddim_step(model, run["x_T"], run["timesteps"][0], run["num_inference_steps"] - 1,
                    run["num_inference_steps"], cond, uncond, run["guidance_scale"], guide)
    torch.testing.assert_close(got, run["output"], **TOL)


def test_multidiffusion_step_on_an_uneven_width():
    """Width 30, window 16, stride 4: the reference's windows end at 28 and its columns 28-29 come out zero
    (``where(count > 0, value / count, value)``); ours adds a window at 14. Columns left of 14 see the same windows
    in both, so they agree."""
    run = load(MD_DIR / "panorama_runs.pt")["step_16x30_uneven"]
    model, cond, uncond = _md_inputs(run)
    ours_views = MD.views(*run["latent_hw"], (run["window"],) * 2, run["stride"])
    extra = set(ours_views) - {tuple(v) for v in run["views"]}
    assert extra == {(0, 16, 14, 30)}
    guide = MD.MultiDiffusionGuidance((run["window"],) * 2, stride=run["stride"])
    got = ddim_step(model, run["x_T"], run["timesteps"][0], run["num_inference_steps"] - 1,
                    run["num_inference_steps"], cond, uncond, run["guidance_scale"], guide)
    ref = run["output"]
    assert torch.count_nonzero(ref[..., 28:]) == 0 and torch.count_nonzero(ref[..., :28] == 0) == 0
    torch.testing.assert_close(got[..., :14], ref[..., :14], **TOL)
    assert torch.isfinite(got).all() and torch.count_nonzero(got[..., 28:]) == got[..., 28:].numel()


def test_multidiffusion_sampling_matches_the_reference():
    """All 5 DDIM steps of the panorama loop on a 20x28 latent (windows 16, stride 4) through our sampler."""
    run = load(MD_DIR / "panorama_runs.pt")["run5_20x28"]
    model, cond, uncond = _md_inputs(run)
    guide = MD.MultiDiffusionGuidance((run["window"],) * 2, stride=run["stride"])
    out, _ = DDIMSampler(model).sample(S=run["num_inference_steps"], batch_size=1, shape=(4, *run["latent_hw"]),
                                       conditioning=cond, unconditional_conditioning=uncond,
                                       unconditional_guidance_scale=run["guidance_scale"], eta=0.0,
                                       x_T=run["x_T"], guidance=guide, verbose=False)
    torch.testing.assert_close(out, run["output"], **TOL)


# ---------------------------------------------------------------------------------------------
# DemoFusion (pipeline_demofusion_sdxl.py)


def test_demofusion_views_match_the_reference():
    """get_views with and without jitter (the recorded randint draws replayed; a Python generator seeded like the
    reference's global ``random`` gives the same draws). Latents smaller than the window (64x256 with window 128):
    the reference keeps a 128-row window (overrunning the padded latent, jittered into the zero padding); ours
    clamps the window to the latent and does not jitter along that axis (documented in demofusion.py)."""
    cases = json.loads((DF_DIR / "get_views.json").read_text())["cases"]
    assert len(cases) == 36
    for case in cases:
        (h, w), win, stride, j = case["latent_hw"], case["window"], case["stride"], case["jitter_range"]
        assert j == ((win - stride) // 4 if case["random_jitter"] else 0)
        geometry = (win, win, stride, stride, j, j)
        if h < win:  # the documented difference
            ours = window_views((h, w), geometry)
            theirs = case["views"] if not case["random_jitter"] else None
            if theirs is not None:
                assert [(v[2], v[3]) for v in ours] == [(v[2], v[3]) for v in theirs]
                assert {(v[0], v[1]) for v in theirs} == {(0, win)} and {(v[0], v[1]) for v in ours} == {(0, h)}
            else:  # the reference also draws a row jitter for every window (one-sided, into the padding)
                assert len(case["draws"]) == 2 * len(ours)
            continue
        randint = replay(case["draws"]) if case["random_jitter"] else None
        ours = window_views((h, w), geometry, randint)
        assert [list(v) for v in ours] == case["views"], case
        if randint is not None:
            assert randint.left == []
            assert [list(v) for v in window_views((h, w), geometry, random.Random(case["seed"]).randint)] \
                == case["views"]


@pytest.mark.parametrize("index", range(7))
def test_demofusion_gaussian_filter_matches_the_reference(index):
    data = load(DF_DIR / "gaussian_filter.pt")
    case = data["cases"][index]
    k, sigma = case["kernel_size"], case["sigma"]
    g = gaussian_1d(k, sigma)
    torch.testing.assert_close(g[:, None] * g[None, :], case["kernel"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(DF.gaussian_blur_2d(data["input"], k, sigma), case["output"], rtol=1e-5, atol=1e-6)


def test_demofusion_cosine_factors_match_the_reference():
    """c1 = cf³ (skip residual), c2 = cf (fusion weight), c3 = 0.99·cf + 0.01 (blur σ factor) for the DDIM
    timesteps of 4 and 50 steps; the c3 actually used is checked in the step test (the recorded blur σ)."""
    data = json.loads((DF_DIR / "cosine_factors.json").read_text())
    for rows in data.values():
        for r in rows:
            cf = cosine_factor(r["t"], 1000)
            assert cf == pytest.approx(r["cosine_factor"], rel=1e-6, abs=1e-7)
            assert cf ** 3 == pytest.approx(r["c1"], rel=1e-5, abs=1e-7)
            assert 0.99 * cf + 0.01 == pytest.approx(r["c3"], rel=1e-6, abs=1e-7)


def _df_conditions(run):
    size_ids = torch.tensor([[run["height"], run["width"], 0, 0, run["height"], run["width"]]], dtype=torch.float32)
    cond = {"crossattn": run["prompt_embeds"], "vector": torch.cat([run["pooled_prompt_embeds"], size_ids], 1)}
    uncond = {"crossattn": run["negative_prompt_embeds"],
              "vector": torch.cat([run["negative_pooled_prompt_embeds"], size_ids], 1)}
    return cond, uncond


def _df_guidance(run, model, scale_num, randint):
    return DF.DemoFusionGuidance(scale_num, run["sample_size"], run["stride"], randint=randint, sigma=run["sigma"],
                                 cosine_scale_2=run["cosine_scales"][1], cosine_scale_3=run["cosine_scales"][2],
                                 num_timesteps=1000, view_batch=run["view_batch_size"],
                                 window_conditioning=MD.SDXLWindowConditioning(
                                     model, (run["height"], run["width"]), 8, target="image"))


def _phase_steps(run):
    for phase in run["phases"][1:]:
        for st in phase["steps"]:
            yield phase, st


def test_demofusion_step_metadata_matches_the_reference(monkeypatch):
    """For every step of every upscaling phase of the three runs: the jittered views (replaying the draws), the
    zero padding of the local (jitter range) and global (top/left to a multiple of the scale) paths, the blur's
    kernel size and σ = sigma·c3, and each local view's SDXL size ids (crop = its padded position × 8)."""
    blurs = []
    real_blur = DF.gaussian_blur_2d

    def blur(x, k, sigma):
        blurs.append((tuple(x.shape), k, sigma))
        return real_blur(x, k, sigma)
    monkeypatch.setattr(DF, "gaussian_blur_2d", blur)
    for name in ("square_288", "wide_192x384", "odd_256x288"):
        run = load(DF_DIR / f"run_{name}.pt")
        model = StandinModel(run["standin"], sdxl=True)
        cond, uncond = _df_conditions(run)
        for phase, st in _phase_steps(run):
            s = phase["scale"]
            h, w = phase["latent_hw"]
            randint = replay(st["draws"])
            guide = _df_guidance(run, model, s, randint)
            assert guide.jitter == st["jitter_range"]
            x = torch.zeros(1, 4, h, w)
            model.calls.clear()
            blurs.clear()
            with torch.no_grad():
                guide(model, x, torch.tensor([st["t"]]), cond, uncond, run["guidance_scale"], st["i"])
            assert randint.left == [], (name, s, st["i"])
            hp, wp = (s - h % s) % s, (s - w % s) % s
            assert st["global_pad"] == [wp, 0, hp, 0]
            assert blurs == [((1, 4, h + hp, w + wp), st["blur_kernel_size"], pytest.approx(st["blur_sigma"],
                                                                                            rel=1e-6))]
            n_views = len(st["views"])
            vecs = torch.cat([c["vec"][:c["vec"].shape[0] // 2] for c in model.calls])  # uncond rows
            assert vecs[:n_views, POOLED:].tolist() == st["local_time_ids"], (name, s, st["i"])
            assert vecs[n_views:, POOLED:].tolist() == st["global_time_ids"], (name, s, st["i"])
            # the views: the windows the model saw are the recorded slices of the zero-padded latent
            views = window_views((h, w), (run["sample_size"],) * 2 + (run["stride"],) * 2 + (guide.jitter,) * 2,
                                 replay(st["draws"]))
            assert [list(v) for v in views] == st["views"]


def test_demofusion_steps_match_the_reference():
    """The odd run's last phase (latent 32x36 at scale 3: 42 jittered windows, the global paths padded by one
    row): each recorded step input through our guidance and DDIM step gives the recorded output."""
    run = load(DF_DIR / "run_odd_256x288.pt")
    model = StandinModel(run["standin"], sdxl=True)
    cond, uncond = _df_conditions(run)
    phase = run["phases"][2]
    assert phase["scale"] == 3 and phase["latent_hw"] == [32, 36]
    for st in phase["steps"]:
        guide = _df_guidance(run, model, phase["scale"], replay(st["draws"]))
        got = ddim_step(model, st["input"], st["t"], run["steps"] - 1 - st["i"], run["steps"], cond, uncond,
                        run["guidance_scale"], guide)
        torch.testing.assert_close(got, st["output"], **TOL, msg=lambda m: f"step {st['i']}: {m}")


def test_demofusion_dilated_global_path_matches_the_reference():
    """Blur of the top/left zero-padded latent (kernel 2·3 − 1, σ = 0.8·c3), re-standardised to the padded
    latent's mean and std, cut into the 3x3 dilated sub-lattices: the model inputs, in the reference's order."""
    run = load(DF_DIR / "run_odd_256x288.pt")
    st = run["phases"][2]["steps"][1]
    assert "global_unet_inputs" in st
    x = st["input"]
    padded = F.pad(x, st["global_pad"])
    cf = cosine_factor(st["t"], 1000)
    torch.testing.assert_close(DF.gaussian_blur_2d(padded, 5, 0.8 * (0.99 * cf + 0.01)), st["blur_output"],
                               rtol=1e-5, atol=1e-6)
    model = StandinModel(run["standin"], sdxl=True)
    cond, uncond = _df_conditions(run)
    guide = _df_guidance(run, model, 3, None)
    with torch.no_grad():
        guide.global_(model, x, torch.tensor([st["t"]]), cond, uncond, run["guidance_scale"], cf)
    inputs = torch.cat([c["x"][c["x"].shape[0] // 2:] for c in model.calls])  # cond halves, lattice order
    torch.testing.assert_close(inputs, st["global_unet_inputs"], rtol=1e-5, atol=1e-5)


def _run_ours(run, monkeypatch, init_latent=None):
    model = StandinModel(run["standin"], sdxl=True)
    cond, uncond = _df_conditions(run)
    noises = [p["noise"] for p in run["phases"][1:]]

    def randn(shape, device, generator=None):  # the phases' re-noising draws: the reference's
        noise = noises.pop(0)
        assert tuple(shape) == tuple(noise.shape)
        return noise.clone()
    monkeypatch.setattr(DDIMSampler, "_randn", staticmethod(randn))
    runner = DF.DemoFusion(model, run["height"], run["width"], run["sample_size"] * 8, f=8, stride=run["stride"],
                           sigma=run["sigma"], cosine_scales=run["cosine_scales"], view_batch=run["view_batch_size"])
    result = runner.sample(DDIMSampler(model, eta=run["eta"]), run["steps"], cond, uncond, run["guidance_scale"], 1,
                           x_T=run["x_T"], jitter_seed=run["seed"], init_latent=init_latent)
    assert noises == []
    return runner, result


@pytest.mark.parametrize("name", ["square_288", "wide_192x384"])
def test_demofusion_runs_match_the_reference(name, monkeypatch):
    """Whole runs (4 DDIM steps per phase): phase 1 at the base size, then each phase upscaled (bicubic),
    re-noised, denoised with skip residual + local/global paths, and re-standardised to phase 1's mean and std;
    the jitter from a generator seeded like the reference's global ``random``. Every phase's latent agrees."""
    run = load(DF_DIR / f"run_{name}.pt")
    runner, result = _run_ours(run, monkeypatch)
    assert [list(s) for s in runner.settings.stages] == [[p["latent_hw"][0] * 8, p["latent_hw"][1] * 8]
                                                          for p in run["phases"]]
    assert len(result.stage_latents) == len(run["phases"])
    for k, (ours, phase) in enumerate(zip(result.stage_latents, run["phases"])):
        torch.testing.assert_close(ours, phase["output"], **TOL, msg=lambda m: f"phase {k + 1}: {m}")
    torch.testing.assert_close(result.latent, run["phases"][-1]["output"], **TOL)


def test_demofusion_run_with_an_odd_short_side(monkeypatch):
    """256x288 px at base 96: the reference's phase 1 is 80x96 px (``height // scale_num`` floored to the latent
    grid), ours 88x96 (rounded to a multiple of 8); started from the reference's phase-1 latent (``init_latent``),
    the upscaling phases (21x24 and 32x36 latents, global paths padded) agree."""
    run = load(DF_DIR / "run_odd_256x288.pt")
    assert DF.demofusion_stages(run["height"], run["width"], run["sample_size"] * 8)[0] == (88, 96)
    assert run["phases"][0]["latent_hw"] == [10, 12]
    runner, result = _run_ours(run, monkeypatch, init_latent=run["phases"][0]["output"])
    for k, (ours, phase) in enumerate(zip(result.stage_latents[1:], run["phases"][1:]), start=2):
        torch.testing.assert_close(ours, phase["output"], **TOL, msg=lambda m: f"phase {k}: {m}")
