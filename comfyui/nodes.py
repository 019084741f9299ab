"""ComfyUI nodes: each takes a MODEL (ComfyUI's ModelPatcher), clones it and returns the clone with this
repository's method attached through ComfyUI's model options (``set_model_unet_function_wrapper``,
``set_model_sampler_cfg_function``); the weights are not touched. ComfyUI is imported only inside the node
functions, so this module imports without it."""
from pathlib import Path

from .patches import FreeScalePatch, ScaleCrafterPatch, unet_family

REPO = Path(__file__).resolve().parents[1]
CATEGORY = "model_patches/higher resolution"


def preset_names(kind):
    """The preset YAMLs of configs/<kind>/ (the demo model's left out: they are not for ComfyUI models)."""
    return sorted(p.name for p in (REPO / "configs" / kind).glob("*.yaml") if not p.name.startswith("demo_"))


def comfy_cast(conv, x):
    """(weight, bias) as ComfyUI's own op would use them when the module casts its weights (low-VRAM offload,
    fp8 storage, LoRA patches applied on the fly); None when the stored weights are used as they are."""
    if not (getattr(conv, "comfy_cast_weights", False) or getattr(conv, "weight_function", None)
            or getattr(conv, "bias_function", None)):
        return None
    from comfy.ops import cast_bias_weight
    return cast_bias_weight(conv, x)[:2]


def timestep_of(model):
    """sigma -> the model's discrete timestep (ComfyUI's model_sampling of this model)."""
    sampling = model.get_model_object("model_sampling")
    return lambda sigma: float(sampling.timestep(sigma).flatten()[0])


def check_family(model_unet, preset_path):
    from ldm.util import read_yaml_mapping
    want = read_yaml_mapping(preset_path).get("base_model")
    got = unet_family(model_unet)
    if want and got and want != got:
        raise ValueError(f"{Path(preset_path).name} is a preset for {want} models, but this MODEL is {got}: pick a "
                         f"{got} preset")


def calc_uncond(args):
    import comfy.samplers
    return comfy.samplers.calc_cond_batch(args["model"], [args["input_uncond"]], args["input"], args["sigma"],
                                          args["model_options"])[0]


def _attach(model, patch, cfg=False):
    m = model.clone()
    previous = m.model_options.get("model_function_wrapper")
    to_t = timestep_of(m)
    m.set_model_unet_function_wrapper(patch.unet_wrapper(to_t, previous))
    if cfg:
        m.set_model_sampler_cfg_function(patch.cfg_function(to_t, calc_uncond))
    return (m,)


class ScaleCrafterPreset:
    """ScaleCrafter with one of the presets of configs/scalecrafter/ (per model and resolution)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "preset": (preset_names("scalecrafter"),),
            "noise_damped_cfg": ("BOOLEAN", {"default": True}),
            "dispersion": ("BOOLEAN", {"default": True}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY
    DESCRIPTION = ("ScaleCrafter: re-dilated convolutions per layer and step, dispersed convolution and noise-damped "
                   "guidance, with the released settings for the preset's model and size. Sample at that size.")

    def patch(self, model, preset, noise_damped_cfg=True, dispersion=True):
        path = REPO / "configs" / "scalecrafter" / preset
        unet = model.get_model_object("diffusion_model")
        check_family(unet, path)
        return _attach(model, ScaleCrafterPatch(unet, preset=path, ndcfg=noise_damped_cfg, dispersion=dispersion,
                                                cast=comfy_cast), cfg=True)


class ScaleCrafterManual:
    """ScaleCrafter's command-line form: one dilation factor for every 3x3 conv outside the first/last
    ``dilate_skip`` blocks, for the first ``dilate_tau`` of ``reference_steps`` steps."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "dilate": ("FLOAT", {"default": 2.0, "min": 1.0, "max": 8.0, "step": 0.25}),
            "dilate_tau": ("INT", {"default": 20, "min": 0, "max": 1000}),
            "dilate_skip": ("INT", {"default": 0, "min": 0, "max": 12}),
            "progressive": ("BOOLEAN", {"default": False}),
            "reference_steps": ("INT", {"default": 50, "min": 1, "max": 1000}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    def patch(self, model, dilate, dilate_tau, dilate_skip, progressive, reference_steps):
        unet = model.get_model_object("diffusion_model")
        flags = {"dilate": dilate, "dilate_tau": dilate_tau, "dilate_skip": dilate_skip, "progressive": progressive}
        return _attach(model, ScaleCrafterPatch(unet, flags=flags, steps=reference_steps, cast=comfy_cast))


class FreeScaleStage:
    """FreeScale's restrained dilation and scale fusion for the later stages of a cascade (settings of a
    configs/freescale/ preset). Use the patched MODEL in the KSampler of every stage above the base size
    (upscaled latent, denoise 1 - restart fraction, e.g. 0.7); at the base size it changes nothing."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "preset": (preset_names("freescale"),),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 32 - 1}),
            "scale_fusion": ("BOOLEAN", {"default": True}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    def patch(self, model, preset, seed, scale_fusion=True):
        from ldm.methods.freescale.presets import load_preset
        path = REPO / "configs" / "freescale" / preset
        unet = model.get_model_object("diffusion_model")
        check_family(unet, path)
        p = load_preset(path)
        patch = FreeScalePatch(unet, base_latent=int(p.get("base", 1024)) // 8, dilate_tau=p.get("dilate_tau", 35),
                               steps=p.get("steps", 50), fusion=scale_fusion and p.get("fusion", True),
                               fast_mode=p.get("fast_mode", False), blur=p.get("blur", "release"),
                               window=p.get("window", "release"), dilation_from=p.get("dilation_from", "long_side"),
                               seed=seed, cast=comfy_cast)
        return _attach(model, patch)


NODE_CLASS_MAPPINGS = {
    "ScaleCrafterPreset": ScaleCrafterPreset,
    "ScaleCrafterManual": ScaleCrafterManual,
    "FreeScaleStage": FreeScaleStage,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ScaleCrafterPreset": "ScaleCrafter (preset)",
    "ScaleCrafterManual": "ScaleCrafter (dilation factor)",
    "FreeScaleStage": "FreeScale (cascade stage)",
}
