"""Tiled decoding and encoding of the KL autoencoder with synchronized GroupNorm.

At 2048² and 4096² the VAE decoder, not the UNet, is what runs out of memory: a 4096² decode holds several
4096²×128 activations at once, plus a 262,144-token self-attention in the mid block. This module runs the
*existing* ``Decoder`` / ``Encoder`` modules (same objects, same weights) tile by tile.

Three ways of tiling are implemented; ``tiled_decode`` / ``tiled_encode`` pick one from their arguments.

``sync_gn=True`` (default): exact staged decoding
    The network is cut into **stages** at every GroupNorm (and at every self-attention): a stage starts with
    a GroupNorm and runs everything up to the tensor that the next GroupNorm reads (a ResnetBlock is two
    stages, ``norm1→conv1`` and ``norm2→conv2→+shortcut``, and the convolution of an ``Upsample`` /
    ``Downsample`` joins the stage before it). Each stage runs over the tiles one at a time:

    * the tile's input is cut from the stage's input tensor with exactly the halo that the stage's
      convolutions and resamplings need (worked out from the layer geometry, see ``_Op.span``; 1–2 pixels at
      the stage's own resolution), so the tile's **owned (core) region** of the output equals the full
      decode, and only the core is kept;
    * every GroupNorm normalizes with the mean and variance of the **whole image**: while a stage writes
      its output, the per-group count, mean and M2 of each tile's core are merged (Chan's parallel formula)
      in float64; the cores partition the image, so each pixel is counted once and the statistics are those
      of the full tensor (up to rounding);
    * self-attention (the decoder's mid block, at latent resolution) is global: one pass over the tiles
      computes keys and values of the whole latent, then each tile's queries attend to all of them (the
      original release attends within each tile).

    The result equals the untiled decode up to floating-point rounding, for any tile size, and ``overlap``
    has no effect: the halo is exact, not a guess.

``sync_gn=True, exact=False``: the scheme of the original release (``--sync_gn``)
    Each tile is padded by ``overlap // 2`` latent pixels per side and run through the whole network on
    its own (zero padding at the tile border), with the same global statistics (from the tile cores) and
    global attention. Error decreases as ``overlap`` grows; kept for comparison.

``sync_gn=False``: naive tiling
    Each padded tile is decoded independently by the plain module, every GroupNorm using the tile's own
    statistics. The tiles are cross-faded over the overlap (``blend=True``) or cropped to their cores. This
    shows the colour shifts and seams that synchronized GroupNorm removes. Memory: one tile.

Memory model (``sync_gn=True``)
-------------------------------
Let ``T`` be a tile's size at a given level plus its halo, ``C`` the channels there. On the accelerator
there are, at any moment:

* the weights;
* the working set of one tile in one stage: its input crop, the residual crop, a float32 copy for the
  normalization and the stage output, i.e. a few ``B×C×T²`` tensors (about 0.5–1 GiB at tile_size 64 in
  fp16, where level 0 has 128 and 256 channels at 512² pixels);
* for a self-attention stage, keys and values of the whole feature map it runs on
  (``2×B×C×N`` for ``N`` tokens: 2×268 MB in fp16 for the 512² latent of a 4096² image);
* the inter-stage tensors ("stores"), of which at most three are alive at once (a ResnetBlock's input,
  its ``conv1`` output, its output; the output overwrites the input when the shortcut is the identity).
  They are full-image tensors: 4.3 GB each for 128 channels at 4096² in fp16. Where they live is set by
  ``offload``: ``True`` → host memory, always (accelerator memory then does not grow with the image
  except for the attention keys/values and the latent); ``False`` → the compute device; ``None`` (default)
  → the compute device while the live stores fit in ``device_budget`` bytes (default: the smaller of
  8 GiB and half the free accelerator memory at the call), host memory beyond that. On the CPU there is
  only one memory and the stores are simply tensors in it (tiling then saves only the transient
  activations of the full decode).

Transfers between host and device are synchronous and on the default stream; with host stores the tiled
decode is bound by PCIe bandwidth (every stage reads and writes the full tensor once), which is why stores
stay on the device when they fit.

Everything runs under ``torch.no_grad()``; tiled decoding is for inference.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.diffusionmodules.model import AttnBlock, Downsample, ResnetBlock, Upsample, nonlinearity

__all__ = ["tiled_decode", "tiled_encode", "split_axis", "GroupStats", "DEFAULT_TILE_SIZE", "DEFAULT_OVERLAP",
           "default_device_budget"]

DEFAULT_TILE_SIZE = 64  # latent pixels = 512 image pixels, the native resolution of SD 1.x/2.x-base
DEFAULT_OVERLAP = 24  # latent pixels, as in the original release (used by exact=False and sync_gn=False)
DEFAULT_DEVICE_BUDGET = 8 * 2 ** 30  # cap of the device-resident stores for offload=None on CUDA
_ATTN_CHUNK_ELEMS = 2 ** 26  # queries per attention call are chunked so that queries×keys stays below this

# A span describes one axis of a tile tensor at some resolution: (s, e, vs, ve, n) = the tensor holds
# absolute positions [s, e) of an axis of length n, and positions [vs, ve) hold the values of the full
# (untiled) computation. Positions outside [vs, ve) are polluted by the tile border.
Span = Tuple[int, int, int, int, int]


# ----------------------------------------------------------------------------------------------------------
# tile geometry
# ----------------------------------------------------------------------------------------------------------

def split_axis(n: int, tile_size: int) -> List[int]:
    """Boundaries ``[0, b1, ..., n]`` of ``ceil(n / tile_size)`` cores of near-equal size (≤ tile_size)."""
    if tile_size < 1:
        raise ValueError("tile_size must be ≥ 1")
    k = max(1, math.ceil(n / tile_size))
    return [i * n // k for i in range(k + 1)]


def _level_bounds(lat_bounds: Sequence[int], scale: int, n: int) -> List[int]:
    """Core boundaries at a level whose pixels are ``scale`` per latent pixel (the last core takes the rest:
    an encoder input need not be a multiple of 8)."""
    b = [min(x * scale, n) for x in lat_bounds]
    b[-1] = n
    return b


def _conv_span(r: Span, p: int) -> Span:
    """A stride-1 convolution with zero padding p: the valid part shrinks by p, except at the image border
    where the tile's zero padding *is* the image's zero padding."""
    s, e, vs, ve, n = r
    return (s, e, vs if vs == 0 else vs + p, ve if ve == n else ve - p, n)


# ----------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------

class GroupStats:
    """Per-(sample, group) mean and variance of a tensor seen in disjoint pieces.

    Each piece's per-channel mean and variance are computed on its own device (float32 two-pass for float32
    tensors; float32 sums of x and x² for half-precision tensors, whose rounding dwarfs the difference);
    channels are combined into groups and pieces merged in float64 with Chan's parallel formula (no
    catastrophic cancellation between pieces).
    """

    def __init__(self, num_groups: int):
        self.g = num_groups
        self.count = 0
        self.mean = None
        self.m2 = None

    def add(self, x: torch.Tensor):
        b, c = x.shape[:2]
        if c % self.g:
            raise ValueError(f"{c} channels do not split into {self.g} groups")
        hw = x[0, 0].numel()
        if hw == 0:
            return
        # per channel first (no copy of the strided core), then channels → groups, exactly, in float64
        dims = tuple(range(2, x.dim()))
        if x.dtype in (torch.float32, torch.float64):
            var_c, mean_c = torch.var_mean(x, dim=dims, correction=0)  # two-pass
        else:  # half precision: float32 accumulation without a float32 copy of the tile
            mean_c = x.sum(dim=dims, dtype=torch.float32).double() / hw
            msq = torch.linalg.vector_norm(x, 2, dim=dims, dtype=torch.float32).double() ** 2 / hw
            var_c = (msq - mean_c ** 2).clamp_min(0)  # cancellation ~1e-7·mean²: far below half precision
        acc_dev = mean_c.device if mean_c.device.type != "mps" else torch.device("cpu")
        mean_c = mean_c.to(acc_dev, torch.float64).reshape(b, self.g, -1)
        var_c = var_c.to(acc_dev, torch.float64).reshape(b, self.g, -1)
        mean = mean_c.mean(-1)
        n = hw * mean_c.shape[-1]
        m2 = (var_c + (mean_c - mean[..., None]) ** 2).mean(-1) * n
        if self.count == 0:
            self.mean, self.m2 = mean, m2
        else:
            tot = self.count + n
            delta = mean - self.mean
            self.mean = self.mean + delta * (n / tot)
            self.m2 = self.m2 + m2 + delta * delta * (self.count * n / tot)
        self.count += n

    def result(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, biased variance), each (batch, groups) float64."""
        return self.mean, self.m2 / self.count


