"""How much memory the KL autoencoder needs to decode (or encode), and the decoding plan that fits.

The decoder's peak memory is worked out from its layers, the way PyTorch's eager execution of
``ldm/modules/diffusionmodules/model.py`` holds tensors (a tensor lives while a Python name or an argument
refers to it). Sizes below are in elements per batch element; ``N`` is the pixel count at the layer's
resolution, ``c`` its channels; bytes = elements × batch × the compute dtype's size.

One piece (``Decoder.forward``, ``Encoder.forward``):

* ``ResnetBlock`` (cᵢ → cₒ), as it runs without autograd (``ResnetBlock._forward_inference``: SiLU and the
  additions in place): ``conv1(silu(norm1(x)))`` holds x and the norm output (2cᵢN), then x, the norm output
  (SiLU'd in place) and conv1's output ((2cᵢ + cₒ)N); ``norm2(h)`` holds x, h and the norm output
  ((cᵢ + 2cₒ)N), h is released, conv2 holds x, the norm output and its output ((cᵢ + 2cₒ)N); the residual
  holds x, h and the 1×1 shortcut when cᵢ ≠ cₒ ((cᵢ + 2cₒ)N; the sum is in place). Peak
  max(2cᵢ + cₒ, cᵢ + 2cₒ)·N: 3cN for a block that keeps its channels (4cN with autograd's out-of-place
  ``forward``).
* ``AttnBlock`` (c, at the latent resolution): x, the norm output, q, k, v (made contiguous), the attention
  output, the transposed copy and the projection: 8cN (the fused kernel of ``scaled_dot_product_attention``
  keeps no N×N matrix; it is chosen because q, k, v have a unit last stride, see ``AttnBlock.attend``).
* ``Upsample`` (c, N → 4N): the input, the nearest-upsampled copy and the convolution's output: 9cN.
* ``Downsample`` (encoder): the input, the zero-padded copy and the stride-2 output: about 2.25cN.
* ``norm_out`` + SiLU + ``conv_out``: h and the norm output (2cN), then, h released, the norm output (SiLU'd in
  place) and the convolution's output.
* a plain convolution: its input and output.

Plus what is alive for the whole call: the scaled latent (``z / scale_factor``) and, for the decoder,
``post_quant_conv``'s output (the decoder's argument). For the SD/SDXL VAE (ch 128, ch_mult 1,2,4,4) the peak
is the first ResnetBlock of the last level (256 → 128 channels at 8× the latent's side): (2·256 + 128)·64·N₀
elements for a latent of N₀ pixels, 10 GiB in float32 at 2048² (N₀ = 256²), 5 GiB in float16.

Tiled with synchronized GroupNorm (``ldm/modules/tiled_vae.py``, exact halos): the runner's own stage list is
walked. At stage i the accelerator holds the inter-stage tensors ("stores") that are still to be read, placed
on the device or the host by the runner's rule (device while the live device stores fit ``device_budget``),
the keys and values of a global attention stage (2cN), and the working set of one tile: its input crop (a view
of a device store, a copy of a host one), and, op by op, the op's input and output (a residual also the
shortcut's input crop, the 1×1 shortcut and the sum; an upsampling the 4× copy; the tile's attention q, the
chunked attention output, its concatenation, the transposed copy and the projection: 5cA for a tile of A
pixels).

What the count leaves out: kernel workspaces that are not tensors (cuDNN's convolution workspace, which cuDNN
sizes to the memory it finds free, so it adapts) and the caching allocator's fragmentation. The plan keeps a
margin for them (``MARGIN``). The model is checked against the live-tensor counter on CPU at small sizes and
against ``tools/fake_cuda.py`` simulations at 1024²–4096² (``tests/test_vae_memory.py``,
``scripts/benchmark_vae.py model``).
"""
import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from ldm.modules import tiled_vae as tv

