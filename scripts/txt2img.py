#!/usr/bin/env python
"""Text-to-image sampling with an original Stable Diffusion config and checkpoint, at any size, with any method of
the registry (``--method``; ``ldm/methods/``).

    python scripts/txt2img.py --config configs/stable-diffusion/v2-inference.yaml \\
        --ckpt checkpoints/v2-1_512-ema-pruned.ckpt --prompt "A corgi on a beach chair" \\
        --H 1024 --W 1024 --seed 51 --ddim_eta 1 --scale 9 --steps 50

The pipeline is ``ldm/pipelines/txt2img.py``; this file is its command line.
"""
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ldm.pipelines.txt2img import build_parser, main, run  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
