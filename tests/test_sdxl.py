"""SDXL base in the LDM core: layout, conditioning, loading, sampling through txt2img, ScaleCrafter presets.

The full-size model is only built on the meta device; numerics use configs/tiny/tiny-sdxl.yaml (SDXL's
structure with tiny widths) and the reference oracles in tests/reference/.
"""
import json
import types
import warnings

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO_ROOT, assert_within_ulps, load_script
from ldm.checkpoint import CheckpointError, check_state_dict, load_model_from_config
from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS, DiffusionWrapper
from ldm.models.diffusion.sdxl import SDXLDiffusion
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders.modules import ConcatTimestepEmbedderND, FrozenOpenCLIPEmbedder2
from ldm.unet_hooks.layers import LayerNames, conv_table
from ldm.methods.scalecrafter.presets import SettingsError, plan_from_preset, read_settings_file
from ldm.util import instantiate_from_config
from oracle_utils import apply_recipe, checksum_mismatches

SDXL_CONFIG = REPO_ROOT / "configs/stable-diffusion/sdxl-base-inference.yaml"
TINY_SDXL = REPO_ROOT / "configs/tiny/tiny-sdxl.yaml"
TINY_SD2 = REPO_ROOT / "configs/tiny/tiny-sd2.yaml"
PRESETS = REPO_ROOT / "configs/scalecrafter"


txt2img = load_script("txt2img")
make_ckpt = load_script("make_random_checkpoint")


@pytest.fixture(scope="module")
def meta_sdxl():
    with torch.device("meta"):
        return instantiate_from_config(OmegaConf.load(SDXL_CONFIG).model)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return instantiate_from_config(OmegaConf.load(TINY_SDXL).model).eval()


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdxl")
    # std: re-drawn weights (the default init zeroes the UNet's output conv: conditioning would not matter)
    sd = make_ckpt.make_random_state_dict(OmegaConf.load(TINY_SDXL), seed=3, std=0.05)
    # the released file is float16 safetensors
    st = make_ckpt.save_checkpoint({k: v.half() if v.is_floating_point() else v for k, v in sd.items()},
                                   d / "tiny-sdxl.safetensors")
    ck = make_ckpt.save_checkpoint(sd, d / "tiny-sdxl.ckpt")
    sd2 = make_ckpt.save_checkpoint(make_ckpt.make_random_state_dict(OmegaConf.load(TINY_SD2), seed=1),
                                    d / "tiny-sd2.ckpt")
    return {"safetensors": st, "ckpt": ck, "sd2": sd2, "sd": sd}


# ---------------------------------------------------------------------------------------------
# layout (meta device)

def test_full_sdxl_layout_equals_released_manifest(ref_dir, meta_sdxl):
    """(tests/test_manifests.py checks the same, with the SD configs.)"""
    want = json.load(open(ref_dir / "sdxl_base_state_dict.json"))
    got = {k: list(v.shape) for k, v in meta_sdxl.state_dict().items()}
    assert got == want and list(got) == list(want)  # keys, shapes and the order of the released file
    # what the layout implies: no DDPM buffers saved (still there for the sampler), SDXL's constants
    assert not any(k in got for k in SCHEDULE_BUFFERS) and meta_sdxl.alphas_cumprod.shape == (1000,)
    assert meta_sdxl.scale_factor == 0.13025 and meta_sdxl.parameterization == "eps"
    unet = meta_sdxl.model.diffusion_model
    assert len(unet.input_blocks) == 9 and len(unet.output_blocks) == 9
    assert not any(hasattr(m, "attn2") for m in unet.input_blocks[1].modules())  # no attention at level 0
    assert len(unet.middle_block[1].transformer_blocks) == 10
    assert unet.label_emb[0][0].weight.shape == (1280, 2816)


def test_full_sdxl_conditioner_widths(meta_sdxl):
    emb = meta_sdxl.conditioner.embedders
    assert [type(e).__name__ for e in emb] == ["FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2"] + \
        ["ConcatTimestepEmbedderND"] * 3
    assert emb[0].transformer.config.hidden_size + emb[1].model.transformer.width == 2048
    assert emb[1].model.text_projection.shape == (1280, 1280)
    assert emb[1].model.text_projection.shape[1] + 3 * 2 * emb[2].outdim == 2816
    assert not any(p.requires_grad for p in meta_sdxl.conditioner.parameters())


