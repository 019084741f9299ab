"""FreeScale presets (``configs/freescale/*.yaml``): stage sizes and the method's settings, per model."""
from ldm.methods.cascade import RESIZES
from ldm.methods.freescale import release_tiling
from ldm.methods.freescale.cascade import FreeScaleSettings, default_stages
from ldm.methods.freescale.scale_fusion import BLURS, WINDOWS
from ldm.util import (PRESET_VALUE_RULES, bool_rule, choice_rule, load_yaml_preset, nonneg_float, nonneg_int,
                      string_rule)

# the schema of a FreeScale preset (configs/freescale/*.yaml): every key, its type and range
SCHEMA = {
    "method": choice_rule("freescale"),
    **{k: PRESET_VALUE_RULES[k] for k in ("base_model", "height", "width", "base", "stages", "restart_step",
                                          "cosine_scale", "cosine_scale_bg", "dilate_tau", "fast_mode", "freeu",
                                          "steps", "scale", "eta", "negative_prompt", "notes")},
    "dilation_from": choice_rule("long_side", "width"),
    "fusion": bool_rule(),
    "dilate_up_blocks": bool_rule(),
    "blur": choice_rule(*BLURS),
    "window": choice_rule(*WINDOWS),
    "resize": choice_rule(*RESIZES),
    "vae_tiling": choice_rule(*release_tiling.MODES),
    "sampler": string_rule(),  # one of ldm.samplers.SAMPLERS (FreeScaleMethod.settings names them)
}
PRESET_KEYS = SCHEMA  # (the name other modules use)
SETTING_KEYS = {"base", "restart_step", "cosine_scale", "cosine_scale_bg", "dilate_tau", "dilation_from",
                "fast_mode", "fusion", "blur", "window", "resize", "dilate_up_blocks", "vae_tiling"}


class PresetError(ValueError):
    pass


def load_preset(path):
    """A FreeScale preset checked against :data:`SCHEMA`, its stages ascending and ending at its size, its
    restart step inside its steps; PresetError naming the file and key otherwise."""
    cfg = load_yaml_preset(path, SCHEMA, "FreeScale", "configs/freescale/", PresetError)
    where = cfg["_path"]
    if cfg.get("stages"):
        check_stages([tuple(s) for s in cfg["stages"]], f"{where}: stages")
        size = (cfg.get("height"), cfg.get("width"))
        if None not in size and tuple(cfg["stages"][-1]) != size:
            raise PresetError(f"{where}: the last of the stages, {cfg['stages'][-1][0]}x{cfg['stages'][-1][1]}, "
                              f"must be the preset's size height x width = {size[0]}x{size[1]}")
    if cfg.get("restart_step") is not None and cfg.get("steps") is not None and cfg["restart_step"] >= cfg["steps"]:
        raise PresetError(f"{where}: restart_step: {cfg['restart_step']} must be below steps ({cfg['steps']}): the "
                          "later stages restart at that step of the run")
    return cfg


def check_stages(stages, where):
    """Stage sizes grow: each stage at least as large as the one before on both sides and larger on one (the
    cascade upscales; a smaller stage would shrink the image and be re-noised for nothing)."""
    for (h0, w0), (h1, w1) in zip(stages, stages[1:]):
        if h1 < h0 or w1 < w0 or (h1, w1) == (h0, w0):
            raise PresetError(f"{where}: {h0}x{w0} -> {h1}x{w1}: each stage must be larger than the one before "
                              f"(height and width not smaller, one of them larger); got "
                              f"{' -> '.join(f'{h}x{w}' for h, w in stages)}")


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
        check_stages(stages, "stages" if overrides.get("stages") else f"{preset.get('_path')}: stages")
        if tuple(stages[-1]) != (height, width):
            raise PresetError(f"the last stage {stages[-1][0]}x{stages[-1][1]} must be the image size "
                              f"{height}x{width}")
    else:
        stages = default_stages(height, width, int(values["base"]))
    return FreeScaleSettings(stages=stages, **values)


# ------------------------------------------------------------------------------------------------
# command line (scripts/txt2img.py)


def add_args(parser):
    g = parser.add_argument_group("FreeScale (--method freescale; docs/freescale.md)")
    g.add_argument("--freescale_config", type=str, default=None,
                   help="a preset YAML, e.g. configs/freescale/sdxl_4096x4096.yaml (its height/width become the "
                        "defaults for --H/--W)")
    g.add_argument("--freescale_stages", type=str, nargs="+", default=None, metavar="HxW",
                   help="stage sizes in pixels, base size first, the last one --H x --W (default: the preset's, "
                        "else doubling the side from the model's base size)")
    g.add_argument("--restart_step", type=nonneg_int, default=None,
                   help="step at which each later stage starts (default: the preset's, else 30%% of --steps)")
    g.add_argument("--cosine_scale", type=nonneg_float, default=None,
                   help="skip-residual exponent, >= 0 (default 2.0)")
    g.add_argument("--cosine_scale_bg", type=nonneg_float, default=None,
                   help="with --detail_mask: the exponent outside the mask (release default 0.5; 3.0 inside)")
    g.add_argument("--detail_mask", type=str, default=None,
                   help="greyscale image: white = foreground (cosine_scale), black = background (cosine_scale_bg)")
    g.add_argument("--freescale_dilate_tau", type=nonneg_int, default=None,
                   help="restrained dilation for steps < TAU (default: the preset's, else 35)")
    g.add_argument("--fast_mode", action="store_true",
                   help="global attention over dilated sub-lattices instead of all tokens (faster, some quality loss)")
    g.add_argument("--latent_resize", action="store_true",
                   help="resize latents between stages instead of decode - bicubic - encode")
    return g


def parse_size(text):
    h, sep, w = str(text).lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit():
        raise PresetError(f"stage size {text!r}: expected HxW in pixels, e.g. 1024x1024")
    return int(h), int(w)


def settings_from_args(opt, preset, height, width, base):
    """FreeScaleSettings from a preset (or None) and the command-line overrides."""
    stages = [parse_size(s) for s in opt.freescale_stages] if opt.freescale_stages else None
    return make_settings(height, width, int((preset or {}).get("base", base)), preset,
                         stages=stages, restart_step=opt.restart_step, cosine_scale=opt.cosine_scale,
                         cosine_scale_bg=opt.cosine_scale_bg, dilate_tau=opt.freescale_dilate_tau,
                         fast_mode=True if opt.fast_mode else None,
                         resize="latent" if opt.latent_resize else None,
                         save_stages=True if getattr(opt, "save_stages", False) else None)
