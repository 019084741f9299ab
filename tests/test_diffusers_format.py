"""Diffusers-format folders (ldm/convert_diffusers.py) checked against diffusers itself.

Each test writes a tiny folder with diffusers' and transformers' own classes (random weights, sizes of
configs/tiny/tiny-*.yaml; tests/diffusers_tiny.py), loads it with ``load_model_from_config`` (the converter)
and compares our UNet, VAE and text encoders with the diffusers/transformers modules holding the same weights.

Tolerance, from the arithmetic: both sides compute the same float32 math in another order (SDPA against
matmul-softmax attention, other conv and GroupNorm kernels). A length-n reduction carries a typical relative
rounding error of sqrt(n)·u (u = 2^-24 = 6e-8); the longest here is a 3x3 conv over 256 channels (n = 2304,
~3e-6), and ~30 such layers in sequence grow it like sqrt(30) to ~2e-5 of the output's scale. ``TOL`` = 1e-4
of the reference's largest magnitude is five times that, while a single weight in the wrong place changes
the outputs by O(1) of their scale; ``test_the_comparison_can_fail`` shows one swapped tensor fails it.
"""
import json
import shutil

import pytest
import torch

import diffusers_tiny as dt
from ldm.checkpoint import CheckpointError, load_model_from_config
from ldm.convert_diffusers import folder_info, suggested_config, unet_name_map
from ldm.errors import InputWarning
from ldm.util import load_config_file

TOL = 1e-4
PROMPTS = ["a photograph of an astronaut riding a horse", "x"]


def tiny_config(family):
    return load_config_file(f"configs/tiny/tiny-{family}.yaml")


def close(ours, ref):
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    return err <= TOL * scale, f"max error {err:.3g} against {TOL} x {scale:.3g}"


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def pair(request, tmp_path_factory):
    family = request.param
    folder = tmp_path_factory.mktemp(f"diffusers-{family}")
    parts = dt.write(folder, family, seed=3)
    if family == "sd2":  # diffusers' SD 2.x text encoder lacks the last (never run) OpenCLIP block: said once
        with pytest.warns(InputWarning, match="last 1 block.*filled with zeros.*no text_projection"):
            model = load_model_from_config(tiny_config(family), folder)
    else:
        model = load_model_from_config(tiny_config(family), folder)
    return family, folder, parts, model


def unet_inputs(family, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 8, generator=g)  # not square: a transposed mapping would show
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 5, 64 if family == "sdxl" else 32, generator=g)
    extra = {}
    if family == "sdxl":
        extra = {"text_embeds": torch.randn(2, 32, generator=g),
                 "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64], [128, 96, 8, 4, 64, 64]])}
    return x, t, ctx, extra


def run_unets(family, unet, ref_unet, inputs):
    from ldm.modules.encoders.modules import ConcatTimestepEmbedderND
    x, t, ctx, extra = inputs
    with torch.no_grad():
        ref = ref_unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=extra or None).sample
        if family == "sdxl":  # SDXL's y: pooled text | the six size numbers' sinusoidal embeddings
            y = torch.cat([extra["text_embeds"], ConcatTimestepEmbedderND(256)(extra["time_ids"])], 1)
            ours = unet(x, t, context=ctx, y=y)
        else:
            ours = unet(x, t, context=ctx)
    return ours, ref


def test_unet_matches_diffusers(pair):
    family, _, parts, model = pair
    ours, ref = run_unets(family, model.model.diffusion_model, parts["unet"], unet_inputs(family))
    ok, msg = close(ours, ref)
    assert ok, f"{family} UNet: {msg}"


def test_vae_matches_diffusers(pair):
    family, _, parts, model = pair
    g = torch.Generator().manual_seed(2)
    z, img = torch.randn(2, 4, 4, 3, generator=g), torch.randn(2, 3, 32, 24, generator=g)
    with torch.no_grad():
        ok, msg = close(model.first_stage_model.decode(z), parts["vae"].decode(z).sample)
        assert ok, f"{family} VAE decoder: {msg}"
        ok, msg = close(model.first_stage_model.encode(img).mean, parts["vae"].encode(img).latent_dist.mean)
        assert ok, f"{family} VAE encoder: {msg}"
        ok, msg = close(model.first_stage_model.encode(img).logvar, parts["vae"].encode(img).latent_dist.logvar)
        assert ok, f"{family} VAE encoder log-variance: {msg}"


