"""FreeScale options for the paper tables: the release's blended VAE tiling (ldm/methods/freescale/release_tiling.py) and
Table 2's "Dilated Up-Blocks" ablation (ldm/methods/freescale/ablations.py). CPU, random weights, seconds."""
from types import SimpleNamespace

import pytest
import torch

from ldm.methods.freescale import ablations, release_tiling
from ldm.methods.freescale.cascade import FreeScale, FreeScaleSettings, restrained_layer_names
from ldm.methods.freescale.presets import load_preset, make_settings
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.unet_hooks.layers import LayerNames

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_VAE = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)   # f = 4


def tiny_sdxl_like_unet():
    """SDXL's layout at toy width: 3 levels, 2 ResBlocks each, no attention at the first level."""
    torch.manual_seed(0)
    return UNetModel(image_size=16, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2],
                     num_res_blocks=2, channel_mult=[1, 2, 2], num_head_channels=8, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=16, use_linear_in_transformer=True, legacy=False).eval()


# --------------------------------------------------------------------------------------------------
# the release's VAE tiling
# --------------------------------------------------------------------------------------------------
def test_tile_starts_are_the_release_geometry():
    # diffusers AutoencoderKL with SDXL's VAE: 1024-px tiles every 768 px, 128-latent tiles every 96
    assert release_tiling.tile_starts(2048, 1024) == [0, 768, 1536]
    assert release_tiling.tile_starts(256, 128) == [0, 96, 192]
    assert release_tiling.tile_starts(4096, 1024) == [0, 768, 1536, 2304, 3072, 3840]


def test_blended_tiles_of_the_identity_is_the_input():
    """Overlapping tiles of the same values cross-fade into the same values; the crops tile the output exactly."""
    x = torch.randn(2, 3, 37, 53, dtype=torch.float64)
    out = release_tiling.blended_tiles(x, lambda t: t.clone(), tile=16, out_tile=16)
    assert out.shape == x.shape
    assert torch.equal(out, x)


def test_cross_fade_weights_by_hand():
    """One row of tiles (6 high, under the stride), 8 wide at stride 6 (blend 2, keep 6), each tile replaced by
    its own index: the output is each tile's constant with a linear ramp k/2 over the first two columns of every
    later tile (the last tile is cut short by the border: 2 wide)."""
    x = torch.zeros(1, 1, 6, 20)
    seen = []

    def constant(t):
        seen.append(t.shape[-1])
        return torch.full_like(t, float(len(seen) - 1))

    out = release_tiling.blended_tiles(x, constant, tile=8, out_tile=8)
    assert seen == [8, 8, 8, 2]
    expected = [0.0] * 6 + [0, 0.5, 1, 1, 1, 1] + [1, 1.5, 2, 2, 2, 2] + [2, 2.5]
    assert out.shape == (1, 1, 6, 20)
    assert torch.allclose(out[0, 0, 0], torch.tensor(expected))
    assert torch.equal(out[0, 0, 0], out[0, 0, 5])  # one row of tiles: nothing blended vertically
    # a second row (height 8 > the stride 6: a 2-high row of tiles, as the release cuts at the border)
    seen.clear()
    out = release_tiling.blended_tiles(torch.zeros(1, 1, 8, 20), constant, tile=8, out_tile=8)
    assert seen == [8, 8, 8, 2] * 2 and out.shape == (1, 1, 8, 20)
    # row 2 (tiles 4..7) starts with a vertical ramp from row 1's blended values: k = 0 keeps row 1's last rows
    assert torch.allclose(out[0, 0, 6, :6], torch.zeros(6))          # tile 4 over tile 0 (value 0), k = 0
    assert torch.allclose(out[0, 0, 7, :6], torch.full((6,), 2.0))   # k = 1: 0 * 0.5 + 4 * 0.5


def test_install_decodes_and_encodes_in_blended_tiles():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY_VAE).eval()
    model = SimpleNamespace(first_stage_model=vae)
    z_small, z_big = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 16, 24)
    x_big = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        plain_small, plain_big, plain_enc = vae.decode(z_small), vae.decode(z_big), vae.encode(x_big).mean
        assert release_tiling.install(model, tile_px=32, f=4)
        assert torch.equal(vae.decode(z_small), plain_small)            # one tile: the plain decode
        tiled = vae.decode(z_big)
        assert tiled.shape == plain_big.shape
        # the first tile is decoded on its own (its GroupNorm sees only it) and kept un-blended up to the keep size
        alone = vae.decoder(vae.post_quant_conv(z_big[..., :8, :8]))
        assert torch.allclose(tiled[..., :24, :24], alone[..., :24, :24], atol=1e-6)
        rel = ((tiled - plain_big).norm() / plain_big.norm()).item()
        assert rel > 1e-3, rel                                          # not the whole-image decode
        assert torch.equal(vae.decode_tiled(z_big, tile_size=4, overlap=2, sync_gn=True), tiled)  # options ignored
        enc = vae.encode(x_big).mean
        assert enc.shape == plain_enc.shape and not torch.allclose(enc, plain_enc, atol=1e-4)
        first = vae.quant_conv(vae.encoder(x_big[..., :32, :32]))
        assert torch.allclose(enc[..., :6, :6], first[:, :4, :6, :6], atol=1e-6)
        release_tiling.remove(model)
        assert torch.equal(vae.decode(z_big), plain_big)


