"""The ComfyUI nodes' logic (comfyui/patches.py) on this repository's UNet, without ComfyUI.

ComfyUI's side of a sampling step is emulated as comfy/samplers.py does it (docs/comfyui.md names the commit):
latents in sigma space (x = x0 + sigma * eps), one batched UNet call for [cond, uncond] through the
``model_function_wrapper``, the model returning denoised predictions, and ``sampler_cfg_function`` receiving
``cond = x - cond_denoised``, ``uncond = x - uncond_denoised`` and returning ``x - guided``. The node must give the
guided prediction of this repository's own method at the same step (ScaleCrafterGuidance, FreeScale's stage
guidance), whose eps is turned into a denoised prediction here. The same processors run on the same weights;
only the batch order differs, so the two agree to float32 rounding of the UNet (TOL of
tests/test_diffusers_format.py). Inside ComfyUI the same check is recorded in docs/comfyui.md.
"""
import copy
import importlib.util
import random
import sys

import pytest
import torch

from conftest import REPO_ROOT
from ldm.checkpoint import load_model_from_config
from ldm.util import load_config_file

TOL = 1e-4


def _load_package():
    spec = importlib.util.spec_from_file_location("comfyui", REPO_ROOT / "comfyui" / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT / "comfyui")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["comfyui"] = mod
    spec.loader.exec_module(mod)
    return mod


comfyui = _load_package()
from comfyui.patches import FreeScalePatch, ScaleCrafterPatch, reference_step  # noqa: E402


@pytest.fixture(scope="module")
def model():
    m = load_model_from_config(load_config_file(REPO_ROOT / "configs/tiny/tiny-sd2.yaml"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every UNet weight drawn (its output convs start at zero)
        for name, p in m.model.diffusion_model.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name and name.endswith("weight")
                    else torch.randn(p.shape, generator=g) * (fan_in ** -0.5 if p.dim() > 1 else 0.1))
    return m


class ComfyEmulation:
    """One guided step the way ComfyUI computes it, on this repository's LatentDiffusion (eps-prediction)."""

    def __init__(self, model, wrapper=None, cfg_function=None):
        self.model, self.wrapper, self.cfg_function = model, wrapper, cfg_function
        ac = model.alphas_cumprod.double()
        self.sigmas = ((1 - ac) / ac).sqrt()

    def to_timestep(self, sigma):  # ComfyUI's discrete model_sampling: the nearest log-sigma
        s = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        return float((self.sigmas.log() - torch.tensor(s).double().log()).abs().argmin())

    def apply_model(self, x, sigma, c_crossattn):  # BaseModel.apply_model: input scaling, denoised output
        t = torch.tensor([int(self.to_timestep(s)) for s in sigma])
        x_t = x / (1 + sigma[:, None, None, None] ** 2).sqrt()
        eps = self.model.apply_model(x_t, t, c_crossattn)
        return x - sigma[:, None, None, None] * eps

    def calc_cond_batch(self, conds, x, sigma):
        present = [(i, c) for i, c in enumerate(conds) if c is not None]
        n = len(present)
        args = {"input": torch.cat([x] * n), "timestep": torch.cat([sigma] * n),
                "c": {"c_crossattn": torch.cat([c for _, c in present])}, "cond_or_uncond": [i for i, _ in present]}
        if self.wrapper is not None:
            out = self.wrapper(lambda x, t, **c: self.apply_model(x, t, **c), args)
        else:
            out = self.apply_model(args["input"], args["timestep"], **args["c"])
        outs = [None] * len(conds)
        for (i, _), o in zip(present, out.chunk(n)):
            outs[i] = o
        return outs

    def step(self, x, sigma, cond, uncond, scale):
        cond_pred, uncond_pred = self.calc_cond_batch([cond, uncond], x, sigma)
        if self.cfg_function is None:
            return uncond_pred + (cond_pred - uncond_pred) * scale
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": scale, "timestep": sigma,
                "input": x, "sigma": sigma, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                "input_cond": cond, "input_uncond": uncond}
        return x - self.cfg_function(args)

    def base_uncond(self, args):
        return self.calc_cond_batch([args["input_uncond"]], args["input"], args["sigma"])[0]


