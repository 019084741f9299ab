#!/usr/bin/env bash
# FreeScale at 8192x8192 (configs/freescale/${MODEL}_8192x8192.yaml): tailored self-cascade, restrained dilation and
# scale fusion. MODEL=sdxl|sd2.1|sd1.5 (default sdxl; see _sample.sh for CKPT, PROMPT, SEED, OUTDIR, FREEU, TILED).
MODEL=${MODEL:-sdxl}
source "$(dirname "$0")/_sample.sh"
run_freescale 8192x8192 "$@"