# ----------------------------------------------------------------------------------------------------------
# operations a stage is made of; each wraps a module of the existing network
# ----------------------------------------------------------------------------------------------------------

class _Op:
    spatial = False  # mixes neighbouring pixels or changes the resolution

    def span(self, r: Span) -> Span:
        return r

    def __call__(self, t, ry: Span, rx: Span, ctx: "_Ctx"):
        raise NotImplementedError


class _Pointwise(_Op):
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, t, ry, rx, ctx):
        return self.fn(t)


class _Conv(_Op):
    def __init__(self, m: nn.Conv2d):
        p = m.padding
        if (m.stride != (1, 1) or m.dilation != (1, 1) or m.groups != 1 or isinstance(p, str) or p[0] != p[1]
                or m.kernel_size != (2 * p[0] + 1, 2 * p[0] + 1) or m.padding_mode != "zeros"):
            raise NotImplementedError(f"tiled VAE: unsupported convolution {m}")
        self.m, self.p = m, p[0]
        self.spatial = self.p > 0

    def span(self, r):
        return _conv_span(r, self.p)

    def __call__(self, t, ry, rx, ctx):
        return self.m(t)


class _Norm(_Op):
    """GroupNorm of the tile with the statistics of the whole tensor held in store ``src``."""

    def __init__(self, gn: nn.GroupNorm, src: str):
        self.gn, self.src = gn, src

    def __call__(self, t, ry, rx, ctx):
        return ctx.normalize(t, self.gn, self.src)


class _Up(_Op):
    spatial = True

    def __init__(self, m: Upsample):
        self.m = m
        self.conv = _Conv(m.conv) if m.with_conv else None

    def span(self, r):
        s, e, vs, ve, n = r
        r = (2 * s, 2 * e, 2 * vs, 2 * ve, 2 * n)  # nearest ×2
        return self.conv.span(r) if self.conv is not None else r

    def __call__(self, t, ry, rx, ctx):
        return self.m(t)


