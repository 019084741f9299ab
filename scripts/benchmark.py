#!/usr/bin/env python
"""Benchmarks (not tests): time and peak memory of the full-size SD 2.1 or SDXL UNet, random weights.

Timing does not depend on weight values, so random weights give real figures. Each measurement runs in
its own subprocess so that the CPU peak (max RSS) belongs to that measurement alone.

    python scripts/benchmark.py unet --device cpu --sizes 64 128      # latent sides
    python scripts/benchmark.py unet --device cuda --sizes 64 128 256 # fp16 on CUDA
    python scripts/benchmark.py unet ... --write docs/benchmarks.md    # update the table in the docs
    python scripts/benchmark.py unet --family sdxl --device cuda --sizes 128 256 512 --modes plain preset
    python scripts/benchmark.py pipeline --device cuda --size 4096 --preset configs/scalecrafter/sdxl_4096x4096.yaml \
        --cap_gib 24                                                  # whole SDXL sampling run, fp16, 24 GB cap

``scripts/benchmark.py`` is the single entry point; ScaleCrafter modes (``--mode``) are added by the
method modules (see docs/benchmarks.md for what each mode runs).
"""
import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

CONFIGS = {"sd2": REPO_ROOT / "configs/stable-diffusion/v2-inference.yaml",
           "sdxl": REPO_ROOT / "configs/stable-diffusion/sdxl-base-inference.yaml"}
FAMILY_TITLES = {"sd2": "SD 2.1", "sdxl": "SDXL base"}


def machine_description(device):
    from ldm.reports import machine_description as describe
    return describe(device)


def build_unet(device, dtype, config=None):
    from ldm.util import load_config_file
    from ldm.util import instantiate_from_config
    cfg = load_config_file(config or CONFIGS["sd2"]).model.params.unet_config
    cfg.params.use_checkpoint = False
    import torch
    from ldm.util import no_weight_init
    if torch.device(device).type == "cuda":  # no initialisation on the CPU (minutes for SDXL): random values on the GPU
        with no_weight_init():
            unet = instantiate_from_config(cfg).eval()
        unet.to(device)
        random_weights_(unet)
        return unet.to(dtype=dtype)
    unet = instantiate_from_config(cfg).eval()
    return unet.to(device=device, dtype=dtype)


