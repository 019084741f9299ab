"""FreeScale presets (``configs/freescale/*.yaml``): stage sizes and the method's settings, per model."""
from pathlib import Path

from omegaconf import OmegaConf

from ldm.freescale.cascade import FreeScaleSettings, default_stages

PRESET_KEYS = {"method", "base_model", "height", "width", "base", "stages", "restart_step", "cosine_scale",
               "cosine_scale_bg", "dilate_tau", "dilation_from", "fast_mode", "fusion", "blur", "window", "resize",
               "freeu", "steps", "scale", "eta", "negative_prompt", "notes"}
SETTING_KEYS = {"base", "restart_step", "cosine_scale", "cosine_scale_bg", "dilate_tau", "dilation_from",
                "fast_mode", "fusion", "blur", "window", "resize"}
BASE_SIDE = {"sd1": 512, "sd2": 512, "sdxl": 1024}


class PresetError(ValueError):
    pass


def load_preset(path):
    path = Path(path)
    if not path.is_file():
        raise PresetError(f"FreeScale preset not found: {path} (presets are in configs/freescale/)")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    unknown = set(cfg) - PRESET_KEYS
    if unknown:
        raise PresetError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(PRESET_KEYS)}")
    if cfg.get("method", "freescale") != "freescale":
        raise PresetError(f"{path}: method is {cfg.get('method')!r}, not freescale")
    cfg["_path"] = path
    return cfg


def make_settings(height, width, base, preset=None, **overrides):
    """FreeScaleSettings for an image of height x width: preset values, then the non-None overrides.

    Stages: the preset's or override's list (its last entry must be height x width), else doubling the side
    from the base size (``default_stages``)."""
    preset = dict(preset or {})
    values = {k: preset[k] for k in SETTING_KEYS if k in preset}
    values.setdefault("base", base)
    values.update({k: v for k, v in overrides.items() if v is not None and k != "stages"})
    stages = overrides.get("stages") or preset.get("stages")
    if stages:
        stages = [tuple(int(v) for v in s) for s in stages]
        if tuple(stages[-1]) != (height, width):
            raise PresetError(f"the last stage {stages[-1][0]}x{stages[-1][1]} must be the image size "
                              f"{height}x{width}")
    else:
        stages = default_stages(height, width, int(values["base"]))
    return FreeScaleSettings(stages=stages, **values)
