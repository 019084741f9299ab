"""FouriScale (ldm/methods/fouriscale.py) against a recording of the authors' release (LeonHLJ/FouriScale, its
text2image.py pipeline run through diffusers 0.20.2) on a tiny SD 1.5-structured UNet with random weights.

The recording, its weights (LDM key format) and its provenance script are in tests/reference/fouriscale/
(README.md there says how it was made). Per case (latent size), the release ran its 5-step pipeline loop with its
per-step conv processors and Q/K-sharing attention; every step's input latent was prescribed, and the raw
three-branch UNet output ([uncond strong, cond strong, cond weak]) and the guided noise prediction it combines
were stored. Here ``FouriScaleGuidance`` is set up the way ``scripts/txt2img.py --method fouriscale`` sets it up for
the same size and steps (its parser and the registry's method class: settings, guidance) and called as the
DDIM sampler calls it, on the same inputs; raw and guided outputs must match the release's to float32 rounding
(the release's own float32 run is about 2e-6 from its float64 run, which is what is stored).

The tiny UNet is tests/reference/hidiffusion/tiny_sd1_unet.yaml with ``image_size`` 16 (set in memory): the same
layout, a training latent of 16 (with the yaml's 12, a 2x latent has a 3x3 deepest level, an odd FFT size on
which the release's mask construction fails; docs/fouriscale.md, release bug 3).
"""
from pathlib import Path

import pytest
import torch

from conftest import RecordingUNetModel, load_script, tiny_sd1_oracle_unet
from ldm import methods
from ldm.methods.base import ModelInfo
from ldm.methods import fouriscale as FS

REF = Path(__file__).resolve().parent / "reference" / "fouriscale"
ORACLE = REF / "oracle_tiny.pt"
F = 8     # the first stage's factor txt2img would use (SD): image size = 8 x latent size
TOL = 2e-5  # max abs error on raw UNet outputs (output std about 0.56; float32 noise about 2e-6, see README.md)

CASES = ["sd15_2x_32x32", "sd15_4x_64x64", "sd15_32x48"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many small ops (see conftest.py)


@pytest.fixture(scope="module")
def oracle():
    return torch.load(ORACLE, weights_only=True)


@pytest.fixture(scope="module")
def unet(oracle):
    return tiny_sd1_oracle_unet(oracle["weights"], oracle["image_size"])  # the recording's training latent


@pytest.fixture(scope="module")
def txt2img():
    return load_script("txt2img")


def _guidance(txt2img, unet, oracle, case, *extra):
    """FouriScaleGuidance as ``txt2img.py --method fouriscale --H --W --steps --scale`` builds it for an SD 1.x
    model whose config has image_size = the recording's training latent."""
    h, w = oracle["cases"][case]["latent_hw"]
    base = oracle["image_size"]
    opt = txt2img.build_parser().parse_args(
        ["--method", "fouriscale", "--H", str(h * F), "--W", str(w * F), "--steps", str(oracle["steps"]),
         "--scale", str(oracle["cfg_scale"]), *extra])
    info = ModelInfo(family="sd1", f=F, channels=4, base_latent=base, side=512, steps=opt.steps, seed=opt.seed)
    cls = methods.method_class("fouriscale")
    settings = cls.settings(opt, info, (opt.H, opt.W))
    return cls(RecordingUNetModel(unet), settings, info).guidance()


def _run(guide, unet, oracle, case, index):
    """(raw UNet outputs, guided output) of the k-th stored step of a case, called as the DDIM sampler calls."""
    c = oracle["cases"][case]
    step = int(c["steps_stored"][index])
    x, t = c["x"][index:index + 1].float(), c["t"][index:index + 1]
    model = RecordingUNetModel(unet)
    with torch.no_grad():
        guided = guide(model, x, t, oracle["cond"], oracle["uncond"], oracle["cfg_scale"], step)
    assert len(model.raw) == 1
    assert all("forward" not in m.__dict__ for m in unet.modules()), "processors left installed"
    return model.raw[0], guided


def _max_err(a, b):
    return (a - b).abs().max().item()


def _steps(oracle):
    return [(case, k) for case in CASES for k in range(len(oracle["cases"][case]["steps_stored"]))]


def _ids():
    o = torch.load(ORACLE, weights_only=True)
    return [f"{case}-step{int(o['cases'][case]['steps_stored'][k])}" for case, k in _steps(o)]


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if c != "sd15_4x_64x64"])
def test_plain_unet_matches_the_release_diffusers_unet(unet, oracle, case):
    """The weight conversion: without processors this UNet is the release's diffusers UNet."""
    c = oracle["cases"][case]
    x = c["x0"].float()
    with torch.no_grad():
        out = unet(torch.cat([x, x]), torch.tensor([501, 501]), context=torch.cat([oracle["uncond"], oracle["cond"]]))
    err = _max_err(out, c["plain_out"])
    assert err < TOL, f"{case}: plain UNet differs from diffusers' by {err:.2e}"


