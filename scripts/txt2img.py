#!/usr/bin/env python
"""Text-to-image sampling with an original Stable Diffusion config and checkpoint (DDIM), at any size.

    python scripts/txt2img.py --config configs/stable-diffusion/v2-inference.yaml \
        --ckpt checkpoints/v2-1_512-ema-pruned.ckpt --prompt "A corgi on a beach chair" \
        --H 1024 --W 1024 --seed 51 --ddim_eta 1 --scale 9 --steps 50

Writes ``OUTDIR/samples/NNNNN.png`` (one per image, with the prompt, seed and settings in the PNG text
metadata) and ``OUTDIR/grid-NNNN.png``. Numbering continues after existing files.

With ``--sweep``, and always under ``torchrun`` (any number of GPUs and nodes), the images are a fixed work
list shared by the processes: ``OUTDIR/samples/{prompt:06d}_{sample:03d}.png`` with per-image seeds, the same
files for any number of processes, resumable, with ``OUTDIR/manifest.jsonl`` (docs/cluster.md).
"""
import argparse
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ldm.checkpoint import CheckpointError, load_model_from_config  # noqa: E402
from ldm.inference import (InputWarning, UsageError, check_output_dir, check_size, chunk,  # noqa: E402
                           make_grid, next_free_index, pick_device, read_prompt_file, remove_stale_temp_files,
                           save_png, seed_arg, seed_everything, to_pil)
from ldm import baselines  # noqa: E402
from ldm.freescale import presets as freescale_options  # noqa: E402
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.modules.diffusionmodules import upscaling  # noqa: E402
from ldm.image_io import read_rgb  # noqa: E402
from ldm.util import check_config_targets, load_config_file  # noqa: E402
from ldm import sweep as sweep_mode  # noqa: E402


