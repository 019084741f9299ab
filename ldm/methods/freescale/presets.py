"""FreeScale presets (``configs/freescale/*.yaml``): stage sizes and the method's settings, per model."""
from ldm.methods.freescale.cascade import FreeScaleSettings, default_stages
from ldm.util import load_yaml_preset

PRESET_KEYS = {"method", "base_model", "height", "width", "base", "stages", "restart_step", "cosine_scale",
               "cosine_scale_bg", "dilate_tau", "dilation_from", "fast_mode", "fusion", "blur", "window", "resize",
               "freeu", "steps", "scale", "eta", "negative_prompt", "notes", "dilate_up_blocks", "vae_tiling",
               "sampler"}
SETTING_KEYS = {"base", "restart_step", "cosine_scale", "cosine_scale_bg", "dilate_tau", "dilation_from",
                "fast_mode", "fusion", "blur", "window", "resize", "dilate_up_blocks", "vae_tiling"}


class PresetError(ValueError):
    pass


def load_preset(path):
    cfg = load_yaml_preset(path, PRESET_KEYS, "FreeScale", "configs/freescale/", PresetError)
    if cfg.get("method", "freescale") != "freescale":
        raise PresetError(f"{cfg['_path']}: method is {cfg.get('method')!r}, not freescale")
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
    g.add_argument("--restart_step", type=int, default=None,
                   help="step at which each later stage starts (default: the preset's, else 30%% of --steps)")
    g.add_argument("--cosine_scale", type=float, default=None, help="skip-residual exponent (default 2.0)")
    g.add_argument("--cosine_scale_bg", type=float, default=None,
                   help="with --detail_mask: the exponent outside the mask (release default 0.5; 3.0 inside)")
    g.add_argument("--detail_mask", type=str, default=None,
                   help="greyscale image: white = foreground (cosine_scale), black = background (cosine_scale_bg)")
    g.add_argument("--freescale_dilate_tau", type=int, default=None,
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
