"""Decoding that fits the memory (ldm/modules/vae_memory.py, AutoencoderKL.decode_auto) and the low-memory paths
(ldm/memory.py: text encoders and UNet blocks in host memory, window batches sized to the memory; the UNet's
activation estimate ldm/modules/unet_memory.py). CPU only, small sizes.

Oracles: the memory models are compared with the bytes of live tensors *measured* while the real code runs (the
live-storage counter of tools/fake_cuda.py on real CPU tensors; on fake CUDA tensors for float16 and large sizes);
a plan is checked by running it under the memory it was made for; images are compared with the one-piece float32
decode.
"""
import gc
import math

import pytest
import torch
import torch.nn as nn

from conftest import REPO_ROOT, load_script
from ldm import memory
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules import vae_memory
from ldm.modules.unet_memory import unet_peak_bytes
from tools.fake_cuda import ALLOCATOR_GRANULARITY, FakeCuda, LiveCudaBytes, cast_parameters_, fused_attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2, 2],
            num_res_blocks=2, attn_resolutions=[], dropout=0.0)
SD = dict(TINY, ch=128, ch_mult=[1, 2, 4, 4])  # the SD / SDXL VAE's layout
ATTN = dict(TINY, ch_mult=[1], num_res_blocks=1, attn_resolutions=[64])  # attention dominates the peak
MiB = 2 ** 20
# float16's unit roundoff; float16 decoding is held to 16 of them relative to the output's scale: the error of L
# independent roundings grows like sqrt(L)·u (about 6u through the 30-odd layers of the decoder), doubled for
# the renormalisations. For an image in [-1, 1] that is 2^-7, one level of an 8-bit image (2/255).
U16 = 2.0 ** -11
HALF_TOL = 16 * U16
SYNC_TOL = 1e-4  # synchronized tiles vs one piece in float32 (tests/test_tiled_vae.py)


