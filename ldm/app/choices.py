"""What the page offers, all read from the repository and the registries (nothing listed by hand).

* models: every checkpoint under ``checkpoints/`` paired with its config (a ``NAME.yaml`` beside it, the
  original configs of the known release files, or a unique ``configs/**/NAME.yaml``), plus ``--model
  CONFIG=CKPT`` pairs; the demo model first (it ships with the repository);
* methods: ``ldm.methods`` (names, labels, presets under ``configs/<preset_dir>/`` for the model, own options
  described from the method's argument group);
* samplers: ``ldm.samplers.SAMPLERS``;
* sizes: multiples of the model's training size and the sizes of its presets.
"""
import argparse
import threading
from dataclasses import dataclass
from pathlib import Path

from ldm import methods
from ldm.errors import UsageError
from ldm.methods.cascade import CascadeMethod

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = "configs/demo/shapes32.yaml"
DEMO_CKPT = "checkpoints/demo/shapes32.ckpt"
# the release files of checkpoints/README.md and their original configs
KNOWN_CONFIGS = {
    "v2-1_512-ema-pruned": "configs/stable-diffusion/v2-inference.yaml",
    "v2-1_768-ema-pruned": "configs/stable-diffusion/v2-inference-v.yaml",
    "v1-5-pruned-emaonly": "configs/stable-diffusion/v1-inference.yaml",
    "sd_xl_base_1.0": "configs/stable-diffusion/sdxl-base-inference.yaml",
}
WEIGHT_SUFFIXES = (".ckpt", ".safetensors")
SIZE_FACTORS = (1, 2, 2.5, 4)  # square sizes offered, times the training side (and 2x4 wide)


@dataclass(frozen=True)
class Model:
    id: str        # the checkpoint path as shown (relative to the repository when inside it)
    config: Path
    ckpt: Path

    @property
    def label(self):
        return f"{self.ckpt.name} ({shown(self.config)})"


def shown(path):
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def config_for(ckpt, root):
    """The config of a checkpoint file, or None."""
    beside = ckpt.with_suffix(".yaml")
    if beside.is_file():
        return beside
    if ckpt.stem in KNOWN_CONFIGS:
        return root / KNOWN_CONFIGS[ckpt.stem]
    same_name = sorted((root / "configs").rglob(f"{ckpt.stem}.yaml"))
    return same_name[0] if len(same_name) == 1 else None


def find_models(root=REPO_ROOT, checkpoints=None, extra=()):
    """(models, notes): the (config, checkpoint) pairs found, the demo model first, and one note per checkpoint
    left out (no config, the x4 upscaler, a config that does not load)."""
    from ldm.upscaler import is_upscaler_config
    from ldm.util import load_config_file
    root = Path(root)
    folder = Path(checkpoints) if checkpoints else root / "checkpoints"
    pairs = [(Path(c), Path(k)) for c, k in extra]
    files = sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    notes = []
    for ckpt in files:
        config = config_for(ckpt, root)
        if config is None:
            notes.append(f"{shown(ckpt)}: no config found (put NAME.yaml beside it, or start the app with "
                         f"--model CONFIG={shown(ckpt)})")
            continue
        pairs.append((config, ckpt))
    demo = (root / DEMO_CONFIG, root / DEMO_CKPT)
    pairs.sort(key=lambda p: (p[1].resolve() != demo[1].resolve(), shown(p[1])))
    models, seen = [], set()
    for config, ckpt in pairs:
        key = (config.resolve(), ckpt.resolve())
        if key in seen:
            continue
        seen.add(key)
        if not config.is_file():
            notes.append(f"{shown(ckpt)}: its config {shown(config)} does not exist")
            continue
        try:
            loaded = load_config_file(config)
        except UsageError as err:
            notes.append(f"{shown(ckpt)}: {err}")
            continue
        if is_upscaler_config(loaded):
            notes.append(f"{shown(ckpt)}: the x4 upscaler (used by the sdsr method: --sr_ckpt)")
            continue
        models.append(Model(id=shown(ckpt), config=config.resolve(), ckpt=ckpt.resolve()))
    return models, notes


def parse_defaults():
    """txt2img's options at their defaults."""
    from ldm.pipelines.txt2img import build_parser
    return build_parser().parse_args([])


def model_info(model):
    """The ModelInfo of a model's config (no weights loaded)."""
    from ldm.pipelines import txt2img
    from ldm.util import load_config_file
    return txt2img.model_info(parse_defaults(), load_config_file(model.config), model.config)


def preset_base(info):
    """The ``base_model`` of the presets made for this model: demo (pixel space, f = 1), sd1, sd2 or sdxl."""
    return "demo" if info.f == 1 else info.family


