# Shared by the sample_*.sh scripts (sourced, not run). Environment variables:
#   MODEL     sd2.1 (default), sd1.5 or sdxl (SDXL base 1.0)
#   CKPT      the checkpoint (default: the original file name in checkpoints/)
#   CONFIG    the model config (default: the original config of MODEL)
#   PROMPT, SEED, OUTDIR, FREEU=1 (turn FreeU on), TILED=1 (tiled VAE decoding with synchronized GroupNorm;
#             without it the decoder tiles only when one piece would not fit the free memory)
#   LOWVRAM=1 --lowvram (text encoders in host memory except while encoding); SEQUENTIAL_OFFLOAD=1 also
#             --sequential_offload (the UNet's blocks copied to the GPU one at a time: for cards below the weights)
#   SCALE     guidance scale (default 7.5 for SD, 5.0 for SDXL: the authors' settings)
#   CORRECTED=1  SDXL only: our corrected presets (*_corrected.yaml) instead of the released ones (default),
#             see the comments in configs/scalecrafter/sdxl_*.yaml
#   PRECISION autocast (default for SD) or half (default for SDXL: UNet and text encoders stored in fp16)
# Any further arguments are passed to scripts/txt2img.py and override the ones set here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODEL=${MODEL:-sd2.1}
case "$MODEL" in
  sd2.1) CONFIG=${CONFIG:-configs/stable-diffusion/v2-inference.yaml}; CKPT=${CKPT:-checkpoints/v2-1_512-ema-pruned.ckpt};;
  sd1.5) CONFIG=${CONFIG:-configs/stable-diffusion/v1-inference.yaml}; CKPT=${CKPT:-checkpoints/v1-5-pruned-emaonly.ckpt};;
  sdxl) CONFIG=${CONFIG:-configs/stable-diffusion/sdxl-base-inference.yaml}; CKPT=${CKPT:-checkpoints/sd_xl_base_1.0.safetensors}
        SCALE=${SCALE:-5.0}; PRECISION=${PRECISION:-half};;
  *) echo "MODEL must be sd2.1, sd1.5 or sdxl (got '$MODEL')" >&2; exit 2;;
esac
SUFFIX=""
if [ "${CORRECTED:-0}" = 1 ]; then
  [ "$MODEL" = sdxl ] || { echo "CORRECTED=1 is for MODEL=sdxl (the SD presets name existing layers)" >&2; exit 2; }
  SUFFIX=_corrected
fi
PROMPT=${PROMPT:-"A corgi sits on a beach chair on a beautiful beach, with palm trees behind, high details"}
EXTRA=()
[ "${FREEU:-0}" = 1 ] && EXTRA+=(--freeu)
[ "${TILED:-0}" = 1 ] && EXTRA+=(--tiled_decoding --sync_gn)
[ "${LOWVRAM:-0}" = 1 ] && EXTRA+=(--lowvram)
[ "${SEQUENTIAL_OFFLOAD:-0}" = 1 ] && EXTRA+=(--sequential_offload)
run_preset() {  # $1 = preset name without model prefix, e.g. 1024x1024
  local preset="configs/scalecrafter/${MODEL}_$1${SUFFIX}.yaml"
  if [ ! -f "$preset" ]; then
    echo "no ScaleCrafter preset $preset; presets for MODEL=$MODEL:" \
      $(ls configs/scalecrafter/ | sed -n "s/^${MODEL}_\(.*\)\.yaml$/\1/p" | grep -v _corrected) >&2
    exit 2
  fi
  python3 scripts/txt2img.py --config "$CONFIG" --ckpt "$CKPT" --scalecrafter_config "$preset" \
    --prompt "$PROMPT" --seed "${SEED:-23}" --ddim_eta 1 --scale "${SCALE:-7.5}" --steps 50 --n_samples 1 --n_iter 1 \
    --precision "${PRECISION:-autocast}" --outdir "${OUTDIR:-outputs/${MODEL}_$1${SUFFIX}}" ${EXTRA[@]+"${EXTRA[@]}"} "${@:2}"
}
run_freescale() {  # $1 = image size, e.g. 4096x4096: FreeScale with configs/freescale/${MODEL}_$1.yaml
  # Sampling as the FreeScale release: 50 steps, guidance 7.5, its negative prompt, FreeU on for SDXL
  # (FREEU=0 turns it off); deterministic DDIM (eta 0) in place of its Euler scheduler. Tiled decoding/encoding
  # with synchronized GroupNorm from 4096 px on (TILED=0 turns it off).
  local preset="configs/freescale/${MODEL}_$1.yaml"
  if [ ! -f "$preset" ]; then
    echo "no FreeScale preset $preset; presets for MODEL=$MODEL:" \
      $(ls configs/freescale/ | sed -n "s/^${MODEL}_\(.*\)\.yaml$/\1/p") >&2
    exit 2
  fi
  local fs_extra=()
  if [ "$MODEL" = sdxl ] && [ "${FREEU:-1}" = 1 ]; then fs_extra+=(--freeu); fi
  local side=${1%%x*}
  if [ "${TILED:-auto}" = auto ] && [ "$side" -ge 4096 ]; then fs_extra+=(--tiled_decoding --sync_gn); fi
  python3 scripts/txt2img.py --config "$CONFIG" --ckpt "$CKPT" --method freescale --freescale_config "$preset" \
    --prompt "$PROMPT" --seed "${SEED:-123}" --ddim_eta 0 --scale "${FS_SCALE:-7.5}" --steps 50 --n_samples 1 \
    --n_iter 1 --negative_prompt "${NEGATIVE:-blurry, ugly, duplicate, poorly drawn, deformed, mosaic}" \
    --precision "${PRECISION:-autocast}" --outdir "${OUTDIR:-outputs/freescale_${MODEL}_$1}" \
    ${fs_extra[@]+"${fs_extra[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} "${@:2}"
}
