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
The sampling is ``ldm/pipelines/demo.py``.
"""
import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ldm.checkpoint import CheckpointError  # noqa: E402
from ldm.evaluation.repetition import count_objects  # noqa: E402
from ldm.inference import (UsageError, check_seed, finite_float, pick_device, save_png, seed_arg,  # noqa: E402
                           unit_float)
from ldm.samplers import add_args as add_sampler_args, options_of, sampler_class, takes_eta  # noqa: E402
from ldm.pipelines.demo import (DEFAULT_CKPT, DEFAULT_CONFIG, DEMO_CAPTIONS, ETA, SCALE, SETTINGS, STEPS,  # noqa: E402
                                comparison_grid, load_demo_model, sample_images)


def run(opt):
    t_start = time.time()
    check_seed(opt.seed, "--seed", count=opt.n)  # sample i uses seed + i: all of them in range, before loading
    # the flags checked before loading; DDIM's eta is --ddim_eta (default the demo's ETA), euler_a / dpmpp_2m_sde
    # draw their full noise unless --eta says otherwise
    sampler, sampler_options = options_of(argparse.Namespace(**{**vars(opt), "ddim_eta": opt.ddim_eta or 0.0}))
    eta = sampler_options.get("eta", (ETA if opt.ddim_eta is None else opt.ddim_eta) if sampler == "ddim" else 1.0)
    stochastic = takes_eta(sampler)
    sampler_label = "DDIM" if sampler == "ddim" else sampler_class(sampler).label
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
        imgs = sample_images(model, captions, seeds, side, preset, steps=opt.steps, eta=eta,
                             scale=opt.scale, batch_size=opt.batch_size, sampler=sampler,
                             spacing=sampler_options.get("spacing"))
        n_obj = [count_objects(im)[0] for im in imgs]
        (outdir / key).mkdir(exist_ok=True)
        for i, (im, cap, sd) in enumerate(zip(imgs, captions, seeds)):
            meta = {"prompt": cap, "seed": str(sd), "parameters": {"setting": label, "H": side, "W": side,
                    "sampler": sampler_label, "steps": opt.steps, "eta": eta if stochastic else None,
                    "scale": opt.scale, "preset": preset,
                    "ckpt": str(opt.ckpt), "objects_counted": n_obj[i]}}
            save_png(Image.fromarray(im), outdir / key / f"{i:02d}_{cap.replace(' ', '_')}.png", meta)
        rows.append((label, imgs))
        counts.append(n_obj)
        print(f"{label:24s} {time.time() - t0:6.1f}s  objects per sample: {n_obj}", flush=True)
    grid = comparison_grid(rows, col_titles=captions, counts=counts,
                           title=f"demo model {Path(opt.ckpt).name}: {sampler_label} {opt.steps} steps"
                                 + (f", eta {eta:g}" if stochastic else "") + ", "
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
    p.add_argument("--ddim_eta", type=unit_float, default=None, help=f"DDIM eta in [0, 1] (default {ETA:g})")
    p.add_argument("--scale", type=finite_float, default=SCALE, help="classifier-free guidance scale")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--only", nargs="+", default=None, help="a subset of the settings: " +
                   ", ".join(k for k, *_ in SETTINGS))
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    add_sampler_args(p)  # --sampler (default ddim), --spacing, --eta
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
