"""DDPM buffers and DDIM schedules against the values of the original code."""
import json

import numpy as np
import pytest
import torch

from conftest import assert_within_ulps
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS, LatentDiffusion


class _Schedule(torch.nn.Module):
    """Just the schedule part of LatentDiffusion (no submodules needed)."""
    register_schedule = LatentDiffusion.register_schedule

    def __init__(self, parameterization="eps"):
        super().__init__()
        self.parameterization = parameterization
        self.v_posterior = 0.0
        self.register_schedule(beta_schedule="linear", timesteps=1000, linear_start=0.00085, linear_end=0.012)


def test_ddpm_buffers_match_original(ref_dir):
    ref = json.load(open(ref_dir / "ddpm_schedule_sd.json"))
    m = _Schedule()
    for name in SCHEDULE_BUFFERS:
        want = torch.tensor(ref["buffers_float32"][name], dtype=torch.float32)
        # 1 ulp: each buffer is float64 arithmetic rounded once to float32; float64 results may differ in their last
        # bits between CPUs (numpy's SIMD log and sqrt paths, fused multiply-adds in torch.linspace), which moves
        # the rounded float32 value by at most 1 ulp
        assert_within_ulps(getattr(m, name), want, 1, name)
    np.testing.assert_allclose(m.alphas_cumprod.numpy()[[0, 999]], [0.99914998, 0.0046600983], rtol=1e-7)
    eps_key = [k for k in ref if k.startswith("lvlb_weights_eps")][0]
    v_key = [k for k in ref if k.startswith("lvlb_weights_v")][0]
    torch.testing.assert_close(m.lvlb_weights, torch.tensor(ref[eps_key], dtype=torch.float32), rtol=1e-6, atol=0)
    torch.testing.assert_close(_Schedule("v").lvlb_weights, torch.tensor(ref[v_key], dtype=torch.float32),
                               rtol=1e-6, atol=0)


class _FakeModel:
    def __init__(self):
        s = _Schedule()
        self.num_timesteps = 1000
        self.betas, self.alphas_cumprod, self.alphas_cumprod_prev = s.betas, s.alphas_cumprod, s.alphas_cumprod_prev


def test_ddim_schedule_matches_original(ref_dir):
    ref = json.load(open(ref_dir / "ddim_schedule_50.json"))
    sampler = DDIMSampler(_FakeModel())
    for eta in ("0.0", "1.0"):
        sampler.make_schedule(50, ddim_eta=float(eta), verbose=False)
        assert sampler.ddim_timesteps.tolist() == ref["ddim_timesteps"]
        assert np.flip(sampler.ddim_timesteps).tolist() == ref["sampling_order_timesteps_passed_to_model"]
        r = ref[f"eta_{eta}"]
        for name in ("ddim_alphas", "ddim_alphas_prev", "ddim_sigmas", "ddim_sqrt_one_minus_alphas"):
            got = np.asarray(getattr(sampler, name), dtype=np.float64)
            np.testing.assert_allclose(got, np.asarray(r[name], dtype=np.float64), rtol=1e-6, atol=1e-8, err_msg=name)
    assert ref["ddim_timesteps"][0] == 1 and ref["ddim_timesteps"][-1] == 981


def test_ulp_tolerance_helper_counts_ulps():
    from conftest import ulps_apart
    x = torch.tensor([1.0, 3.0, 1e-30, 1000.0], dtype=torch.float32)
    up = x
    for k in range(3):
        up = torch.nextafter(up, torch.tensor(float("inf")))
    assert torch.equal(ulps_apart(up, x), torch.full((4,), 3.0, dtype=torch.float64))
    assert_within_ulps(up, x, 3)
    with pytest.raises(AssertionError, match="4 of 4 values more than 2 ulp apart"):
        assert_within_ulps(up, x, 2, "x")
    # float64 expectations are counted in float64 ulps
    assert float(ulps_apart(torch.tensor([1.0 + 2 ** -52], dtype=torch.float64), torch.tensor([1.0],
                                                                                               dtype=torch.float64))) == 1.0