def vae_of(cfg, seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(cfg).eval()


def latent(h, w, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    base = torch.stack([3 * xx, 2 * yy, torch.sin(3 * xx), 3 * xx * yy])
    return base[None] + 0.5 * torch.randn(b, 4, h, w, generator=g)


def measured_peak(fn, *existing):
    """Peak bytes of the tensors that ``fn`` creates on the CPU (tensors alive before it are registered first:
    a view of a weight is not an allocation)."""
    counter = LiveCudaBytes("cpu")
    for t in existing:
        counter.add(t)
    base = counter.current
    counter.reset_peak()
    with torch.no_grad(), counter:
        out = fn()
    del out
    return counter.peak - base


def within(model, measured, rel=0.01, slack=64 * ALLOCATOR_GRANULARITY):
    """The model counts every tensor the code keeps; what it leaves out are the tiny per-group statistics and the
    counter's rounding of each storage to the allocator's 512 bytes (at most a few dozen storages alive)."""
    return abs(model - measured) <= rel * measured + slack


# ---------------------------------------------------------------------------------------------- the memory model

@pytest.mark.parametrize("cfg", [TINY, SD, ATTN], ids=["tiny", "sd-layout", "attention"])
def test_one_piece_decoder_model_equals_measured_tensor_bytes(cfg):
    vae = vae_of(cfg)
    for hw in ((16, 24), (24, 40)) if cfg is not SD else ((12, 20),):
        z = latent(*hw)
        measured = measured_peak(lambda: vae.decode(z / 0.5), z, *vae.parameters())
        model = vae_memory.decoder_peak_bytes(vae, z.shape, torch.float32)
        assert within(model, measured), (hw, model, measured)


def test_inference_path_gives_the_autograd_path_bit_for_bit():
    """Without autograd the ResnetBlocks and the last norm/SiLU/conv run in place (what the model above counts);
    the out-of-place ``forward`` under autograd is the reference: the same operations, so the same bits."""
    from ldm.modules.diffusionmodules.model import ResnetBlock
    torch.manual_seed(3)
    for ci, co, temb in ((32, 32, 0), (32, 64, 0), (64, 32, 16)):
        block = ResnetBlock(in_channels=ci, out_channels=co, temb_channels=temb).eval()
        x = torch.randn(2, ci, 12, 10)
        t = torch.randn(2, temb) if temb else None
        with torch.enable_grad():
            ref = block(x, t).detach()
        with torch.no_grad():
            assert torch.equal(block(x, t), ref), (ci, co, temb)
    vae = vae_of(TINY)
    z, x = latent(12, 20), torch.randn(1, 3, 48, 80)
    with torch.enable_grad():
        ref_dec, ref_enc = vae.decode(z).detach(), vae.encode(x).mean.detach()
    with torch.no_grad():
        assert torch.equal(vae.decode(z), ref_dec) and torch.equal(vae.encode(x).mean, ref_enc)


def test_encoder_model_equals_measured_tensor_bytes():
    for cfg in (TINY, ATTN):
        vae = vae_of(cfg)
        x = torch.randn(1, 3, 48, 80)
        measured = measured_peak(lambda: vae.encode(x).parameters, x, *vae.parameters())
        assert within(vae_memory.encoder_peak_bytes(vae, x.shape), measured)


@pytest.mark.parametrize("cfg,tile", [(TINY, 5), (TINY, 16), (SD, 8)], ids=["tiny-5", "tiny-16", "sd-layout-8"])
def test_tiled_model_equals_measured_tensor_bytes(cfg, tile):
    vae = vae_of(cfg)
    z = latent(24, 40) if cfg is TINY else latent(12, 20)
    measured = measured_peak(lambda: vae.decode_tiled(z / 0.5, tile_size=tile), z, *vae.parameters())
    model = vae_memory.tiled_peak_bytes(vae, z.shape, torch.float32, tile)["device"]
    assert within(model, measured, rel=0.02), (model, measured)


def test_models_match_fake_cuda_in_float16_at_1024():
    """The SD VAE (full size) decoding a 1024² image in float16 on fake CUDA tensors, one piece and tiled with the
    stores on the device, then with a device budget that sends some of them to host memory."""
    from ldm.util import instantiate_from_config, load_config_file
    cfg = load_config_file(REPO_ROOT / "configs/stable-diffusion/v2-inference.yaml").model.params.first_stage_config
    with FakeCuda() as fc, torch.no_grad():
        with torch.device("cuda"):
            vae = instantiate_from_config(cfg).eval()
        cast_parameters_(vae, torch.float16)
        fc.count_existing(vae)
        with fc.tracking(), fused_attention():
            z = torch.randn(1, 4, 128, 128, dtype=torch.float16, device="cuda")
            cases = [(lambda: vae.decode(z / 0.5), vae_memory.decoder_peak_bytes(vae, z.shape, torch.float16))]
            for budget in (math.inf, 0.4 * 2 ** 30):
                est = vae_memory.tiled_peak_bytes(vae, z.shape, torch.float16, 64, budget)["device"]
                cases.append((lambda b=budget: vae.decode_tiled(
                    z / 0.5, tile_size=64, **({"offload": False} if b == math.inf else {"device_budget": b})), est))
            for fn, model in cases:
                base = fc.current_bytes
                fc.counter.reset_peak()
                out = fn()
                del out
                gc.collect()
                assert within(model, fc.peak_bytes - base), (model, fc.peak_bytes - base)


def test_attention_keeps_no_token_by_token_matrix():
    """AttnBlock hands contiguous q, k, v to scaled_dot_product_attention, so a fused kernel runs: memory linear
    in the tokens. (Transposed views rule the fused kernels out: the math kernel then holds two N×N matrices,
    the old one-piece decode's 2 × 16 GiB in float32 at 2048².)"""
    from ldm.modules.diffusionmodules.model import AttnBlock
    block = AttnBlock(32).eval()
    n_tok = 64 * 64
    h = torch.randn(1, 32, 64, 64)
    peak = measured_peak(lambda: block(h), h, *block.parameters())
    assert peak < 12 * 32 * n_tok * 4  # a few (tokens × channels) tensors
    assert peak < n_tok * n_tok * 4 / 4  # far below one N×N float32 matrix (64 MiB here)
    q = torch.randn(1, 1, 32, n_tok)
    transposed = measured_peak(lambda: torch.nn.functional.scaled_dot_product_attention(
        q.transpose(2, 3), q.transpose(2, 3), q.transpose(2, 3)), q)
    assert transposed >= n_tok * n_tok * 4  # what the old code paid


def test_fake_cuda_routes_transposed_attention_to_the_math_kernel():
    n = 2048
    with FakeCuda() as fc, fc.tracking(), fused_attention():
        q = torch.randn(1, 1, 64, n, device="cuda", dtype=torch.float16)
        base = fc.current_bytes
        fc.counter.reset_peak()
        torch.nn.functional.scaled_dot_product_attention(q.transpose(2, 3), q.transpose(2, 3), q.transpose(2, 3))
        assert fc.peak_bytes - base >= n * n * 2
        fc.counter.reset_peak()
        c = q.transpose(2, 3).contiguous()
        torch.nn.functional.scaled_dot_product_attention(c, c, c)
        assert fc.peak_bytes - base < n * n * 2 / 8


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_unet_activation_estimate_equals_measured(name):
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    cfg = OmegaConf.load(REPO_ROOT / f"configs/tiny/tiny-{name}.yaml").model.params.unet_config
    torch.manual_seed(0)
    unet = instantiate_from_config(cfg).eval()
    ctx_dim = cfg.params.context_dim if isinstance(cfg.params.context_dim, int) else list(cfg.params.context_dim)[0]
    for side in (16, 40):
        x, t = torch.randn(2, 4, side, side), torch.full((2,), 500)
        c = torch.randn(2, 77, int(ctx_dim))
        y = torch.randn(2, cfg.params.adm_in_channels) if cfg.params.get("adm_in_channels") else None
        measured = measured_peak(lambda: unet(x, t, context=c, y=y), x, t, c, *([y] if y is not None else []),
                                 *unet.parameters(), *unet.buffers())
        assert within(unet_peak_bytes(unet, (side, side), 2, 4), measured), (side, measured)


def test_unet_estimate_matches_fake_cuda_for_sd21_in_float16():
    from ldm.util import instantiate_from_config, load_config_file, no_weight_init
    cfg = load_config_file(REPO_ROOT / "configs/stable-diffusion/v2-inference.yaml").model.params.unet_config
    cfg.params.use_checkpoint = False
    with FakeCuda() as fc, torch.no_grad():
        with torch.device("cuda"), no_weight_init():
            unet = instantiate_from_config(cfg).eval().requires_grad_(False)
        cast_parameters_(unet, torch.float16)
        fc.count_existing(unet)
        with fc.tracking(), fc.autocast(torch.float16), fused_attention():
            x, t = torch.randn(2, 4, 64, 64, device="cuda"), torch.full((2,), 500, device="cuda")
            c = torch.randn(2, 77, 1024, device="cuda")
            base = fc.current_bytes
            fc.counter.reset_peak()
            out = unet(x, t, context=c)
            del out
            assert within(unet_peak_bytes(unet, (64, 64), 2, 2), fc.peak_bytes - base)


# ---------------------------------------------------------------------------------------------- the plan

def test_plan_prefers_one_piece_then_the_largest_tiles_that_fit():
    vae = vae_of(SD)
    shape = (1, 4, 96, 96)
    one = vae_memory.decoder_peak_bytes(vae, shape)
    need = vae_memory._needed(one, "cpu")
    plan = vae_memory.plan_decode(vae, shape, torch.float32, int(need) + 1, "cpu")
    assert not plan.tiled and plan.estimate == one
    assert not vae_memory.plan_decode(vae, shape, torch.float32, None, "cpu").tiled  # unknown memory
    # less than one piece needs: the largest tile size whose whole run fits, everything else too large (on the CPU
    # the tiles' stores share the one memory: the smallest tiles need about 0.80 of one piece, 32-pixel ones 0.87)
    avail = int(need * 0.9)
    plan = vae_memory.plan_decode(vae, shape, torch.float32, avail, "cpu")
    assert plan.tiled and plan.fits and vae_memory._needed(plan.estimate, "cpu") <= avail
    larger = [t for t in vae_memory.TILE_SIZES if plan.tile_size < t < 96]
    for t in larger:
        assert vae_memory._needed(vae_memory.tiled_peak_bytes(vae, shape, torch.float32, t)["device"], "cpu") > avail
    # the flags: --tiled_decoding tiles even when one piece fits, --tile_size is kept
    assert vae_memory.plan_decode(vae, shape, torch.float32, 10 ** 12, "cpu", tiled=True).tiled
    assert vae_memory.plan_decode(vae, shape, torch.float32, 10 ** 12, "cpu", tiled=True, tile_size=24).tile_size == 24


def test_cuda_plan_sends_stores_to_host_memory_when_even_tiles_do_not_fit():
    vae = vae_of(SD)
    shape = (1, 4, 256, 256)
    everything_on_device = vae_memory.tiled_peak_bytes(vae, shape, torch.float16, vae_memory.TILE_SIZES[-1])
    avail = int(everything_on_device["device"] * 0.5)
    plan = vae_memory.plan_decode(vae, shape, torch.float16, avail, "cuda")
    assert plan.tiled and plan.offload is None and 0 < plan.device_budget < avail
    est = vae_memory.tiled_peak_bytes(vae, shape, torch.float16, plan.tile_size, plan.device_budget)
    assert est["host"] > 0 and vae_memory._needed(est["device"], "cuda") <= avail * 1.0001


@pytest.mark.parametrize("fraction", [0.9, 0.85])
def test_planned_decode_stays_within_the_memory_and_is_the_one_piece_image(fraction, monkeypatch):
    """On the CPU the stores share the one memory, so tiles save a tenth to a fifth of the one-piece peak (one
    piece without autograd runs its SiLUs and residual sums in place: 3cN per ResnetBlock, not 4cN):
    memory between the two makes the plan tile, with the largest tiles that fit, and the run stays inside."""
    monkeypatch.setitem(vae_memory.MARGIN, "cpu", (0.10, 0))  # the relative margin only (small sizes here)
    vae = vae_of(TINY)
    z = latent(40, 48, seed=1)
    with torch.no_grad():
        full = vae.decode(z)
    one = vae_memory.decoder_peak_bytes(vae, z.shape)
    avail = int(vae_memory._needed(one, "cpu") * fraction)
    peak = measured_peak(lambda: vae.decode_auto(z, available=avail), z, *vae.parameters())
    plan = vae.last_plan
    assert plan.tiled and plan.fits and vae_memory._needed(plan.estimate, "cpu") <= avail
    assert within(plan.estimate, peak, rel=0.02)  # the estimate is what the run used
    assert peak <= avail
    out = vae.decode_auto(z, available=avail)
    assert (out - full).abs().max() < SYNC_TOL * max(1.0, full.abs().max().item())


def test_decode_first_stage_plans_from_the_free_memory(monkeypatch):
    from types import SimpleNamespace
    from ldm.models.diffusion.ddpm import LatentDiffusion
    vae = vae_of(TINY)
    z = latent(40, 48, seed=2)
    with torch.no_grad():
        full = vae.decode(z / 0.5)
    host = SimpleNamespace(scale_factor=0.5, first_stage_model=vae)
    one = vae_memory.decoder_peak_bytes(vae, z.shape)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10 ** 12)
    out = LatentDiffusion.decode_first_stage(host, z)
    assert not vae.last_plan.tiled and torch.equal(out, full)
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(one * 0.6))
    out = LatentDiffusion.decode_first_stage(host, z)
    assert vae.last_plan.tiled
    assert (out - full).abs().max() < SYNC_TOL * max(1.0, full.abs().max().item())
    # explicit options override: --tiled_decoding --tile_size 8 with all the memory in the world
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10 ** 12)
    LatentDiffusion.decode_first_stage(host, z, tile_size=8, sync_gn=True, overlap=24)
    assert vae.last_plan.tiled and vae.last_plan.tile_size == 8


