"""Loading original Stable Diffusion checkpoints (``.ckpt`` and ``.safetensors``), offline and strictly.

Errors say what is wrong and what to do: a missing file names where it comes from, a file that needs
unsafe unpickling asks for an explicit opt-in, and a config/checkpoint mismatch names the config the
file looks like it belongs to.
"""
import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path

import torch

from ldm.errors import InputWarning
from ldm.util import checked_config, instantiate_from_config, no_weight_init, trusted_configs

# where users get the original files (the file name is what shellscripts/ and the README expect)
KNOWN_CHECKPOINTS = {
    "v2-1_512-ema-pruned.ckpt": "Stable Diffusion 2.1-base (512), stabilityai/stable-diffusion-2-1-base on Hugging Face",
    "v2-1_768-ema-pruned.ckpt": "Stable Diffusion 2.1 (768-v), stabilityai/stable-diffusion-2-1 on Hugging Face",
    "v1-5-pruned-emaonly.ckpt": "Stable Diffusion 1.5, the v1-5 release (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 on Hugging Face)",
    "v1-5-pruned-emaonly.safetensors": "Stable Diffusion 1.5, the v1-5 release (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 on Hugging Face)",
    "sd_xl_base_1.0.safetensors": "SDXL base 1.0, stabilityai/stable-diffusion-xl-base-1.0 on Hugging Face",
    "x4-upscaler-ema.ckpt": "the SD 2.x x4 upscaler, stabilityai/stable-diffusion-x4-upscaler on Hugging Face",
    "x4-upscaler-ema.safetensors": "the SD 2.x x4 upscaler, stabilityai/stable-diffusion-x4-upscaler on Hugging Face",
}

FAMILY_CONFIGS = {
    "sd1": ("SD 1.x", "configs/stable-diffusion/v1-inference.yaml"),
    "sd2": ("SD 2.x", "configs/stable-diffusion/v2-inference.yaml (512 base) or "
                      "configs/stable-diffusion/v2-inference-v.yaml (768-v)"),
    "sdxl": ("SDXL base", "configs/stable-diffusion/sdxl-base-inference.yaml"),
    "sd2-x4": ("SD 2.x x4 upscaler", "configs/stable-diffusion/x4-upscaling.yaml (with scripts/upscale.py, or as "
                                     "--sr_config of scripts/txt2img.py --method sdsr)"),
}

# buffers derived from the config; files that omit them still load (they are recomputed)
OPTIONAL_KEYS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "cond_stage_model.transformer.text_model.embeddings.position_ids", "denoiser.sigmas",
    # SDXL: the same HF CLIP buffer under the conditioner (absent from files written with transformers >= 4.31)
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
    # the x4 upscaler's noise-augmentation schedule (ldm.modules.diffusionmodules.upscaling)
    "low_scale_model.betas", "low_scale_model.alphas_cumprod", "low_scale_model.alphas_cumprod_prev",
    "low_scale_model.sqrt_alphas_cumprod", "low_scale_model.sqrt_one_minus_alphas_cumprod",
    "low_scale_model.log_one_minus_alphas_cumprod", "low_scale_model.sqrt_recip_alphas_cumprod",
    "low_scale_model.sqrt_recipm1_alphas_cumprod",
}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used as asked; the message says why and what to do."""


def missing_checkpoint_message(path):
    name = Path(path).name
    where = KNOWN_CHECKPOINTS.get(name)
    lines = [f"checkpoint not found: {path}"]
    if where:
        lines.append(f"'{name}' is {where}. Download it yourself and place it at {path} (see checkpoints/README.md).")
    else:
        known = ", ".join(sorted(KNOWN_CHECKPOINTS))
        lines.append(f"Expected an original Stable Diffusion file such as one of: {known}; "
                     "put it in checkpoints/ (see checkpoints/README.md) and pass its path with --ckpt.")
    return "\n".join(lines)


def sniff_checkpoint_format(path):
    """What the file's first bytes say it is: 'zip' (torch.save), 'pickle' (legacy torch.save),
    'safetensors', 'empty', or a short description of something that is not a checkpoint at all."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:  # pickle protocol 2..5 opcode
        return "pickle"
    if len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < os.path.getsize(path):
        return "safetensors"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer file, not the file itself (fetch it with `git lfs pull` or download it directly)"
    text = head.lstrip()
    if text[:1] == b"<":
        return "an HTML/XML page (a failed download saved as the file?)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not just a character cut at the end of the 64 bytes read
            return f"in an unknown format (it begins with the bytes {head[:8].hex(' ')})"
    return f"a text file (it begins {head[:24].decode('utf-8', errors='replace')!r})"


