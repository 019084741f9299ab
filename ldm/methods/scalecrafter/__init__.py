"""ScaleCrafter (He et al., ICLR 2024): re-dilation per layer and step, dispersed convolution and noise-damped
classifier-free guidance (--method scalecrafter).

* ``plan.py``: the per-step plan (which convolution runs with which dilation or dispersion);
* ``presets.py``: the preset YAMLs of ``configs/scalecrafter/`` and the command-line form (--dilate ...);
* ``guidance.py``: the guided prediction of one step (noise-damped CFG).
The convolutions themselves (re-dilated, dispersed) and the layer names are shared machinery in
``ldm/unet_hooks/``.
"""
from ldm.errors import UsageError
from ldm.methods.base import GuidanceMethod, Settings
from ldm.methods.scalecrafter.guidance import ScaleCrafterGuidance
from ldm.methods.scalecrafter.presets import SettingsError, load_preset, plan_from_flags, plan_from_preset
from ldm.util import float_range, nonneg_int, positive_int


class ScaleCrafter(GuidanceMethod):
    name = "scalecrafter"
    label = "ScaleCrafter"
    summary = "ScaleCrafter (--scalecrafter_config or --dilate)"
    preset_flag = "--scalecrafter_config"
    preset_dir = "scalecrafter"
    img2img = True
    implied_by = ("scalecrafter_config", "dilate")
    acts = "re-dilation"

    @classmethod
    def add_args(cls, parser):
        sc = parser.add_argument_group("ScaleCrafter (tuning-free higher resolution)")
        sc.add_argument("--scalecrafter_config", type=str, default=None,
                        help="a preset YAML, e.g. configs/scalecrafter/sd2.1_2048x2048.yaml")
        sc.add_argument("--dilate", type=float_range(1), default=None,
                        help="command-line form: dilation factor (> 1) for every 3x3 conv outside the skipped blocks")
        sc.add_argument("--dilate_tau", type=positive_int, default=None,
                        help="re-dilate during the first TAU sampling steps")
        sc.add_argument("--dilate_skip", type=nonneg_int, default=0,
                        help="leave the first K input blocks and the last K output blocks undilated")
        sc.add_argument("--progressive_dilate", action="store_true",
                        help="lower the factor stage by stage from ceil(D) down to 2 over the TAU steps")
        sc.add_argument("--ndcfg_tau", type=nonneg_int, default=None,
                        help="override the preset's noise-damped CFG steps (0: off; counted in the preset's steps, "
                             "like its own: docs/samplers.md)")
        sc.add_argument("--disperse_tau", type=nonneg_int, default=None,
                        help="override the preset's dispersion steps (0: off; counted in the preset's steps)")

    @classmethod
    def check_img2img(cls, opt):
        if not opt.scalecrafter_config and opt.dilate is None:
            raise UsageError("--method scalecrafter needs its settings: --scalecrafter_config (a preset, e.g. "
                             "configs/scalecrafter/sd2.1_1024x1024.yaml) or --dilate with --dilate_tau")

    @classmethod
    def read_preset(cls, path):
        return load_preset(path)

    @classmethod
    def settings(cls, opt, info, size):
        """Checked here, before the model loads: the preset (schema, its settings files) or the command-line form;
        options that would be ignored (the command-line form's with a preset, a preset's overrides without one, an
        override for a part the preset does not have) are errors."""
        if opt.scalecrafter_config and opt.dilate is not None:
            raise UsageError("give either --scalecrafter_config or --dilate, not both")
        cls.check_img2img(opt)  # one of them: without, --method scalecrafter would sample as --method direct
        preset = cls.preset(opt, info)
        if preset is not None:
            flag_form = [f for f, v in (("--dilate_tau", opt.dilate_tau), ("--dilate_skip", opt.dilate_skip),
                                        ("--progressive_dilate", opt.progressive_dilate)) if v]
            if flag_form:
                raise UsageError(f"{', '.join(flag_form)}: options of the command-line form (--dilate); with "
                                 f"--scalecrafter_config the preset {opt.scalecrafter_config} sets them "
                                 "(dilate_tau, progressive); leave them out or use --dilate instead of the preset")
            preset = dict(preset)
            for key, files in (("ndcfg_tau", "ndcfg_dilate_settings"), ("disperse_tau", "disperse_settings")):
                value = getattr(opt, key)
                if value is None:
                    continue
                if value > 0 and not preset.get(files):
                    raise UsageError(f"--{key} {value}: the preset {opt.scalecrafter_config} has no {files}, so "
                                     f"there is nothing to run for {value} steps")
                preset[key] = value
        else:
            overrides = [f"--{k}" for k in ("ndcfg_tau", "disperse_tau") if getattr(opt, k) is not None]
            if overrides:
                raise UsageError(f"{', '.join(overrides)}: override(s) of a preset's value; give "
                                 "--scalecrafter_config (the command-line form --dilate has no noise-damped "
                                 "guidance or dispersion)")
            if opt.dilate_tau is None:
                raise UsageError("--dilate needs --dilate_tau (the number of steps to re-dilate)")
            if opt.dilate == 1:
                raise UsageError("--dilate 1 dilates nothing (1: the convolutions as trained), which is --method "
                                 "direct; give a factor above 1, e.g. the image side over the training side")
        flags = None
        if opt.dilate is not None:
            flags = {"dilate": opt.dilate, "dilate_tau": opt.dilate_tau, "dilate_skip": opt.dilate_skip,
                     "progressive_dilate": opt.progressive_dilate}
        values = {"preset": preset, "path": opt.scalecrafter_config, "flags": flags,
                  "overrides": {"ndcfg_tau": opt.ndcfg_tau, "disperse_tau": opt.disperse_tau}}
        return Settings(size=tuple(size), freeu=(preset or {}).get("freeu"), values=values,
                        reference_steps=(preset or {}).get("steps"))

    def make_guidance(self):
        v, unet = self.settings.values, self.model.model.diffusion_model
        try:
            if v["preset"] is not None:
                return ScaleCrafterGuidance(plan_from_preset(unet, v["preset"]))
            if v["flags"] is not None:
                f = v["flags"]
                return ScaleCrafterGuidance(plan_from_flags(unet, f["dilate"], f["dilate_tau"], f["dilate_skip"],
                                                            f["progressive_dilate"]))
        except SettingsError as err:
            raise UsageError(str(err)) from None
        return None  # neither a preset nor --dilate: plain guidance (as the release)

    def active_until(self):
        g = self.guidance()
        if g is None:
            return 0
        plan = g.plan
        return max([plan.dilate.tau, plan.ndcfg.tau if plan.ndcfg is not None else 0, plan.disperse_tau])

    def describe(self):
        v = self.settings.values
        out = {"scalecrafter": str(v["path"]) if v["path"] else v["flags"]}
        if v["path"]:
            out["scalecrafter_overrides"] = v["overrides"]
        return out
