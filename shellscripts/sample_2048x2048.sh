#!/usr/bin/env bash
# ScaleCrafter at 2048x2048: re-dilation (+ noise-damped CFG for SD) with the authors' preset; DISPERSE=1 adds
# dispersed convolution (SD only; applied, unlike the released config). MODEL=sd2.1|sd1.5|sdxl; see _sample.sh.
source "$(dirname "$0")/_sample.sh"
if [ "${DISPERSE:-0}" = 1 ]; then run_preset 2048x2048_disperse "$@"; else run_preset 2048x2048 "$@"; fi
