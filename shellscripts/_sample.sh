# Shared by the sample_*.sh scripts (sourced, not run). Environment variables:
#   MODEL   sd2.1 (default) or sd1.5
#   CKPT    the checkpoint (default: the original file name in checkpoints/)
#   CONFIG  the model config (default: the original config of MODEL)
#   PROMPT, SEED, OUTDIR, FREEU=1 (turn FreeU on), TILED=1 (tiled VAE decoding with synchronized GroupNorm)
# Any further arguments are passed to scripts/txt2img.py and override the ones set here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODEL=${MODEL:-sd2.1}
case "$MODEL" in
  sd2.1) CONFIG=${CONFIG:-configs/stable-diffusion/v2-inference.yaml}; CKPT=${CKPT:-checkpoints/v2-1_512-ema-pruned.ckpt};;
  sd1.5) CONFIG=${CONFIG:-configs/stable-diffusion/v1-inference.yaml}; CKPT=${CKPT:-checkpoints/v1-5-pruned-emaonly.ckpt};;
  *) echo "MODEL must be sd2.1 or sd1.5 (got '$MODEL')" >&2; exit 2;;
esac
PROMPT=${PROMPT:-"A corgi sits on a beach chair on a beautiful beach, with palm trees behind, high details"}
EXTRA=()
[ "${FREEU:-0}" = 1 ] && EXTRA+=(--freeu)
[ "${TILED:-0}" = 1 ] && EXTRA+=(--tiled_decoding --sync_gn)
run_preset() {  # $1 = preset name without model prefix, e.g. 1024x1024
  local preset="configs/scalecrafter/${MODEL}_$1.yaml"
  python3 scripts/txt2img.py --config "$CONFIG" --ckpt "$CKPT" --scalecrafter_config "$preset" \
    --prompt "$PROMPT" --seed "${SEED:-23}" --ddim_eta 1 --scale 7.5 --steps 50 --n_samples 1 --n_iter 1 \
    --outdir "${OUTDIR:-outputs/${MODEL}_$1}" ${EXTRA[@]+"${EXTRA[@]}"} "${@:2}"
}
