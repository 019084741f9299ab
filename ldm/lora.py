"""LoRA files merged into a loaded model's weights (``--lora FILE[:weight]``).

Merging (W <- W + weight * alpha / rank * up @ down, per module) happens once, after loading and before any
method touches the model, so every method sees the adapted weights exactly: re-dilated and dispersed
convolutions, FreeScale's and DemoFusion's wrapped layers all read the merged kernels. The merge is exact
(up to float32 rounding of one addition per weight) and costs no time per step.

Formats (detected per key):

* kohya-ss / A1111 (``lora_unet_<module>``, ``lora_te_``, SDXL's ``lora_te1_``/``lora_te2_``; ``.lora_down``,
  ``.lora_up``, ``.alpha``): module names in diffusers' naming (SD 1.x/2.x trainers) or this UNet's own
  (SDXL trainers: ``input_blocks_4_1_...``), with ``_`` for ``.``; LoCon convolutions (1x1 and 3x3 kernels:
  ResBlock convs, down/upsamplers, conv_in/out) included;
* diffusers / PEFT (``unet.<module>.lora_A.weight``/``lora_B``, ``text_encoder.…``, ``text_encoder_2.…``; the
  older ``lora.down``/``lora.up`` and attention-processor ``to_q_lora.down`` forms): alpha from ``.alpha`` keys
  or the ``lora_adapter_metadata`` diffusers writes into the safetensors header (``lora_alpha``,
  ``alpha_pattern``), else alpha = rank.

Text-encoder LoRAs are written for Hugging Face CLIP module names; for the OpenCLIP towers (SD 2.x, SDXL's
second encoder) q/k/v land in the matching third of ``in_proj_weight``, fc1/fc2 in ``c_fc``/``c_proj``.
LoHa, LoKr, DoRA and Tucker (``lora_mid``) modules are not supported: they are listed as unmatched.
"""
import argparse
import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.errors import InputWarning, UsageError

SUFFIXES = (  # (suffix, role)
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
)
UNSUPPORTED = {"hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA",
               "lora_mid": "LoCon Tucker (lora_mid)", ".diff": "full weight differences"}
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
DOTTED_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}


def parse_lora_spec(spec):
    """'FILE[:weight]' -> (path, weight); for argparse (``type=``): a missing file or bad weight is an error."""
    path, weight = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
            path = head
        except ValueError:
            pass  # a ':' inside the path
    if not math.isfinite(weight):
        raise argparse.ArgumentTypeError(f"{spec}: the weight after ':' must be a finite number")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{path}: no such LoRA file (give FILE or FILE:weight, e.g. "
                                         f"style.safetensors:0.8)")
    return str(path), weight


@dataclass
class Target:
    """Where one LoRA module lands: ``module.<param>`` rows ``rows`` (all rows when None)."""
    name: str
    module: torch.nn.Module
    param: str = "weight"
    rows: slice = None

    def weight(self):
        w = getattr(self.module, self.param)
        return w if self.rows is None else w[self.rows]


def _flat(name):
    return name.replace(".", "_")


def _register(table, hf_name, target):
    """A text-encoder target under its HF CLIP name with and without ``text_model.`` (files written with
    transformers 5 omit it), dotted and flattened."""
    short = hf_name[len("text_model."):] if hf_name.startswith("text_model.") else hf_name
    for n in {hf_name, short}:
        table[n] = table[_flat(n)] = target


def model_targets(model):
    """{component: {name: Target}} for every weight a LoRA can address, under every accepted spelling:
    diffusers dotted names, kohya flattened names of diffusers' and this UNet's own module paths."""
    from ldm.convert_diffusers import model_parts, openclip_module_map, text_encoder_parts, unet_name_map
    out = {}
    for kind, path, module in model_parts(model):
        if kind != "unet":
            continue
        names = unet_name_map(module)
        table = {}
        for own, m in module.named_modules():
            if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or own not in names:
                continue
            t = Target(f"{path}.{own}", m)
            for n in (names[own], own):
                table[n] = t
                table[_flat(n)] = t
        out["unet"] = table
    for component, kind, path, enc in text_encoder_parts(model):
        table = {}
        if kind == "hf_clip":
            for name, m in enc.transformer.named_modules():
                if isinstance(m, torch.nn.Linear):
                    hf = "text_model." + (name[len("text_model."):] if name.startswith("text_model.") else name)
                    if name == "text_projection":
                        hf = "text_projection"
                    _register(table, hf, Target(f"{path}.transformer.{name}", m))
        else:
            width = enc.model.transformer.width
            mods = dict(enc.model.named_modules())
            for hf, (own, third) in openclip_module_map(len(enc.model.transformer.resblocks)).items():
                if third is None:
                    t = Target(f"{path}.model.{own}", mods[own])
                else:
                    attn = mods[own.rsplit(".", 1)[0]]
                    t = Target(f"{path}.model.{own}_weight[{third}]", attn, "in_proj_weight",
                               slice(third * width, (third + 1) * width))
                _register(table, "text_model." + hf, t)
        out[component] = table
    return out


