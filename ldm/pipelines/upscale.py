"""The upscaling pipelines behind ``scripts/upscale.py``: the SD 2.x x4 upscaler (``--method sr``), and image-to-image
at a larger size with any method of the registry that does img2img (``Method.img2img``: the image is resized to the
target size, encoded, re-noised to ``--strength`` and denoised with the method; a cascade takes the image in at the
largest stage that fits it).
"""
import argparse
import hashlib
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ldm.checkpoint import CheckpointError, check_checkpoint_file, load_model_from_config
from ldm.inference import (InputWarning, UsageError, add_memory_args, check_memory, check_output_dir, check_size,
                           finite_float, memory_scope, next_free_index, numpy_seed_arg, output_folder, pick_device,
                           positive_float, remove_stale_temp_files, save_png, seed_everything, to_pil)
from ldm.util import missing_file_reason
from ldm import methods, upscaler as upscaling
from ldm.lora import apply_loras
from ldm.methods.cascade import CascadeMethod, encode_image, read_image_tensor
from ldm.pipelines import txt2img
from ldm.pipelines.txt2img import HelpFormatter
from ldm import samplers


def method_names():
    return ("sr", *methods.img2img_names())


def method_help():
    return ("sr: the SD 2.x x4 upscaler (the options below); " + " | ".join(methods.img2img_names()) +
            ": image-to-image with a base model at the target size (see `--method NAME --help`)")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--method", choices=method_names(), default="sr", help=method_help())
    p.add_argument("--image", type=str, nargs="+", required=True, help="the low-resolution image(s)")
    p.add_argument("--prompt", type=str, default="", help="what the image shows (the upscaler is text-guided)")
    p.add_argument("--negative_prompt", type=str, default="", help="the unconditional prompt for guidance")
    p.add_argument("--scale", type=positive_float, default=4.0,
                   help="upscaling factor, at most 4 (the model's; smaller factors resize its x4 output)")
    p.add_argument("--H", type=int, default=None, help="output height in pixels (instead of --scale)")
    p.add_argument("--W", type=int, default=None, help="output width in pixels (instead of --scale)")
    p.add_argument("--scale_cfg", type=finite_float, default=9.0, help="classifier-free guidance scale")
    p.add_argument("--config", type=str, default=upscaling.UPSCALER_CONFIG, help="the upscaler's YAML config")
    p.add_argument("--ckpt", type=str, default=None, help="the upscaler checkpoint (x4-upscaler-ema.ckpt)")
    p.add_argument("--outdir", type=str, default="outputs/upscale-samples", help="where to write results")
    p.add_argument("--seed", type=numpy_seed_arg, default=42, help="the seed (the same for every input image)")
    p.add_argument("--n_samples", type=int, default=1, help="upscaled versions per input image (one batch)")
    p.add_argument("--precision", type=str, choices=["full", "autocast"], default="autocast",
                   help="autocast: fp16/bf16 autocast of the UNet on CUDA (the VAE always decodes in float32); "
                        "CPU always runs in full precision")
    p.add_argument("--autocast_dtype", type=str, choices=["float16", "bfloat16"], default="float16",
                   help="the autocast dtype on CUDA")
    p.add_argument("--device", type=str, choices=["auto", "cpu", "cuda"], default="auto", help="where to run")
    p.add_argument("--tiled_decoding", action=argparse.BooleanOptionalAction, default=None,
                   help="decode the latent in tiles with synchronized GroupNorm (default: when the output is "
                        "larger than 1024x1024)")
    p.add_argument("--tile_size", type=int, default=None, help="VAE tile side in latent pixels (default 64)")
    p.add_argument("--unsafe_load", action="store_true",
                   help="allow checkpoints that need unsafe unpickling (only for files you trust)")
    p.add_argument("--trust_config", action="store_true",
                   help="allow config targets outside this package (ldm.*); a config is code, like a pickle")
    p.add_argument("--no_ema", action="store_true", help="ignore model_ema.* weights in a training checkpoint")
    upscaling.add_args(p.add_argument_group("upscaler sampling"))
    add_memory_args(p)
    return p


