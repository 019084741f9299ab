"""Helpers shared by the sampling scripts: model loading, size checks, prompt files, image writing."""
import json
import os
import random
import re
import secrets
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo


from ldm.errors import InputWarning, UsageError  # noqa: F401  (re-exported: the scripts' import path)
from ldm.util import cast_for_half_precision, check_size, missing_file_reason  # noqa: F401  (re-exported)
# the argparse types of the numeric flags (finite numbers in a range; NaN and infinities are refused)
from ldm.util import (NumberRange, finite_float, float_range, nonneg_float, nonneg_int, positive_float,  # noqa: F401
                      positive_int, unit_float)


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def _gib(n):
    return f"{n / 2 ** 30:.1f} GiB"


def _read_int(path):
    try:
        text = Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None


def available_memory(device):
    """(bytes, where) a run can still allocate on ``device``, or None where it cannot be told. CUDA: the card's
    free memory; CPU: /proc/meminfo's MemAvailable, lowered to what a cgroup memory limit (a container's) leaves."""
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
        except Exception:  # no driver (fake CUDA), or an old torch
            return None
        return int(free), f"free on {device}"
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"))
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        lim, use = _read_int(limit), _read_int(usage)
        if lim is not None and use is not None and lim < 2 ** 60:
            found.append((max(lim - use, 0), f"the container's memory limit ({limit})"))
    return min(found) if found else None


def check_memory(estimate, device):
    """Refuse a run before anything is loaded when ``estimate`` = (bytes, what) of its largest single tensor
    (``Method.memory_estimate``) exceeds what ``device`` has available (:func:`available_memory`): such a run is
    killed by the kernel (CPU) or fails with out-of-memory (CUDA) after minutes, without a useful message."""
    need, what = estimate
    have = available_memory(device)
    if have is None or need <= have[0]:
        return
    raise UsageError(f"this run would need more memory than is available: {what} alone is about {_gib(need)}, "
                     f"and {_gib(have[0])} is available ({have[1]}); ask for a smaller size, aspect ratio or "
                     "--n_samples, or run on a machine with more memory")


# Seeds are 0 ... 2**63 - 1: torch takes seeds as 64-bit integers (it accepts -2**63 ... 2**64 - 1, but maps a
# negative seed s to 2**64 + s, so -1 and 2**64 - 1 would give the same images), the scripts add small offsets
# (seed + i for image i) that must not leave torch's range, and the sweep manifests and table specs store seeds
# as JSON integers that other tools read as signed 64-bit. A flag whose seed also goes to numpy's legacy
# RandomState (upscale.py --method sr) is limited to its 0 ... 2**32 - 1.
SEED_MAX = 2 ** 63 - 1
NUMPY_SEED_MAX = 2 ** 32 - 1


def check_seed(seed, flag="--seed", count=1, high=SEED_MAX):
    """Raise :class:`UsageError` (naming ``flag`` and the allowed range) unless ``seed`` and the ``count - 1``
    seeds after it (``seed + i``) are integers in 0 ... ``high``; returns ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise UsageError(f"{flag} {seed!r}: a seed is an integer in 0 ... {_power_text(high)}")
    last = int(seed) + max(int(count), 1) - 1
    if not 0 <= seed <= high or last > high:
        extra = f" (with the {count - 1} seeds after it: up to {last})" if count > 1 and 0 <= seed <= high else ""
        raise UsageError(f"{flag} {seed}{extra} is outside the allowed range 0 ... {_power_text(high)} "
                         f"({high}); choose a seed in that range")
    return int(seed)


def _power_text(high):
    return {SEED_MAX: "2**63 - 1", NUMPY_SEED_MAX: "2**32 - 1"}.get(high, str(high))


def seed_arg(text, high=SEED_MAX):
    """``type=`` of an argparse ``--seed`` flag: an integer in 0 ... 2**63 - 1 (argparse names the flag, prints
    the message and exits with status 2 before anything is loaded)."""
    import argparse
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (a seed is an integer in 0 ... "
                                         f"{_power_text(high)})") from None
    try:
        return check_seed(value, "", high=high)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err).strip()) from None


def numpy_seed_arg(text):
    """:func:`seed_arg` for a seed that also seeds numpy's legacy ``RandomState`` (0 ... 2**32 - 1)."""
    return seed_arg(text, NUMPY_SEED_MAX)


