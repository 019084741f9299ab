"""Tiled VAE decoding/encoding (ldm/modules/tiled_vae.py): exactness of synchronized GroupNorm, geometry,
error of the naive and original-release schemes, bounded tile size. CPU, random / oracle weights, fast.

Run with ``-s`` to see the error table.
"""
import pytest
import torch
import torch.nn as nn

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules import tiled_vae
from ldm.modules.tiled_vae import GroupStats, split_axis

TINY = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2, 2],
            num_res_blocks=2, attn_resolutions=[], dropout=0.0)
SD = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
          num_res_blocks=2, attn_resolutions=[], dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many small ops (see conftest.py)


@pytest.fixture(scope="module")
def tiny_vae(ref_dir):
    """The oracle tiny VAE (its stored weights), whose plain decode matches the original code."""
    d = torch.load(ref_dir / "oracle_vae_tiny.pt", weights_only=True)
    assert d["ddconfig"] == TINY
    m = AutoencoderKL(d["ddconfig"], embed_dim=d["embed_dim"]).eval()
    missing, unexpected = m.load_state_dict({k: v.float() for k, v in d["state_dict"].items()}, strict=False)
    assert not [k for k in missing if not k.startswith("loss")] and not unexpected
    return m


def structured_latent(h, w, b=1, seed=0):
    """Smooth large-scale structure plus noise, like an image latent: tiles really differ in statistics."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    base = torch.stack([3 * xx, 2 * yy, torch.sin(3 * xx), 3 * xx * yy])
    return base[None] + 0.5 * torch.randn(b, 4, h, w, generator=g)


def err(a, b):
    e = (a - b).abs()
    return e.max().item(), e.mean().item()


@pytest.fixture(scope="module")
def tiny_full(tiny_vae):
    z = structured_latent(24, 40)
    with torch.no_grad():
        return z, tiny_vae.decode(z)


# ---------------------------------------------------------------------------------------------- geometry

def test_split_axis_covers_any_size():
    for n in (1, 7, 24, 40, 64, 65, 129):
        for t in (1, 5, 16, 64, 96):
            b = split_axis(n, t)
            sizes = [b1 - b0 for b0, b1 in zip(b, b[1:])]
            assert b[0] == 0 and b[-1] == n and len(sizes) == -(-n // t)
            assert max(sizes) <= t and max(sizes) - min(sizes) <= 1


def test_blend_weights_sum_to_one():
    n = 40
    bounds = split_axis(n, 13)  # cores of 10
    for halo in (1, 4, 5):  # bands of neighbouring boundaries do not overlap: an exact partition of unity
        tot = torch.zeros(n)
        for i in range(len(bounds) - 1):
            s, e = max(bounds[i] - halo, 0), min(bounds[i + 1] + halo, n)
            tot[s:e] += tiled_vae._axis_weights(s, e, bounds[i], bounds[i + 1], n, halo, True, "cpu")
        torch.testing.assert_close(tot, torch.ones(n))
    # wider overlaps: the assembler normalizes by the weight sum, constant tiles give a constant image
    halo = 7
    asm = tiled_vae._Assembler(bounds, [0, 8], halo, 0, True, "cpu")
    for i in range(len(bounds) - 1):
        s, e = max(bounds[i] - halo, 0), min(bounds[i + 1] + halo, n)
        asm.add(torch.full((1, 2, e - s, 8), 3.0), i, 0, s, 0)
    torch.testing.assert_close(asm.result(), torch.full((1, 2, n, 8), 3.0))


# ---------------------------------------------------------------------------------------------- statistics

def test_group_stats_over_tiles_equal_full_tensor():
    g = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(2, 64, 37, 53, generator=g) + torch.linspace(-5, 20, 64)[None, :, None, None]
    x[:, :, :10] += 7  # non-stationary: tiles have different statistics
    acc = GroupStats(32)
    for ys, ye in [(0, 11), (11, 30), (30, 37)]:
        for xs, xe in [(0, 20), (20, 21), (21, 53)]:
            acc.add(x[:, :, ys:ye, xs:xe])
    mean, var = acc.result()
    ref_var, ref_mean = torch.var_mean(x.double().reshape(2, 32, -1), dim=-1, correction=0)
    torch.testing.assert_close(mean, ref_mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(var, ref_var, atol=1e-5, rtol=1e-6)


def test_every_groupnorm_uses_full_image_statistics(tiny_vae, tiny_full):
    """Statistics used by the tiled decode == statistics each GroupNorm sees in the plain decode (incl. the
    mid-block attention's norm)."""
    z, _ = tiny_full
    dec = tiny_vae.decoder
    norms = [m for m in dec.modules() if isinstance(m, nn.GroupNorm)]
    seen = {}

    def hook(mod, inp):
        x = inp[0].double()
        v, m = torch.var_mean(x.reshape(x.shape[0], mod.num_groups, -1), dim=-1, correction=0)
        seen[mod] = (m, v)

    handles = [m.register_forward_pre_hook(hook) for m in norms]
    with torch.no_grad():
        tiny_vae.decode(z)
    for h in handles:
        h.remove()
    rec = {}
    tiny_vae.decode_tiled(z, tile_size=16, record_stats=rec)
    assert set(rec) == set(norms) and dec.mid.attn_1.norm in rec
    for m in norms:
        torch.testing.assert_close(rec[m][0], seen[m][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rec[m][1], seen[m][1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- decoding

def test_sync_decode_matches_full_decode_and_beats_naive_tiling(tiny_vae, tiny_full):
    z, full = tiny_full
    rows = {}
    # tile 16 does not divide 24 or 40: cores of 12 and 13-14 latent pixels
    rows["sync (exact halo)"] = err(tiny_vae.decode_tiled(z, tile_size=16), full)
    rows["sync, original scheme, overlap 24"] = err(tiny_vae.decode_tiled(z, tile_size=16, exact=False), full)
    rows["no sync, overlap 24"] = err(tiny_vae.decode_tiled(z, tile_size=16, sync_gn=False), full)
    rows["no sync, no overlap"] = err(tiny_vae.decode_tiled(z, tile_size=16, overlap=0, sync_gn=False), full)
    print("\nmax / mean |tiled - full| (output std %.3f):" % full.std().item())
    for k, (mx, mn) in rows.items():
        print(f"  {k:36s} {mx:.2e} / {mn:.2e}")
    sync = rows["sync (exact halo)"]
    assert sync[0] < 1e-4
    for k in ("no sync, overlap 24", "no sync, no overlap", "sync, original scheme, overlap 24"):
        assert rows[k][0] > 1000 * sync[0] and rows[k][1] > 1000 * sync[1]
    assert rows["no sync, no overlap"][1] > rows["no sync, overlap 24"][1]


def test_error_decreases_with_overlap(tiny_vae, tiny_full):
    """Overlap matters for the schemes whose tiles run on their own: the original release's (shared
    statistics) and the naive one. The exact scheme does not depend on it."""
    z, full = tiny_full
    for kw in (dict(exact=False), dict(sync_gn=False)):
        means = [err(tiny_vae.decode_tiled(z, tile_size=16, overlap=o, **kw), full)[1] for o in (0, 8, 24)]
        print(kw, ["%.2e" % m for m in means])
        assert means[0] > means[1] > means[2]
    a = tiny_vae.decode_tiled(z, tile_size=16, overlap=0)
    b = tiny_vae.decode_tiled(z, tile_size=16, overlap=24)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_one_tile_is_the_plain_decode(tiny_vae, tiny_full):
    z, full = tiny_full
    for kw in (dict(), dict(sync_gn=False), dict(exact=False)):
        assert torch.equal(tiny_vae.decode_tiled(z, tile_size=40, **kw), full)
    forced = tiny_vae.decode_tiled(z, tile_size=40, force_tiled=True)  # same, through the staged runner
    assert err(forced, full)[0] < 1e-4


def test_batch_odd_sizes_and_tiny_tiles(tiny_vae):
    z = structured_latent(17, 23, b=2, seed=3)
    with torch.no_grad():
        full = tiny_vae.decode(z)
    for ts in (5, 9, 17):
        out = tiny_vae.decode_tiled(z, tile_size=ts)
        assert out.shape == full.shape == (2, 3, 136, 184)
        assert err(out, full)[0] < 1e-4, ts


def test_tiles_bound_the_working_set(tiny_vae, tiny_full):
    """No convolution sees more than one tile (+ its few-pixel halo) at any resolution."""
    z, full = tiny_full
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].shape[-2:]))
             for m in tiny_vae.decoder.modules() if isinstance(m, nn.Conv2d)]
    try:
        out = tiny_vae.decode_tiled(z, tile_size=8)
    finally:
        for h in hooks:
            h.remove()
    assert err(out, full)[0] < 1e-4
    # latent cores are 8×8; at every level the tile plus halo stays far below the 24×40-latent image
    max_h = max(s[0] for s in seen)
    max_w = max(s[1] for s in seen)
    assert max_h <= 8 * 8 + 16 and max_w <= 8 * 8 + 16, (max_h, max_w)
    assert max_h * max_w < 0.15 * full.shape[-2] * full.shape[-1]