def check_options(opt):
    """The flags, before anything is loaded or written."""
    if not 0 < opt.scale <= 4:
        raise UsageError(f"--scale {opt.scale}: must be in (0, 4]; the model upscales by 4 once (run the script "
                         "again on its output for more)")
    for flag in ("H", "W"):
        if getattr(opt, flag) is not None and getattr(opt, flag) < 1:
            raise UsageError(f"--{flag} {getattr(opt, flag)}: must be a positive number of pixels")
    if opt.n_samples < 1:
        raise UsageError(f"--n_samples {opt.n_samples}: must be at least 1")
    if opt.tile_size is not None and opt.tile_size < 1:
        raise UsageError(f"--tile_size {opt.tile_size}: must be a positive number of latent pixels")
    upscaling.check_args(opt)
    for path in opt.image:
        if not Path(path).is_file():
            raise UsageError(f"--image {path}: {missing_file_reason(path)}")


def output_size(opt, h, w, factor):
    """(H, W) of the result for an h x w input; at most ``factor`` times each side."""
    if opt.H is None and opt.W is None:
        H, W = round(h * opt.scale), round(w * opt.scale)
    elif opt.H is None:
        H, W = round(h * opt.W / w), opt.W
    elif opt.W is None:
        H, W = opt.H, round(w * opt.H / h)
    else:
        H, W = opt.H, opt.W
    if H > factor * h or W > factor * w:
        raise UsageError(f"{H}x{W} from a {h}x{w} image is more than x{factor}, what the upscaler does in one pass; "
                         "ask for less, or run the script again on its output")
    return max(1, H), max(1, W)


def load_image(path):
    """An RGB image file as a (1, 3, h, w) tensor in [-1, 1] (as the original demo scripts prepare it)."""
    from ldm.image_io import read_rgb_array
    arr = read_rgb_array(path, "--image")  # ImageReadError (a UsageError) naming the file
    return torch.from_numpy(arr).to(torch.float32).permute(2, 0, 1)[None] / 127.5 - 1.0


def run(opt):
    check_options(opt)
    upscaling.load_upscaler_config(opt.config, trust=opt.trust_config)  # an upscaler config? (before minutes of loading)
    if opt.ckpt is None:
        raise UsageError("--ckpt is required: the x4 upscaler checkpoint (x4-upscaler-ema.ckpt, see "
                         "checkpoints/README.md)")
    check_checkpoint_file(opt.ckpt)
    images = [(path, load_image(path)) for path in opt.image]
    outdir = Path(opt.outdir)
    check_output_dir(outdir)
    device = pick_device(opt.device)
    t0 = time.time()
    model = upscaling.load_upscaler(opt.config, opt.ckpt, device=device, allow_unsafe=opt.unsafe_load,
                                    use_ema=not opt.no_ema, trust=opt.trust_config)
    print(f"Loaded {opt.ckpt} with {opt.config} in {time.time() - t0:.1f}s on {device}")
    tiling = "auto"
    if opt.tiled_decoding is not None:
        tiling = {"sync_gn": True, **({"tile_size": opt.tile_size} if opt.tile_size else {})} if opt.tiled_decoding \
            else {}
    elif opt.tile_size:
        tiling = {"sync_gn": True, "tile_size": opt.tile_size}
    try:
        up = upscaling.upscaler_from_args(model, opt, opt.scale_cfg, opt.negative_prompt, tiling)
    except ValueError as err:
        raise UsageError(str(err)) from None
    use_autocast = opt.precision == "autocast" and device.type == "cuda"
    precision_scope = (torch.autocast("cuda", dtype=getattr(torch, opt.autocast_dtype)) if use_autocast
                       else nullcontext())
    written = []
    h0, w0 = images[0][1].shape[-2:]
    low_memory = memory_scope(opt, model, device, up.latent_shape(h0, w0)[1:], opt.n_samples)
    with output_folder(outdir), torch.no_grad(), precision_scope, low_memory:  # a failed run leaves no empty folder
        remove_stale_temp_files(outdir)
        for path, x in tqdm(images, desc="images", disable=len(images) == 1):
            h, w = x.shape[-2:]
            H, W = output_size(opt, h, w, up.factor)
            plan = up.plan(h, w)
            # as the original demo scripts: torch seeded, the starting latent from numpy's RandomState(seed)
            seed_everything(opt.seed)
            x_T = np.random.RandomState(opt.seed).randn(opt.n_samples, *up.latent_shape(h, w))
            x_T = torch.from_numpy(x_T).to(device=device, dtype=torch.float32)
            bar = tqdm(total=up.steps, desc=f"upscaling {Path(path).name}", leave=False)
            try:
                out = up(x.expand(opt.n_samples, -1, -1, -1), opt.prompt, x_T=x_T, out_hw=(H, W),
                         callback=lambda i: bar.update(1))
            finally:
                bar.close()
            settings = {
                "sampler": up.make_sampler().describe().get("sampler", "DDIM"), "image": Path(path).name, "input_size": [h, w], "H": H, "W": W,
                "scale": opt.scale if opt.H is None and opt.W is None else None, "config": Path(opt.config).name,
                "ckpt": Path(opt.ckpt).name, "seed": opt.seed, "n_samples": opt.n_samples,
                "precision": opt.precision if use_autocast else "full", "device": device.type,
                "upscaler": {**up.describe(), "plan": plan}, "scale_cfg": opt.scale_cfg,
                "resized_from": [h * up.factor, w * up.factor] if (H, W) != (h * up.factor, w * up.factor) else None,
            }
            for j, img_t in enumerate(out):
                index = next_free_index(outdir)
                target = outdir / f"{index:05}.png"
                save_png(to_pil(img_t), target, {"prompt": opt.prompt, "seed": str(opt.seed),
                                                 "parameters": {**settings, "position_in_batch": j}})
                written.append(target)
    for target in written:
        print(f"wrote {target}")
    return written