def measure_once(args):
    """Runs in the child process: time `repeats` UNet evaluations at one latent size; print JSON."""
    import torch
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = build_unet(device, dtype, args.config or CONFIGS[args.family])
    from tools.benchmark_modes import make_step  # per-mode step function
    step = make_step(args.mode, unet, args.size, args.batch, device, dtype, family=args.family)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # half-precision weights run under autocast, as scripts/txt2img.py runs them (GroupNorm32 computes in float32)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        for _ in range(args.warmup):
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
    res = {"mode": args.mode, "size": args.size, "batch": args.batch, "device": args.device, "family": args.family,
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


def child_parser():
    c = argparse.ArgumentParser(prog="benchmark.py _child")
    c.add_argument("--mode", default="plain")
    c.add_argument("--size", type=int)
    c.add_argument("--device")
    c.add_argument("--batch", type=int)
    c.add_argument("--repeats", type=int)
    c.add_argument("--warmup", type=int, default=1)
    c.add_argument("--family", default="sd2")
    c.add_argument("--config", default=None)
    return c


def run_child(mode, size, device, batch, repeats, family="sd2", config=None, threads=None, warmup=1):
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, __file__, "_child", "--mode", mode, "--size", str(size), "--device", device,
           "--batch", str(batch), "--repeats", str(repeats), "--family", family, "--warmup", str(warmup)]
    if config:
        cmd += ["--config", str(config)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark child failed ({mode}, {size}):\n{out.stderr[-3000:]}")


def format_table(results, title, machine, warmup=1):
    lines = [f"### {title}", "", f"Machine: {machine}. Median of the timed repeats after {warmup} warm-up evaluation(s).",
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


def publish(table, args, default_key):
    """Print a result table and, with ``--write``, put it into the markdown file under ``--key`` (or the default)."""
    print(table)
    if args.write:
        write_section(args.write, args.key or default_key, table)


def write_section(path, key, text):
    """Replace the block between `<!-- bench:key -->` markers (append it if absent)."""
    from ldm.reports import replace_block
    replace_block(path, "bench", key, text, heading="# Benchmarks\n")


# ------------------------------------------------------------------------------------------------
# whole sampling run (text encoders, guided DDIM steps, tiled decoding) with phase-wise peak memory


def add_pipeline_parser(sub):
    q = sub.add_parser("pipeline", help="one whole sampling run with random weights (text encoders, guided DDIM "
                                        "steps with a preset, tiled VAE decoding): time and peak memory per phase")
    q.add_argument("--config", default=str(CONFIGS["sdxl"]), help="model config (default: SDXL base)")
    q.add_argument("--preset", default=None, help="ScaleCrafter or FreeScale (configs/freescale/) preset YAML "
                                                  "(default: none, direct sampling)")
    q.add_argument("--size", type=int, nargs="+", default=None,
                   help="image side, or H W, in pixels (default: the preset's, else 1024)")
    q.add_argument("--steps", type=int, default=2,
                   help="DDIM steps to run: the preset's first steps, its most expensive (memory does not grow)")
    q.add_argument("--precision", choices=["half", "autocast", "full"], default="half",
                   help="as scripts/txt2img.py --precision (CUDA only; CPU runs in float32)")
    q.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    q.add_argument("--no_tiled", action="store_true", help="decode in one piece instead of tiles with synced GroupNorm")
    q.add_argument("--tile_size", type=int, default=None, help="tile side in latent pixels (default: the decoder's)")
    q.add_argument("--freeu", action="store_true", help="FreeU on, with the family's values")
    q.add_argument("--prompt", default="a professional photograph of an astronaut riding a horse",
                   help="the prompt (the demo model knows only its own words, e.g. 'a red circle')")
    q.add_argument("--ckpt", default=None,
                   help="load these weights instead of random ones (e.g. checkpoints/demo/shapes32.ckpt)")
    q.add_argument("--cap_gib", type=float, default=None,
                   help="cap this process's CUDA memory (e.g. 24 on a larger GPU: a run that needs more fails)")
    q.add_argument("--write", type=str, default=None, help="update this markdown file")
    q.add_argument("--simulate", action="store_true",
                   help="no GPU needed: run on fake CUDA tensors (shapes only, see tools/fake_cuda.py) and report the "
                        "estimated peak CUDA memory per phase (a lower bound: no cuDNN workspaces, no fragmentation)")
    q.add_argument("--key", type=str, default=None, help="section key in the markdown file")


def random_weights_(model, seed=0):
    """Finite random values for every parameter (built without initialisation, which leaves memory as is)."""
    import torch
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, (p.numel() // p.shape[0]) ** -0.5, generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def pipeline_size(args):
    """The preset named by ``args.preset`` (or None) and the image size (H, W): ``--size``, else the preset's."""
    preset = None
    if args.preset:
        from ldm.util import read_yaml_mapping
        if read_yaml_mapping(args.preset, "preset", "--preset").get("method") == "freescale":
            from ldm.methods.freescale.presets import load_preset
        else:
            from ldm.methods.scalecrafter.presets import load_preset
        preset = load_preset(args.preset)
    size = args.size or ([preset["height"], preset["width"]] if preset else [1024])
    H, W = (size[0], size[0]) if len(size) == 1 else size[:2]
    return preset, H, W


def method_scopes(model, preset, use_freeu):
    """The ScaleCrafter guidance of ``preset`` (None for direct sampling, and for a FreeScale preset, which
    ``guided_run`` runs itself) and the FreeU context (a no-op without ``use_freeu``), as scripts/txt2img.py
    sets them up."""
    unet = model.model.diffusion_model
    guidance = None
    if preset is not None and preset.get("method") != "freescale":
        import warnings
        from ldm.methods.scalecrafter.guidance import ScaleCrafterGuidance
        from ldm.methods.scalecrafter.presets import plan_from_preset
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            guidance = ScaleCrafterGuidance(plan_from_preset(unet, preset))
    if not use_freeu:
        return guidance, nullcontext()
    from ldm.unet_hooks.freeu import FREEU_DEFAULTS, freeu
    family = "sdxl" if hasattr(model, "conditioner") else "sd2"
    return guidance, freeu(unet, **dict((preset or {}).get("freeu") or FREEU_DEFAULTS[family]))


def latent_factor(model):
    """The first stage's downsampling factor: 1 for a pixel-space model, 2^(levels - 1) for the KL VAE."""
    decoder = getattr(model.first_stage_model, "decoder", None)
    return 2 ** (decoder.num_resolutions - 1) if decoder is not None else 1


def guided_run(model, sampler, guidance, H, W, steps, phase, tiling, preset=None, mark=None,
               prompt="a professional photograph of an astronaut riding a horse"):
    """Text encoding, guided DDIM sampling and decoding, each inside ``phase(name, fn)``; ``tiling()`` gives
    the decoder's tiling options once sampling is done. A FreeScale ``preset`` samples its whole cascade,
    ``steps`` per stage (restart at 30 % of them); ``mark(name)`` then closes each stage's record (the peak
    since the previous mark)."""
    f = latent_factor(model)
    c = phase("text encoders", lambda: model.get_learned_conditioning([prompt]))
    uc = model.get_learned_conditioning([""])
    if preset is not None and preset.get("method") == "freescale":
        samples = freescale_stages(model, sampler, preset, H, W, steps, c, uc, phase, tiling(), mark)
    else:
        samples = phase("sampling", lambda: sampler.sample(
            S=steps, conditioning=c, batch_size=1, shape=(model.channels, H // f, W // f), verbose=False,
            unconditional_guidance_scale=5.0, unconditional_conditioning=uc, eta=1.0, guidance=guidance)[0])
    c = uc = None  # not needed while decoding
    options = tiling()
    phase("decoding", lambda: model.decode_first_stage(samples, **options))


def freescale_stages(model, sampler, preset, H, W, steps, c, uc, phase, tiling, mark=None):
    """The FreeScale cascade as one "sampling" phase; ``mark`` records each stage (its upscaling and denoising)."""
    from ldm.methods.freescale.cascade import FreeScale
    from ldm.methods.freescale.presets import make_settings
    settings = make_settings(H, W, int(preset["base"]), preset)
    callback = (lambda k, size, latent: mark(f"stage {k + 1} ({size[1]}x{size[0]})")) if mark else None
    runner = FreeScale(model, settings, f=latent_factor(model), tiling=tiling, stage_callback=callback)
    return phase("sampling", lambda: runner.sample(sampler, steps, c, uc, 5.0, 0.0, 1)).latent


def tiling_options(args, **extra):
    """Tiled decoding with synchronized GroupNorm, unless ``--no_tiled``."""
    if args.no_tiled:
        return {}
    return {"overlap": 24, "sync_gn": True, **({"tile_size": args.tile_size} if args.tile_size else {}), **extra}


def run_pipeline(args):
    import torch
    from ldm.util import load_config_file
    from ldm.inference import cast_for_half_precision
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.util import instantiate_from_config, no_weight_init
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and args.cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2 ** 30 / total),
                                                torch.cuda.current_device())
    config = load_config_file(args.config, flag="--config")
    preset, H, W = pipeline_size(args)
    t0 = time.perf_counter()
    with no_weight_init():
        model = instantiate_from_config(config.model).eval().requires_grad_(False)  # as load_model_from_config
    half = args.precision == "half" and cuda
    if half:
        cast_for_half_precision(model, torch.float16)
    model.to(device)
    if args.ckpt:
        from ldm.checkpoint import load_checkpoint_into
        load_checkpoint_into(model, args.ckpt)
    else:
        random_weights_(model)
    build_s = time.perf_counter() - t0
    if hasattr(model, "set_size_conditioning"):
        model.set_size_conditioning((H, W))
    guidance, freeu_scope = method_scopes(model, preset, args.freeu)
    autocast = torch.autocast("cuda", dtype=torch.float16) if cuda and args.precision != "full" else nullcontext()
    phases = {}
    weights_gib = torch.cuda.memory_allocated(device) / 2 ** 30 if cuda else None

    last = {"t": None}

    def phase(name, fn):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t = last["t"] = time.perf_counter()
        before = set(phases)
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
        rec = {"seconds": time.perf_counter() - t}
        if cuda:  # stages marked inside this phase reset the peak: the phase's peak is the largest of them
            inner = [phases[n] for n in set(phases) - before]
            rec["peak_gib"] = max([torch.cuda.max_memory_allocated(device) / 2 ** 30] + [r["peak_gib"] for r in inner])
            rec["peak_reserved_gib"] = max([torch.cuda.max_memory_reserved(device) / 2 ** 30]
                                           + [r["peak_reserved_gib"] for r in inner])
        phases[name] = rec
        print(f"  {name}: {rec}", flush=True)  # a run killed at its time limit still shows how far it got
        return out

    def mark(name):  # a FreeScale stage: peak and time since the previous mark
        torch.cuda.synchronize(device) if cuda else None
        rec = {"seconds": time.perf_counter() - last["t"]}
        if cuda:
            torch.cuda.synchronize(device)
            rec["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            rec["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2 ** 30
            torch.cuda.reset_peak_memory_stats(device)
        phases[name] = rec
        print(f"  {name}: {rec}", flush=True)
        last["t"] = time.perf_counter()

    with torch.no_grad(), autocast, freeu_scope:
        guided_run(model, DDIMSampler(model), guidance, H, W, args.steps, phase, lambda: tiling_options(args),
                   preset, mark, args.prompt)
    res = {"config": Path(args.config).name, "preset": Path(args.preset).name if args.preset else None,
           "H": H, "W": W, "steps": args.steps, "precision": args.precision if cuda else "full",
           "tiled": not args.no_tiled, "freeu": args.freeu, "cap_gib": args.cap_gib, "build_seconds": build_s,
           "weights_gib": weights_gib, "phases": phases, "machine": machine_description(args.device)}
    if not cuda:
        res["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print("RESULT " + json.dumps(res))
    lines = [f"### Sampling run: {res['config']}, {res['preset'] or 'direct'}, {W}x{H}, {args.device}", "",
             f"Machine: {res['machine']}. Precision {res['precision']}, tiled decoding "
             f"{'with synchronized GroupNorm' if res['tiled'] else 'off'}, FreeU {'on' if args.freeu else 'off'}"
             f"{f', memory capped at {args.cap_gib:g} GiB' if args.cap_gib else ''}; "
             f"{f'weights {args.ckpt}' if args.ckpt else 'random weights'}; {args.steps} DDIM steps"
             f"{' per stage' if preset and preset.get('method') == 'freescale' else ''}.", ""]
    if cuda:
        lines += [f"Weights on the GPU: {weights_gib:.2f} GiB.", "",
                  "| phase | seconds | s / step | peak allocated (GiB) | peak reserved (GiB) |", "|---|---|---|---|---|"]
        for name, r in phases.items():
            per = f"{r['seconds'] / args.steps:.2f}" if name == "sampling" else "–"
            lines.append(f"| {name} | {r['seconds']:.2f} | {per} | {r['peak_gib']:.2f} | {r['peak_reserved_gib']:.2f} |")
    else:
        lines += ["| phase | seconds |", "|---|---|"] + [f"| {n} | {r['seconds']:.2f} |" for n, r in phases.items()]
        lines += ["", f"Process max RSS: {res['max_rss_gib']:.2f} GiB."]
    table = "\n".join(lines) + "\n"
    publish(table, args, f"pipeline-{Path(args.config).stem}-{H}x{W}-{args.device}")
    return res


def simulate_pipeline(args):
    """The run of ``run_pipeline`` on fake CUDA tensors: estimated peak GPU memory per phase, no GPU needed."""
    import numpy as np
    import torch
    from ldm.util import load_config_file
    from tools.fake_cuda import FakeCuda, cast_parameters_, fused_attention, unset_fake_temporarily
    from ldm.inference import cast_for_half_precision
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.modules.diffusionmodules.util import make_beta_schedule
    from ldm.modules.tiled_vae import default_device_budget
    from ldm.util import get_obj_from_str, instantiate_from_config, no_weight_init
    config = load_config_file(args.config, flag="--config")
    preset, H, W = pipeline_size(args)
    cap = (args.cap_gib or 24.0) * 2 ** 30  # the card the decode's device budget is computed for
    built_betas = []

    def real_beta_schedule(*a, **k):  # numpy values, computed outside the fake mode; kept for the sampler
        with unset_fake_temporarily(), torch.device("cpu"):
            built_betas.append(make_beta_schedule(*a, **k))
        return built_betas[-1]
    fc = FakeCuda()
    phases = {}
    with fc, torch.no_grad():
        get_obj_from_str(config.model.target)  # import the model's module before patching
        # modules that imported make_beta_schedule by name get the real-valued one while the model is built
        users = [m for n, m in list(sys.modules.items()) if n.startswith("ldm.") and m is not None
                 and getattr(m, "make_beta_schedule", None) is make_beta_schedule]
        for m in users:
            m.make_beta_schedule = real_beta_schedule
        try:
            with torch.device("cuda"), no_weight_init():
                model = instantiate_from_config(config.model).eval().requires_grad_(False)  # as load_model_from_config
        finally:
            for m in users:
                m.make_beta_schedule = make_beta_schedule
        if args.precision == "half":
            cast_for_half_precision(model, torch.float16, cast=cast_parameters_)
        fc.count_existing(model)
        weights = fc.current_bytes
        if hasattr(model, "set_size_conditioning"):
            model.set_size_conditioning((H, W))
        guidance, freeu_scope = method_scopes(model, preset, args.freeu)
        with unset_fake_temporarily():  # what DDIMSampler.make_schedule reads from the model, as real tensors
            alphas_cumprod = np.cumprod(1.0 - built_betas[-1])
            real_schedule = SimpleNamespace(
                betas=torch.tensor(built_betas[-1], dtype=torch.float32),
                alphas_cumprod=torch.tensor(alphas_cumprod, dtype=torch.float32),
                alphas_cumprod_prev=torch.tensor(np.append(1.0, alphas_cumprod[:-1]), dtype=torch.float32))
        sampler = DDIMSampler(model)
        make_schedule = sampler.make_schedule

        def make_schedule_from_real(*a, **k):  # the per-step coefficients stay real CPU tensors, as python floats are read from them
            sampler.model = real_schedule
            try:
                with unset_fake_temporarily():
                    make_schedule(*a, **k)
                    for name in ("ddim_sigmas", "ddim_alphas", "ddim_alphas_prev"):  # read as floats per step
                        setattr(sampler, name, np.asarray(getattr(sampler, name)))
            finally:
                sampler.model = model
        sampler.make_schedule = make_schedule_from_real
        autocast = fc.autocast(torch.float16) if args.precision != "full" else nullcontext()

        def phase(name, fn):
            fc.counter.reset_peak()
            start = fc.current_bytes
            before = set(phases)
            out = fn()
            inner = [phases[n]["peak_gib"] for n in set(phases) - before]  # FreeScale stages (they reset the peak)
            phases[name] = {"peak_gib": max([fc.peak_bytes / 2 ** 30] + inner), "start_gib": start / 2 ** 30}
            return out

        with fc.tracking(), autocast, freeu_scope, fused_attention():
            # offload=None on a real card: the budget computed from the memory free when decoding starts
            def mark(name):  # a FreeScale stage: the peak since the previous mark
                phases[name] = {"peak_gib": fc.peak_bytes / 2 ** 30, "start_gib": stage_start[0] / 2 ** 30}
                fc.counter.reset_peak()
                stage_start[0] = fc.current_bytes
            stage_start = [fc.current_bytes]

            guided_run(model, sampler, guidance, H, W, args.steps, phase,
                       lambda: tiling_options(args, device_budget=default_device_budget(cap - fc.current_bytes)),
                       preset, mark)
    res = {"config": Path(args.config).name, "preset": Path(args.preset).name if args.preset else None,
           "H": H, "W": W, "steps": args.steps, "precision": args.precision, "tiled": not args.no_tiled,
           "freeu": args.freeu, "weights_gib": weights / 2 ** 30, "phases": phases, "simulated": True}
    print("RESULT " + json.dumps(res))
    lines = [f"### Estimated CUDA memory: {res['config']}, {res['preset'] or 'direct'}, {W}x{H}", "",
             f"Simulated with fake CUDA tensors on a CPU (`--simulate`, `tools/fake_cuda.py`): live tensor bytes, "
             f"a lower bound of `torch.cuda.max_memory_allocated` (no cuDNN workspaces, no allocator "
             f"fragmentation). Precision {args.precision}, tiled decoding "
             f"{'with synchronized GroupNorm' if res['tiled'] else 'off'}, FreeU {'on' if args.freeu else 'off'}; "
             f"{args.steps} DDIM steps.", "",
             f"Weights: {res['weights_gib']:.2f} GiB.", "",
             "| phase | allocated at start (GiB) | peak allocated (GiB) |", "|---|---|---|"]
    lines += [f"| {n} | {r['start_gib']:.2f} | {r['peak_gib']:.2f} |" for n, r in phases.items()]
    table = "\n".join(lines) + "\n"
    publish(table, args, f"simulated-{Path(args.config).stem}-{H}x{W}")
    return res


def memory_table(args):
    """``simulate_pipeline`` for several (size, preset) cases of one model: one table of estimated peaks."""
    rows = []
    for case in args.cases:
        size, _, preset = case.partition(":")
        h, _, w = size.partition("x")
        ns = argparse.Namespace(config=args.config, preset=preset or None, size=[int(h), int(w or h)],
                                steps=args.steps, precision=args.precision, no_tiled=False, tile_size=None,
                                freeu=args.freeu, cap_gib=args.cap_gib, write=None, key=None)
        rows.append(simulate_pipeline(ns))
    cap = args.cap_gib or 24.0
    lines = [f"### Estimated peak CUDA memory: {Path(args.config).name}, {args.precision} precision", "",
             "Simulated on a CPU with fake CUDA tensors (`scripts/benchmark.py memory`, `tools/fake_cuda.py`): live "
             "tensor bytes at the peak, weights included, attention as the fused kernels allocate it. A lower bound "
             "of `torch.cuda.max_memory_allocated()` (no cuDNN workspaces, no allocator fragmentation); "
             f"tiled VAE decoding with synchronized GroupNorm and the default placement for a {cap:g} GiB card; "
             f"FreeU {'on' if args.freeu else 'off'}; {args.steps} DDIM step(s), the preset's first "
             "(dilated, noise-damped guidance where the preset has it).", "",
             "| image | preset | weights (GiB) | sampling peak (GiB) | decoding peak (GiB) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['W']}×{r['H']} | {r['preset'] or 'direct'} | {r['weights_gib']:.2f} | "
                     f"{r['phases']['sampling']['peak_gib']:.2f} | {r['phases']['decoding']['peak_gib']:.2f} |")
    table = "\n".join(lines) + "\n"
    publish(table, args, f"memory-{Path(args.config).stem}")
    return rows


# ------------------------------------------------------------------------------------------------
# dispersed convolution, one layer at a time: direct 5x5 vs the basis path vs the plain 3x3


def add_dispersion_layers_parser(sub):
    d = sub.add_parser("dispersion-layers",
                       help="one convolution layer: plain 3x3 vs dispersed (direct 5x5 with the per-call kernel "
                            "map, direct with a kept kernel, basis path), to set the per-layer path rule")
    d.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    d.add_argument("--shapes", nargs="+", default=["320:16", "320:32", "320:64", "640:16", "640:32", "640:64",
                                                    "1280:8", "1280:16", "1280:32", "2560-1280:8", "2560-1280:16",
                                                    "1280s2:16"],
                   help="IN[-OUT][s2]:SIDE (s2 = stride-2 downsampling conv), e.g. 2560-1280:8")
    d.add_argument("--factor", type=float, default=4.0, help="re-dilation factor (dispersed: dilation factor/2)")
    d.add_argument("--batch", type=int, default=2)
    d.add_argument("--repeats", type=int, default=5)
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--write", type=str, default=None)
    d.add_argument("--key", type=str, default=None)


def _parse_layer_shape(text):
    chans, side = text.split(":")
    stride = 2 if chans.endswith("s2") else 1
    chans = chans[:-2] if stride == 2 else chans
    c_in, _, c_out = chans.partition("-")
    return int(c_in), int(c_out or c_in), int(side), stride


def _median_time(fn, repeats, sync):
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def dispersion_layers(args):
    """Time the dispersion paths of one layer per shape; ratios against the plain 3x3 conv (same dilation)."""
    import torch
    from ldm.unet_hooks.dispersion import disperse_kernel, get_dispersion_transform
    from ldm.unet_hooks.redilation import Dispersion, ReDilation, choose_dispersion_path
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    R = torch.as_tensor(get_dispersion_transform(), dtype=torch.float32)
    rows = []
    for text in args.shapes:
        c_in, c_out, side, stride = _parse_layer_shape(text)
        conv = torch.nn.Conv2d(c_in, c_out, 3, stride, 1).to(device, dtype).requires_grad_(False)
        x = torch.randn(args.batch, c_in, side, side, device=device, dtype=dtype)
        kept = {}
        Dispersion(args.factor, R, kept, path="direct")(conv, x)  # fills the kept kernel
        runs = {
            "plain 3x3 (re-dilated)": lambda: ReDilation(args.factor / 2)(conv, x),
            "direct, kernel per call": lambda: Dispersion(args.factor, R, None, path="direct")(conv, x),
            "direct, kernel kept": lambda: Dispersion(args.factor, R, kept, path="direct")(conv, x),
            "basis": lambda: Dispersion(args.factor, R, None, path="basis")(conv, x),
            "kernel map alone": lambda: disperse_kernel(conv.weight, R.to(device, dtype)),
        }
        with torch.no_grad():
            t = {name: _median_time(fn, args.repeats, sync) for name, fn in runs.items()}
        row = dict(shape=text, c_in=c_in, c_out=c_out, side=side, stride=stride, seconds=t,
                   auto=choose_dispersion_path(conv, x))
        rows.append(row)
        base = t["plain 3x3 (re-dilated)"]
        print(f"{text:>14}: " + ", ".join(f"{k} {v / base:.2f}x" for k, v in t.items() if k != "plain 3x3 (re-dilated)")
              + f"  (plain {base * 1e3:.2f} ms; auto -> {row['auto']})", flush=True)
    machine = machine_description(args.device)
    if args.device == "cpu":
        machine += "; load average at the end {:.1f} / {:.1f} / {:.1f} (1/5/15 min)".format(*os.getloadavg())
    lines = [f"### Dispersed convolution per layer, {args.device}", "",
             f"Machine: {machine}. Batch {args.batch}, factor {args.factor:g} (dispersed kernels at dilation "
             f"{args.factor / 2:g}, the plain 3x3 at the same dilation), {'fp16' if dtype == torch.float16 else 'fp32'}, "
             f"median of {args.repeats} after a warm-up. Times relative to the plain 3x3 convolution.", "",
             "| layer (in-out, side) | plain 3x3 (ms) | direct, kernel per call | direct, kernel kept | basis | "
             "kernel map alone | faster path | auto picks |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["seconds"]
        base = t["plain 3x3 (re-dilated)"]
        faster = "basis" if t["basis"] < t["direct, kernel per call"] else "direct"
        stride = ", stride 2" if r["stride"] == 2 else ""
        lines.append(f"| {r['c_in']}-{r['c_out']}, {r['side']}²{stride} | {base * 1e3:.2f} | "
                     f"{t['direct, kernel per call'] / base:.2f}× | {t['direct, kernel kept'] / base:.2f}× | "
                     f"{t['basis'] / base:.2f}× | {t['kernel map alone'] / base:.2f}× | {faster} | {r['auto']} |")
    table = "\n".join(lines) + "\n"
    publish(table, args, f"dispersion-layers-{args.device}")
    return rows


def add_methods_parser(sub):
    m = sub.add_parser("methods", help="every txt2img --method at one size: UNet evaluations per image, time and "
                                       "peak memory relative to direct sampling (one process, one model)")
    m.add_argument("--config", default=str(CONFIGS["sdxl"]), help="model config (default: SDXL base)")
    m.add_argument("--ckpt", default=None, help="real weights (e.g. checkpoints/demo/shapes32.ckpt); default: random")
    m.add_argument("--size", type=int, nargs="+", default=[2048], help="image side, or H W, in pixels")
    m.add_argument("--steps", type=int, default=50)
    m.add_argument("--methods", nargs="+", default=None, help="default: all of scripts/txt2img.py --method")
    m.add_argument("--extra", nargs="*", default=[], metavar="METHOD=FLAGS",
                   help="more txt2img flags for one method, e.g. sdsr='--sr_ckpt random'")
    m.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    m.add_argument("--threads", type=int, default=None)
    m.add_argument("--prompt", default="a professional photograph of an astronaut riding a horse")
    m.add_argument("--write", default=None)
    m.add_argument("--key", default=None)


def methods_table(args):
    """Runs the txt2img pipeline (ldm/pipelines/txt2img.py run()) once per method of the registry in this process.
    With random weights the pipeline's loader seam builds random-weight models (cached per config, so every method
    shares one model); a forward pre-hook on each UNet counts evaluations (batch elements) and their latent area;
    the sampler seam times the sampler's runs."""
    import shlex
    import tempfile
    import torch
    from omegaconf import OmegaConf

    from ldm.util import load_config_file
    if args.threads:
        torch.set_num_threads(args.threads)
    from ldm import methods as registry
    from ldm.checkpoint import load_model_from_config
    from ldm.pipelines import txt2img
    cuda = args.device == "cuda"
    H, W = (args.size[0], args.size[0]) if len(args.size) == 1 else args.size[:2]
    config = load_config_file(args.config, flag="--config")
    family = txt2img.model_family(config)
    prefix = {"sdxl": "sdxl", "sd2": "sd2.1", "sd1": "sd1.5"}.get(family, family)
    counter = {"evals": 0, "area": 0, "sampling_s": 0.0}
    models = {}

    def count(module, inputs):
        x = inputs[0]
        counter["evals"] += x.shape[0]
        counter["area"] += x.shape[0] * x.shape[-2] * x.shape[-1]

    def hooked(model):
        unet = model.model.diffusion_model
        if getattr(unet, "_benchmark_hook", None) is None:
            unet._benchmark_hook = unet.register_forward_pre_hook(count)
        return model

    def random_model(cfg, ckpt, device=None, **kw):  # the pipeline's loader, with random weights
        from ldm.util import instantiate_from_config, no_weight_init
        key = OmegaConf.to_yaml(cfg)
        if key not in models:
            with no_weight_init():
                model = instantiate_from_config(cfg.model).eval().requires_grad_(False)
            model.to(device)
            random_weights_(model)
            models[key] = model
        return hooked(models[key])

    def real_model(*a, **k):
        return hooked(load_model_from_config(*a, **k))

    class TimedSampler:  # the sampler seam: every run (cascades: one per stage) timed
        def __init__(self, sampler):
            self.sampler = sampler

        def __getattr__(self, name):
            return getattr(self.sampler, name)

        def run(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = self.sampler.run(*a, **k)
            if cuda:
                torch.cuda.synchronize()
            counter["sampling_s"] += time.perf_counter() - t
            return out

    tmp_dir = tempfile.TemporaryDirectory()
    ckpt = args.ckpt
    if ckpt is None:  # a placeholder file for the checks that a checkpoint exists; the loader ignores it
        from safetensors.torch import save_file
        ckpt = str(Path(tmp_dir.name) / "random.safetensors")
        save_file({}, ckpt)
    extra = {"sdsr": ["--sr_config", str(REPO_ROOT / "configs/stable-diffusion/x4-upscaling.yaml"),
                      "--sr_ckpt", ckpt]}
    given = {}  # the --extra flags, shown in the table
    for item in args.extra:
        name, _, flags = item.partition("=")
        extra[name] = given[name] = shlex.split(flags)
    methods = args.methods or list(registry.names())
    methods = methods if "direct" in methods else ["direct"] + methods  # the reference of every ratio
    rows = []
    with tmp_dir as tmp:
        def argv_for(method):
            argv = ["--prompt", args.prompt, "--config", args.config, "--ckpt", ckpt,
                    "--H", str(H), "--W", str(W), "--steps", str(args.steps), "--method", method,
                    "--n_samples", "1", "--n_iter", "1", "--seed", "42", "--skip_grid", "--device", args.device,
                    "--outdir", str(Path(tmp) / method)]
            cls = registry.method_class(method)
            if cls.preset_flag:  # the method's preset made for the benchmark's size, where one exists
                name = "demo" if "configs/demo/" in Path(args.config).resolve().as_posix() else prefix
                preset = REPO_ROOT / "configs" / cls.preset_dir / f"{name}_{W}x{H}.yaml"
                if preset.is_file():
                    argv += [cls.preset_flag, str(preset)]
            return argv + extra.get(method, [])

        def one(method):
            opt = txt2img.build_parser().parse_args(argv_for(method))
            counter.update(evals=0, area=0, sampling_s=0.0)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            txt2img.run(opt, loader=random_model if args.ckpt is None else real_model, wrap_sampler=TimedSampler)
            if cuda:
                torch.cuda.synchronize()
            rec = {"method": method, "seconds": time.perf_counter() - t, "sampling_s": counter["sampling_s"],
                   "unet_evals": counter["evals"], "unet_area": counter["area"],
                   "preset": next((a for a in argv_for(method) if a.endswith(".yaml") and "configs/" in a
                                   and a != args.config), None),
                   "flags": given.get(method, [])}
            if cuda:
                rec["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            return rec

        print("warm-up (direct, model build) ...", flush=True)
        try:
            one("direct")  # model build, kernel selection: not timed
        except Exception as err:  # noqa: BLE001
            raise SystemExit(f"direct sampling failed: {err}")
        for method in methods:
            try:
                rec = one(method)
            except Exception as err:  # noqa: BLE001 - one method's failure is a row, not the end of the table
                rec = {"method": method, "error": f"{type(err).__name__}: {err}"[:300]}
            print("RESULT " + json.dumps(rec), flush=True)
            rows.append(rec)
    direct = next((r for r in rows if r["method"] == "direct" and "error" not in r), None)
    machine = machine_description(args.device)
    lines = [f"### Methods at {W}x{H}: {Path(args.config).name}, {args.device}", "",
             f"Machine: {machine}. {'Weights ' + args.ckpt if args.ckpt else 'Random weights'}; {args.steps} DDIM "
             f"steps, batch 1, scripts/txt2img.py defaults otherwise (precision "
             f"{'half' if cuda else 'float32'}); the preset made for this size where the method has one. "
             "UNet evaluations: batch elements through the UNet per image (a guided step of direct sampling is 2); "
             "latent area: their summed latent pixels relative to direct. Total time includes text encoding, "
             "decoding and writing the PNG.", "",
             "| method | preset, flags | UNet evals / image | latent area vs direct | sampling s | vs direct | total s "
             "| vs direct |" + (" peak GiB |" if cuda else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "")]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | – | failed: {r['error']} |" + " |" * (6 if cuda else 5))
            continue
        rel = (lambda a, b: f"{a / b:.2f}×") if direct else (lambda a, b: "–")
        lines.append(
            f"| {r['method']} | {' '.join(([Path(r['preset']).name] if r['preset'] else []) + r['flags']) or '–'} | "
            f"{r['unet_evals']} | "
            f"{rel(r['unet_area'], direct['unet_area']) if direct else '–'} | {r['sampling_s']:.2f} | "
            f"{rel(r['sampling_s'], direct['sampling_s']) if direct else '–'} | {r['seconds']:.2f} | "
            f"{rel(r['seconds'], direct['seconds']) if direct else '–'} |" + (f" {r['peak_gib']:.2f} |" if cuda else ""))
    table = "\n".join(lines) + "\n"
    publish(table, args, f"methods-{Path(args.config).stem}-{H}x{W}-{args.device}")
    return rows




def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("unet", help="UNet step time and peak memory per mode and latent size")
    u.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    u.add_argument("--family", default="sd2", choices=sorted(CONFIGS),
                   help="sd2: SD 2.1 UNet; sdxl: SDXL base UNet (label_emb, 3 levels), SDXL presets")
    u.add_argument("--config", default=None, help="take the UNet from this config instead (e.g. a tiny one)")
    u.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    u.add_argument("--modes", nargs="+", default=["plain"],
                   help="plain redilate redilate_frac redilate_ndcfg disperse preset preset_corrected "
                        "(tools/benchmark_modes.py); preset = the preset made for each size")
    u.add_argument("--batch", type=int, default=2, help="2 = one classifier-free-guidance step")
    u.add_argument("--repeats", type=int, default=3)
    u.add_argument("--warmup", type=int, default=1, help="untimed evaluations first (0 for very slow sizes)")
    u.add_argument("--threads", type=int, default=None, help="CPU threads per measurement (default: torch's)")
    u.add_argument("--write", type=str, default=None, help="update this markdown file")
    u.add_argument("--key", type=str, default=None, help="section key in the markdown file")
    add_pipeline_parser(sub)
    add_dispersion_layers_parser(sub)
    add_methods_parser(sub)
    m = sub.add_parser("memory", help="estimated peak CUDA memory of whole sampling runs, no GPU needed "
                                      "(pipeline --simulate for several cases, one table)")
    m.add_argument("--config", default=str(CONFIGS["sdxl"]), help="model config (default: SDXL base)")
    m.add_argument("--cases", nargs="+", required=True,
                   help="SIZE or HxW, optionally :PRESET_YAML, e.g. 4096 4096:configs/scalecrafter/sdxl_4096x4096.yaml")
    m.add_argument("--steps", type=int, default=1)
    m.add_argument("--precision", choices=["half", "autocast", "full"], default="half")
    m.add_argument("--freeu", action="store_true")
    m.add_argument("--cap_gib", type=float, default=None, help="the card's memory (default 24)")
    m.add_argument("--write", type=str, default=None)
    m.add_argument("--key", type=str, default=None)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_child"]:  # internal: one measurement in its own process (not listed in --help)
        return measure_once(child_parser().parse_args(argv[1:]))
    args = p.parse_args(argv)
    from ldm.inference import UsageError
    try:
        return run_command(args)
    except UsageError as err:  # a config or preset that cannot be read or is refused: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2


def run_command(args):
    if args.cmd == "dispersion-layers":
        return dispersion_layers(args)
    if args.cmd == "methods":
        return methods_table(args)
    if args.cmd == "memory":
        return memory_table(args)
    if args.cmd == "pipeline":
        return simulate_pipeline(args) if args.simulate else run_pipeline(args)
    from tools.benchmark_modes import mode_available
    results = []
    for size in args.sizes:
        for mode in args.modes:
            if not mode_available(mode, size, args.family):
                print(f"{mode:>10} {size:>4}² latent: no preset for {8 * size}², skipped", flush=True)
                continue
            r = run_child(mode, size, args.device, args.batch, args.repeats, args.family, args.config,
                          args.threads, args.warmup)
            print(f"{mode:>10} {size:>4}² latent: {r['seconds']:.3f} s/step, peak {r['peak_gib']:.2f} GiB", flush=True)
            results.append(r)
    import torch  # noqa: F401
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_description(args.device)
    if args.device == "cpu":
        machine += "; load average at the end {:.1f} / {:.1f} / {:.1f} (1/5/15 min)".format(*os.getloadavg())
    title = f"{FAMILY_TITLES[args.family]} UNet" + (f" ({Path(args.config).name})" if args.config else "")
    table = format_table(results, f"{title}, {args.device}", machine, args.warmup)
    family = args.family + "-" if args.family != "sd2" else ""
    publish(table, args, f"unet-{family}{args.device}-{'-'.join(args.modes)}")


if __name__ == "__main__":
    rc = main()  # the commands return their results (dicts) to Python callers; errors return 2
    sys.exit(rc if isinstance(rc, int) else 0)
