#!/usr/bin/env python
"""One image with an author's release pipeline, timed and measured (run by tools/compare_releases.py).

This file runs inside the throwaway environment that tools/compare_releases.py makes with the release's pinned
packages. It imports nothing from this repository: only the standard library, torch, diffusers/transformers
(the release's pins) and the release's own modules, from the checkout given by ``--release``. The model is a
diffusers folder written by tools/release_models.py (random weights, tokenizer files, scheduler config).

It builds the release's pipeline the way the release's own script does (the components loaded from the folder,
the release's pipeline class or its pipeline function, its preset file for ScaleCrafter), runs one image and
prints one line ``RESULT {json}``: the time of the pipeline call (text encoding, sampling, decoding; not the
loading), the UNet's calls, batch elements and time, and the peak memory (CUDA: max allocated / reserved since
the weights were loaded; CPU: the process's peak resident memory, VmHWM).

Cases (``--case``):
  scalecrafter-sd    ScaleCrafter's text2image.py pipeline function (SD 1.5 / 2.1) with ``--preset`` (its YAML)
  scalecrafter-sdxl  ScaleCrafter's text2image_xl.py pipeline function with ``--preset``
  freescale          FreeScale's pipeline_freescale.StableDiffusionXLPipeline with ``--stages`` (H W per stage)
  demofusion         DemoFusion's pipeline_demofusion_sdxl.DemoFusionSDXLPipeline
"""
import argparse
import json
import os
import resource
import sys
import time


def peak_rss_gib():
    """The process's peak resident set size (VmHWM) in GiB; getrusage's max RSS where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


class UNetMeter:
    """Counts the UNet's calls and batch elements and sums the time spent inside them (forward hooks)."""

    def __init__(self, unet, sync):
        self.calls = self.elements = 0
        self.seconds = 0.0
        self._t = None
        self.sync = sync
        unet.register_forward_pre_hook(self._pre)
        unet.register_forward_hook(self._post)

    def _pre(self, module, args):
        self.sync()
        self._t = time.perf_counter()

    def _post(self, module, args, output):
        self.sync()
        self.seconds += time.perf_counter() - self._t
        self.calls += 1
        self.elements += int(args[0].shape[0])


def cast_inputs_to_weights(module):
    """A forward pre-hook giving ``module`` its inputs in its weights' dtype: on the CPU in float32 the releases'
    float16 casts (FreeScale's ``.half()`` of re-encoded latents) would otherwise meet float32 weights. A no-op
    when the dtypes already agree (CUDA in float16)."""
    import torch

    def hook(mod, args, kwargs):
        dtype = next(mod.parameters()).dtype
        cast = lambda a: a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() and a.dtype != dtype else a
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    module.register_forward_pre_hook(hook, with_kwargs=True)


def read_settings(path):
    """A ScaleCrafter settings file: one ``layer: factor`` per line."""
    out = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                name, value = line.split(":")
                out[name.strip()] = float(value)
    return out


def scaled_tau(scheduler, tau, preset_steps, steps):
    """A ScaleCrafter preset's step threshold (written for ``preset_steps`` steps: steps i < tau are re-dilated)
    for a run of ``steps`` steps: the run's steps whose timestep lies in the same part of the trajectory, i.e.
    above the preset's step ``tau`` (the number of the preset's timesteps above the step's own is < tau). The same
    rule as this repository's TrajectoryClock; ``tau`` itself when ``steps == preset_steps``."""
    scheduler.set_timesteps(int(preset_steps))
    reference = [float(t) for t in scheduler.timesteps]
    scheduler.set_timesteps(int(steps))
    return sum(1 for t in scheduler.timesteps if sum(1 for r in reference if r > float(t)) < int(tau))


def load_components(folder, dtype, sdxl):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    parts = {"tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
             "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype),
             "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype),
             "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)}
    if sdxl:
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2",
                                                                              torch_dtype=dtype)
    return parts