def test_freescale_with_vae_tiling_release_installs_it_for_the_run():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY_VAE).eval()
    unet = tiny_sdxl_like_unet()
    model = SimpleNamespace(first_stage_model=vae, model=SimpleNamespace(diffusion_model=unet))
    with FreeScale(model, FreeScaleSettings(stages=[(32, 32), (64, 64)], base=32), f=4).vae_scope():
        assert getattr(vae, "_release_tiling", None) is None
    with FreeScale(model, FreeScaleSettings(stages=[(32, 32), (64, 64)], base=32, vae_tiling="release"),
                   f=4).vae_scope():
        assert vae._release_tiling["tile_px"] == 32
    assert getattr(vae, "_release_tiling", None) is None and "decode" not in vae.__dict__  # undone after the run
    with pytest.raises(ValueError, match="vae_tiling"):
        FreeScaleSettings(stages=[(32, 32)], vae_tiling="blended")


# --------------------------------------------------------------------------------------------------
# Table 2: dilated up-blocks
# --------------------------------------------------------------------------------------------------
# the up-block entries ali-vilab/FreeScale (d5a2256) lists and comments out in pipeline_freescale.py
RELEASE_COMMENTED_UP = (
    [f"up_blocks.0.resnets.{j}.conv{k}" for j in range(3) for k in (1, 2)] + ["up_blocks.0.upsamplers.0.conv"]
    + [f"up_blocks.1.resnets.{j}.conv{k}" for j in range(3) for k in (1, 2)] + ["up_blocks.1.upsamplers.0.conv"]
    + [f"up_blocks.2.resnets.{j}.conv{k}" for j in range(3) for k in (1, 2)])
RELEASE_DOWN_MID = ["down_blocks.1.downsamplers.0.conv"] + [f"down_blocks.2.resnets.{j}.conv{k}" for j in (0, 1)
                                                            for k in (1, 2)] + \
    [f"mid_block.resnets.{j}.conv{k}" for j in (0, 1) for k in (1, 2)]


def test_up_block_layers_are_the_releases_commented_list():
    unet = tiny_sdxl_like_unet()
    assert ablations.up_block_layer_names(unet) == RELEASE_COMMENTED_UP
    assert restrained_layer_names(unet) == RELEASE_DOWN_MID


def test_dilated_up_blocks_switch_adds_the_up_path_to_the_restrained_dilation():
    unet = tiny_sdxl_like_unet()
    model = SimpleNamespace(first_stage_model=None, model=SimpleNamespace(diffusion_model=unet))
    names = LayerNames(unet)
    own_up = {names.resolve(n) for n in RELEASE_COMMENTED_UP}
    own_down_mid = {names.resolve(n) for n in RELEASE_DOWN_MID}
    for up, expected in ((False, own_down_mid), (True, own_down_mid | own_up)):
        fs = FreeScale(model, FreeScaleSettings(stages=[(16, 16), (32, 32)], base=16, dilate_up_blocks=up), f=1)
        g = fs.stage_guidance((32, 32), steps=10, randint=lambda a, b: 0)
        assert set(g.dilation.at(0)) == expected
        assert set(g.dilation.at(0).values()) == {2.0}


@pytest.mark.parametrize("size", ["2048x2048", "4096x4096"])
def test_table2_presets_change_one_thing_each(size):
    """Each ablation preset is the full (release) preset with exactly its own key changed."""
    base = "configs/tables/presets/freescale_sdxl_{}_{}.yaml"
    full = load_preset(base.format(size, "release"))
    assert full["vae_tiling"] == "release" and full["freeu"] == {"b1": 1.1, "b2": 1.2, "s1": 0.6, "s2": 0.4}
    for name, key, value in (("no_fusion", "fusion", False), ("dilated_up", "dilate_up_blocks", True),
                             ("latent_upsampling", "resize", "latent")):
        p = load_preset(base.format(size, name))
        diff = {k for k in set(p) | set(full) if not k.startswith("_") and p.get(k) != full.get(k)}
        assert diff == {key}, (name, diff)
        assert p[key] == value
        s = make_settings(p["height"], p["width"], 1024, p)
        assert getattr(s, key) == value and s.vae_tiling == "release"
