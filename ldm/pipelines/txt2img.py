"""The txt2img pipeline behind ``scripts/txt2img.py``: options, model loading, the sampling loop, PNG metadata and
sweeps, for every method of the registry (``ldm/methods/``) on the sampler contract (``ldm/samplers/``).

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

import torch
from tqdm import tqdm

from ldm.checkpoint import CheckpointError, load_model_from_config
from ldm.inference import (InputWarning, UsageError, add_memory_args, check_memory, check_output_dir, check_size,
                           chunk, finite_float, make_grid, memory_scope, next_free_index, nonneg_float, nonneg_int,
                           pick_device, positive_int, read_prompt_file, remove_stale_temp_files, save_png, seed_arg,
                           seed_everything, to_pil)
from ldm import methods
from ldm.lora import apply_loras, parse_lora_spec
from ldm.methods.base import ModelInfo
from ldm.pipelines import sweep as sweep_mode
from ldm import samplers
from ldm.upscaler import is_upscaler_config
from ldm.util import check_config_targets, check_side, load_config_file, missing_file_reason


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
    p.add_argument("--steps", type=int, default=50, help="number of sampling steps")
    p.add_argument("--ddim_eta", type=finite_float, default=0.0,
                   help="DDIM eta in [0, 1] (0: deterministic sampling, 1: DDPM-like ancestral sampling)")
    p.add_argument("--n_iter", type=int, default=1, help="how many times to sample each batch")
    p.add_argument("--n_samples", type=int, default=1, help="batch size: images per prompt per iteration")
    p.add_argument("--n_rows", type=int, default=0, help="images per row in the grid (0: n_samples)")
    p.add_argument("--H", type=int, default=None, help="image height in pixels (default: the preset's, else 512)")
    p.add_argument("--W", type=int, default=None, help="image width in pixels (default: the preset's, else 512)")
    p.add_argument("--C", type=int, default=None, help="latent channels (default: from the config)")
    p.add_argument("--f", type=int, default=None, help="downsampling factor (default: from the config, 8 for SD)")
    p.add_argument("--scale", type=finite_float, default=9.0, help="classifier-free guidance scale")
    p.add_argument("--config", type=str, default="configs/stable-diffusion/v2-inference.yaml",
                   help="the model's YAML config")
    p.add_argument("--ckpt", type=str, required=False,
                   help="the checkpoint (.ckpt or .safetensors), or a diffusers model folder (model_index.json, unet/, "
                        "vae/, text_encoder/...)")
    p.add_argument("--lora", type=parse_lora_spec, action="append", default=None, metavar="FILE[:WEIGHT]",
                   help="merge a LoRA (kohya or diffusers/PEFT .safetensors) into the weights after loading, with "
                        "this weight (default 1); repeat for several")
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
    p.add_argument("--method", choices=methods.names(), default=None,
                   help="; ".join(f"{cls.name}: {cls.summary}" for cls in methods.classes()) +
                        ". Default: the method whose preset or options are given, else direct")
    fu = p.add_argument_group("FreeU (any method)")
    fu.add_argument("--freeu", action="store_true", help="turn FreeU on (off by default)")
    for k in ("b1", "b2", "s1", "s2"):
        fu.add_argument(f"--freeu_{k}", type=nonneg_float, default=None,
                        help=f"FreeU {k} (default: preset/model value)")
    cas = p.add_argument_group("cascades (--method " + " | ".join(
        c.name for c in methods.classes() if "init_image" in c.accepts) + ")")
    cas.add_argument("--init_image", type=str, default=None,
                     help="start the cascade from this image (resized to the first stage) instead of sampling stage 1")
    cas.add_argument("--save_stages", action="store_true", help="also write every earlier stage's image")
    td = p.add_argument_group("tiled VAE decoding")
    td.add_argument("--tiled_decoding", action="store_true",
                    help="decode the latent in tiles (by default: only when one piece would not fit the free memory)")
    td.add_argument("--tile_size", type=positive_int, default=None,
                    help="tile side in latent pixels (default: the largest that fits the free memory)")
    td.add_argument("--overlap", type=nonneg_int, default=24, help="tile overlap in latent pixels")
    td.add_argument("--sync_gn", action="store_true",
                    help="normalise every decoder GroupNorm with whole-image statistics (no seams)")
    sx = p.add_argument_group("SDXL size conditioning (pixels; SDXL configs only)")
    sx.add_argument("--original_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="the 'original image size' SDXL conditions on (default: --H --W)")
    sx.add_argument("--crop_coords_top_left", type=int, nargs=2, metavar=("TOP", "LEFT"), default=None,
                    help="the crop offset SDXL conditions on (default: 0 0)")
    sx.add_argument("--target_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="the target size SDXL conditions on (default: --H --W)")
    samplers.add_args(p)
    add_memory_args(p)
    methods.add_args(p)
    sweep_mode.add_sweep_args(p)
    return p


DEMO_ENCODER = "ldm.modules.encoders.word_embedder.WordEmbedder"  # the demo model's text encoder (configs/demo/)


def model_family(config):
    """The model family of a config, what a preset's ``base_model`` names: "sd1" (CLIP ViT-L text encoder), "sdxl",
    "demo" (the demo model's word encoder, configs/demo/) or "sd2"."""
    target = str(config.model.params.get("cond_stage_config", {}).get("target", ""))
    if target.endswith("FrozenCLIPEmbedder"):
        return "sd1"
    if target == DEMO_ENCODER:
        return "demo"
    params = config.model.params
    if "conditioner" in params or "conditioner_config" in params or "sdxl" in str(config.model.target).lower():
        return "sdxl"
    return "sd2"


def freeu_settings(opt, info, settings):
    """FreeU's values when --freeu is given: the preset's (ScaleCrafter, FreeScale), else the model family's
    defaults, then the --freeu_* overrides; None without --freeu."""
    from ldm.unet_hooks.freeu import FREEU_DEFAULTS
    if not opt.freeu:
        return None
    values = dict(settings.freeu or FREEU_DEFAULTS[info.family])
    for k in ("b1", "b2", "s1", "s2"):
        if getattr(opt, f"freeu_{k}") is not None:
            values[k] = getattr(opt, f"freeu_{k}")
    return values


def model_info(opt, config, config_path):
    """ModelInfo of --config (--f/--C override the factor and channels)."""
    f_cfg, c_cfg = first_stage_factor(config)
    family = model_family(config)
    params = config.model.params
    unet = params.get("unet_config", {}).get("params", {})
    mc = int(unet.get("model_channels", 320))
    ddconfig = params.get("first_stage_config", {}).get("params", {}).get("ddconfig", {})
    return ModelInfo(family=family, f=opt.f or f_cfg, channels=opt.C or c_cfg,
                     base_latent=int(params.get("image_size", 64)),
                     side=1024 if family == "sdxl" else 512, steps=opt.steps, seed=opt.seed,
                     config_name=Path(config_path).name,
                     unet_channels=tuple(mc * int(m) for m in unet.get("channel_mult", (1, 2, 4, 4))),
                     decoder_channels=int(ddconfig.get("ch", 128)) * int((ddconfig.get("ch_mult") or [1])[0])
                     if ddconfig else 0,
                     tiled_vae=bool(ddconfig))


def resolve_size(opt, info, method_cls):
    """(H, W): --H/--W, else the method's preset size, else the family's training side; checked (a size from a
    preset is named by the preset's file and keys)."""
    preset = method_cls.preset_size(opt, info) or (None, None)
    H = opt.H if opt.H is not None else preset[0] if preset[0] is not None else info.side
    W = opt.W if opt.W is not None else preset[1] if preset[1] is not None else info.side
    for flag, given, key, value, from_preset in (("--H", opt.H, "height", H, preset[0]),
                                                 ("--W", opt.W, "width", W, preset[1])):
        if given is None and from_preset is not None:  # the preset's size: name its file and key
            check_side(value, info.f, key, f"{method_cls.preset_flag} "
                                           f"{getattr(opt, (method_cls.preset_flag or '--').lstrip('-'), None)}")
        else:
            check_side(value, info.f, flag)
    return int(H), int(W)


def size_conditioning(opt, settings):
    """SDXL's (original_size, crop, target_size): the flags, else what the method fixes, else the image size."""
    sc = settings.size_conditioning
    original = opt.original_size if opt.original_size is not None else sc.get("original_size")
    target = opt.target_size if opt.target_size is not None else sc.get("target_size")
    return original, opt.crop_coords_top_left or (0, 0), target or settings.size


def half_weights(opt, device):
    """The loader's ``weights_dtype`` for ``--precision half`` on CUDA (cast in host memory before the move, so the
    GPU never holds the float32 weights), else nothing (loaders that do not take it keep working)."""
    if opt.precision == "half" and torch.device(device).type == "cuda":
        return {"weights_dtype": getattr(torch, opt.autocast_dtype)}
    return {}


def prepare_model(opt, model, device, settings):
    """Model-family settings after loading: half-precision weights (already cast by a loader that takes
    ``weights_dtype``), SDXL's size conditioning (returned)."""
    if opt.precision == "half" and device.type == "cuda":
        from ldm.util import cast_for_half_precision
        cast_for_half_precision(model, getattr(torch, opt.autocast_dtype))
    if opt.precision == "full" and hasattr(getattr(model, "first_stage_model", None), "compute_dtype"):
        model.first_stage_model.compute_dtype = torch.float32  # (float16 on CUDA otherwise)
    if not hasattr(model, "set_size_conditioning"):
        return None
    original, crop, target = size_conditioning(opt, settings)
    return model.set_size_conditioning(target, original_size=original, crop_coords_top_left=crop)


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
    if opt.sampler is not None:
        samplers.options_of(opt)  # --sampler/--spacing/--eta/--ddim_eta together (with a preset's: in plan_run)


def load_config(opt):
    """(path, config) of --config, its targets checked and --steps against its training timesteps."""
    config_path = Path(opt.config)
    if not config_path.is_file():
        raise UsageError(f"--config {opt.config}: {missing_file_reason(config_path)} (the original configs are in "
                         "configs/stable-diffusion/)")
    config = load_config_file(config_path, trust=opt.trust_config, flag="--config")
    try:
        check_config_targets(config.model if "model" in config else config, trust=opt.trust_config)
    except UsageError as err:
        raise UsageError(f"--config {opt.config}: {err}") from None
    timesteps = int(config.model.params.get("timesteps", 1000)) if "model" in config else 1000
    if not 1 <= opt.steps <= timesteps:
        raise UsageError(f"--steps {opt.steps}: the number of sampling steps must be between 1 and {timesteps} (the "
                         f"sampler takes its steps from the model's {timesteps} training timesteps; 50 is usual)")
    return config_path, config


def plan_run(opt):
    """Everything before the model loads: config, method, size, the method's settings (checked; nothing written).
    Returns (config_path, config, info, method class, settings)."""
    check_options(opt)
    config_path, config = load_config(opt)
    info = model_info(opt, config, config_path)
    method_cls = methods.resolve(opt)
    H, W = resolve_size(opt, info, method_cls)
    if info.family != "sdxl" and any(v is not None for v in (opt.original_size, opt.crop_coords_top_left,
                                                             opt.target_size)):
        raise UsageError("--original_size/--crop_coords_top_left/--target_size are SDXL's size conditioning; "
                         f"{opt.config} is not an SDXL config")
    if is_upscaler_config(config):
        raise UsageError(f"--config {opt.config} is the x4 upscaler, which needs a low-resolution image: use "
                         "scripts/upscale.py, or pass it as --sr_config with --method sdsr")
    try:
        settings = method_cls.settings(opt, info, (H, W))
    except ValueError as err:
        raise UsageError(str(err)) from None
    if settings.sample_size is not None:
        check_size(*settings.sample_size, info.f, names=("the first stage's height", "width"),
                   source=f"--method {method_cls.name}")
    samplers.options_of(opt, settings.sampler)  # the flags fit the sampler (--sampler, else the preset's)
    samplers.check_steps(opt, int(config.model.params.get("timesteps", 1000)), settings.sampler)
    check_tiling(opt, info)
    return config_path, config, info, method_cls, settings


def check_tiling(opt, info):
    """--tiled_decoding (or --tile_size) on a model whose first stage is the identity (the demo model: the latent is
    the image) does nothing: a warning, and the run goes on without it (``tiling_of`` drops it)."""
    given = [f for f, v in (("--tiled_decoding", opt.tiled_decoding), ("--tile_size", opt.tile_size)) if v]
    if given and not info.tiled_vae:
        warnings.warn(f"{'/'.join(given)}: --config {opt.config} has no VAE (its first stage is the identity, the "
                      "latent is the image), so there is nothing to decode in tiles; ignored", InputWarning,
                      stacklevel=2)


def check_memory_of(opt, plan, device):
    """Refuse before loading a run whose largest tensor (``Method.memory_estimate``) exceeds the memory available
    on ``device`` (``ldm.inference.check_memory``)."""
    _, _, info, method_cls, settings = plan
    use_autocast = opt.precision in ("autocast", "half") and device.type == "cuda"
    # without --tiled_decoding the decoder still tiles when one piece would not fit (AutoencoderKL.decode_auto):
    # its whole-image activation does not bound the run
    tiling = tiling_of(opt, info) or ({"planned": True} if info.tiled_vae else {})
    check_memory(method_cls.memory_estimate(settings, info, opt.n_samples, scale=opt.scale,
                                            tiling=tiling, bytes_per_value=2 if use_autocast else 4),
                 device)


def check_decoded(images):
    """The decoded images, unless they hold NaN or infinite values (a VAE overflowing in half precision): then a
    UsageError, and nothing is written for the batch."""
    from torch._subclasses.fake_tensor import is_fake
    if not is_fake(images) and not bool(torch.isfinite(images).all()):
        raise UsageError("the decoded images hold NaN or infinite values (the latent was finite: the VAE decoder "
                         "overflowed, e.g. in float16); nothing is written for this batch; try --precision full")
    return images


def tiling_of(opt, info=None):
    """The keyword arguments of tiled VAE decoding (--tiled_decoding ...), or {} (also for a model without a VAE)."""
    if not opt.tiled_decoding or (info is not None and not info.tiled_vae):
        return {}
    tiling = {"overlap": opt.overlap, "sync_gn": opt.sync_gn}
    if opt.tile_size is not None:
        tiling["tile_size"] = opt.tile_size
    return tiling


def precision_scope_of(opt, device):
    use_autocast = opt.precision in ("autocast", "half") and device.type == "cuda"
    scope = torch.autocast("cuda", dtype=getattr(torch, opt.autocast_dtype)) if use_autocast else nullcontext()
    return use_autocast, scope


def run_settings(opt, config_path, method, sampler, freeu, tiling, use_autocast, device, conditioning):
    """The PNG metadata (and sweep fingerprint) of a run."""
    H, W = method.settings.size
    out = {**sampler.describe(), "steps": opt.steps, "scale": opt.scale, "H": H, "W": W, "seed": opt.seed,
           "config": config_path.name, "ckpt": Path(opt.ckpt).name, "n_samples": opt.n_samples,
           "precision": opt.precision if use_autocast else "full", "device": device.type,
           "negative_prompt": opt.negative_prompt, "fixed_code": opt.fixed_code, "freeu": freeu,
           "tiled_decoding": tiling or None, "method": method.name, **method.describe()}
    if conditioning is not None:
        out["size_conditioning"] = conditioning
    if getattr(method.model, "merged_loras", None):  # --lora: name, sha256 prefix, weight (ldm/lora.py)
        out["lora"] = method.model.merged_loras
    from ldm.pipelines.content import content_keys  # the versions of the files and code (a sweep's fingerprint)
    out["content"] = content_keys(opt, type(method))
    return out


def prompt_batches(opt):
    """(prompts, batches of prompts) of --prompt / --from-file and --n_samples."""
    if opt.from_file:
        prompts = read_prompt_file(opt.from_file, opt.repeat)
    else:
        if opt.prompt is None:
            raise UsageError("give --prompt or --from-file")
        prompts = [opt.prompt]
    data = [[p] * opt.n_samples for p in prompts] if not opt.from_file else chunk(prompts, opt.n_samples)
    return prompts, data


def load_run(opt, plan, device, loader, wrap_sampler=None):
    """After planning: the model (loaded by ``loader``), its sampler and the prepared method.
    Returns (model, sampler, method, tiling, freeu, conditioning)."""
    config_path, config, info, method_cls, settings = plan
    t0 = time.time()
    model = loader(config, opt.ckpt, device=device, allow_unsafe=opt.unsafe_load, use_ema=not opt.no_ema,
                   config_name=str(config_path), trust=opt.trust_config, **half_weights(opt, device))
    print(f"Loaded {opt.ckpt} with {config_path} in {time.time() - t0:.1f}s on {device}")
    apply_loras(model, getattr(opt, "lora", None), allow_unsafe=opt.unsafe_load)  # before any method
    conditioning = prepare_model(opt, model, device, settings)
    sampler = samplers.from_options(opt, model, settings.sampler)
    if wrap_sampler is not None:
        sampler = wrap_sampler(sampler)
    tiling = tiling_of(opt, info)
    method = method_cls(model, settings, info, tiling, opt)
    method.loader = loader
    method.prepare()
    freeu = freeu_settings(opt, info, settings)
    return model, sampler, method, tiling, freeu, conditioning


def freeu_scope_of(model, freeu):
    if not freeu:
        return nullcontext()
    from ldm.unet_hooks.freeu import freeu as freeu_hooks
    return freeu_hooks(model.model.diffusion_model, **freeu)


def iter_images(opt, model, sampler, method, data, tiling, start_code, settings_meta, precision_scope, freeu_scope,
                callback=None, to_image=to_pil):
    """The plain (not sweep) sampling loop: yields (PIL image, its PNG metadata, [PIL images of its earlier
    stages]) per image, in order. ``callback(step)`` is called after every sampler step (raising stops the run);
    ``to_image(x)`` turns one decoded (C, H, W) tensor in [-1, 1] into the PIL image (default ``to_pil``)."""
    with torch.no_grad(), precision_scope, freeu_scope, method.scope(), low_memory_of(opt, model, method):
        for n in tqdm(range(opt.n_iter), desc="Sampling", disable=opt.n_iter == 1):
            for batch_idx, batch_prompts in enumerate(tqdm(data, desc="data", disable=len(data) == 1)):
                uc = None
                if opt.scale != 1.0:
                    uc = model.get_learned_conditioning(len(batch_prompts) * [opt.negative_prompt])
                c = model.get_learned_conditioning(list(batch_prompts))
                samples, stages = method.sample(
                    sampler, opt.steps, c, uc, opt.scale, batch_size=len(batch_prompts),
                    x_T=start_code[:len(batch_prompts)] if start_code is not None else None,
                    jitter_seed=opt.seed + 1000 * n + batch_idx, callback=callback)
                x = check_decoded(model.decode_first_stage(samples, **tiling))
                x = method.finish(x, batch_prompts)
                stage_images = [model.decode_first_stage(z, **tiling) for z in stages]
                for j, (img_t, prompt) in enumerate(zip(x, batch_prompts)):
                    meta = {"prompt": prompt, "seed": str(opt.seed),
                            "parameters": {**settings_meta, "iteration": n, "batch": batch_idx,
                                           "position_in_batch": j}}
                    yield to_image(img_t), meta, [to_image(stage[j]) for stage in stage_images]


def low_memory_of(opt, model, method):
    """--lowvram / --sequential_offload, and the text encoders off the GPU when the sampling would not fit beside
    them (``ldm.inference.memory_scope``), for the sampling loop."""
    h, w = method.settings.size
    return memory_scope(opt, model, model.betas.device, (h // method.info.f, w // method.info.f), opt.n_samples)


def generate(opt, loader=None, wrap_sampler=None, callback=None, plan=None):
    """The images of the run ``opt`` in memory, nothing written (the web app, ``ldm/app/``): a list of
    (PIL image, PNG metadata, [PIL images of its earlier stages]), the same images and metadata that ``run``
    writes. ``callback(step)`` is called after every sampler step; an exception raised there stops the run.
    ``plan``: the result of ``plan_run(opt)`` when the caller already has it."""
    loader = loader or load_model_from_config
    plan = plan or plan_run(opt)
    if opt.ckpt is None:
        raise UsageError("--ckpt is required: the checkpoint file matching --config (see checkpoints/README.md)")
    _, data = prompt_batches(opt)
    device = pick_device(opt.device)
    check_memory_of(opt, plan, device)
    model, sampler, method, tiling, freeu, conditioning = load_run(opt, plan, device, loader, wrap_sampler)
    seed_everything(opt.seed)
    start_code = None
    if opt.fixed_code:  # in the sampler's parameterisation
        start_code = sampler.start_latent(torch.randn([opt.n_samples, *method.sample_shape()], device=device),
                                          opt.steps)
    use_autocast, precision_scope = precision_scope_of(opt, device)
    settings_meta = run_settings(opt, plan[0], method, sampler, freeu, tiling, use_autocast, device, conditioning)
    return list(iter_images(opt, model, sampler, method, data, tiling, start_code, settings_meta, precision_scope,
                            freeu_scope_of(model, freeu), callback=callback))


def run(opt, loader=None, wrap_sampler=None, to_image=None):
    """The txt2img run of the options ``opt`` (``build_parser()``). Three seams for tools (the benchmark):
    ``loader(config, ckpt, **kw)`` builds every model the run loads (default: ``load_model_from_config``),
    ``wrap_sampler(sampler)`` may wrap the sampler (e.g. to time its runs), and ``to_image(x)`` turns each decoded
    (C, H, W) tensor in [-1, 1] into the PIL image that is written (default ``to_pil``; the benchmark's memory
    simulation, whose tensors hold shapes only, gives a placeholder)."""
    loader = loader or load_model_from_config
    plan = plan_run(opt)
    config_path = plan[0]
    if opt.ckpt is None:
        raise UsageError("--ckpt is required: the checkpoint file matching --config (see checkpoints/README.md)")
    batch_size = opt.n_samples
    prompts, data = prompt_batches(opt)
    outdir = Path(opt.outdir)
    sample_path = outdir / "samples"
    for folder in (outdir, sample_path):  # before minutes of loading and sampling, not after
        check_output_dir(folder)

    sweeping = opt.sweep or sweep_mode.launched_by_torchrun()
    if sweeping and not opt.sweep:
        print("launched by torchrun: sweep mode on (--sweep; see docs/cluster.md)")
    device = sweep_mode.rank_device(pick_device(opt.device))
    check_memory_of(opt, plan, device)
    model, sampler, method, tiling, freeu, conditioning = load_run(opt, plan, device, loader, wrap_sampler)

    created = [d for d in (sample_path, outdir) if not d.exists()]
    if not sweeping:  # (sweep mode does the same in ldm/pipelines/sweep.py)
        sample_path.mkdir(parents=True, exist_ok=True)
        for folder in (sample_path, outdir):  # left by a killed run between writing and renaming
            remove_stale_temp_files(folder)
    base_count = next_free_index(sample_path)
    grid_count = next_free_index(outdir, r"^grid-(\d+)\.png$")

    seed_everything(opt.seed)
    shape = method.sample_shape()
    start_code = None
    if opt.fixed_code:  # the same start latent for every batch, in the sampler's parameterisation
        start_code = sampler.start_latent(torch.randn([batch_size, *shape], device=device), opt.steps)
    use_autocast, precision_scope = precision_scope_of(opt, device)
    settings_meta = run_settings(opt, config_path, method, sampler, freeu, tiling, use_autocast, device, conditioning)
    all_images = []
    freeu_scope = freeu_scope_of(model, freeu)
    if sweeping:
        run_sweep(opt, model, sampler, method, settings_meta, tiling, device, precision_scope, freeu_scope)
        return []
    total = opt.n_iter * sum(len(b) for b in data)
    try:
        for img, meta, stages in iter_images(opt, model, sampler, method, data, tiling, start_code, settings_meta,
                                               precision_scope, freeu_scope, to_image=to_image or to_pil):
            for k, stage in enumerate(stages, start=1):
                save_png(stage, sample_path / f"{base_count:05}-stage{k}.png", {**meta, "stage": k})
            save_png(img, sample_path / f"{base_count:05}.png", meta)
            base_count += 1
            all_images.append(img)
    except BaseException as err:
        for folder in created:  # nothing written yet: leave no empty folders behind (rmdir keeps a non-empty one)
            try:
                folder.rmdir()
            except OSError:
                pass
        if not isinstance(err, KeyboardInterrupt):
            raise
        raise Interrupted(f"interrupted after {len(all_images)} of {total} images; re-run to continue (a plain run "
                          f"renders all {total} again, numbered after the files in {sample_path}; --sweep runs "
                          "resume where they stopped)") from None
    if not opt.skip_grid and all_images:
        grid = make_grid(all_images, opt.n_rows or batch_size)
        grid_file = outdir / f"grid-{grid_count:04}.png"
        save_png(grid, grid_file, {"parameters": settings_meta, "prompts": prompts})
        print(f"Grid: {grid_file}")
    print(f"Your samples are ready and waiting for you here: {outdir}")
    return all_images


def run_sweep(opt, model, sampler, method, settings, tiling, device, precision_scope, freeu_scope):
    """--sweep / torchrun: the deterministic, resumable, sharded form of the loop above (ldm/pipelines/sweep.py).

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
        samples, stages = method.sample(sampler, opt.steps, c, uc, opt.scale, batch_size=n, generator=generators,
                                        jitter_seed=opt.seed)  # shared by all batches: sizes don't matter
        for k, z in enumerate(stages, start=1):  # --save_stages: beside the final files, not in the manifest
            for it, x in zip(items, model.decode_first_stage(z, **tiling)):
                path = Path(opt.outdir) / "samples" / it.file
                save_png(to_pil(x), path.with_name(f"{path.stem}-stage{k}.png"), {"prompt": it.prompt, "stage": k})
        images = check_decoded(model.decode_first_stage(samples, **tiling))
        # SD+SR: each image's generator goes on into the upscaler's noise
        images = method.finish(images, [it.prompt for it in items], generator=generators)
        return [to_pil(x) for x in images]

    dist = sweep_mode.DistContext(device, opt.dist_backend, opt.dist_timeout)
    try:
        with torch.no_grad(), precision_scope, freeu_scope, method.scope(), low_memory_of(opt, model, method):
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