def build(args, device, dtype):
    """(pipeline, call) for the case: ``call()`` renders one image."""
    import torch
    from diffusers import DDIMScheduler
    if args.case.startswith("scalecrafter"):
        from omegaconf import OmegaConf
        sdxl = args.case == "scalecrafter-sdxl"
        release = __import__("text2image_xl" if sdxl else "text2image")  # the release's script, as a module
        parts = load_components(args.model, dtype, sdxl)
        scheduler = DDIMScheduler.from_pretrained(args.model, subfolder="scheduler")
        if sdxl:
            from diffusers import StableDiffusionXLPipeline
            pipe = StableDiffusionXLPipeline(scheduler=scheduler, **parts)
        else:
            from diffusers import StableDiffusionPipeline
            pipe = StableDiffusionPipeline(scheduler=scheduler, feature_extractor=None, safety_checker=None, **parts)
        pipe = pipe.to(device)
        cfg = OmegaConf.load(args.preset)
        settings = lambda key: read_settings(cfg[key]) if cfg.get(key) is not None else {}
        if cfg.get("disperse_transform") is not None:
            raise SystemExit("dispersion presets are not run by this comparison (the release ships inflate_tau: 0)")
        taus = {k: scaled_tau(scheduler, cfg[k], cfg.num_inference_steps, args.steps)
                for k in ("ndcfg_tau", "dilate_tau", "inflate_tau")}
        kw = dict(ndcfg_tau=taus["ndcfg_tau"], dilate_tau=taus["dilate_tau"], inflate_tau=taus["inflate_tau"],
                  dilate_settings=settings("dilate_settings"), inflate_settings=[],
                  ndcfg_dilate_settings=settings("ndcfg_dilate_settings"), transform=None,
                  progressive=cfg.progressive)
        if sdxl:
            kw["sdedit_tau"] = cfg.get("sdedit_tau", 0)
        forward = release.pipeline_processor(pipe, **kw)
        f = pipe.vae_scale_factor
        g = torch.Generator(device="cpu").manual_seed(args.seed)
        latents = torch.randn((1, 4, args.height // f, args.width // f), generator=g).to(device, dtype)
        extra = {"negative_prompt": args.negative_prompt}
        if sdxl:
            extra.update(height=args.height, width=args.width)
        call = lambda: forward(args.prompt, num_inference_steps=args.steps, guidance_scale=args.scale,
                               latents=latents, output_type="np", **extra).images
        return pipe, call
    if args.case == "freescale":
        from pipeline_freescale import StableDiffusionXLPipeline
        pipe = StableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
        stages = [[args.stages[i], args.stages[i + 1]] for i in range(0, len(args.stages), 2)]
        g = torch.Generator(device=device).manual_seed(args.seed)
        call = lambda: pipe(args.prompt, negative_prompt=args.negative_prompt, generator=g,
                            num_inference_steps=args.steps, guidance_scale=args.scale, resolutions_list=stages,
                            fast_mode=False, cosine_scale=2.0, output_type="np")
        return pipe, call
    if args.case == "demofusion":
        from pipeline_demofusion_sdxl import DemoFusionSDXLPipeline
        pipe = DemoFusionSDXLPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
        g = torch.Generator(device=device).manual_seed(args.seed)
        call = lambda: pipe(args.prompt, negative_prompt=args.negative_prompt, generator=g, height=args.height,
                            width=args.width, view_batch_size=args.view_batch, stride=args.stride,
                            num_inference_steps=args.steps, guidance_scale=args.scale, cosine_scale_1=3,
                            cosine_scale_2=1, cosine_scale_3=1, sigma=0.8, multi_decoder=args.multi_decoder,
                            show_image=False, output_type="np")
        return pipe, call
    raise SystemExit(f"unknown case {args.case}")


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--release", required=True, help="the release's checkout (its modules are imported from there)")
    p.add_argument("--case", required=True,
                   choices=["scalecrafter-sd", "scalecrafter-sdxl", "freescale", "demofusion"])
    p.add_argument("--model", required=True, help="diffusers folder (tools/release_models.py)")
    p.add_argument("--preset", help="ScaleCrafter: the release's config YAML, relative to --release")
    p.add_argument("--stages", type=int, nargs="+", help="FreeScale: H W of every stage, the first one the base")
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--prompt", default="a professional photograph of an astronaut riding a horse")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--stride", type=int, default=64, help="DemoFusion: window stride in latent pixels")
    p.add_argument("--view_batch", type=int, default=16, help="DemoFusion: windows per UNet call")
    p.add_argument("--multi_decoder", action="store_true", help="DemoFusion: its tiled decoder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="images; the fastest is reported (the first warms up)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    release = os.path.abspath(args.release)
    args.model = os.path.abspath(args.model)
    os.chdir(release)  # the releases' presets name their settings files relative to the checkout
    sys.path.insert(0, release)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    pipe, call = build(args, device, dtype)
    if not cuda:
        cast_inputs_to_weights(pipe.unet)
        for name in ("post_quant_conv", "decoder", "encoder"):
            cast_inputs_to_weights(getattr(pipe.vae, name))
    meter = UNetMeter(pipe.unet, sync)
    pipe.set_progress_bar_config(disable=True)
    runs = []
    for _ in range(args.repeats):
        meter.calls = meter.elements = 0
        meter.seconds = 0.0
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            call()
        sync()
        run = {"image_s": time.perf_counter() - t0, "image_cpu_s": time.process_time() - c0,
               "unet_s": meter.seconds, "unet_calls": meter.calls, "unet_elements": meter.elements}
        if cuda:
            run.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                       peak_reserved_gib=torch.cuda.max_memory_reserved() / 2 ** 30)
        runs.append(run)
    best = min(runs[1:] or runs, key=lambda r: r["image_s"])
    import diffusers
    import transformers
    best.update(peak_rss_gib=peak_rss_gib(), torch=torch.__version__, diffusers=diffusers.__version__,
                transformers=transformers.__version__, side="release", case=args.case, runs=len(runs))
    print("RESULT " + json.dumps(best), flush=True)


if __name__ == "__main__":
    main()
