"""Peak GPU memory of a run, estimated on a machine without a GPU.

Tensors are PyTorch "fake" tensors on a ``cuda`` device: every operation computes only the shape, dtype and
device of its result, so a 4096² SDXL sampling step costs seconds on a CPU and no memory. A dispatch mode
counts the bytes of every CUDA storage from its creation until Python frees it (rounded up to the caching
allocator's 512-byte granularity), which is what ``torch.cuda.max_memory_allocated`` measures on a real GPU,
with these differences (all make the estimate a lower bound):

* kernel workspaces that PyTorch does not expose as tensors (cuDNN convolution workspaces, the small
  softmax statistics of flash attention) are not counted;
* the caching allocator's fragmentation (reserved minus allocated) is not modelled.

Autocast is switched on through PyTorch's low-level switches, since ``torch.autocast("cuda")`` disables
itself when no CUDA driver is present; the operator dtype rules are then the real ones.

    with FakeCuda() as fc:
        with torch.device("cuda"):
            model = build()                 # parameters are fake CUDA tensors
        with fc.tracking(), fc.autocast(torch.float16):
            model(x)
        print(fc.peak_bytes)
"""
import weakref
from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["FakeCuda", "LiveCudaBytes", "KnownValues", "cast_parameters_", "fused_attention", "move_parameters_",
           "unset_fake_temporarily"]

ALLOCATOR_GRANULARITY = 512  # bytes: the CUDA caching allocator rounds every block up to this