# ------------------------------------------------------------------------------------------------
# --method scalecrafter | freescale | demofusion: image-to-image at the target size with the base model

# txt2img options that mean the same here (plus the img2img methods' own, from the registry); every other txt2img
# option is hidden and refused when given
COMMON_OPTIONS = {
    "help", "method", "image", "strength", "factor", "prompt", "negative_prompt", "outdir", "steps", "ddim_eta",
    "sampler", "spacing", "eta",
    "n_samples", "H", "W", "scale", "config", "ckpt", "seed", "precision", "autocast_dtype", "device",
    "unsafe_load", "trust_config", "no_ema", "lora", "freeu", "freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2",
    # tiled VAE, SDXL size conditioning, memory
    "tiled_decoding", "tile_size", "overlap", "sync_gn", "original_size", "crop_coords_top_left", "target_size",
    "lowvram", "sequential_offload",
}
SHARED_HINTS = {"init_image": "the image is --image", "save_stages": "not written by upscale.py"}


def img2img_options():
    """{dest: None (accepted) or why it is refused} for the txt2img options upscale.py knows."""
    out = dict.fromkeys(COMMON_OPTIONS)
    for name in methods.img2img_names():
        cls = methods.method_class(name)
        out.update(dict.fromkeys(cls.own_options()))
        out.update(cls.img2img_refused)
    return out


AUTO_TILING_PIXELS = 1024 * 1024  # above this output area the VAE encodes and decodes in tiles


def build_img2img_parser():
    """txt2img's parser (the same method options and presets) with upscale.py's image, size and strength options;
    ``--scale`` is the upscaling factor here too, ``--scale_cfg`` the guidance scale."""
    base = txt2img.build_parser()
    accepted = img2img_options()
    for action in base._actions:
        if action.dest not in accepted or accepted[action.dest] is not None:
            action.help = argparse.SUPPRESS
    p = argparse.ArgumentParser(description="Image-to-image upscaling with a tuning-free higher-resolution method: "
                                "the image is resized to the target size, encoded, re-noised to --strength and "
                                "denoised with the method (docs/upscaling.md).", formatter_class=HelpFormatter,
                                parents=[base], add_help=False, conflict_handler="resolve")
    p.add_argument("-h", "--help", action="help", help="show this help message and exit")
    p.add_argument("--method", choices=method_names(), required=True, help=method_help())
    p.add_argument("--image", type=str, nargs="+", required=True, help="the image(s) to upscale")
    p.add_argument("--strength", type=finite_float, default=None,
                   help="how much of the schedule is re-run, in [0, 1]: the image is noised to step "
                        "t_enc = floor(strength x steps) from the end and the last t_enc steps are denoised (0: the "
                        "image, encoded and decoded; 1: from the noisiest step). Default: 0.75 for "
                        "scalecrafter, 1 - restart_step / steps for freescale (0.7 with its presets), 1 for "
                        "demofusion (its release re-noises every phase to the first step)")
    p.add_argument("--H", type=int, default=None,
                   help="output height in pixels, a multiple of the latent factor (default: from --W and the "
                        "image's aspect, else --scale, else the method preset's)")
    p.add_argument("--W", type=int, default=None, help="output width in pixels (as --H)")
    p.add_argument("--scale", dest="factor", type=positive_float, default=None,
                   help="output size = the image's size x this factor, rounded to multiples of the latent factor "
                        "(instead of --H/--W)")
    p.add_argument("--scale_cfg", dest="scale", type=finite_float, default=9.0,
                   help="classifier-free guidance scale")
    p.add_argument("--prompt", type=str, default="", help="what the image shows")
    p.add_argument("--outdir", type=str, default="outputs/upscale-samples", help="where to write results")
    return p


