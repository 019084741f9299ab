#!/usr/bin/env bash
# ScaleCrafter at 4096x4096 (SDXL): progressive re-dilation + noise-damped CFG with the authors' preset
# (CORRECTED=1: ours); DISPERSE=1 adds dispersed convolution (applied, unlike the released config).
# Defaults meant for a 24 GB GPU: fp16 weights (PRECISION=half) and tiled VAE decoding with synchronized
# GroupNorm (TILED=1). MODEL defaults to sdxl; see _sample.sh.
MODEL=${MODEL:-sdxl}
TILED=${TILED:-1}
source "$(dirname "$0")/_sample.sh"
if [ "${DISPERSE:-0}" = 1 ]; then run_preset 4096x4096_disperse "$@"; else run_preset 4096x4096 "$@"; fi