def _rounded(nbytes: int) -> int:
    return -(-nbytes // ALLOCATOR_GRANULARITY) * ALLOCATOR_GRANULARITY


class LiveCudaBytes(TorchDispatchMode):
    """Counts the bytes of live CUDA storages created while active (and those registered with ``add``).
    ``device_type="cpu"`` counts real host tensors instead (the tensor memory of a CPU run, measured)."""

    def __init__(self, device_type="cuda"):
        super().__init__()
        self.device_type = device_type
        self.current = 0
        self.peak = 0
        self._live = {}  # id(storage) -> bytes; a weakref finalizer removes the entry when it is freed

    def add(self, t: torch.Tensor):
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
            return
        st = t.untyped_storage()
        key = id(st)
        if key in self._live:  # a view of a storage already counted
            return
        n = _rounded(st.nbytes())
        self._live[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def _free(self, key):
        self.current -= self._live.pop(key, 0)

    def reset_peak(self):
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.add(t)
        return out


class KnownValues(TorchDispatchMode):
    """The values of the small fake tensors that can be known: an operation whose tensor inputs all have known
    values (real tensors, or fake ones recorded here) and whose result is small (at most ``limit`` elements) is
    also computed on real CPU tensors, and that result is kept beside the fake one. Reading a scalar of such a
    tensor (``float(t[0])``, ``int(t)``, ``.item()``) then gives the real number instead of the fake mode's
    DataDependentOutputException. This covers what a method reads to decide what to do: the timestep of the
    sampler's timestep batch (``torch.full((b,), t)``), random draws from a CPU generator (``torch.randint(...,
    generator=g)``, which advance ``g`` as a real run does). An in-place operation forgets its inputs' values."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}

    def __init__(self, limit=4096):
        super().__init__()
        self.limit = limit
        self._values = {}  # id(fake tensor) -> real CPU tensor; a weakref finalizer removes the entry

    def value(self, t):
        """The real CPU tensor of ``t``'s values, or None where they are not known."""
        if not isinstance(t, torch.Tensor):
            return None
        if not is_fake(t):
            return t
        return self._values.get(id(t))

    def _record(self, t, real):
        key = id(t)
        if key not in self._values:
            weakref.finalize(t, self._values.pop, key, None)
        self._values[key] = real

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.READS and self.value(args[0]) is not None:
            with unset_fake_temporarily():
                return func(self.value(args[0]))
        out = func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        if func._schema.is_mutable:
            for a in flat:
                if isinstance(a, torch.Tensor):
                    self._values.pop(id(a), None)
            return out
        if not isinstance(out, torch.Tensor) or out.numel() > self.limit or not is_fake(out):
            return out
        real = [self.value(a) if isinstance(a, torch.Tensor) else a for a in flat]
        if any(r is None for r, a in zip(real, flat) if isinstance(a, torch.Tensor)):
            return out
        real = [torch.device("cpu") if isinstance(a, torch.device) else a for a in real]
        with unset_fake_temporarily():
            real_args, real_kwargs = tree_unflatten(real, spec)
            real_out = func(*real_args, **real_kwargs)
        self._record(out, real_out)
        return out


def cast_parameters_(module: torch.nn.Module, dtype: torch.dtype):
    """``module.to(dtype)`` for fake tensors (Module.to would try to swap tensors that fake mode holds
    weak references to): replaces floating-point parameters and buffers with converted ones."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_floating_point():
                m._parameters[name] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_floating_point():
                m._buffers[name] = b.to(dtype)
    return module


def move_parameters_(module: torch.nn.Module, device):
    """``module.to(device)`` for fake tensors (see ``cast_parameters_``): parameters and buffers replaced by copies
    on ``device``."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(p.detach().to(device), requires_grad=False)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = b.to(device)
    return module


_MATH_SDPA = torch.nn.functional.scaled_dot_product_attention  # on fake tensors: the math kernel


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """scaled_dot_product_attention through the kernel a Hopper/Ampere GPU would pick, so that the fake run
    allocates what that kernel allocates: flash attention for fp16/bf16 without a mask (head dim a multiple
    of 8, at most 256), memory-efficient attention otherwise. Without this, fake tensors take the math path,
    which materializes the whole attention matrix (hundreds of GiB at 4096²). Like the real dispatcher, inputs
    whose last dimension is not contiguous (stride ≠ 1) rule out both fused kernels: they take the math path."""
    if kw.get("enable_gqa"):
        raise NotImplementedError("enable_gqa is not simulated")
    if any(t.stride(-1) != 1 for t in (query, key, value)):
        return _MATH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale)
    d = query.shape[-1]
    if query.dtype in (torch.float16, torch.bfloat16) and attn_mask is None and d % 8 == 0 and d <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # the kernel takes an additive bias
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attn_mask, float("-inf"))
    if attn_mask is not None:
        attn_mask = attn_mask.to(query.dtype).expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, False, dropout_p, is_causal, scale=scale)[0]


@contextmanager
def fused_attention():
    """Route ``F.scaled_dot_product_attention`` to the fused kernels for the duration (see ``_fused_sdpa``)."""
    import torch.nn.functional as F
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class FakeCuda:
    """Fake-tensor mode whose tensors may live on ``cuda`` without a GPU, plus a live-memory counter."""

    def __init__(self):
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.counter = LiveCudaBytes()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)

    def count_existing(self, module: torch.nn.Module):
        """Count a model's parameters and buffers (created before tracking started)."""
        for t in list(module.parameters()) + list(module.buffers()):
            self.counter.add(t)

    @contextmanager
    def tracking(self):
        with self.counter:
            yield self.counter

    @property
    def current_bytes(self) -> int:
        return self.counter.current

    @property
    def peak_bytes(self) -> int:
        return self.counter.peak

    @staticmethod
    @contextmanager
    def autocast(dtype=torch.float16):
        prev_enabled = torch.is_autocast_enabled("cuda")
        prev_dtype = torch.get_autocast_dtype("cuda")
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", dtype)
        torch.autocast_increment_nesting()
        try:
            yield
        finally:
            if torch.autocast_decrement_nesting() == 0:
                torch.clear_autocast_cache()
            torch.set_autocast_enabled("cuda", prev_enabled)
            torch.set_autocast_dtype("cuda", prev_dtype)
