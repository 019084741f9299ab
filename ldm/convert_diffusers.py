"""Diffusers-format model folders (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``text_encoder_2/``) loaded into the LDM (CompVis) layout of the model a config builds.

``load_folder(folder, model)`` reads the components' weights and renames them to the state-dict keys of
``model`` (a ``LatentDiffusion`` or ``SDXLDiffusion`` built from one of configs/stable-diffusion/*.yaml), so
that ``ldm.checkpoint`` checks and loads them exactly like an original ``.ckpt``. The renaming is derived from
the built model's structure (levels, residual blocks per level, transformer depths), not from a fixed key
table, so the same code serves SD 1.x, SD 2.x, SDXL and the tiny test configs.

What is converted, and how:

* UNet (``unet/``): module paths renamed (``down_blocks.L.resnets.J`` -> ``input_blocks.N.0`` with the
  ResBlock's inner names, ``attentions`` -> the ``SpatialTransformer`` at ``input_blocks.N.1``, ...);
  1x1-conv and linear projections are reshaped into each other where the config and the file differ.
* VAE (``vae/``): ``down_blocks``/``up_blocks`` (the decoder's in reverse order) to ``down``/``up``, the
  mid-block attention's linear q/k/v/out (or the older query/key/value/proj_attn) to 1x1 convs.
* Hugging Face CLIP text models (SD 1.x ``text_encoder``, SDXL ``text_encoder``): the same keys.
* OpenCLIP text towers (SD 2.x ``text_encoder``, SDXL ``text_encoder_2``), which diffusers stores as
  Hugging Face CLIP: q/k/v projections concatenated into ``in_proj``, ``fc1``/``fc2`` to ``c_fc``/``c_proj``,
  ``text_projection.weight`` transposed. Diffusers' SD 2.x text encoder has one layer fewer than OpenCLIP's
  (the penultimate-layer output is its last); the missing last block, which the config's
  ``layer: penultimate`` never runs, is filled with zeros, as are the unused ``text_projection`` and
  ``logit_scale`` (logit_scale with log(1/0.07)). Those fills are listed in the notes ``load_folder`` returns.

Weights are read from ``.safetensors`` (single or sharded, ``.fp16`` variants when no full-precision file
exists); ``.bin`` files are refused unless ``allow_unsafe`` (``--unsafe_load``). Diffusers keys that map
to nothing are kept as ``<component>/<key>`` so that the strict check names them as unexpected.
"""
import json
import math
import re
from pathlib import Path

import torch

COMPONENT_WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")

# family -> (config to use, what it is)
SUGGESTED_CONFIGS = {
    "sd1": "configs/stable-diffusion/v1-inference.yaml",
    "sd2": "configs/stable-diffusion/v2-inference.yaml",
    "sd2-v": "configs/stable-diffusion/v2-inference-v.yaml",
    "sdxl": "configs/stable-diffusion/sdxl-base-inference.yaml",
}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd2-x4": "SD 2.x x4 upscaler"}


def _error(message):
    from ldm.checkpoint import CheckpointError
    return CheckpointError(message)


def is_diffusers_folder(path):
    """A directory given as a checkpoint: always treated as a diffusers folder (and checked as one)."""
    return Path(str(path)).is_dir()


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise _error(f"{path} is not valid JSON ({err}); get the file again") from None


# ------------------------------------------------------------------------------------------------------------
# what the folder is