def seed_everything(seed):
    """Seed python, numpy and torch (all devices), like pytorch-lightning's seed_everything.
    ``seed`` must be in 0 ... 2**63 - 1 (:func:`check_seed`; UsageError otherwise)."""
    check_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def read_prompt_file(path, repeat=1):
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--from-file {path}: {missing_file_reason(path)}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        start = err.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data[:start].count(b"\n") + 1
        raise UsageError(f"--from-file {path} is not UTF-8 text: byte 0x{data[start]:02x} at offset {start} "
                         f"(line {line}) cannot be decoded; save the file as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UsageError(f"--from-file {path}: the file has no prompts (one prompt per non-empty line)")
    return [p for p in prompts for _ in range(repeat)]


def check_output_dir(folder, flag="--outdir"):
    """Fail early (before a model is loaded) if ``folder`` cannot be created or written; creates nothing.

    Catches a path that is an existing file, a path below a file, and a folder (or the nearest existing
    parent) that refuses writes: ``os.access``, then a real probe file, created and removed at once,
    because root passes ``os.access`` everywhere but still cannot write to read-only file systems."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder} is an existing file, not a folder; give a folder path "
                         "(or move the file away)")
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {folder} cannot be created: {existing} is a file, not a folder; "
                         "give a path inside a folder")
    reason = None
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "no write permission"
    else:
        try:
            fd, probe = tempfile.mkstemp(prefix=".tmp-writecheck-", dir=existing)
        except OSError as err:
            reason = err.strerror or str(err)
        else:
            os.close(fd)
            try:
                os.unlink(probe)
            except FileNotFoundError:  # removed meanwhile (another run cleaning its temporary files)
                pass
    if reason:
        if existing == folder:
            msg = f"{flag} {folder} is not writable ({reason})"
        else:
            msg = f"{flag} {folder} cannot be created: {existing} is not writable ({reason})"
        raise UsageError(msg + "; choose a folder you can write to")


def check_output_file(path, flag="--out"):
    """Fail early (before minutes of work) if the file ``path`` cannot be written: it is a folder, its folder cannot
    be created or written (:func:`check_output_dir`), or it exists and refuses writes. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file path (e.g. {path / 'result.json'})")
    check_output_dir(path.parent if str(path.parent) else Path("."), flag=f"{flag} {path}: its folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path} exists and is not writable; choose another file")


@contextmanager
def output_folder(folder):
    """Create ``folder`` (and its parents) for the block; when the block fails (an error found while sampling, Ctrl-C),
    remove the folders this call created that are still empty: a failed run leaves nothing behind."""
    folder = Path(folder)
    created = []
    probe = folder
    while not probe.exists():
        created.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for f in created:  # deepest first
            try:
                f.rmdir()
            except OSError:
                pass
        raise


def remove_stale_temp_files(folder):
    """Delete ``.tmp-*.png`` files that an earlier, killed run left between writing and renaming
    (``save_png``); returns how many were removed."""
    n = 0
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(".tmp-") and name.endswith(".png"):
                try:
                    os.unlink(os.path.join(folder, name))
                    n += 1
                except FileNotFoundError:
                    pass
    return n


def chunk(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def next_free_index(folder, pattern=r"^(\d+)\.png$"):
    """1 + the highest number already used in ``folder``: numbering continues, nothing is overwritten."""
    rx = re.compile(pattern)
    nums = [int(m.group(1)) for name in os.listdir(folder) if (m := rx.match(name))] if os.path.isdir(folder) else []
    return max(nums) + 1 if nums else 0


def to_pil(x):
    """A (C,H,W) tensor in [-1, 1] to an RGB PIL image."""
    x = torch.clamp((x.float() + 1.0) / 2.0, 0.0, 1.0)
    arr = (255.0 * x.permute(1, 2, 0).cpu().numpy()).round().astype(np.uint8)
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr)


def create_temp_file(directory, prefix=".tmp-", suffix=""):
    """Like ``tempfile.mkstemp`` (a new file, opened O_EXCL for writing; returns ``(fd, path)``), but with the
    permissions of a normal new file: ``0o666`` minus the umask (and the folder's default ACL, if any), not
    mkstemp's 0600. The kernel applies the umask when the file is created, so the umask is never read or
    changed here: reading it with ``os.umask`` means setting it, which races with other threads."""
    directory = os.fspath(directory)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name {prefix}*{suffix} in {directory}")


def fsync_directory(directory):
    """Make a rename into ``directory`` durable (POSIX). Where a folder cannot be opened or synced (Windows,
    some network file systems) this does nothing."""
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def png_info(metadata=None):
    """PNG text chunks of ``metadata``: strings as they are, anything else as sorted JSON."""
    info = PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(k, v if isinstance(v, str) else json.dumps(v, sort_keys=True))
    return info


def save_png(img, path, metadata=None, tmp_prefix=".tmp-"):
    """Write atomically (temp file + rename) with text metadata: an interrupted run leaves no partial file.

    The data is fsync'ed before the rename and the folder after it, so that after a crash or power loss the
    file is either absent or complete (never renamed but empty). The file gets the permissions of a normal
    new file (0666 minus the umask, see :func:`create_temp_file`). ``tmp_prefix`` names the temporary file
    (``ldm.pipelines.sweep`` puts its job's id in it)."""
    path = Path(path)
    info = png_info(metadata)
    fd, tmp = create_temp_file(path.parent, tmp_prefix, ".png")
    try:
        with os.fdopen(fd, "wb") as fh:
            img.save(fh, format="PNG", pnginfo=info)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_directory(path.parent)


def make_grid(images, n_rows):
    """Tile equally sized PIL images, ``n_rows`` images per row, 2 px padding."""
    n_rows = max(1, min(n_rows, len(images)))
    w, h = images[0].size
    cols = n_rows
    rows = (len(images) + cols - 1) // cols
    pad = 2
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (0, 0, 0))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


