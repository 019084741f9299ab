"""The method interface: what the pipelines, sweeps, demo, table runner and benchmark ask of a method.

A method is one module under ``ldm/methods/`` with one class registered in ``ldm/methods/__init__.py``. It sees the
command line only through its own argument group (``add_args``) and reads the options in ``settings`` without
changing them. Before the model is loaded (``preset_size``, ``settings``) it checks its inputs and fixes what it
will do; after loading, an instance samples (``sample``), may wrap the run (``scope``), post-process the decoded
images (``finish``) and describes itself for the PNG metadata and the tables (``describe``).
"""
import argparse
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import ClassVar, Dict, Optional, Sequence, Tuple

from ldm.errors import UsageError
from ldm.guidance import TrajectoryClock, reference_timesteps


@dataclass
class ModelInfo:
    """What a method may know of the model before it is loaded (from the config) and of the run."""
    family: str            # "sd1" | "sd2" | "sdxl" | "demo" (what a preset's base_model names)
    f: int                 # latent downsampling factor (8 for SD, 1 for the demo model)
    channels: int          # latent channels
    base_latent: int       # latent side at the training size (64 for SD 1/2, 128 for SDXL, 32 for the demo)
    side: int              # the family's training side in pixels for size defaults (512, or 1024 for SDXL)
    steps: int = 50
    seed: int = 42
    config_name: str = ""
    unet_channels: Tuple[int, ...] = ()  # the UNet's channels per level (model_channels x channel_mult)
    decoder_channels: int = 0  # channels of the VAE decoder's full-resolution level (0: no VAE)
    tiled_vae: bool = True     # the first stage can decode in tiles (False: the identity, the demo model)

    @property
    def base_px(self):
        return self.base_latent * self.f

    @property
    def sdxl(self):
        return self.family == "sdxl"


@dataclass
class Settings:
    """What a method decided before the model loads. ``size``: the image (H, W); ``sample_size``: the size of the
    first sampler run (a cascade's first stage, SD+SR's base size), default ``size``; ``size_conditioning``:
    SDXL's original/target size (pixels) where the method fixes them; ``values``: the method's own."""
    size: Tuple[int, int]
    sample_size: Optional[Tuple[int, int]] = None
    size_conditioning: Dict[str, Sequence[int]] = field(default_factory=dict)
    freeu: Optional[Dict[str, float]] = None   # the preset's FreeU values, where it has them
    reference_steps: Optional[int] = None      # the step count its per-step settings are written for (a preset's
    #                                            ``steps``); None: the run's own --steps
    sampler: Optional[str] = None              # the preset's sampler (``sampler:``), used when --sampler is not given
    values: Dict[str, object] = field(default_factory=dict)


