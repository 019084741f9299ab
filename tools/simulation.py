"""Whole library runs (``ldm.pipelines.txt2img.run``) on fake CUDA tensors: the estimated peak GPU memory of
each phase of a real pipeline run, every method's own memory decisions included, without a GPU.

``Simulation(cap_bytes)`` is a context in which

* tensors created on ``cuda`` are fake (shapes only) and their live bytes are counted (``tools/fake_cuda.py``);
  attention takes the fused kernels' allocations;
* ``ldm.memory.available_bytes("cuda")`` is the simulated card (``cap_bytes``) less the live fake allocations,
  so the decoding plan, the window batches and the text-encoder placement are decided for that card;
* ``torch.autocast("cuda")`` works (it disables itself without a CUDA driver otherwise), and
  ``txt2img``'s device pick accepts ``--device cuda``;
* the noise schedules stay real numbers (the DDIM sampler reads its per-step coefficients as floats), and so do
  the small tensors whose values can be known (the sampler's timestep batches, which methods read the current
  timestep from; draws from a CPU generator): ``KnownValues``;
* ``loader`` is the pipeline's loader seam: random-weight models built in fake host memory, cast to the loader's
  ``weights_dtype`` there and moved to the fake GPU, as the library's loader does (cached per config; casts
  and moves through ``cast_parameters_`` / ``move_parameters_`` since ``Module.to`` cannot swap fake tensors),
  ``to_image`` its image seam (a black placeholder of the decoded
  image's size, which is recorded);
* the phases of a run are told apart by the model's entry points: ``get_learned_conditioning`` (text encoders),
  ``decode_first_stage`` (decoding, the plan used recorded), ``encode_first_stage`` (encoding) and the x4
  upscaler's ``Upscaler.__call__`` (upscaling; its decode counts as decoding), the loader (loading: a model
  built on its first use); the caller marks the sampling (``phase("sampling")`` around the sampler's runs);
  everything else is "other" (setting up, moving weights, resizing latents between cascade stages).
  ``ldm.memory.fitting_batch`` calls (window batches) are recorded with their caller.

The estimate is a lower bound of ``torch.cuda.max_memory_allocated``: no cuDNN workspaces, no allocator
fragmentation (see ``tools/fake_cuda.py``).
"""
import sys
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace

import numpy as np
import torch

from tools.fake_cuda import (FakeCuda, KnownValues, cast_parameters_, fused_attention, move_parameters_,
                             unset_fake_temporarily)

GiB = 2 ** 30


@contextmanager
def patched(obj, name, value):
    """``obj.name = value`` for the block (an attribute absent before is deleted again)."""
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def _real(fn, *a, **k):
    """``fn`` on real CPU tensors (outside the fake mode)."""
    with unset_fake_temporarily(), torch.device("cpu"):
        return fn(*a, **k)