def check_checkpoint_file(path):
    """Cheap check before anything is built: the file exists and looks like a checkpoint; returns its
    format (see :func:`sniff_checkpoint_format`) or raises :class:`CheckpointError`."""
    path = str(path)
    if os.path.isdir(path):  # load_model_from_config takes diffusers folders; the callers of this check do not
        raise CheckpointError(f"{path} is a folder: diffusers folders load as the base model (--ckpt of txt2img and "
                              "upscale.py img2img), not here; give the .ckpt/.safetensors file")
    if not os.path.isfile(path):
        raise CheckpointError(missing_checkpoint_message(path))
    fmt = sniff_checkpoint_format(path)
    if fmt == "empty":
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted download or copy? Get the file again.")
    if path.endswith(".safetensors"):
        return fmt  # the safetensors reader names a corrupt header itself (load_state_dict_file)
    if fmt == "zip" and not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is truncated or corrupt: it starts like a PyTorch checkpoint (a zip archive) but the archive's "
            f"directory at its end is missing ({os.path.getsize(path)} bytes; an interrupted download or copy?). "
            "Download or copy the file again.")
    if fmt not in ("zip", "pickle", "safetensors"):
        raise CheckpointError(
            f"{path} is not a checkpoint: it is {fmt}. Expected a PyTorch .ckpt/.pt (zip or pickle) or a "
            ".safetensors file; see checkpoints/README.md for where the original files come from.")
    return fmt


def _corrupt(path, err):
    first = (str(err).splitlines() or [""])[0] or type(err).__name__
    return CheckpointError(f"{path} is truncated or corrupt: PyTorch cannot read it ({type(err).__name__}: {first}). "
                           "Download or copy the file again.")


