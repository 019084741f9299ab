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

from ldm.util import float_range, positive_float, positive_int  # noqa: E402  (argparse types: finite numbers in range)

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
    q.add_argument("--no_tiled", action="store_true",
                   help="no tiling options: the decoder picks one piece or tiles from the free memory (as "
                        "scripts/txt2img.py does by default); same as --decode auto")
    q.add_argument("--decode", choices=["tiled", "auto"], default="tiled",
                   help="tiled: tiles with synchronized GroupNorm (the tables above); auto: the decoder's own plan")
    q.add_argument("--lowvram", action="store_true", help="as scripts/txt2img.py --lowvram (text encoders in host "
                                                          "memory except while encoding)")
    q.add_argument("--sequential_offload", action="store_true", help="as scripts/txt2img.py --sequential_offload")
    q.add_argument("--tile_size", type=int, default=None, help="tile side in latent pixels (default: the decoder's)")
    q.add_argument("--freeu", action="store_true", help="FreeU on, with the family's values")
    q.add_argument("--prompt", default="a professional photograph of an astronaut riding a horse",
                   help="the prompt (the demo model knows only its own words, e.g. 'a red circle')")
    q.add_argument("--ckpt", default=None,
                   help="load these weights instead of random ones (e.g. checkpoints/demo/shapes32.ckpt)")
    q.add_argument("--cap_gib", type=positive_float, default=None,
                   help="cap this process's CUDA memory (e.g. 24 on a larger GPU: a run that needs more fails)")
    q.add_argument("--write", type=str, default=None, help="update this markdown file")
    q.add_argument("--simulate", action="store_true",
                   help="no GPU needed: run on fake CUDA tensors (shapes only, see tools/fake_cuda.py) and report the "
                        "estimated peak CUDA memory per phase (a lower bound: no cuDNN workspaces, no fragmentation)")
    q.add_argument("--key", type=str, default=None, help="section key in the markdown file")


def preset_label(path):
    """A preset's name with its folder (ScaleCrafter and FreeScale presets share file names), or None."""
    return f"{Path(path).parent.name}/{Path(path).name}" if path else None


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
    return phase("sampling", lambda: runner.sample(sampler, steps, c, uc, 5.0, batch_size=1)).latent


def tiling_options(args, **extra):
    """Tiled decoding with synchronized GroupNorm, unless ``--no_tiled`` / ``--decode auto`` (no options: the
    decoder's plan from the free memory)."""
    if args.no_tiled or getattr(args, "decode", "tiled") == "auto":
        return {}
    return {"overlap": 24, "sync_gn": True, **({"tile_size": args.tile_size} if args.tile_size else {}), **extra}