def test_full_size_sd_vae_architecture():
    """The SD VAE layout (ch 128, ch_mult 1,2,4,4: 512→256→128 channel changes, 1×1 shortcuts), random
    weights, small latent so that it stays fast."""
    torch.manual_seed(0)
    m = AutoencoderKL(SD).eval()
    z = structured_latent(12, 20)
    with torch.no_grad():
        full = m.decode(z)
    out = m.decode_tiled(z, tile_size=8)
    mx, mn = err(out, full)
    naive = err(m.decode_tiled(z, tile_size=8, overlap=0, sync_gn=False), full)
    print(f"\nSD VAE, 12×20 latent, tile 8: sync max {mx:.2e} mean {mn:.2e}; "
          f"naive max {naive[0]:.2e} mean {naive[1]:.2e}; output std {full.std().item():.3f}")
    assert mx < 1e-4 * max(1.0, full.abs().max().item())
    assert naive[1] > 100 * mn


@pytest.mark.parametrize("extra", [dict(attn_resolutions=[16], tanh_out=True), dict(resamp_with_conv=False)],
                         ids=["attention-at-a-level+tanh", "no-resampling-convs"])
def test_other_layouts(extra):
    """Self-attention inside an up/down level (global, like the mid block), tanh output, average-pool
    downsampling and conv-free upsampling: decode and encode stay exact."""
    torch.manual_seed(0)
    cfg = dict(TINY, ch_mult=[1, 2], resolution=32, **extra)
    m = AutoencoderKL(cfg).eval()
    z = structured_latent(12, 18)
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        full, enc = m.decode(z), m.encode(x).parameters
    assert err(m.decode_tiled(z, tile_size=5), full)[0] < 1e-4
    tiled = m.encode_tiled(x, tile_size=7).parameters
    assert tiled.shape == enc.shape and err(tiled, enc)[0] < 1e-4


