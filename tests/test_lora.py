"""LoRA merging (ldm/lora.py, --lora) checked against diffusers' own LoRA loading (PEFT layers).

A tiny diffusers folder per family (tests/diffusers_tiny.py) is loaded here through the converter; a random
kohya-format LoRA (tests/lora_tiny.py: attention, feed-forward, projections, 3x3 LoCon convs, shortcuts,
time-embedding projections, down/upsamplers, text encoders) is merged here with weight 0.75, and loaded into the diffusers UNet and text encoders with diffusers' ``lora_state_dict`` /
``load_lora_into_unet`` / ``load_lora_into_text_encoder`` (PEFT adapters, weight 0.75 via set_adapters). The
outputs must agree within the tolerance of tests/test_diffusers_format.py (TOL x the reference's scale; the
LoRA adds one more rounding per weight). The same LoRA as diffusers itself writes it (PEFT ``lora_A``/``lora_B``
keys with alpha in the safetensors header) and in diffusers' older ``lora.down``/``to_q_lora`` form must give the
same model. Alphas that vary per module (which diffusers' kohya conversion does not carry over: its alpha names
for attention and text-encoder modules match no module, and PEFT ignores them with a warning) are checked
against PEFT adapters configured directly (``alpha_pattern``).
"""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import diffusers_tiny as dt
import lora_tiny as lt
from test_diffusers_format import PROMPTS, close, run_unets, tiny_config, unet_inputs
from ldm.checkpoint import load_model_from_config
from ldm.convert_diffusers import unet_name_map
from ldm.errors import InputWarning, UsageError
from ldm.lora import merge_lora, parse_lora_spec

WEIGHT = 0.75