class Simulation:
    """See the module doc. ``phases``: label -> peak bytes of the current run (``start_run`` clears them)."""

    ENTRY_POINTS = (("get_learned_conditioning", "text encoders"), ("decode_first_stage", "decoding"),
                    ("encode_first_stage", "encoding"))

    def __init__(self, cap_bytes):
        self.cap = int(cap_bytes)
        self.fc = FakeCuda()
        self.models = {}
        self.stack = None
        self._patched_classes = set()
        self.start_run()

    # -- bookkeeping of one run -------------------------------------------------------------------------------

    def start_run(self):
        self.phases, self.batches, self.plans, self.images = {}, [], [], []
        self.label = "other"
        if self.stack is not None:
            self.fc.counter.reset_peak()
        self.start_bytes = self.fc.current_bytes

    def _close_interval(self):
        c = self.fc.counter
        self.phases[self.label] = max(self.phases.get(self.label, 0), c.peak)
        c.reset_peak()

    @contextmanager
    def phase(self, label):
        self._close_interval()
        previous, self.label = self.label, label
        try:
            yield
        finally:
            self._close_interval()
            self.label = previous

    def finish_run(self):
        """Phase peaks (bytes) of the run since ``start_run``."""
        self._close_interval()
        return dict(self.phases)

    @property
    def current_bytes(self):
        return self.fc.current_bytes

    # -- the seams ---------------------------------------------------------------------------------------------

    def loader(self, config, ckpt=None, device=None, weights_dtype=None, **kw):
        """The pipeline's loader: a random-weight (uninitialized) model of ``config``, built in (fake) host memory,
        its UNet and text encoders cast to ``weights_dtype`` there when given, then moved to the fake GPU, as
        ``ldm.checkpoint.load_model_from_config`` does; cached per config and ``weights_dtype``."""
        from omegaconf import OmegaConf
        from ldm.util import instantiate_from_config, no_weight_init
        from ldm.util import cast_for_half_precision
        key = (OmegaConf.to_yaml(config), str(weights_dtype))
        if key not in self.models:
            node = config.model if "model" in config else config
            with self.phase("loading"):
                with torch.device("cpu"), no_weight_init():
                    model = instantiate_from_config(node).eval().requires_grad_(False)
                if weights_dtype is not None:
                    cast_for_half_precision(model, weights_dtype, cast=cast_parameters_)
                move_parameters_(model, "cuda")
            self._mark_phases(type(model))
            self.models[key] = model
        return self.models[key]

    def forget_models(self, keep=()):
        """Drop the cached models except ``keep`` (their fake storages are freed when nothing else holds them)."""
        import gc
        self.models = {k: m for k, m in self.models.items() if any(m is x for x in keep)}
        gc.collect()

    def to_image(self, x):
        from PIL import Image
        self.images.append(tuple(x.shape))
        return Image.new("RGB", (int(x.shape[-1]), int(x.shape[-2])))

    # -- the context --------------------------------------------------------------------------------------------

    def _mark_phases(self, cls):
        if cls in self._patched_classes:
            return
        self._patched_classes.add(cls)
        for name, label in self.ENTRY_POINTS:
            original = getattr(cls, name, None)
            if original is None:
                continue
            self.stack.enter_context(patched(cls, name, self._marked(original, label, name == "decode_first_stage")))

    def _marked(self, fn, label, record_plan=False):
        sim = self

        def marked(model, *a, **k):
            with sim.phase(label):
                out = fn(model, *a, **k)
            if record_plan:
                plan = getattr(getattr(model, "first_stage_model", None), "last_plan", None)
                sim.plans.append((tuple(a[0].shape) if a else None, plan.describe() if plan is not None else None))
            return out
        return marked

    def available_bytes(self, real):
        def available(device):
            if torch.device(device).type == "cuda":
                return max(0, self.cap - self.fc.current_bytes)
            return real(device)
        return available

    def fitting_batch(self, real):
        def fitting(requested, item_bytes, device, reserve=0.0):
            chosen = real(requested, item_bytes, device, reserve)
            caller = sys._getframe(1).f_globals.get("__name__", "?")
            if caller == "ldm.windows":
                caller = sys._getframe(2).f_globals.get("__name__", "?")
            self.batches.append({"caller": caller, "requested": int(requested), "chosen": int(chosen),
                                 "item_gib": float(item_bytes) / GiB})
            return chosen
        return fitting

    def __enter__(self):
        import ldm.methods.sdsr  # noqa: F401  (imports cast_for_half_precision by name)
        import ldm.models.diffusion.ddpm as ddpm
        import ldm.models.diffusion.sdxl  # noqa: F401  (modules that import make_beta_schedule by name)
        import ldm.modules.diffusionmodules.upscaling  # noqa: F401
        import ldm.pipelines.txt2img as txt2img
        import ldm.upscaler as upscaler
        from ldm import memory
        from ldm.modules.diffusionmodules.util import make_beta_schedule
        from ldm.samplers.ddim import DDIMSampler
        stack = self.stack = ExitStack()
        stack.enter_context(self.fc)
        stack.enter_context(torch.no_grad())

        def real_beta_schedule(*a, **k):  # numpy values, computed outside the fake mode
            return _real(make_beta_schedule, *a, **k)
        for m in [m for n, m in list(sys.modules.items()) if n.startswith("ldm.") and m is not None
                  and getattr(m, "make_beta_schedule", None) is make_beta_schedule]:
            stack.enter_context(patched(m, "make_beta_schedule", real_beta_schedule))

        register = ddpm.LatentDiffusion.register_schedule

        def register_schedule(model, given_betas=None, beta_schedule="linear", timesteps=1000, linear_start=1e-4,
                              linear_end=2e-2, cosine_s=8e-3):
            register(model, given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                     linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)

            def real_schedule():  # what DDIMSampler.make_schedule reads from the model, as real tensors
                betas = np.asarray(given_betas, dtype=np.float64) if given_betas is not None else \
                    make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
                ac = np.cumprod(1.0 - betas)
                return SimpleNamespace(betas=torch.tensor(betas, dtype=torch.float32),
                                       alphas_cumprod=torch.tensor(ac, dtype=torch.float32),
                                       alphas_cumprod_prev=torch.tensor(np.append(1.0, ac[:-1]), dtype=torch.float32))
            model.__dict__["_simulated_schedule"] = _real(real_schedule)
        stack.enter_context(patched(ddpm.LatentDiffusion, "register_schedule", register_schedule))

        make_schedule = DDIMSampler.make_schedule

        def make_schedule_from_real(sampler, *a, **k):
            model = sampler.model
            real = getattr(model, "_simulated_schedule", None)
            if real is None:
                return make_schedule(sampler, *a, **k)
            sampler.model = real
            try:
                with unset_fake_temporarily():
                    make_schedule(sampler, *a, **k)
                    for name in ("ddim_sigmas", "ddim_alphas", "ddim_alphas_prev"):  # read as floats per step
                        setattr(sampler, name, np.asarray(getattr(sampler, name)))
            finally:
                sampler.model = model
        stack.enter_context(patched(DDIMSampler, "make_schedule", make_schedule_from_real))

        from ldm.util import cast_for_half_precision

        def cast_fake(model, dtype=torch.float16, cast=None):
            return cast_for_half_precision(model, dtype, cast=cast or cast_parameters_)
        for m in [m for n, m in list(sys.modules.items()) if n.startswith("ldm") and m is not None
                  and getattr(m, "cast_for_half_precision", None) is cast_for_half_precision]:
            stack.enter_context(patched(m, "cast_for_half_precision", cast_fake))
        stack.enter_context(patched(memory, "available_bytes", self.available_bytes(memory.available_bytes)))
        stack.enter_context(patched(memory, "fitting_batch", self.fitting_batch(memory.fitting_batch)))
        stack.enter_context(patched(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False))
        pick = txt2img.pick_device
        stack.enter_context(patched(txt2img, "pick_device",
                                    lambda name="auto": torch.device("cuda") if name == "cuda" else pick(name)))
        call = upscaler.Upscaler.__call__

        def upscale(up, *a, **k):
            with self.phase("upscaling"):
                return call(up, *a, **k)
        stack.enter_context(patched(upscaler.Upscaler, "__call__", upscale))
        stack.enter_context(fused_attention())
        stack.enter_context(KnownValues())  # timesteps and CPU draws a method reads
        stack.enter_context(self.fc.tracking())
        self.start_run()
        return self

    def __exit__(self, *exc):
        stack, self.stack = self.stack, None
        self._patched_classes = set()
        return stack.__exit__(*exc)