def describe_option(action):
    """One of a method's own options as the page shows it."""
    if isinstance(action, argparse.BooleanOptionalAction):
        kind = "toggle"
    elif action.nargs == 0:
        kind = "flag"
    elif action.choices:
        kind = "choice"
    elif action.nargs not in (None, "?"):
        kind = "list"
    elif action.type is int:
        kind = "int"
    elif action.type is float:
        kind = "float"
    else:
        kind = "text"
    default = action.default
    return {"dest": action.dest, "flag": action.option_strings[0], "kind": kind,
            "default": list(default) if isinstance(default, (list, tuple)) else default,
            "choices": list(action.choices) if action.choices else None, "nargs": action.nargs,
            "help": (action.help or "").replace("%%", "%")}


def method_options(cls):
    """The method's own options (its argument group), less its preset flag (the page's preset list)."""
    p = argparse.ArgumentParser(add_help=False)
    cls.add_args(p)
    return [describe_option(a) for a in p._actions if a.option_strings and a.option_strings[0] != cls.preset_flag]


def describe_methods():
    out = []
    for name in methods.names():
        cls = methods.method_class(name)
        out.append({"name": name, "label": cls.label or name, "summary": cls.summary,
                    "preset_flag": cls.preset_flag, "img2img": bool(cls.img2img),
                    "cascade": issubclass(cls, CascadeMethod), "stages": "save_stages" in cls.accepts,
                    "options": method_options(cls), "img2img_refused": sorted(cls.img2img_refused)})
    return out


def sampler_flag():
    """The txt2img option that chooses the sampler, if the pipeline has one."""
    from ldm.pipelines.txt2img import build_parser
    actions = build_parser()._option_string_actions
    return "--sampler" if "--sampler" in actions else None


def describe_samplers():
    from ldm.samplers import SAMPLERS
    return {"names": list(SAMPLERS), "flag": sampler_flag()}


class Catalog:
    """The models found at start and, per model, its presets and sizes (computed once, then read-only)."""

    def __init__(self, root=REPO_ROOT, checkpoints=None, extra=()):
        self.root = Path(root)
        self.models, self.notes = find_models(self.root, checkpoints, extra)
        self._lock = threading.Lock()
        self._per_model = {}
        self._static = None

    def model(self, model_id):
        for m in self.models:
            if m.id == model_id:
                return m
        raise UsageError(f"model {model_id!r}: not one of the models found under checkpoints/ "
                         f"({', '.join(m.id for m in self.models) or 'none'})")

    def static(self):
        with self._lock:
            if self._static is None:
                self._static = {"models": [{"id": m.id, "label": m.label} for m in self.models],
                                "notes": list(self.notes), "methods": describe_methods(),
                                "img2img_methods": list(methods.img2img_names()), "samplers": describe_samplers(),
                                "default_model": self.models[0].id if self.models else None}
            return self._static

    def for_model(self, model_id):
        model = self.model(model_id)
        with self._lock:
            if model_id not in self._per_model:
                self._per_model[model_id] = self._describe_model(model)
            return self._per_model[model_id]

    def _describe_model(self, model):
        info = model_info(model)
        presets = {name: self.presets(methods.method_class(name), info) for name in methods.names()}
        sizes = []

        def add(h, w, label):
            if (h, w) not in [(s["H"], s["W"]) for s in sizes]:
                sizes.append({"H": int(h), "W": int(w), "label": label})
        step = info.f * 8
        for k in SIZE_FACTORS:
            side = max(step, int(round(info.base_px * k / step)) * step)
            add(side, side, f"{side}×{side}" + (" (training size)" if k == 1 else f" (×{k:g})"))
        add(2 * info.base_px, 4 * info.base_px, f"{2 * info.base_px}×{4 * info.base_px} (wide)")
        for name, items in presets.items():
            for item in items:
                if item["size"]:
                    add(*item["size"], f"{item['size'][0]}×{item['size'][1]} ({item['label']})")
        sizes.sort(key=lambda s: (s["H"] * s["W"], s["W"]))
        return {"family": info.family, "f": info.f, "base_px": info.base_px, "sizes": sizes, "presets": presets,
                "default_size": [info.side if info.f != 1 else info.base_px] * 2}

    def presets(self, cls, info):
        """The method's preset files made for this model: [{path, label, size, suggested}]."""
        if not cls.preset_flag or not cls.preset_dir:
            return []
        out = []
        for path in sorted((self.root / "configs" / cls.preset_dir).glob("*.yaml")):
            try:
                preset = cls.read_preset(path)
                base = preset.get("base_model")
                if base is not None and base != preset_base(info):
                    continue
                opt = parse_defaults()
                setattr(opt, cls.preset_flag.lstrip("-"), str(path))
                size = cls.preset_size(opt, info)
            except (UsageError, ValueError, OSError):
                continue  # a preset that does not load is not offered (the command line reports it)
            suggested = {k: preset[k] for k in ("steps", "scale", "eta") if isinstance(preset.get(k), (int, float))}
            out.append({"path": shown(path), "label": path.stem,
                        "size": list(size) if size and None not in size else None, "suggested": suggested})
        return out
