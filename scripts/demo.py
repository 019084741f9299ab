#!/usr/bin/env python
"""The main job: object repetition above the training size, and its cure by ScaleCrafter, on the demo model.

    python scripts/demo.py                      # -> outputs/demo/grid.png and one PNG per sample

Samples the shipped demo checkpoint (``checkpoints/demo/shapes32.ckpt``, a small pixel-space
text-to-image LatentDiffusion trained on one coloured shape per 32x32 image) at the training size, at
2x and at 4x the side, each with direct inference and with the ScaleCrafter preset for this model
(``configs/scalecrafter/demo_64x64.yaml``, ``demo_128x128.yaml``). Every sample starts from the same
noise in the direct and the ScaleCrafter row of its size. The grid has one labelled row per setting
and gives under each image the number of objects found by ``ldm.evaluation.repetition.count_objects``.
A few minutes on 2 CPU cores. ``scripts/eval_repetition.py`` measures the same settings over many seeds.
"""
import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from ldm.checkpoint import CheckpointError, load_model_from_config  # noqa: E402
from ldm.data.shapes import CAPTIONS  # noqa: E402
from ldm.evaluation.repetition import count_objects  # noqa: E402
from ldm.inference import UsageError, check_seed, pick_device, save_png, seed_arg  # noqa: E402
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.util import load_config_file, read_yaml_mapping  # noqa: E402

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
        raise UsageError(f"config not found: {config_path}")
    cfg = load_config_file(config_path, trust=trust)
    return load_model_from_config(cfg, str(ckpt_path), device=device, config_name=str(config), trust=trust)


def freescale_runner(model, preset, side):
    """The FreeScale cascade of a configs/freescale preset at side x side (DemoFusion's for "method:demofusion"),
    or None for any other setting."""
    if preset == "method:demofusion":
        from ldm.baselines.demofusion import DemoFusion
        return DemoFusion(model, side, side, base=model.image_size, f=1)
    if preset is None or preset.startswith("method:") or read_yaml_mapping(repo_path(preset), "preset").get("method") != "freescale":
        return None
    from ldm.freescale.cascade import FreeScale
    from ldm.freescale.presets import load_preset, make_settings
    cfg = load_preset(repo_path(preset))
    return FreeScale(model, make_settings(side, side, int(cfg["base"]), cfg), f=1)


def make_guidance(model, preset, steps=STEPS, side=None):
    """ScaleCrafterGuidance for a preset path (None: plain classifier-free guidance), MultiDiffusion's for
    "method:multidiffusion", HiDiffusion's for "method:hidiffusion" (the demo UNet has one ResBlock per level and
    no self-attention: its RAD conv only, see ldm/baselines/hidiffusion.py), attention scaling's for
    "method:attn_scale" (no self-attention either: the same images as direct sampling)."""
    if preset is None:
        return None
    if preset == "method:multidiffusion":
        from ldm.baselines.multidiffusion import MultiDiffusionGuidance
        return MultiDiffusionGuidance(model.image_size, stride=8, window_batch=16)
    if preset == "method:hidiffusion":
        import warnings
        from ldm.baselines.hidiffusion import HiDiffusionGuidance
        with warnings.catch_warnings():  # "no self-attention at the window level": known for this model
            warnings.simplefilter("ignore")
            return HiDiffusionGuidance(model.model.diffusion_model, steps, model.image_size, seed=0)
    if preset == "method:fouriscale":
        import argparse
        from ldm.baselines import fouriscale
        parser = argparse.ArgumentParser()
        fouriscale.add_args(parser)
        opt = parser.parse_args([])
        opt.steps = steps
        path = repo_path(f"configs/fouriscale/demo_{side}x{side}.yaml")
        opt.fouri_config = str(path) if path.is_file() else None  # else the release's rule for the steps
        settings = fouriscale.settings_from_args(opt, model, model.image_size, (side, side), 1)
        return fouriscale.FouriScaleGuidance(model.model.diffusion_model, settings)
    if preset == "method:attn_scale":
        from ldm.baselines.attention_scaling import AttentionScalingGuidance
        return AttentionScalingGuidance(model.model.diffusion_model, (side / model.image_size) ** 2, "published")
    from ldm.scalecrafter.guidance import ScaleCrafterGuidance
    from ldm.scalecrafter.presets import plan_from_preset
    return ScaleCrafterGuidance(plan_from_preset(model.model.diffusion_model, str(repo_path(preset))))


