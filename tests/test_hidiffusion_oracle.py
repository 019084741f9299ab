"""HiDiffusion (ldm/methods/hidiffusion.py) against a recording of the authors' release
(megvii-research/HiDiffusion, run through diffusers) on a tiny SD 1.5-structured UNet with random weights.

The recording, its weights (LDM key format) and its provenance script are in tests/reference/hidiffusion/
(README.md there says how it was made). Per case (latent size), the release ran the N = 5 UNet calls of a run,
batch [uncond, cond] as a pipeline's CFG does, with its per-module step counters at 0..4 and its window shifts
scripted to this repository's draws for the recorded seed. Here the same UNet calls go through
``HiDiffusionGuidance`` the way the DDIM sampler calls it (``guidance(model, x, t, cond, uncond, scale, step)``),
and the raw UNet outputs must match the release's to float32 rounding (the release's own float32 run is about
2e-6 from its float64 run, which is what is stored).
"""
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import RecordingUNetModel, tiny_sd1_oracle_unet
from ldm.methods import hidiffusion as HD

REF = Path(__file__).resolve().parent / "reference" / "hidiffusion"
ORACLE = REF / "oracle_tiny.pt"
CONFIG = REF / "tiny_sd1_unet.yaml"
TOL = 2e-5  # max abs error allowed on raw UNet outputs (output std about 0.55; float32 noise about 2e-6)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many small ops (see conftest.py)


@pytest.fixture(scope="module")
def oracle():
    return torch.load(ORACLE, weights_only=True)


@pytest.fixture(scope="module")
def unet(oracle):
    return tiny_sd1_oracle_unet(oracle["weights"])


def _base_latent():
    return int(OmegaConf.load(CONFIG).params.image_size)


CASES = ["sd15_1024_24x24", "sd15_2048_48x48", "sd15_2048_36x44", "sd15_1024_17x23"]


def _guidance(unet, oracle, case, **kwargs):
    c = oracle["cases"][case]
    t1, t2 = c["repo_ratios"] if c["repo_ratios"] is not None else (None, None)
    kwargs = {"t1_ratio": t1, "t2_ratio": t2, "seed": oracle["shift_seed"], **kwargs}
    return HD.HiDiffusionGuidance(unet, oracle["steps"], _base_latent(), **kwargs)


def _window_processors(g):
    return [p for _, p in g._window_procs if isinstance(p, HD.WindowedSelfAttention)]


def _replay(g, queue):
    """Make the windowed attention take its shift draws from ``queue`` (a list the caller fills per step)."""
    def draw():
        return int(queue.pop(0))
    for p in _window_processors(g):
        p.draw = draw


def _record_draws(g, used):
    for p in _window_processors(g):
        p.draw = (lambda d: (lambda: used.append(d()) or used[-1]))(p.draw)


def _run(unet, oracle, case, steps=None, draws=None, g=None, scale=None):
    """Raw UNet outputs (and guided ones) of the case's steps through the guidance hook. ``draws``: per step,
    the shift draws to replay (None: the guidance's own seeded draws, which are recorded)."""
    c = oracle["cases"][case]
    g = g or _guidance(unet, oracle, case)
    queue, used = [], []
    if draws is not None:
        _replay(g, queue)
    else:
        _record_draws(g, used)
    model = RecordingUNetModel(unet)
    scale = oracle["cfg_scale"] if scale is None else scale
    guided, seen = [], []
    with torch.no_grad():
        for step in (range(oracle["steps"]) if steps is None else steps):
            if draws is not None:
                queue[:] = [int(k) for k in draws[step]]
            x, t = c["x"][step:step + 1].float(), c["t"][step:step + 1]
            guided.append(g(model, x, t, oracle["cond"], oracle["uncond"], scale, step))
            assert not queue, "not every recorded draw was used"
            seen.append(list(used))
            used.clear()
    assert all("forward" not in m.__dict__ for m in unet.modules()), "processors left installed"
    return model.raw, guided, seen


