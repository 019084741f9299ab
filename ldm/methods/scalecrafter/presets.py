"""Reading ScaleCrafter settings: ``module_name:factor`` files, preset YAMLs and the command-line form.

Settings files are the authors' format, one ``name:factor`` (or, for dispersion lists, ``name``) per line,
in diffusers naming or this UNet's own module paths. Mistakes are errors that give the file, the line
and the closest valid names. Names that exist in SD 1.x/2.x but not in the loaded UNet (the released
SDXL files name ``down_blocks.3`` …) are reported as a warning when ``dead_names="warn"``.
"""
from pathlib import Path

from ldm.unet_hooks.layers import (SD_LAYOUT_NAMES, LayerNames, SettingsError, flag_layers,  # noqa: F401
                                   parse_settings_file, read_settings_file)
from ldm.methods.scalecrafter.plan import ScaleCrafterPlan
from ldm.unet_hooks.schedule import LayerSchedule
from ldm.unet_hooks.redilation import Dispersion
from ldm.util import (BASE_MODELS, PRESET_VALUE_RULES, Rule, choice_rule, load_yaml_preset, nested_rule,
                      nonneg_float, number_rule, positive_float, positive_int, string_rule)


def plan_from_flags(unet, dilate, dilate_tau, dilate_skip=0, progressive=False):
    """The original command-line form: factor ``dilate`` on every 3x3 conv except the first/last
    ``dilate_skip`` input/output blocks, for the first ``dilate_tau`` steps."""
    names = LayerNames(unet)
    if not dilate >= 1:  # also NaN
        raise SettingsError(f"--dilate {dilate} must be a finite number >= 1")
    factors = {n: float(dilate) for n in flag_layers(unet, dilate_skip)} if dilate != 1 else {}
    return ScaleCrafterPlan(names, LayerSchedule(factors, int(dilate_tau), "stages" if progressive else False))


# the schema of a ScaleCrafter preset (configs/scalecrafter/*.yaml): every key, its type and range; re-dilation
# (dilate_settings for dilate_tau >= 1 steps) is what the method is, so both are required
SCHEMA = {
    "base_model": choice_rule(*BASE_MODELS, required=True),
    **{k: PRESET_VALUE_RULES[k] for k in ("height", "width", "steps", "scale", "eta", "progressive", "freeu", "notes",
                                          "ndcfg_dilate_settings", "disperse_settings", "ndcfg_tau", "disperse_tau")},
    "dilate_settings": string_rule(required=True),
    "dilate_tau": number_rule(positive_int, required=True),
    "disperse_transform": nested_rule(
        {**dict.fromkeys(("small", "large", "feature_size"), number_rule(positive_int)),
         "scale": number_rule(positive_float), "eta": number_rule(nonneg_float), "objective": string_rule()},
        "a mapping of the dispersion solve's options: small, large, feature_size (positive integers), scale "
        "(a positive number), eta (a number >= 0), objective"),
    "disperse_path": choice_rule(*Dispersion.PATHS),
    "dead_names": choice_rule("error", "warn"),
    # the authors' release names it, but its code never disperses with it: refused rather than silently ignored
    "inflate_tau": Rule(lambda v: False, "used here: the release's inflate_tau never takes effect in its code; "
                                         "dispersion runs for disperse_tau steps (with disperse_settings)"),
}
PRESET_KEYS = SCHEMA  # (the name other modules use)
# a settings file and the number of steps it is used for: named together or not at all
PAIRS = (("dilate_settings", "dilate_tau", "re-dilation"), ("ndcfg_dilate_settings", "ndcfg_tau",
                                                            "noise-damped guidance"),
         ("disperse_settings", "disperse_tau", "dispersion"))


def load_preset(path):
    """A ScaleCrafter preset, checked against :data:`SCHEMA` and its settings files read (existence, format,
    finite factors >= 1) before any model is loaded; SettingsError naming the file and key otherwise."""
    cfg = load_yaml_preset(path, SCHEMA, "ScaleCrafter", "configs/scalecrafter/", SettingsError)
    cfg["_dir"] = cfg["_path"].parent
    where = cfg["_path"]
    for files, tau, what in PAIRS:
        if cfg.get(files) and cfg.get(tau) is None:
            raise SettingsError(f"{where}: {files} is given without {tau}: give {tau}, the number of steps with "
                                f"{what}" + (" (0: off)" if tau != "dilate_tau" else ""))
        if not cfg.get(files) and cfg.get(tau):
            raise SettingsError(f"{where}: {tau}: {cfg[tau]} has no effect without {files} (the layers of the "
                                f"{what}): give {files} or remove {tau}")
        if cfg.get(files):
            rows = parse_settings_file(cfg["_dir"] / cfg[files], with_factor=files != "disperse_settings")
            if files == "dilate_settings" and not any(f is not None and f > 1 for _, _, f in rows):
                raise SettingsError(f"{where}: dilate_settings {cfg[files]} dilates no layer (no factor above 1): "
                                    "the preset would sample as the model does (--method direct)")
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
