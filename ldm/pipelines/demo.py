"""The demo's sampling (``scripts/demo.py``, ``scripts/eval_repetition.py``): the demo model, its settings (each a
method of the registry with the demo's choices), batched sampling from per-seed noise, and the labelled grid."""
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # the demo's files are named relative to the repository

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageFont

from ldm.checkpoint import load_model_from_config
from ldm.inference import UsageError
from ldm import methods
from ldm.pipelines import txt2img
from ldm.samplers import make_sampler, sampler_class, takes_eta
from ldm.util import load_config_file, missing_file_reason, read_yaml_mapping

DEFAULT_CONFIG = "configs/demo/shapes32.yaml"
DEFAULT_CKPT = "checkpoints/demo/shapes32.ckpt"
# sampler settings the demo model was evaluated with (guidance is needed with this little training)
STEPS, ETA, SCALE = 25, 1.0, 3.0

# the settings of the demo, in grid order: (key, label, side, ScaleCrafter/FreeScale preset or None)
SETTINGS = [
    ("32_direct", "32x32 (training size)", 32, None),
    ("64_direct", "64x64 direct", 64, None),
    ("64_scalecrafter", "64x64 ScaleCrafter", 64, "configs/scalecrafter/demo_64x64.yaml"),
    ("64_freescale", "64x64 FreeScale", 64, "configs/freescale/demo_64x64.yaml"),
    ("128_direct", "128x128 direct", 128, None),
    ("128_scalecrafter", "128x128 ScaleCrafter", 128, "configs/scalecrafter/demo_128x128.yaml"),
    ("128_freescale", "128x128 FreeScale", 128, "configs/freescale/demo_128x128.yaml"),
]
# the comparison methods on the demo model (scripts/eval_repetition.py --settings ...; not in the demo grid):
# "method:NAME" instead of a preset. MultiDiffusion: 32x32 windows (the base size) at stride 8; DemoFusion: its
# phases 32 -> 64 (-> 96 -> 128), windows 32 at stride 16.
COMPARISON_SETTINGS = [
    ("64_multidiffusion", "64x64 MultiDiffusion", 64, "method:multidiffusion"),
    ("64_demofusion", "64x64 DemoFusion", 64, "method:demofusion"),
    ("128_demofusion", "128x128 DemoFusion", 128, "method:demofusion"),
    ("64_hidiffusion", "64x64 HiDiffusion", 64, "method:hidiffusion"),
    ("128_hidiffusion", "128x128 HiDiffusion", 128, "method:hidiffusion"),
    ("128_multidiffusion", "128x128 MultiDiffusion", 128, "method:multidiffusion"),
    ("64_fouriscale", "64x64 FouriScale", 64, "method:fouriscale"),
    ("128_fouriscale", "128x128 FouriScale", 128, "method:fouriscale"),
]
# the demo's columns: one caption per column (every colour and every shape appears)
DEMO_CAPTIONS = ["a red circle", "a green square", "a blue triangle", "a yellow circle",
                 "a red square", "a green triangle", "a blue circle", "a yellow square"]


def repo_path(p):
    p = Path(p)
    return p if p.is_absolute() or p.exists() else REPO_ROOT / p


def load_demo_model(config=DEFAULT_CONFIG, ckpt=DEFAULT_CKPT, device="cpu", trust=False):
    config_path, ckpt_path = repo_path(config), repo_path(ckpt)
    if not config_path.is_file():
        raise UsageError(f"--config {config_path}: {missing_file_reason(config_path)}")
    cfg = load_config_file(config_path, trust=trust)
    return load_model_from_config(cfg, str(ckpt_path), device=device, config_name=str(config), trust=trust)


def setting_argv(preset, side):
    """A demo setting as txt2img options (the method registry builds it): a ScaleCrafter or FreeScale preset path,
    ``"method:NAME"`` for a comparison method with the demo's choices, None for direct sampling.

    MultiDiffusion: base-size windows at stride 8, 16 per UNet call; HiDiffusion: the demo UNet has one ResBlock
    per level and no self-attention, so its RAD conv only (``ldm/methods/hidiffusion.py``); FouriScale: the demo
    preset of the size where there is one, else the release's rule for the steps; attention scaling: no
    self-attention either, so the same images as direct sampling."""
    if preset is None:
        return ["--method", "direct"]
    if preset.startswith("method:"):
        name = preset.split(":", 1)[1]
        extra = {"multidiffusion": ["--md_stride", "8", "--md_batch", "16"]}.get(name, [])
        if name == "fouriscale":
            path = repo_path(f"configs/fouriscale/demo_{side}x{side}.yaml")
            extra = ["--fouri_config", str(path)] if path.is_file() else []
        return ["--method", name, *extra]
    kind = read_yaml_mapping(repo_path(preset), "preset").get("method", "scalecrafter")
    flag = methods.method_class(kind).preset_flag
    return ["--method", kind, flag, str(repo_path(preset))]


def sampler_argv(sampler, eta):
    """txt2img's flags of a sampler and its eta (DDIM: --ddim_eta; euler_a/dpmpp_2m_sde: --eta; others: none)."""
    if sampler == "ddim":
        return ["--ddim_eta", str(eta)]
    return ["--sampler", sampler] + (["--eta", str(eta)] if sampler_class(sampler).stochastic else [])


