#!/usr/bin/env bash
# FreeScale at 1024x1024 (configs/freescale/${MODEL}_1024x1024.yaml): tailored self-cascade, restrained dilation and
# scale fusion. MODEL=sdxl|sd2.1|sd1.5 (default sdxl; see _sample.sh for CKPT, PROMPT, SEED, OUTDIR, FREEU, TILED).
MODEL=${MODEL:-sdxl}
source "$(dirname "$0")/_sample.sh"
run_freescale 1024x1024 "$@"