class _Down(_Op):
    """Downsample: stride 2 needs the tile to start at an even position (an odd start drops one pixel)."""
    spatial = True

    def __init__(self, m: Downsample):
        self.m = m
        if m.with_conv:
            c = m.conv
            if c.kernel_size != (3, 3) or c.stride != (2, 2) or c.padding != (0, 0):
                raise NotImplementedError(f"tiled VAE: unsupported downsampling {c}")

    def span(self, r):
        s, e, vs, ve, n = r
        if s % 2:
            s += 1
            vs = max(vs, s)
        so = s // 2
        if self.m.with_conv:  # pad one zero at the right/bottom, 3×3 conv, stride 2: j reads 2j, 2j+1, 2j+2
            no = (n - 2) // 2 + 1
            eo = so + (e - s - 2) // 2 + 1
            veo = no if ve == n else (ve - 3) // 2 + 1
        else:  # 2×2 average pooling
            no = n // 2
            eo = so + (e - s) // 2
            veo = ve // 2
        vso = (vs + 1) // 2
        return (so, eo, max(vso, so), min(veo, eo), no)

    def __call__(self, t, ry, rx, ctx):
        if ry[0] % 2:
            t = t[:, :, 1:]
        if rx[0] % 2:
            t = t[:, :, :, 1:]
        return self.m(t)


class _Residual(_Op):
    """``shortcut(x) + t`` with x read from store ``src`` at the tile's current position."""

    def __init__(self, src: str, block: Optional[ResnetBlock]):
        self.src, self.block = src, block
        self.identity = block is None or block.in_channels == block.out_channels
        self.p = 0
        if not self.identity and block.use_conv_shortcut:
            self.p = _Conv(block.conv_shortcut).p

    def span(self, r):
        s, e, vs, ve, n = r
        xs = _conv_span((s, e, s, e, n), self.p)
        return (s, e, max(vs, xs[2]), min(ve, xs[3]), n)

    def __call__(self, t, ry, rx, ctx):
        x = ctx.fetch(self.src, ry, rx).to(t.dtype)  # a float32 redo of a float16 tile, or the other way
        if self.block is not None:
            x = self.block.shortcut(x)
        return x + t


class _AttnQ(_Op):
    """Queries of the tile against the keys/values of the whole feature map (prepared by the runner)."""

    def __init__(self, block: AttnBlock):
        self.block = block

    def __call__(self, t, ry, rx, ctx):
        k, v = ctx.kv
        if k.dtype != t.dtype:
            k, v = k.to(t.dtype), v.to(t.dtype)
        return _attend(self.block, t, k, v)


def _attend(block: AttnBlock, h, k, v):
    b, c, hh, ww = h.shape
    q = block.q(h).reshape(b, 1, c, hh * ww).transpose(2, 3).contiguous()  # fused kernels need stride 1 (AttnBlock)
    chunk = max(1, _ATTN_CHUNK_ELEMS // (b * k.shape[2]))
    out = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + chunk], k, v)
                     for i in range(0, hh * ww, chunk)], dim=2)
    return block.proj_out(out.transpose(2, 3).reshape(b, c, hh, ww))


def _keys_values(block: AttnBlock, h):
    b, c = h.shape[:2]
    return tuple(m(h).reshape(b, 1, c, -1).transpose(2, 3) for m in (block.k, block.v))


# ----------------------------------------------------------------------------------------------------------
# from the network to a list of stages
# ----------------------------------------------------------------------------------------------------------

class _Stage:
    def __init__(self, src: str, scale_in: int):
        self.src = src
        self.ops: List[_Op] = []
        self.dst: Optional[str] = None
        self.scale_in = scale_in
        self.scale_out = scale_in
        self.groups: Optional[int] = None  # GroupNorm groups of the norm reading dst
        self.kv: Optional[AttnBlock] = None  # global attention on src before the tile pass
        self.inplace: Optional[str] = None  # dst may overwrite this store
        self.crops: Dict[tuple, Tuple[int, int]] = {}  # exact input crops, by (core_in, core_out, n_in)

    def reads(self):
        names = {self.src}
        names.update(op.src for op in self.ops if isinstance(op, (_Residual, _Norm)))
        return names


def _attn_layer(m, where):
    if isinstance(m, AttnBlock):
        return [("attn", m)]
    if isinstance(m, nn.Identity):
        return []
    raise NotImplementedError(f"tiled VAE: unsupported attention {type(m).__name__} in {where}")


def _decoder_layers(dec, post_quant_conv=None):
    layers = [("conv", post_quant_conv)] if post_quant_conv is not None else []
    layers += [("conv", dec.conv_in), ("res", dec.mid.block_1)]
    layers += _attn_layer(dec.mid.attn_1, "mid")
    layers.append(("res", dec.mid.block_2))
    for i_level in reversed(range(dec.num_resolutions)):
        up = dec.up[i_level]
        for i_block in range(dec.num_res_blocks + 1):
            layers.append(("res", up.block[i_block]))
            if len(up.attn) > 0:
                layers += _attn_layer(up.attn[i_block], f"up[{i_level}]")
        if i_level != 0:
            layers.append(("up", up.upsample))
    if not dec.give_pre_end:
        layers += [("normact", dec.norm_out), ("conv", dec.conv_out)]
        if dec.tanh_out:
            layers.append(("fn", torch.tanh))
    return layers


