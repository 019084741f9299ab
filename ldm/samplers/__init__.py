"""Samplers on one contract (``ldm/samplers/base.py``), registered here by name: one module and one line each."""
import importlib

SAMPLERS = {
    "ddim": "ldm.samplers.ddim:DDIMSampler",
    "euler": "ldm.samplers.euler:EulerSampler",
    "euler_a": "ldm.samplers.euler_ancestral:EulerAncestralSampler",
    "heun": "ldm.samplers.heun:HeunSampler",
    "dpmpp_2m": "ldm.samplers.dpmpp_2m:DPMPP2MSampler",
    "dpmpp_2m_karras": "ldm.samplers.dpmpp_2m:DPMPP2MKarrasSampler",
    "dpmpp_2m_sde": "ldm.samplers.dpmpp_2m_sde:DPMPP2MSDESampler",
    "unipc": "ldm.samplers.unipc:UniPCSampler",
}


def sampler_class(name):
    if name not in SAMPLERS:
        raise KeyError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    module, cls = SAMPLERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_sampler(name, model, **options):
    return sampler_class(name)(model, **options)
