"""Shared pytest fixtures.

The numeric oracles and key/shape manifests computed with the original CompVis/Stability code are in
``tests/reference/`` (provenance: its README.md); ``$LDM_REFERENCE_DIR`` points the tests at another copy.
"""
import math
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    """Import ``scripts/<name>.py`` as a module (the scripts folder is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


REFERENCE_DIR = REPO_ROOT / "tests" / "reference"


def packed_4bit_state_dict(w):
    """The weights of the oracles recorded from diffusers-based releases (tests/reference/hidiffusion/,
    tests/reference/fouriscale/): value = offset + q * 2**-exp, exact in float32, q a 4-bit integer stored two
    per byte (q + 8 in the low and high nibble)."""
    sd, start = {}, 0
    for key, shape, e, offset in zip(w["keys"], w["shapes"], w["exp"], w["offset"]):
        n = (math.prod(shape) + 1) // 2
        b = w["q4"][start:start + n].to(torch.int16)
        q = torch.stack([(b & 15) - 8, (b >> 4) - 8], dim=-1).flatten()[:math.prod(shape)].reshape(shape)
        sd[key] = (q.to(torch.float64) * 2.0 ** -e + offset).to(torch.float32)
        start += n
    assert start == w["q4"].numel()
    return sd


def ulps_apart(actual, expected):
    """|actual - expected| elementwise in units in the last place (ulp) of ``expected`` in its own dtype (float32
    or float64), computed in float64: the unit in which the error of floating-point arithmetic is bounded."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    mag = expected.abs()
    ulp = (torch.nextafter(mag, torch.tensor(float("inf"), dtype=mag.dtype)) - mag).double()
    return (actual.double() - expected.double()).abs() / ulp


def assert_within_ulps(actual, expected, max_ulps, what=""):
    """Every element of ``actual`` within ``max_ulps`` ulp of ``expected`` (see :func:`ulps_apart`)."""
    d = ulps_apart(actual, expected)
    bad = d > max_ulps
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {d.numel()} values more than {max_ulps} ulp apart "
                           f"(worst {float(d.max()):.1f} ulp)")


def tiny_sd1_oracle_unet(weights, image_size=None):
    """The tiny SD 1.5-structured UNet of the oracles recorded from diffusers-based releases
    (tests/reference/hidiffusion/tiny_sd1_unet.yaml) with their 4-bit weights; ``image_size`` overrides the
    config's training latent."""
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    cfg = OmegaConf.load(REPO_ROOT / "tests/reference/hidiffusion/tiny_sd1_unet.yaml")
    if image_size is not None:
        cfg.params.image_size = image_size
    model = instantiate_from_config(cfg).eval()
    model.load_state_dict(packed_4bit_state_dict(weights), strict=True)
    return model


class RecordingUNetModel:
    """A bare UNet as guidance hooks see LatentDiffusion (``apply_model``, ``model.diffusion_model``), keeping
    every raw UNet output in ``raw``."""

    def __init__(self, unet):
        from tools.benchmark_modes import BareUNetModel
        self.bare, self.raw = BareUNetModel(unet), []
        self.model = self.bare.model

    def apply_model(self, x, t, cond):
        out = self.bare.apply_model(x, t, cond)
        self.raw.append(out)
        return out


def reference_dir() -> Path:
    env = os.environ.get("LDM_REFERENCE_DIR")
    path = Path(env) if env else REFERENCE_DIR
    if not path.is_dir():
        raise FileNotFoundError(
            f"reference data not found at {path}"
            + (" (from $LDM_REFERENCE_DIR)" if env else "; it is part of the repository (tests/reference/)")
            + "; set LDM_REFERENCE_DIR to the folder holding the oracles (oracle_unet_v2_tiny.pt, "
            "sd21_base_state_dict.json, ...)"
        )
    return path


@pytest.fixture(scope="session")
def ref_dir() -> Path:
    return reference_dir()


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """{"sd2" | "sdxl": (config, checkpoint)}: random-weight checkpoints in the original layouts of the tiny
    SD 2.x- and SDXL-structured configs (configs/tiny/), made once per test session."""
    from omegaconf import OmegaConf
    make = load_script("make_random_checkpoint")
    d = tmp_path_factory.mktemp("tiny_ckpts")
    out = {}
    for name in ("sd2", "sdxl"):
        config = REPO_ROOT / f"configs/tiny/tiny-{name}.yaml"
        out[name] = (config, make.save_checkpoint(make.make_random_state_dict(OmegaConf.load(config), seed=3),
                                                  d / f"{name}.ckpt"))
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of many small ops: with two threads on a busy 2-core machine every op waits
    for a descheduled thread (minutes instead of seconds). Use with ``pytest.mark.usefixtures``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # two cores on CI; keep results independent of the thread count where it matters
    torch.manual_seed(0)
    yield
