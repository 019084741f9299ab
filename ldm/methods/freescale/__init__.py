"""FreeScale (Qiu et al., 2024): tailored self-cascade, restrained dilation and scale fusion (--method freescale).

* ``scale_fusion.py``: the attention processor (local windows + global attention, Gaussian split);
* ``cascade.py``: the restrained dilation and each stage's guidance, on the shared stage machinery
  (``ldm/methods/cascade.py``);
* ``presets.py``: the YAML presets in ``configs/freescale/``.
"""
from ldm.errors import UsageError
from ldm.methods.base import Settings
from ldm.methods.cascade import CascadeMethod, check_files
from ldm.methods.freescale import presets
from ldm.methods.freescale.cascade import FreeScale, FreeScaleSettings, default_stages  # noqa: F401


class FreeScaleMethod(CascadeMethod):
    name = "freescale"
    label = "FreeScale"
    summary = "FreeScale: self-cascade with restrained dilation and scale fusion (--freescale_config)"
    preset_flag = "--freescale_config"
    preset_dir = "freescale"
    img2img = True
    implied_by = ("freescale_config",)
    img2img_refused = {"restart_step": "each cascade stage restarts at step steps - floor(strength x steps): give "
                                       "--strength"}

    @classmethod
    def add_args(cls, parser):
        presets.add_args(parser)

    @classmethod
    def read_preset(cls, path):
        return presets.load_preset(path)

    @classmethod
    def settings(cls, opt, info, size):
        preset = cls.preset(opt, info)
        try:
            fs = presets.settings_from_args(opt, preset, size[0], size[1], info.base_px)
        except (presets.PresetError, ValueError) as err:
            raise UsageError(f"FreeScale: {err}") from None
        for h, w in fs.stages:
            if h % info.f or w % info.f:
                raise UsageError(f"FreeScale: stage size {h}x{w} is not a multiple of {info.f}")
        # restart_step counts the steps the preset is written for (its steps:), else the run's (--steps)
        limit, of = ((preset or {}).get("steps"), "the preset's steps") if (preset or {}).get("steps") else \
            (info.steps, "--steps")
        if fs.restart_step is not None and not fs.restart_step < limit:
            source = (f"--restart_step {opt.restart_step}" if opt.restart_step is not None else
                      f"--freescale_config {opt.freescale_config}: restart_step: {fs.restart_step}")
            raise UsageError(f"{source} must be below {of} ({limit}): every later stage restarts at that step "
                             f"(0 ... {limit - 1}; default 30% of the steps)")
        values = {"freescale": fs, "preset": opt.freescale_config, "detail_mask": opt.detail_mask,
                  "init_image": getattr(opt, "init_image", None), "save_stages": getattr(opt, "save_stages", False)}
        check_files(values, "init_image", "detail_mask")
        sampler = (preset or {}).get("sampler")  # e.g. euler, as the release runs (when --sampler is not given)
        if sampler is not None:
            from ldm.samplers import SAMPLERS
            if sampler not in SAMPLERS:
                raise UsageError(f"{opt.freescale_config}: sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
        conditioning = {"target_size": list(fs.stages[0])} if info.sdxl else {}  # the release: the first stage's
        return Settings(size=tuple(size), sample_size=tuple(fs.stages[0]), size_conditioning=conditioning,
                        freeu=(preset or {}).get("freeu"), values=values,
                        reference_steps=(preset or {}).get("steps"), sampler=sampler)

    def make_cascade(self):
        import copy
        fs = copy.deepcopy(self.settings.values["freescale"])  # the run changes stages/restart (img2img)
        return FreeScale(self.model, fs, f=self.info.f, tiling=self.tiling)

    @classmethod
    def stages_of(cls, settings):
        return [tuple(s) for s in settings.values["freescale"].stages]

    @classmethod
    def default_strength(cls, settings, steps):
        restart = settings.values["freescale"].restart_step
        restart = int(0.3 * steps) if restart is None else int(restart)
        return (steps - restart) / steps

    @classmethod
    def entering_at(cls, settings, k, init_image):
        """As the release, SDXL conditions on the entry stage's size."""
        out = super().entering_at(settings, k, init_image)
        if "target_size" in settings.size_conditioning:
            out.size_conditioning["target_size"] = list(cls.stages_of(settings)[k])
        return out

    def scope(self):
        return self.runner.vae_scope()  # the release's VAE tiling (preset key vae_tiling), else nothing

    def describe(self):
        v = self.settings.values
        restart = getattr(self.runner, "restart_run_step", None)  # img2img: the run's step
        return {"freescale": {"preset": v["preset"], **self.runner.settings.describe(),
                              **({"restart_step": restart} if restart is not None else {}),
                              "init_image": v["init_image"], "detail_mask": v["detail_mask"]}}
