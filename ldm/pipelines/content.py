"""Content keys: which version of the files and of the code a sampling run depends on.

Finished work (a sweep's images, a table job) must be recognised by what made it, not by the paths it was made
from: retraining writes a new checkpoint at the same path (the README's retraining command does), a preset or
the settings file it names can be edited in place, and the method's code changes. :func:`content_keys` keys a
run by

* the checkpoint (``--ckpt``) and every other option that names a file (``--sr_ckpt``, ``--init_image``, ...):
  a file of up to :data:`SMALL_FILE_BYTES` by the sha256 of all of it; a larger one by its size, its modification
  time and the sha256 of its first and last MiB (a PyTorch checkpoint ends with the zip directory, which holds
  the CRC-32 of every tensor; the modification time catches a rewrite that leaves both ends alike);
* the config (``--config``), the method's preset and every file the preset names (settings files), by content;
* the method's code: the sha256 of each module that defines it (the modules of its class and base classes under
  ``ldm/methods``, and every module of its package), taken over the syntax tree without docstrings and comments,
  so that rewording does not re-key a run and a change of code does; plus a ``version`` attribute where a method
  class sets one.

The sweeps record these keys in their settings (``ldm/pipelines/txt2img.py run_settings``: a sweep resumed with
other files or code is refused, naming what changed); the table runner keys its jobs by them
(``ldm/evaluation/tables/plan.py``) and says what changed when it samples a job again. :func:`describe_changes`
says what differs between two keys.
"""
from __future__ import annotations

import ast
import hashlib
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL_FILE_BYTES = 16 << 20  # hashed whole up to this size (the demo checkpoint, configs, presets, settings)
EDGE_BYTES = 1 << 20         # a larger file: the first and the last MiB
# options that name no input file of the images, or whose files are keyed elsewhere (the prompts by their text)
NOT_INPUT_FILES = {"outdir", "from_file", "prompt", "negative_prompt", "config", "ckpt", "device", "method"}

_fingerprints: Dict[tuple, Dict] = {}
_modules: Dict[tuple, str] = {}


def display_path(path, base=None) -> str:
    """``path`` as keys name it: relative to the repository when inside it, else absolute (so that the same file
    given as a relative or an absolute path has one name)."""
    p = Path(path)
    if not p.is_absolute():
        p = Path(base or os.getcwd()) / p
    p = Path(os.path.normpath(p))
    try:
        return p.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return p.as_posix()


def file_fingerprint(path, base=None) -> Dict:
    """The content key of one file (see the module docstring); ``{"file": ..., "missing": True}`` if there is none."""
    p = Path(path)
    if not p.is_absolute() and base is not None:
        p = Path(base) / p
    name = display_path(p)
    try:
        st = os.stat(p)
    except OSError:
        return {"file": name, "missing": True}
    if p.is_dir():  # a model folder (diffusers layout): every file in it, by its path inside the folder
        files = sorted(f for f in p.rglob("*") if f.is_file())
        parts = [(f.relative_to(p).as_posix(), file_fingerprint(f)) for f in files]
        digest = hashlib.sha256(repr([(rel, {k: v for k, v in fp.items() if k != "file"}) for rel, fp in parts])
                                .encode()).hexdigest()
        return {"file": name, "folder": True, "files": len(parts), "sha256": digest}
    memo = (str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)  # ctime: any write
    if memo not in _fingerprints:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            if st.st_size <= SMALL_FILE_BYTES:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
                fp = {"size": st.st_size, "sha256": h.hexdigest()}
            else:
                h.update(fh.read(EDGE_BYTES))
                fh.seek(st.st_size - EDGE_BYTES)
                h.update(fh.read(EDGE_BYTES))
                fp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_tail_sha256": h.hexdigest()}
        _fingerprints[memo] = fp
    return {"file": name, **_fingerprints[memo]}


def module_digest(path) -> str:
    """sha256 of a Python module's syntax tree without docstrings (comments and layout are not in the tree)."""
    p = Path(path)
    st = os.stat(p)
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if memo not in _modules:
        tree = ast.parse(p.read_text(encoding="utf-8"), str(p))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                    isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                    isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        _modules[memo] = hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()
    return _modules[memo]


def code_files(cls) -> List[Path]:
    """The modules that define method class ``cls``: those of its class hierarchy under ``ldm.methods`` and, for a
    method in a package (``ldm/methods/scalecrafter/``), every module of the package."""
    files = set()
    for k in cls.__mro__:
        mod = sys.modules.get(k.__module__)
        if mod is None or not k.__module__.startswith("ldm.methods") or not getattr(mod, "__file__", None):
            continue
        files.add(Path(mod.__file__).resolve())
        parts = k.__module__.split(".")
        if len(parts) >= 3:
            pkg = Path(sys.modules["ldm.methods"].__file__).resolve().parent / parts[2]
            if pkg.is_dir():
                files.update(f.resolve() for f in pkg.rglob("*.py"))
    return sorted(files)