def check_img2img_options(opt, parser):
    """The flags, before anything is loaded or written."""
    accepted = img2img_options()
    for action in parser._actions:
        if action.dest == argparse.SUPPRESS or not action.option_strings:
            continue
        if action.dest in accepted and accepted[action.dest] is None:
            continue
        if getattr(opt, action.dest, action.default) != action.default:
            hint = accepted.get(action.dest) or SHARED_HINTS.get(
                action.dest, "a scripts/txt2img.py option that upscale.py does not use")
            raise UsageError(f"{action.option_strings[0]}: {hint} (--method {opt.method})")
    if opt.strength is not None and not 0.0 <= opt.strength <= 1.0:
        raise UsageError(f"--strength {opt.strength} is outside [0, 1]: the fraction of the {opt.steps} sampling steps "
                         "re-run from the noised image (0 keeps the image, 1 starts from the noisiest step)")
    if opt.factor is not None and not opt.factor > 0:
        raise UsageError(f"--scale {opt.factor}: the upscaling factor must be positive")
    for path in opt.image:
        if not Path(path).is_file():
            raise UsageError(f"--image {path}: {missing_file_reason(path)}")
    txt2img.check_options(opt)


def read_image_info(path):
    """(height, width, sha256 hex) of an image file."""
    from ldm.image_io import read_rgb_array
    h, w = read_rgb_array(path, "--image").shape[:2]  # every pixel decoded: a broken file fails here, by name
    data = Path(path).read_bytes()
    return h, w, hashlib.sha256(data).hexdigest()


def target_size(given, preset_hw, factor, h, w, f, preset_source=None):
    """(H, W) for an h x w image: --H/--W (one of them: the other from the aspect), else --scale, else the
    preset's size. Derived sides are rounded to multiples of f; given ones are checked (the preset's named by
    ``preset_source``, e.g. "--freescale_config FILE", and its keys)."""
    def rounded(v):
        return max(f, int(round(v / f)) * f)
    H, W = given
    if H is None and W is None:
        if factor is not None:
            H, W = rounded(h * factor), rounded(w * factor)
        else:
            H, W = preset_hw
            if H is None or W is None:
                raise UsageError("give the output size: --H and/or --W, --scale FACTOR, or a preset "
                                 "(--scalecrafter_config / --freescale_config) with a size")
            check_size(H, W, f, names=("height", "width"), source=preset_source)
    elif H is None:
        H = rounded(h * W / w)
    elif W is None:
        W = rounded(w * H / h)
    check_size(H, W, f)
    return int(H), int(W)


def t_enc_of(strength, steps):
    """Steps re-run: floor(strength x steps) (SD's img2img; 1e-9 so that 0.29 x 100 gives 29, not 28)."""
    return min(steps, int(strength * steps + 1e-9))


def entry_stage(stages, h, w):
    """Index of the cascade stage the image enters at: the largest stage before the last that fits inside the
    image (both sides at most the image's), else the first (the image is then upsampled to it)."""
    fits = [k for k, (sh, sw) in enumerate(stages[:-1]) if sh <= h and sw <= w]
    return max(fits) if fits else 0