def folder_info(folder):
    """{'family': 'sd1' | 'sd2' | 'sdxl' | None, 'prediction': 'epsilon' | 'v_prediction' | ..., 'pipeline':
    class name, 'reason': how the family was read, 'components': [...] } from the folder's JSON files only."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json") or {}
    pipeline = str(index.get("_class_name", ""))
    unet_cfg = _read_json(folder / "unet" / "config.json") or {}
    te_cfg = _read_json(folder / "text_encoder" / "config.json") or {}
    sched = _read_json(folder / "scheduler" / "scheduler_config.json") or {}
    components = [d.name for d in sorted(folder.iterdir()) if d.is_dir()]
    family, reason = None, ""
    if "Upscale" in pipeline or unet_cfg.get("num_class_embeds") == 1000:
        family, reason = "sd2-x4", f"model_index.json names {pipeline or 'an upscaler'}"
    elif "XL" in pipeline or unet_cfg.get("addition_embed_type") == "text_time" or (folder / "text_encoder_2").is_dir():
        family, reason = "sdxl", (f"model_index.json names {pipeline}" if "XL" in pipeline
                                  else "unet/config.json has SDXL's text_time embedding / a text_encoder_2")
    elif te_cfg.get("hidden_act") == "quick_gelu":
        family, reason = "sd1", "text_encoder/config.json: CLIP ViT-L's quick_gelu (SD 1.x)"
    elif te_cfg.get("hidden_act") == "gelu":
        family, reason = "sd2", "text_encoder/config.json: OpenCLIP's gelu (SD 2.x)"
    elif unet_cfg.get("cross_attention_dim") in (768, 1024):
        family = "sd1" if unet_cfg["cross_attention_dim"] == 768 else "sd2"
        reason = f"unet/config.json: cross_attention_dim {unet_cfg['cross_attention_dim']}"
    return {"family": family, "prediction": sched.get("prediction_type", "epsilon"), "pipeline": pipeline,
            "reason": reason, "components": components,
            "vae_scaling_factor": (_read_json(folder / "vae" / "config.json") or {}).get("scaling_factor")}


def suggested_config(info):
    """The config of configs/stable-diffusion/ for a folder_info() result, or None."""
    fam = info["family"]
    if fam == "sd2" and info["prediction"] == "v_prediction":
        fam = "sd2-v"
    return SUGGESTED_CONFIGS.get(fam)


def config_family(config):
    """('sd1' | 'sd2' | 'sdxl' | 'sd2-x4' | None, parameterization) of a model config, without building it."""
    model = config.model if "model" in config else config
    params = model.get("params", {}) or {}
    param = str(params.get("parameterization", "eps"))
    if "low_scale_config" in params:
        return "sd2-x4", param
    if "conditioner_config" in params or "SDXL" in str(model.get("target", "")):
        return "sdxl", param
    target = str((params.get("cond_stage_config") or {}).get("target", ""))
    if target.endswith(".FrozenCLIPEmbedder"):
        return "sd1", param
    if target.endswith(".FrozenOpenCLIPEmbedder"):
        return "sd2", param
    return None, param


def check_folder(folder, config=None, config_name="config"):
    """Cheap check before the model is built: the folder has the components the config needs, in a known
    format, and is of the config's family and prediction type. Returns folder_info(folder)."""
    folder = Path(str(folder))
    if not any((folder / c).is_dir() for c in ("unet", "vae", "text_encoder")):
        raise _error(f"{folder} is a folder but not a diffusers model folder: expected model_index.json with "
                     "unet/, vae/, text_encoder/ (and text_encoder_2/ for SDXL). Pass a .ckpt/.safetensors file "
                     "or a diffusers folder (e.g. a Hugging Face snapshot of stable-diffusion-v1-5) with --ckpt")
    info = folder_info(folder)
    if info["family"] == "sd2-x4":
        raise _error(f"{folder} is an x4 upscaler in diffusers format ({info['reason']}); only SD 1.x, SD 2.x "
                     "and SDXL folders are converted: use the original x4-upscaler-ema file")
    needed = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if info["family"] == "sdxl" else [])
    missing = [c for c in needed if not (folder / c).is_dir()]
    if missing:
        raise _error(f"{folder}: the diffusers folder lacks {', '.join(c + '/' for c in missing)} (a partial "
                     "download? the tokenizer and scheduler folders are not needed, these are)")
    if config is None:
        return info
    fam_cfg, param = config_family(config)
    suggestion = suggested_config(info)
    if info["family"] and fam_cfg and info["family"] != fam_cfg:
        raise _error(f"{folder} is a {FAMILY_NAMES[info['family']]} diffusers folder ({info['reason']}) but "
                     f"{config_name} is a {FAMILY_NAMES.get(fam_cfg, fam_cfg)} config: use --config {suggestion}")
    want = {"eps": "epsilon", "v": "v_prediction"}.get(param)
    if want and info["prediction"] in ("epsilon", "v_prediction") and info["prediction"] != want:
        fix = "v" if info["prediction"] == "v_prediction" else "eps"
        other = f"a copy of {config_name} with parameterization: {fix}"
        if info["family"] == "sd2":
            other = suggested_config(info)
        raise _error(f"{folder} predicts {info['prediction']} (scheduler/scheduler_config.json) but {config_name} "
                     f"has parameterization: {param}: use {other}; sampling with the wrong one gives noise")
    return info