class Method:
    name: ClassVar[str] = ""
    label: ClassVar[str] = ""                   # its name in messages ("ScaleCrafter")
    summary: ClassVar[str] = ""                 # one line in --method's help
    preset_flag: ClassVar[Optional[str]] = None  # e.g. "--scalecrafter_config": tables and sweeps ask for it
    preset_dir: ClassVar[Optional[str]] = None   # its presets' folder under configs/ ("scalecrafter")
    img2img: ClassVar[bool] = False              # scripts/upscale.py --method NAME
    implied_by: ClassVar[Tuple[str, ...]] = ()   # options that select this method when --method is not given
    accepts: ClassVar[Tuple[str, ...]] = ()      # shared cascade options it takes (init_image, save_stages)
    group: ClassVar[Optional[str]] = None        # the title of its argument group
    img2img_refused: ClassVar[Dict[str, str]] = {}  # own options scripts/upscale.py refuses: {dest: why}

    # -- before the model is loaded --------------------------------------------------------------

    @classmethod
    def add_args(cls, parser):
        """Add the method's own options (one argument group); none by default."""

    @classmethod
    def own_options(cls):
        """{dest: default} of the options ``add_args`` adds."""
        p = argparse.ArgumentParser(add_help=False)
        cls.add_args(p)
        return {a.dest: a.default for a in p._actions}

    @classmethod
    def given_options(cls, opt):
        """The method's own flags given with a non-default value (``--flag`` names)."""
        return [f"--{dest}" for dest, default in cls.own_options().items()
                if hasattr(opt, dest) and getattr(opt, dest) != default]

    @classmethod
    def read_preset(cls, path):
        """The method's preset file as a dict (its own loader and checks where it has one)."""
        from ldm.util import read_yaml_mapping, resolve_yaml
        return resolve_yaml(read_yaml_mapping(path, "preset"), str(path))

    @classmethod
    def check_img2img(cls, opt):
        """scripts/upscale.py --method NAME: the options it needs there (UsageError)."""

    @classmethod
    def preset(cls, opt, info):
        """The preset named by the method's ``preset_flag`` (read by ``read_preset``, checked against the model
        family), or None when the flag is not given; UsageError for a bad file."""
        path = getattr(opt, cls.preset_flag[2:], None) if cls.preset_flag else None
        if not path:
            return None
        try:
            preset = cls.read_preset(path)
        except ValueError as err:
            raise UsageError(str(err)) from None
        check_preset_family(cls.preset_flag, path, preset.get("base_model"), info, cls.preset_dir)
        return preset

    @classmethod
    def preset_size(cls, opt, info):
        """(H, W) of the method's preset, the defaults of --H/--W, or None."""
        preset = cls.preset(opt, info)
        return (preset.get("height"), preset.get("width")) if preset else None

    @classmethod
    def settings(cls, opt, info, size):
        """Settings for an image of ``size`` = (H, W); UsageError naming the bad input. Must not change opt."""
        return Settings(size=tuple(size))

    @classmethod
    def memory_estimate(cls, settings, info, batch_size, scale=2.0, tiling=None, bytes_per_value=4):
        """(bytes, what) of the largest single tensor the run will hold, from the sizes alone (before loading): a
        rough lower bound of its peak memory, for refusing a run that cannot fit (``check_memory``). Default:
        the UNet's full-resolution activation of the largest size sampled (both guidance branches), or the VAE
        decoder's full-resolution activation when the image is decoded whole. The UNet's input is the whole
        latent unless the method says otherwise (``unet_input``: windows)."""
        h, w = settings.size
        branches = 2 if scale != 1.0 else 1
        c0 = info.unet_channels[0] if info.unet_channels else 320
        n, lh, lw = cls.unet_input(settings, info)
        unet = n * branches * batch_size * c0 * lh * lw * bytes_per_value
        best = (unet, f"the UNet's {c0}-channel activation at {n} x {lh}x{lw} latent pixels")
        if info.decoder_channels and not tiling:
            vae = batch_size * info.decoder_channels * h * w * 4  # the decoder runs in float32
            if vae > best[0]:
                best = (vae, f"the VAE decoder's {info.decoder_channels}-channel activation at {h}x{w} (decoded "
                             "whole: --tiled_decoding bounds it)")
        return best

    @classmethod
    def unet_input(cls, settings, info):
        """(inputs per UNet call, latent height, latent width) of the largest UNet call: the whole latent by
        default; the window methods call it on batches of windows."""
        return 1, settings.size[0] // info.f, settings.size[1] // info.f

    # -- after loading ---------------------------------------------------------------------------

    def __init__(self, model, settings, info, tiling=None, opt=None):
        self.model, self.settings, self.info = model, settings, info
        self.tiling = dict(tiling or {})
        self.opt = opt
        self.loader = None  # the pipeline's model loader, for a method that loads a model of its own (SD+SR)

    def prepare(self):
        """After loading, before anything is written: build or load what the run needs (errors surface here)."""

    def reference_steps(self):
        """The step count of the DDIM run the method's per-step settings are written for."""
        return int(self.settings.reference_steps or self.info.steps)

    def clock(self):
        """The trajectory clock of this method's settings (``ldm/guidance.py``)."""
        return TrajectoryClock(reference_timesteps(self.model.num_timesteps, self.reference_steps()))

    def sample_shape(self):
        h, w = self.settings.sample_size or self.settings.size
        return (self.info.channels, h // self.info.f, w // self.info.f)

    def sample(self, sampler, steps, cond, uncond, scale, *, batch_size, generator=None, x_T=None, jitter_seed=0,
               init_latent=None, start_step=0, callback=None):
        """(final latent, [earlier stage latents]) of one batch."""
        raise NotImplementedError

    def scope(self):
        """A context around the whole run (hooks that live as long as it); none by default."""
        return nullcontext()

    def finish(self, images, prompts, generator=None):
        """The decoded images, post-processed (SD+SR: through the upscaler)."""
        return images

    def describe(self):
        """The method's settings for PNG metadata, sweep manifests and tables."""
        return {}

    def stage_images(self):
        """True when ``sample`` returns earlier stages' latents the user asked to see (--save_stages)."""
        return False


class GuidanceMethod(Method):
    """A method that is a guidance callable: ``sample`` is one sampler run with it (img2img: from ``start_step``
    with ``x_T`` the noised image)."""

    def make_guidance(self):
        """The method's guidance callable (``ldm/guidance.py``); None: plain classifier-free guidance."""
        return None

    def prepare(self):
        self.guidance()

    def guidance(self):
        if not hasattr(self, "_guidance"):
            self._guidance = self.make_guidance()  # built once per run: plans, layer lookups, caches
        return self._guidance

    def sample(self, sampler, steps, cond, uncond, scale, *, batch_size, generator=None, x_T=None, jitter_seed=0,
               init_latent=None, start_step=0, callback=None):
        latent = sampler.run(steps, cond, uncond, scale, batch_size=batch_size, shape=self.sample_shape(), x_T=x_T,
                             guidance=self.clock().wrap(self.guidance()), generator=generator, start_step=start_step,
                             callback=callback)
        return latent, []

    @classmethod
    def default_strength(cls, settings, steps):
        """img2img: the fraction of the schedule re-run when --strength is not given (CompVis' img2img: 0.75)."""
        return 0.75

    acts: ClassVar[str] = "settings"  # what acts until active_until() (img2img's warning)

    def active_until(self):
        """The step index after which the method no longer acts (img2img warns when it starts later), or None."""
        return None


def refuse(message):
    raise UsageError(message)


PRESET_PATTERNS = {"sd1": "sd1.5_*.yaml", "sd2": "sd2.1_*.yaml", "sdxl": "sdxl_*.yaml", "demo": "demo_*.yaml"}


def check_preset_family(flag, path, base, info, kind):
    """A preset's ``base_model`` must be the loaded config's family exactly (sd1, sd2, sdxl, demo: the schedules
    and layer lists are made for one model); otherwise an error naming the presets to use."""
    if base != info.family:
        hint = PRESET_PATTERNS.get(info.family, "*.yaml")
        config = f" ({info.config_name})" if info.config_name else ""
        raise UsageError(f"{flag} {path} is a preset for {base} but --config{config} is a {info.family} model; use "
                         f"a {info.family} preset, configs/{kind}/{hint}")