def test_out_of_memory_is_a_last_resort(monkeypatch):
    vae = vae_of(TINY)
    z = latent(24, 40)
    with torch.no_grad():
        full = vae.decode(z)
    calls = []
    forward = type(vae.decoder).forward

    def once(self, h):  # the one-piece decode runs out of memory (the estimate leaves out workspaces)
        calls.append(tuple(h.shape))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, h)

    monkeypatch.setattr(type(vae.decoder), "forward", once)
    with pytest.warns(ResourceWarning, match="out of memory decoding a 24x40 latent"):
        out = vae.decode_auto(z, available=10 ** 12)
    assert vae.last_plan.tiled and vae.last_plan.offload is True
    assert (out - full).abs().max() < SYNC_TOL * max(1.0, full.abs().max().item())


def test_encode_first_stage_tiles_when_one_piece_does_not_fit(monkeypatch):
    from types import SimpleNamespace
    from ldm.models.diffusion.ddpm import LatentDiffusion
    vae = vae_of(TINY)
    x = torch.randn(1, 3, 192, 256).clamp(-1, 1)
    with torch.no_grad():
        full = vae.encode(x).mean
    host = SimpleNamespace(first_stage_model=vae)
    one = vae_memory.encoder_peak_bytes(vae, x.shape)
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(one * 0.5))
    assert vae_memory.plan_encode(vae, x.shape, torch.float32, int(one * 0.5), "cpu") is not None
    calls = []
    monkeypatch.setattr(vae, "encode_tiled", lambda x, **kw: calls.append(kw) or AutoencoderKL.encode_tiled(vae, x, **kw))
    post = LatentDiffusion.encode_first_stage(host, x)
    assert calls and (post.mean - full).abs().max() < SYNC_TOL


