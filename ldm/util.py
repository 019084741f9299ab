"""Small helpers shared by the whole package: reading YAML files (configs, presets, specs) with one-line errors,
config-driven construction and the check that decides what a config may build, misc."""
import contextlib
import contextvars
import importlib
import math
import re
from collections.abc import Mapping
from inspect import isfunction
from pathlib import Path

import yaml

import torch

from ldm.errors import UsageError

# A config is code: instantiating it calls every ``target`` it names. Unless the caller says it trusts
# the config, only this package's model classes (see ``check_config_target``) and the few library classes the
# shipped configs use are allowed.
ALLOWED_TARGET_PREFIXES = ("ldm.",)
ALLOWED_TARGETS = frozenset({"torch.nn.Identity"})
# keys that name something to build: ``target`` is what ``instantiate_from_config`` reads; the others are read by
# other libraries' instantiate helpers (Hydra, Lightning's CLI) and are held to the same rule
TARGET_KEYS = ("target", "_target_", "class_path")
_TRUSTED = contextvars.ContextVar("ldm_trusted_configs", default=False)
# the most nodes a YAML file may hold once its aliases are expanded (a "billion laughs" file stops here)
MAX_YAML_NODES = 200_000


class ConfigError(UsageError):
    """A YAML file (model config, method preset, table spec) cannot be used: the one-line message names the file
    (and the line, for syntax errors and duplicate keys)."""


class UntrustedConfigError(ConfigError):
    """A config names a ``target`` outside the allowed set (or tries to switch trust on) and the config was not
    marked as trusted."""


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


# --------------------------------------------------------------------------------------------------
# reading YAML: plain data only, duplicate keys refused, one-line errors naming the file and line
# --------------------------------------------------------------------------------------------------

class _StrictYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data: no ``!!python`` tags) that refuses duplicate keys, reads ``1e-4`` as a
    float (as OmegaConf does; YAML 1.1 wants a dot) and leaves dates as strings (as OmegaConf does)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor``: explicit keys override merged ones
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"a key must be a string or a number, not a {type(key).__name__}", key_node.start_mark) from None
                if seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"duplicate key {key!r} (first at line {first[key].line + 1}); a key may appear once in a "
                        "mapping", key_node.start_mark)
                first[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_StrictYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
_StrictYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _StrictYamlLoader.yaml_implicit_resolvers.items()}


def _expanded_nodes(root, where):
    """Nodes of a composed YAML document with every alias expanded; refuses recursive aliases and documents
    over :data:`MAX_YAML_NODES`."""
    memo, active = {}, set()

    def count(node):
        key = id(node)
        if key in memo:
            return memo[key]
        if key in active:
            raise ConfigError(f"{where}: line {node.start_mark.line + 1}: a recursive alias (a node that contains "
                              "itself) cannot be read")
        active.add(key)
        children = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        total = 1
        for child in children:
            total += count(child)
            if total > MAX_YAML_NODES:
                break
        active.discard(key)
        memo[key] = total
        return total

    n = count(root)
    if n > MAX_YAML_NODES:
        raise ConfigError(f"{where}: more than {MAX_YAML_NODES} values once its aliases (*name) are expanded; "
                          "that is no config")
    return n


