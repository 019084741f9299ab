"""Samplers on one contract (``ldm/samplers/base.py``), registered here by name: one module and one line each."""
import importlib

SAMPLERS = {
    "ddim": "ldm.samplers.ddim:DDIMSampler",
}


def sampler_class(name):
    if name not in SAMPLERS:
        raise KeyError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    module, cls = SAMPLERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_sampler(name, model, **options):
    return sampler_class(name)(model, **options)