__all__ = ["DecodePlan", "ELEMENT_BYTES", "MARGIN", "TILE_SIZES", "decoder_peak_bytes", "encoder_peak_bytes",
           "tiled_peak_bytes", "plan_decode", "plan_encode"]

ELEMENT_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}
# kept free beside the estimate: (relative, absolute bytes) per device type. cuDNN takes what is free for its
# workspaces (and falls back to algorithms needing less when it finds less), the caching allocator rounds and
# fragments; a CPU run must not push the machine into swap
MARGIN = {"cuda": (0.10, 768 * 2 ** 20), "cpu": (0.10, 256 * 2 ** 20)}
TILE_SIZES = (128, 96, 64, 48, 32, 24, 16, 12, 8)  # latent pixels, tried largest first


def _elem(dtype):
    return ELEMENT_BYTES[dtype]


# ----------------------------------------------------------------------------------------------------------
# one piece


def _channels(kind, m):
    """(in, out) channels of one entry of tiled_vae's layer list."""
    if kind == "conv":
        return m.in_channels, m.out_channels
    if kind == "res":
        return m.in_channels, m.out_channels
    if kind == "attn":
        return m.in_channels, m.in_channels
    if kind in ("up", "down"):
        c = m.conv.in_channels if m.with_conv else None
        return c, (m.conv.out_channels if m.with_conv else c)
    if kind == "normact":
        return m.num_channels, m.num_channels
    return None, None


def _one_piece(layers, hw, in_channels, scale_in=1) -> Tuple[float, Tuple[int, int], int]:
    """Peak elements (per batch element) of running ``layers`` in one piece on an input of ``hw`` pixels and
    ``in_channels`` channels; also the output size and channels. Follows ``Decoder.forward`` /
    ``Encoder.forward`` (see the module docstring)."""
    h, w = hw
    c = in_channels
    peak = 0.0
    i = 0
    while i < len(layers):
        kind, m = layers[i]
        n = h * w
        ci, co = _channels(kind, m)
        if kind == "conv":
            peak = max(peak, (c + co) * n)
            c = co
        elif kind == "res":
            sc = co if ci != co else 0
            peak = max(peak, n * max(2 * ci + co, ci + 2 * co, ci + co + sc))
            c = co
        elif kind == "attn":
            peak = max(peak, 8 * c * n)
        elif kind == "up":
            n4 = 4 * n
            peak = max(peak, c * n + c * n4 + (co * n4 if m.with_conv else 0))
            h, w = 2 * h, 2 * w
            c = co
        elif kind == "down":
            if m.with_conv:
                ho, wo = (h - 2) // 2 + 1, (w - 2) // 2 + 1
                peak = max(peak, c * n + c * (h + 1) * (w + 1) + co * ho * wo)
            else:
                ho, wo = h // 2, w // 2
                peak = max(peak, c * n + c * ho * wo)
            h, w = ho, wo
            c = co
        elif kind == "normact":
            # the norm's input is released before its SiLU (in place) goes through the convolution that follows
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            peak = max(peak, 2 * c * n)
            if nxt is not None and nxt[0] == "conv":
                co2 = nxt[1].out_channels
                peak = max(peak, c * n + co2 * n)
                c = co2
                i += 1
        elif kind == "fn":
            peak = max(peak, 2 * c * n)
        i += 1
    return peak, (h, w), c


def decoder_peak_bytes(vae, z_shape, dtype=torch.float32) -> int:
    """Peak bytes of ``vae.decode`` on a latent of shape ``z_shape`` (B, C, h, w) in ``dtype`` (everything
    beyond the weights and the caller's latent: the scaled latent, post_quant_conv's output, the decoder's
    activations)."""
    b, zc, h, w = z_shape
    pq = getattr(vae, "post_quant_conv", None)
    layers = tv._decoder_layers(vae.decoder, None)
    n0 = h * w
    c = pq.out_channels if pq is not None else zc
    # alive for the whole call: the scaled latent and post_quant_conv's output (the decoder's argument)
    base = zc * n0 + (c * n0 if pq is not None else 0)
    body, _, _ = _one_piece(layers, (h, w), c)
    peak = base + body
    return int(math.ceil(peak * b * _elem(dtype)))


