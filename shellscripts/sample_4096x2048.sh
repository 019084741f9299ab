#!/usr/bin/env bash
# ScaleCrafter at 4096x2048 (width x height, SDXL): progressive re-dilation + noise-damped CFG with the authors'
# preset (CORRECTED=1: ours). Tiled VAE decoding is on by default (TILED=0 turns it off); MODEL defaults to sdxl.
MODEL=${MODEL:-sdxl}
TILED=${TILED:-1}
source "$(dirname "$0")/_sample.sh"
run_preset 4096x2048 "$@"