def plan_image(opt, method_cls, info, settings_of, given_hw, preset_hw, path):
    """Everything about one image that does not need the model: sizes, strength, the method's settings (a cascade's
    from the stage the image enters at)."""
    h, w, digest = read_image_info(path)
    source = (f"{method_cls.preset_flag} {getattr(opt, method_cls.preset_flag.lstrip('-'), None)}"
              if method_cls.preset_flag else None)
    H, W = target_size(given_hw, preset_hw, opt.factor, h, w, info.f, source)
    settings = settings_of((H, W))
    plan = {"path": path, "input_size": (h, w), "sha256": digest, "size": (H, W), "entry": None, "stages": None,
            "factor": opt.factor if given_hw == (None, None) and opt.factor is not None else None}
    strength = method_cls.default_strength(settings, opt.steps) if opt.strength is None else opt.strength
    plan["strength"], plan["t_enc"] = strength, t_enc_of(strength, opt.steps)
    if issubclass(method_cls, CascadeMethod):
        stages = method_cls.stages_of(settings)
        if len(stages) < 2:
            raise UsageError(f"{method_cls.name}: the cascade for {H}x{W} has a single stage (the model's base size): "
                             "nothing to upscale; ask for a larger --H/--W (or, with freescale, give "
                             "--freescale_stages with the image's size first)")
        k = entry_stage(stages, h, w)
        plan["stages"], plan["entry"] = stages[k:], k
        settings = method_cls.entering_at(settings, k, path)
    plan["settings"] = settings
    return plan


def image_settings(opt, method, plan, tiling, freeu, use_autocast, device, config_path, start_t, sampler):
    """The PNG metadata of one input image's results."""
    steps, t_enc = opt.steps, plan["t_enc"]
    s = {
        "mode": "img2img", "method": method.name, "image": Path(plan["path"]).name, "image_sha256": plan["sha256"],
        "input_size": list(plan["input_size"]), "H": plan["size"][0], "W": plan["size"][1],
        "scale": plan["factor"],
        "resize": "PIL bicubic in pixel space, before encoding",
        "resized_to": list(plan["size"] if plan["stages"] is None or not t_enc else plan["stages"][0]),
        "strength": plan["strength"], "t_enc": t_enc, "start_step": steps - t_enc if t_enc else None,
        "start_timestep": start_t, **sampler.describe(), "steps": steps, "scale_cfg": opt.scale,
        "negative_prompt": opt.negative_prompt, "seed": opt.seed, "config": Path(config_path).name,
        "ckpt": Path(opt.ckpt).name, "n_samples": opt.n_samples, "device": device.type,
        "precision": opt.precision if use_autocast else "full", "freeu": freeu, "tiled_decoding": tiling or None,
        **method.describe(),
    }
    if plan["stages"] is not None:
        s["cascade_entry"] = {"stage": plan["entry"], "size": list(plan["stages"][0])}
    return s


def plan_img2img(opt, parser):
    """Everything before the model loads (checked; nothing written). Returns (config_path, config, info,
    method class, per-image plans)."""
    check_img2img_options(opt, parser)
    config_path, config = txt2img.load_config(opt)
    if upscaling.is_upscaler_config(config):
        raise UsageError(f"--config {opt.config} is the x4 upscaler: use --method sr; --method {opt.method} needs a "
                         "base model's config (e.g. configs/stable-diffusion/v2-inference.yaml)")
    info = txt2img.model_info(opt, config, config_path)
    method_cls = methods.resolve(opt)
    method_cls.check_img2img(opt)
    given_hw = (opt.H, opt.W)
    preset_hw = method_cls.preset_size(opt, info) or (None, None)
    if info.family != "sdxl" and any(v is not None for v in (opt.original_size, opt.crop_coords_top_left,
                                                             opt.target_size)):
        raise UsageError("--original_size/--crop_coords_top_left/--target_size are SDXL's size conditioning; "
                         f"{opt.config} is not an SDXL config")

    def settings_of(size):
        try:
            return method_cls.settings(opt, info, size)
        except ValueError as err:
            raise UsageError(str(err)) from None
    plans = [plan_image(opt, method_cls, info, settings_of, given_hw, preset_hw, path) for path in opt.image]
    txt2img.check_tiling(opt, info)
    if opt.ckpt is None:
        raise UsageError("--ckpt is required: the base model's checkpoint matching --config (see "
                         "checkpoints/README.md)")
    return config_path, config, info, method_cls, plans