def _max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", CASES)
def test_plain_unet_matches_the_release_diffusers_unet(unet, oracle, case):
    """The weight conversion: without processors this UNet is the release's diffusers UNet."""
    c = oracle["cases"][case]
    x = c["x"][:1].float()
    with torch.no_grad():
        out = unet(torch.cat([x, x]), c["t"][:1].repeat(2), context=torch.cat([oracle["uncond"], oracle["cond"]]))
    err = _max_err(out, c["plain_out_step0"])
    assert err < TOL, f"{case}: plain UNet differs from diffusers' by {err:.2e}"


@pytest.mark.parametrize("case", CASES)
def test_schedule_matches_the_release(unet, oracle, case):
    """The ratios and the step index: the release's counters saw step k at the k-th call of the run, and the
    step ranges here are the release's int(N * ratio) for its ratios (with the case's ratio options)."""
    c = oracle["cases"][case]
    steps = oracle["steps"]
    assert [s["rad_conv"] for s in c["release_step_counters"]] == list(range(steps))
    assert all(len(set(s.values())) == 1 for s in c["release_step_counters"])
    g = _guidance(unet, oracle, case)
    _, t1, t2, aggressive, schedule = g.settings(tuple(c["latent_hw"]))
    assert (t1, t2) == (c["release_ratios"]["T1_ratio"], c["release_ratios"]["T2_ratio"])
    assert not aggressive
    assert schedule == {"rad": (0, int(steps * t1)), "pool": (0, int(steps * t2))}


@pytest.mark.parametrize("case", CASES)
def test_hidiffusion_matches_the_release(unet, oracle, case):
    """Each step's raw UNet output (batch [uncond, cond]) with the release's recorded window shifts."""
    c = oracle["cases"][case]
    with pytest.warns() if case.endswith("17x23") else nullcontext():
        raw, _, _ = _run(unet, oracle, case, draws=c["shift_draws"])
    errs = [_max_err(r, o) for r, o in zip(raw, c["out"])]
    assert max(errs) < TOL, f"{case}: max abs error per step {['%.2e' % e for e in errs]}"


@pytest.mark.parametrize("case", CASES)
def test_seeded_guidance_reproduces_the_release_run(unet, oracle, case):
    """The sampler's path unchanged: the guidance's own seeded shifts are the ones the release was given, and
    its guided output is CFG of the release's outputs."""
    c = oracle["cases"][case]
    with pytest.warns() if case.endswith("17x23") else nullcontext():
        raw, guided, seen = _run(unet, oracle, case)
    assert seen == c["shift_draws"].tolist(), "this repository's seeded window shifts changed"
    s = oracle["cfg_scale"]
    for step, (r, gd, o) in enumerate(zip(raw, guided, c["out"])):
        assert _max_err(r, o) < TOL, f"{case} step {step}: {_max_err(r, o):.2e}"
        want = o[:1] + s * (o[1:] - o[:1])
        assert _max_err(gd, want) < (1 + 2 * s) * TOL


def test_the_comparison_is_sensitive(unet, oracle):
    """Each part of HiDiffusion changes the outputs far beyond the tolerance, so the tests above can fail:
    another shift, no windows, no RAD conv, no pool pair."""
    case = "sd15_2048_48x48"  # step 0: RAD conv, pool pair and windows all active
    c = oracle["cases"][case]
    want = c["out"][0]
    draws = c["shift_draws"]
    other = (draws.long() + 1) % 4
    variants = {
        "another shift": _run(unet, oracle, case, steps=[0], draws=other)[0][0],
        "no windows": _run(unet, oracle, case, steps=[0],
                           g=_guidance(unet, oracle, case, apply_window_attn=False))[0][0],
        "no RAD conv": _run(unet, oracle, case, steps=[0], draws=draws,
                            g=_guidance(unet, oracle, case, t1_ratio=0.0))[0][0],
        "no pool pair": _run(unet, oracle, case, steps=[0], draws=draws,
                             g=_guidance(unet, oracle, case, t2_ratio=0.0))[0][0],
    }
    for name, got in variants.items():
        assert _max_err(got, want) > 1000 * TOL, name
    # and so does one quarter-window change of the shift in a single block (the last up-level transformer)
    one = draws.clone()
    one[0, -1] = (int(one[0, -1]) + 1) % 4
    assert _max_err(_run(unet, oracle, case, steps=[0], draws=one)[0][0], want) > 100 * TOL

