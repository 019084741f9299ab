"""Reading ScaleCrafter settings: ``module_name:factor`` files, preset YAMLs and the command-line form.

Settings files are the authors' format, one ``name:factor`` (or, for dispersion lists, ``name``) per line,
in diffusers naming or this UNet's own module paths. Mistakes are errors that give the file, the line
and the closest valid names. Names that exist in SD 1.x/2.x but not in the loaded UNet (the released
SDXL files name ``down_blocks.3`` …) are reported as a warning when ``dead_names="warn"``.
"""
import warnings
from pathlib import Path

from ldm.scalecrafter.layers import LayerNames, flag_layers
from ldm.scalecrafter.plan import LayerSchedule, ScaleCrafterPlan
from ldm.scalecrafter.redilation import Dispersion
from ldm.util import load_yaml_preset


class SettingsError(ValueError):
    pass


def _sd_layout_names():
    """Every re-dilatable conv of the SD 1.x/2.x UNet in diffusers naming (4 levels, 2 ResBlocks per level on
    the way down, 3 on the way up): the vocabulary of the released settings files (all_valid_convs.txt)."""
    names = []
    for level in range(4):
        names += [f"down_blocks.{level}.resnets.{j}.conv{c}" for j in range(2) for c in (1, 2)]
        if level < 3:
            names.append(f"down_blocks.{level}.downsamplers.0.conv")
    names += [f"mid_block.resnets.{j}.conv{c}" for j in range(2) for c in (1, 2)]
    for level in range(4):
        names += [f"up_blocks.{level}.resnets.{j}.conv{c}" for j in range(3) for c in (1, 2)]
        if level < 3:
            names.append(f"up_blocks.{level}.upsamplers.0.conv")
    return frozenset(names)


SD_LAYOUT_NAMES = _sd_layout_names()


def _is_sd_name(name):
    """A name the released files could legitimately use (valid for SD 1.x/2.x) — not a typo."""
    return name in SD_LAYOUT_NAMES


def read_settings_file(path, names, with_factor=True, dead_names="error"):
    """Parse a settings file into {own_name: factor} (or a set of own names when ``with_factor`` is False)."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"settings file not found: {path}")
    out = {}
    dead = []
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if with_factor:
            if line.count(":") != 1:
                raise SettingsError(f"{path}:{lineno}: expected 'module_name:factor', got {raw.strip()!r}")
            name, value = (s.strip() for s in line.split(":"))
            try:
                factor = float(value)
            except ValueError:
                raise SettingsError(f"{path}:{lineno}: factor {value!r} is not a number") from None
            if factor < 1:
                raise SettingsError(f"{path}:{lineno}: factor {factor:g} must be >= 1")
        else:
            name, factor = line.split(":")[0].strip(), None
        own = names.resolve(name)
        if own is None:
            if dead_names == "warn" and _is_sd_name(name):
                dead.append(name)
                continue
            hint = names.suggestions(name)
            hint = f"; closest valid names: {', '.join(hint)}" if hint else ""
            raise SettingsError(f"{path}:{lineno}: no convolution named {name!r} in this UNet{hint}")
        out[own] = factor
    if dead:
        warnings.warn(f"{path}: {len(dead)} layer name(s) match no module of this UNet and are skipped, as the "
                      f"authors' code skips them silently: {', '.join(dead)}", stacklevel=2)
    return out if with_factor else set(out)


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
        from ldm.scalecrafter.dispersion import get_dispersion_transform
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