# ----------------------------------------------------------------------------------------------------------
# memory (--lowvram, --sequential_offload; ldm/memory.py)


def add_memory_args(parser):
    """The low-memory options shared by scripts/txt2img.py and scripts/upscale.py."""
    g = parser.add_argument_group("memory (the VAE decodes in one piece or in tiles, whichever fits the free memory)")
    g.add_argument("--lowvram", action="store_true",
                   help="keep the text encoders in host memory except while prompts are encoded (by default they "
                        "leave the GPU only when the sampling would not fit beside them)")
    g.add_argument("--sequential_offload", action="store_true",
                   help="keep the UNet's weights in host memory and copy each top-level block to the GPU for its "
                        "own forward only (slow: every step copies the whole UNet; for cards smaller than the "
                        "weights)")
    return g


def memory_scope(opt, model, device, latent_hw, batch, log=print):
    """A context for the sampling loop: the text encoders in host memory (``--lowvram``, or on CUDA when the
    UNet's activation estimate for ``batch`` latents of ``latent_hw`` (``ldm/modules/unet_memory.py``) does not fit
    the free memory beside them), the UNet's blocks offloaded (``--sequential_offload``). On the CPU the host
    is the device: the flags change nothing there but are applied (tests count the moves)."""
    from contextlib import ExitStack
    from ldm import memory
    stack = ExitStack()
    lowvram = getattr(opt, "lowvram", False)
    encoders = memory.text_encoders(model)
    if not lowvram and encoders and torch.device(device).type == "cuda":
        from ldm.modules.unet_memory import unet_peak_bytes
        unet = model.model.diffusion_model
        e = 4 if next(unet.parameters()).dtype == torch.float32 and opt.precision == "full" else 2
        need = unet_peak_bytes(unet, latent_hw, 2 * batch, e) * 1.1 + 768 * 2 ** 20
        avail = memory.available_bytes(device)
        if avail is not None and need > avail:
            lowvram = True
            log(f"the sampling needs about {need / 2 ** 30:.1f} GiB and {avail / 2 ** 30:.1f} GiB are free: the text "
                "encoders wait in host memory except while prompts are encoded (as with --lowvram)")
    if lowvram and encoders:
        stack.enter_context(memory.offload_text_encoders(model, device))
    if getattr(opt, "sequential_offload", False):
        stack.enter_context(memory.SequentialOffload(model.model.diffusion_model, device))
    return stack