def _encoder_layers(enc, quant_conv=None):
    layers = [("conv", enc.conv_in)]
    for i_level in range(enc.num_resolutions):
        down = enc.down[i_level]
        for i_block in range(enc.num_res_blocks):
            layers.append(("res", down.block[i_block]))
            if len(down.attn) > 0:
                layers += _attn_layer(down.attn[i_block], f"down[{i_level}]")
        if i_level != enc.num_resolutions - 1:
            layers.append(("down", down.downsample))
    layers.append(("res", enc.mid.block_1))
    layers += _attn_layer(enc.mid.attn_1, "mid")
    layers += [("res", enc.mid.block_2), ("normact", enc.norm_out), ("conv", enc.conv_out)]
    if quant_conv is not None:
        layers.append(("conv", quant_conv))
    return layers


def _compile(layers, scale_in: int) -> List[_Stage]:
    """Cut the layer list into stages at every GroupNorm / attention (see the module docstring)."""
    stages: List[_Stage] = []
    state = {"cur": None, "last": "input", "scale": scale_in, "n": 0}

    def open_stage(src):
        st = _Stage(src, state["scale"])
        state["cur"] = st
        return st

    def close(groups: Optional[int]) -> str:
        st = state["cur"]
        if st is None:
            if groups is not None:
                raise NotImplementedError("tiled VAE: a GroupNorm directly on the input is not supported")
            return state["last"]
        state["n"] += 1
        st.dst = f"t{state['n']}"
        st.groups = groups
        st.scale_out = state["scale"]
        last = st.ops[-1]
        if isinstance(last, _Residual) and last.identity:
            st.inplace = last.src  # cores are disjoint: writing tile j's core never touches what tile k reads
        stages.append(st)
        state["cur"] = None
        state["last"] = st.dst
        return st.dst

    for kind, m in layers:
        if kind in ("conv", "up", "down", "fn"):
            st = state["cur"] or open_stage(state["last"])
            if kind == "conv":
                st.ops.append(_Conv(m))
            elif kind == "up":
                st.ops.append(_Up(m))
                state["scale"] *= 2
            elif kind == "down":
                st.ops.append(_Down(m))
                state["scale"] //= 2
            else:
                st.ops.append(_Pointwise(m))
        elif kind == "res":
            x = close(m.norm1.num_groups)
            s1 = open_stage(x)
            s1.ops += [_Norm(m.norm1, x), _Pointwise(nonlinearity), _Conv(m.conv1)]
            h = close(m.norm2.num_groups)
            s2 = open_stage(h)
            s2.ops += [_Norm(m.norm2, h), _Pointwise(nonlinearity), _Pointwise(m.dropout), _Conv(m.conv2),
                       _Residual(x, m)]
        elif kind == "attn":
            x = close(m.norm.num_groups)
            st = open_stage(x)
            st.kv = m
            st.ops += [_Norm(m.norm, x), _AttnQ(m), _Residual(x, None)]
        elif kind == "normact":
            x = close(m.num_groups)
            open_stage(x).ops += [_Norm(m, x), _Pointwise(nonlinearity)]
        else:
            raise ValueError(kind)
    close(None)
    return stages


# ----------------------------------------------------------------------------------------------------------
# the runner
# ----------------------------------------------------------------------------------------------------------

class _Ctx:
    def __init__(self, device, exact: bool, record: Optional[dict]):
        self.device = device
        self.exact = exact
        self.stores: Dict[str, object] = {}
        self.stats: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.kv = None
        self.tile = None  # index of the tile being processed (exact=False)
        self._affine: Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor]] = {}
        self.record = record

    def fetch(self, name, ry, rx):
        if self.exact:
            return self.stores[name][:, :, ry[0]:ry[1], rx[0]:rx[1]].to(self.device)
        t, ty, tx = self.stores[name][self.tile]
        if (ty[0], ty[1], tx[0], tx[1]) != (ry[0], ry[1], rx[0], rx[1]):
            raise RuntimeError("tiled VAE: residual tile does not line up")
        return t.to(self.device)

    def normalize(self, t, gn: nn.GroupNorm, name: str):
        """GroupNorm of tile t with the whole-image statistics of store ``name``: one fused pass through
        ``F.batch_norm`` in inference mode (per (sample, channel) mean/var, float32 math for half inputs)."""
        key = (id(gn), name)
        if key not in self._affine:
            mean, var = self.stats[name]  # (B, G) float64
            if self.record is not None:
                self.record[gn] = (mean.cpu(), var.cpu())
            b, g = mean.shape
            rep = gn.num_channels // g
            f32 = dict(device=self.device, dtype=torch.float32)
            w = gn.weight.detach().to(**f32).repeat(b) if gn.weight is not None else None
            bias = gn.bias.detach().to(**f32).repeat(b) if gn.bias is not None else None
            self._affine[key] = (mean.repeat_interleave(rep, dim=1).reshape(-1).to(**f32),
                                 var.repeat_interleave(rep, dim=1).reshape(-1).to(**f32), w, bias)
        mean, var, w, bias = self._affine[key]
        b, c = t.shape[:2]
        out = F.batch_norm(t.reshape(1, b * c, *t.shape[2:]), mean, var, w, bias, False, 0.0, gn.eps)
        return out.reshape(t.shape)