def _load_safetensors(path):
    from safetensors.torch import load_file
    try:
        return load_file(path, device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError (header, size, dtype problems)
        hint = ""
        if sniff_checkpoint_format(path) in ("zip", "pickle"):
            hint = " It is a PyTorch pickle/zip checkpoint: rename it to .ckpt."
        raise CheckpointError(f"{path} is not a valid .safetensors file ({err}): it is corrupt or truncated. "
                              f"Download or copy the file again.{hint}") from None


def load_state_dict_file(path, allow_unsafe=False, return_meta=False):
    """Read a ``.ckpt``/``.pt``/``.pth`` (``weights_only``) or ``.safetensors`` file into a flat state dict."""
    path = str(path)
    fmt = check_checkpoint_file(path)
    meta = {}
    if path.endswith(".safetensors") or fmt == "safetensors":
        sd = _load_safetensors(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "weights only load failed" not in str(err).lower():
                raise _corrupt(path, err) from None
            if not allow_unsafe:
                reason = next((line.strip() for line in str(err).splitlines()
                               if "unsupported global" in line.lower()), str(err).splitlines()[0])
                reason = reason.split(" Please use")[0].rstrip(".")  # torch's own advice would bypass the opt-in
                raise CheckpointError(
                    f"{path} contains Python objects that torch refuses to load safely ({reason}). "
                    "Loading it runs code from the file. If you trust its source, re-run with --unsafe_load "
                    "(Python API: allow_unsafe=True); better, convert it once to .safetensors.") from None
            warnings.warn(f"{path}: loading with full unpickling (--unsafe_load): this runs any code the file "
                          "contains; convert it once to .safetensors to avoid that", InputWarning, stacklevel=2)
            try:
                obj = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as err2:
                first = (str(err2).splitlines() or [""])[0]
                raise CheckpointError(f"{path} cannot be loaded even with --unsafe_load ({type(err2).__name__}: "
                                      f"{first}): it needs Python code that is not available here, or it is "
                                      "corrupt") from None
        except Exception as err:  # truncated/corrupt archives: RuntimeError, EOFError, OSError, KeyError, ...
            raise _corrupt(path, err) from None
        if isinstance(obj, dict) and "state_dict" in obj:
            meta = {k: obj[k] for k in ("global_step", "epoch") if k in obj}
            sd = obj["state_dict"]
        else:
            sd = obj
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path} does not hold a state dict (found {type(sd).__name__})")
    return (sd, meta) if return_meta else sd


def identify_family(keys):
    """Guess the model family from state-dict keys: 'sd1', 'sd2', 'sd2-x4' (the x4 upscaler), 'sdxl', or None."""
    keys = set(keys)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    # the upscaler: its noise-augmentation buffers, or (files without them) the noise-level class embedding
    # of an SD 2.x UNet (an nn.Embedding: SDXL's label_emb is label_emb.0.0.weight)
    if any(k.startswith("low_scale_model.") for k in keys) or (
            "model.diffusion_model.label_emb.weight" in keys
            and any(k.startswith("cond_stage_model.model.transformer.") for k in keys)):
        return "sd2-x4"
    if any(k.startswith("cond_stage_model.model.transformer.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    return None


def _model_family(model):
    return identify_family(model.state_dict().keys())


def check_state_dict(model, sd, ckpt_name="checkpoint", config_name="config"):
    """Strict key/shape comparison with an actionable message; returns nothing or raises CheckpointError."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and k not in OPTIONAL_KEYS]
    unexpected = [k for k in sd if k not in expected and k not in OPTIONAL_KEYS]
    wrong_shape = [(k, tuple(sd[k].shape), tuple(expected[k].shape)) for k in expected
                   if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong_shape):
        return
    lines = [f"{ckpt_name} does not match {config_name}: {len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(wrong_shape)} wrong-shape keys."]
    if missing:
        lines.append("  first missing: " + ", ".join(missing[:5]))
    if unexpected:
        lines.append("  first unexpected: " + ", ".join(unexpected[:5]))
    for k, got, want in wrong_shape[:5]:
        lines.append(f"  shape of {k}: file {list(got)}, config {list(want)}")
    fam_file, fam_model = identify_family(sd.keys()), _model_family(model)
    if fam_file and fam_file != fam_model:
        name, cfg = FAMILY_CONFIGS[fam_file]
        lines.append(f"The file looks like a {name} checkpoint: use {cfg}.")
    elif fam_file:
        lines.append(f"The file looks like a {FAMILY_CONFIGS[fam_file][0]} checkpoint but its layout differs "
                     "from the config (a fine-tuned variant with other sizes?).")
    else:
        lines.append("The file does not look like a Stable Diffusion checkpoint of a known family.")
    raise CheckpointError("\n".join(lines))


def _swap_in_ema(sd):
    """If the file carries EMA weights (full training checkpoints), sample with them, as the original does."""
    ema = {k[len("model_ema."):]: v for k, v in sd.items() if k.startswith("model_ema.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    ema.pop("decay", None)
    ema.pop("num_updates", None)
    if not ema:
        return sd, 0
    n = 0
    for k in list(sd):
        if k.startswith("model.diffusion_model."):
            ek = k[len("model."):].replace(".", "")
            if ek in ema:
                sd[k] = ema[ek]
                n += 1
    return sd, n


def load_checkpoint_into(model, ckpt, strict=True, use_ema=True, allow_unsafe=False, config_name="config",
                         ignore_keys=(), verbose=False):
    """Load a checkpoint file (or a diffusers folder, converted by ``ldm.convert_diffusers``) into an
    already-built model; returns {'ema_tensors': n, 'global_step': ..., 'notes': [...]}."""
    notes = []
    if os.path.isdir(str(ckpt)):
        from ldm.convert_diffusers import load_folder
        sd, notes = load_folder(ckpt, model, allow_unsafe=allow_unsafe)
        meta = {"notes": notes}
        if notes:  # parts of the model the folder does not hold and that are never used (zero-filled)
            warnings.warn(f"{ckpt}: " + "; ".join(notes), InputWarning, stacklevel=2)
    else:
        sd, meta = load_state_dict_file(ckpt, allow_unsafe=allow_unsafe, return_meta=True)
    if ignore_keys:
        sd = {k: v for k, v in sd.items() if not any(k.startswith(ik) for ik in ignore_keys)}
    if use_ema:
        sd, n_ema = _swap_in_ema(sd)
    else:
        sd, n_ema = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}, 0
    if strict:
        check_state_dict(model, sd, ckpt_name=Path(str(ckpt)).name, config_name=config_name)
    expected = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in expected}
    model.load_state_dict(sd, strict=False)
    if verbose:
        print(f"Loaded {ckpt} ({len(sd)} tensors{', EMA weights' if n_ema else ''})")
    return {"ema_tensors": n_ema, **meta}


def load_model_from_config(config, ckpt=None, device="cpu", strict=True, use_ema=True, allow_unsafe=False,
                           config_name="config", verbose=False, trust=False, weights_dtype=None):
    """Build ``config.model`` and load ``ckpt`` into it; the model is returned in eval mode on ``device``.

    ``weights_dtype`` (``--precision half``): the UNet's and text encoders' weights are cast to it
    (``ldm.util.cast_for_half_precision``) in host memory, before the model moves to ``device``, so that the
    device never holds the float32 copy (SDXL: 12.9 GiB in float32, 6.6 GiB with the UNet and text encoders in
    float16: casting on the GPU would need the former on an 8 or 12 GiB card).

    ``trust=True`` allows config targets outside this package (a config is code; see
    ``ldm.util.instantiate_from_config``). The whole config is checked with its interpolations resolved, and the
    model is built from that resolved copy (``ldm.util.checked_config``)."""
    folder = ckpt is not None and os.path.isdir(str(ckpt))
    if ckpt is not None and not folder:
        check_checkpoint_file(ckpt)  # before spending time on construction
    config = checked_config(config, trust=trust, where=config_name if config_name != "config" else None)
    if folder:  # a diffusers folder: its components and family against the config, before building
        from ldm.convert_diffusers import check_folder
        check_folder(ckpt, config, config_name=config_name)
    model_config = config.model if "model" in config else config
    with trusted_configs(trust):
        if ckpt is not None and strict:
            with no_weight_init():  # every weight comes from the file (the strict check guarantees it)
                model = instantiate_from_config(model_config)
        else:
            model = instantiate_from_config(model_config)
    if ckpt is not None:
        load_checkpoint_into(model, ckpt, strict=strict, use_ema=use_ema, allow_unsafe=allow_unsafe,
                             config_name=config_name, verbose=verbose)
    # inference only: frozen weights also keep autocast from caching a low-precision copy of every weight
    # for the whole sampling loop (1.6 GB for SD 2.x's UNet, 4.8 GB for SDXL's)
    model.requires_grad_(False)
    if weights_dtype is not None:
        from ldm.util import cast_for_half_precision
        cast_for_half_precision(model, weights_dtype)
    return model.to(device).eval()