# ---------------------------------------------------------------------------------------------- float16

def test_float16_decoding_matches_float32():
    vae = vae_of(TINY)
    z = latent(8, 16)  # small: float16 convolutions are slow on the CPU
    with torch.no_grad():
        ref = vae.decode(z)
    scale = ref.abs().max().item()
    vae.compute_dtype = torch.float16
    for kw in ({}, {"tile_size": 4}):
        out = vae.decode_auto(z, available=10 ** 12, **kw)
        assert vae.last_plan.dtype == torch.float16 and out.dtype == torch.float32
        assert (out - ref).abs().max().item() <= HALF_TOL * scale, kw
    assert vae.post_quant_conv.weight.dtype == torch.float32  # the float16 copy is not the model's weights
    assert all(not k.startswith("_") for k in vae.state_dict())


@pytest.fixture
def overflowing_vae():
    """A VAE whose conv1 in one ResnetBlock of the 2nd level produces values beyond float16's ±65504 where the
    latent is strong (its bottom-right corner), below it elsewhere."""
    vae = vae_of(TINY)
    with torch.no_grad():
        vae.decoder.up[1].block[1].conv1.weight.mul_(3e4)
    z = latent(8, 16)
    z[:, :, 5:, 12:] *= 4
    return vae, z


def test_float16_tiles_that_overflow_are_redone_in_float32(overflowing_vae):
    vae, z = overflowing_vae
    with torch.no_grad():
        ref = vae.decode(z)
        acts = []
        hook = vae.decoder.up[1].block[1].conv1.register_forward_hook(lambda m, i, o: acts.append(o.abs().max()))
        vae.decode(z)
        hook.remove()
    assert acts[0] > torch.finfo(torch.float16).max and torch.isfinite(ref).all()
    vae.compute_dtype, vae.overflow_prone = torch.float16, True
    out = vae.decode_auto(z, available=10 ** 12, tile_size=4)
    report = vae.last_plan.report
    tiles = {t for _, t in report["redone"]}
    assert 0 < len(tiles) < 8  # only the tiles that see the strong corner (2 x 4 tiles in all)
    assert report["promoted"]  # the store of conv1's output holds the large values in float32
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() <= HALF_TOL * ref.abs().max().item()
    # one piece: the same guard through the stage runner (a single tile)
    out = vae.decode_auto(z, available=10 ** 12)
    assert not vae.last_plan.tiled and vae.last_plan.staged and vae.last_plan.report["redone"]
    assert (out - ref).abs().max().item() <= HALF_TOL * ref.abs().max().item()