def _yaml_error_line(err, what):
    """One line for a PyYAML error: 'line L, column C: problem'."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    tag = re.search(r"constructor for the tag '([^']*)'", problem)
    if tag:
        name = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        problem = (f"the tag {name} is not allowed: a {what} holds plain data (mappings, lists, strings, numbers), "
                   "never Python objects")
    elif getattr(err, "context", None) and "duplicate key" not in problem:
        problem = f"{problem} ({err.context})"
    problem = " ".join(problem.split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def read_yaml(path, what="YAML file", flag=None):
    """The plain data (dicts, lists, strings, numbers, None) of a YAML file.

    Every problem is a :class:`ConfigError` whose one-line message starts with the file (``flag`` first if
    given, e.g. ``--config x.yaml: ...``) and names the line where it has one: a missing or unreadable file, bytes
    that are not UTF-8 text, a syntax error, a duplicate key (never last-one-wins), a ``!!python`` (or other
    non-data) tag, a recursive alias or an alias bomb."""
    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{where} is a folder, not a {what}") from None
    except OSError as err:
        raise ConfigError(f"{where} cannot be read ({err.strerror or err})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        start = err.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data[:start].count(b"\n") + 1
        raise ConfigError(f"{where}: line {line}: byte 0x{data[start]:02x} at offset "
                          f"{start} is not UTF-8 text; a {what} is a YAML text file (binary data, or saved in "
                          "another encoding?)") from None
    loader = None
    try:
        loader = _StrictYamlLoader(text)  # checks the characters first
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_nodes(node, where)
        return loader.construct_document(node)
    except yaml.reader.ReaderError as err:  # a control character: no mark, a position in the text
        line = text[:err.position].count("\n") + 1
        raise ConfigError(f"{where}: line {line}: character #x{err.character:04x} is not allowed in YAML text "
                          f"({err.reason}); binary data?") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: {_yaml_error_line(err, what)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to be a {what}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _kind(value):
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value),
                                                                                            type(value).__name__)


def read_yaml_mapping(path, what="YAML file", flag=None):
    """:func:`read_yaml` of a file whose top level must be a mapping (``key: value`` lines); an empty file is ``{}``."""
    data = read_yaml(path, what, flag)
    if data is None:
        return {}
    if not isinstance(data, dict):
        where = f"{flag} {path}" if flag else str(path)
        raise ConfigError(f"{where}: the top level is a {_kind(data)} ({_short(data)}); a {what} is a mapping of "
                          "keys to values (key: value lines)")
    return data


def _short(value, n=40):
    text = repr(value)
    return text if len(text) <= n else text[:n - 3] + "..."


def resolve_yaml(data, where):
    """``data`` (plain or OmegaConf) with OmegaConf's interpolations (``${key}``, ``${oc.env:NAME}``, ...)
    resolved, as plain dicts and lists; a broken interpolation is a :class:`ConfigError` naming ``where``."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    try:
        node = data if type(data).__module__.startswith("omegaconf") else OmegaConf.create(data)
        return OmegaConf.to_container(node, resolve=True)
    except (OmegaConfBaseException, ValueError, TypeError, KeyError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{where}: {first}") from None


# --------------------------------------------------------------------------------------------------
# what a config may build
# --------------------------------------------------------------------------------------------------

def _untrusted(target, why=""):
    allowed = ", ".join(sorted(ALLOWED_TARGETS))
    return UntrustedConfigError(
        f"the config names target '{target}'{why}, which is neither a model class of this package (ldm.*) nor one "
        f"of the allowed library classes ({allowed}). A config is code: building it calls every target it "
        "names. If you trust this config, pass --trust_config (Python API: trust=True)")


def _is_buildable_class(obj):
    """A class this package defines for configs to build: a torch module, a dataset or a learning-rate schedule
    (never a function: ``instantiate_from_config`` or ``get_obj_from_str`` would build anything)."""
    if not isinstance(obj, type):
        return False
    import torch
    return (issubclass(obj, (torch.nn.Module, torch.utils.data.Dataset))
            or getattr(obj, "__module__", "") == "ldm.lr_scheduler")


def check_config_target(target, obj=None):
    """Raise :class:`UntrustedConfigError` unless ``target`` (a dotted path) may be built without trust.

    Allowed: the classes of :data:`ALLOWED_TARGETS`, and the torch modules, datasets and learning-rate schedules
    defined inside this package. The object is looked up (``obj``, or imported here: only modules of this package
    are imported) and must be such a class defined inside the package, so that neither a function
    (``ldm.util.instantiate_from_config``) nor a library object imported into a module (``ldm.inference.Path``)
    passes for one."""
    if _TRUSTED.get():
        return
    if not isinstance(target, str):
        raise _untrusted(_short(target), f" (a {_kind(target)}, not a dotted name)")
    if target in ALLOWED_TARGETS:  # exact names of fixed library classes
        return
    if not target.startswith(ALLOWED_TARGET_PREFIXES) or not re.fullmatch(r"[A-Za-z_][\w.]*", target) \
            or ".." in target or target.endswith("."):
        raise _untrusted(target)
    if obj is None:
        try:
            obj = get_obj_from_str(target)
        except (ImportError, AttributeError, ValueError) as err:
            raise UntrustedConfigError(f"the config names target '{target}', which cannot be found ({err})") from None
    module = getattr(obj, "__module__", None) or ""
    if not module.startswith(ALLOWED_TARGET_PREFIXES):
        raise _untrusted(target, f" (an object from {module or 'outside the package'})")
    if not _is_buildable_class(obj):
        what = "a function" if callable(obj) and not isinstance(obj, type) else (
            "a class that is no model, dataset or schedule" if isinstance(obj, type) else f"a {type(obj).__name__}")
        raise _untrusted(target, f" ({what})")


def _check_plain_config(node, where="", path="config"):
    """Walk plain (resolved) config data: every target key, any ``trust`` key, leftover interpolations."""
    stack = [(node, path)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, Mapping):
            for key in TARGET_KEYS:
                if key in node:
                    try:
                        check_config_target(node[key])
                    except UntrustedConfigError as err:
                        raise type(err)(f"{where}{err} (at {at}.{key})") from None
            if "trust" in node:
                raise UntrustedConfigError(
                    f"{where}{at}.trust: a config cannot switch trust on; only the caller can (--trust_config, "
                    "Python API trust=True)")
            stack.extend(reversed([(v, f"{at}.{k}") for k, v in node.items()]))  # in file order
        elif isinstance(node, (list, tuple)):
            stack.extend(reversed([(v, f"{at}[{i}]") for i, v in enumerate(node)]))
        elif isinstance(node, str) and "${" in node:
            raise UntrustedConfigError(
                f"{where}{at}: the value {_short(node)} still holds an interpolation after the config's "
                "interpolations were resolved (an escaped \\${...}?); it would be resolved again when the model is "
                "built. If you trust this config, pass --trust_config (Python API: trust=True)")


def check_config_targets(config, trust=False):
    """Check every target in a (nested) config before anything is built; ``trust=True`` skips it.

    The config is checked as it will be built: with its interpolations resolved (``${key}``, ``${oc.env:X}``), so
    a target cannot hide in a reference to another part of the file. Prefer :func:`checked_config`, which also
    returns that resolved config to build from."""
    checked_config(config, trust=trust)


def checked_config(config, trust=False, where=None):
    """``config`` (a dict or an OmegaConf node, whole file or a part) resolved and checked: a new ``DictConfig``
    without interpolations, so that what was checked is exactly what gets built.

    Unless ``trust`` (or inside :func:`trusted_configs`) every target key anywhere in it must pass
    :func:`check_config_target`, no mapping may hold a ``trust`` key and no value may still hold ``${``."""
    from omegaconf import OmegaConf
    prefix = f"{where}: " if where else ""
    plain = resolve_yaml(config, where or "config")
    if not (trust or _TRUSTED.get()):
        _check_plain_config(plain, prefix)
    return OmegaConf.create(plain)


def load_config_file(path, trust=False, flag=None, what="config", require_model=True):
    """The one way to read a model config file: read strictly (:func:`read_yaml_mapping`), interpolations resolved,
    every target checked (:func:`checked_config`); returns a ``DictConfig``. With ``require_model`` the file must
    have a ``model:`` mapping with a ``target`` (and ``params``, if given, a mapping), as every model config does.
    Errors are :class:`ConfigError` (a :class:`~ldm.inference.UsageError`) naming the file (after ``flag``, e.g.
    ``--config``, if given)."""
    where = f"{flag} {path}" if flag else str(path)
    config = checked_config(read_yaml_mapping(path, what, flag), trust=trust, where=where)
    if require_model:
        model = config.get("model")
        shape = "model: {target: ..., params: {...}} (as configs/stable-diffusion/*.yaml)"
        if model is None:
            raise ConfigError(f"{where}: no model: section (top-level keys: {sorted(map(str, config))}); a model "
                              f"{what} has {shape}")
        if not isinstance(model, Mapping):
            raise ConfigError(f"{where}: model: is a {_kind(model)} ({_short(model)}); it must be {shape}")
        if not isinstance(model.get("target"), str):
            raise ConfigError(f"{where}: model: has no target (the class to build); it must be {shape}")
        if model.get("params") is not None and not isinstance(model.get("params"), Mapping):
            raise ConfigError(f"{where}: model.params is a {_kind(model.get('params'))}; it must be a mapping")
    return config


def get_obj_from_str(string, reload=False):
    """Resolve a dotted path such as ``ldm.models.autoencoder.AutoencoderKL``."""
    module, cls = string.rsplit(".", 1)
    mod = importlib.import_module(module)
    if reload:
        mod = importlib.reload(mod)
    return getattr(mod, cls)


def instantiate_from_config(config, *, trust=False, **extra_kwargs):
    """Build ``config.target(**config.params)``, the CompVis way every YAML names its classes.

    Targets other than this package's model classes and :data:`ALLOWED_TARGETS` raise
    :class:`UntrustedConfigError` unless ``trust=True`` (which also covers the nested configs the constructors
    build) or the call happens inside :func:`trusted_configs`; so does a ``trust`` key among the params (only the
    caller's code can switch trust on)."""
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
    if "trust" in params and not _TRUSTED.get():
        raise UntrustedConfigError(f"the config of target '{target}' has a params.trust key: a config cannot switch "
                                   "trust on; only the caller can (--trust_config, Python API trust=True)")
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


# --------------------------------------------------------------------------------------------------
# numbers: one test for every numeric input, where it enters (command-line flags, presets, table specs)
# --------------------------------------------------------------------------------------------------
def _fmt_bound(v):
    return f"{v:g}" if isinstance(v, float) else str(v)


class NumberRange:
    """A finite number (``kind`` float or int) in a range. Used as the argparse ``type=`` of a numeric flag (parses
    the text, raises ``argparse.ArgumentTypeError`` with a message naming the range: argparse prints it with the
    flag and exits with status 2 before anything is loaded) and as the value test of preset keys and spec
    entries (:meth:`problem`). NaN and infinities are never in range: a NaN guidance scale, FreeU factor or
    exponent gives NaN latents, i.e. black images."""

    def __init__(self, kind=float, low=None, high=None, low_open=False, high_open=False, name=None):
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        self.__name__ = name or "number"  # argparse's name for the type

    def describe(self):
        noun = "an integer" if self.kind is int else "a number"
        lo, hi = self.low, self.high
        if lo is None and hi is None:
            return "a finite number" if self.kind is float else noun
        if lo is not None and hi is not None:
            return f"{noun} in {'(' if self.low_open else '['}{_fmt_bound(lo)}, {_fmt_bound(hi)}" \
                   f"{')' if self.high_open else ']'}"
        if lo is not None:
            if self.kind is int and lo == 1 and not self.low_open:
                return "a positive integer"
            if lo == 0 and self.low_open:
                return "a positive integer" if self.kind is int else "a positive number"
            return f"{noun} {'>' if self.low_open else '>='} {_fmt_bound(lo)}"
        return f"{noun} {'<' if self.high_open else '<='} {_fmt_bound(hi)}"

    def problem(self, value):
        """None when ``value`` (an already parsed value: YAML or Python) is in range, else why not."""
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.kind is int:
            ok_type = isinstance(value, int) and not isinstance(value, bool)
        if not ok_type or not math.isfinite(value):
            return f"{_short(value)} is not {self.describe()}"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"{_fmt_bound(value)} is not {self.describe()}"
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return f"{_fmt_bound(value)} is not {self.describe()}"
        return None

    def ok(self, value):
        return self.problem(value) is None

    def __call__(self, text):
        import argparse
        try:
            value = self.kind(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {self.describe()}") from None
        why = self.problem(value)
        if why:
            raise argparse.ArgumentTypeError(why)
        return value

    def __repr__(self):
        return self.__name__

    def check(self, value, what):
        """``value`` if in range, else :class:`UsageError` "``what`` <why>"."""
        why = self.problem(value)
        if why:
            raise UsageError(f"{what} {why}")
        return value


# argparse types (and value tests) of the numeric flags; every float flag of the scripts uses one of these
finite_float = NumberRange(name="finite_float")
positive_float = NumberRange(low=0, low_open=True, name="positive_float")
nonneg_float = NumberRange(low=0, name="nonneg_float")
unit_float = NumberRange(low=0, high=1, name="unit_float")
positive_int = NumberRange(int, low=1, name="positive_int")
nonneg_int = NumberRange(int, low=0, name="nonneg_int")


def float_range(low=None, high=None, low_open=False, high_open=False):
    """A :class:`NumberRange` of floats (e.g. ``float_range(1)``: a finite number >= 1)."""
    return NumberRange(float, low, high, low_open, high_open, name="float_range")


# --------------------------------------------------------------------------------------------------
# presets: a schema per method (next to its loader), one checker
# --------------------------------------------------------------------------------------------------
class Rule:
    """The rule of one preset key: ``test(value) -> bool`` and what a good value is (``wanted``, for the
    message); ``required``: the key must be given (not null)."""

    def __init__(self, test, wanted, required=False):
        self.test, self.wanted, self.required = test, wanted, required

    def __repr__(self):
        return f"Rule({self.wanted!r}{', required' if self.required else ''})"


def number_rule(numbers, required=False):
    """A :class:`Rule` from a :class:`NumberRange`."""
    return Rule(numbers.ok, numbers.describe(), required)


def choice_rule(*choices, required=False):
    return Rule(lambda v: not isinstance(v, bool) and v in choices, f"one of {', '.join(map(str, choices))}",
                required)


def bool_rule(required=False):
    # a string such as "no" or "false" is refused: only YAML's booleans (true/false, yes/no unquoted) are booleans
    return Rule(lambda v: isinstance(v, bool), "true or false", required)


def string_rule(required=False):
    return Rule(lambda v: isinstance(v, str), "a string", required)


def mapping_rule(keys, numbers, required=False):
    """A mapping with exactly ``keys``, each value in ``numbers`` (e.g. FreeU's {b1, b2, s1, s2})."""
    keys = tuple(keys)
    return Rule(lambda v: isinstance(v, dict) and set(v) == set(keys) and all(numbers.ok(v[k]) for k in keys),
                f"a mapping {{{', '.join(keys)}}} whose values are each {numbers.describe()}",
                required)


def nested_rule(schema, wanted, required=False):
    """A mapping whose keys and values pass ``schema`` (:func:`check_schema`)."""
    def test(v):
        if not isinstance(v, dict):
            return False
        try:
            check_schema(v, schema, "")
        except PresetSchemaError:
            return False
        return True
    return Rule(test, wanted, required)


def _stage_list(v):
    return (isinstance(v, list) and len(v) >= 1
            and all(isinstance(s, list) and len(s) == 2 and all(positive_int.ok(x) for x in s) for s in v))


BASE_MODELS = ("sd1", "sd2", "sdxl", "demo")  # ModelInfo.family: the models a preset can be made for

# value rules for the keys the method presets share (ScaleCrafter, FreeScale, FouriScale): key -> Rule. None (a key
# written without a value, or ``null``) passes unless the rule is required: the loaders take it as "the default"
PRESET_VALUE_RULES = {
    **{k: number_rule(positive_int) for k in ("height", "width", "base", "steps")},
    **{k: number_rule(nonneg_int) for k in (
        "dilate_tau", "ndcfg_tau", "disperse_tau", "restart_step", "start_step", "stop_step")},
    "scale": number_rule(finite_float),
    # exponents of the cosine factor in [0, 1]: a negative one divides by a factor that reaches ~1e-6
    **{k: number_rule(nonneg_float) for k in ("cosine_scale", "cosine_scale_bg")},
    "stopband": number_rule(unit_float),
    "weak_dilation_div": number_rule(float_range(1)),
    "eta": number_rule(unit_float),
    "stages": Rule(_stage_list, "a list of [height, width] pairs of positive integers"),
    **{k: bool_rule() for k in ("progressive", "fast_mode")},
    "base_model": choice_rule(*BASE_MODELS, required=True),
    **{k: string_rule() for k in ("method", "dilate_settings", "ndcfg_dilate_settings", "disperse_settings",
                                  "notes", "negative_prompt")},
    "freeu": mapping_rule(("b1", "b2", "s1", "s2"), nonneg_float),
}


class PresetSchemaError(ValueError):
    pass


def check_schema(cfg, schema, where, error=PresetSchemaError):
    """Check the mapping ``cfg`` against ``schema`` ({key: Rule or None}): no unknown keys, every required key given,
    every given value passing its rule. Raises ``error`` with a one-line message naming ``where`` (the file), the
    key and what is allowed."""
    unknown = {str(k) for k in cfg} - set(schema)
    if unknown:
        raise error(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(schema)}")
    for key, rule in schema.items():
        if rule is None:
            continue
        value = cfg.get(key)
        if value is None:
            if rule.required:
                raise error(f"{where}: {key} is required ({rule.wanted})")
            continue
        if not rule.test(value):
            raise error(f"{where}: {key}: {_short(value)} is not {rule.wanted}")


def load_yaml_preset(path, known_keys, what, folder, error=ValueError):
    """A method preset (plain YAML data, no targets) as a dict with ``_path``.

    ``known_keys``: the method's schema ({key: :class:`Rule` or None}), or a set of key names checked with the
    shared rules (:data:`PRESET_VALUE_RULES`). A missing or unreadable file, a YAML error (syntax, duplicate key,
    ``!!python`` tag), a top level that is not a mapping, an unknown key, a missing required key (``base_model``)
    or a value of the wrong type or range (e.g. ``base: 0``, ``cosine_scale: -5``, ``scale: .nan``) raises
    ``error`` with a one-line message naming the file (and the key, or the line)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} preset {path}: {missing_file_reason(path)} (presets are in {folder})")
    try:
        cfg = resolve_yaml(read_yaml_mapping(path, f"{what} preset"), str(path))
    except ConfigError as err:
        raise error(str(err)) from None
    schema = known_keys if isinstance(known_keys, Mapping) else {k: PRESET_VALUE_RULES.get(k) for k in known_keys}
    check_schema(cfg, schema, path, error)
    cfg["_path"] = path
    return cfg


def missing_file_reason(path):
    """Why ``path`` is not a file to read: "is a folder, not a file", or "no such file"."""
    path = Path(path)
    if path.is_dir():
        return "is a folder, not a file"
    return "no such file"


def check_side(v, f, name="--H", source=None):
    """One image side must be a positive multiple of the first stage's downsampling factor f. ``name``: what to
    call it in the message (the flag, or a preset's key); ``source``: where it came from (e.g. the preset file)."""
    where = f"{source}: " if source else ""
    if v <= 0:
        raise UsageError(f"{where}{name} {v}: the image side must be a positive multiple of {f} (the latent "
                         f"downsampling factor --f), e.g. 512")
    if v % f:
        lo = max(f, (v // f) * f)
        raise UsageError(f"{where}{name} {v} is not a multiple of {f} (the latent downsampling factor --f); "
                         f"nearest valid sizes: {lo} or {lo + f}")


def check_size(H, W, f, names=("--H", "--W"), source=None):
    """Both sides of an image (:func:`check_side`)."""
    for name, v in zip(names, (H, W)):
        check_side(v, f, name, source)


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