def encoder_peak_bytes(vae, x_shape, dtype=torch.float32) -> int:
    """Peak bytes of ``vae.encode`` on images of shape ``x_shape`` (B, 3, H, W) in ``dtype`` (beyond the weights
    and the caller's images)."""
    b, c, h, w = x_shape
    layers = tv._encoder_layers(vae.encoder, getattr(vae, "quant_conv", None))
    body, _, _ = _one_piece(layers, (h, w), c)
    return int(math.ceil(body * b * _elem(dtype)))


# ----------------------------------------------------------------------------------------------------------
# tiled (synchronized GroupNorm, exact halos): walk the runner's stages


def _op_channels(op, c):
    if isinstance(op, tv._Conv):
        return op.m.out_channels
    if isinstance(op, tv._Up):
        return op.conv.m.out_channels if op.conv is not None else c
    if isinstance(op, tv._Down):
        return op.m.conv.out_channels if op.m.with_conv else c
    if isinstance(op, tv._Residual):
        return op.block.out_channels if op.block is not None else c
    return c


def _span_len(r):
    return r[1] - r[0]


def _tile_working_set(st, c_in, ay, ax, src_on_device, res_on_device, core_area=0, dst_on_device=True):
    """Peak elements (per batch element) of one tile through stage ``st`` whose input crop is ``ay`` × ``ax``
    (spans), beside the stores. ``res_on_device(name)``: whether a residual's source store is on the device.
    A core written to a host store is first made contiguous on the device (``core_area`` pixels)."""
    ry, rx = ay, ax
    c = c_in
    cur = 0 if src_on_device else c * _span_len(ry) * _span_len(rx)  # a host store's crop is copied over
    peak = cur
    for op in st.ops:
        ry2, rx2 = op.span(ry), op.span(rx)
        a_in = _span_len(ry) * _span_len(rx)
        a_out = _span_len(ry2) * _span_len(rx2)
        c2 = _op_channels(op, c)
        held = cur  # the op's input (0 while it is a view of a device store)
        if isinstance(op, tv._Up):
            extra = c * 4 * a_in + (c2 * a_out if op.conv is not None else 0)
        elif isinstance(op, tv._Down):
            extra = (c * a_in if op.m.with_conv else 0) + c2 * a_out
        elif isinstance(op, tv._Residual):
            src_c = op.block.in_channels if op.block is not None else c
            fetch = 0 if res_on_device(op.src) else src_c * a_out
            if op.block is not None and not op.identity:  # x = shortcut(x) drops the fetched crop
                extra = max(fetch + c2 * a_out, 2 * c2 * a_out)
            else:
                extra = fetch + c2 * a_out
        elif isinstance(op, tv._AttnQ):
            extra = 4 * c * a_in  # q, the attention output, the transposed copy, the projection
        else:
            extra = c2 * a_out
        peak = max(peak, held + extra)
        cur = c2 * a_out
        ry, rx, c = ry2, rx2, c2
    if not dst_on_device:
        peak = max(peak, cur + c * core_area)
    return peak


def _store_channels(stages, in_channels):
    ch = {"input": in_channels}
    for st in stages:
        c = ch[st.src]
        for op in st.ops:
            c = _op_channels(op, c)
        ch[st.dst] = c
    return ch