def demo_method(model, preset, side, steps, eta, scale, sampler="ddim"):
    """The registry's method of a demo setting on the loaded demo model (settings checked, guidance built)."""
    opt = txt2img.build_parser().parse_args(
        setting_argv(preset, side) + ["--H", str(side), "--W", str(side), "--steps", str(steps), "--scale",
                                      str(scale), "--seed", "0"] + sampler_argv(sampler, eta))
    info = txt2img.model_info(opt, OmegaConf.create(read_yaml_mapping(repo_path(DEFAULT_CONFIG), "config")),
                              DEFAULT_CONFIG)
    info.channels, info.base_latent = model.channels, int(model.image_size)
    cls = methods.resolve(opt)
    method = cls(model, cls.settings(opt, info, (side, side)), info, {}, opt)
    with warnings.catch_warnings():  # HiDiffusion: "no self-attention at the window level", known for this model
        warnings.filterwarnings("ignore", message=".*no self-attention.*")
        method.prepare()
    return method


def initial_noise(seeds, channels, side, device):
    """One x_T per seed, independent of batch composition (the same seed gives the same start at a size)."""
    xs = [torch.randn((channels, side, side), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(xs).to(device)


@torch.no_grad()
def sample_images(model, captions, seeds, side, preset=None, steps=STEPS, eta=ETA, scale=SCALE, batch_size=16,
                  progress=None, sampler="ddim", spacing=None):
    """uint8 HxWx3 arrays, one per (caption, seed); ``progress(done, total)`` is called after each batch.
    ``sampler``: a registry name (``ldm/samplers``); ``eta`` is DDIM's, or the noise of euler_a/dpmpp_2m_sde;
    ``spacing``: the timestep spacing of the samplers other than DDIM (None: the sampler's default)."""
    device = model.betas.device
    method = demo_method(model, preset, side, steps, eta, scale, sampler)
    first_side = method.sample_shape()[-1]  # a cascade starts at the base size
    name = sampler
    options = {} if spacing is None else {"spacing": spacing}
    if takes_eta(name):
        options["eta"] = eta
    sampler = make_sampler(name, model, **options)
    out = []
    for start in range(0, len(seeds), batch_size):
        caps, sds = captions[start:start + batch_size], seeds[start:start + batch_size]
        c = model.get_learned_conditioning(list(caps))
        uc = model.get_learned_conditioning([""] * len(caps)) if scale != 1.0 else None
        x_t = sampler.start_latent(initial_noise(sds, model.channels, first_side, device), steps)
        # per-step noise: a generator seeded by the batch's first seed and the size, shared by all methods
        gen = torch.Generator().manual_seed((1_000_003 * int(sds[0]) + side) % 2 ** 64)  # torch takes < 2**64
        z, _ = method.sample(sampler, steps, c, uc, scale, batch_size=len(caps), generator=gen, x_T=x_t,
                             jitter_seed=int(sds[0]))
        x = model.decode_first_stage(z)
        x = torch.clamp((x.float() + 1.0) / 2.0, 0.0, 1.0)
        arr = (255.0 * x.permute(0, 2, 3, 1).cpu().numpy()).round().astype(np.uint8)
        out.extend(list(arr))
        if progress:
            progress(len(out), len(seeds))
    plan = getattr(getattr(method, "guidance", lambda: None)(), "plan", None)
    if plan is not None:
        plan.release()
    return out


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def comparison_grid(rows, cell=128, label_width=190, col_titles=None, counts=None, title=None):
    """rows: list of (label, [uint8 images]); images are scaled (nearest) to ``cell`` px.

    ``counts``: optional list (per row) of object counts printed under each image.
    """
    n_cols = max(len(imgs) for _, imgs in rows)
    pad, cap_h = 4, 16 if counts is not None else 0
    head_h = (18 if col_titles else 0) + (22 if title else 0)
    W = label_width + n_cols * (cell + pad) + pad
    H = head_h + len(rows) * (cell + cap_h + pad) + pad
    grid = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font, small = _font(14), _font(11)
    y = pad
    if title:
        draw.text((pad, y), title, fill=(0, 0, 0), font=font)
        y += 22
    if col_titles:
        for j, t in enumerate(col_titles[:n_cols]):
            draw.text((label_width + pad + j * (cell + pad), y), t, fill=(60, 60, 60), font=small)
        y += 18
    for r, (label, imgs) in enumerate(rows):
        draw.multiline_text((pad, y + cell // 2 - 16), label.replace(" (", "\n("), fill=(0, 0, 0), font=font)
        for j, img in enumerate(imgs):
            x = label_width + pad + j * (cell + pad)
            grid.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (x, y))
            if counts is not None:
                n = counts[r][j]
                color = (0, 120, 0) if n == 1 else (190, 0, 0)
                draw.text((x + 2, y + cell + 1), f"{n} object{'s' if n != 1 else ''}", fill=color, font=small)
        y += cell + cap_h + pad
    return grid