def test_float16_overflow_without_the_guard_is_decoded_again_in_float32(overflowing_vae):
    vae, z = overflowing_vae
    with torch.no_grad():
        ref = vae.decode(z)
    vae.compute_dtype = torch.float16  # overflow_prone False: the SD VAE's setting
    with pytest.warns(ResourceWarning, match="overflowed; decoding it again in float32"):
        out = vae.decode_auto(z, available=10 ** 12)
    assert vae.last_plan.dtype == torch.float32 and torch.equal(out, ref)


def test_decoding_dtype_per_model():
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.load(REPO_ROOT / "configs/tiny/tiny-sdxl.yaml").model)
        sd = instantiate_from_config(OmegaConf.load(REPO_ROOT / "configs/tiny/tiny-sd2.yaml").model)
        x4 = instantiate_from_config(OmegaConf.load(REPO_ROOT / "configs/tiny/tiny-x4-upscaler.yaml").model)
    assert model.first_stage_model.overflow_prone and not sd.first_stage_model.overflow_prone
    assert model.first_stage_model.decode_dtype("cuda") == torch.float16
    assert model.first_stage_model.decode_dtype("cpu") == torch.float32
    assert sd.first_stage_model.decode_dtype("cuda") == torch.float16
    assert x4.first_stage_model.decode_dtype("cuda") == torch.float32  # its decoder breaks in half precision