def tiled_peak_bytes(vae, z_shape, dtype=torch.float32, tile_size=64, device_budget=math.inf,
                     working_dtype=None, log: Optional[list] = None) -> Dict[str, float]:
    """Memory of ``tiled_decode(..., sync_gn=True, exact=True)`` on a latent of ``z_shape``: a dict with
    ``device`` (peak bytes on the compute device beyond the weights and the caller's latent), ``host`` (peak
    bytes of stores placed in host memory), ``working`` (the largest one-tile working set) and ``stores``
    (the largest total of live stores, wherever they are). ``device_budget``: the runner's cap of device-resident
    stores (math.inf: all on the device; 0: all on the host). ``working_dtype``: the dtype of the tile
    computation when it differs from the stores' (a float32 redo of a float16 tile)."""
    b, zc, h, w = z_shape
    e = _elem(dtype)
    ew = _elem(working_dtype or dtype)
    stages = tv._compile(tv._decoder_layers(vae.decoder, getattr(vae, "post_quant_conv", None)), scale_in=1)
    sizes = tv._sizes(stages, (h, w))
    chans = _store_channels(stages, zc)
    lat_b = [tv.split_axis(h, tile_size), tv.split_axis(w, tile_size)]
    scale = {"input": stages[0].scale_in}
    for st in stages:
        scale[st.dst] = st.scale_out
    last_use = tv._last_uses(stages)

    def bounds(name, a):
        return tv._level_bounds(lat_b[a], scale[name], sizes[name][a])

    where: Dict[str, str] = {"input": "device"}
    nbytes: Dict[str, float] = {"input": 0.0}  # the caller's latent: not counted
    live = ["input"]
    peak_dev = peak_host = peak_work = peak_stores = 0.0
    for i, st in enumerate(stages):
        # the output store: in place of a dead identity-residual source, or new, placed by the runner's rule
        n_out = b * chans[st.dst] * sizes[st.dst][0] * sizes[st.dst][1] * e
        inplace = (st.inplace is not None and st.inplace != "input" and last_use.get(st.inplace, -1) <= i
                   and chans[st.inplace] == chans[st.dst] and sizes[st.inplace] == sizes[st.dst])
        dev_live = sum(nbytes[s] for s in live if where[s] == "device")
        if inplace:  # the same storage under the new name (the source is not read after this stage)
            where[st.dst] = where[st.inplace]
            nbytes[st.dst], nbytes[st.inplace] = nbytes[st.inplace], 0.0
        else:
            where[st.dst] = "device" if dev_live + n_out <= device_budget else "host"
            nbytes[st.dst] = n_out
        live.append(st.dst)
        kv = 2 * b * chans[st.src] * sizes[st.src][0] * sizes[st.src][1] * ew if st.kv is not None else 0.0
        # the largest tile: every (row, column) crop of this stage
        by_in, bx_in = bounds(st.src, 0), bounds(st.src, 1)
        by_out, bx_out = bounds(st.dst, 0), bounds(st.dst, 1)
        n_in = sizes[st.src]
        crops_y = {tv._exact_crop(st, (by_in[k], by_in[k + 1]), (by_out[k], by_out[k + 1]), n_in[0])
                   for k in range(len(by_in) - 1)}
        crops_x = {tv._exact_crop(st, (bx_in[k], bx_in[k + 1]), (bx_out[k], bx_out[k + 1]), n_in[1])
                   for k in range(len(bx_in) - 1)}
        ay = max(crops_y, key=lambda ab: ab[1] - ab[0])
        ax = max(crops_x, key=lambda ab: ab[1] - ab[0])
        core_area = max(by_out[k + 1] - by_out[k] for k in range(len(by_out) - 1)) * \
            max(bx_out[k + 1] - bx_out[k] for k in range(len(bx_out) - 1))
        work = _tile_working_set(st, chans[st.src], (ay[0], ay[1], ay[0], ay[1], n_in[0]),
                                 (ax[0], ax[1], ax[0], ax[1], n_in[1]), where[st.src] == "device",
                                 lambda name: where.get(name) == "device", core_area,
                                 where[st.dst] == "device") * b * ew
        if st.kv is not None:  # computing the keys and values: a normalized core, its k and v
            core = max(by_in[k + 1] - by_in[k] for k in range(len(by_in) - 1)) * \
                max(bx_in[k + 1] - bx_in[k] for k in range(len(bx_in) - 1))
            work = max(work, 3 * b * chans[st.src] * core * ew)
        dev_stores = sum(nbytes[s] for s in live if where[s] == "device")
        host_stores = sum(nbytes[s] for s in live if where[s] == "host")
        if log is not None:
            log.append({"stage": i, "store": n_out, "where": where[st.dst], "device_stores": dev_stores,
                        "host_stores": host_stores, "kv": kv, "work": work})
        peak_dev = max(peak_dev, dev_stores + kv + work)
        peak_host = max(peak_host, host_stores)
        peak_work = max(peak_work, work + kv)
        peak_stores = max(peak_stores, dev_stores + host_stores)
        live = [s for s in live if last_use.get(s, -1) > i or s == st.dst]
    out = b * 3 * sizes[stages[-1].dst][0] * sizes[stages[-1].dst][1] * e
    peak_dev = max(peak_dev, out)
    base = b * zc * h * w * e  # the scaled latent (the runner's input store)
    return {"device": peak_dev + base, "host": peak_host, "working": peak_work, "stores": peak_stores}