class Interrupted(Exception):
    """Ctrl-C during sampling; the message says how far the run got (exit code 130)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the help text already says what the default is, or there is none
    (None, or a switch such as --skip_grid, which is off unless given)."""

    def _get_help_string(self, action):
        if "(default" in (action.help or "") or action.default in (None, "") or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--prompt", type=str, nargs="?", default="a professional photograph of an astronaut riding a horse",
                   help="the prompt to render")
    p.add_argument("--from-file", type=str, help="a text file with one prompt per line (overrides --prompt)")
    p.add_argument("--outdir", type=str, default="outputs/txt2img-samples", help="where to write results")
    p.add_argument("--steps", type=int, default=50, help="number of DDIM sampling steps")
    p.add_argument("--ddim_eta", type=float, default=0.0,
                   help="DDIM eta in [0, 1] (0: deterministic sampling, 1: DDPM-like ancestral sampling)")
    p.add_argument("--n_iter", type=int, default=1, help="how many times to sample each batch")
    p.add_argument("--n_samples", type=int, default=1, help="batch size: images per prompt per iteration")
    p.add_argument("--n_rows", type=int, default=0, help="images per row in the grid (0: n_samples)")
    p.add_argument("--H", type=int, default=None, help="image height in pixels (default: the preset's, else 512)")
    p.add_argument("--W", type=int, default=None, help="image width in pixels (default: the preset's, else 512)")
    p.add_argument("--C", type=int, default=None, help="latent channels (default: from the config)")
    p.add_argument("--f", type=int, default=None, help="downsampling factor (default: from the config, 8 for SD)")
    p.add_argument("--scale", type=float, default=9.0, help="classifier-free guidance scale")
    p.add_argument("--config", type=str, default="configs/stable-diffusion/v2-inference.yaml",
                   help="the model's YAML config")
    p.add_argument("--ckpt", type=str, required=False, help="the checkpoint (.ckpt or .safetensors)")
    p.add_argument("--seed", type=seed_arg, default=42, help="the seed (for reproducible sampling)")
    p.add_argument("--precision", type=str, choices=["full", "autocast", "half"], default="autocast",
                   help="autocast: fp16/bf16 autocast on CUDA; half: also store the UNet and text encoder weights "
                        "in that dtype (VAE stays float32; what 4096x4096 SDXL needs on 24 GB). "
                        "CPU always runs in full precision")
    p.add_argument("--autocast_dtype", type=str, choices=["float16", "bfloat16"], default="float16",
                   help="the autocast dtype on CUDA")
    p.add_argument("--device", type=str, choices=["auto", "cpu", "cuda"], default="auto", help="where to run")
    p.add_argument("--fixed_code", action="store_true", help="use the same starting noise for every batch")
    p.add_argument("--repeat", type=int, default=1, help="repeat each prompt of --from-file this many times")
    p.add_argument("--negative_prompt", type=str, default="", help="the unconditional prompt for guidance")
    p.add_argument("--skip_grid", action="store_true", help="do not write the grid image")
    p.add_argument("--unsafe_load", action="store_true",
                   help="allow checkpoints that need unsafe unpickling (only for files you trust)")
    p.add_argument("--trust_config", action="store_true",
                   help="allow config targets outside this package (ldm.*): building a config calls every class "
                        "or function it names, so only for configs you trust")
    p.add_argument("--no_ema", action="store_true", help="ignore model_ema.* weights in a training checkpoint")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="direct sampling, ScaleCrafter (--scalecrafter_config or --dilate), FreeScale "
                        "(--freescale_config or the FreeScale options), attention scaling (Jin et al.), "
                        "MultiDiffusion, DemoFusion, HiDiffusion, FouriScale (--fouri_*) or SD+SR (sdsr: the base "
                        "model, then the x4 upscaler, --sr_*); default: scalecrafter when its flags are given, else "
                        "direct")
    sc = p.add_argument_group("ScaleCrafter (tuning-free higher resolution)")
    sc.add_argument("--scalecrafter_config", type=str, default=None,
                    help="a preset YAML, e.g. configs/scalecrafter/sd2.1_2048x2048.yaml")
    sc.add_argument("--dilate", type=float, default=None,
                    help="command-line form: dilation factor for every 3x3 conv outside the skipped blocks")
    sc.add_argument("--dilate_tau", type=int, default=None, help="re-dilate during the first TAU sampling steps")
    sc.add_argument("--dilate_skip", type=int, default=0,
                    help="leave the first K input blocks and the last K output blocks undilated")
    sc.add_argument("--progressive_dilate", action="store_true",
                    help="lower the factor stage by stage from ceil(D) down to 2 over the TAU steps")
    sc.add_argument("--ndcfg_tau", type=int, default=None, help="override the preset's noise-damped CFG steps")
    sc.add_argument("--disperse_tau", type=int, default=None, help="override the preset's dispersion steps")
    sc.add_argument("--freeu", action="store_true", help="turn FreeU on (off by default)")
    for k in ("b1", "b2", "s1", "s2"):
        sc.add_argument(f"--freeu_{k}", type=float, default=None, help=f"FreeU {k} (default: preset/model value)")
    td = p.add_argument_group("tiled VAE decoding")
    td.add_argument("--tiled_decoding", action="store_true", help="decode the latent in tiles (bounded memory)")
    td.add_argument("--tile_size", type=int, default=None, help="tile side in latent pixels")
    td.add_argument("--overlap", type=int, default=24, help="tile overlap in latent pixels")
    td.add_argument("--sync_gn", action="store_true",
                    help="normalise every decoder GroupNorm with whole-image statistics (no seams)")
    sx = p.add_argument_group("SDXL size conditioning (pixels; SDXL configs only)")
    sx.add_argument("--original_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="the 'original image size' SDXL conditions on (default: --H --W)")
    sx.add_argument("--crop_coords_top_left", type=int, nargs=2, metavar=("TOP", "LEFT"), default=None,
                    help="the crop offset SDXL conditions on (default: 0 0)")
    sx.add_argument("--target_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="the target size SDXL conditions on (default: --H --W)")
    freescale_options.add_args(p)
    baselines.add_args(p)
    upscaling.add_sdsr_args(p)
    sweep_mode.add_sweep_args(p)
    return p


METHODS = ("direct", "scalecrafter", "freescale", "attn_scale", "multidiffusion", "demofusion", "hidiffusion",
           "fouriscale", "sdsr")


def resolve_method(opt):
    """The --method, checked against the method flags that were given."""
    scalecrafter = bool(opt.scalecrafter_config) or opt.dilate is not None
    freescale = opt.freescale_config or opt.freescale_stages or opt.detail_mask
    cascade = opt.init_image or opt.save_stages  # FreeScale's or DemoFusion's
    method = opt.method or ("scalecrafter" if scalecrafter else "freescale" if opt.freescale_config else "direct")
    if method != "scalecrafter" and scalecrafter:
        raise UsageError(f"--scalecrafter_config/--dilate are ScaleCrafter options; they do not apply to "
                         f"--method {method}")
    if method != "freescale" and freescale:
        raise UsageError(f"--freescale_config/--freescale_stages/--detail_mask are FreeScale options; add --method "
                         f"freescale (got --method {method})")
    if method not in ("freescale", "demofusion") and cascade:
        raise UsageError(f"--init_image/--save_stages work with the cascades: add --method freescale or demofusion "
                         f"(got --method {method})")
    return method


def model_family(config):
    target = str(config.model.params.get("cond_stage_config", {}).get("target", ""))
    if target.endswith("FrozenCLIPEmbedder"):
        return "sd1"
    params = config.model.params
    if "conditioner" in params or "conditioner_config" in params or "sdxl" in str(config.model.target).lower():
        return "sdxl"
    return "sd2"


def check_preset_family(path, base, config, kind):
    """A preset made for SDXL on an SD model (or the reverse) is an error naming the presets to use."""
    family = model_family(config)
    if base in ("sd1", "sd2", "sdxl") and (base == "sdxl") != (family == "sdxl"):
        hint = "sdxl_*.yaml" if family == "sdxl" else "sd2.1_*.yaml / sd1.5_*.yaml"
        raise UsageError(f"--{kind}_config {path} is a preset for {base} but --config is a {family} model; use "
                         f"configs/{kind}/{hint}")


def build_method(opt, model, config, freescale_preset=None):
    """The ScaleCrafter guidance and FreeU settings asked for on the command line (None, None if neither);
    FreeU values from a FreeScale preset where one is given."""
    from ldm.scalecrafter.freeu import FREEU_DEFAULTS
    from ldm.scalecrafter.guidance import ScaleCrafterGuidance
    from ldm.scalecrafter.presets import SettingsError, load_preset, plan_from_flags, plan_from_preset
    unet = model.model.diffusion_model
    preset = None
    guidance = None
    try:
        if opt.scalecrafter_config and opt.dilate is not None:
            raise UsageError("give either --scalecrafter_config or --dilate, not both")
        if opt.scalecrafter_config:
            preset = load_preset(opt.scalecrafter_config)
            check_preset_family(opt.scalecrafter_config, preset.get("base_model"), config, "scalecrafter")
            if opt.ndcfg_tau is not None:
                preset["ndcfg_tau"] = opt.ndcfg_tau
            if opt.disperse_tau is not None:
                preset["disperse_tau"] = opt.disperse_tau
            guidance = ScaleCrafterGuidance(plan_from_preset(unet, preset))
        elif opt.dilate is not None:
            if opt.dilate_tau is None:
                raise UsageError("--dilate needs --dilate_tau (the number of steps to re-dilate)")
            guidance = ScaleCrafterGuidance(plan_from_flags(unet, opt.dilate, opt.dilate_tau, opt.dilate_skip,
                                                            opt.progressive_dilate))
    except SettingsError as err:
        raise UsageError(str(err)) from None
    freeu_args = None
    if opt.freeu:
        freeu_args = dict((preset or freescale_preset or {}).get("freeu") or FREEU_DEFAULTS[model_family(config)])
        for k in ("b1", "b2", "s1", "s2"):
            if getattr(opt, f"freeu_{k}") is not None:
                freeu_args[k] = getattr(opt, f"freeu_{k}")
    return preset, guidance, freeu_args


def prepare_model(opt, model, device):
    """Model-family settings after loading: half-precision weights, SDXL's size conditioning (returned)."""
    if opt.precision == "half" and device.type == "cuda":
        from ldm.inference import cast_for_half_precision
        cast_for_half_precision(model, getattr(torch, opt.autocast_dtype))
    if not hasattr(model, "set_size_conditioning"):
        return None
    return model.set_size_conditioning(opt.target_size or (opt.H, opt.W), original_size=opt.original_size,
                                       crop_coords_top_left=opt.crop_coords_top_left or (0, 0))


def first_stage_factor(config):
    """Latent downsampling factor and channels implied by the config (8 and 4 for SD)."""
    params = config.model.params
    fs = params.first_stage_config
    if "ddconfig" in fs.get("params", {}):
        return 2 ** (len(fs.params.ddconfig.ch_mult) - 1), params.get("channels", 4)
    return 1, params.get("channels", 3)


def check_options(opt):
    """The numeric flags, before anything is loaded or written."""
    for flag, value, what in (("--n_iter", opt.n_iter, "the number of sampling rounds"),
                              ("--n_samples", opt.n_samples, "the batch size: images per prompt and round"),
                              ("--repeat", opt.repeat, "how often each prompt of --from-file is used")):
        if value < 1:
            raise UsageError(f"{flag} {value}: must be at least 1 ({what})")
    if not 0.0 <= opt.ddim_eta <= 1.0:
        raise UsageError(f"--ddim_eta {opt.ddim_eta} is outside [0, 1]: DDIM's sigma formula is defined for "
                         "0 <= eta <= 1 (0: deterministic DDIM, 1: DDPM-like ancestral sampling); a larger eta asks "
                         "for more noise than the step removes and the images come out black")


def load_config(opt):
    """(path, config) of --config, its targets checked and --steps against its training timesteps."""
    config_path = Path(opt.config)
    if not config_path.is_file():
        raise UsageError(f"--config {opt.config}: no such file (the original configs are in configs/stable-diffusion/)")
    config = load_config_file(config_path, trust=opt.trust_config, flag="--config")
    try:
        check_config_targets(config.model if "model" in config else config, trust=opt.trust_config)
    except UsageError as err:
        raise UsageError(f"--config {opt.config}: {err}") from None
    timesteps = int(config.model.params.get("timesteps", 1000)) if "model" in config else 1000
    if not 1 <= opt.steps <= timesteps:
        raise UsageError(f"--steps {opt.steps}: the number of DDIM steps must be between 1 and {timesteps} (DDIM "
                         f"takes its steps from the model's {timesteps} training timesteps; 50 is usual)")
    return config_path, config


def apply_presets(opt, config):
    """The FreeScale preset (or None), family-checked; --H/--W not given are taken from the method's preset."""
    fs_preset = None
    if opt.freescale_config:
        try:
            fs_preset = freescale_options.load_preset(opt.freescale_config)
        except freescale_options.PresetError as err:
            raise UsageError(str(err)) from None
        check_preset_family(opt.freescale_config, fs_preset.get("base_model"), config, "freescale")
        opt.H = opt.H if opt.H is not None else fs_preset.get("height")
        opt.W = opt.W if opt.W is not None else fs_preset.get("width")
    if opt.scalecrafter_config and (opt.H is None or opt.W is None):
        from ldm.scalecrafter.presets import SettingsError, load_preset
        try:
            preset = load_preset(opt.scalecrafter_config)
        except SettingsError as err:
            raise UsageError(str(err)) from None
        opt.H = opt.H if opt.H is not None else preset.get("height")
        opt.W = opt.W if opt.W is not None else preset.get("width")
    return fs_preset


def freescale_settings(opt, method, fs_preset, config, base_px, f):
    """FreeScaleSettings of --method freescale at --H x --W (None for other methods), stage sizes checked."""
    if method != "freescale":
        return None
    try:
        fs_settings = freescale_options.settings_from_args(opt, fs_preset, opt.H, opt.W, base_px)
    except (freescale_options.PresetError, ValueError) as err:
        raise UsageError(f"FreeScale: {err}") from None
    for h, w in fs_settings.stages:
        check_size(h, w, f)
    if model_family(config) == "sdxl" and opt.target_size is None:  # as the release: the first stage's size
        opt.target_size = list(fs_settings.stages[0])
    return fs_settings


def cascade_runner(opt, method, model, fs_settings, base_latent, f, tiling):
    """The cascade of --method freescale (FreeScale) or demofusion (DemoFusion on the same stage machinery); None
    for the other methods."""
    if fs_settings is not None:
        from ldm.freescale.cascade import FreeScale
        return FreeScale(model, fs_settings, f=f, tiling=tiling)
    if method == "demofusion":
        from ldm.baselines.demofusion import DemoFusion
        try:
            return DemoFusion(model, opt.H, opt.W, base_latent * f, f=f, tiling=tiling, stride=opt.df_stride,
                              sigma=opt.df_sigma, cosine_scales=opt.df_cosine_scales, view_batch=opt.df_view_batch)
        except ValueError as err:
            raise UsageError(f"DemoFusion: {err}") from None
    return None


def run(opt):
    check_options(opt)
    config_path, config = load_config(opt)
    f_cfg, c_cfg = first_stage_factor(config)
    f = opt.f or f_cfg
    C = opt.C or c_cfg
    base_latent = int(config.model.params.get("image_size", 64))  # latent side at the training size
    method = resolve_method(opt)
    fs_preset = apply_presets(opt, config)
    side = 1024 if model_family(config) == "sdxl" else 512  # the training resolution
    try:  # a method's preset size and pre-loading defaults (FouriScale)
        baselines.prepare_options(method, opt, model_family(config), base_latent * f, side)
    except ValueError as err:
        raise UsageError(str(err)) from None
    opt.H = opt.H if opt.H is not None else side  # 0 is an error below, not "the default"
    opt.W = opt.W if opt.W is not None else side
    check_size(opt.H, opt.W, f)
    if model_family(config) != "sdxl" and any(v is not None for v in (opt.original_size, opt.crop_coords_top_left,
                                                                      opt.target_size)):
        raise UsageError("--original_size/--crop_coords_top_left/--target_size are SDXL's size conditioning; "
                         f"{opt.config} is not an SDXL config")
    if upscaling.is_upscaler_config(config):
        raise UsageError(f"--config {opt.config} is the x4 upscaler, which needs a low-resolution image: use "
                         "scripts/upscale.py, or pass it as --sr_config with --method sdsr")
    # --method sdsr: the size the base model samples at (the --sr_* files are checked here, before loading)
    sdsr_base = upscaling.prepare_sdsr(opt, method, base_latent * f, f, sdxl=model_family(config) == "sdxl")
    fs_settings = freescale_settings(opt, method, fs_preset, config, base_latent * f, f)
    if method in ("freescale", "demofusion"):
        for flag in ("init_image", "detail_mask"):
            if getattr(opt, flag) and not Path(getattr(opt, flag)).is_file():
                raise UsageError(f"--{flag} {getattr(opt, flag)}: no such file")
    if opt.ckpt is None:
        raise UsageError("--ckpt is required: the checkpoint file matching --config (see checkpoints/README.md)")
    batch_size = opt.n_samples
    if opt.from_file:
        prompts = read_prompt_file(opt.from_file, opt.repeat)
    else:
        if opt.prompt is None:
            raise UsageError("give --prompt or --from-file")
        prompts = [opt.prompt]
    data = [[p] * batch_size for p in prompts] if not opt.from_file else chunk(prompts, batch_size)
    outdir = Path(opt.outdir)
    sample_path = outdir / "samples"
    for folder in (outdir, sample_path):  # before minutes of loading and sampling, not after
        check_output_dir(folder)

    sweeping = opt.sweep or sweep_mode.launched_by_torchrun()
    if sweeping and not opt.sweep:
        print("launched by torchrun: sweep mode on (--sweep; see docs/cluster.md)")
    device = sweep_mode.rank_device(pick_device(opt.device))
    t0 = time.time()
    model = load_model_from_config(config, opt.ckpt, device=device, allow_unsafe=opt.unsafe_load,
                                   use_ema=not opt.no_ema, config_name=str(config_path), trust=opt.trust_config)
    print(f"Loaded {opt.ckpt} with {config_path} in {time.time() - t0:.1f}s on {device}")
    size_conditioning = prepare_model(opt, model, device)
    sampler = DDIMSampler(model)
    preset, guidance, freeu_args = build_method(opt, model, config, fs_preset)
    tiling = {}
    if opt.tiled_decoding:
        tiling = {"overlap": opt.overlap, "sync_gn": opt.sync_gn}
        if opt.tile_size is not None:
            tiling["tile_size"] = opt.tile_size
    sr = None  # --method sdsr: the x4 upscaler, applied to the decoded base images
    if sdsr_base is not None:
        sr = upscaling.sdsr_from_args(opt, sdsr_base, device, tiling)
        print(f"Loaded {opt.sr_ckpt} with {opt.sr_config} (SD+SR: {sdsr_base[0]}x{sdsr_base[1]} -> {opt.H}x{opt.W})")
    if method in ("attn_scale", "multidiffusion", "hidiffusion", "fouriscale"):
        try:
            guidance, method_settings = baselines.build_guidance(method, opt, model, base_latent, (opt.H, opt.W), f)
        except ValueError as err:
            raise UsageError(str(err)) from None
    runner = cascade_runner(opt, method, model, fs_settings, base_latent, f, tiling)
    freescale = FreeScaleRun(runner, opt, device) if runner is not None else None  # FreeScale or DemoFusion
    if method == "demofusion":
        method_settings = runner.describe()

    created = [d for d in (sample_path, outdir) if not d.exists()]
    if not sweeping:  # (sweep mode does the same in ldm/sweep.py)
        sample_path.mkdir(parents=True, exist_ok=True)
        for folder in (sample_path, outdir):  # left by a killed run between writing and renaming
            remove_stale_temp_files(folder)
    base_count = next_free_index(sample_path)
    grid_count = next_free_index(outdir, r"^grid-(\d+)\.png$")

    seed_everything(opt.seed)
    # the cascades start at their first stage's size
    shape = (freescale.runner.latent_shape(freescale.runner.settings.stages[0]) if freescale
             else (C, opt.H // f, opt.W // f))
    if sr is not None:  # SD+SR: the base model samples at the base size
        shape = (C, sdsr_base[0] // f, sdsr_base[1] // f)
    start_code = torch.randn([batch_size, *shape], device=device) if opt.fixed_code else None
    use_autocast = opt.precision in ("autocast", "half") and device.type == "cuda"
    precision_scope = torch.autocast("cuda", dtype=getattr(torch, opt.autocast_dtype)) if use_autocast else nullcontext()
    settings = {
        "sampler": "DDIM", "steps": opt.steps, "eta": opt.ddim_eta, "scale": opt.scale, "H": opt.H, "W": opt.W,
        "seed": opt.seed, "config": config_path.name, "ckpt": Path(opt.ckpt).name, "n_samples": batch_size,
        "precision": opt.precision if use_autocast else "full", "device": device.type,
        "negative_prompt": opt.negative_prompt, "fixed_code": opt.fixed_code,
        "scalecrafter": (str(opt.scalecrafter_config) if opt.scalecrafter_config else
                         {"dilate": opt.dilate, "dilate_tau": opt.dilate_tau, "dilate_skip": opt.dilate_skip,
                          "progressive_dilate": opt.progressive_dilate} if opt.dilate is not None else None),
        "freeu": freeu_args, "tiled_decoding": tiling or None, "method": method,
    }
    if method in ("attn_scale", "multidiffusion", "demofusion", "hidiffusion", "fouriscale"):
        settings[method] = method_settings
    if fs_settings is not None:
        settings["freescale"] = {"preset": opt.freescale_config, **fs_settings.describe(),
                                 "init_image": opt.init_image, "detail_mask": opt.detail_mask}
    if opt.scalecrafter_config:
        settings["scalecrafter_overrides"] = {"ndcfg_tau": opt.ndcfg_tau, "disperse_tau": opt.disperse_tau}
    if size_conditioning is not None:
        settings["size_conditioning"] = size_conditioning
    if sr is not None:
        settings["sdsr"] = sr.describe()
    all_images = []
    unet = model.model.diffusion_model
    freeu_scope = nullcontext()
    if freeu_args:
        from ldm.scalecrafter.freeu import freeu
        freeu_scope = freeu(unet, **freeu_args)
    if sweeping:
        run_sweep(opt, model, sampler, shape, settings, guidance, tiling, device, precision_scope, freeu_scope,
                  freescale, sr=sr)
        return []
    total = opt.n_iter * sum(len(b) for b in data)
    try:
        with torch.no_grad(), precision_scope, freeu_scope:
            for n in tqdm(range(opt.n_iter), desc="Sampling", disable=opt.n_iter == 1):
                for batch_idx, batch_prompts in enumerate(tqdm(data, desc="data", disable=len(data) == 1)):
                    uc = None
                    if opt.scale != 1.0:
                        uc = model.get_learned_conditioning(len(batch_prompts) * [opt.negative_prompt])
                    c = model.get_learned_conditioning(list(batch_prompts))
                    samples, stages = sample_latents(
                        opt, sampler, c, uc, len(batch_prompts), shape, guidance, freescale,
                        x_T=start_code[:len(batch_prompts)] if start_code is not None else None,
                        jitter_seed=opt.seed + 1000 * n + batch_idx)
                    x = model.decode_first_stage(samples, **tiling)
                    if sr is not None:  # SD+SR: x4 upscaler with the same prompts, resized to --H/--W
                        x = sr(x, batch_prompts)
                    stage_images = [model.decode_first_stage(z, **tiling) for z in stages]
                    for j, (img_t, prompt) in enumerate(zip(x, batch_prompts)):
                        img = to_pil(img_t)
                        meta = {"prompt": prompt, "seed": str(opt.seed),
                                "parameters": {**settings, "iteration": n, "batch": batch_idx, "position_in_batch": j}}
                        for k, stage in enumerate(stage_images, start=1):
                            save_png(to_pil(stage[j]), sample_path / f"{base_count:05}-stage{k}.png",
                                     {**meta, "stage": k})
                        save_png(img, sample_path / f"{base_count:05}.png", meta)
                        base_count += 1
                        all_images.append(img)
    except KeyboardInterrupt:
        for folder in created:  # nothing written yet: leave no empty folders behind
            try:
                folder.rmdir()
            except OSError:
                pass
        raise Interrupted(f"interrupted after {len(all_images)} of {total} images; re-run to continue (a plain run "
                          f"renders all {total} again, numbered after the files in {sample_path}; --sweep runs "
                          "resume where they stopped)") from None
    if not opt.skip_grid and all_images:
        grid = make_grid(all_images, opt.n_rows or batch_size)
        grid_file = outdir / f"grid-{grid_count:04}.png"
        save_png(grid, grid_file, {"parameters": settings, "prompts": prompts})
        print(f"Grid: {grid_file}")
    print(f"Your samples are ready and waiting for you here: {outdir}")
    return all_images


def sample_latents(opt, sampler, c, uc, n, shape, guidance, freescale=None, generator=None, x_T=None, jitter_seed=0,
                   start_step=0):
    """One batch of final latents, and (FreeScale with --save_stages) the earlier stages' latents.
    ``start_step`` > 0 (not with a cascade): ``x_T`` is the latent at that step of the schedule (img2img)."""
    if freescale is None:
        samples, _ = sampler.sample(S=opt.steps, conditioning=c, batch_size=n, shape=shape, verbose=False,
                                    unconditional_guidance_scale=opt.scale, unconditional_conditioning=uc,
                                    eta=opt.ddim_eta, guidance=guidance, generator=generator, x_T=x_T,
                                    start_step=start_step)
        return samples, []
    result = freescale.sample(sampler, c, uc, n, generator=generator, x_T=x_T, jitter_seed=jitter_seed)
    return result.latent, (result.stage_latents[:-1] if opt.save_stages else [])


def load_init_image(path, size, device):
    """An image file as (1, 3, h, w) in [-1, 1] at ``size`` = (h, w) pixels (PIL bicubic resize)."""
    from PIL import Image
    h, w = size
    img = read_rgb(path).resize((w, h), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    return x.to(device)


class FreeScaleRun:
    """--method freescale inside the sampling loops: the cascade plus its optional init image and detail mask."""

    def __init__(self, runner, opt, device):
        self.runner, self.opt = runner, opt
        self.mask = self.init_pixels = None
        if opt.detail_mask:
            m = torch.from_numpy(np.asarray(read_rgb(opt.detail_mask).convert("L"), dtype=np.float32) / 255.0)
            self.mask = m[None, None].to(device)
        if opt.init_image:
            self.init_pixels = load_init_image(opt.init_image, runner.settings.stages[0], device)

    def sample(self, sampler, c, uc, n, generator=None, x_T=None, jitter_seed=0):
        from ldm.freescale.cascade import encode_image
        opt, runner = self.opt, self.runner
        init = None
        if self.init_pixels is not None:
            init = encode_image(runner.model, self.init_pixels.expand(n, -1, -1, -1), runner.tiling, generator)
        return runner.sample(sampler, opt.steps, c, uc, opt.scale, opt.ddim_eta, n, generator=generator, x_T=x_T,
                             init_latent=init, mask=self.mask, jitter_seed=jitter_seed)


def run_sweep(opt, model, sampler, shape, settings, guidance, tiling, device, precision_scope, freeu_scope,
              freescale=None, sr=None):
    """--sweep / torchrun: the deterministic, resumable, sharded form of the loop above (ldm/sweep.py).

    Each image gets its own CPU generator (seed from (seed, prompt index, sample index)) for its starting
    latent and its per-step noise; batches are fixed slices of the global work list."""
    if opt.from_file:
        prompts, per_prompt = read_prompt_file(opt.from_file), opt.n_iter * opt.repeat
    else:
        prompts, per_prompt = [opt.prompt], opt.n_iter * opt.n_samples
    torch.backends.cudnn.benchmark = False  # kernel choice must not depend on timing

    def render(items):
        n = len(items)
        uc = model.get_learned_conditioning(n * [opt.negative_prompt]) if opt.scale != 1.0 else None
        c = model.get_learned_conditioning([it.prompt for it in items])
        generators = [torch.Generator().manual_seed(it.seed) for it in items]
        samples, stages = sample_latents(opt, sampler, c, uc, n, shape, guidance, freescale, generator=generators,
                                         jitter_seed=opt.seed)  # shared by all batches: sizes don't matter
        for k, z in enumerate(stages, start=1):  # --save_stages: beside the final files, not in the manifest
            for it, x in zip(items, model.decode_first_stage(z, **tiling)):
                path = Path(opt.outdir) / "samples" / it.file
                save_png(to_pil(x), path.with_name(f"{path.stem}-stage{k}.png"), {"prompt": it.prompt, "stage": k})
        images = model.decode_first_stage(samples, **tiling)
        if sr is not None:  # SD+SR: each image's generator goes on into the upscaler's noise
            images = sr(images, [it.prompt for it in items], generator=generators)
        return [to_pil(x) for x in images]

    dist = sweep_mode.DistContext(device, opt.dist_backend, opt.dist_timeout)
    try:
        with torch.no_grad(), precision_scope, freeu_scope:
            sweep_mode.run_sweep(render, prompts, per_prompt, opt.n_samples, opt.seed, opt.outdir, settings, dist,
                                 fixed_code=opt.fixed_code)
    except KeyboardInterrupt:
        items = sweep_mode.make_work_list(prompts, per_prompt, opt.seed, opt.fixed_code)
        done = sum((Path(opt.outdir) / "samples" / it.file).is_file() for it in items)
        raise Interrupted(f"interrupted after {done} of {len(items)} images; re-run to continue (the sweep skips "
                          "the finished ones)") from None
    finally:
        dist.close()


def main(argv=None):
    opt = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        # input that is used, but not as given (a prompt cut to 77 tokens, an unsafe load): one plain line each
        warnings.simplefilter("always", InputWarning)
        show_other = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, InputWarning):
                tqdm.write(f"warning: {message}", file=sys.stderr)  # on its own line, also under a progress bar
            else:
                show_other(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        try:
            run(opt)
        except (UsageError, CheckpointError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except Interrupted as err:
            print(err, file=sys.stderr)
            return 130
        except KeyboardInterrupt:  # outside the sampling loop (loading, the grid)
            print("interrupted (Ctrl-C)", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
