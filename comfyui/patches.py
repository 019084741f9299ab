"""What the ComfyUI nodes do, without importing ComfyUI (tested on this repository's UNet in
tests/test_comfyui_node.py; checked inside ComfyUI as recorded in docs/comfyui.md).

ComfyUI's UNet (``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel``) is the CompVis UNet with the
same module paths (``input_blocks.N.M``, ``middle_block``, ``output_blocks``, ``in_layers.2``, ``op``,
``transformer_blocks.K.attn1`` ...) and block classes of the same names, so this repository's layer naming
(``ldm/unet_hooks/layers.py``), plans (``ldm/methods/scalecrafter``), re-dilated and dispersed convolutions
(``ldm/unet_hooks/redilation.py``) and FreeScale's scale fusion resolve on it unchanged; they are installed for
the duration of one UNet call with ``ldm/unet_hooks/processors.installed``, as in this repository's sampler.

ComfyUI's conventions used here (comfy/samplers.py):

* ``model_function_wrapper(apply_model, {"input", "timestep", "c", "cond_or_uncond"})`` wraps every UNet call;
  ``timestep`` is the sampler's sigma, turned into the model's discrete timestep t by ``model_sampling``;
* ``sampler_cfg_function(args)`` returns ``x - guided`` where ``args["cond"] = x - cond_denoised`` and
  ``args["uncond"] = x - uncond_denoised`` (denoised predictions, whatever the parameterization).

Steps. The presets count DDIM steps of a reference run (their ``steps``, 50): "re-dilate for the first tau of
50 steps". A ComfyUI sampler has other steps, so the plan's step is read from the timestep: the reference step
of t is the number of the reference run's timesteps above t, i.e. the step whose timestep is the first at or
below t. With this repository's DDIM at the reference step count that is exactly the step index; with any other
sampler or step count the schedule follows the noise level (e.g. ``dilate_tau: 20`` of 50 becomes "while
t >= 601").
"""
import random
from types import SimpleNamespace

import torch

from ldm.modules.diffusionmodules.util import make_ddim_timesteps
from ldm.unet_hooks.processors import call_original, installed
from ldm.unet_hooks.redilation import ReDilation


def reference_step(t, steps, num_timesteps=1000):
    """The 0-based step of a ``steps``-step DDIM run (uniform spacing) at timestep ``t`` (float or tensor)."""
    if isinstance(t, torch.Tensor):
        t = float(t.flatten()[0])
    ts = make_ddim_timesteps("uniform", int(steps), num_timesteps)
    return min(int((ts > t + 1e-3).sum()), len(ts) - 1)


class CastWeights:
    """A conv processor that runs on the weights the module would use itself when ``cast(conv, x)`` returns
    them (ComfyUI's cast/offloaded weights, or LoRA patches applied on the fly); else on ``conv`` as it is."""

    def __init__(self, proc, cast=None):
        self.proc, self.cast = proc, cast

    def __call__(self, conv, x):
        wb = self.cast(conv, x) if self.cast is not None else None
        if wb is None:
            return self.proc(conv, x)
        weight, bias = wb
        proxy = SimpleNamespace(weight=weight, bias=bias, kernel_size=conv.kernel_size, stride=conv.stride,
                                padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                                in_channels=conv.in_channels, out_channels=conv.out_channels)
        return self.proc(proxy, x)

    def __repr__(self):
        return repr(self.proc)


class AttentionAdapter:
    """An attention processor ``proc(attn, x, context, mask)`` under ComfyUI's attn1 call signature (value,
    transformer_options keywords); a call with a separate ``value`` runs the module's own forward."""

    def __init__(self, proc):
        self.proc = proc

    def __call__(self, attn, x, context=None, value=None, mask=None, transformer_options=None, **kw):
        if value is not None or kw:
            extra = {"transformer_options": transformer_options} if transformer_options is not None else {}
            return call_original(attn, x, context=context, value=value, mask=mask, **extra, **kw)
        return self.proc(attn, x, context, mask)


def self_attention_modules(unet):
    """``attn1`` of every transformer block with self-attention (either UNet's BasicTransformerBlock)."""
    return [m.attn1 for m in unet.modules()
            if type(m).__name__ == "BasicTransformerBlock" and not getattr(m, "disable_self_attn", False)]


def unet_family(unet):
    """'sd1' | 'sd2' | 'sdxl' from the cross-attention context width (768 / 1024 / 2048), else None."""
    for name, m in unet.named_modules():
        if name.endswith("attn2.to_k"):
            return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(m.in_features)
    return None


def call_unet(apply_model, args, previous=None):
    """The UNet call of a model_function_wrapper: through an earlier wrapper, if the model had one."""
    if previous is not None:
        return previous(apply_model, args)
    return apply_model(args["input"], args["timestep"], **args["c"])


