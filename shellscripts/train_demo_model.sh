#!/usr/bin/env bash
# Trains the demo model again the way the shipped checkpoints/demo/shapes32.ckpt was made (about 100 minutes
# on 2 CPU cores; the four stages, why they exist and the measured times: checkpoints/demo/README.md).
# Training is not bit-reproducible across machines and thread counts; the result is a model of the same
# quality, not the same bytes. It writes outputs/demo/shapes32.ckpt; the committed file is replaced only
# when asked for by name:
#   bash shellscripts/train_demo_model.sh                                  # LOGDIR=logs THREADS=2
#   OUT=checkpoints/demo/shapes32.ckpt bash shellscripts/train_demo_model.sh   # overwrite the shipped model
set -euo pipefail
cd "$(dirname "$0")/.."
LOGDIR=${LOGDIR:-logs}; THREADS=${THREADS:-2}; OUT=${OUT:-outputs/demo/shapes32.ckpt}
R=configs/demo/recipe
train() { python3 main.py -t --logdir "$LOGDIR" --threads "$THREADS" --save_every 250 "$@"; }
# 1-3: one run directory, resumed with a changed schedule / parameterization (EMA restarted each time)
train --base $R/stage1_eps.yaml --name shapes32 --max_steps 1750
train --base $R/stage2_eps_ddpm_schedule.yaml --name shapes32 --max_steps 2250 --reset_ema \
      --resume "$LOGDIR/shapes32/checkpoints/step-001750.ckpt"
train --base $R/stage3_v.yaml --name shapes32 --max_steps 2750 --reset_ema \
      --resume "$LOGDIR/shapes32/checkpoints/step-002250.ckpt"
# 4: the final architecture (no self-attention), warm-started from stage 3
train --base configs/demo/shapes32.yaml --name shapes32_xattn --max_steps "${STAGE4_STEPS:-2500}" \
      --init_from "$LOGDIR/shapes32/checkpoints/step-002750.ckpt"
python3 main.py --base configs/demo/shapes32.yaml --export "$LOGDIR/shapes32_xattn/checkpoints/last.ckpt" --out "$OUT"
