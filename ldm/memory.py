"""Memory the run may still use, and weights that wait in host memory while they are not needed.

* :func:`available_bytes`: what a new allocation on a device can still get. CUDA: the driver's free memory plus
  what PyTorch's caching allocator holds unused, within the per-process cap
  (``torch.cuda.set_per_process_memory_fraction``, which ``scripts/benchmark.py --cap_gib`` sets); CPU:
  ``MemAvailable`` of /proc/meminfo, within the cgroup's limit. The decoding plan
  (``ldm/modules/vae_memory.py``), the window batches and the ``--lowvram`` decisions read it; tests replace it
  (``monkeypatch.setattr(ldm.memory, "available_bytes", ...)``) to simulate a small card.
* :class:`HostWeights`: the parameters and buffers of a module kept in host memory (pinned when CUDA is there),
  copied to the device for a call and dropped there afterwards (inference weights never change, so nothing is
  copied back). :func:`offload_text_encoders` uses it for the text encoders (``--lowvram``: on the device only
  while prompts are encoded), :class:`SequentialOffload` for the UNet's blocks (``--sequential_offload``: each
  top-level block on the device only for its own forward).
* :func:`fitting_batch`: how many items of a batch (windows) fit the memory, from an estimate of one item.
"""
from contextlib import contextmanager
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn

GiB = 2 ** 30


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_available() -> Optional[int]:
    """Limit minus usage of this process's memory cgroup (v2, else v1); None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2 ** 60:
            return max(0, limit - usage)
    return None


def available_bytes(device) -> Optional[int]:
    """Bytes a new allocation on ``device`` can still get (None where unknown: MPS, or no /proc)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        allocated = torch.cuda.memory_allocated(index)
        cached = torch.cuda.memory_reserved(index) - allocated  # reusable without asking the driver
        avail = free + cached
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if fraction is not None:
            f = fraction(index)
            if f < 1.0:
                avail = min(avail, int(f * total) - allocated)
        return max(0, int(avail))
    if device.type == "cpu":
        found = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
        return min(found) if found else None
    return None


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared tensors once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------------------------------------
# weights in host memory


class HostWeights:
    """The tensors of ``module`` live in host memory; :meth:`load` puts copies on ``device`` (new Parameters,
    frozen: this is for inference), :meth:`drop` puts the host copies back.

    Host copies are pinned when CUDA is available, so the copies to the device are asynchronous on the
    current stream (kernels queued after them see the weights; the caching allocator reuses the device memory
    only after the stream has passed). ``moves`` counts the loads (tests, benchmarks).
    """

    def __init__(self, module: nn.Module, device, pin: Optional[bool] = None):
        self.module = module
        self.device = torch.device(device)
        self.host = torch.device("cpu")
        if pin is None:
            pin = self.device.type == "cuda" and torch.cuda.is_available()
        self.slots: List[tuple] = []  # (owner module, name, is_parameter, host tensor)
        seen: Dict[int, torch.Tensor] = {}
        for m in module.modules():
            for kind, table in (("p", m._parameters), ("b", m._buffers)):
                for name, t in table.items():
                    if t is None:
                        continue
                    key = id(t)
                    if key not in seen:
                        h = t.detach().to(self.host)
                        if pin and not h.is_pinned():
                            h = h.pin_memory()
                        seen[key] = h
                    self.slots.append((m, name, kind, seen[key], key))
        self.loaded = False
        self.moves = 0
        self.drop()

    def _assign(self, tensors: Dict[int, torch.Tensor]):
        params: Dict[int, nn.Parameter] = {}  # a tensor shared by several modules stays one Parameter
        for m, name, kind, _, key in self.slots:
            if kind == "p":
                if key not in params:
                    params[key] = nn.Parameter(tensors[key], requires_grad=False)
                m._parameters[name] = params[key]
            else:
                m._buffers[name] = tensors[key]

    def load(self):
        if self.loaded:
            return
        copies = {}
        for _, _, _, h, key in self.slots:
            if key not in copies:
                copies[key] = h.to(self.device, non_blocking=True)
        self._assign(copies)
        self.loaded = True
        self.moves += 1

    def drop(self):
        self._assign({key: h for _, _, _, h, key in self.slots})
        self.loaded = False

    def restore(self):
        """Back to an ordinary module on ``device`` (undo)."""
        self.loaded = False
        self.load()
        self.moves -= 1

    @contextmanager
    def lent(self):
        """On the device for the block, in host memory after it."""
        self.load()
        try:
            yield
        finally:
            self.drop()

    @contextmanager
    def lent_back(self):
        """In host memory for the block (already dropped), back on the device after it."""
        try:
            yield
        finally:
            self.load()