# ----------------------------------------------------------------------------------------------------------
# the plan


@dataclass
class DecodePlan:
    """How to decode: ``tiled`` (False: in one piece), ``tile_size`` (latent pixels), the stores' placement
    (``offload``, ``device_budget``), the compute ``dtype``, the estimate and the memory it was made for."""
    tiled: bool
    dtype: torch.dtype
    estimate: int
    available: Optional[int]
    tile_size: Optional[int] = None
    offload: Optional[bool] = None
    device_budget: Optional[int] = None
    reason: str = ""
    fits: bool = True
    explicit: Dict[str, object] = field(default_factory=dict)
    staged: bool = False  # through the stage runner with a float32 redo of overflowing tiles
    report: Dict[str, list] = field(default_factory=dict)  # filled by the run: tiles redone, stores promoted

    def tiling_kwargs(self):
        """Keyword arguments of ``tiled_decode`` for this plan."""
        kw = dict(self.explicit)
        kw["tile_size"] = self.tile_size
        kw.setdefault("sync_gn", True)
        if self.offload is not None:
            kw.setdefault("offload", self.offload)
        if self.device_budget is not None:
            kw.setdefault("device_budget", self.device_budget)
        return kw

    def describe(self):
        gib = 2 ** 30
        what = f"tiled ({self.tile_size}-pixel latent tiles, synchronized GroupNorm)" if self.tiled else "one piece"
        what += f" in {str(self.dtype).replace('torch.', '')}"
        if self.staged:
            what += " (tiles that overflow redone in float32)"
        avail = "unknown" if self.available is None else f"{self.available / gib:.2f} GiB"
        return (f"{what}: estimated {self.estimate / gib:.2f} GiB, available {avail}"
                + (f" ({self.reason})" if self.reason else ""))


def _needed(estimate, device_type):
    rel, abs_ = MARGIN.get(device_type, MARGIN["cuda"])
    return estimate * (1 + rel) + abs_


