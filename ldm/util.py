"""Small helpers shared by the whole package (config-driven construction, misc)."""
import contextlib
import contextvars
import importlib
from collections.abc import Mapping
from inspect import isfunction

import torch

from ldm.errors import UsageError

# A config is code: instantiating it calls every ``target`` it names. Unless the caller says it trusts
# the config, only this package's classes and the few library classes the shipped configs use are allowed.
ALLOWED_TARGET_PREFIXES = ("ldm.",)
ALLOWED_TARGETS = frozenset({"torch.nn.Identity"})
_TRUSTED = contextvars.ContextVar("ldm_trusted_configs", default=False)


class UntrustedConfigError(UsageError):
    """A config names a ``target`` outside the allowed set and the config was not marked as trusted."""


@contextlib.contextmanager
def trusted_configs(enabled=True):
    """Within this block ``instantiate_from_config`` builds any target, nested configs included
    (what ``--trust_config`` / ``trust=True`` turn on). ``enabled=False`` changes nothing."""
    token = _TRUSTED.set(True) if enabled else None
    try:
        yield
    finally:
        if token is not None:
            _TRUSTED.reset(token)


def _untrusted(target, why=""):
    allowed = ", ".join(sorted(ALLOWED_TARGETS))
    return UntrustedConfigError(
        f"the config names target '{target}'{why}, which is neither part of this package (ldm.*) nor one of "
        f"the allowed library classes ({allowed}). A config is code: building it calls every target it "
        "names. If you trust this config, pass --trust_config (Python API: trust=True)")


def check_config_target(target, obj=None):
    """Raise :class:`UntrustedConfigError` unless ``target`` (a dotted path) may be built without trust.

    ``obj``, the resolved object, must then also be defined inside the package (so that a name such as
    ``ldm.some_module.os`` cannot reach a library object imported there)."""
    if _TRUSTED.get():
        return
    target = str(target)
    if target in ALLOWED_TARGETS:
        return
    if not target.startswith(ALLOWED_TARGET_PREFIXES):
        raise _untrusted(target)
    if obj is not None:
        module = getattr(obj, "__module__", None) or ""
        if not module.startswith(ALLOWED_TARGET_PREFIXES):
            raise _untrusted(target, f" (an object from {module or 'outside the package'})")


def check_config_targets(config, trust=False):
    """Check every ``target`` in a (nested) config before anything is built; ``trust=True`` skips it."""
    if trust or _TRUSTED.get():
        return
    if type(config).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf
        config = OmegaConf.to_container(config, resolve=False)
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            target = node.get("target")
            if isinstance(target, str):
                check_config_target(target)
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def get_obj_from_str(string, reload=False):
    """Resolve a dotted path such as ``ldm.models.autoencoder.AutoencoderKL``."""
    module, cls = string.rsplit(".", 1)
    mod = importlib.import_module(module)
    if reload:
        mod = importlib.reload(mod)
    return getattr(mod, cls)


def instantiate_from_config(config, *, trust=False, **extra_kwargs):
    """Build ``config.target(**config.params)``, the CompVis way every YAML names its classes.

    Targets outside ``ldm.*`` and :data:`ALLOWED_TARGETS` raise :class:`UntrustedConfigError` unless
    ``trust=True`` (which also covers the nested configs the constructors build) or the call happens
    inside :func:`trusted_configs`."""
    if trust:
        with trusted_configs():
            return instantiate_from_config(config, **extra_kwargs)
    if "target" not in config:
        # the original uses these two markers for "no model" in unconditional configs
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("Expected key `target` to instantiate.")
    target = config["target"]
    check_config_target(target)
    params = dict(config.get("params", dict()) or {})
    params.update(extra_kwargs)
    obj = get_obj_from_str(target)
    check_config_target(target, obj)
    return obj(**params)


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


class no_weight_init:
    """Skip the random initialisation of parameters while building a model whose weights are about to be
    loaded from a checkpoint (building SD 2.x drops from ~30 s to a few seconds on CPU).

    Only ``torch.nn.init``'s in-place initialisers are disabled; tensors are still allocated and buffers
    computed in constructors (noise schedules, attention masks) are unaffected. Every parameter must be
    overwritten afterwards: use it only together with a strict checkpoint load.
    """

    NAMES = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
             "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")

    def __enter__(self):
        import torch.nn.init as init
        self._saved = {n: getattr(init, n) for n in self.NAMES if hasattr(init, n)}
        for n in self._saved:
            setattr(init, n, lambda tensor, *a, **k: tensor)
        return self

    def __exit__(self, *exc):
        import torch.nn.init as init
        for n, f in self._saved.items():
            setattr(init, n, f)
        return False


def load_yaml_preset(path, known_keys, what, folder, error=ValueError):
    """A method preset (plain YAML data, no targets) as a dict with ``_path``; a missing file or an unknown key
    raises ``error`` naming the file, the key and the keys that are known."""
    from pathlib import Path

    from omegaconf import OmegaConf
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} preset not found: {path} (presets are in {folder})")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    unknown = set(cfg) - set(known_keys)
    if unknown:
        raise error(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(known_keys)}")
    cfg["_path"] = path
    return cfg


def check_size(H, W, f):
    """Image sides must be positive multiples of the first stage's downsampling factor f."""
    for name, v in (("--H", H), ("--W", W)):
        if v <= 0:
            raise UsageError(f"{name} {v}: the image side must be a positive multiple of {f} (the latent "
                             f"downsampling factor --f), e.g. 512")
        if v % f:
            lo = max(f, (v // f) * f)
            hi = lo + f if v % f else lo
            raise UsageError(f"{name} {v} is not a multiple of {f} (the latent downsampling factor --f); "
                             f"nearest valid sizes: {lo} or {hi}")


def cast_for_half_precision(model, dtype=torch.float16, cast=None):
    """Store the UNet's and the text encoders' weights in ``dtype`` (run under autocast of the same dtype).

    The VAE and the noise schedule stay float32 (SDXL's VAE overflows float16; the sampler's per-step
    coefficients need float32). Compared with float32 weights under autocast this halves the weight memory:
    SDXL's UNet is 5.1 GB instead of 10.3 GB. ``cast(module, dtype)`` defaults to ``module.to(dtype)``
    (``tools.fake_cuda.cast_parameters_`` for fake tensors).
    """
    cast = cast or (lambda module, dt: module.to(dt))
    for name in ("model", "cond_stage_model", "conditioner"):
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            cast(module, dtype)
    return model
