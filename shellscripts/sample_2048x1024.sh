#!/usr/bin/env bash
# ScaleCrafter with the authors' 2048x1024 preset (width x height). MODEL=sd2.1|sd1.5; see _sample.sh.
source "$(dirname "$0")/_sample.sh"
run_preset 2048x1024 "$@"