def _split_key(key):
    """(component, module name, role) of a LoRA key, or (None, key, reason) when it is not a LoRA weight."""
    for marker, what in UNSUPPORTED.items():
        if marker in key:
            return None, key, what
    for suffix, role in SUFFIXES:
        if key.endswith(suffix):
            name = key[:-len(suffix)]
            break
    else:
        m = re.match(r"^(.*?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$", key)
        if not m:
            return None, key, "not a LoRA weight"
        name, role = f"{m.group(1)}.{m.group(2)}", m.group(3)
        if name.endswith("to_out"):
            name += ".0"
        if ".self_attn." in name:  # diffusers' old text-encoder spelling
            name = name.replace(".to_q", ".q_proj").replace(".to_k", ".k_proj").replace(".to_v", ".v_proj") \
                .replace(".to_out.0", ".out_proj")
    name = name.replace(".processor.", ".")
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    for prefix, component in KOHYA_PREFIXES.items():
        if name.startswith(prefix):
            return component, name[len(prefix):], role
    for prefix, component in DOTTED_PREFIXES.items():
        if name.startswith(prefix):
            return component, name[len(prefix):], role
    if name.startswith(("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.")):
        return "unet", name, role  # diffusers' attention-processor files carry no prefix
    return "unet?", name, role


def read_lora(path, allow_unsafe=False):
    """(state dict, safetensors metadata or {}) of a LoRA file."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file
        try:
            with safe_open(path, framework="pt") as fh:
                meta = fh.metadata() or {}
            return load_file(path), meta
        except Exception as err:
            raise UsageError(f"--lora {path} is not a valid .safetensors file ({err}): get the file again") from None
    from ldm.checkpoint import CheckpointError, load_state_dict_file
    try:
        return load_state_dict_file(path, allow_unsafe=allow_unsafe), {}
    except CheckpointError as err:
        raise UsageError(f"--lora {err}") from None


def _peft_alphas(meta):
    """{component: (lora_alpha, r, alpha_pattern)} from diffusers' lora_adapter_metadata, if present."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    out = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        alpha = data.get(f"{component}.lora_alpha")
        if alpha is not None:
            out[component] = (float(alpha), data.get(f"{component}.r"), data.get(f"{component}.alpha_pattern") or {})
    return out


def _alpha_for(component, name, rank, peft):
    if component not in peft:
        return float(rank)
    alpha, _, pattern = peft[component]
    for pat, value in pattern.items():  # PEFT matches a pattern against the end of the module name
        if re.match(rf"(.*\.)?({pat})$", name):
            return float(value)
    return alpha


def merge_lora(model, path, weight=1.0, allow_unsafe=False, _sd=None):
    """Merge one LoRA file into ``model`` (in place). Returns its record {name, sha256, weight, modules}.
    Errors (UsageError) when no module matches or shapes disagree; warns (InputWarning) about unmatched keys."""
    sd, meta = (_sd, {}) if _sd is not None else read_lora(path, allow_unsafe)
    peft = _peft_alphas(meta)
    targets = model_targets(model)
    groups, unmatched = {}, []
    for key, value in sd.items():
        component, name, role = _split_key(key)
        if component is None:
            unmatched.append(f"{key} ({role})")
            continue
        groups.setdefault((component, name), {})[role] = (key, value)
    merges, problems = [], []
    for (component, name), parts in groups.items():
        comps = [component] if component != "unet?" else ["unet"]
        if component == "text_encoder" and "text_encoder" not in targets and "text_encoder_2" in targets:
            comps = ["text_encoder_2"]
        target = next((targets[c][name] for c in comps if c in targets and name in targets[c]), None)
        if target is None or "down" not in parts or "up" not in parts:
            unmatched += [k for k, _ in parts.values()]
            continue
        down, up = parts["down"][1], parts["up"][1]
        rank = down.shape[0]
        w = target.weight()
        if up.shape[1] != rank or up.shape[0] != w.shape[0] or down[0].numel() != w[0].numel():
            problems.append(f"{parts['down'][0]}: down {list(down.shape)}, up {list(up.shape)} against the "
                            f"model's {target.name} {list(w.shape)}")
            continue
        alpha = float(parts["alpha"][1]) if "alpha" in parts else _alpha_for(comps[0], name, rank, peft)
        merges.append((target, down, up, weight * alpha / rank))
    label = Path(str(path)).name
    if problems:
        raise UsageError(f"--lora {path} does not fit this model (made for another model family or size?): "
                         f"{len(problems)} module(s) with other shapes, e.g. " + "; ".join(problems[:3]))
    if not merges:
        example = ", ".join(list(sd)[:3])
        expected = ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight (kohya), "
                    "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight (diffusers/PEFT), "
                    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight")
        raise UsageError(f"--lora {path}: none of its {len(sd)} keys matches a layer of this model; expected "
                         f"LoRA keys such as {expected}; the file has {example}"
                         f"{' ...' if len(sd) > 3 else ''}")
    if unmatched:
        warnings.warn(f"--lora {label}: {len(unmatched)} key(s) match no layer of this model and are ignored: "
                      + ", ".join(unmatched[:8]) + (" ..." if len(unmatched) > 8 else ""), InputWarning,
                      stacklevel=2)
    with torch.no_grad():
        for target, down, up, scale in merges:
            w = target.weight()
            delta = up.flatten(1).to(w.device, torch.float32) @ down.flatten(1).to(w.device, torch.float32)
            w.add_((scale * delta).reshape(w.shape).to(w.dtype))
    return {"name": label, "sha256": file_sha256(path)[:12] if _sd is None else None, "weight": weight,
            "modules": len(merges)}


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def apply_loras(model, specs, allow_unsafe=False):
    """Merge every (path, weight) of ``specs`` (``--lora``), in order; returns the records for the metadata."""
    records = [merge_lora(model, path, weight, allow_unsafe=allow_unsafe) for path, weight in specs or ()]
    model.merged_loras = getattr(model, "merged_loras", []) + records  # what the weights now carry
    for r in records:
        print(f"LoRA {r['name']} (sha256 {r['sha256']}) merged with weight {r['weight']:g} into {r['modules']} layers")
    return records
