#!/usr/bin/env python
"""Benchmarks (not tests): time and peak memory of the full-size SD 2.1 UNet, random weights.

Timing does not depend on weight values, so random weights give real figures. Each measurement runs in
its own subprocess so that the CPU peak (max RSS) belongs to that measurement alone.

    python scripts/benchmark.py unet --device cpu --sizes 64 128      # latent sides
    python scripts/benchmark.py unet --device cuda --sizes 64 128 256 # fp16 on CUDA
    python scripts/benchmark.py unet ... --write docs/benchmarks.md    # update the table in the docs

``scripts/benchmark.py`` is the single entry point; ScaleCrafter modes (``--mode``) are added by the
method modules (see docs/benchmarks.md for what each mode runs).
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

CONFIG = REPO_ROOT / "configs/stable-diffusion/v2-inference.yaml"


def machine_description(device):
    import torch
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    return f"CPU ({os.cpu_count()} cores, {cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def build_unet(device, dtype):
    import torch
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    cfg = OmegaConf.load(CONFIG).model.params.unet_config
    cfg.params.use_checkpoint = False
    unet = instantiate_from_config(cfg).eval()
    return unet.to(device=device, dtype=dtype)


def measure_once(args):
    """Runs in the child process: time `repeats` UNet evaluations at one latent size; print JSON."""
    import torch
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = build_unet(device, dtype)
    from ldm.scalecrafter.benchmark_modes import make_step  # per-mode step function
    step = make_step(args.mode, unet, args.size, args.batch, device, dtype)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        step(0)  # warm-up (kernel selection, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times = []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            step(i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    res = {"mode": args.mode, "size": args.size, "batch": args.batch, "device": args.device,
           "seconds": sorted(times)[len(times) // 2], "all_seconds": times}
    if device.type == "cuda":
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        res["peak_kind"] = "torch.cuda.max_memory_allocated"
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res["peak_gib"] = peak_kib / 2 ** 20
        res["peak_kind"] = "process max RSS (weights included)"
        res["rss_before_gib"] = base_rss / 2 ** 20
    print("RESULT " + json.dumps(res))


def run_child(mode, size, device, batch, repeats):
    cmd = [sys.executable, __file__, "_child", "--mode", mode, "--size", str(size), "--device", device,
           "--batch", str(batch), "--repeats", str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark child failed ({mode}, {size}):\n{out.stderr[-3000:]}")


def format_table(results, title, machine):
    lines = [f"### {title}", "", f"Machine: {machine}. Median of the timed repeats after one warm-up.",
             "One 'UNet step' = the UNet work of one guided sampling step (batch 2 = a CFG pair).", "",
             "| mode | latent | image | batch | s / UNet step | ratio vs plain | peak memory (GiB) |",
             "|---|---|---|---|---|---|---|"]
    plain = {(r["size"], r["batch"]): r["seconds"] for r in results if r["mode"] == "plain"}
    for r in results:
        base = plain.get((r["size"], r["batch"]))
        ratio = f"{r['seconds'] / base:.2f}×" if base else "–"
        lines.append(f"| {r['mode']} | {r['size']}² | {8 * r['size']}² | {r['batch']} | {r['seconds']:.3f} | "
                     f"{ratio} | {r['peak_gib']:.2f} |")
    lines.append("")
    lines.append(f"Peak memory: {results[0]['peak_kind']}.")
    return "\n".join(lines) + "\n"


def write_section(path, key, text):
    """Replace the block between `<!-- bench:key -->` markers (append it if absent)."""
    path = Path(path)
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    body = path.read_text() if path.exists() else "# Benchmarks\n\n"
    block = f"{start}\n{text}{end}\n"
    if start in body and end in body:
        body = body[:body.index(start)] + block + body[body.index(end) + len(end) + 1:]
    else:
        body = body.rstrip("\n") + "\n\n" + block
    path.write_text(body)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("unet", help="UNet step time and peak memory per mode and latent size")
    u.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    u.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    u.add_argument("--modes", nargs="+", default=["plain"],
                   help="plain redilate redilate_frac redilate_ndcfg disperse (ldm/scalecrafter/benchmark_modes.py)")
    u.add_argument("--batch", type=int, default=2, help="2 = one classifier-free-guidance step")
    u.add_argument("--repeats", type=int, default=3)
    u.add_argument("--write", type=str, default=None, help="update this markdown file")
    u.add_argument("--key", type=str, default=None, help="section key in the markdown file")
    c = sub.add_parser("_child")
    c.add_argument("--mode", default="plain")
    c.add_argument("--size", type=int)
    c.add_argument("--device")
    c.add_argument("--batch", type=int)
    c.add_argument("--repeats", type=int)
    args = p.parse_args(argv)
    if args.cmd == "_child":
        return measure_once(args)
    results = []
    for size in args.sizes:
        for mode in args.modes:
            r = run_child(mode, size, args.device, args.batch, args.repeats)
            print(f"{mode:>10} {size:>4}² latent: {r['seconds']:.3f} s/step, peak {r['peak_gib']:.2f} GiB", flush=True)
            results.append(r)
    import torch  # noqa: F401
    machine = machine_description(args.device)
    table = format_table(results, f"SD 2.1 UNet, {args.device}", machine)
    print(table)
    if args.write:
        write_section(args.write, args.key or f"unet-{args.device}-{'-'.join(args.modes)}", table)


if __name__ == "__main__":
    main()