def _mixin(family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def case(request, tmp_path_factory):
    """(family, folder, diffusers parts with the LoRA as PEFT adapters, kohya file, number of LoRA modules)."""
    from diffusers.loaders.lora_base import set_adapters_for_text_encoder
    family = request.param
    d = tmp_path_factory.mktemp(f"lora-{family}")
    parts = dt.write(d / "model", family, seed=4)
    model = load_model_from_config(tiny_config(family), d / "model")
    own = {diff: name for name, diff in unet_name_map(model.model.diffusion_model).items()}
    sd = lt.kohya_lora(family, parts, own, seed=1)  # one alpha for all modules, as kohya-ss writes them
    save_file(sd, str(d / "kohya.safetensors"))
    mixin = _mixin(family)
    kw = {"unet_config": parts["unet"].config} if family == "sdxl" else {}
    state, alphas = mixin.lora_state_dict(dict(sd), **kw)
    mixin.load_lora_into_unet(state, alphas, parts["unet"], adapter_name="a")
    parts["unet"].set_adapters(["a"], [WEIGHT])
    for comp in [c for c in ("text_encoder", "text_encoder_2") if c in parts]:
        mixin.load_lora_into_text_encoder(state, alphas, parts[comp], prefix=comp, adapter_name="a")
        set_adapters_for_text_encoder(["a"], parts[comp], [WEIGHT])
    n_modules = sum(k.endswith(".lora_down.weight") for k in sd)
    return family, d, parts, d / "kohya.safetensors", n_modules, (state, alphas)


def compare_with_diffusers(family, model, parts):
    ours, ref = run_unets(family, model.model.diffusion_model, parts["unet"], unet_inputs(family))
    checks = [("UNet", ours, ref)]
    with torch.no_grad():
        if family == "sd1":
            tok = model.cond_stage_model.tokenize(PROMPTS)
            checks.append(("CLIP-L", model.cond_stage_model.encode_tokens(tok),
                           parts["text_encoder"](tok).last_hidden_state))
        elif family == "sd2":
            tok = model.cond_stage_model.tokenize(PROMPTS)
            checks.append(("OpenCLIP", model.cond_stage_model.encode_with_transformer(tok),
                           parts["text_encoder"](tok).last_hidden_state))
        else:
            e1, e2 = model.conditioner.embedders[0], model.conditioner.embedders[1]
            tok1, tok2 = e1.tokenize(PROMPTS), e2.tokenize(PROMPTS)
            o2 = parts["text_encoder_2"](tok2, output_hidden_states=True)
            feats = e2.encode_layers(tok2)
            checks += [("CLIP-L", e1.encode_tokens(tok1),
                        parts["text_encoder"](tok1, output_hidden_states=True).hidden_states[-2]),
                       ("bigG penultimate", feats["penultimate"], o2.hidden_states[-2]),
                       ("bigG pooled", feats["pooled"], o2.text_embeds)]
    return [(what, *close(a, b)) for what, a, b in checks]


def test_kohya_lora_matches_diffusers_peft(case):
    from peft.tuners.tuners_utils import BaseTunerLayer
    family, d, parts, kohya, n_modules, _ = case
    wrapped = sum(isinstance(m, BaseTunerLayer) for c in parts.values() for m in c.modules())
    assert wrapped == n_modules  # diffusers took every module of the file: the reference is the whole LoRA
    model = load_model_from_config(tiny_config(family), d / "model")
    before = compare_with_diffusers(family, model, parts)
    record = merge_lora(model, kohya, WEIGHT)
    assert record["modules"] == n_modules and record["weight"] == WEIGHT
    for what, ok, msg in compare_with_diffusers(family, model, parts):
        assert ok, f"{family} {what} with the LoRA: {msg}"
    assert not before[0][1], "without the LoRA the UNet must differ (the comparison can fail)"


def test_diffusers_written_files_give_the_same_model(case, tmp_path):
    """The PEFT form diffusers' save_lora_weights writes (alpha in the header's lora_adapter_metadata) and the
    older form its kohya conversion produces (to_q_lora.down, lora.down, lora_linear_layer; no alphas)."""
    from peft.utils import get_peft_model_state_dict
    family, d, parts, kohya, n_modules, (state, alphas) = case
    components = [c for c in ("unet", "text_encoder", "text_encoder_2") if c in parts]
    layers = {c: get_peft_model_state_dict(parts[c], adapter_name="a") for c in components}
    meta = {c: parts[c].peft_config["a"].to_dict() for c in components}
    kw = {f"{c}_lora_layers": layers[c] for c in components}
    kw.update({f"{c}_lora_adapter_metadata": meta[c] for c in components})
    _mixin(family).save_lora_weights(tmp_path / "peft", **kw)
    peft_file = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    from safetensors import safe_open
    with safe_open(str(peft_file), "pt") as fh:
        assert "lora_adapter_metadata" in fh.metadata() and any(".lora_A." in k for k in fh.keys())
    old_file = tmp_path / "old.safetensors"
    # that form carries no alpha (alpha = rank): the kohya file's alpha / rank (2 / 4) folded into the up weights
    assert set(alphas.values()) == {2.0}
    save_file({k: v * 0.5 if ".up." in k else v for k, v in state.items()}, str(old_file))
    assert any("_lora.down." in k for k in state) and any(".lora.down." in k for k in state)
    for path in (peft_file, old_file):
        model = load_model_from_config(tiny_config(family), d / "model")
        assert merge_lora(model, path, WEIGHT)["modules"] == n_modules, path.name
        for what, ok, msg in compare_with_diffusers(family, model, parts):
            assert ok, f"{family} {what} with {path.name}: {msg}"


def test_per_module_alphas_match_peft(case, tmp_path):
    """UNet LoRA modules with alphas 1..5 in a PEFT adapter (LoraConfig alpha_pattern) on a fresh diffusers UNet;
    the same numbers as a kohya file (.alpha keys) and as the file diffusers' save_lora_weights writes from the
    adapter (alpha_pattern in the header) give our UNet the adapter's outputs."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    family, d, _, _, _, _ = case
    fresh = dt.build(family, seed=4)  # the folder's weights, without adapters
    names = lt.UNET_MODULES[family]
    alphas = {n: float(1 + i % 5) for i, n in enumerate(names)}
    model = load_model_from_config(tiny_config(family), d / "model")
    own = {diff: name for name, diff in unet_name_map(model.model.diffusion_model).items()}
    pairs = {}
    sd = lt.kohya_lora(family, fresh, own, seed=7, unet_alphas=alphas, pairs=pairs)
    sd = {k: v for k, v in sd.items() if k.startswith("lora_unet_")}
    unet = fresh["unet"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=2.0, target_modules=names, alpha_pattern=alphas), adapter_name="b")
    with torch.no_grad():
        for n, (down, up) in pairs.items():
            m = unet.get_submodule(n)
            m.lora_A["b"].weight.copy_(down)
            m.lora_B["b"].weight.copy_(up)
    unet.set_adapters(["b"], [WEIGHT])
    save_file(sd, str(tmp_path / "kohya.safetensors"))
    _mixin(family).save_lora_weights(tmp_path / "peft", unet_lora_layers=get_peft_model_state_dict(unet, adapter_name="b"),
                                     unet_lora_adapter_metadata=unet.peft_config["b"].to_dict())
    for path in (tmp_path / "kohya.safetensors", tmp_path / "peft" / "pytorch_lora_weights.safetensors"):
        model = load_model_from_config(tiny_config(family), d / "model")
        assert merge_lora(model, path, WEIGHT)["modules"] == len(names)
        ours, ref = run_unets(family, model.model.diffusion_model, unet, unet_inputs(family))
        ok, msg = close(ours, ref)
        assert ok, f"{family} {path.name}: {msg}"


def test_unmatched_and_foreign_loras(case, tmp_path):
    family, d, parts, kohya, _, _ = case
    model = load_model_from_config(tiny_config(family), d / "model")
    nothing = tmp_path / "nothing.safetensors"
    save_file({"lora_unet_no_such_block.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_no_such_block.lora_up.weight": torch.zeros(8, 4)}, str(nothing))
    with pytest.raises(UsageError, match="none of its 2 keys matches a layer of this model; expected"):
        merge_lora(model, nothing, 1.0)
    from safetensors.torch import load_file
    sd = load_file(kohya)
    sd["lora_unet_no_such_block.lora_down.weight"] = torch.zeros(4, 8)
    sd["lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a"] = torch.zeros(4, 8)
    partial = tmp_path / "partial.safetensors"
    save_file(sd, str(partial))
    with pytest.warns(InputWarning, match=r"2 key\(s\) match no layer.*hada_w1_a \(LoHa\)"):
        merge_lora(model, partial, 1.0)
    other = {"sd1": "sdxl", "sd2": "sdxl", "sdxl": "sd1"}[family]  # a LoRA made for another family
    other_parts = dt.build(other, seed=0)
    other_model = load_model_from_config(tiny_config(other))
    own = {diff: name for name, diff in unet_name_map(other_model.model.diffusion_model).items()}
    foreign = tmp_path / "foreign.safetensors"
    save_file(lt.kohya_lora(other, other_parts, own), str(foreign))
    with pytest.raises(UsageError, match="does not fit this model"):
        merge_lora(model, foreign, 1.0)


def test_lora_spec_parsing(tmp_path):
    f = tmp_path / "a:b.safetensors"
    f.write_bytes(b"x")
    assert parse_lora_spec(f"{f}:0.5") == (str(f), 0.5)
    assert parse_lora_spec(str(f)) == (str(f), 1.0)  # the ':' inside the name is part of the path
    import argparse
    for bad in (f"{tmp_path}/missing.safetensors", f"{f}:nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_lora_spec(bad)


# ---------------------------------------------------------------------------------------------------------
# the pipelines (SD 2.x: txt2img with ScaleCrafter's re-dilation, upscale img2img)

@pytest.fixture(scope="module")
def sd2_case(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-cli")
    parts = dt.write(d / "model", "sd2", seed=6)
    model = load_model_from_config(tiny_config("sd2"), d / "model")
    own = {diff: name for name, diff in unet_name_map(model.model.diffusion_model).items()}
    save_file(lt.kohya_lora("sd2", parts, own, seed=2), str(d / "style.safetensors"))
    return d


def _png(path):
    im = Image.open(path)
    return torch.from_numpy(__import__("numpy").asarray(im.convert("RGB")).copy()), json.loads(im.text["parameters"])


def test_txt2img_lora_is_merged_before_the_method(sd2_case, tmp_path):
    """--lora FILE:0.5 gives the image of a checkpoint that already holds the merged weights, with a re-dilating
    method (the merge precedes everything the method does); the PNG metadata names the LoRA."""
    from ldm.lora import file_sha256
    from ldm.pipelines.txt2img import main
    lora = sd2_case / "style.safetensors"
    merged = load_model_from_config(tiny_config("sd2"), sd2_case / "model")
    merge_lora(merged, lora, 0.5)
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, str(tmp_path / "merged.safetensors"))
    common = ["--config", "configs/tiny/tiny-sd2.yaml", "--H", "128", "--W", "128", "--steps", "2",
              "--dilate", "2", "--dilate_tau", "2", "--skip_grid", "--device", "cpu", "--prompt", "a cat", "--seed", "3"]
    assert main([*common, "--ckpt", str(sd2_case / "model"), "--lora", f"{lora}:0.5", "--outdir",
                 str(tmp_path / "a")]) == 0
    assert main([*common, "--ckpt", str(tmp_path / "merged.safetensors"), "--outdir", str(tmp_path / "b")]) == 0
    assert main([*common, "--ckpt", str(sd2_case / "model"), "--outdir", str(tmp_path / "c")]) == 0
    a, meta = _png(tmp_path / "a/samples/00000.png")
    b, _ = _png(tmp_path / "b/samples/00000.png")
    c, _ = _png(tmp_path / "c/samples/00000.png")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert meta["lora"] == [{"name": "style.safetensors", "sha256": file_sha256(lora)[:12], "weight": 0.5,
                             "modules": 23}]
    assert meta["ckpt"] == "model"


def test_cli_lora_errors(sd2_case, tmp_path, capsys):
    from ldm.pipelines.txt2img import main
    base = ["--config", "configs/tiny/tiny-sd2.yaml", "--ckpt", str(sd2_case / "model"), "--H", "64", "--W", "64",
            "--steps", "1", "--outdir", str(tmp_path / "out"), "--device", "cpu"]
    with pytest.raises(SystemExit) as exc:
        main([*base, "--lora", str(tmp_path / "missing.safetensors")])
    assert exc.value.code == 2 and "no such LoRA file" in capsys.readouterr().err
    empty = tmp_path / "empty.safetensors"
    save_file({"something.weight": torch.zeros(2)}, str(empty))
    assert main([*base, "--lora", str(empty)]) == 2
    assert "none of its 1 keys matches" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written


def test_upscale_img2img_records_the_lora(sd2_case, tmp_path):
    from ldm.pipelines.upscale import main
    img = tmp_path / "in.png"
    Image.fromarray((torch.rand(48, 40, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(img)
    lora = sd2_case / "style.safetensors"
    assert main(["--method", "scalecrafter", "--image", str(img), "--config", "configs/tiny/tiny-sd2.yaml",
                 "--ckpt", str(sd2_case / "model"), "--lora", f"{lora}:0.8", "--lora", str(lora), "--W", "80",
                 "--steps", "2", "--strength", "0.5", "--dilate", "2", "--dilate_tau", "2",
                 "--outdir", str(tmp_path / "up"), "--device", "cpu"]) == 0
    _, meta = _png(tmp_path / "up/00000.png")
    assert [(r["name"], r["weight"]) for r in meta["lora"]] == [("style.safetensors", 0.8), ("style.safetensors", 1.0)]
