#!/usr/bin/env python
"""Upscale an image: the SD 2.x x4 upscaler, or image-to-image with a tuning-free higher-resolution method.

    # --method sr (default): text-guided x4 super-resolution (original config and checkpoint)
    python scripts/upscale.py --image in.png --prompt "a professional photograph of a cat" \\
        --ckpt checkpoints/x4-upscaler-ema.ckpt --noise_level 20 --steps 50 --scale_cfg 9
    # --method scalecrafter | freescale | demofusion: the base model at the target size, from the image
    python scripts/upscale.py --method scalecrafter --image in.png --H 1024 --W 1024 --strength 0.6 \\
        --prompt "a cat" --config configs/stable-diffusion/v2-inference.yaml \\
        --ckpt checkpoints/v2-1_512-ema-pruned.ckpt --scalecrafter_config configs/scalecrafter/sd2.1_1024x1024.yaml

Writes ``OUTDIR/NNNNN.png`` (numbering continues after existing files) with the prompt, the seed and every
setting in the PNG text metadata. ``--scale`` (at most 4 for sr) or ``--H``/``--W`` set the output size: the
x4 model always upscales by 4 and the result is then resized (antialiased bicubic), e.g. x2. Large images are
denoised in overlapping windows and decoded in tiles (see docs/upscaling.md). ``--method X --help`` lists the
options of the image-to-image methods (txt2img's, with ``--scale_cfg`` for the guidance scale). The pipelines are
``ldm/pipelines/upscale.py``; this file is their command line.
"""
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ldm.pipelines.upscale import build_img2img_parser, build_parser, main, run, run_img2img  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