# ------------------------------------------------------------------------------------------------------------
# reading a component's weights

def component_weight_files(component_dir, allow_unsafe=False):
    """The weight file(s) of one component folder: safetensors first (full precision, then a variant such as
    .fp16), sharded or not; .bin only with allow_unsafe."""
    d = Path(component_dir)
    names = sorted(p.name for p in d.iterdir() if p.is_file())

    def pick(ext):
        for base in COMPONENT_WEIGHT_NAMES:
            for variant in ("", *sorted({n[len(base) + 1:-len(ext) - 1] for n in names
                                         if n.startswith(base + ".") and n.endswith("." + ext)
                                         and n.count(".") == base.count(".") + 2})):
                stem = f"{base}.{variant}" if variant else base
                if f"{stem}.{ext}" in names:
                    return [d / f"{stem}.{ext}"]
                if f"{stem}.{ext}.index.json" in names:
                    index = _read_json(d / f"{stem}.{ext}.index.json") or {}
                    shards = sorted(set((index.get("weight_map") or {}).values()))
                    if not shards:
                        raise _error(f"{d / (stem + '.' + ext + '.index.json')} lists no shards")
                    absent = [s for s in shards if not (d / s).is_file()]
                    if absent:
                        raise _error(f"{d}: shard(s) {', '.join(absent)} named by the index are missing "
                                     "(a partial download?)")
                    return [d / s for s in shards]
        return None

    files = pick("safetensors")
    if files:
        return files
    files = pick("bin")
    if files:
        if not allow_unsafe:
            raise _error(f"{d} has only PyTorch pickle weights ({', '.join(f.name for f in files)}), which are "
                         "refused by default: get the .safetensors files of this model, or, if you trust its "
                         "source, re-run with --unsafe_load (Python API: allow_unsafe=True)")
        return files
    raise _error(f"{d} holds no weights: expected diffusion_pytorch_model.safetensors or model.safetensors "
                 f"(found: {', '.join(names) or 'nothing'})")


def read_component(component_dir, allow_unsafe=False):
    from ldm.checkpoint import load_state_dict_file
    sd = {}
    for f in component_weight_files(component_dir, allow_unsafe):
        sd.update(load_state_dict_file(f, allow_unsafe=allow_unsafe))
    return sd


# ------------------------------------------------------------------------------------------------------------
# UNet names

RESBLOCK_RENAMES = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                    ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))


