"""The x4 upscaler (LatentUpscaleDiffusion) against numbers recorded from the original code.

``tests/reference/x4_upscaler_oracle_tiny.pt`` was made by ``tests/reference/x4_upscaler_oracle_dump.py`` with
Stability-AI/stablediffusion (its ``LatentUpscaleDiffusion``, ``ImageConcatWithNoiseAugmentation``,
``FrozenOpenCLIPEmbedder`` and ``DDIMSampler``) on ``configs/tiny/tiny-x4-upscaler.yaml``, float32 on the CPU
(provenance: tests/reference/README.md, "Other files"). Here the recorded weights (regenerated from the stored
recipe, checked against the stored checksums) go through this repository's checkpoint loader, and the noise
augmentation, the text conditioning, one UNet call with the hybrid-adm condition, two 4-step DDIM runs (without
and with classifier-free guidance), their decoded images and the same runs through ``Upscaler`` (what
``scripts/upscale.py`` uses) are compared with the recorded outputs.
"""
import zlib

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO_ROOT, load_script
from ldm.checkpoint import load_model_from_config
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.upscaler import Upscaler

TINY_X4 = REPO_ROOT / "configs/tiny/tiny-x4-upscaler.yaml"
ORACLE = "x4_upscaler_oracle_tiny.pt"
TOL = dict(rtol=1e-5, atol=1e-5)  # both sides float32 on the CPU; outputs are of order 1
# Classifier-free guidance (scale 5: 5 * cond - 4 * uncond) amplifies float32 rounding about ninefold: the
# original's own float32 run is 1.3e-5 (pred_x0 of the first step) and 9.8e-6 (samples) away from the same code
# run in float64, and this repository's float64 run equals the original's float64 run to 4e-14 (checked when the
# file was made; tests/reference/README.md). The guided comparisons therefore allow 5e-5.
GUIDED_TOL = dict(rtol=1e-5, atol=5e-5)


def regenerate_parameter(key, shape):
    """The dump's weight recipe (``init_recipe`` in the file)."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
    r = torch.randn(shape, generator=g, dtype=torch.float32)
    if len(shape) >= 2:
        v = r / (r.numel() // shape[0]) ** 0.5
    elif key.endswith("weight"):
        v = 1 + 0.05 * r
    else:
        v = 0.05 * r
    return v.half().float()


@pytest.fixture(scope="module")
def oracle(ref_dir):
    return torch.load(ref_dir / ORACLE, weights_only=True)


@pytest.fixture(scope="module")
def original_state_dict(oracle):
    """The original model's ``state_dict()``: stored buffers, parameters regenerated and checked."""
    sd = {}
    bad = []
    for key in oracle["state_dict_keys"]:
        if key in oracle["buffers"]:
            sd[key] = oracle["buffers"][key]
            continue
        v = regenerate_parameter(key, oracle["param_shapes"][key])
        want_sum, want_abs = oracle["param_checksums"][key]
        got_sum, got_abs = float(v.double().sum()), float(v.double().abs().sum())
        if abs(got_sum - want_sum) > 1e-9 * max(1.0, want_abs) or abs(got_abs - want_abs) > 1e-9 * want_abs:
            bad.append(key)
        sd[key] = v
    assert bad == [], f"regenerated weights differ from the recorded checksums: {bad[:5]}"
    return sd


@pytest.fixture(scope="module")
def model(original_state_dict, tmp_path_factory):
    """This repository's model, loaded from a checkpoint file in the original layout by the normal loader."""
    make_ckpt = load_script("make_random_checkpoint")
    path = make_ckpt.save_checkpoint(original_state_dict, tmp_path_factory.mktemp("x4_oracle") / "x4.ckpt")
    return load_model_from_config(OmegaConf.load(TINY_X4), path)


def close(got, want, **tol):
    torch.testing.assert_close(got, want, **{**TOL, **tol})
    return float((got - want).abs().max())


def test_recorded_state_dict_loads_strictly(oracle, original_state_dict, model):
    assert oracle["parameterization"] == model.parameterization == "v"
    assert oracle["scale_factor"] == model.scale_factor
    assert oracle["max_noise_level"] == model.low_scale_model.max_noise_level
    ours = model.state_dict()
    # the same keys in the same order: nothing of the file ignored, nothing of ours left unloaded
    assert list(ours) == oracle["state_dict_keys"]
    assert [k for k, v in original_state_dict.items() if not torch.equal(ours[k], v)] == []


