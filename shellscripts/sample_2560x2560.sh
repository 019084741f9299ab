#!/usr/bin/env bash
# ScaleCrafter at 2560x2560 (SDXL): re-dilation at factor 2.5 with the authors' preset (CORRECTED=1: ours).
# MODEL defaults to sdxl here; see _sample.sh.
MODEL=${MODEL:-sdxl}
source "$(dirname "$0")/_sample.sh"
run_preset 2560x2560 "$@"