def _inputs(model, step, steps=50, hw=(24, 16), seed=1):
    from ldm.samplers.ddim import DDIMSampler
    t = DDIMSampler(model).timesteps(steps)[step]
    g = torch.Generator().manual_seed(seed)
    ac = float(model.alphas_cumprod[t])
    x_t = torch.randn(1, 4, *hw, generator=g)
    cond, uncond = torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g)
    sigma = torch.tensor([((1 - ac) / ac) ** 0.5])
    return t, x_t, x_t / ac ** 0.5, sigma, cond, uncond, ac


def _reference_denoised(model, guidance, step, t, x_t, cond, uncond, scale, ac):
    with torch.no_grad():
        eps = guidance(model, x_t, torch.tensor([t]), cond, uncond, scale, step)
    return (x_t - (1 - ac) ** 0.5 * eps) / ac ** 0.5


def _close(a, b):
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    return err <= TOL * scale, f"max error {err:.3g} against {TOL} x {scale:.3g}"


def test_reference_step_is_the_ddim_step():
    from ldm.modules.diffusionmodules.util import make_ddim_timesteps
    for steps in (50, 30, 7):
        ts = sorted(make_ddim_timesteps("uniform", steps, 1000).tolist(), reverse=True)
        assert [reference_step(t, steps) for t in ts] == list(range(len(ts)))
        assert [reference_step(t - 0.5, steps) for t in ts[:-1]] == list(range(1, len(ts)))
    assert reference_step(999.0, 50) == 0 and reference_step(0.0, 50) == 49


@pytest.mark.parametrize("step,cast", [(3, False), (36, False), (45, False), (3, True)])
def test_scalecrafter_node_matches_the_pipelines_guidance(model, step, cast):
    """Steps 3 (noise-damped, dispersed, progressive), 36 (the last of all three), 45 (after tau: plain); with
    ``cast`` the processors run on weights handed over by a cast function (ComfyUI's cast-weights path)."""
    from ldm.methods.scalecrafter.guidance import ScaleCrafterGuidance
    from ldm.methods.scalecrafter.presets import plan_from_preset
    preset = REPO_ROOT / "configs/scalecrafter/sd2.1_2048x2048_disperse.yaml"
    unet = model.model.diffusion_model
    t, x_t, x, sigma, cond, uncond, ac = _inputs(model, step)
    reference = _reference_denoised(model, ScaleCrafterGuidance(plan_from_preset(unet, preset)), step, t, x_t, cond,
                                    uncond, 7.5, ac)
    casts = []

    def cast_fn(conv, x):  # a copy of the weights, as ComfyUI's cast_bias_weight hands them over
        casts.append(conv)
        return conv.weight.detach().clone(), None if conv.bias is None else conv.bias.detach().clone()
    patch = ScaleCrafterPatch(unet, preset=preset, cast=cast_fn if cast else None)
    emu = ComfyEmulation(model)
    emu.wrapper = patch.unet_wrapper(emu.to_timestep)
    emu.cfg_function = patch.cfg_function(emu.to_timestep, emu.base_uncond)
    with torch.no_grad():
        ours = emu.step(x, sigma, cond, uncond, 7.5)
        plain = ComfyEmulation(model).step(x, sigma, cond, uncond, 7.5)
    assert bool(casts) == cast
    ok, msg = _close(ours, reference)
    assert ok, f"step {step}: {msg}"
    if step < 37:  # the comparison can fail: the method changes the prediction while it acts
        assert not _close(plain, reference)[0]
    else:
        assert _close(plain, reference)[0]


def test_scalecrafter_node_switches_off_noise_damping_and_dispersion(model):
    from ldm.methods.scalecrafter.guidance import ScaleCrafterGuidance
    from ldm.methods.scalecrafter.presets import plan_from_preset
    preset = REPO_ROOT / "configs/scalecrafter/sd2.1_2048x2048_disperse.yaml"
    unet = model.model.diffusion_model
    t, x_t, x, sigma, cond, uncond, ac = _inputs(model, 4)
    plan = plan_from_preset(unet, preset)
    plan.ndcfg, plan.disperse_layers, plan.disperse_tau = None, frozenset(), 0
    reference = _reference_denoised(model, ScaleCrafterGuidance(plan), 4, t, x_t, cond, uncond, 7.5, ac)
    patch = ScaleCrafterPatch(unet, preset=preset, ndcfg=False, dispersion=False)
    emu = ComfyEmulation(model)
    emu.wrapper = patch.unet_wrapper(emu.to_timestep)
    emu.cfg_function = patch.cfg_function(emu.to_timestep, emu.base_uncond)
    with torch.no_grad():
        ok, msg = _close(emu.step(x, sigma, cond, uncond, 7.5), reference)
    assert ok, msg