def unet_module_pairs(unet):
    """[(own module path, diffusers module path, kind)] for an LDM ``UNetModel``; kind: 'res' (a ResBlock,
    whose inner names are RESBLOCK_RENAMES), 'attn' (a SpatialTransformer: same inner names) or 'leaf'."""
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample

    def kind_of(layer):
        if isinstance(layer, ResBlock):
            if layer.updown:
                raise _error("UNets with resblock_updown have no diffusers counterpart here")
            return "res", "resnets"
        if isinstance(layer, SpatialTransformer):
            return "attn", "attentions"
        raise _error(f"unexpected {type(layer).__name__} in the UNet")

    pairs = [("time_embed.0", "time_embedding.linear_1", "leaf"), ("time_embed.2", "time_embedding.linear_2", "leaf"),
             ("input_blocks.0.0", "conv_in", "leaf"), ("out.0", "conv_norm_out", "leaf"), ("out.2", "conv_out", "leaf")]
    label = getattr(unet, "label_emb", None)
    if isinstance(label, torch.nn.Sequential):  # SDXL's vector conditioning
        pairs += [("label_emb.0.0", "add_embedding.linear_1", "leaf"), ("label_emb.0.2", "add_embedding.linear_2", "leaf")]
    elif isinstance(label, torch.nn.Embedding):
        pairs.append(("label_emb", "class_embedding", "leaf"))
    levels = len(unet.channel_mult)
    k = 1
    for level in range(levels):
        for j in range(unet.num_res_blocks[level]):
            for pos, layer in enumerate(unet.input_blocks[k]):
                kind, group = kind_of(layer)
                pairs.append((f"input_blocks.{k}.{pos}", f"down_blocks.{level}.{group}.{j}", kind))
            k += 1
        if level != levels - 1:
            down = unet.input_blocks[k][0]
            if not (isinstance(down, Downsample) and down.use_conv):
                raise _error("only UNets with conv downsampling have a diffusers counterpart here")
            pairs.append((f"input_blocks.{k}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "leaf"))
            k += 1
    res = 0
    for pos, layer in enumerate(unet.middle_block):
        kind, group = kind_of(layer)
        pairs.append((f"middle_block.{pos}", f"mid_block.{group}.{res if kind == 'res' else 0}", kind))
        res += kind == "res"
    k = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(unet.num_res_blocks[level] + 1):
            for pos, layer in enumerate(unet.output_blocks[k]):
                if isinstance(layer, Upsample):
                    pairs.append((f"output_blocks.{k}.{pos}.conv", f"up_blocks.{up}.upsamplers.0.conv", "leaf"))
                    continue
                kind, group = kind_of(layer)
                pairs.append((f"output_blocks.{k}.{pos}", f"up_blocks.{up}.{group}.{j}", kind))
            k += 1
    return pairs


def _rename(name, pairs, inner):
    """Own name -> other name by the longest matching module prefix; None when nothing matches."""
    best = None
    for own, other, kind in pairs:
        if name == own or name.startswith(own + "."):
            if best is None or len(own) > len(best[0]):
                best = (own, other, kind)
    if best is None:
        return None
    own, other, kind = best
    rest = name[len(own):]
    if kind in inner and rest:
        for a, b in inner[kind]:
            if rest == "." + a or rest.startswith("." + a + "."):
                rest = "." + b + rest[len(a) + 1:]
                break
    return other + rest


def unet_name_map(unet):
    """{own module or parameter name: diffusers name} for every module with parameters and every parameter."""
    pairs = unet_module_pairs(unet)
    inner = {"res": RESBLOCK_RENAMES}
    out = {}
    for name, _ in unet.named_modules():
        if name:
            d = _rename(name, pairs, inner)
            if d is not None:
                out[name] = d
    for name in unet.state_dict():
        d = _rename(name, pairs, inner)
        if d is not None:
            out[name] = d
    return out


# ------------------------------------------------------------------------------------------------------------
# VAE names

VAE_RES_RENAMES = (("nin_shortcut", "conv_shortcut"),)
VAE_ATTN_RENAMES = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
_OLD_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae_module_pairs(vae):
    pairs = [("quant_conv", "quant_conv", "leaf"), ("post_quant_conv", "post_quant_conv", "leaf")]
    for side in ("encoder", "decoder"):
        net = getattr(vae, side)
        pairs += [(f"{side}.conv_in", f"{side}.conv_in", "leaf"), (f"{side}.conv_out", f"{side}.conv_out", "leaf"),
                  (f"{side}.norm_out", f"{side}.conv_norm_out", "leaf"),
                  (f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", "res"),
                  (f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", "res"),
                  (f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", "attn")]
        n = len(net.down if side == "encoder" else net.up)
        for i in range(n):
            level = net.down[i] if side == "encoder" else net.up[i]
            d_i = i if side == "encoder" else n - 1 - i
            group = "down_blocks" if side == "encoder" else "up_blocks"
            for j in range(len(level.block)):
                pairs.append((f"{side}.{'down' if side == 'encoder' else 'up'}.{i}.block.{j}",
                              f"{side}.{group}.{d_i}.resnets.{j}", "res"))
            for j in range(len(level.attn)):
                pairs.append((f"{side}.{'down' if side == 'encoder' else 'up'}.{i}.attn.{j}",
                              f"{side}.{group}.{d_i}.attentions.{j}", "attn"))
            sampler = "downsample" if side == "encoder" else "upsample"
            if hasattr(level, sampler):
                pairs.append((f"{side}.{'down' if side == 'encoder' else 'up'}.{i}.{sampler}.conv",
                              f"{side}.{group}.{d_i}.{sampler}rs.0.conv", "leaf"))
    return pairs


def vae_name_map(vae):
    pairs = vae_module_pairs(vae)
    inner = {"res": VAE_RES_RENAMES, "attn": VAE_ATTN_RENAMES}
    return {name: d for name in vae.state_dict() if (d := _rename(name, pairs, inner)) is not None}


def _normalize_vae_keys(sd):
    out = {}
    for k, v in sd.items():
        m = re.match(r"^(.*attentions\.\d+\.)(query|key|value|proj_attn)(\..*)$", k)
        out[m.group(1) + _OLD_VAE_ATTN[m.group(2)] + m.group(3) if m else k] = v
    return out


# ------------------------------------------------------------------------------------------------------------
# text encoders

def _strip_text_model(key):
    return key[len("text_model."):] if key.startswith("text_model.") else key


def openclip_sources(n_layers):
    """{open_clip parameter name: [(HF CLIP parameter name (without text_model.), row slice or None)]}:
    the HF parameters whose rows make up each open_clip parameter (q/k/v stacked into in_proj)."""
    out = {"token_embedding.weight": [("embeddings.token_embedding.weight", None)],
           "positional_embedding": [("embeddings.position_embedding.weight", None)],
           "ln_final.weight": [("final_layer_norm.weight", None)],
           "ln_final.bias": [("final_layer_norm.bias", None)]}
    for i in range(n_layers):
        own, hf = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for p in ("weight", "bias"):
            out[f"{own}attn.in_proj_{p}"] = [(f"{hf}self_attn.{x}_proj.{p}", j) for j, x in enumerate("qkv")]
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{own}{a}.{p}"] = [(f"{hf}{b}.{p}", None)]
    return out


def openclip_module_map(n_layers):
    """{HF CLIP module name (without text_model.): (open_clip module name, which third of in_proj or None)}:
    where a LoRA written for the HF module lands in open_clip."""
    out = {}
    for i in range(n_layers):
        own, hf = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for j, x in enumerate("qkv"):
            out[f"{hf}self_attn.{x}_proj"] = (f"{own}attn.in_proj", j)
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[hf + b] = (own + a, None)
    return out


def convert_openclip(hf_sd, embedder, prefix, notes, component):
    """HF-CLIP-layout weights (diffusers' SD 2.x text_encoder / SDXL text_encoder_2) -> open_clip keys."""
    hf = {_strip_text_model(k): v for k, v in hf_sd.items()}
    hf.pop("embeddings.position_ids", None)
    model = embedder.model
    expected = model.state_dict()
    n_model = len(model.transformer.resblocks)
    n_file = 1 + max([int(m.group(1)) for k in hf if (m := re.match(r"encoder\.layers\.(\d+)\.", k))], default=-1)
    used, out = set(), {}
    for name, sources in openclip_sources(min(n_file, n_model)).items():
        parts = []
        for src, _ in sources:
            if src in hf:
                parts.append(hf[src])
                used.add(src)
        if len(parts) == len(sources):
            out[prefix + name] = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
    if "text_projection.weight" in hf:
        w = hf["text_projection.weight"]
        used.add("text_projection.weight")
        if "text_projection.weight" in expected:  # open_clip with a Linear projection
            out[prefix + "text_projection.weight"] = w
        else:
            out[prefix + "text_projection"] = w.t().contiguous()
    skipped = n_model - n_file
    unused_tail = getattr(embedder, "layer_idx", 0) if not getattr(embedder, "return_pooled", False) else 0
    if 0 < skipped <= unused_tail:
        for i in range(n_file, n_model):
            for name, t in expected.items():
                if name.startswith(f"transformer.resblocks.{i}."):
                    out[prefix + name] = torch.zeros_like(t, device="cpu")
        notes.append(f"{component} has {n_file} layers for the config's {n_model} (diffusers' SD 2.x layout); the "
                     f"last {skipped} block(s), never run with layer: {embedder.layer}, are filled with zeros "
                     "(the outputs are unchanged)")
    for name, t in expected.items():
        if name in ("text_projection", "text_projection.weight") and prefix + name not in out \
                and not getattr(embedder, "return_pooled", False):
            out[prefix + name] = torch.zeros_like(t, device="cpu")
            notes.append(f"{component} has no text_projection (unused without a pooled output): zeros")
        if name == "logit_scale" and prefix + name not in out:
            out[prefix + name] = torch.full_like(t, math.log(1 / 0.07), device="cpu")
    for k, v in hf.items():
        if k not in used:
            out[f"{component}/{k}"] = v
    return out


def convert_hf_clip(hf_sd, encoder, prefix, component):
    expected = set(encoder.state_dict())
    out = {}
    for k, v in hf_sd.items():
        rest = _strip_text_model(k)
        if rest == "embeddings.position_ids":
            continue
        own = "transformer.text_model." + rest
        out[prefix + own if own in expected else f"{component}/{k}"] = v
    return out


# ------------------------------------------------------------------------------------------------------------
# the whole model

def _reshape_like(t, shape):
    """Linear <-> 1x1 conv weights (the same numbers in another layout)."""
    if tuple(t.shape) == tuple(shape):
        return t
    if t.numel() == math.prod(shape) and tuple(t.shape[:2]) == tuple(shape[:2]) and \
            all(s == 1 for s in (t.shape[2:] or ())) and all(s == 1 for s in (tuple(shape)[2:] or ())):
        return t.reshape(shape)
    return t


def convert_component(diff_sd, module, prefix, name_map, component):
    """diffusers keys -> own keys by ``name_map`` (own -> diffusers); unmapped keys kept as component/key."""
    expected = module.state_dict()
    inverse = {d: own for own, d in name_map.items() if own in expected}
    out = {}
    for k, v in diff_sd.items():
        own = inverse.get(k)
        if own is None:
            out[f"{component}/{k}"] = v
        else:
            out[prefix + own] = _reshape_like(v, expected[own].shape)
    return out


def model_parts(model):
    """[(kind, module path, module)] of the parts a diffusers folder fills, text encoders in their order."""
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
    parts = []
    for name, m in model.named_modules():
        if isinstance(m, UNetModel):
            parts.append(("unet", name, m))
        elif isinstance(m, AutoencoderKL):
            parts.append(("vae", name, m))
        elif isinstance(m, FrozenCLIPEmbedder):
            parts.append(("hf_clip", name, m))
        elif isinstance(m, FrozenOpenCLIPEmbedder):
            parts.append(("open_clip", name, m))
    return parts


def text_encoder_parts(model):
    """[(diffusers folder name, kind, module path, module)] of the model's text encoders."""
    texts = [p for p in model_parts(model) if p[0] in ("hf_clip", "open_clip")]
    return [("text_encoder" if i == 0 else f"text_encoder_{i + 1}", *p) for i, p in enumerate(texts)]


def convert_components(read, model):
    """(state dict in ``model``'s own layout, notes) from ``read(component)`` -> that component's diffusers
    state dict, for the components the model has ("unet", "vae", "text_encoder", "text_encoder_2")."""
    notes, sd = [], {}
    for kind, name, module in model_parts(model):
        if kind == "unet":
            sd.update(convert_component(read("unet"), module, name + ".", unet_name_map(module), "unet"))
        elif kind == "vae":
            sd.update(convert_component(_normalize_vae_keys(read("vae")), module, name + ".", vae_name_map(module),
                                        "vae"))
    for component, kind, name, module in text_encoder_parts(model):
        if kind == "hf_clip":
            sd.update(convert_hf_clip(read(component), module, name + ".", component))
        else:
            sd.update(convert_openclip(read(component), module, name + ".model.", notes, component))
    return sd, notes


def load_folder(folder, model, allow_unsafe=False):
    """(state dict in ``model``'s own layout, notes) from the diffusers folder ``folder``."""
    folder = Path(str(folder))
    info = check_folder(folder)
    sd, notes = convert_components(lambda component: read_component(folder / component, allow_unsafe), model)
    scale = info.get("vae_scaling_factor")
    own_scale = getattr(model, "scale_factor", None)
    if scale is not None and own_scale is not None and abs(float(scale) - float(own_scale)) > 1e-6:
        import warnings
        from ldm.errors import InputWarning
        warnings.warn(f"{folder}: vae/config.json has scaling_factor {scale} but the config has scale_factor "
                      f"{float(own_scale):g}; the config's is used", InputWarning, stacklevel=3)
    return sd, notes
