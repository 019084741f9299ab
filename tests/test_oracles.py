"""Our UNet and VAE against outputs computed by the original CompVis / Stability code (random weights)."""
import pytest
import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from oracle_utils import apply_recipe, checksum_mismatches

ATOL = RTOL = 1e-4


def _load(ref_dir, name):
    return torch.load(ref_dir / name, weights_only=True)


@pytest.mark.parametrize("name", ["oracle_unet_v2_tiny.pt", "oracle_unet_v1_tiny.pt"])
def test_unet_stored_weights(ref_dir, name):
    d = _load(ref_dir, name)
    model = UNetModel(**d["kwargs"]).eval()
    model.load_state_dict({k: v.float() for k, v in d["state_dict"].items()}, strict=True)
    with torch.no_grad():
        out = model(d["x"], d["t"], context=d["context"])
    torch.testing.assert_close(out, d["out"], atol=ATOL, rtol=RTOL)
    # the oracle is sensitive: a wrong timestep path would be far off
    with torch.no_grad():
        wrong_t = model(d["x"], torch.full_like(d["t"], 500), context=d["context"])
    assert (wrong_t - d["out"]).abs().max() > 100 * ATOL


@pytest.mark.parametrize("name", ["oracle_unet_v2_tiny_fullcfg_regen.pt", "oracle_unet_v1_tiny_fullcfg_regen.pt"])
def test_unet_full_channel_mult(ref_dir, name):
    d = _load(ref_dir, name)
    model = apply_recipe(UNetModel(**d["kwargs"]).eval())
    assert [[k, list(s)] for k, s in d["state_dict_shapes_in_order"]] == \
        [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert checksum_mismatches(model, d["param_checksums"]) == []
    with torch.no_grad():
        out = model(d["x"], d["t"], context=d["context"])
    torch.testing.assert_close(out, d["out"], atol=ATOL, rtol=RTOL)


def test_unet_sdxl_style(ref_dir):
    d = _load(ref_dir, "oracle_unet_sdxl_tiny_regen.pt")
    model = apply_recipe(UNetModel(**d["kwargs"]).eval())
    assert checksum_mismatches(model, d["param_checksums"]) == []
    with torch.no_grad():
        out = model(d["x"], d["t"], context=d["context"], y=d["y"])
    torch.testing.assert_close(out, d["out"], atol=ATOL, rtol=RTOL)


def test_vae_stored_weights(ref_dir):
    d = _load(ref_dir, "oracle_vae_tiny.pt")
    model = AutoencoderKL(d["ddconfig"], d["lossconfig"], d["embed_dim"]).eval()
    model.load_state_dict({k: v.float() for k, v in d["state_dict"].items()}, strict=True)
    with torch.no_grad():
        post = model.encode(d["x"])
        dec = model.decode(d["posterior_mean"])
    torch.testing.assert_close(post.mean, d["posterior_mean"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(post.logvar, d["posterior_logvar"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(dec, d["decoded_from_mean"], atol=ATOL, rtol=RTOL)


def test_vae_full_ch_mult(ref_dir):
    d = _load(ref_dir, "oracle_vae_tiny_fullcfg_regen.pt")
    model = apply_recipe(AutoencoderKL(d["ddconfig"], d["lossconfig"], d["embed_dim"]).eval())
    assert checksum_mismatches(model, d["param_checksums"]) == []
    with torch.no_grad():
        post = model.encode(d["x"])
        dec = model.decode(d["posterior_mean"])
    torch.testing.assert_close(post.mean, d["posterior_mean"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(dec, d["decoded_from_mean"], atol=ATOL, rtol=RTOL)


def test_unet_any_latent_size():
    """Latent sides that are not multiples of 8 (images that are multiples of 8 px only) still run."""
    d_kwargs = dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
                    num_res_blocks=1, channel_mult=[1, 1, 2, 2], use_spatial_transformer=True, context_dim=16,
                    num_head_channels=8, use_linear_in_transformer=True, legacy=False)
    model = UNetModel(**d_kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 13, 21), torch.tensor([3]), context=torch.randn(1, 5, 16))
    assert out.shape == (1, 4, 13, 21)