@pytest.mark.parametrize("case", CASES)
def test_settings_match_the_release(txt2img, unet, oracle, case):
    """What txt2img picks for the size: the release's dilation (its main()'s formula), the start/stop steps the
    release was given, its SD 1.5 layer list and (for the filtered convs) its base sizes, scaled to this model."""
    c = oracle["cases"][case]
    g = _guidance(txt2img, unet, oracle, case)
    s = g.settings
    assert (s.dilation, s.start_step, s.stop_step) == (c["dilation"], c["start_step"], c["stop_step"])
    assert (s.progressive, s.filter, s.stopband, s.weak_dilation_div, s.amp_guidance, s.full_batch) == \
        (True, "release", 0.0, 1.0, 1.0, False)
    assert sorted(diff for _, diff, _, _ in g.layers) == sorted(oracle["release_layers"])
    for _, diff, level, _ in g.layers:
        if "upsamplers" not in diff:  # the upsampler convs are not filtered: their base size is never used
            assert [v / 2 ** level for v in s.base_hw] == oracle["release_base_settings"][diff], diff


@pytest.mark.parametrize("case,index", _steps(torch.load(ORACLE, weights_only=True)), ids=_ids())
def test_fouriscale_matches_the_release(txt2img, unet, oracle, case, index):
    """Each stored step: the raw branches and the guided noise prediction. From the stop step on this
    repository runs plain two-branch CFG (its documented fast path): its [uncond, cond] equal the release's
    uncond and both (then identical) cond branches."""
    c = oracle["cases"][case]
    step = int(c["steps_stored"][index])
    raw, guided = _run(_guidance(txt2img, unet, oracle, case), unet, oracle, case, index)
    want = c["out"][index]
    if step >= c["stop_step"]:
        assert raw.shape[0] == 2
        errs = [_max_err(raw[0], want[0]), _max_err(raw[1], want[1]), _max_err(raw[1], want[2])]
    else:
        assert raw.shape[0] == 3
        errs = [_max_err(r, o) for r, o in zip(raw, want)]
    assert max(errs) < TOL, f"{case} step {step}: max abs error per branch {['%.2e' % e for e in errs]}"
    s = oracle["cfg_scale"]
    err = _max_err(guided, c["guided"][index])
    assert err < (1 + 2 * s) * TOL, f"{case} step {step}: guided output off by {err:.2e}"


def test_full_batch_after_the_stop_step_matches_the_release(txt2img, unet, oracle):
    """--fouri_full_batch: the release's three-branch batch also from the stop step on."""
    case = "sd15_2x_32x32"
    c = oracle["cases"][case]
    index = [int(v) for v in c["steps_stored"]].index(c["stop_step"])
    raw, guided = _run(_guidance(txt2img, unet, oracle, case, "--fouri_full_batch"), unet, oracle, case, index)
    assert raw.shape[0] == 3
    assert _max_err(raw, c["out"][index]) < TOL
    assert _max_err(guided, c["guided"][index]) < (1 + 2 * oracle["cfg_scale"]) * TOL


def test_the_comparison_is_sensitive(txt2img, unet, oracle, monkeypatch):
    """Changes to FouriScale move the outputs far beyond the tolerance, so the tests above can fail: the
    symmetric mask instead of the release's (one bin at each ramp edge), another dilation, another stop band,
    no progressive schedule, no Q/K sharing (measured: 0.02 to 2, against errors of 3e-6)."""
    case = "sd15_2x_32x32"  # stored steps 0 (dilated, d = 2) and 2 (progressive, d = 1.5)
    want = oracle["cases"][case]["out"]

    def err(index, *extra):
        raw, _ = _run(_guidance(txt2img, unet, oracle, case, *extra), unet, oracle, case, index)
        return _max_err(raw, want[index])

    for extra in [("--fouri_filter", "symmetric"), ("--fouri_dilation", "3"), ("--fouri_stopband", "0.1")]:
        assert err(0, *extra) > 100 * TOL, extra
    assert err(2, "--fouri_progressive", "off") > 100 * TOL

    # without Q/K sharing the weak branch attends with its own queries and keys
    def own_qk(self, attn, x, context=None, mask=None):
        return type(attn).forward(attn, x, context, mask)
    monkeypatch.setattr(FS.SharedQueryKey, "__call__", own_qk)
    raw, _ = _run(_guidance(txt2img, unet, oracle, case), unet, oracle, case, 0)
    assert _max_err(raw[:2], want[0][:2]) < TOL  # the strong branches do not depend on it
    assert _max_err(raw[2], want[0][2]) > 100 * TOL
