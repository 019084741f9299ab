"""The method registry: every ``--method`` is one module under ``ldm/methods/`` and one line here.

Scripts, sweeps, the demo, the table runner and the benchmark list and build methods through this registry only
(``names()``, ``method_class(name)``); methods never import one another (shared machinery lives in
``ldm/unet_hooks/``, ``ldm/windows.py``, ``ldm/guidance.py`` and ``ldm/methods/cascade.py``).
"""
import importlib

from ldm.errors import UsageError

_REGISTRY = {
    "direct": "ldm.methods.direct:Direct",
    "scalecrafter": "ldm.methods.scalecrafter:ScaleCrafter",
    "freescale": "ldm.methods.freescale:FreeScaleMethod",
    "attn_scale": "ldm.methods.attention_scaling:AttentionScalingMethod",
    "multidiffusion": "ldm.methods.multidiffusion:MultiDiffusion",
    "demofusion": "ldm.methods.demofusion:DemoFusionMethod",
    "hidiffusion": "ldm.methods.hidiffusion:HiDiffusionMethod",
    "fouriscale": "ldm.methods.fouriscale:FouriScaleMethod",
    "sdsr": "ldm.methods.sdsr:SDSR",
}


def register(name, target):
    """Add a method: ``target`` is a Method subclass or "module:Class" (imported when first asked for)."""
    _REGISTRY[name] = target


def unregister(name):
    _REGISTRY.pop(name, None)


def names():
    return tuple(_REGISTRY)


def method_class(name):
    if name not in _REGISTRY:
        raise UsageError(f"--method {name}: unknown method; known: {', '.join(_REGISTRY)}")
    target = _REGISTRY[name]
    if isinstance(target, str):
        module, cls = target.split(":")
        target = getattr(importlib.import_module(module), cls)
    return target


def classes():
    return [method_class(n) for n in names()]


def img2img_names():
    return tuple(n for n in names() if method_class(n).img2img)


def preset_flags():
    """{method: its preset flag} for the methods that take a preset file."""
    return {n: method_class(n).preset_flag for n in names() if method_class(n).preset_flag}


def add_args(parser):
    """Every method's own argument group."""
    for cls in classes():
        cls.add_args(parser)


def resolve(opt):
    """The method class of ``opt.method``, or, without --method, the one whose options were given (``implied_by``),
    else direct. Options of another method are an error naming the method they belong to."""
    name = getattr(opt, "method", None)
    if name is None:
        implied = [cls for cls in classes() if any(getattr(opt, d, None) for d in cls.implied_by)]
        name = implied[0].name if implied else "direct"
    chosen = method_class(name)
    for cls in classes():
        if cls is chosen:
            continue
        given = cls.given_options(opt)
        if given:
            raise UsageError(f"{', '.join(given)}: {cls.label or cls.name} options; add --method {cls.name} "
                             f"(got --method {name})")
    for shared in ("init_image", "save_stages"):
        if getattr(opt, shared, None) and shared not in chosen.accepts:
            takers = " or ".join(c.name for c in classes() if shared in c.accepts)
            raise UsageError(f"--{shared} works with the cascades: add --method {takers} (got --method {name})")
    return chosen
