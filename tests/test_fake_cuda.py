"""The GPU-memory estimate without a GPU (tools/fake_cuda.py): the counter against hand-computed byte counts,
autocast's dtype rules, attention that does not materialize the score matrix, and the pipeline estimate."""
import gc

import pytest
import torch

from conftest import REPO_ROOT as REPO, load_script
from tools.fake_cuda import ALLOCATOR_GRANULARITY, FakeCuda, cast_parameters_, fused_attention
MiB = 2 ** 20


def test_counter_follows_lifetimes():
    with FakeCuda() as fc, fc.tracking():
        a = torch.empty(MiB // 4, device="cuda")  # 1 MiB of float32
        b = a + 1
        assert fc.current_bytes == 2 * MiB
        del a
        gc.collect()
        assert fc.current_bytes == MiB
        v = b.view(-1, 2)  # a view allocates nothing
        assert fc.current_bytes == MiB
        c = b * 2
        d = (c * 2).half()  # the float32 temporary dies at once, the half result stays
        assert fc.current_bytes == MiB + MiB + MiB // 2
        del b, c, d, v
        gc.collect()
        assert fc.current_bytes == 0
        assert fc.peak_bytes == 3 * MiB + MiB // 2  # b, c, the float32 temporary and d's half copy at once
        cpu = torch.empty(MiB)  # host memory is not counted
        assert fc.current_bytes == 0 and cpu.device.type == "cpu"


def test_counter_rounds_like_the_caching_allocator():
    with FakeCuda() as fc, fc.tracking():
        x = torch.empty(3, device="cuda", dtype=torch.float16)  # 6 bytes
        assert fc.current_bytes == ALLOCATOR_GRANULARITY
        del x


def test_weights_and_half_cast():
    with FakeCuda() as fc:
        with torch.device("cuda"):
            net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 8))
        cast_parameters_(net, torch.float16)
        fc.count_existing(net)
        n = 256 * 512 + 512 + 512 * 8 + 8
        expected = sum(-(-2 * k // ALLOCATOR_GRANULARITY) * ALLOCATOR_GRANULARITY
                       for k in (256 * 512, 512, 512 * 8, 8))
        assert sum(p.numel() for p in net.parameters()) == n
        assert fc.current_bytes == expected
        assert all(p.dtype == torch.float16 and p.device.type == "cuda" for p in net.parameters())


def test_autocast_rules_apply_to_fake_cuda():
    with FakeCuda() as fc:
        with torch.device("cuda"):
            lin = torch.nn.Linear(8, 8)
            x = torch.randn(4, 8)
        with fc.autocast(torch.float16):
            y = lin(x)  # linear runs in half under autocast
            z = torch.nn.functional.group_norm(y, 2)  # group_norm is on autocast's float32 list
        w = lin(x)  # autocast is off again
    assert (y.dtype, z.dtype, w.dtype) == (torch.float16, torch.float32, torch.float32)
    assert not torch.is_autocast_enabled("cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_attention_memory_is_linear_in_tokens(dtype):
    """Fused kernels (flash for half, memory-efficient for float32) never hold the N×N score matrix; the
    unpatched fake path does (it takes the math kernel)."""
    n, heads, d = 4096, 4, 64
    scores = heads * n * n * torch.tensor([], dtype=dtype).element_size()
    with FakeCuda() as fc, fc.tracking():
        q = torch.randn(1, heads, n, d, device="cuda", dtype=dtype)
        base = fc.current_bytes
        fc.counter.reset_peak()
        with fused_attention():
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        fused_peak = fc.peak_bytes - base
        assert out.shape == q.shape and out.dtype == dtype
        del out
        gc.collect()
        fc.counter.reset_peak()
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        math_peak = fc.peak_bytes - base
    assert fused_peak < scores / 10
    assert math_peak >= scores


def test_pipeline_estimate_on_the_tiny_sdxl_config():
    res = load_script("benchmark").main(["pipeline", "--simulate", "--config", str(REPO / "configs/tiny/tiny-sdxl.yaml"),
                          "--size", "256", "--steps", "1"])
    weights = res["weights_gib"]
    with torch.device("meta"):
        from omegaconf import OmegaConf
        from ldm.util import instantiate_from_config
        model = instantiate_from_config(OmegaConf.load(REPO / "configs/tiny/tiny-sdxl.yaml").model)
    # UNet and text encoders in half, the VAE in float32 (as ldm.inference.cast_for_half_precision)
    half = sum(p.numel() for n in ("model", "conditioner") for p in getattr(model, n).parameters())
    full = sum(p.numel() for p in model.first_stage_model.parameters())
    assert abs(weights * 2 ** 30 - (2 * half + 4 * full)) < 0.02 * weights * 2 ** 30
    for phase in ("text encoders", "sampling", "decoding"):
        assert res["phases"][phase]["peak_gib"] >= weights
    # a 32² latent in half precision: the sampling peak is above the weights by at least the latent batch
    assert res["phases"]["sampling"]["peak_gib"] > weights
