"""Reading ScaleCrafter settings: ``module_name:factor`` files, preset YAMLs and the command-line form.

Settings files are the authors' format, one ``name:factor`` (or, for dispersion lists, ``name``) per line,
in diffusers naming or this UNet's own module paths. Mistakes are errors that give the file, the line
and the closest valid names. Names that exist in SD 1.x/2.x but not in the loaded UNet (the released
SDXL files name ``down_blocks.3`` …) are reported as a warning when ``dead_names="warn"``.
"""
from pathlib import Path

from ldm.unet_hooks.layers import (SD_LAYOUT_NAMES, LayerNames, SettingsError, flag_layers,  # noqa: F401
                                   read_settings_file)
from ldm.methods.scalecrafter.plan import ScaleCrafterPlan
from ldm.unet_hooks.schedule import LayerSchedule
from ldm.unet_hooks.redilation import Dispersion
from ldm.util import load_yaml_preset


def plan_from_flags(unet, dilate, dilate_tau, dilate_skip=0, progressive=False):
    """The original command-line form: factor ``dilate`` on every 3x3 conv except the first/last
    ``dilate_skip`` input/output blocks, for the first ``dilate_tau`` steps."""
    names = LayerNames(unet)
    if dilate < 1:
        raise SettingsError(f"--dilate {dilate} must be >= 1")
    factors = {n: float(dilate) for n in flag_layers(unet, dilate_skip)} if dilate != 1 else {}
    return ScaleCrafterPlan(names, LayerSchedule(factors, int(dilate_tau), "stages" if progressive else False))


PRESET_KEYS = {"dilate_settings", "dilate_tau", "progressive", "ndcfg_dilate_settings", "ndcfg_tau",
               "disperse_settings", "disperse_tau", "disperse_transform", "disperse_path", "inflate_tau", "freeu", "height",
               "width", "steps", "base_model", "dead_names", "notes", "scale", "eta"}


def load_preset(path):
    cfg = load_yaml_preset(path, PRESET_KEYS, "ScaleCrafter", "configs/scalecrafter/", SettingsError)
    cfg["_dir"] = cfg["_path"].parent
    return cfg


def plan_from_preset(unet, preset):
    """Resolve a preset (dict from ``load_preset`` or a path) against ``unet``."""
    if not isinstance(preset, dict):
        preset = load_preset(preset)
    names = LayerNames(unet)
    base = Path(preset.get("_dir", "."))
    dead = preset.get("dead_names", "error")

    def settings(key, with_factor=True):
        rel = preset.get(key)
        if not rel:
            return {} if with_factor else set()
        return read_settings_file(base / rel, names, with_factor=with_factor, dead_names=dead)

    progressive = "linear" if preset.get("progressive", False) else False
    dilate = LayerSchedule(settings("dilate_settings"), int(preset.get("dilate_tau", 0)), progressive)
    ndcfg = None
    if preset.get("ndcfg_dilate_settings") and int(preset.get("ndcfg_tau", 0)) > 0:
        ndcfg = LayerSchedule(settings("ndcfg_dilate_settings"), int(preset["ndcfg_tau"]), progressive)
    disperse_layers = frozenset(settings("disperse_settings", with_factor=False))
    transform = None
    disperse_tau = int(preset.get("disperse_tau", 0))
    if disperse_layers and disperse_tau > 0:
        import torch
        from ldm.unet_hooks.dispersion import get_dispersion_transform
        opts = dict(preset.get("disperse_transform") or {})
        transform = torch.as_tensor(get_dispersion_transform(**opts), dtype=torch.float32)
        missing = disperse_layers - set(dilate.factors)
        if missing:
            raise SettingsError(f"{preset.get('_path')}: dispersed layers must also be dilated; not in "
                                f"dilate_settings: {sorted(missing)[:5]}")
    path = preset.get("disperse_path", "auto")
    if path not in Dispersion.PATHS:
        raise SettingsError(f"{preset.get('_path')}: disperse_path must be one of {Dispersion.PATHS}, got {path!r}")
    return ScaleCrafterPlan(names, dilate, ndcfg, disperse_layers, disperse_tau, transform, dispersion_path=path)