def text_encoders(model) -> List[nn.Module]:
    """The text-encoding modules of a LatentDiffusion (``cond_stage_model``) or SDXL model (``conditioner``)."""
    out = []
    for name in ("cond_stage_model", "conditioner"):
        m = getattr(model, name, None)
        if isinstance(m, nn.Module) and any(True for _ in m.parameters()):
            out.append(m)
    return out


class offload_text_encoders:
    """``--lowvram``: the model's text encoders wait in host memory and come to ``device`` only while
    ``model.get_learned_conditioning`` runs (every caller goes through it). Use as a context manager or call
    :meth:`remove`; ``weights`` is the list of :class:`HostWeights`."""

    def __init__(self, model, device):
        self.model = model
        self.weights = [HostWeights(m, device) for m in text_encoders(model)]
        original = type(model).get_learned_conditioning

        def encode(c, *args, **kwargs):
            for w in self.weights:
                w.load()
            try:
                return original(model, c, *args, **kwargs)
            finally:
                for w in self.weights:
                    w.drop()
        model.get_learned_conditioning = encode

    def remove(self):
        self.model.__dict__.pop("get_learned_conditioning", None)
        for w in self.weights:
            w.restore()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def unet_units(unet) -> List[nn.Module]:
    """The UNet's top-level blocks in call order: what :class:`SequentialOffload` moves one at a time."""
    units = []
    for name in ("time_embed", "label_emb"):
        m = getattr(unet, name, None)
        if isinstance(m, nn.Module):
            units.append(m)
    units += list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks) + [unet.out]
    return units


class SequentialOffload:
    """``--sequential_offload``: every top-level block of the UNet waits in host memory and is copied to
    ``device`` just before its forward (a forward pre-hook) and dropped after it (a forward hook), so the
    device holds one block's weights at a time besides the activations. Per-call processors (re-dilation,
    scale fusion, ...) run inside their block's forward and see its weights on the device. ``remove()``
    puts the whole UNet back on the device."""

    def __init__(self, unet: nn.Module, device, units: Optional[Iterable[nn.Module]] = None):
        self.unet = unet
        self.units = list(units) if units is not None else unet_units(unet)
        covered = {id(p) for u in self.units for p in u.parameters()}
        rest = [p for p in unet.parameters() if id(p) not in covered]
        if rest:
            raise ValueError(f"{len(rest)} UNet parameters are outside the offloaded blocks")
        self.weights = [HostWeights(u, device) for u in self.units]
        self.hooks = []
        for u, w in zip(self.units, self.weights):
            self.hooks.append(u.register_forward_pre_hook(lambda mod, args, w=w: w.load()))
            self.hooks.append(u.register_forward_hook(lambda mod, args, out, w=w: w.drop()))

    @property
    def moves(self):
        return sum(w.moves for w in self.weights)

    def remove(self):
        for h in self.hooks:
            h.remove()
        for w in self.weights:
            w.restore()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def fitting_batch(requested: int, item_bytes: float, device, reserve: float = 0.0) -> int:
    """How many of ``requested`` items (each estimated at ``item_bytes`` on ``device``) to run at once: all when
    the memory is unknown or enough, else as many as fit in the available memory less ``reserve`` bytes and a
    10 % margin, at least one."""
    if requested <= 1 or item_bytes <= 0:
        return max(1, int(requested))
    avail = available_bytes(device)
    if avail is None:
        return int(requested)
    fit = int(max(0.0, avail * 0.9 - reserve) // item_bytes)
    return max(1, min(int(requested), fit))