def measure_pipeline(model, args, preset, H, W):
    """One guided sampling run of ``model`` (text encoders, ``args.steps`` DDIM steps with the preset, decoding),
    time and CUDA peaks per phase. Returns (phases, the decoding plan or None, seconds, weights GiB)."""
    import torch
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.inference import memory_scope
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if hasattr(model, "set_size_conditioning"):
        model.set_size_conditioning((H, W))
    guidance, freeu_scope = method_scopes(model, preset, args.freeu)
    autocast = torch.autocast("cuda", dtype=torch.float16) if cuda and args.precision != "full" else nullcontext()
    phases = {}
    if cuda:
        torch.cuda.synchronize(device)
    weights_gib = torch.cuda.memory_allocated(device) / 2 ** 30 if cuda else None
    low_memory = memory_scope(SimpleNamespace(lowvram=args.lowvram, sequential_offload=args.sequential_offload,
                                              precision=args.precision), model, device,
                              (H // latent_factor(model), W // latent_factor(model)), 1)
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
        rec = {"seconds": time.perf_counter() - last["t"]}
        if cuda:
            torch.cuda.synchronize(device)
            rec["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            rec["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2 ** 30
            torch.cuda.reset_peak_memory_stats(device)
        phases[name] = rec
        print(f"  {name}: {rec}", flush=True)
        last["t"] = time.perf_counter()

    t_run = time.perf_counter()
    with torch.no_grad(), autocast, freeu_scope, low_memory:
        guided_run(model, DDIMSampler(model), guidance, H, W, args.steps, phase, lambda: tiling_options(args),
                   preset, mark, args.prompt)
    run_s = time.perf_counter() - t_run
    plan = getattr(getattr(model, "first_stage_model", None), "last_plan", None)
    return phases, plan, run_s, weights_gib


def build_pipeline_model(args):
    """The model of ``args.config`` on ``args.device`` with random weights (or ``args.ckpt``), frozen, its UNet and
    text encoders in float16 with ``--precision half`` (as scripts/txt2img.py). Returns (model, seconds)."""
    import torch
    from ldm.util import load_config_file
    from ldm.inference import cast_for_half_precision
    from ldm.util import instantiate_from_config, no_weight_init
    device = torch.device(args.device)
    config = load_config_file(args.config, flag="--config")
    t0 = time.perf_counter()
    with no_weight_init():
        model = instantiate_from_config(config.model).eval().requires_grad_(False)  # as load_model_from_config
    if args.precision == "half" and device.type == "cuda":
        cast_for_half_precision(model, torch.float16)
    model.to(device)
    if getattr(args, "ckpt", None):
        from ldm.checkpoint import load_checkpoint_into
        load_checkpoint_into(model, args.ckpt)
    else:
        random_weights_(model)
    return model, time.perf_counter() - t0


def set_cap(device, cap_gib):
    """Cap this process's CUDA memory at ``cap_gib`` (None: the whole card), cached blocks released."""
    import torch
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2 ** 30 / total) if cap_gib else 1.0,
                                               torch.cuda.current_device())


def run_pipeline(args):
    import torch
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and args.cap_gib:
        set_cap(device, args.cap_gib)
    preset, H, W = pipeline_size(args)
    model, build_s = build_pipeline_model(args)
    phases, plan, run_s, weights_gib = measure_pipeline(model, args, preset, H, W)
    auto = not tiling_options(args)
    res = {"config": Path(args.config).name, "preset": Path(args.preset).name if args.preset else None,
           "H": H, "W": W, "steps": args.steps, "precision": args.precision if cuda else "full",
           "tiled": not auto, "decode": "auto" if auto else "tiled", "lowvram": args.lowvram,
           "sequential_offload": args.sequential_offload, "freeu": args.freeu, "cap_gib": args.cap_gib,
           "build_seconds": build_s, "run_seconds": run_s, "decode_plan": plan.describe() if plan else None,
           "weights_gib": weights_gib, "phases": phases, "machine": machine_description(args.device)}
    if cuda:
        res["peak_gib"] = max(r["peak_gib"] for r in phases.values())
    if not cuda:
        res["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print("RESULT " + json.dumps(res))
    lines = [f"### Sampling run: {res['config']}, {res['preset'] or 'direct'}, {W}x{H}, {args.device}", "",
             f"Machine: {res['machine']}. Precision {res['precision']}, "
             f"{'tiled decoding with synchronized GroupNorm' if res['tiled'] else 'decoding as planned: ' + str(res['decode_plan'])}"
             f"{', --lowvram' if args.lowvram else ''}{', --sequential_offload' if args.sequential_offload else ''}, "
             f"FreeU {'on' if args.freeu else 'off'}"
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

        from ldm import memory as ldm_memory
        from ldm.inference import memory_scope
        real_available = ldm_memory.available_bytes

        def simulated_available(device):  # the card of --cap_gib, less what the fake run holds
            if torch.device(device).type == "cuda":
                return max(0, int(cap - fc.current_bytes))
            return real_available(device)
        ldm_memory.available_bytes = simulated_available
        low_memory = memory_scope(SimpleNamespace(lowvram=getattr(args, "lowvram", False),
                                                  sequential_offload=getattr(args, "sequential_offload", False),
                                                  precision=args.precision), model, torch.device("cuda"),
                                  (H // latent_factor(model), W // latent_factor(model)), 1)
        with fc.tracking(), autocast, freeu_scope, fused_attention(), low_memory:
            # offload=None on a real card: the budget computed from the memory free when decoding starts
            def mark(name):  # a FreeScale stage: the peak since the previous mark
                phases[name] = {"peak_gib": fc.peak_bytes / 2 ** 30, "start_gib": stage_start[0] / 2 ** 30}
                fc.counter.reset_peak()
                stage_start[0] = fc.current_bytes
            stage_start = [fc.current_bytes]

            try:
                guided_run(model, sampler, guidance, H, W, args.steps, phase,
                           lambda: tiling_options(args, device_budget=default_device_budget(cap - fc.current_bytes)),
                           preset, mark)
            finally:
                ldm_memory.available_bytes = real_available
    plan = getattr(getattr(model, "first_stage_model", None), "last_plan", None)
    auto = not tiling_options(args)
    res = {"config": Path(args.config).name, "preset": preset_label(args.preset),
           "H": H, "W": W, "steps": args.steps, "precision": args.precision, "tiled": not auto,
           "decode_plan": plan.describe() if plan is not None and auto else None,
           "lowvram": getattr(args, "lowvram", False), "cap_gib": args.cap_gib,
           "freeu": args.freeu, "weights_gib": weights / 2 ** 30, "phases": phases, "simulated": True}
    print("RESULT " + json.dumps(res))
    lines = [f"### Estimated CUDA memory: {res['config']}, {res['preset'] or 'direct'}, {W}x{H}", "",
             f"Simulated with fake CUDA tensors on a CPU (`--simulate`, `tools/fake_cuda.py`): live tensor bytes, "
             f"a lower bound of `torch.cuda.max_memory_allocated` (no cuDNN workspaces, no allocator "
             f"fragmentation). Precision {args.precision}, "
             f"{'tiled decoding with synchronized GroupNorm' if res['tiled'] else 'decoding as planned: ' + str(res['decode_plan'])}"
             f"{', --lowvram' if res['lowvram'] else ''}, FreeU {'on' if args.freeu else 'off'}; "
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
                                freeu=args.freeu, cap_gib=args.cap_gib, write=None, key=None, decode=args.decode,
                                lowvram=args.lowvram)
        rows.append(simulate_pipeline(ns))
    cap = args.cap_gib or 24.0
    lines = [f"### Estimated peak CUDA memory: {Path(args.config).name}, {args.precision} precision", "",
             "Simulated on a CPU with fake CUDA tensors (`scripts/benchmark.py memory`, `tools/fake_cuda.py`): live "
             "tensor bytes at the peak, weights included, attention as the fused kernels allocate it. A lower bound "
             "of `torch.cuda.max_memory_allocated()` (no cuDNN workspaces, no allocator fragmentation); "
             + (f"tiled VAE decoding with synchronized GroupNorm and the default placement for a {cap:g} GiB card; "
                if args.decode == "tiled" else
                f"decoding as `AutoencoderKL.decode_auto` plans it for a {cap:g} GiB card (the free memory it sees "
                "is the card's less the simulated allocations); ")
             + ("`--lowvram` (text encoders in host memory except while encoding); " if args.lowvram else "")
             + f"FreeU {'on' if args.freeu else 'off'}; {args.steps} DDIM step(s), the preset's first "
             "(dilated, noise-damped guidance where the preset has it).", "",
             "| image | preset | weights (GiB) | sampling peak (GiB) | decoding peak (GiB) |"
             + (" decoding plan |" if args.decode == "auto" else ""),
             "|---|---|---|---|---|" + ("---|" if args.decode == "auto" else "")]
    for r in rows:
        lines.append(f"| {r['W']}×{r['H']} | {r['preset'] or 'direct'} | {r['weights_gib']:.2f} | "
                     f"{r['phases']['sampling']['peak_gib']:.2f} | {r['phases']['decoding']['peak_gib']:.2f} |"
                     + (f" {r['decode_plan']} |" if args.decode == "auto" else ""))
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
    d.add_argument("--factor", type=float_range(1), default=4.0, help="re-dilation factor (dispersed: dilation factor/2)")
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
    m.add_argument("--flags", default="", help="more txt2img flags for every method, e.g. '--lowvram'")
    m.add_argument("--cap_gib", type=positive_float, default=None,
                   help="cap this process's CUDA memory (torch.cuda.set_per_process_memory_fraction); with "
                        "--simulate: the card simulated (default 24)")
    m.add_argument("--simulate", action="store_true",
                   help="no GPU needed: the real txt2img run of every method on fake CUDA tensors (random weights, "
                        "tools/simulation.py); estimated peak CUDA memory per phase, the decoding plan and the "
                        "window batches each method chose for the card")
    m.add_argument("--cards", nargs="+", default=None, metavar="GIB[:FLAGS]",
                   help="with --simulate: one simulated run of every method per card, e.g. '8:--lowvram "
                        "--precision half' '12:--precision half' (FLAGS after --flags; default: --cap_gib)")
    m.add_argument("--write", default=None)
    m.add_argument("--key", default=None)


def placeholder_ckpt(args, folder):
    """``args.ckpt``, else an empty safetensors file in ``folder`` for the pipeline's checks that a checkpoint
    exists (the random-weight loaders ignore it)."""
    if args.ckpt is not None:
        return args.ckpt
    from safetensors.torch import save_file
    ckpt = str(Path(folder) / "random.safetensors")
    save_file({}, ckpt)
    return ckpt


def methods_extra(args, ckpt):
    """(flags per method: SD+SR's upscaler and the ``--extra`` flags, the ``--extra`` flags alone)."""
    import shlex
    extra = {"sdsr": ["--sr_config", str(REPO_ROOT / "configs/stable-diffusion/x4-upscaling.yaml"),
                      "--sr_ckpt", ckpt]}
    given = {}  # the --extra flags, shown in the table
    for item in args.extra:  # after the defaults (a flag given again overrides them)
        name, _, flags = item.partition("=")
        given[name] = shlex.split(flags)
        extra[name] = extra.get(name, []) + given[name]
    return extra, given


def method_argv(args, method, H, W, ckpt, outdir, prefix, device, flags):
    """scripts/txt2img.py's arguments for one method of the ``methods`` benchmark: one image of H x W, the
    method's preset made for that size where one exists (``prefix``: the presets' family prefix), ``flags`` last."""
    from ldm import methods as registry
    argv = ["--prompt", args.prompt, "--config", args.config, "--ckpt", ckpt,
            "--H", str(H), "--W", str(W), "--steps", str(args.steps), "--method", method,
            "--n_samples", "1", "--n_iter", "1", "--seed", "42", "--skip_grid", "--device", device,
            "--outdir", str(outdir)]
    cls = registry.method_class(method)
    if cls.preset_flag:  # the method's preset made for the benchmark's size, where one exists
        name = "demo" if "configs/demo/" in Path(args.config).resolve().as_posix() else prefix
        preset = REPO_ROOT / "configs" / cls.preset_dir / f"{name}_{W}x{H}.yaml"
        if preset.is_file():
            argv += [cls.preset_flag, str(preset)]
    return argv + list(flags)


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
    if cuda and args.cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2 ** 30 / total))
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
    ckpt = placeholder_ckpt(args, tmp_dir.name)
    extra, given = methods_extra(args, ckpt)
    methods = args.methods or list(registry.names())
    methods = methods if "direct" in methods else ["direct"] + methods  # the reference of every ratio
    rows = []
    with tmp_dir as tmp:
        def argv_for(method):
            return method_argv(args, method, H, W, ckpt, Path(tmp) / method, prefix, args.device,
                               extra.get(method, []) + shlex.split(args.flags))

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
             f"{'half' if cuda else 'float32'}){'; flags ' + args.flags if args.flags else ''}"
             f"{f'; CUDA memory capped at {args.cap_gib:g} GiB' if args.cap_gib else ''}; the preset made for "
             "this size where the method has one. "
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




def parse_cards(args):
    """``--cards GIB[:FLAGS]`` as [(GiB, [flags])]; without it one card of ``--cap_gib`` (default 24)."""
    import shlex
    from ldm.errors import UsageError
    cards = []
    for item in args.cards or [f"{args.cap_gib or 24.0:g}"]:
        size, _, flags = item.partition(":")
        try:
            gib = positive_float(size)
        except (argparse.ArgumentTypeError, ValueError):
            raise UsageError(f"--cards {item!r}: the card's memory must be a positive number of GiB, then "
                             "optionally ':' and txt2img flags, e.g. '8:--lowvram --precision half'") from None
        cards.append((gib, shlex.split(flags)))
    return cards


def simulate_methods(args):
    """``methods --simulate``: the txt2img run (``ldm.pipelines.txt2img.run``) of every method on fake CUDA tensors
    for each simulated card (``tools/simulation.py``): the methods' own memory decisions (decoding plan, window
    batches, text encoders off the GPU) are made for that card. Returns {card GiB: [rows]}."""
    import shlex
    import tempfile
    from ldm import memory
    from ldm import methods as registry
    from ldm.pipelines import txt2img
    from ldm.util import load_config_file
    from tools.simulation import GiB, Simulation
    cards = parse_cards(args)
    H, W = (args.size[0], args.size[0]) if len(args.size) == 1 else args.size[:2]
    config = load_config_file(args.config, flag="--config")
    family = txt2img.model_family(config)
    prefix = {"sdxl": "sdxl", "sd2": "sd2.1", "sd1": "sd1.5"}.get(family, family)
    methods = list(args.methods or registry.names())
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = placeholder_ckpt(args, tmp)
        # SD+SR's x4 upscaler runs --steps steps too (its memory does not depend on them; 50 by default)
        extra, given = methods_extra(argparse.Namespace(extra=[f"sdsr=--sr_steps {args.steps}"] + list(args.extra)),
                                     ckpt)
        for gib, card_flags in cards:
            rows, main = [], []
            with Simulation(gib * GiB) as sim:
                for method in methods:
                    flags = extra.get(method, []) + shlex.split(args.flags) + card_flags
                    argv = method_argv(args, method, H, W, ckpt, Path(tmp) / f"{gib:g}" / method, prefix, "cuda", flags)
                    rec = {"method": method, "flags": given.get(method, []) + shlex.split(args.flags) + card_flags,
                           "preset": next((a for a in argv if a.endswith(".yaml") and "configs/" in a
                                           and a not in (args.config, *extra.get(method, []))), None)}
                    try:
                        opt = txt2img.build_parser().parse_args(argv)
                        sim.forget_models(keep=main)  # the base model is kept between methods, the x4 upscaler not
                        sim.start_run()
                        used, resident = [], []

                        def loader(*a, **k):
                            m = sim.loader(*a, **k)
                            used.append(m)
                            return m

                        class Resident:  # the sampler seam: what is on the GPU when sampling starts
                            def __init__(self, sampler):
                                self.sampler = sampler

                            def __getattr__(self, name):
                                return getattr(self.sampler, name)

                            def run(self, *a, **k):
                                if not resident:
                                    resident.append(sim.current_bytes)
                                with sim.phase("sampling"):
                                    return self.sampler.run(*a, **k)

                        txt2img.run(opt, loader=loader, wrap_sampler=Resident, to_image=sim.to_image)
                        phases = sim.finish_run()
                        seen = []
                        for m in used:
                            if not any(m is x for x in seen):
                                seen.append(m)
                        rec.update(
                            weights_gib=sum(memory.module_bytes(m) for m in seen) / GiB,
                            resident_gib=resident[0] / GiB if resident else None,
                            phases={k: v / GiB for k, v in phases.items()},
                            peak_gib=max(phases.values()) / GiB,
                            plans=[{"latent": list(shape[-2:]) if shape else None, "plan": plan}
                                   for shape, plan in sim.plans],
                            batches=sim.batches, images=[list(s) for s in sim.images])
                        rec["fits"] = rec["peak_gib"] <= gib
                        main = used[:1]
                        used.clear()
                        seen.clear()
                        sim.forget_models(keep=main)
                        rec["after_gib"] = sim.current_bytes / GiB  # what the run left on the GPU (the weights)
                    except Exception as err:  # noqa: BLE001 - one method's failure is a row, not the end of the table
                        if os.environ.get("SIMULATE_TRACEBACK"):
                            import traceback
                            traceback.print_exc()
                        rec["error"] = f"{type(err).__name__}: {err}"[:300]
                    print("RESULT " + json.dumps({"card_gib": gib, **rec}), flush=True)
                    rows.append(rec)
            results[gib] = rows
    publish(simulated_methods_table(args, cards, results, H, W),
            args, f"methods-simulated-{Path(args.config).stem}-{H}x{W}")
    return results


def simulated_methods_table(args, cards, results, H, W):
    """The markdown of ``simulate_methods``'s results: one table per card."""
    import shlex
    lines = [f"### Estimated peak CUDA memory of every method: {Path(args.config).name}, {W}x{H}", "",
             "Simulated on a CPU (`scripts/benchmark.py methods --simulate`, `tools/simulation.py`): the real "
             "`scripts/txt2img.py` run of each method (`ldm.pipelines.txt2img.run`, random weights) on fake CUDA "
             "tensors, so that each method's own memory decisions (decoding plan, window batches, text encoders "
             "off the GPU) are made for the simulated card, whose free memory is its size less the simulated "
             "allocations. Live tensor bytes at the peak, weights included, attention as the fused kernels "
             "allocate it: a lower bound of `torch.cuda.max_memory_allocated()` (no cuDNN workspaces, no allocator "
             f"fragmentation). {args.steps} DDIM step(s) (per stage for the cascades), batch 1, the preset made for "
             "this size where the method has one. *weights*: every model the run loads (the x4 upscaler's for "
             "SD+SR); *when sampling starts*: what is on the GPU then (`--lowvram`: the text encoders are in host "
             "memory); the phases: loading (a model built on its first use: the base model in the first method's "
             "run, the x4 upscaler in SD+SR's), other (setting up, moving weights, resizing latents between cascade "
             "stages), text encoders (prompt encoding), sampling (the sampler's runs), decoding (every VAE decode: the cascades' intermediate ones and the x4 "
             "upscaler's too), upscaling (SD+SR's x4 sampling); *window batches*: windows per UNet call chosen "
             "from the free memory (`ldm.memory.fitting_batch`, chosen of requested; the smallest of the run).", ""]
    for gib, card_flags in cards:
        rows = results[gib]
        lines += [f"#### {gib:g} GiB card, flags `{' '.join(shlex.split(args.flags) + card_flags) or 'none'}`", "",
                  "| method | preset | weights (GiB) | when sampling starts (GiB) | loading peak (GiB) | other peak "
                  "(GiB) | text encoders peak (GiB) | sampling peak (GiB) | decoding peak (GiB) | upscaling peak (GiB) "
                  f"| peak (GiB) | within {gib:g} GiB | window batches | decoding plan (largest latent) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            preset = Path(r["preset"]).name if r.get("preset") else "–"
            if "error" in r:
                what = r["error"] if r["error"].startswith("not simulated") else f"failed: {r['error']}"
                lines.append(f"| {r['method']} | {preset} | {what} |" + " |" * 11)
                continue
            ph = r["phases"]
            cell = (lambda k: f"{ph[k]:.2f}" if k in ph else "–")  # noqa: E731
            batches = {}
            for b in r["batches"]:
                key = b["caller"].rsplit(".", 1)[-1]
                if key not in batches or b["chosen"] / b["requested"] < batches[key][0] / batches[key][1]:
                    batches[key] = (b["chosen"], b["requested"])
            batch_text = ", ".join(f"{k}: {c} of {q}" for k, (c, q) in batches.items()) or "–"
            plans = [p for p in r["plans"] if p["latent"]]
            largest = max(plans, key=lambda p: p["latent"][0] * p["latent"][1]) if plans else None
            plan_text = (f"{largest['latent'][1]}x{largest['latent'][0]} latent: {largest['plan']}"
                         if largest and largest["plan"] else "–")
            lines.append(f"| {r['method']} | {preset} | {r['weights_gib']:.2f} | "
                         + (f"{r['resident_gib']:.2f}" if r["resident_gib"] is not None else "–")
                         + f" | {cell('loading')} | {cell('other')} | {cell('text encoders')} | {cell('sampling')} | {cell('decoding')} | {cell('upscaling')} | "
                         f"{r['peak_gib']:.2f} | {'yes' if r['fits'] else '**no**'} | {batch_text} | {plan_text} |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# memory targets (issue #27): each preset with the whole card and under a cap, the decoding as planned


def add_targets_parser(sub):
    t = sub.add_parser("targets", help="each preset's whole run (random weights) twice in one process: with the "
                                       "whole GPU and with its memory capped; peak memory, time and the ratio")
    t.add_argument("--config", default=str(CONFIGS["sdxl"]))
    t.add_argument("--presets", nargs="+", required=True, help="ScaleCrafter / FreeScale preset YAMLs")
    t.add_argument("--cap_gib", type=positive_float, required=True)
    t.add_argument("--steps", type=positive_int, default=2)
    t.add_argument("--precision", choices=["half", "autocast", "full"], default="half")
    t.add_argument("--lowvram", action="store_true")
    t.add_argument("--sequential_offload", action="store_true")
    t.add_argument("--freeu", action="store_true")
    t.add_argument("--project_steps", type=positive_int, default=50, help="steps of the projected ratio (a full run)")
    t.add_argument("--device", default="cuda", choices=["cuda"])
    t.add_argument("--prompt", default="a professional photograph of an astronaut riding a horse")
    t.add_argument("--write", default=None)
    t.add_argument("--key", default=None)


def targets_table(args):
    """The default run (decoding planned from the free memory) of every preset, first with the whole card, then
    with the process capped at ``--cap_gib``: does it fit, and what does the cap cost in time (measured with
    ``--steps`` steps, and projected to ``--project_steps``: text encoders + steps × the step time + decoding)."""
    import torch
    device = torch.device(args.device)
    model, _ = build_pipeline_model(argparse.Namespace(config=args.config, precision=args.precision,
                                                       device=args.device, ckpt=None))
    run_args = argparse.Namespace(device=args.device, steps=args.steps, precision=args.precision, freeu=args.freeu,
                                  lowvram=args.lowvram, sequential_offload=args.sequential_offload, no_tiled=True,
                                  decode="auto", prompt=args.prompt, tile_size=None)
    rows = []
    first = True
    for preset_path in args.presets:
        preset, H, W = pipeline_size(argparse.Namespace(preset=preset_path, size=None))
        if first:  # warm-up: kernel selection, the allocator
            measure_pipeline(model, argparse.Namespace(**{**vars(run_args), "steps": 1}), preset, H, W)
            first = False
        rec = {"preset": Path(preset_path).name, "H": H, "W": W}
        for name, cap in (("whole", None), ("capped", args.cap_gib)):
            set_cap(device, cap)
            torch.cuda.reset_peak_memory_stats(device)
            try:
                phases, plan, run_s, weights = measure_pipeline(model, run_args, preset, H, W)
                sampling = phases.get("sampling", {"seconds": 0.0})["seconds"]
                rec[name] = {"seconds": run_s, "peak_gib": max(r["peak_gib"] for r in phases.values()),
                             "reserved_gib": max(r["peak_reserved_gib"] for r in phases.values()),
                             "step_s": sampling / args.steps,
                             "fixed_s": run_s - sampling,  # text encoders and decoding
                             "plan": plan.describe() if plan is not None else None}
            except torch.OutOfMemoryError as err:
                rec[name] = {"error": f"out of memory: {str(err).splitlines()[0][:120]}"}
            print(f"{rec['preset']} {name}: {rec[name]}", flush=True)
        rows.append(rec)
    set_cap(device, None)
    machine = machine_description(args.device)
    lines = [f"### Memory target: {Path(args.config).name}, {args.cap_gib:g} GiB", "",
             f"Machine: {machine}. `scripts/benchmark.py targets`: random weights, precision {args.precision}"
             f"{', --lowvram' if args.lowvram else ''}{', --sequential_offload' if args.sequential_offload else ''}"
             f"{', FreeU' if args.freeu else ''}, decoding as `AutoencoderKL.decode_auto` plans it; each preset run "
             f"with the whole card, then with the process capped at {args.cap_gib:g} GiB "
             "(`torch.cuda.set_per_process_memory_fraction`), one process, one model. Time: "
             f"{args.steps} DDIM steps measured; *projected*: text encoders and decoding + {args.project_steps} × "
             "the step time, capped over whole.", "",
             "| preset | image | whole card: s, peak GiB | capped: s, peak GiB (reserved) | fits | time ratio "
             f"({args.steps} steps) | projected ({args.project_steps} steps) | decoding when capped |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w, c = r["whole"], r["capped"]
        if "error" in w or "error" in c:
            lines.append(f"| {r['preset']} | {r['W']}×{r['H']} | {w.get('error') or round(w['seconds'], 2)} | "
                         f"{c.get('error') or round(c['seconds'], 2)} | {'no' if 'error' in c else '–'} | – | – | – |")
            continue
        proj = lambda x: x["fixed_s"] + args.project_steps * x["step_s"]  # noqa: E731
        lines.append(f"| {r['preset']} | {r['W']}×{r['H']} | {w['seconds']:.2f}, {w['peak_gib']:.2f} | "
                     f"{c['seconds']:.2f}, {c['peak_gib']:.2f} ({c['reserved_gib']:.2f}) | "
                     f"{'yes' if c['reserved_gib'] <= args.cap_gib else 'no'} | {c['seconds'] / w['seconds']:.2f}× | "
                     f"{proj(c) / proj(w):.2f}× | {c['plan']} |")
    table = "\n".join(lines) + "\n"
    publish(table, args, f"targets-{Path(args.config).stem}-{args.cap_gib:g}gib")
    return rows


# ------------------------------------------------------------------------------------------------
# host memory of whole runs at small sizes (max RSS per process), and what --lowvram costs there


def add_rss_parser(sub):
    r = sub.add_parser("rss", help="peak host memory (max RSS) and time of whole scripts/txt2img.py runs, one process "
                                   "per method (the preset made for the size where the method has one)")
    r.add_argument("--config", default=str(REPO_ROOT / "configs/demo/shapes32.yaml"))
    r.add_argument("--ckpt", default=None,
                   help="weights (default: random ones, written by scripts/make_random_checkpoint.py)")
    r.add_argument("--size", type=positive_int, default=128, help="image side in pixels")
    r.add_argument("--steps", type=positive_int, default=10)
    r.add_argument("--methods", nargs="+", default=None,
                   help="default: every --method (sdsr needs --sr_config/--sr_ckpt: give it with --flags)")
    r.add_argument("--flags", default="", help="more scripts/txt2img.py flags for every run")
    r.add_argument("--prompt", default="a red circle")
    r.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads per run (1: on a shared machine OpenMP threads spin while a sibling is "
                        "descheduled, which inflates CPU time as well as wall time)")
    r.add_argument("--repeats", type=positive_int, default=3, help="runs per case (the fastest is reported)")
    r.add_argument("--lowvram", action="store_true",
                   help="each case also with --lowvram --sequential_offload: on a CPU nothing is copied, so the time "
                        "ratio is the cost of the offload's bookkeeping (hooks, parameter swaps) alone")
    r.add_argument("--write", default=None)
    r.add_argument("--key", default=None)


def rss_child(argv):
    """One txt2img run in this process: sampling and total time, max RSS, the decoding plan; prints RESULT."""
    import torch
    opts = json.loads(argv[0])
    torch.set_num_threads(int(opts["threads"]))
    from ldm.checkpoint import load_model_from_config
    from ldm.pipelines import txt2img
    seen = {}

    def loader(*a, **k):
        seen["model"] = load_model_from_config(*a, **k)
        return seen["model"]

    timing = {"sampling": 0.0, "sampling_cpu": 0.0}

    class Timed:
        def __init__(self, sampler):
            self.sampler = sampler

        def __getattr__(self, name):
            return getattr(self.sampler, name)

        def run(self, *a, **k):
            t, c = time.perf_counter(), time.process_time()
            out = self.sampler.run(*a, **k)
            timing["sampling"] += time.perf_counter() - t
            timing["sampling_cpu"] += time.process_time() - c  # all threads' CPU time: robust to a busy machine
            return out

    opt = txt2img.build_parser().parse_args(opts["argv"])
    t0 = time.perf_counter()
    txt2img.run(opt, loader=loader, wrap_sampler=Timed)
    total = time.perf_counter() - t0
    plan = getattr(getattr(seen.get("model"), "first_stage_model", None), "last_plan", None)
    print("RESULT " + json.dumps({"sampling_s": timing["sampling"], "sampling_cpu_s": timing["sampling_cpu"],
                                  "total_s": total,
                                  "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                                  "decode_plan": plan.describe() if plan is not None else "identity first stage"}))


def rss_table(args):
    import shlex
    import tempfile
    from ldm import methods as registry
    from ldm.pipelines import txt2img
    from ldm.util import load_config_file
    config = load_config_file(args.config, flag="--config")
    family = txt2img.model_family(config)
    demo = "configs/demo/" in Path(args.config).resolve().as_posix()
    prefix = "demo" if demo else {"sdxl": "sdxl", "sd2": "sd2.1", "sd1": "sd1.5"}.get(family, family)
    methods = args.methods or list(registry.names())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt
        if ckpt is None:
            from omegaconf import OmegaConf
            sys.path.insert(0, str(REPO_ROOT / "scripts"))
            import make_random_checkpoint as make
            ckpt = make.save_checkpoint(make.make_random_state_dict(OmegaConf.load(args.config), seed=0),
                                        Path(tmp) / "random.ckpt")
        for method in methods:
            cls = registry.method_class(method)
            argv = ["--config", args.config, "--ckpt", str(ckpt), "--prompt", args.prompt, "--H", str(args.size),
                    "--W", str(args.size), "--steps", str(args.steps), "--method", method, "--n_samples", "1",
                    "--seed", "42", "--skip_grid", "--device", "cpu", "--outdir", str(Path(tmp) / method)]
            preset = None
            if cls.preset_flag:
                candidate = REPO_ROOT / "configs" / cls.preset_dir / f"{prefix}_{args.size}x{args.size}.yaml"
                if candidate.is_file():
                    preset = candidate
                    argv += [cls.preset_flag, str(candidate)]
            variants = [("plain", [])] + ([("lowvram", ["--lowvram", "--sequential_offload"])] if args.lowvram else [])
            rec = {"method": method, "preset": preset.name if preset else None}
            for _ in range(args.repeats):  # variants interleaved; the fastest run of each (a shared machine)
                for name, extra in variants:
                    cmd = [sys.executable, __file__, "_rss_child",
                           json.dumps({"threads": args.threads, "argv": argv + shlex.split(args.flags) + extra})]
                    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
                    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
                    res = next((json.loads(line[7:]) for line in out.stdout.splitlines()
                                if line.startswith("RESULT ")), None)
                    if res is None:
                        err = (out.stderr.strip().splitlines() or ["failed"])[-1]
                        rec[name] = {"error": err[:200]}
                    elif name not in rec or "error" in rec[name]:
                        rec[name] = res
                    else:
                        old = rec[name]
                        rec[name] = {"sampling_s": min(old["sampling_s"], res["sampling_s"]),
                                     "sampling_cpu_s": min(old["sampling_cpu_s"], res["sampling_cpu_s"]),
                                     "total_s": min(old["total_s"], res["total_s"]),
                                     "max_rss_gib": max(old["max_rss_gib"], res["max_rss_gib"]),
                                     "decode_plan": res["decode_plan"]}
                    print(f"{method:>15} {name:>8}: {res}", flush=True)
            rows.append(rec)
    machine = machine_description("cpu") + "; load average at the end {:.1f} / {:.1f} / {:.1f} (1/5/15 min)".format(
        *os.getloadavg())
    head = ["| method | preset | sampling CPU s | sampling s | total s | max RSS (GiB) | decoding |"]
    if args.lowvram:
        head = ["| method | preset | sampling CPU s | sampling s | total s | max RSS (GiB) | decoding | with --lowvram "
                "--sequential_offload: sampling CPU s | CPU time ratio | max RSS (GiB) |"]
    lines = [f"### Host memory of whole runs: {Path(args.config).name}, {args.size}x{args.size}, cpu", "",
             f"Machine: {machine}. `scripts/benchmark.py rss`: one `scripts/txt2img.py` run per method in its own "
             f"process, {args.steps} DDIM steps, one image, the fastest of {args.repeats} runs (interleaved; "
             f"{args.threads} thread(s); *sampling CPU s*: the process's CPU time while sampling, which a busy "
             "machine disturbs far less than the wall time), "
             f"{'weights ' + str(args.ckpt) if args.ckpt else 'random weights'}; max RSS = the process's peak "
             "resident memory (Python, torch, the weights and the run). Total time includes loading and writing.", "",
             *head, "|---|---|---|---|---|---|---|" + ("---|---|---|" if args.lowvram else "")]
    for r in rows:
        p = r["plain"]
        if "error" in p:
            lines.append(f"| {r['method']} | {r['preset'] or '–'} | failed: {p['error']} | | | | |"
                         + (" | | |" if args.lowvram else ""))
            continue
        line = (f"| {r['method']} | {r['preset'] or '–'} | {p['sampling_cpu_s']:.2f} | {p['sampling_s']:.2f} | "
                f"{p['total_s']:.2f} | {p['max_rss_gib']:.2f} | {p['decode_plan'].split(':')[0]} |")
        if args.lowvram:
            q = r["lowvram"]
            if "error" in q:
                line += f" failed: {q['error']} | | |"
            else:
                line += (f" {q['sampling_cpu_s']:.2f} | {q['sampling_cpu_s'] / p['sampling_cpu_s']:.2f}× | "
                         f"{q['max_rss_gib']:.2f} |")
        lines.append(line)
    table = "\n".join(lines) + "\n"
    publish(table, args, f"rss-{Path(args.config).stem}-{args.size}")
    return rows


# ------------------------------------------------------------------------------------------------
# torch.compile with per-call processors: does a processor that changes per step recompile the UNet?


def add_compile_parser(sub):
    c = sub.add_parser("compile", help="torch.compile of a (tiny) UNet with ScaleCrafter's per-step processors: "
                                       "compilations per step (torch._dynamo counters) and step time vs eager")
    c.add_argument("--config", default=str(REPO_ROOT / "configs/tiny/tiny-sd2.yaml"))
    c.add_argument("--size", type=positive_int, default=32, help="latent side")
    c.add_argument("--steps", type=positive_int, default=6)
    c.add_argument("--backend", default="inductor", help="torch.compile backend (eager: count graphs only)")
    c.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: float16 weights under autocast")
    c.add_argument("--threads", type=positive_int, default=2)
    c.add_argument("--write", default=None)
    c.add_argument("--key", default=None)


def compile_check(args):
    """Compile the UNet once, then run steps whose processors change (ScaleCrafter re-dilation factors per step,
    as a preset schedules them; a step with none installed), counting frames compiled by dynamo per step."""
    import torch
    from omegaconf import OmegaConf
    from ldm.unet_hooks.processors import installed
    from ldm.unet_hooks.redilation import ReDilation
    from ldm.util import instantiate_from_config
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = OmegaConf.load(args.config).model.params.unet_config
    cfg.params.use_checkpoint = False
    if cuda:
        from ldm.util import no_weight_init
        with no_weight_init():
            unet = instantiate_from_config(cfg).eval().requires_grad_(False)
        unet.to(device)
        random_weights_(unet)
        unet.half()
    else:
        unet = instantiate_from_config(cfg).eval().requires_grad_(False)
    convs = [m for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
             and n.startswith(("input_blocks.4", "input_blocks.5", "middle_block", "output_blocks.3"))]
    ctx_dim = cfg.params.context_dim if isinstance(cfg.params.context_dim, int) else list(cfg.params.context_dim)[0]
    x = torch.randn(2, unet.in_channels, args.size, args.size, device=device)
    c = torch.randn(2, 77, int(ctx_dim), device=device)
    y = torch.randn(2, cfg.params.adm_in_channels, device=device) if cfg.params.get("adm_in_channels") else None
    autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else nullcontext()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # the schedule of a preset: dilation 2 on the early steps, 1.5 (fractional) in the middle, none at the end
    schedule = [2.0] * (args.steps // 3) + [1.5] * (args.steps // 3)
    schedule += [None] * (args.steps - len(schedule))
    from torch._dynamo.utils import counters
    import torch._dynamo

    def run(fn):
        times, compiles = [], []
        for i, factor in enumerate(schedule):
            before = counters["stats"]["unique_graphs"]
            procs = [(m, ReDilation(factor)) for m in convs] if factor else []
            sync()
            t = time.perf_counter()
            with torch.no_grad(), autocast, installed(procs):
                fn(x, torch.full((2,), 999 - 100 * i, device=device), context=c, y=y)
            sync()
            times.append(time.perf_counter() - t)
            compiles.append(counters["stats"]["unique_graphs"] - before)
        return times, compiles

    run(unet)  # warm-up (kernel selection, allocator)
    eager_t, _ = run(unet)
    # channels-last: the same eager UNet with NHWC weights and input (convolutions then skip layout conversions)
    x_cf = x
    unet_cl = unet.to(memory_format=torch.channels_last)
    x = x_cf.to(memory_format=torch.channels_last)
    run(unet_cl)
    cl_t, _ = run(unet_cl)
    unet = unet_cl.to(memory_format=torch.contiguous_format)
    x = x_cf
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(unet, backend=args.backend)
    comp_t, comp_n = run(compiled)
    rows = [{"step": i, "factor": f, "eager_s": e, "channels_last_s": cl, "compiled_s": t, "new_graphs": n}
            for i, (f, e, cl, t, n) in enumerate(zip(schedule, eager_t, cl_t, comp_t, comp_n))]
    for r in rows:
        print(r, flush=True)
    machine = machine_description(args.device)
    if not cuda:
        machine += ", {} threads; load average at the end {:.1f} / {:.1f} / {:.1f} (1/5/15 min)".format(
            args.threads, *os.getloadavg())
    lines = [f"### torch.compile with per-step processors: {Path(args.config).name}, latent {args.size}², "
             f"{args.device}", "",
             f"Machine: {machine}. `scripts/benchmark.py compile --backend {args.backend}`: "
             f"the UNet compiled once, then {args.steps} guided steps (batch 2) whose re-dilation processors follow a "
             f"preset-like schedule ({len(convs)} convolutions re-dilated); *new graphs* = graphs dynamo compiled "
             "during the step (torch._dynamo counters); eager timings after a warm-up pass of the same schedule.", "",
             "| step | re-dilation | eager s | eager, channels-last s | compiled s | new graphs |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['factor'] or 'none'} | {r['eager_s']:.3f} | {r['channels_last_s']:.3f} | "
              f"{r['compiled_s']:.3f} | {r['new_graphs']} |" for r in rows]
    table = "\n".join(lines) + "\n"
    publish(table, args, f"compile-{Path(args.config).stem}-{args.backend}-{args.device}")
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
    m.add_argument("--cap_gib", type=positive_float, default=None, help="the card's memory (default 24)")
    m.add_argument("--decode", choices=["tiled", "auto"], default="tiled",
                   help="tiled: tiles with synchronized GroupNorm, default placement; auto: the decoder's own plan "
                        "for the card (scripts/txt2img.py's default)")
    m.add_argument("--lowvram", action="store_true", help="as scripts/txt2img.py --lowvram")
    m.add_argument("--write", type=str, default=None)
    m.add_argument("--key", type=str, default=None)
    add_rss_parser(sub)
    add_compile_parser(sub)
    add_targets_parser(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_child"]:  # internal: one measurement in its own process (not listed in --help)
        return measure_once(child_parser().parse_args(argv[1:]))
    if argv[:1] == ["_rss_child"]:  # internal: one txt2img run in its own process
        return rss_child(argv[1:])
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
        return simulate_methods(args) if args.simulate else methods_table(args)
    if args.cmd == "memory":
        return memory_table(args)
    if args.cmd == "rss":
        return rss_table(args)
    if args.cmd == "targets":
        return targets_table(args)
    if args.cmd == "compile":
        return compile_check(args)
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