def img2img_runs(opt, planned, loader=None, callback=None, wrap_sampler=None):
    """Loads the model and yields, per input image, its results as [(PIL image, PNG metadata)].
    ``callback(step)`` is called after every sampler step (raising stops the run); ``wrap_sampler(sampler)`` may
    wrap the sampler."""
    config_path, config, info, method_cls, plans = planned
    loader = loader or load_model_from_config
    device = pick_device(opt.device)
    use_autocast = opt.precision in ("autocast", "half") and device.type == "cuda"
    for plan in plans:  # before loading: a run that cannot fit is refused now, not killed later
        # (without tiling options the decoder still tiles when one piece would not fit: AutoencoderKL.decode_auto)
        check_memory(method_cls.memory_estimate(plan["settings"], info, opt.n_samples, scale=opt.scale,
                                                tiling=img2img_tiling(opt, info, *plan["size"]) or (
                                                    {"planned": True} if info.tiled_vae else {}),
                                                bytes_per_value=2 if use_autocast else 4), device)
    t0 = time.time()
    model = loader(config, opt.ckpt, device=device, allow_unsafe=opt.unsafe_load, use_ema=not opt.no_ema,
                   config_name=str(config_path), trust=opt.trust_config, **txt2img.half_weights(opt, device))
    print(f"Loaded {opt.ckpt} with {config_path} in {time.time() - t0:.1f}s on {device}")
    apply_loras(model, getattr(opt, "lora", None), allow_unsafe=opt.unsafe_load)  # before any method
    sampler = samplers.from_options(opt, model, plans[0]["settings"].sampler)
    if wrap_sampler is not None:
        sampler = wrap_sampler(sampler)
    freeu = txt2img.freeu_settings(opt, info, plans[0]["settings"])
    use_autocast, precision_scope = txt2img.precision_scope_of(opt, device)
    H, W = max((p["size"] for p in plans), key=lambda hw: hw[0] * hw[1])
    txt2img.prepare_model(opt, model, device, plans[0]["settings"])  # weights cast before any offload
    low_memory = memory_scope(opt, model, device, (H // info.f, W // info.f), opt.n_samples)
    with torch.no_grad(), precision_scope, txt2img.freeu_scope_of(model, freeu), low_memory:
        for plan in tqdm(plans, desc="images", disable=len(plans) == 1):
            yield img2img_images(opt, method_cls, model, sampler, freeu, plan, info, device, use_autocast,
                                 config_path, callback)


def generate_img2img(opt, parser, loader=None, callback=None):
    """img2img in memory, nothing written (the web app): [(PIL image, PNG metadata)] of every input image, the
    same images and metadata ``run_img2img`` writes."""
    return [item for results in img2img_runs(opt, plan_img2img(opt, parser), loader, callback) for item in results]


def run_img2img(opt, parser):
    planned = plan_img2img(opt, parser)
    outdir = Path(opt.outdir)
    check_output_dir(outdir)
    written = []
    for results in img2img_runs(opt, planned):
        if not written:  # after loading: nothing written when the model does not load
            outdir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(outdir)
        for img, meta in results:
            target = outdir / f"{next_free_index(outdir):05}.png"
            save_png(img, target, meta)
            written.append(target)
    for target in written:
        print(f"wrote {target}")
    return written


def img2img_tiling(opt, info, H, W):
    """The tiled VAE options of an H x W result: asked for, or automatic above 1024x1024; none for a model without
    a VAE (the demo model's first stage is the identity)."""
    tiling = {}
    if info.tiled_vae and (opt.tiled_decoding or opt.tile_size is not None or H * W > AUTO_TILING_PIXELS):
        tiling = {"overlap": opt.overlap, "sync_gn": opt.sync_gn or not opt.tiled_decoding}
        if opt.tile_size is not None:
            tiling["tile_size"] = opt.tile_size
    return tiling


def img2img_images(opt, method_cls, model, sampler, freeu, plan, info, device, use_autocast, config_path,
                   callback=None):
    """The n_samples results for one input image: [(PIL image, PNG metadata)]."""
    def step(i, bar):
        bar.update(1)
        if callback is not None:
            callback(i)
    n, steps, t_enc, (H, W) = opt.n_samples, opt.steps, plan["t_enc"], plan["size"]
    settings = plan["settings"]
    conditioning = txt2img.prepare_model(opt, model, device, settings)  # SDXL: the size conditioning of this size
    tiling = img2img_tiling(opt, info, H, W)
    method = method_cls(model, settings, info, tiling, opt)
    method.prepare()
    cascade = isinstance(method, CascadeMethod)
    if cascade:
        method.restart_at(steps - t_enc if t_enc else None)
    # one CPU generator per result: the posterior sample of the encoding, the re-noising, the per-step noise
    generators = [torch.Generator().manual_seed(opt.seed + j) for j in range(n)]
    uc = model.get_learned_conditioning(n * [opt.negative_prompt]) if opt.scale != 1.0 else None
    c = model.get_learned_conditioning(n * [opt.prompt])
    start_t = int(sampler.timesteps(steps)[steps - t_enc]) if t_enc else None  # the timestep of step steps - t_enc
    name = Path(plan["path"]).name
    if t_enc == 0:  # strength 0 (or below 1/steps): the image at the output size, encoded and decoded
        pixels = read_image_tensor(plan["path"], (H, W), device)
        latent = encode_image(model, pixels.expand(n, -1, -1, -1), tiling, generators, sampler.noise)
    elif not cascade:  # the image at the output size, noised to the start step, denoised with the method
        start = steps - t_enc
        active = method.active_until()
        if active is not None and start >= active:
            warnings.warn(f"--strength {plan['strength']} starts at step {start} of {steps}, after {method.label}'s "
                          f"{method.acts} (steps < {active}): this is plain img2img at {H}x{W}; raise --strength", InputWarning)
        pixels = read_image_tensor(plan["path"], (H, W), device)
        z0 = encode_image(model, pixels.expand(n, -1, -1, -1), tiling, generators, sampler.noise)
        noise = sampler.noise(z0.shape, z0.device, generators).to(z0.dtype)
        x_start = sampler.noised(z0, steps, start, noise)
        bar = tqdm(total=t_enc, desc=f"{method.name} {name}", leave=False)
        try:
            latent, _ = method.sample(sampler, steps, c, uc, opt.scale, batch_size=n, generator=generators,
                                      x_T=x_start, start_step=start, callback=lambda i: step(i, bar))
        finally:
            bar.close()
    else:  # the cascades: the image is the entry stage (encoded), later stages re-noised
        bar = tqdm(total=t_enc * (len(plan["stages"]) - 1), desc=f"{method.name} {name}", leave=False)
        try:
            latent, _ = method.sample(sampler, steps, c, uc, opt.scale, batch_size=n, generator=generators,
                                      jitter_seed=opt.seed, callback=lambda i: step(i, bar))
        finally:
            bar.close()
    images = model.decode_first_stage(latent, **tiling)
    meta = image_settings(opt, method, plan, tiling, freeu, use_autocast, device, config_path, start_t, sampler)
    if conditioning is not None:
        meta["size_conditioning"] = conditioning
    if getattr(model, "merged_loras", None):
        meta["lora"] = model.merged_loras
    return [(to_pil(img_t), {"prompt": opt.prompt, "seed": str(opt.seed),
                             "parameters": {**meta, "position_in_batch": j, "image_seed": opt.seed + j}})
            for j, img_t in enumerate(images)]


def main(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", choices=method_names(), default="sr", help=method_help())
    chosen = pre.parse_known_args(argv)[0].method
    x4 = chosen == "sr"  # the x4 upscaler (not a registered method), else image-to-image with a method
    parser = build_parser() if x4 else build_img2img_parser()
    opt = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", InputWarning)
        show_other = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, InputWarning):
                tqdm.write(f"warning: {message}", file=sys.stderr)
            else:
                show_other(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        try:
            run(opt) if x4 else run_img2img(opt, parser)
        except (UsageError, CheckpointError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted (Ctrl-C)", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