def test_noise_augmentation(oracle, model):
    rec = oracle["aug"]
    x_aug, level = model.low_scale_model(rec["x_lr"], rec["noise_level"], noise=rec["noise"])
    assert level.dtype == torch.long and level.tolist() == rec["noise_level_out"].tolist() == [20, 100]
    close(x_aug, rec["x_aug"], atol=1e-6)
    # the same through the model's helper, and with the noise as the first draw of a generator (the DDIM runs)
    ddim = oracle["ddim"]
    x_aug2, _ = model.low_scale_conditioning(ddim["x_lr"], ddim["noise_level"],
                                             generator=torch.Generator().manual_seed(ddim["aug_noise_generator_seed"]))
    close(x_aug2, ddim["x_aug"], atol=1e-6)


def test_text_conditioning(oracle, model):
    assert model.cond_stage_model.tokenize(oracle["prompts"]).tolist() == oracle["tokens"].tolist()
    close(model.get_learned_conditioning(oracle["prompts"]), oracle["context"])
    close(model.get_learned_conditioning(2 * [oracle["negative_prompt"]]), oracle["uncond_context"])


def test_unet_call_with_the_hybrid_adm_condition(oracle, model):
    rec = oracle["unet"]
    cond = {"c_concat": [rec["c_concat"]], "c_crossattn": [rec["c_crossattn"]], "c_adm": rec["c_adm"]}
    close(model.apply_model(rec["x_t"], rec["t"], cond), rec["out"])


def _conds(oracle):
    ddim = oracle["ddim"]
    level = torch.full((2,), ddim["noise_level"], dtype=torch.long)
    cond = {"c_concat": [ddim["x_aug"]], "c_crossattn": [oracle["context"]], "c_adm": level}
    return cond, {**cond, "c_crossattn": [oracle["uncond_context"]]}


@pytest.mark.parametrize("run", ["ddim_noguide", "ddim_cfg"])
def test_ddim_run_and_decoding(oracle, model, run):
    ddim, rec = oracle["ddim"], oracle["ddim"][run]
    tol = TOL if rec["scale"] == 1.0 else GUIDED_TOL
    cond, uncond = _conds(oracle)
    pred_x0 = []
    sampler = DDIMSampler(model)
    samples, _ = sampler.sample(S=ddim["steps"], batch_size=2, shape=(4, 16, 16), conditioning=cond, eta=ddim["eta"],
                                x_T=ddim["x_T"].clone(), unconditional_guidance_scale=rec["scale"],
                                unconditional_conditioning=uncond if rec["scale"] != 1.0 else None, verbose=False,
                                img_callback=lambda p, i: pred_x0.append(p))
    assert sampler.ddim_timesteps.tolist() == ddim["timesteps"].tolist() == [1, 251, 501, 751]
    for step, (got, want) in enumerate(zip(pred_x0, rec["pred_x0_per_step"])):
        close(got, want, msg=lambda m, s=step: f"pred_x0 of step {s}: {m}", **tol)
    close(samples, rec["samples"], **tol)
    close(model.decode_first_stage(samples), rec["decoded"], **tol)


@pytest.mark.parametrize("run", ["ddim_noguide", "ddim_cfg"])
def test_upscaler_end_to_end(oracle, model, run):
    """``Upscaler`` (scripts/upscale.py): the recorded low-resolution image, prompts, level, x_T and the
    augmentation noise as its generator's first draw give the recorded decoded image."""
    ddim, rec = oracle["ddim"], oracle["ddim"][run]
    up = Upscaler(model, steps=ddim["steps"], scale=rec["scale"], noise_level=ddim["noise_level"], eta=ddim["eta"],
                  negative_prompt=oracle["negative_prompt"], tiling={})
    out = up(ddim["x_lr"], oracle["prompts"], generator=torch.Generator().manual_seed(ddim["aug_noise_generator_seed"]),
             x_T=ddim["x_T"].clone())
    close(out, rec["decoded"], **(TOL if rec["scale"] == 1.0 else GUIDED_TOL))
