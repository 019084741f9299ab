"""Small helpers shared by the whole package (config-driven construction, misc)."""
import importlib
from inspect import isfunction


def get_obj_from_str(string, reload=False):
    """Resolve a dotted path such as ``ldm.models.autoencoder.AutoencoderKL``."""
    module, cls = string.rsplit(".", 1)
    mod = importlib.import_module(module)
    if reload:
        mod = importlib.reload(mod)
    return getattr(mod, cls)


def instantiate_from_config(config, **extra_kwargs):
    """Build ``config.target(**config.params)``, the CompVis way every YAML names its classes."""
    if "target" not in config:
        # the original uses these two markers for "no model" in unconditional configs
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("Expected key `target` to instantiate.")
    params = dict(config.get("params", dict()) or {})
    params.update(extra_kwargs)
    return get_obj_from_str(config["target"])(**params)


def exists(x):
    return x is not None


def default(val, d):
    if exists(val):
        return val
    return d() if isfunction(d) else d


def count_params(model, verbose=False):
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"{model.__class__.__name__} has {total * 1.e-6:.2f} M params.")
    return total