# ---------------------------------------------------------------------------------------------- low memory

def test_available_bytes_reads_the_host_memory():
    avail = memory.available_bytes("cpu")
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    assert avail is not None and 0 < avail <= total


def _fake_cuda_unet():
    """A tiny SD-2-layout UNet on fake CUDA tensors; yields (fc, unet, inputs)."""
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    cfg = OmegaConf.load(REPO_ROOT / "configs/tiny/tiny-sd2.yaml").model.params.unet_config
    with torch.device("cuda"):
        unet = instantiate_from_config(cfg).eval().requires_grad_(False)
    x = torch.randn(2, 4, 32, 32, device="cuda")
    t = torch.full((2,), 500, device="cuda")
    c = torch.randn(2, 77, 32, device="cuda")
    return unet, (x, t, c)


def test_sequential_offload_keeps_one_block_on_the_device():
    """On fake CUDA tensors: with the UNet's blocks in host memory, the device holds at most the largest block's
    weights besides the activations; each block is on the device exactly during its own forward."""
    with FakeCuda() as fc, torch.no_grad():
        unet, (x, t, c) = _fake_cuda_unet()
        weights = memory.module_bytes(unet)
        units = memory.unet_units(unet)
        largest = max(memory.module_bytes(u) for u in units)
        with fc.tracking(), fused_attention():
            fc.count_existing(unet)
            base = fc.current_bytes
            fc.counter.reset_peak()
            out = unet(x, t, context=c)
            plain_peak = fc.peak_bytes - base  # activations (the weights are in base)
            plain_total = fc.peak_bytes
            del out
            gc.collect()
            offload = memory.SequentialOffload(unet, "cuda")
            seen = []
            for u in units:
                u.register_forward_pre_hook(lambda m, a: seen.append(
                    (all(p.device.type == "cuda" for p in m.parameters()),
                     sum(p.device.type == "cuda" for p in unet.parameters()) == len(list(m.parameters())))))
            gc.collect()
            fc.counter.reset_peak()
            start = fc.current_bytes
            unet(x, t, context=c)
            offload_peak = fc.peak_bytes - start  # activations and the weights of the blocks on the device
            offload_total = fc.peak_bytes
            assert start <= plain_total - plain_peak - weights + weights * 0.01  # no weights left on the device
            assert all(p.device.type == "cpu" for p in unet.parameters())
            assert offload.moves == len(units) and all(a and b for a, b in seen)
            offload.remove()
            assert all(p.device.type == "cuda" for p in unet.parameters())
    assert offload_peak <= plain_peak + largest  # one block's weights at a time
    assert offload_total < plain_total - weights + 2 * largest