def test_freescale_node_matches_the_cascade_stage_guidance(model):
    """Stage 128x128 of a cascade from the 64 px base (tiny-sd2: latent 8): restrained dilation x2 and scale fusion
    with window jitter drawn from the same seeded generator."""
    from ldm.methods.freescale.cascade import FreeScale, FreeScaleSettings
    unet = model.model.diffusion_model
    settings = FreeScaleSettings(stages=[(64, 64), (128, 128)], base=64, dilate_tau=35)
    for step in (20, 40):  # restrained dilation on (step < 35) and off; scale fusion on both
        t, x_t, x, sigma, cond, uncond, ac = _inputs(model, step, hw=(16, 16))
        guidance = FreeScale(model, settings).stage_guidance((128, 128), 50, random.Random(5).randint)
        reference = _reference_denoised(model, guidance, step, t, x_t, cond, uncond, 5.0, ac)
        patch = FreeScalePatch(unet, base_latent=8, dilate_tau=35, steps=50, seed=5)
        emu = ComfyEmulation(model)
        emu.wrapper = patch.unet_wrapper(emu.to_timestep)
        with torch.no_grad():
            ours = emu.step(x, sigma, cond, uncond, 5.0)
            plain = ComfyEmulation(model).step(x, sigma, cond, uncond, 5.0)
        ok, msg = _close(ours, reference)
        assert ok, f"step {step}: {msg}"
        assert not _close(plain, reference)[0]


def test_node_classes_and_the_model_options_they_set(model):
    """The nodes clone the MODEL and set ComfyUI's model options (a stand-in for ModelPatcher with the methods
    the nodes call); presets of the wrong family are refused."""
    nodes = comfyui.nodes

    class Sampling:
        def timestep(self, sigma):
            return torch.zeros_like(sigma)

    class Patcher:
        def __init__(self, unet):
            self.unet, self.model_options = unet, {}

        def clone(self):
            c = Patcher(self.unet)
            c.model_options = copy.copy(self.model_options)
            return c

        def get_model_object(self, name):
            return {"diffusion_model": self.unet, "model_sampling": Sampling()}[name]

        def set_model_unet_function_wrapper(self, f):
            self.model_options["model_function_wrapper"] = f

        def set_model_sampler_cfg_function(self, f, disable_cfg1_optimization=False):
            self.model_options["sampler_cfg_function"] = f

    for cls in nodes.NODE_CLASS_MAPPINGS.values():
        spec = cls.INPUT_TYPES()["required"]
        assert spec["model"] == ("MODEL",) and cls.RETURN_TYPES == ("MODEL",) and callable(getattr(cls, cls.FUNCTION))
    presets = nodes.ScaleCrafterPreset.INPUT_TYPES()["required"]["preset"][0]
    assert "sd2.1_2048x2048_disperse.yaml" in presets and not any(p.startswith("demo_") for p in presets)
    base = Patcher(model.model.diffusion_model)
    (patched,) = nodes.ScaleCrafterPreset().patch(base, "sd2.1_1024x1024.yaml")
    assert patched is not base and base.model_options == {}
    assert set(patched.model_options) == {"model_function_wrapper", "sampler_cfg_function"}
    (fs,) = nodes.FreeScaleStage().patch(base, "sd2.1_2048x2048.yaml", seed=0)
    assert set(fs.model_options) == {"model_function_wrapper"}
    (manual,) = nodes.ScaleCrafterManual().patch(base, 2.0, 20, 0, False, 50)
    assert "model_function_wrapper" in manual.model_options
    # the tiny UNet's context is 32 wide: no family, no refusal; an SD 1.5-sized context against an SD 2.1 preset:
    with pytest.raises(ValueError, match="preset for sd2 models, but this MODEL is sd1"):
        nodes.check_family(torch.nn.ModuleDict({"attn2": torch.nn.ModuleDict({"to_k": torch.nn.Linear(768, 8)})}),
                           REPO_ROOT / "configs/scalecrafter/sd2.1_1024x1024.yaml")
