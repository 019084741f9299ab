#!/usr/bin/env bash
# The CUDA figures of docs/benchmarks.md in one short run (random weights: time and memory do not depend on
# their values). Each measurement has its own time limit, so one slow case cannot eat the others' time.
#
#   shellscripts/benchmark_gpu.sh OUTDIR [all|scalecrafter|dispersion|sdxl|freescale-8192|methods|methods-sd21|methods-sdxl
#                                         |memory|memory-sd|memory-sdxl|memory-lowvram|memory-freescale|ndcfg|compile
#                                         |releases|releases-2048|releases-4096]
#
# (scalecrafter = dispersion + sdxl + freescale-8192; methods = methods-sd21 + methods-sdxl; memory = the targets of
# issue #27: memory-sd + memory-sdxl + memory-lowvram + memory-freescale + ndcfg, about 10 minutes in all on an
# H100/H200 (each part has its own limit below; run the parts in separate calls when a call is limited to less))
#
# Writes OUTDIR/benchmarks.md (docs/benchmarks.md with the CUDA sections filled in) and OUTDIR/log.txt.
set -u
OUT=${1:?usage: shellscripts/benchmark_gpu.sh OUTDIR [all|scalecrafter|dispersion|sdxl|freescale-8192|methods|methods-sd21|methods-sdxl|memory|memory-sd|memory-sdxl|memory-lowvram|memory-freescale|ndcfg|compile|releases|releases-2048|releases-4096]}
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
# ---- issue #27: memory and speed at the sizes users run (docs/benchmarks.md "Memory targets"). The runs use the
# default decoding (one piece or tiles, planned from the free memory) and compare each capped run with the same run
# given the whole card, in one process (scripts/benchmark.py targets).
part() { [ "$PART" = "$1" ] || [ "$PART" = memory ] || [ "$PART" = all ]; }

if part memory-sd; then
    # every SD 1.5 / 2.1 ScaleCrafter preset up to 2048² within 12 GiB with scripts/txt2img.py's defaults
    # (precision autocast: float32 weights, float16 compute), at <= 1.1x the time of the unconstrained run
    for m in sd2.1:v2 sd1.5:v1; do
        name=${m%%:*}; cfg=configs/stable-diffusion/${m##*:}-inference.yaml
        bench 120 targets --config "$cfg" --precision autocast --cap_gib 12 --steps 2 \
            --presets configs/scalecrafter/${name}_{1024x1024,1280x1280,2048x1024,2048x2048,2048x2048_disperse}.yaml \
            --key "targets-${name}-12gib"
    done
fi

if part memory-sdxl; then
    # every SDXL ScaleCrafter preset up to 4096² within 12 GiB with the SDXL shell scripts' defaults (PRECISION=half)
    bench 300 targets --precision half --cap_gib 12 --steps 2 \
        --presets configs/scalecrafter/sdxl_{2048x2048,2560x2560,4096x2048,4096x4096,4096x4096_disperse}.yaml \
        --key targets-sdxl-12gib
fi

if part memory-lowvram; then
    # SDXL at 2048² with each method within 8 GiB with --lowvram (MultiDiffusion at window stride 32, as above)
    bench 240 methods --device cuda --size 2048 --steps 4 --cap_gib 8 --flags "--lowvram --precision half" \
        --methods direct attn_scale scalecrafter hidiffusion fouriscale freescale demofusion multidiffusion \
        --extra "multidiffusion=--md_stride 32" --key methods-sdxl-2048-8gib-lowvram
fi

if part memory-freescale; then
    # FreeScale SDXL 8192² below 40 GiB (FreeU on as in shellscripts/freescale_8192x8192.sh, one step per stage)
    bench 240 pipeline --device cuda --preset configs/freescale/sdxl_8192x8192.yaml --steps 1 --freeu --decode auto \
        --cap_gib 40 --key pipeline-sdxl-freescale-8192-40gib
fi

if part ndcfg; then
    # noise-damped guidance <= 1.5x the plain step (its extra unconditional evaluation), SDXL and SD 2.1
    bench 90 unet --family sdxl --device cuda --sizes 256 512 --modes plain redilate redilate_ndcfg \
        --key unet-sdxl-cuda-ndcfg
    bench 60 unet --device cuda --sizes 128 256 --modes plain redilate_ndcfg --key unet-sd2-cuda-ndcfg
fi

if [ "$PART" = compile ]; then
    # optional: torch.compile of the SDXL UNet with per-step re-dilation processors (recompilations, step time)
    bench 420 compile --device cuda --config configs/stable-diffusion/sdxl-base-inference.yaml --size 128 --steps 6 \
        --key compile-sdxl-cuda
fi
# ---- issue #27 item 4: side by side with the authors' pipelines (docs/benchmarks.md "Against the authors'
# pipelines"): the released SD 2.1-base / SDXL-base architectures, the same random weights (float16) on both
# sides, 2 steps, time per image and peak memory. Not part of "all": it needs the releases' checkouts
# (RELEASES=DIR holding ScaleCrafter/, FreeScale/, DemoFusion/) and, on a machine without network, their pinned
# wheels (WHEELS=DIR, made on a networked machine by `python tools/compare_releases.py download --dest DIR
# --release ...`; the environments then reuse this machine's torch: --torch project).
releases() {  # releases SECONDS KEY CASES...
    local limit=$1 key=$2; shift 2
    local torch_mode=pinned
    [ -n "${WHEELS:-}" ] && torch_mode=project
    echo "== [$(date +%T)] compare_releases.py $*"
    timeout "$limit" python tools/compare_releases.py run --scale full --device cuda --steps 2 --cases "$@" \
        --release scalecrafter="${RELEASES:?set RELEASES=DIR with the three checkouts}/ScaleCrafter" \
        freescale="$RELEASES/FreeScale" demofusion="$RELEASES/DemoFusion" --torch "$torch_mode" \
        ${WHEELS:+--wheels "$WHEELS"} --env "$OUT/release-envs" --work "$OUT/release-work" --timeout 240 \
        --json "$OUT/$key.json" --write "$DOC" --key "$key" || echo "!! failed or timed out (limit ${limit}s): $*"
}
if [ "$PART" = releases ] || [ "$PART" = releases-2048 ]; then
    releases 590 releases-full-cuda-2048 scalecrafter-sd21-2048 freescale-sdxl-2048 demofusion-sdxl-2048
fi
if [ "$PART" = releases ] || [ "$PART" = releases-4096 ]; then
    releases 590 releases-full-cuda-4096 scalecrafter-sdxl-4096 freescale-sdxl-4096
fi
echo "== [$(date +%T)] done"