def test_text_encoders_wait_in_host_memory_between_prompts():
    from types import SimpleNamespace

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    class Model:
        def __init__(self):
            self.cond_stage_model = Encoder()
            self.seen = []

        def get_learned_conditioning(self, c):
            self.seen.append(self.cond_stage_model.lin.weight.device.type)
            return self.cond_stage_model(c)

    with FakeCuda():
        with torch.device("cuda"):
            model = Model()
            x = torch.randn(2, 4)
        offload = memory.offload_text_encoders(model, "cuda")
        assert model.cond_stage_model.lin.weight.device.type == "cpu"
        out = model.get_learned_conditioning(x)
        assert model.seen == ["cuda"] and out.device.type == "cuda"
        assert model.cond_stage_model.lin.weight.device.type == "cpu"
        offload.remove()
        assert model.cond_stage_model.lin.weight.device.type == "cuda"
        assert "get_learned_conditioning" not in vars(model)
    assert SimpleNamespace  # (imported for symmetry with the other tests)


def test_window_batches_are_sized_to_the_memory(monkeypatch):
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    from ldm.windows import MultiDiffusionGuidance, fitting_window_batch
    cfg = OmegaConf.load(REPO_ROOT / "configs/tiny/tiny-sd2.yaml").model.params.unet_config
    unet = instantiate_from_config(cfg).eval()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.diffusion_model = unet
            self.calls = []

        def apply_model(self, x, t, c):
            self.calls.append(x.shape[0])
            return torch.zeros_like(x)

    model = Model()
    per_window = unet_peak_bytes(unet, (16, 16), 2, 4)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10 ** 12)
    assert fitting_window_batch(model, 8, (16, 16), 1, "cpu") == 8
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(3.5 * per_window / 0.9))
    assert fitting_window_batch(model, 8, (16, 16), 1, "cpu") == 3
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1)
    assert fitting_window_batch(model, 8, (16, 16), 1, "cpu") == 1
    # the guidance uses it: 9 windows of 16² on a 32² latent, stride 8, at most 3 per UNet call
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(3.5 * per_window / 0.9))
    guidance = MultiDiffusionGuidance(16, stride=8, window_batch=8)
    x = torch.randn(1, 4, 32, 32)
    guidance(model, x, torch.full((1,), 10), torch.zeros(1, 77, 32), torch.zeros(1, 77, 32), 5.0)
    assert max(model.calls) <= 2 * 3 and sum(model.calls) == 2 * 9  # guided pairs


def test_every_attention_path_goes_through_scaled_dot_product_attention(monkeypatch):
    """No method forms attention scores by hand: softmax is never called while the UNet runs with each method's
    processors (FreeScale's scale fusion with its global attention, attention scaling, HiDiffusion's windows,
    FouriScale, ScaleCrafter) and the window methods (MultiDiffusion, DemoFusion); SDPA is, always with inputs a
    fused kernel takes (a unit last stride), the VAE's attention included."""
    import torch.nn.functional as F
    txt2img = load_script("txt2img")
    make = load_script("make_random_checkpoint")
    from omegaconf import OmegaConf
    calls = {"sdpa": 0}
    sdpa = F.scaled_dot_product_attention

    def counted(q, k, v, *a, **kw):
        calls["sdpa"] += 1
        # a unit last stride: what the fused kernels need (else the math kernel forms the N×N scores)
        assert all(t.stride(-1) == 1 for t in (q, k, v)), [t.stride() for t in (q, k, v)]
        return sdpa(q, k, v, *a, **kw)

    def refused(*a, **k):
        raise AssertionError("softmax called: an attention path without scaled_dot_product_attention")

    config = REPO_ROOT / "configs/tiny/tiny-sd2.yaml"
    tmp = pytest.importorskip("tempfile").mkdtemp()
    ckpt = make.save_checkpoint(make.make_random_state_dict(OmegaConf.load(config), seed=4), f"{tmp}/m.ckpt")
    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    monkeypatch.setattr(F, "softmax", refused)
    monkeypatch.setattr(torch, "softmax", refused)
    monkeypatch.setattr(torch.Tensor, "softmax", refused)
    for method, extra in (("freescale", ["--freescale_stages", "64x64", "128x128"]),
                          ("attn_scale", []), ("hidiffusion", []), ("multidiffusion", ["--md_stride", "8"]),
                          ("demofusion", []), ("fouriscale", []),
                          ("scalecrafter", ["--scalecrafter_config", REPO_ROOT / "configs/scalecrafter/sd2.1_1024x1024.yaml"])):
        calls["sdpa"] = 0
        argv = ["--config", config, "--ckpt", ckpt, "--outdir", f"{tmp}/{method}", "--steps", "2", "--H", "128",
                "--W", "128", "--method", method, "--skip_grid", *extra]
        assert txt2img.main([str(a) for a in argv]) == 0, method
        assert calls["sdpa"] > 0, method