def _run_spans(ops, r: Span) -> Span:
    for op in ops:
        r = op.span(r)
    return r


def _exact_crop(st: "_Stage", core_in, core_out, n_in) -> Tuple[int, int]:
    """Smallest symmetric halo around the input core whose result is valid on the whole output core."""
    key = (core_in, core_out, n_in)
    if key not in st.crops:
        h = 0
        while True:
            a, b = max(core_in[0] - h, 0), min(core_in[1] + h, n_in)
            s, e, vs, ve, n = _run_spans(st.ops, (a, b, a, b, n_in))
            if vs <= core_out[0] and ve >= core_out[1]:
                break
            if a == 0 and b == n_in:
                raise RuntimeError("tiled VAE: the output core is not computable from the whole input")
            h += 1
        st.crops[key] = (a, b)
    return st.crops[key]


def default_device_budget(free_bytes: int) -> int:
    """Bytes of inter-stage tensors that ``offload=None`` keeps on the accelerator, given its free memory."""
    return max(0, min(DEFAULT_DEVICE_BUDGET, int(free_bytes) // 2))


class _Placement:
    """Where the inter-stage tensors live: on the compute device while they fit in the budget, else host."""

    def __init__(self, device, offload: Optional[bool], budget: Optional[int]):
        self.device = device
        self.host = torch.device("cpu")
        if device.type == "cpu" or offload is False:
            self.budget = math.inf
        elif offload is True:
            self.budget = 0
        elif budget is not None:
            self.budget = budget
        else:
            from ldm import memory  # the free memory within a per-process cap (ldm/memory.py)
            free = memory.available_bytes(device) if device.type == "cuda" else None
            self.budget = default_device_budget(DEFAULT_DEVICE_BUDGET * 2 if free is None else free)

    def choose(self, nbytes: int, live: int):
        return self.device if live + nbytes <= self.budget else self.host


def _device_bytes(stores, device) -> int:
    seen, tot = set(), 0
    for v in stores.values():
        ts = [v] if isinstance(v, torch.Tensor) else [t for t, _, _ in v]
        for t in ts:
            st = t.untyped_storage()  # memory is held per storage (views share it; fake tensors have no data_ptr)
            if t.device == device and st._cdata not in seen:
                seen.add(st._cdata)
                tot += st.nbytes()
    return tot


def _axis_weights(s, e, c0, c1, n, halo, blend, device):
    """1-D blending weights of a tile holding [s, e) whose core is [c0, c1): linear ramps across each
    interior core boundary, ±min(halo, ...) wide, complementary between neighbours; 0/1 (crop) without."""
    x = torch.arange(s, e, device=device, dtype=torch.float32) + 0.5
    if not blend or halo == 0:
        return ((x > c0) & (x < c1)).float()
    w = torch.ones_like(x)
    if c0 > 0:
        hb = min(halo, c0, n - c0)
        if hb > 0:
            w = torch.minimum(w, ((x - (c0 - hb)) / (2 * hb)).clamp(0, 1))
        else:
            w = torch.where(x > c0, w, torch.zeros_like(w))
    if c1 < n:
        hb = min(halo, c1, n - c1)
        if hb > 0:
            w = torch.minimum(w, (((c1 + hb) - x) / (2 * hb)).clamp(0, 1))
        else:
            w = torch.where(x < c1, w, torch.zeros_like(w))
    return w


class _Assembler:
    """Accumulates weighted tiles into a full tensor (float32), then normalizes by the weight sum."""

    def __init__(self, bounds_y, bounds_x, halo_y, halo_x, blend, where):
        self.by, self.bx, self.hy, self.hx = bounds_y, bounds_x, halo_y, halo_x
        self.blend, self.where = blend, where
        self.acc = None

    def add(self, t, iy, ix, sy, sx):
        ny, nx = self.by[-1], self.bx[-1]
        if self.acc is None:
            self.acc = torch.zeros(t.shape[0], t.shape[1], ny, nx, device=self.where, dtype=torch.float32)
            self.wsum = torch.zeros(ny, nx, device=self.where, dtype=torch.float32)
            self.dtype = t.dtype
        ey, ex = sy + t.shape[-2], sx + t.shape[-1]
        wy = _axis_weights(sy, ey, self.by[iy], self.by[iy + 1], ny, self.hy, self.blend, self.where)
        wx = _axis_weights(sx, ex, self.bx[ix], self.bx[ix + 1], nx, self.hx, self.blend, self.where)
        w = wy[:, None] * wx[None, :]
        self.acc[:, :, sy:ey, sx:ex] += t.to(self.where, torch.float32) * w
        self.wsum[sy:ey, sx:ex] += w

    def result(self):
        return (self.acc / self.wsum).to(self.dtype)


def _sizes(stages, n_in: Tuple[int, int]):
    """Spatial size of every store."""
    sizes = {"input": n_in}
    for st in stages:
        ny, nx = sizes[st.src]
        ry = _run_spans(st.ops, (0, ny, 0, ny, ny))
        rx = _run_spans(st.ops, (0, nx, 0, nx, nx))
        sizes[st.dst] = (ry[4], rx[4])
    return sizes


def _last_uses(stages):
    last = {}
    for i, st in enumerate(stages):
        for name in st.reads():
            last[name] = i
    return last


@torch.no_grad()
def _is_fake(t) -> bool:
    """A shape-only tensor (``tools/fake_cuda.py``'s memory estimates): its values cannot be read."""
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)


def _in_range(t, limit) -> bool:
    """All of ``t`` finite and within ±limit (one reduction, no copy; NaN fails the comparison). Fake tensors
    pass (the estimate follows the float16 path; the plan counts a float32 redo's working set)."""
    if t.numel() == 0 or _is_fake(t):
        return True
    lo, hi = torch.aminmax(t)
    return bool((lo >= -limit) & (hi <= limit))


def _run_ops(ops, t, ry, rx, ctx):
    for op in ops:
        t = op(t, ry, rx, ctx)
        ry, rx = op.span(ry), op.span(rx)
    return t, ry, rx


def _run_staged(stages, x, lat_size, tile_size, exact: bool, halo_lat: int, offload, device_budget, blend,
                record=None, fallback_stages=None, report=None):
    device = x.device
    sizes = _sizes(stages, tuple(x.shape[-2:]))
    lat_b = [split_axis(lat_size[0], tile_size), split_axis(lat_size[1], tile_size)]
    ky, kx = len(lat_b[0]) - 1, len(lat_b[1]) - 1
    tiles = [(iy, ix) for iy in range(ky) for ix in range(kx)]
    scale = {"input": stages[0].scale_in}
    for st in stages:
        scale[st.dst] = st.scale_out

    def bounds(name):
        return [_level_bounds(lat_b[a], scale[name], sizes[name][a]) for a in (0, 1)]

    ctx = _Ctx(device, exact, record)
    place = _Placement(device, offload, device_budget)
    guard = None
    if fallback_stages is not None:
        if not exact or len(fallback_stages) != len(stages):
            raise ValueError("tiled VAE: a float32 fallback needs the exact runner and the same stages")
        dtype = stages[0].ops[0].m.weight.dtype if isinstance(stages[0].ops[0], _Conv) else torch.float16
        guard = {"dtype": dtype, "limit": torch.finfo(dtype).max}
    last_use = _last_uses(stages)

    if exact:
        ctx.stores["input"] = x
    else:  # pad each tile by halo_lat latent pixels (scaled to the input level) and keep it as a tile
        by, bx = bounds("input")
        s_in = scale["input"]
        ny, nx = sizes["input"]
        lst = []
        for iy, ix in tiles:
            ay, bby = max(by[iy] - halo_lat * s_in, 0), min(by[iy + 1] + halo_lat * s_in, ny)
            ax, bbx = max(bx[ix] - halo_lat * s_in, 0), min(bx[ix + 1] + halo_lat * s_in, nx)
            lst.append((x[:, :, ay:bby, ax:bbx], (ay, bby, ay, bby, ny), (ax, bbx, ax, bbx, nx)))
        ctx.stores["input"] = lst

    for i, st in enumerate(stages):
        by_in, bx_in = bounds(st.src)
        by_out, bx_out = bounds(st.dst)
        n_in = sizes[st.src]
        ctx.kv = _global_kv(ctx, st, tiles, by_in, bx_in) if st.kv is not None else None
        if ctx.kv is not None and guard is not None and not all(_in_range(t, guard["limit"]) for t in ctx.kv):
            if report is not None:
                report.setdefault("redone", []).append((i, "keys/values"))
            ctx.kv = _global_kv(ctx, fallback_stages[i], tiles, by_in, bx_in)
        acc = GroupStats(st.groups) if st.groups is not None else None
        out = None
        for ti, (iy, ix) in enumerate(tiles):
            ctx.tile = ti
            cy, cx = (by_out[iy], by_out[iy + 1]), (bx_out[ix], bx_out[ix + 1])
            if exact:
                ay, bby = _exact_crop(st, (by_in[iy], by_in[iy + 1]), cy, n_in[0])
                ax, bbx = _exact_crop(st, (bx_in[ix], bx_in[ix + 1]), cx, n_in[1])
                ry, rx = (ay, bby, ay, bby, n_in[0]), (ax, bbx, ax, bbx, n_in[1])
                t = ctx.stores[st.src][:, :, ay:bby, ax:bbx].to(device)
            else:
                t, ry, rx = ctx.stores[st.src][ti]
                t = t.to(device)
            if guard is None:
                for op in st.ops:  # inline: the tile's input is freed as soon as the first op has run
                    t = op(t, ry, rx, ctx)
                    ry, rx = op.span(ry), op.span(rx)
            else:  # float16 with a float32 redo of the tile when its input or output leaves float16's range
                t_in, ry_in, rx_in = t, ry, rx
                out16 = None
                if t_in.dtype == guard["dtype"] or _in_range(t_in, guard["limit"]):
                    out16, ry, rx = _run_ops(st.ops, t_in.to(guard["dtype"]), ry_in, rx_in, ctx)
                    if not _in_range(out16, guard["limit"]):
                        out16 = None
                if out16 is None:
                    if report is not None:
                        report.setdefault("redone", []).append((i, ti))
                    t, ry, rx = _run_ops(fallback_stages[i].ops, t_in.float(), ry_in, rx_in, ctx)
                else:
                    t = out16
                del t_in, out16
            if t.shape[-2:] != (ry[1] - ry[0], rx[1] - rx[0]):
                raise RuntimeError(f"tiled VAE: tile shape {tuple(t.shape)} does not match its span {ry}, {rx}")
            core = t[:, :, cy[0] - ry[0]:cy[1] - ry[0], cx[0] - rx[0]:cx[1] - rx[0]]
            if acc is not None:
                acc.add(core)
            if exact:
                if out is None:
                    if st.inplace is not None and ctx.stores[st.inplace].shape[1:] == (t.shape[1],) + sizes[st.dst] \
                            and ctx.stores[st.inplace].dtype == t.dtype and last_use.get(st.inplace, -1) <= i \
                            and st.inplace != "input":
                        out = ctx.stores[st.inplace]
                    else:
                        shape = (t.shape[0], t.shape[1]) + sizes[st.dst]
                        dtype = guard["dtype"] if guard is not None else t.dtype
                        nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
                        where = place.choose(nbytes, _device_bytes(ctx.stores, device))
                        out = torch.empty(shape, dtype=dtype, device=where)
                if out.dtype != t.dtype and out.dtype == (guard or {}).get("dtype") \
                        and not _in_range(core, guard["limit"]):
                    # a float32 tile beyond float16's range: this store becomes float32 (the cores written so far
                    # are exact in it)
                    if report is not None:
                        report.setdefault("promoted", []).append(i)
                    nbytes = out.numel() * 4
                    where = place.choose(nbytes, _device_bytes(ctx.stores, device))
                    out = out.to(where, torch.float32)
                out[:, :, cy[0]:cy[1], cx[0]:cx[1]] = core
            else:
                if out is None:
                    out = []
                    est = t.numel() * t.element_size() * len(tiles)
                    where = place.choose(est, _device_bytes(ctx.stores, device))
                out.append((t.to(where), ry, rx))
            del t, core
        ctx.stores[st.dst] = out
        if acc is not None:
            ctx.stats[st.dst] = acc.result()
        ctx.kv = None
        for name in [n for n, j in last_use.items() if j == i]:
            ctx.stores.pop(name, None)
            ctx.stats.pop(name, None)

    result = ctx.stores[stages[-1].dst]
    if exact:
        return result.to(device)
    by, bx = bounds(stages[-1].dst)
    s_out = scale[stages[-1].dst]
    asm = _Assembler(by, bx, halo_lat * s_out, halo_lat * s_out, blend, result[0][0].device)
    for (iy, ix), (t, ry, rx) in zip(tiles, result):
        asm.add(t, iy, ix, ry[0], rx[0])
    return asm.result().to(device)


def _global_kv(ctx: _Ctx, st: _Stage, tiles, by, bx):
    """Keys and values of the whole feature map in store ``st.src``, computed tile by tile on the device."""
    block = st.kv
    src = ctx.stores[st.src]
    keys = values = None
    pos = 0
    for ti, (iy, ix) in enumerate(tiles):
        cy, cx = (by[iy], by[iy + 1]), (bx[ix], bx[ix + 1])
        if ctx.exact:
            t = src[:, :, cy[0]:cy[1], cx[0]:cx[1]].to(ctx.device)
        else:
            t, ry, rx = src[ti]
            t = t[:, :, cy[0] - ry[0]:cy[1] - ry[0], cx[0] - rx[0]:cx[1] - rx[0]].to(ctx.device)
        k, v = _keys_values(block, ctx.normalize(t.to(block.q.weight.dtype), block.norm, st.src))
        if keys is None:
            n = (by[-1] - by[0]) * (bx[-1] - bx[0])
            keys = k.new_empty(k.shape[0], 1, n, k.shape[-1])
            values = torch.empty_like(keys)
        keys[:, :, pos:pos + k.shape[2]] = k  # token order is irrelevant to attention (same for k and v)
        values[:, :, pos:pos + k.shape[2]] = v
        pos += k.shape[2]
    assert pos == keys.shape[2]
    return keys, values


@torch.no_grad()
def _run_plain_tiles(fn, x, lat_bounds, scale_in, scale_out, n_out, halo_lat, offload, blend):
    """Naive tiling: every padded tile goes through the untouched module ``fn`` on its own."""
    device = x.device
    host = torch.device("cpu") if (offload is not False and device.type != "cpu") else device
    ny, nx = x.shape[-2:]
    by_in = _level_bounds(lat_bounds[0], scale_in, ny)
    bx_in = _level_bounds(lat_bounds[1], scale_in, nx)
    by_out = _level_bounds(lat_bounds[0], scale_out, n_out[0])
    bx_out = _level_bounds(lat_bounds[1], scale_out, n_out[1])
    asm = _Assembler(by_out, bx_out, halo_lat * scale_out, halo_lat * scale_out, blend, host)
    h = halo_lat * scale_in
    for iy in range(len(by_in) - 1):
        for ix in range(len(bx_in) - 1):
            ay, bby = max(by_in[iy] - h, 0), min(by_in[iy + 1] + h, ny)
            ax, bbx = max(bx_in[ix] - h, 0), min(bx_in[ix + 1] + h, nx)
            y = fn(x[:, :, ay:bby, ax:bbx])
            asm.add(y, iy, ix, ay * scale_out // scale_in, ax * scale_out // scale_in)
    return asm.result().to(device)


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------

def _check(tile_size, overlap):
    if tile_size < 1:
        raise ValueError("tile_size must be a positive number of latent pixels")
    if overlap < 0:
        raise ValueError("overlap must be ≥ 0")


@torch.no_grad()
def tiled_decode(decoder, z: torch.Tensor, post_quant_conv: Optional[nn.Module] = None, *,
                 tile_size: int = DEFAULT_TILE_SIZE, overlap: int = DEFAULT_OVERLAP, sync_gn: bool = True,
                 exact: bool = True, offload: Optional[bool] = None, device_budget: Optional[int] = None,
                 blend: bool = True, force_tiled: bool = False, record_stats: Optional[dict] = None,
                 fallback: Optional[Tuple[nn.Module, Optional[nn.Module]]] = None, report: Optional[dict] = None):
    """Decode latent ``z`` (B, z_ch, h, w) with ``decoder`` (and ``post_quant_conv`` first, if given), tile by tile.

    tile_size: side of the region each tile owns, in latent pixels; an axis of length n is cut into
        ceil(n / tile_size) near-equal cores, so any h×w works.
    overlap: latent pixels shared by neighbouring tiles (each tile is padded by overlap // 2 per side) in the
        ``exact=False`` and ``sync_gn=False`` modes; the exact mode computes its own halo and ignores it.
    sync_gn: every GroupNorm uses the statistics of the whole image (False: of each tile, naive tiling).
    exact: with sync_gn, fetch the exact halo per stage (result = full decode up to rounding); False runs
        each overlap-padded tile through the whole network (the original release's scheme).
    offload: where inter-stage tensors wait (see the module docstring): None = device within
        ``device_budget`` bytes then host, True = host, False = device.
    blend: cross-fade tiles over the overlap (sync_gn=False / exact=False); False crops each tile to its core.
    force_tiled: run the tiled machinery even when a single tile covers the latent (otherwise that case
        calls the plain decoder and is bitwise identical to it).
    record_stats: optional dict, filled with {GroupNorm module: (mean, var)} as used (tests).
    fallback: (decoder, post_quant_conv) in float32 with the same weights, when ``decoder`` is a float16 copy:
        every stage of every tile whose input or output leaves float16's range (an overflow: inf/NaN, or a
        float32 value beyond ±65504) is redone with these modules in float32, and a store that must hold such
        values becomes float32 (exact runner only; a single tile goes through the runner too).
    report: optional dict, filled with "redone": [(stage, tile)] and "promoted": [stage] by the fallback.
    """
    _check(tile_size, overlap)
    ky, kx = (len(split_axis(n, tile_size)) - 1 for n in z.shape[-2:])
    plain = (lambda t: decoder(post_quant_conv(t))) if post_quant_conv is not None else decoder
    if fallback is not None:
        if not (sync_gn and exact):
            raise ValueError("a float32 fallback needs sync_gn=True and exact=True")
        stages = _compile(_decoder_layers(decoder, post_quant_conv), scale_in=1)
        stages32 = _compile(_decoder_layers(fallback[0], fallback[1]), scale_in=1)
        return _run_staged(stages, z, tuple(z.shape[-2:]), tile_size, exact, overlap // 2, offload, device_budget,
                           blend, record_stats, fallback_stages=stages32, report=report)
    if ky * kx == 1 and not force_tiled:
        return plain(z)
    if not sync_gn:
        up = 2 ** (decoder.num_resolutions - 1)
        lat_b = [split_axis(n, tile_size) for n in z.shape[-2:]]
        return _run_plain_tiles(plain, z, lat_b, 1, up, (z.shape[-2] * up, z.shape[-1] * up), overlap // 2,
                                offload, blend)
    stages = _compile(_decoder_layers(decoder, post_quant_conv), scale_in=1)
    return _run_staged(stages, z, tuple(z.shape[-2:]), tile_size, exact, overlap // 2, offload, device_budget,
                       blend, record_stats)


@torch.no_grad()
def tiled_encode(encoder, x: torch.Tensor, quant_conv: Optional[nn.Module] = None, *,
                 tile_size: int = DEFAULT_TILE_SIZE, overlap: int = DEFAULT_OVERLAP, sync_gn: bool = True,
                 exact: bool = True, offload: Optional[bool] = None, device_budget: Optional[int] = None,
                 blend: bool = True, force_tiled: bool = False, record_stats: Optional[dict] = None):
    """Encode image ``x`` (B, 3, H, W) with ``encoder`` (then ``quant_conv``, if given), tile by tile.

    Returns what ``quant_conv(encoder(x))`` returns (the posterior's moments). ``tile_size`` and ``overlap``
    are in *latent* pixels (×8 in the image), as for ``tiled_decode``; the other options are the same.
    """
    _check(tile_size, overlap)
    stages = _compile(_encoder_layers(encoder, quant_conv), scale_in=2 ** (encoder.num_resolutions - 1))
    sizes = _sizes(stages, tuple(x.shape[-2:]))
    lat = sizes[stages[-1].dst]
    ky, kx = (len(split_axis(n, tile_size)) - 1 for n in lat)
    plain = (lambda t: quant_conv(encoder(t))) if quant_conv is not None else encoder
    if ky * kx == 1 and not force_tiled:
        return plain(x)
    if not sync_gn:
        down = 2 ** (encoder.num_resolutions - 1)
        lat_b = [split_axis(n, tile_size) for n in lat]
        return _run_plain_tiles(plain, x, lat_b, down, 1, lat, overlap // 2, offload, blend)
    return _run_staged(stages, x, lat, tile_size, exact, overlap // 2, offload, device_budget, blend,
                       record_stats)