def plan_decode(vae, z_shape, dtype, available: Optional[int], device_type="cuda", *, tiled: Optional[bool] = None,
                tile_size: Optional[int] = None, working_dtype=None, staged: bool = False,
                explicit: Optional[dict] = None) -> DecodePlan:
    """The decoding that fits ``available`` bytes (None: unknown, decode in one piece).

    Auto (``tiled=None``): one piece when its estimate fits (fastest); else tiles with synchronized GroupNorm,
    the largest tile size whose run fits with every store on the device; else the largest tile whose working
    set takes at most a quarter of the memory, the stores on the device up to what is left (``device_budget``)
    and in host memory beyond (CUDA; on the CPU there is one memory: the smallest tile, and a warning when even
    that does not fit). ``tiled=True`` (``--tiled_decoding``): tiles, the size as above unless ``tile_size``
    (``--tile_size``) is given. ``working_dtype``: the dtype a tile may be recomputed in (float32 redo of
    float16 tiles that overflow) for the working-set part of the estimate. ``staged``: the decode runs through
    the stage runner even in one piece (a single tile: the float16 guard needs it).
    """
    b, zc, h, w = z_shape
    explicit = dict(explicit or {})
    if staged:
        whole = max(h, w)
        one = int(tiled_peak_bytes(vae, z_shape, dtype, whole, math.inf, working_dtype)["device"])
    else:
        whole = None
        one = decoder_peak_bytes(vae, z_shape, dtype)
    if tiled is None and (available is None or _needed(one, device_type) <= available):
        return DecodePlan(False, dtype, one, available, tile_size=whole, offload=False if staged else None,
                          reason="fits in one piece" if available is not None else "free memory unknown",
                          staged=staged)
    host_stores = device_type != "cpu"
    if tile_size is not None:
        sizes = [int(tile_size)]
    else:
        sizes = [t for t in TILE_SIZES if t < max(h, w)] or [TILE_SIZES[-1]]
    reason = "explicit tiling" if tiled else "one piece does not fit"
    # 1. every store on the device
    for ts in sizes:
        est = tiled_peak_bytes(vae, z_shape, dtype, ts, math.inf, working_dtype)
        if available is None or _needed(est["device"], device_type) <= available:
            return DecodePlan(True, dtype, int(est["device"]), available, ts, offload=False if host_stores else None,
                              reason=reason, explicit=explicit, staged=staged)
    if not host_stores:
        ts = sizes[-1]
        est = tiled_peak_bytes(vae, z_shape, dtype, ts, math.inf, working_dtype)
        return DecodePlan(True, dtype, int(est["device"]), available, ts, reason=reason + "; not even the "
                          "smallest tiles fit", fits=False, explicit=explicit, staged=staged)
    # 2. stores on the device up to a budget, the rest in host memory
    rel, abs_ = MARGIN.get(device_type, MARGIN["cuda"])
    usable = (available - abs_) / (1 + rel)
    for ts in sizes:
        work = tiled_peak_bytes(vae, z_shape, dtype, ts, 0, working_dtype)
        if work["device"] <= usable / 4 or ts == sizes[-1]:
            budget = max(0, int(usable - work["device"]))
            est = tiled_peak_bytes(vae, z_shape, dtype, ts, budget, working_dtype)
            fits = est["device"] <= usable
            return DecodePlan(True, dtype, int(est["device"]), available, ts, offload=None, device_budget=budget,
                              reason=reason + f"; stores beyond {budget / 2 ** 30:.2f} GiB in host memory",
                              fits=fits, explicit=explicit, staged=staged)
    raise AssertionError("unreachable")


def plan_encode(vae, x_shape, dtype, available: Optional[int], device_type="cuda") -> Optional[int]:
    """None when ``vae.encode`` fits ``available`` bytes in one piece, else a tile size (latent pixels) for
    ``encode_tiled`` (synchronized GroupNorm), the largest that keeps the estimate of the one-piece encode of a
    tile within a quarter of the memory (the tiled encoder's stores are the whole image's, as for decoding)."""
    if available is None:
        return None
    one = encoder_peak_bytes(vae, x_shape, dtype)
    if _needed(one, device_type) <= available:
        return None
    f = 2 ** (vae.encoder.num_resolutions - 1)
    b, c, hh, ww = x_shape
    for ts in TILE_SIZES:
        if ts * f >= max(hh, ww):
            continue
        tile = encoder_peak_bytes(vae, (b, c, min(hh, ts * f + 16), min(ww, ts * f + 16)), dtype)
        if tile <= available / 4:
            return ts
    return TILE_SIZES[-1]