def code_version(cls) -> Dict[str, str]:
    """{module (repository path): digest} of :func:`code_files`, plus ``version`` if the class sets one."""
    out = {display_path(f): module_digest(f) for f in code_files(cls)}
    if getattr(cls, "version", None) is not None:
        out["version"] = str(cls.version)
    return out


def _named_files(value, folder: Path) -> List[Path]:
    """The files a preset's values name (paths relative to the preset's folder, or absolute)."""
    if isinstance(value, dict):
        return [f for k, v in value.items() if not str(k).startswith("_") for f in _named_files(v, folder)]
    if isinstance(value, (list, tuple)):
        return [f for v in value for f in _named_files(v, folder)]
    if isinstance(value, str) and value and "\n" not in value and len(value) < 4096:
        p = Path(value) if os.path.isabs(value) else folder / value
        try:
            if p.is_file():
                return [p]
        except OSError:
            pass
    return []


def preset_files(method_cls, path, base=None) -> Dict[str, Dict]:
    """{file: fingerprint} of a preset and of every file it names (its settings files)."""
    p = Path(path)
    if not p.is_absolute() and base is not None:
        p = Path(base) / p
    out = {}
    fp = file_fingerprint(p)
    out[fp["file"]] = fp
    try:
        preset = method_cls.read_preset(p)
    except Exception:  # a preset that does not load is an error of the run, reported where it is read
        return out
    for f in _named_files(preset, p.parent):
        fp = file_fingerprint(f)
        out[fp["file"]] = fp
    return out


def content_keys(opt, method_cls, base=None) -> Dict:
    """The content key of a txt2img run with options ``opt`` and method class ``method_cls`` (module docstring).
    Relative paths are taken from ``base`` (default: the working directory)."""
    preset_dest = (method_cls.preset_flag or "")[2:] or None
    preset = getattr(opt, preset_dest, None) if preset_dest else None
    files = {}
    for dest, value in sorted(vars(opt).items()):
        if dest in NOT_INPUT_FILES or dest == preset_dest:
            continue
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, str) and v:
                p = Path(v) if os.path.isabs(v) or base is None else Path(base) / v
                if p.is_file():
                    files[f"--{dest}"] = file_fingerprint(p)
    out = {"ckpt": file_fingerprint(opt.ckpt, base) if getattr(opt, "ckpt", None) else None,
           "config": file_fingerprint(opt.config, base), "files": files,
           "preset": preset_files(method_cls, preset, base) if preset else {},
           "code": code_version(method_cls)}
    return out


def _file_change(old: Optional[Dict], new: Optional[Dict]) -> Optional[str]:
    if old == new:
        return None
    if not old or not new:
        return "added" if not old else "removed"
    if old.get("missing") or new.get("missing"):
        return "missing before" if old.get("missing") else "missing now"
    what = [w for k, w in (("file", "path"), ("size", "size"), ("sha256", "content"), ("head_tail_sha256", "content"),
                           ("mtime_ns", "modification time")) if old.get(k) != new.get(k)]
    return " and ".join(dict.fromkeys(what)) or "fingerprint"


def describe_changes(old: Optional[Dict], new: Dict) -> List[str]:
    """What differs between two content keys, one phrase per file or module (empty if nothing does); ``old``
    None: a key recorded before content keys existed."""
    if old is None:
        return ["it was made before content keys were recorded (which checkpoint, config, preset and method code "
                "made it is unknown)"]
    out = []
    for key, label in (("ckpt", "the checkpoint"), ("config", "the config")):
        o, n = old.get(key), new.get(key)
        change = _file_change(o, n)
        if change:
            out.append(f"{label} {(n or o or {}).get('file', '?')} changed ({change})")
    for key, label in (("preset", "preset file"), ("files", "the file of")):
        o, n = old.get(key) or {}, new.get(key) or {}
        for name in sorted(set(o) | set(n)):
            change = _file_change(o.get(name), n.get(name))
            if change:
                what = f"{label} {name}"
                if key == "files":
                    what += f" ({(n.get(name) or o.get(name))['file']})"
                out.append(f"{what} changed ({change})")
    o, n = old.get("code") or {}, new.get("code") or {}
    changed = sorted(m for m in set(o) | set(n) if o.get(m) != n.get(m))
    if changed:
        out.append("the method's code changed (" + ", ".join(changed) + ")")
    return out