class ScaleCrafterPatch:
    """ScaleCrafter on a UNet: the per-step re-dilation (and dispersion) plan of a preset or of the command-line
    form, and noise-damped guidance.

    ``unet_wrapper`` installs the plan's processors around each UNet call; ``cfg_function`` is plain CFG, or, at
    steps < ndcfg_tau, noise-damped CFG: guided = base + w (cond - uncond) with ``base`` the unconditional
    prediction of the UNet under the mild ``ndcfg`` plan (paper eq. 5). The combination is written on denoised
    predictions, which are affine in the model output with the same coefficients for all three (x and sigma
    fixed), so it is eq. 5 for eps- and v-prediction alike."""

    def __init__(self, unet, preset=None, flags=None, steps=None, ndcfg=True, dispersion=True, cast=None):
        from ldm.methods.scalecrafter.presets import load_preset, plan_from_flags, plan_from_preset
        if preset is not None:
            preset = load_preset(preset) if not isinstance(preset, dict) else preset
            self.plan = plan_from_preset(unet, preset)
            self.steps = int(steps or preset.get("steps") or 50)
        else:
            self.plan = plan_from_flags(unet, flags["dilate"], flags["dilate_tau"], flags.get("dilate_skip", 0),
                                        flags.get("progressive", False))
            self.steps = int(steps or 50)
        if not ndcfg:
            self.plan.ndcfg = None
        if not dispersion:
            self.plan.disperse_layers, self.plan.disperse_tau = frozenset(), 0
        self.cast = cast
        self.branch = "strong"

    def processors(self, t, branch=None):
        step = reference_step(t, self.steps)
        return [(m, CastWeights(p, self.cast)) for m, p in self.plan.processors(step, branch or self.branch)]

    def unet_wrapper(self, to_timestep, previous=None):
        def wrapper(apply_model, args):
            with installed(self.processors(to_timestep(args["timestep"]))):
                return call_unet(apply_model, args, previous)
        return wrapper

    def cfg_function(self, to_timestep, base_uncond):
        """``base_uncond(args)``: the unconditional denoised prediction, computed while this patch runs its
        ``ndcfg`` branch (in ComfyUI: comfy.samplers.calc_cond_batch on args["input_uncond"])."""
        def cfg(args):
            guided = args["cond_scale"] * (args["cond"] - args["uncond"])
            if args.get("input_uncond") is None or not self.plan.uses_ndcfg(
                    reference_step(to_timestep(args["sigma"]), self.steps)):
                return args["uncond"] + guided
            self.branch = "ndcfg"
            try:
                base = base_uncond(args)
            finally:
                self.branch = "strong"
            return (args["input"] - base) + guided
        return cfg


class FreeScalePatch:
    """FreeScale's per-call processors for a stage above the base size: restrained dilation of the deepest down
    blocks and the middle block (factor = the stage's longer side over the base side, for reference steps <
    dilate_tau) and scale fusion in every self-attention layer. The stage's scale is read from the latent of
    each call, so one patched model serves every stage of a cascade (at the base size it does nothing)."""

    def __init__(self, unet, base_latent, dilate_tau=35, steps=50, fusion=True, fast_mode=False, blur="release",
                 window="release", dilation_from="long_side", seed=0, cast=None):
        self.unet = unet
        self.base = int(base_latent)
        self.dilate_tau, self.steps = int(dilate_tau), int(steps)
        self.fusion, self.fast_mode, self.blur, self.window = fusion, fast_mode, blur, window
        self.dilation_from = dilation_from
        self.attention = self_attention_modules(unet)
        self.rng = random.Random(seed)
        self.cast = cast

    def scale_of(self, hw):
        return max(int(hw[0]) // self.base, 1), max(int(hw[1]) // self.base, 1)

    def dilation_of(self, hw):
        side = max(hw) if self.dilation_from == "long_side" else hw[1]
        return max(int(side) // self.base, 1)

    def processors(self, t, latent_hw):
        from ldm.methods.freescale.cascade import restrained_dilation
        from ldm.methods.freescale.scale_fusion import ScaleFusion
        step = reference_step(t, self.steps)
        pairs = []
        factor = self.dilation_of(latent_hw)
        if factor > 1:
            schedule, names = restrained_dilation(self.unet, factor, min(self.dilate_tau, self.steps))
            pairs += [(names.module(n), CastWeights(ReDilation(f), self.cast)) for n, f in schedule.at(step).items()]
        scale = self.scale_of(latent_hw)
        if self.fusion and self.attention and max(scale) > 1:
            fusion = AttentionAdapter(ScaleFusion(tuple(latent_hw), scale, self.fast_mode, self.rng.randint,
                                                  self.blur, self.window))
            pairs += [(a, fusion) for a in self.attention]
        return pairs

    def unet_wrapper(self, to_timestep, previous=None):
        def wrapper(apply_model, args):
            x = args["input"]
            with installed(self.processors(to_timestep(args["timestep"]), x.shape[-2:])):
                return call_unet(apply_model, args, previous)
        return wrapper