def test_text_encoders_match_transformers(pair):
    """On the same token ids: SD 1.x's last hidden state; SD 2.x's penultimate OpenCLIP block + final norm
    (diffusers' 1-layer-shorter CLIPTextModel's last hidden state); SDXL's CLIP-L hidden_states[-2], bigG
    hidden_states[-2] and the projected pooled embedding (text_embeds)."""
    family, _, parts, model = pair
    with torch.no_grad():
        if family == "sd1":
            enc = model.cond_stage_model
            tok = enc.tokenize(PROMPTS)
            checks = [("CLIP-L", enc.encode_tokens(tok), parts["text_encoder"](tok).last_hidden_state)]
        elif family == "sd2":
            enc = model.cond_stage_model
            tok = enc.tokenize(PROMPTS)
            checks = [("OpenCLIP", enc.encode_with_transformer(tok), parts["text_encoder"](tok).last_hidden_state)]
        else:
            e1, e2 = model.conditioner.embedders[0], model.conditioner.embedders[1]
            tok1, tok2 = e1.tokenize(PROMPTS), e2.tokenize(PROMPTS)
            o2 = parts["text_encoder_2"](tok2, output_hidden_states=True)
            feats = e2.encode_layers(tok2)
            checks = [("CLIP-L", e1.encode_tokens(tok1),
                       parts["text_encoder"](tok1, output_hidden_states=True).hidden_states[-2]),
                      ("bigG penultimate", feats["penultimate"], o2.hidden_states[-2]),
                      ("bigG pooled", feats["pooled"], o2.text_embeds)]
    for what, ours, ref in checks:
        ok, msg = close(ours, ref)
        assert ok, f"{family} {what}: {msg}"


def test_the_comparison_can_fail(pair):
    """One weight in the wrong place (two attention projections swapped) is far outside the tolerance."""
    family, _, parts, model = pair
    import copy
    unet = copy.deepcopy(model.model.diffusion_model)
    attn = next(m for n, m in unet.named_modules() if n.endswith("attn1"))
    with torch.no_grad():
        k, v = attn.to_k.weight.clone(), attn.to_v.weight.clone()
        attn.to_k.weight.copy_(v)
        attn.to_v.weight.copy_(k)
    ours, ref = run_unets(family, unet, parts["unet"], unet_inputs(family))
    assert not close(ours, ref)[0]


def test_name_map_agrees_with_the_settings_file_names(pair):
    """The converter's names for the re-dilatable convs are those of ldm/unet_hooks/layers.py (which the
    authors' settings files use), derived independently."""
    from ldm.unet_hooks.layers import conv_table
    _, _, _, model = pair
    unet = model.model.diffusion_model
    names = unet_name_map(unet)
    rows = conv_table(unet)
    assert rows and all(names[own] == diff for own, diff, _ in rows)


def test_folder_family_and_config(pair):
    family, folder, _, _ = pair
    info = folder_info(folder)
    assert info["family"] == family
    assert suggested_config(info) == {"sd1": "configs/stable-diffusion/v1-inference.yaml",
                                      "sd2": "configs/stable-diffusion/v2-inference.yaml",
                                      "sdxl": "configs/stable-diffusion/sdxl-base-inference.yaml"}[family]
    other = {"sd1": "sd2", "sd2": "sdxl", "sdxl": "sd1"}[family]
    with pytest.raises(CheckpointError, match=f"use --config {suggested_config(info)}"):
        load_model_from_config(tiny_config(other), folder)


# ---------------------------------------------------------------------------------------------------------
# file variants and refusals (SD 1.x, the smallest)

@pytest.fixture(scope="module")
def sd1_parts():
    return dt.build("sd1", seed=5)


def _write_parts(folder, parts, **save_kw):
    for name, m in parts.items():
        m.save_pretrained(folder / name, **({"safe_serialization": True} | save_kw.get(name, {})))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))


def _unet_error(model, parts):
    ours, ref = run_unets("sd1", model.model.diffusion_model, parts["unet"], unet_inputs("sd1"))
    return close(ours, ref)