# ---------------------------------------------------------------------------------------------
# oracles: size embedding, denoiser sigmas, the SDXL-style UNet through apply_model

def size_embedding_tolerance(sizes, dim=256, max_period=10000):
    """Per-element bound on |ours - recorded| for the [cos | sin] embedding of each size (layout of
    ConcatTimestepEmbedderND), from the float32 arithmetic of ``timestep_embedding`` on two CPUs:

    * freq = exp(-ln(max_period) * i / half): the product and the quotient are correctly rounded (the same bits
      everywhere), exp is not (within 1 ulp, so two CPUs' freqs differ by up to 2 ulp <= 2 eps * freq);
    * arg = size * freq, rounded once (0.5 ulp on each CPU, <= 0.5 eps * |arg| each): together with the freqs the
      two args differ by up to 3 eps * |arg| (eps = 2**-23, float32's ulp at 1);
    * cos/sin have slope <= 1 and are each within 1 ulp of their result (|result| <= 1: <= eps each).

    So |delta| <= 3 eps |arg| + 2 eps, with |arg| computed here in float64: sizes ~1e3 give args ~1e3 and bounds
    ~4e-4 (on AVX-512 CPUs the difference reaches 1.1e-4 there); small args stay near float32 precision."""
    eps = 2.0 ** -23
    half = dim // 2
    freqs = torch.exp(-np.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    args = sizes.double().reshape(-1)[:, None] * freqs[None]
    tol = 3 * eps * args.abs() + 2 * eps
    return torch.cat([tol, tol], dim=1).reshape(sizes.shape[0], -1)


def test_size_embedding_oracle(ref_dir):
    d = torch.load(ref_dir / "oracle_unet_sdxl_tiny_regen.pt", weights_only=True)["size_embedding"]
    out = ConcatTimestepEmbedderND(outdim=256)(d["input"])
    tol = size_embedding_tolerance(d["input"])
    diff = (out.double() - d["output"].double()).abs()
    assert (diff <= tol).all(), f"{int((diff > tol).sum())} values outside the bound, worst {float(diff.max()):.2e}"
    # the bound follows the argument: ~1.5e-3 at 4096 x the highest frequency, float32 precision at the lowest
    assert float(tol.max()) < 1.5e-3 and float(tol.min()) < 1e-6
    # and what it is: [cos | sin] timestep embedding of each number, concatenated
    manual = torch.cat([timestep_embedding(d["input"][:, i], 256) for i in range(2)], dim=1)
    torch.testing.assert_close(out, manual)


def test_denoiser_sigmas_and_schedule_match_the_reference(ref_dir, tiny):
    ref = json.load(open(ref_dir / "ddpm_schedule_sd.json"))
    # alphas_cumprod: float64 arithmetic rounded once to float32; float64 results may differ in their last bits
    # between CPUs (torch.linspace may fuse multiply-adds), which moves the rounded float32 value by at most 1 ulp
    assert_within_ulps(tiny.alphas_cumprod, torch.tensor(ref["alphas_cumprod"], dtype=torch.float32), 1,
                       "alphas_cumprod")
    # sigmas = float32 ((1 - ac) / ac) ** 0.5: the ratio as above (1 ulp, halved by the root), then one float32 pow,
    # which is not correctly rounded on every CPU path (within 1 ulp on each of the two CPUs): 3 ulp in all
    assert_within_ulps(tiny.denoiser.sigmas, torch.tensor(ref["sdxl_denoiser_sigmas"], dtype=torch.float32), 3,
                       "denoiser.sigmas")


def test_sdxl_oracle_through_apply_model(ref_dir):
    """The oracle UNet (computed with sgm) reached the way sampling reaches it: a dict condition through
    SDXLDiffusion.apply_model and DiffusionWrapper('crossattn-adm')."""
    d = torch.load(ref_dir / "oracle_unet_sdxl_tiny_regen.pt", weights_only=True)
    wrapper = DiffusionWrapper({"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                "params": d["kwargs"]}, "crossattn-adm").eval()
    apply_recipe(wrapper.diffusion_model)
    assert checksum_mismatches(wrapper.diffusion_model, d["param_checksums"]) == []
    holder = types.SimpleNamespace(model=wrapper)
    with torch.no_grad():
        out = SDXLDiffusion.apply_model(holder, d["x"], d["t"], {"crossattn": d["context"], "vector": d["y"]})
    torch.testing.assert_close(out, d["out"], atol=1e-4, rtol=1e-4)
    assert isinstance(wrapper.diffusion_model, UNetModel)


# ---------------------------------------------------------------------------------------------
# conditioning

def test_bigg_style_pooled_output_is_open_clips_text_embedding():
    enc = FrozenOpenCLIPEmbedder2(arch=dict(width=32, layers=3, heads=2, context_length=77, vocab_size=49408,
                                            embed_dim=24), layer="penultimate", always_return_pooled=True,
                                  legacy=False)
    prompts = ["a photograph of an astronaut riding a horse", ""]
    tokens = enc.tokenize(prompts)
    with torch.no_grad():
        z, pooled = enc(prompts)
        want_pooled = enc.model.encode_text(tokens)  # open_clip's own: ln_final, EOT token, text_projection
        x = enc.model.token_embedding(tokens) + enc.model.positional_embedding
        for block in list(enc.model.transformer.resblocks)[:-1]:
            x = block(x, attn_mask=enc.model.attn_mask)
    assert z.shape == (2, 77, 32) and pooled.shape == (2, 24)
    torch.testing.assert_close(pooled, want_pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z, x, atol=1e-5, rtol=1e-5)  # penultimate block output, no ln_final


def test_conditioner_context_vector_and_empty_prompt(tiny):
    tiny.set_size_conditioning((64, 80), original_size=(512, 640), crop_coords_top_left=(8, 16))
    prompts = ["a red circle", "", "blurry"]
    with torch.no_grad():
        c = tiny.get_learned_conditioning(prompts)
        clip_l = tiny.conditioner.embedders[0](prompts)
        big_g, pooled = tiny.conditioner.embedders[1](prompts)
    assert c["crossattn"].shape == (3, 77, 64) and c["vector"].shape == (3, 32 + 3 * 512)
    sizes = torch.cat([timestep_embedding(torch.tensor([float(a), float(b)]), 256).reshape(1, -1)
                       for a, b in ((512, 640), (8, 16), (64, 80))], dim=1)
    for row in range(3):
        torch.testing.assert_close(c["vector"][row, 32:], sizes[0])
    for row in (0, 2):  # prompts: [CLIP penultimate | OpenCLIP penultimate], [pooled | sizes]
        torch.testing.assert_close(c["crossattn"][row], torch.cat([clip_l[row], big_g[row]], -1))
        torch.testing.assert_close(c["vector"][row, :32], pooled[row])
    # "" (no negative prompt): zero text embeddings, as SDXL's unconditional branch; sizes kept
    assert torch.all(c["crossattn"][1] == 0) and torch.all(c["vector"][1, :32] == 0)
    assert c["vector"][1, 32:].abs().sum() > 0


def test_size_conditioning_must_be_set():
    m = instantiate_from_config(OmegaConf.load(TINY_SDXL).model)
    with pytest.raises(ValueError, match="set_size_conditioning"):
        m.get_learned_conditioning(["a cat"])


# ---------------------------------------------------------------------------------------------
# loading the released layout, errors

def test_random_weights_file_in_released_layout_loads(tiny_files):
    sd = tiny_files["sd"]
    prefixes = {k.split(".")[0] if not k.startswith("conditioner.") else ".".join(k.split(".")[:3]) for k in sd}
    assert prefixes == {"model", "denoiser", "conditioner.embedders.0", "conditioner.embedders.1",
                        "first_stage_model"}
    assert "conditioner.embedders.0.transformer.text_model.embeddings.position_ids" in sd
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in sd)
    config = OmegaConf.load(TINY_SDXL)
    for kind in ("safetensors", "ckpt"):
        model = load_model_from_config(config, tiny_files[kind])
        got = model.state_dict()
        for k in ("model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.text_projection",
                  "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc2.weight"):
            want = sd[k].half().float() if kind == "safetensors" else sd[k]
            assert torch.equal(got[k], want), (kind, k)
    # files written by newer libraries may lack denoiser.sigmas and position_ids: still accepted
    trimmed = {k: v for k, v in sd.items() if k not in ("denoiser.sigmas",
               "conditioner.embedders.0.transformer.text_model.embeddings.position_ids")}
    check_state_dict(load_model_from_config(config), trimmed)


def test_other_family_files_name_the_config(ref_dir, meta_sdxl, tiny_files, tmp_path, capsys):
    sdxl = {k: torch.empty(v, device="meta") for k, v in json.load(open(ref_dir / "sdxl_base_state_dict.json")).items()}
    check_state_dict(meta_sdxl, sdxl)  # the released layout passes the strict check
    with torch.device("meta"):
        sd2_model = instantiate_from_config(OmegaConf.load(REPO_ROOT / "configs/stable-diffusion/v2-inference.yaml").model)
    with pytest.raises(CheckpointError, match=r"SDXL base checkpoint: use configs/stable-diffusion/sdxl-base-inference"):
        check_state_dict(sd2_model, sdxl, "sd_xl_base_1.0.safetensors", "v2-inference.yaml")
    sd21 = {k: torch.empty(v, device="meta") for k, v in json.load(open(ref_dir / "sd21_base_state_dict.json")).items()}
    with pytest.raises(CheckpointError, match=r"SD 2\.x checkpoint: use configs/stable-diffusion/v2-inference"):
        check_state_dict(meta_sdxl, sd21, "v2-1_512-ema-pruned.ckpt", "sdxl-base-inference.yaml")
    # end to end: an SD 2 file with the SDXL config
    code = txt2img.main(["--config", str(TINY_SDXL), "--ckpt", str(tiny_files["sd2"]), "--outdir", str(tmp_path),
                         "--H", "64", "--W", "64", "--steps", "2"])
    assert code == 2 and "v2-inference.yaml" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# sampling through scripts/txt2img.py

def _run(ckpt, out, *extra):
    return txt2img.main(["--config", str(TINY_SDXL), "--ckpt", str(ckpt), "--outdir", str(out), "--steps", "3",
                         "--ddim_eta", "1", "--scale", "5", "--seed", "7", "--prompt", "a corgi", *map(str, extra)])


def test_txt2img_sdxl_end_to_end(tiny_files, tmp_path):
    out = tmp_path / "plain"
    assert _run(tiny_files["safetensors"], out, "--H", "72", "--W", "48", "--negative_prompt", "blurry") == 0
    im = Image.open(out / "samples/00000.png")
    assert im.size == (48, 72)  # any H x W multiple of 8 (a 9 x 6 latent)
    params = json.loads(im.text["parameters"])
    assert params["size_conditioning"] == {"original_size_as_tuple": [72, 48], "crop_coords_top_left": [0, 0],
                                           "target_size_as_tuple": [72, 48]}
    assert params["negative_prompt"] == "blurry" and params["config"] == "tiny-sdxl.yaml"
    # the same seed again reproduces the image; other size conditioning changes it
    assert _run(tiny_files["safetensors"], out, "--H", "72", "--W", "48", "--negative_prompt", "blurry") == 0
    assert _run(tiny_files["safetensors"], out, "--H", "72", "--W", "48", "--negative_prompt", "blurry",
                "--original_size", "1024", "1024", "--crop_coords_top_left", "16", "0") == 0
    a, b, c = (np.asarray(Image.open(out / f"samples/{i:05}.png")) for i in range(3))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    meta = json.loads(Image.open(out / "samples/00002.png").text["parameters"])["size_conditioning"]
    assert meta["original_size_as_tuple"] == [1024, 1024] and meta["crop_coords_top_left"] == [16, 0]


def test_txt2img_sdxl_with_released_and_corrected_presets(tiny_files, tmp_path):
    with pytest.warns(UserWarning, match=r"4 layer name\(s\) match no module.*down_blocks\.3\.resnets\.0\.conv1"):
        assert _run(tiny_files["ckpt"], tmp_path / "rel", "--H", "64", "--W", "64",
                    "--scalecrafter_config", PRESETS / "sdxl_2048x2048.yaml", "--freeu") == 0
    params = json.loads(Image.open(tmp_path / "rel/samples/00000.png").text["parameters"])
    assert params["freeu"] == {"b1": 1.1, "b2": 1.2, "s1": 0.6, "s2": 0.4}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the corrected presets name existing layers only
        assert _run(tiny_files["ckpt"], tmp_path / "cor", "--H", "64", "--W", "64", "--scalecrafter_config",
                    PRESETS / "sdxl_4096x4096_disperse_corrected.yaml", "--tiled_decoding", "--sync_gn") == 0
    assert (tmp_path / "cor/samples/00000.png").is_file()


def test_txt2img_family_mismatches_are_usage_errors(tiny_files, tmp_path, capsys):
    assert _run(tiny_files["ckpt"], tmp_path, "--H", "64", "--W", "64",
                "--scalecrafter_config", PRESETS / "sd2.1_2048x2048.yaml") == 2
    assert "preset for sd2" in capsys.readouterr().err
    code = txt2img.main(["--config", str(TINY_SD2), "--ckpt", str(tiny_files["sd2"]), "--outdir", str(tmp_path),
                         "--original_size", "1024", "1024"])
    assert code == 2 and "not an SDXL config" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# ScaleCrafter presets on SDXL's UNet

SD_ONLY = {  # released names that do not exist in SDXL's 3-level UNet
    "2048x2048": [f"down_blocks.3.resnets.{j}.conv{c}" for j in (0, 1) for c in (1, 2)],
    "4096x4096": ["down_blocks.2.downsamplers.0.conv"] + [f"down_blocks.3.resnets.{j}.conv{c}" for j in (0, 1)
                                                          for c in (1, 2)] + ["up_blocks.2.upsamplers.0.conv"],
}
SD_ONLY["2560x2560"] = SD_ONLY["2048x2048"]
SD_ONLY["4096x2048"] = SD_ONLY["4096x4096"]


@pytest.mark.parametrize("size", sorted(SD_ONLY))
def test_released_sdxl_presets_warn_with_the_dead_names(meta_sdxl, size):
    unet = meta_sdxl.model.diffusion_model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_from_preset(unet, PRESETS / f"sdxl_{size}.yaml")
    messages = [str(w.message) for w in caught]
    dilate_msg = [m for m in messages if f"dilate_settings/sdxl_{size}.txt" in m and "ndcfg" not in m]
    assert len(dilate_msg) == 1
    assert sorted(dilate_msg[0].split("silently: ")[1].split(", ")) == sorted(SD_ONLY[size])
    released = [line.split(":")[0] for line in
                (PRESETS / f"settings/dilate_settings/sdxl_{size}.txt").read_text().split()]
    assert len(plan.dilate.factors) == len(released) - len(SD_ONLY[size])
    if size in ("4096x2048", "4096x4096"):
        assert any("ndcfg_dilate_settings" in m and "4 layer name(s)" in m for m in messages)
        assert plan.ndcfg is not None and len(plan.ndcfg.factors) == 11


def test_released_2048_preset_dilates_only_mid_and_up0(meta_sdxl):
    unet = meta_sdxl.model.diffusion_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_from_preset(unet, PRESETS / "sdxl_2048x2048.yaml")
    names = LayerNames(unet)
    diffusers = {d for own, d, _ in conv_table(unet) if own in plan.dilate.factors}
    assert diffusers == {d for _, d, _ in conv_table(unet) if d.startswith(("mid_block.", "up_blocks.0."))}
    assert set(plan.dilate.factors.values()) == {2.0} and names.resolve("up_blocks.0.upsamplers.0.conv")


CORRECTED = sorted(p.name for p in PRESETS.glob("sdxl_*_corrected.yaml"))


@pytest.mark.parametrize("preset", CORRECTED)
def test_corrected_presets_name_existing_layers_only(meta_sdxl, preset):
    assert len(CORRECTED) == 5
    unet = meta_sdxl.model.diffusion_model
    names = LayerNames(unet)
    existing = {d for _, d, _ in conv_table(unet)}
    cfg = OmegaConf.load(PRESETS / preset)
    for key in ("dilate_settings", "ndcfg_dilate_settings", "disperse_settings"):
        if cfg.get(key):
            listed = [line.split("#")[0].split(":")[0].strip()
                      for line in (PRESETS / cfg[key]).read_text().splitlines()]
            listed = [n for n in listed if n]
            assert listed and set(listed) <= existing, (preset, key, set(listed) - existing)
            read_settings_file(PRESETS / cfg[key], names, with_factor=key != "disperse_settings")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = plan_from_preset(unet, PRESETS / preset)
    released = OmegaConf.load(PRESETS / preset.replace("_corrected", ""))
    assert (plan.dilate.tau, cfg.progressive, cfg.get("ndcfg_tau")) == \
        (released.dilate_tau, released.progressive, released.get("ndcfg_tau"))
    assert "NOT the default" in (PRESETS / preset).read_text()
    assert "DEFAULT for SDXL" in (PRESETS / preset.replace("_corrected", "")).read_text()


def test_warn_mode_still_rejects_typos(meta_sdxl, tmp_path):
    names = LayerNames(meta_sdxl.model.diffusion_model)
    bad = tmp_path / "typo.txt"
    bad.write_text("mid_block.resnets.0.conv1:2\ndown_blocks.3.resnet.0.conv1:2\n")
    with pytest.raises(SettingsError, match=r"typo.txt:2: no convolution named 'down_blocks.3.resnet.0.conv1'"):
        read_settings_file(bad, names, dead_names="warn")


# ---------------------------------------------------------------------------------------------
# benchmark modes exist (CPU smoke on the tiny model; the real numbers need a GPU)

def test_benchmark_sdxl_modes_and_pipeline_smoke(tmp_path):
    from tools.benchmark_modes import make_step, mode_available
    cfg = OmegaConf.load(TINY_SDXL).model.params.unet_config
    unet = instantiate_from_config(cfg).eval()
    with torch.no_grad():
        for mode in ("plain", "redilate_ndcfg", "disperse"):
            out = make_step(mode, unet, 16, 2, torch.device("cpu"), torch.float32, family="sdxl")(0)
            assert out.shape == (1, 4, 16, 16)
    assert mode_available("preset", 512, "sdxl") and mode_available("preset_corrected", 256, "sdxl")
    assert not mode_available("preset", 128, "sdxl")  # no ScaleCrafter preset at SDXL's native 1024²
    bench = load_script("benchmark")
    doc = tmp_path / "bench.md"
    res = bench.main(["pipeline", "--device", "cpu", "--config", str(TINY_SDXL), "--size", "64", "48",
                      "--preset", str(PRESETS / "sdxl_4096x4096.yaml"), "--write", str(doc)])
    assert set(res["phases"]) == {"text encoders", "sampling", "decoding"} and res["H"] == 64 and res["W"] == 48
    assert "Sampling run: tiny-sdxl.yaml, sdxl_4096x4096.yaml, 48x64, cpu" in doc.read_text()


def test_dispersed_kernels_are_freed_after_disperse_tau():
    from tools.benchmark_modes import BareUNetModel
    from ldm.methods.scalecrafter.guidance import ScaleCrafterGuidance
    unet = instantiate_from_config(OmegaConf.load(TINY_SDXL).model.params.unet_config).eval()
    plan = plan_from_preset(unet, PRESETS / "sdxl_4096x4096_disperse_corrected.yaml")
    guide, model = ScaleCrafterGuidance(plan), BareUNetModel(unet)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([981])
    cond = {"crossattn": torch.randn(1, 77, 64), "vector": torch.randn(1, 1568)}
    uncond = {"crossattn": torch.zeros(1, 77, 64), "vector": torch.randn(1, 1568)}
    with torch.no_grad():
        ref = guide(model, x, t, cond, uncond, 5.0, step=0)
        assert plan._dispersed_weights == {}  # default: kernels computed per call, nothing kept
        plan.cache_dispersed_kernels = True
        cached = guide(model, x, t, cond, uncond, 5.0, step=0)
        assert len(plan._dispersed_weights) == len(plan.disperse_layers) == 16
        torch.testing.assert_close(cached, ref, rtol=0, atol=0)
        guide(model, x, t, cond, uncond, 5.0, step=plan.disperse_tau)
    assert plan._dispersed_weights == {}


def test_dead_name_vocabulary_is_the_released_all_valid_convs():
    from ldm.methods.scalecrafter.presets import SD_LAYOUT_NAMES
    released = set((PRESETS / "settings/dilate_settings/all_valid_convs.txt").read_text().split())
    assert SD_LAYOUT_NAMES == released