# ---------------------------------------------------------------------------------------------- encoding

def test_tiled_encode(tiny_vae):
    g = torch.Generator().manual_seed(2)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 200), torch.linspace(-1, 1, 328), indexing="ij")
    x = (torch.stack([xx, yy, xx * yy])[None] + 0.3 * torch.randn(1, 3, 200, 328, generator=g)).clamp(-1, 1)
    with torch.no_grad():
        full = tiny_vae.encode(x)  # 200×328 is not a multiple of 8 · tile: latent 25×41
    post = tiny_vae.encode_tiled(x, tile_size=10)
    assert post.mean.shape == full.mean.shape == (1, 4, 25, 41)
    assert err(post.mean, full.mean)[0] < 1e-4 and err(post.logvar, full.logvar)[0] < 1e-4
    naive = tiny_vae.encode_tiled(x, tile_size=10, sync_gn=False, overlap=0)
    assert err(naive.mean, full.mean)[1] > 100 * err(post.mean, full.mean)[1]
    orig = tiny_vae.encode_tiled(x, tile_size=10, exact=False, overlap=8)
    assert orig.mean.shape == full.mean.shape
    rec = {}
    tiny_vae.encode_tiled(x, tile_size=10, record_stats=rec)
    assert set(rec) == {m for m in tiny_vae.encoder.modules() if isinstance(m, nn.GroupNorm)}


def test_offload_options_agree_on_cpu(tiny_vae, tiny_full):
    z, _ = tiny_full
    ref = tiny_vae.decode_tiled(z, tile_size=16)
    for kw in (dict(offload=True), dict(offload=False), dict(device_budget=0)):
        assert torch.equal(tiny_vae.decode_tiled(z, tile_size=16, **kw), ref)


def test_bad_arguments(tiny_vae, tiny_full):
    z, _ = tiny_full
    with pytest.raises(ValueError):
        tiny_vae.decode_tiled(z, tile_size=0)
    with pytest.raises(ValueError):
        tiny_vae.decode_tiled(z, overlap=-1)


def test_out_of_memory_in_one_piece_falls_back_to_synced_tiles(tiny_vae):
    """LatentDiffusion.decode_first_stage: a one-piece decode that runs out of memory is redone in tiles with
    synchronized GroupNorm (the finished latent is not lost), and the image is the one-piece decode's."""
    from types import SimpleNamespace
    from ldm.models.diffusion.ddpm import LatentDiffusion
    z = structured_latent(72, 80, seed=3)  # larger than the default 64-pixel tile: several tiles
    with torch.no_grad():
        full = tiny_vae.decode(z / 0.5)
    calls = []

    class OutOfMemoryInOnePiece(nn.Module):  # the VAE, on a card too small for the whole image at once
        def decode(self, z):
            calls.append(tuple(z.shape))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

        def decode_tiled(self, z, **kw):
            calls.append(("tiled", kw))
            return tiny_vae.decode_tiled(z, **kw)

    fake = SimpleNamespace(scale_factor=0.5, first_stage_model=OutOfMemoryInOnePiece())
    with pytest.warns(ResourceWarning, match="out of memory decoding a 72x80 latent"):
        out = LatentDiffusion.decode_first_stage(fake, z)
    assert calls == [(1, 4, 72, 80), ("tiled", {"sync_gn": True})]
    assert err(out, full)[0] < 1e-4

    class NoTiles(nn.Module):  # a first stage without tiled decoding: the error is the original one
        def decode(self, z):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(torch.OutOfMemoryError):
        LatentDiffusion.decode_first_stage(SimpleNamespace(scale_factor=0.5, first_stage_model=NoTiles()), z)