def test_sharded_and_fp16_variant_files(tmp_path, sd1_parts):
    sharded = tmp_path / "sharded"
    _write_parts(sharded, sd1_parts, unet={"max_shard_size": "200KB"})
    assert (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ok, msg = _unet_error(load_model_from_config(tiny_config("sd1"), sharded), sd1_parts)
    assert ok, msg
    half = tmp_path / "fp16"
    _write_parts(half, sd1_parts, unet={"variant": "fp16"})
    shutil.move(str(half / "unet" / "diffusion_pytorch_model.fp16.safetensors"), str(half / "unet" / "x"))
    from safetensors.torch import load_file, save_file
    save_file({k: v.half() for k, v in load_file(half / "unet" / "x").items()},
              str(half / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    (half / "unet" / "x").unlink()
    model = load_model_from_config(tiny_config("sd1"), half)
    ref = dict(sd1_parts["unet"].named_parameters())["conv_in.weight"]
    got = model.model.diffusion_model.input_blocks[0][0].weight
    assert torch.equal(got, ref.half().float())  # the fp16 file's values, not another file's


def test_bin_weights_need_unsafe_load(tmp_path, sd1_parts):
    folder = tmp_path / "bin"
    _write_parts(folder, sd1_parts, unet={"safe_serialization": False})
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(CheckpointError, match="--unsafe_load"):
        load_model_from_config(tiny_config("sd1"), folder)
    ok, msg = _unet_error(load_model_from_config(tiny_config("sd1"), folder, allow_unsafe=True), sd1_parts)
    assert ok, msg


def test_folder_errors(tmp_path, sd1_parts):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        load_model_from_config(tiny_config("sd1"), empty)
    partial = tmp_path / "partial"
    _write_parts(partial, {"unet": sd1_parts["unet"], "text_encoder": sd1_parts["text_encoder"]})
    with pytest.raises(CheckpointError, match=r"lacks vae/"):
        load_model_from_config(tiny_config("sd1"), partial)
    v_pred = tmp_path / "v"
    _write_parts(v_pred, sd1_parts)
    (v_pred / "scheduler").mkdir()
    (v_pred / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    with pytest.raises(CheckpointError, match="v_prediction.*parameterization: eps: use a copy of config with parameterization: v"):
        load_model_from_config(tiny_config("sd1"), v_pred)
    extra = tmp_path / "extra"
    _write_parts(extra, sd1_parts)
    from safetensors.torch import load_file, save_file
    sd = load_file(extra / "unet" / "diffusion_pytorch_model.safetensors")
    sd["down_blocks.0.unknown.weight"] = torch.zeros(1)
    save_file(sd, str(extra / "unet" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"(?s)1 unexpected.*unet/down_blocks\.0\.unknown\.weight"):
        load_model_from_config(tiny_config("sd1"), extra)


def test_txt2img_takes_a_folder(tmp_path, sd1_parts):
    """The CLI end to end with --ckpt FOLDER (two DDIM steps at 64x64)."""
    from ldm.pipelines.txt2img import main
    folder = tmp_path / "model"
    _write_parts(folder, sd1_parts)
    out = tmp_path / "out"
    rc = main(["--config", "configs/tiny/tiny-sd1.yaml", "--ckpt", str(folder), "--H", "64", "--W", "64",
               "--steps", "2", "--outdir", str(out), "--skip_grid", "--device", "cpu", "--prompt", "a cat"])
    assert rc == 0 and (out / "samples" / "00000.png").is_file()


@pytest.mark.parametrize("family,config,manifest", [
    ("sd1", "v1-inference.yaml", "sd15_state_dict.json"), ("sd2", "v2-inference.yaml", "sd21_base_state_dict.json"),
    ("sdxl", "sdxl-base-inference.yaml", "sdxl_base_state_dict.json")])
def test_released_layouts_convert_exactly(ref_dir, family, config, manifest):
    """At the released sizes (meta tensors: shapes only): the diffusers folder of SD 1.5 / SD 2.1-base / SDXL base
    (its diffusers configs, tests/diffusers_tiny.py) converts into exactly the keys and shapes of the released
    original checkpoint (tests/reference/ manifests; the schedule buffers aside, which are recomputed), and the
    strict check against the config passes."""
    from omegaconf import OmegaConf
    from ldm.checkpoint import OPTIONAL_KEYS, check_state_dict
    from ldm.convert_diffusers import convert_components
    from ldm.util import instantiate_from_config
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.load(f"configs/stable-diffusion/{config}").model)
    sds = dt.full_state_dicts(family)
    sd, notes = convert_components(lambda c: sds[c], model)
    want = {k: v for k, v in json.load(open(ref_dir / manifest)).items() if k not in OPTIONAL_KEYS}
    got = {k: list(v.shape) for k, v in sd.items()}
    assert sorted(set(got) - set(want))[:5] == [] and sorted(set(want) - set(got))[:5] == []
    assert [k for k in want if got[k] != list(want[k])][:5] == []
    check_state_dict(model, sd, ckpt_name=f"{family} diffusers folder", config_name=config)
    assert bool(notes) == (family == "sd2")  # only SD 2.x's text encoder lacks a (never run) block