def initial_noise(seeds, channels, side, device):
    """One x_T per seed, independent of batch composition (the same seed gives the same start at a size)."""
    xs = [torch.randn((channels, side, side), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(xs).to(device)


@torch.no_grad()
def sample_images(model, captions, seeds, side, preset=None, steps=STEPS, eta=ETA, scale=SCALE, batch_size=16,
                  progress=None):
    """uint8 HxWx3 arrays, one per (caption, seed); ``progress(done, total)`` is called after each batch."""
    device = model.betas.device
    cascade = freescale_runner(model, preset, side)
    guidance = make_guidance(model, preset, steps, side) if cascade is None else None
    first_side = cascade.settings.stages[0][0] if cascade else side  # FreeScale starts at the base size
    sampler = DDIMSampler(model)
    out = []
    for start in range(0, len(seeds), batch_size):
        caps, sds = captions[start:start + batch_size], seeds[start:start + batch_size]
        c = model.get_learned_conditioning(list(caps))
        uc = model.get_learned_conditioning([""] * len(caps)) if scale != 1.0 else None
        x_t = initial_noise(sds, model.channels, first_side, device)
        # per-step noise: a generator seeded by the batch's first seed and the size, shared by all methods
        gen = torch.Generator().manual_seed((1_000_003 * int(sds[0]) + side) % 2 ** 64)  # torch takes < 2**64
        if cascade is not None:
            z = cascade.sample(sampler, steps, c, uc, scale, eta, len(caps), generator=gen, x_T=x_t,
                               jitter_seed=int(sds[0])).latent
        else:
            z, _ = sampler.sample(S=steps, conditioning=c, batch_size=len(caps), shape=(model.channels, side, side),
                                  verbose=False, unconditional_guidance_scale=scale, unconditional_conditioning=uc,
                                  eta=eta, guidance=guidance, x_T=x_t, generator=gen)
        x = model.decode_first_stage(z)
        x = torch.clamp((x.float() + 1.0) / 2.0, 0.0, 1.0)
        arr = (255.0 * x.permute(0, 2, 3, 1).cpu().numpy()).round().astype(np.uint8)
        out.extend(list(arr))
        if progress:
            progress(len(out), len(seeds))
    if hasattr(guidance, "plan"):
        guidance.plan.release()
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


def run(opt):
    t_start = time.time()
    check_seed(opt.seed, "--seed", count=opt.n)  # sample i uses seed + i: all of them in range, before loading
    torch.set_num_threads(opt.threads)
    device = pick_device(opt.device)
    model = load_demo_model(opt.config, opt.ckpt, device, trust=opt.trust_config)
    print(f"loaded {opt.ckpt} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters) on {device}")
    captions = [DEMO_CAPTIONS[i % len(DEMO_CAPTIONS)] for i in range(opt.n)]
    seeds = [opt.seed + i for i in range(opt.n)]
    keys = opt.only or [k for k, *_ in SETTINGS]
    unknown = set(keys) - {k for k, *_ in SETTINGS}
    if unknown:
        raise UsageError(f"unknown setting(s) {sorted(unknown)}; known: {[k for k, *_ in SETTINGS]}")
    outdir = Path(opt.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rows, counts = [], []
    for key, label, side, preset in SETTINGS:
        if key not in keys:
            continue
        t0 = time.time()
        imgs = sample_images(model, captions, seeds, side, preset, steps=opt.steps, eta=opt.ddim_eta,
                             scale=opt.scale, batch_size=opt.batch_size)
        n_obj = [count_objects(im)[0] for im in imgs]
        (outdir / key).mkdir(exist_ok=True)
        for i, (im, cap, sd) in enumerate(zip(imgs, captions, seeds)):
            meta = {"prompt": cap, "seed": str(sd), "parameters": {"setting": label, "H": side, "W": side,
                    "steps": opt.steps, "eta": opt.ddim_eta, "scale": opt.scale, "preset": preset,
                    "ckpt": str(opt.ckpt), "objects_counted": n_obj[i]}}
            save_png(Image.fromarray(im), outdir / key / f"{i:02d}_{cap.replace(' ', '_')}.png", meta)
        rows.append((label, imgs))
        counts.append(n_obj)
        print(f"{label:24s} {time.time() - t0:6.1f}s  objects per sample: {n_obj}", flush=True)
    grid = comparison_grid(rows, col_titles=captions, counts=counts,
                           title=f"demo model {Path(opt.ckpt).name}: DDIM {opt.steps} steps, eta {opt.ddim_eta:g}, "
                                 f"CFG {opt.scale:g}; seeds {seeds[0]}..{seeds[-1]}")
    save_png(grid, outdir / "grid.png", {"parameters": {"settings": [r[0] for r in rows], "seeds": seeds}})
    print(f"wrote {outdir / 'grid.png'} and {sum(len(r[1]) for r in rows)} samples in {outdir}/ "
          f"({time.time() - t_start:.0f}s)")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--ckpt", default=DEFAULT_CKPT)
    p.add_argument("--trust_config", action="store_true",
                   help="allow config targets outside this package (ldm.*); a config is code, like a pickle")
    p.add_argument("--outdir", default="outputs/demo")
    p.add_argument("--n", type=int, default=4, help="samples (columns) per setting")
    p.add_argument("--seed", type=seed_arg, default=0, help="first seed; sample i uses seed + i")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--ddim_eta", type=float, default=ETA)
    p.add_argument("--scale", type=float, default=SCALE)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--only", nargs="+", default=None, help="a subset of the settings: " +
                   ", ".join(k for k, *_ in SETTINGS))
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return p


def main(argv=None):
    opt = build_parser().parse_args(argv)
    try:
        run(opt)
    except (UsageError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
