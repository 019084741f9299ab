#!/usr/bin/env bash
# The CUDA figures of docs/benchmarks.md in one short run (random weights: time and memory do not depend on
# their values). Each measurement has its own time limit, so one slow case cannot eat the others' time.
#
#   shellscripts/benchmark_gpu.sh OUTDIR [all|scalecrafter|dispersion|sdxl|freescale-8192|methods|methods-sd21|methods-sdxl]
#
# (scalecrafter = dispersion + sdxl + freescale-8192; methods = methods-sd21 + methods-sdxl)
#
# Writes OUTDIR/benchmarks.md (docs/benchmarks.md with the CUDA sections filled in) and OUTDIR/log.txt.
set -u
OUT=${1:?usage: shellscripts/benchmark_gpu.sh OUTDIR [all|scalecrafter|dispersion|sdxl|freescale-8192|methods|methods-sd21|methods-sdxl]}
PART=${2:-all}
mkdir -p "$OUT"
DOC="$OUT/benchmarks.md"
[ -f "$DOC" ] || cp docs/benchmarks.md "$DOC"
export PYTHONUNBUFFERED=1

bench() {  # bench SECONDS args...
    local limit=$1; shift
    echo "== [$(date +%T)] benchmark.py $*"
    timeout "$limit" python scripts/benchmark.py "$@" --write "$DOC" || echo "!! failed or timed out (limit ${limit}s): $*"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, omegaconf, open_clip, ldm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

if [ "$PART" = scalecrafter ] || [ "$PART" = dispersion ] || [ "$PART" = all ]; then
    # dispersion: per layer, then the whole guided SD 2.1 step (2048² = 256² latent is the preset's size)
    bench 45 dispersion-layers --device cuda --shapes 1280:16 1280:32 1280:64 2560-1280:32 640:64 320:128 \
        --key dispersion-layers-cuda
    bench 120 unet --device cuda --sizes 128 256 --modes plain redilate redilate_ndcfg disperse_direct disperse_basis \
        --key unet-sd2-cuda-modes
fi

if [ "$PART" = scalecrafter ] || [ "$PART" = sdxl ] || [ "$PART" = all ]; then
    # SDXL UNet step, direct vs the ScaleCrafter preset of each size (1024² has none: its row is plain only)
    bench 150 unet --family sdxl --device cuda --sizes 128 256 512 --modes plain preset --key unet-sdxl-cuda
    # whole run: ScaleCrafter SDXL 4096² inside 24 GiB (2 steps: the preset's first, most expensive ones)
    bench 150 pipeline --device cuda --preset configs/scalecrafter/sdxl_4096x4096.yaml --steps 2 --cap_gib 24 \
        --key pipeline-sdxl-4096-24gb
fi

if [ "$PART" = scalecrafter ] || [ "$PART" = freescale-8192 ] || [ "$PART" = all ]; then
    # FreeScale SDXL 8192² peak memory (one step per stage of the cascade, then tiled decoding)
    bench 240 pipeline --device cuda --preset configs/freescale/sdxl_8192x8192.yaml --steps 1 \
        --key pipeline-sdxl-freescale-8192
fi

if [ "$PART" = methods ] || [ "$PART" = methods-sd21 ] || [ "$PART" = all ]; then
    # every --method at the same size: UNet evaluations per image and time relative to direct
    bench 240 methods --device cuda --config configs/stable-diffusion/v2-inference.yaml --size 1024 --steps 20 \
        --key methods-sd21-1024-cuda
fi

if [ "$PART" = methods ] || [ "$PART" = methods-sdxl ] || [ "$PART" = all ]; then
    # SDXL at 2048², 10 steps. MultiDiffusion at window stride 32 (latent px; 25 windows per guided step): its
    # release's stride 8 would be 289 windows, about 12x this row's UNet work. SD+SR is left out: the x4
    # upscaler belongs to SD 2.x (its row is in the SD 2.1 table).
    bench 300 methods --device cuda --size 2048 --steps 10 \
        --methods direct attn_scale scalecrafter hidiffusion fouriscale freescale demofusion multidiffusion \
        --extra "multidiffusion=--md_stride 32" --key methods-sdxl-2048-cuda
fi
echo "== [$(date +%T)] done"
