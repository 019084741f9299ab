#!/usr/bin/env python
"""Benchmark (not a test): time, peak memory and error of full vs tiled decoding of the full-size SD VAE.

The VAE is the Stable Diffusion first stage (ch 128, ch_mult 1,2,4,4, built from
``configs/stable-diffusion/v2-inference.yaml``) with random weights: timing and memory do not depend on the
weight values. The latent is smooth structure plus noise (tiles differ in statistics, as in a real image).
Every measurement runs in its own subprocess, so that CPU peak memory belongs to that measurement alone.

    python scripts/benchmark_vae.py --device cpu --sizes 512 1024             # image sides, fp32
    python scripts/benchmark_vae.py --device cuda --sizes 1024 2048 4096      # fp16
    python scripts/benchmark_vae.py ... --write docs/benchmarks_vae.md        # update the table there
    python scripts/benchmark_vae.py simulate --sizes 1024 2048 4096           # CUDA fp16 memory, no GPU needed
    python scripts/benchmark_vae.py model                                     # the memory model vs the simulation

Methods: ``full`` = ``decode(z)``; ``sync`` = ``decode_tiled(z)`` (synchronized GroupNorm, exact halos,
inter-stage tensors placed by ``offload=None``: on the device up to the budget, then host);
``sync-offload`` = the same with ``offload=True`` (every inter-stage tensor in host memory);
``nosync`` = naive tiling (per-tile GroupNorm, overlap blended); ``orig`` = the original release's
scheme (tiles padded by overlap/2 run on their own, shared statistics; ``exact=False``).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated()`` over the decode (weights included); on the CPU
the peak resident set size of the process while decoding, sampled every 2 ms from /proc/self/statm, minus
the resident size just before the decode (weights and latent excluded), i.e. what the decode itself adds.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ldm.util import positive_float  # noqa: E402  (argparse type: a finite number > 0)

CONFIG = REPO_ROOT / "configs/stable-diffusion/v2-inference.yaml"
METHODS = {
    "full": "decode(z)",
    "sync": "tiled, sync GN",
    "sync-offload": "tiled, sync GN, offload=True",
    "nosync": "tiled, per-tile GN",
    "orig": "tiled, sync GN, original scheme",
}


def structured_latent(h, w, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    base = torch.stack([3 * xx, 2 * yy, torch.sin(3 * xx), 3 * xx * yy])
    return base[None] + 0.5 * torch.randn(1, 4, h, w, generator=g)


def build_vae(device, dtype):
    import torch
    from ldm.util import instantiate_from_config, load_config_file
    cfg = load_config_file(CONFIG).model.params.first_stage_config
    torch.manual_seed(0)
    vae = instantiate_from_config(cfg).eval()
    return vae.to(device=device, dtype=dtype)


class RssSampler:
    """Peak resident set size of this process, sampled from /proc/self/statm."""

    def __init__(self, period=0.002):
        self.period = period
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period)

    def __enter__(self):
        self.base = self.rss()
        self.peak = self.base
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def measure_once(args):
    """Child process: decode one latent with one method; print a JSON line."""
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    vae = build_vae(device, dtype)
    z = structured_latent(args.size // 8, args.size // 8).to(device, dtype)
    kw = dict(tile_size=args.tile_size, overlap=args.overlap)
    fns = {
        "full": lambda: vae.decode(z),
        "sync": lambda: vae.decode_tiled(z, **kw),
        "sync-offload": lambda: vae.decode_tiled(z, offload=True, **kw),
        "nosync": lambda: vae.decode_tiled(z, sync_gn=False, **kw),
        "orig": lambda: vae.decode_tiled(z, exact=False, **kw),
    }
    fn = fns[args.method]
    res = {"method": args.method, "size": args.size, "device": args.device, "tile_size": args.tile_size,
           "overlap": args.overlap, "threads": torch.get_num_threads()}
    out = None
    try:
        with torch.no_grad():
            for _ in range(args.warmup):
                out = fn()
                del out
            times = []
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    out = fn()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                    res["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
                else:
                    out = None
                    with RssSampler() as rs:
                        t0 = time.perf_counter()
                        out = fn()
                        times.append(time.perf_counter() - t0)
                    res["peak_gib"] = (rs.peak - rs.base) / 2 ** 30
        res["seconds"] = min(times)
        res["all_seconds"] = times
        if args.save:
            torch.save(out.float().cpu(), args.save)
    except torch.cuda.OutOfMemoryError:  # the full decode at 4096²
        res["oom"] = True
    print("RESULT " + json.dumps(res), flush=True)


def run_child(args, method, size, save):
    cmd = [sys.executable, __file__, "_child", "--method", method, "--size", str(size), "--device", args.device,
           "--tile_size", str(args.tile_size), "--overlap", str(args.overlap), "--warmup", str(args.warmup),
           "--repeats", str(args.repeats), "--threads", str(args.threads or 0), "--save", save]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    if out.returncode == -9 and args.device == "cpu":  # SIGKILL: the kernel's out-of-memory killer, as a rule
        return {"method": method, "size": size, "device": args.device, "oom": True, "oom_killed": True,
                "threads": args.threads or 0}
    raise RuntimeError(f"benchmark child failed ({method}, {size}):\n{out.stderr[-3000:]}")


def machine_description(device, threads):
    from ldm.reports import machine_description as describe
    load = os.getloadavg()
    return describe(device, threads, "fp16" if device == "cuda" else
                    f"fp32; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)")


def format_table(results, args):
    lines = [f"### SD VAE decoder, {args.device}", "",
             f"Machine: {machine_description(args.device, results[0]['threads'])}. tile_size {args.tile_size}, "
             f"overlap {args.overlap} (latent pixels). Best of {args.repeats} after {args.warmup} warm-up.", "",
             "| image | latent | method | seconds | × full | peak memory (GiB) | max / mean abs error vs full |",
             "|---|---|---|---|---|---|---|"]
    full = {r["size"]: r for r in results if r["method"] == "full" and not r.get("oom")}
    for r in results:
        s = r["size"]
        name = f"{r['method']} ({METHODS[r['method']]})"
        if r.get("oom"):
            what = "killed (host memory exhausted)" if r.get("oom_killed") else "OOM"
            lines.append(f"| {s}² | {s // 8}² | {name} | {what} | – | – | – |")
            continue
        base = full.get(s)
        ratio = f"{r['seconds'] / base['seconds']:.2f}×" if base else "–"
        e = r.get("error")
        err = f"{e[0]:.1e} / {e[1]:.1e}" if e else "–"
        lines.append(f"| {s}² | {s // 8}² | {name} | {r['seconds']:.2f} | {ratio} | {r['peak_gib']:.2f} | {err} |")
    lines.append("")
    if args.device == "cuda":
        lines.append("Peak memory: `torch.cuda.max_memory_allocated()` during the decode, weights included.")
    else:
        lines.append("Peak memory: peak resident set size during the decode minus the resident size just before "
                     "it (weights and latent excluded), sampled every 2 ms from /proc/self/statm. On the CPU the "
                     "inter-stage tensors of the tiled decode live in the same memory, so the saving is only "
                     "the transient activations of the full decode.")
    return "\n".join(lines) + "\n"


def simulate(args):
    """Estimated peak CUDA memory of each method in fp16, without a GPU (fake CUDA tensors, tools/fake_cuda.py)."""
    import torch
    from tools.fake_cuda import FakeCuda, cast_parameters_, fused_attention
    from ldm.modules.tiled_vae import default_device_budget
    card = args.card_gib * 2 ** 30
    rows = []
    with FakeCuda() as fc, torch.no_grad():
        from ldm.util import instantiate_from_config, load_config_file
        with torch.device("cuda"):  # Module.to cannot move fake tensors: build in place
            vae = instantiate_from_config(load_config_file(CONFIG).model.params.first_stage_config).eval()
        cast_parameters_(vae, torch.float16)
        fc.count_existing(vae)
        weights = fc.current_bytes
        # offload=None on a real card: device stores up to min(8 GiB, half the free memory at the call)
        budget = default_device_budget(card - weights)
        kw = dict(tile_size=args.tile_size, overlap=args.overlap)
        fns = {"full": lambda z: vae.decode(z),
               "sync": lambda z: vae.decode_tiled(z, device_budget=budget, **kw),
               "sync-offload": lambda z: vae.decode_tiled(z, offload=True, **kw),
               "nosync": lambda z: vae.decode_tiled(z, sync_gn=False, **kw),
               "orig": lambda z: vae.decode_tiled(z, exact=False, device_budget=budget, **kw)}
        with fc.tracking(), fused_attention():
            for size in args.sizes:
                for method in args.methods:
                    z = torch.randn(1, 4, size // 8, size // 8, dtype=torch.float16, device="cuda")
                    fc.counter.reset_peak()
                    out = fns[method](z)
                    rows.append((size, method, fc.peak_bytes / 2 ** 30))
                    del out, z
                    print(f"{size:>5}² {method:>12}: estimated peak {rows[-1][2]:.2f} GiB", flush=True)
    lines = ["### SD VAE decoder, CUDA fp16, estimated without a GPU", "",
             f"`python scripts/benchmark_vae.py simulate`: fake CUDA tensors (shapes only, `tools/fake_cuda.py`), "
             f"live tensor bytes at the peak, weights ({weights / 2 ** 30:.2f} GiB) included; a lower bound of "
             f"`torch.cuda.max_memory_allocated()` (no cuDNN workspaces, no allocator fragmentation). Attention as "
             f"the fused kernels allocate it. tile_size {args.tile_size}, overlap {args.overlap}; device budget of "
             f"the default placement {budget / 2 ** 30:.1f} GiB (a {args.card_gib:g} GiB card).", "",
             "| image | latent | method | estimated peak (GiB) |", "|---|---|---|---|"]
    lines += [f"| {s}² | {s // 8}² | {m} ({METHODS[m]}) | {g:.2f} |" for s, m, g in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        write_section(args.write, args.key or "vae-simulated", table)
    return rows


def model_check(args):
    """The decoder's memory model (ldm/modules/vae_memory.py) against the fake-CUDA simulation of the same decode
    (float16, the full-size VAE), and the plan the model makes for cards of several sizes. No GPU needed."""
    import gc
    import torch
    from tools.fake_cuda import FakeCuda, cast_parameters_, fused_attention
    from ldm.modules import vae_memory as vm
    from ldm.util import instantiate_from_config, load_config_file
    gib = 2 ** 30
    rows = []
    with FakeCuda() as fc, torch.no_grad():
        with torch.device("cuda"):
            vae = instantiate_from_config(load_config_file(CONFIG).model.params.first_stage_config).eval()
        cast_parameters_(vae, torch.float16)
        fc.count_existing(vae)
        with fc.tracking(), fused_attention():
            for size in args.sizes:
                z = torch.randn(1, 4, size // 8, size // 8, dtype=torch.float16, device="cuda")
                shape = tuple(z.shape)
                cases = [("one piece", lambda: vae.decode(z / 0.5), vm.decoder_peak_bytes(vae, shape, torch.float16)),
                         (f"tiles of {args.tile_size}, stores on the device",
                          lambda: vae.decode_tiled(z / 0.5, tile_size=args.tile_size, offload=False),
                          vm.tiled_peak_bytes(vae, shape, torch.float16, args.tile_size)["device"]),
                         (f"tiles of {args.tile_size}, stores beyond 2 GiB on the host",
                          lambda: vae.decode_tiled(z / 0.5, tile_size=args.tile_size, device_budget=2 * gib),
                          vm.tiled_peak_bytes(vae, shape, torch.float16, args.tile_size, 2 * gib)["device"]),
                         (f"tiles of {args.tile_size}, stores on the host",
                          lambda: vae.decode_tiled(z / 0.5, tile_size=args.tile_size, offload=True),
                          vm.tiled_peak_bytes(vae, shape, torch.float16, args.tile_size, 0)["device"])]
                for name, fn, model in cases:
                    base = fc.current_bytes
                    fc.counter.reset_peak()
                    out = fn()
                    del out
                    gc.collect()
                    sim = fc.peak_bytes - base
                    rows.append((size, name, model / gib, sim / gib))
                    print(f"{size:>5}² {name:>42}: model {model / gib:.3f} GiB, simulated {sim / gib:.3f} GiB",
                          flush=True)
        plans = []
        for card in args.cards:
            for size in args.sizes:
                for dtype in (torch.float16, torch.float32):
                    avail = int(card * gib)
                    p = vm.plan_decode(vae, (1, 4, size // 8, size // 8), dtype, avail, "cuda")
                    plans.append((card, size, dtype, p))
    lines = ["### Decoder memory model against the simulation", "",
             "`python scripts/benchmark_vae.py model`: the full-size SD/SDXL VAE decoder in float16, peak bytes "
             "beyond the weights; *model* = `ldm/modules/vae_memory.py` (worked out from the layers), *simulated* = "
             "live CUDA tensor bytes of the same decode on fake tensors (`tools/fake_cuda.py`). Neither counts cuDNN "
             "workspaces nor fragmentation (the plan's margin is for those).", "",
             "| image | decode | model (GiB) | simulated (GiB) | model / simulated |", "|---|---|---|---|---|"]
    lines += [f"| {s}² | {n} | {m:.3f} | {x:.3f} | {m / x:.3f} |" for s, n, m, x in rows]
    lines += ["", "### The plan for a given free memory", "",
              "What `AutoencoderKL.decode_auto` chooses (`ldm/modules/vae_memory.py plan_decode`) when the given "
              "memory is free on a CUDA device when decoding starts (margin: 10 % + 768 MiB).", "",
              "| free memory | image | dtype | decode | estimate (GiB) |", "|---|---|---|---|---|"]
    for card, size, dtype, p in plans:
        what = "one piece" if not p.tiled else f"tiles of {p.tile_size}" + (
            ", stores on the device" if p.offload is False else f", stores beyond {p.device_budget / gib:.1f} GiB "
                                                                  "in host memory")
        if not p.fits:
            what += " (does not fit)"
        lines.append(f"| {card:g} GiB | {size}² | {str(dtype)[6:]} | {what} | {p.estimate / gib:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        write_section(args.write, args.key or "vae-model", table)
    return rows, plans


def write_section(path, key, text):
    """Replace the block between `<!-- bench:key -->` markers (append it if absent)."""
    from ldm.reports import replace_block
    replace_block(path, "bench", key, text, heading="# VAE decoding benchmarks\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cmd", nargs="?", default="run", choices=["run", "simulate", "model", "_child"],
                   help="run: measure on --device; simulate: estimate CUDA fp16 memory without a GPU; model: the "
                        "memory model of ldm/modules/vae_memory.py against the simulation, and its plans per card")
    p.add_argument("--cards", type=positive_float, nargs="+", default=[8, 12, 24, 80],
                   help="model: free memory in GiB for the plan table")
    p.add_argument("--card_gib", type=positive_float, default=24.0, help="simulate: the GPU's memory (sets the device budget)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="image sides in pixels (multiples of 8)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS))
    p.add_argument("--tile_size", type=int, default=64)
    p.add_argument("--overlap", type=int, default=24)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads in the children (CPU)")
    p.add_argument("--write", default=None, help="markdown file to update (e.g. docs/benchmarks_vae.md)")
    p.add_argument("--key", default=None, help="section key in the markdown file")
    # child-only
    p.add_argument("--method", default="full")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--save", default="")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if args.warmup is None:
        args.warmup = 1 if cuda else 0
    if args.repeats is None:
        args.repeats = 3 if cuda else 1
    if args.cmd == "_child":
        return measure_once(args)
    if args.cmd == "model":
        args.sizes = args.sizes or [1024, 2048, 4096]
        return model_check(args)
    if args.cmd == "simulate":
        args.sizes = args.sizes or [1024, 2048, 4096]
        args.methods = args.methods or ["full", "sync", "sync-offload"]
        return simulate(args)
    args.sizes = args.sizes or ([1024, 2048, 4096] if cuda else [512, 1024])
    args.methods = args.methods or (["full", "sync", "sync-offload", "nosync"] if cuda else ["full", "sync", "nosync"])
    import torch
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            outs = {}
            for method in args.methods:
                save = os.path.join(tmp, f"{method}_{size}.pt")
                r = run_child(args, method, size, save)
                if not r.get("oom"):
                    outs[method] = save
                    if "full" in outs and method != "full":
                        a, b = torch.load(outs["full"]), torch.load(save)
                        e = (a - b).abs()
                        r["error"] = [e.max().item(), e.mean().item()]
                msg = "OOM" if r.get("oom") else f"{r['seconds']:.2f} s, peak {r['peak_gib']:.2f} GiB"
                print(f"{size:>5}² {method:>12}: {msg}" + (f", error {r['error']}" if "error" in r else ""),
                      flush=True)
                results.append(r)
    table = format_table(results, args)
    print(table)
    if args.write:
        write_section(args.write, args.key or f"vae-{args.device}", table)


if __name__ == "__main__":
    main()