def test_the_unet_waits_in_host_memory_while_a_tight_decode_runs(monkeypatch):
    """When the decoder would have to keep inter-stage tensors in host memory, the UNet's weights leave the device
    for the decode (fake CUDA tensors: where the weights are is checked during and after)."""
    from types import SimpleNamespace
    from ldm.models.diffusion.ddpm import room_for_decoding
    with FakeCuda():
        with torch.device("cuda"):
            vae = vae_of(SD)
            unet = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 4, 3))
            z = torch.randn(1, 4, 64, 64)
        host = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet), first_stage_model=vae)
        shape = tuple(z.shape)
        one = vae_memory.decoder_peak_bytes(vae, shape, torch.float16)
        monkeypatch.setattr(memory, "available_bytes", lambda device: int(one * 4))  # plenty: nothing moves
        with room_for_decoding(host, z, {}):
            assert all(p.device.type == "cuda" for p in unet.parameters())
        tiny = vae_memory.tiled_peak_bytes(vae, shape, torch.float16, vae_memory.TILE_SIZES[-1])["device"] / 3
        monkeypatch.setattr(memory, "available_bytes", lambda device: int(tiny))  # stores would go to the host
        for _ in range(2):  # the host copy is made once and reused
            with room_for_decoding(host, z, {}):
                assert all(p.device.type == "cpu" for p in unet.parameters())
            assert all(p.device.type == "cuda" for p in unet.parameters())
        assert host.__dict__["_parked_unet"][1].moves == 2


def test_lowvram_flags_give_the_same_image(tmp_path):
    """scripts/txt2img.py --lowvram --sequential_offload (applied on the CPU too, where nothing is copied): the text
    encoders and every UNet block are swapped in and out around their calls, and the image is the same."""
    import numpy as np
    from omegaconf import OmegaConf
    from PIL import Image
    txt2img = load_script("txt2img")
    make = load_script("make_random_checkpoint")
    config = REPO_ROOT / "configs/tiny/tiny-sd2.yaml"
    ckpt = make.save_checkpoint(make.make_random_state_dict(OmegaConf.load(config), seed=5), tmp_path / "m.ckpt")
    loads = []
    original = memory.HostWeights.load

    def counted(self):
        loads.append(type(self.module).__name__)
        return original(self)

    common = ["--config", config, "--ckpt", ckpt, "--steps", "2", "--H", "64", "--W", "64", "--skip_grid",
              "--scalecrafter_config", REPO_ROOT / "configs/scalecrafter/sd2.1_1024x1024.yaml"]
    assert txt2img.main([str(a) for a in common + ["--outdir", tmp_path / "a"]]) == 0
    memory.HostWeights.load = counted
    try:
        assert txt2img.main([str(a) for a in common + ["--outdir", tmp_path / "b", "--lowvram",
                                                         "--sequential_offload"]]) == 0
    finally:
        memory.HostWeights.load = original
    a = np.asarray(Image.open(tmp_path / "a/samples/00000.png"))
    b = np.asarray(Image.open(tmp_path / "b/samples/00000.png"))
    assert np.array_equal(a, b)
    assert "FrozenOpenCLIPEmbedder" in loads  # the text encoder, brought in to encode
    assert loads.count("TimestepEmbedSequential") >= 2 * 2 * 12  # every input/output block, each guided step
