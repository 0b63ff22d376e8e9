#!/usr/bin/env bash
# The full throughput run on the lent GPU machine, from the repository root with `.whl` carried:
#     bash benchmarks/run_on_gpu.sh [throughput.py options, e.g. --workers 12 or --compile all]
# That machine has Python 3.12, torch, torchvision, timm, OpenCV, pandas, scikit-learn, typer and rich, but not
# pretrainedmodels, albumentations or pydantic: those travel as wheels in .whl/ and are installed beside the image's
# packages, not over them. Results (table, raw numbers, log) go to $OUT, else benchmarks/results.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1  # no network there: skip albumentations' version check
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
df -h /dev/shm || true  # loader workers hand batches over in shared memory; a small /dev/shm kills them
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true  # each shared tensor in flight holds a file descriptor
echo "open files: $(ulimit -n); C compiler for Triton: ${CC:-$(command -v gcc || command -v clang || echo none)}"
# Clocks, power, temperature, utilisation and throttle reasons every 200 ms for the whole run: a window that ran at
# lower clocks, or with the GPU idle, shows here against the log's timestamps.
reasons=clocks_event_reasons.active  # older drivers call it clocks_throttle_reasons.active
nvidia-smi --query-gpu=$reasons --format=csv,noheader >/dev/null 2>&1 || reasons=clocks_throttle_reasons.active
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,$reasons \
    --format=csv -lms 200 > "$out/gpu-clocks.csv" 2>&1 &
clocks=$!
trap 'kill "$clocks" 2>/dev/null || true' EXIT
# The CUDA-only checks first (under a minute): the prefetching thread's stream ordering with nvJPEG on a busy device,
# the ten-crop views cut on the device from pinned memory, then the CUDA graphs against the eager model (prediction,
# then training). The graphs come last: in torch 2.11 a capture that fails leaves the random generator in capture mode
# for the rest of the process. `timeout`: a hung test must not take the device call with it; -k: fgvc's training turns
# SIGTERM into "stop at the next step", which a test hung inside a step never reaches.
timeout -k 20 240 python3 -m pytest -q -p no:cacheprovider tests/test_prefetch.py \
    tests/test_data.py::test_on_cuda_tencrop_views_equal_the_cpu_ones tests/test_graphs.py 2>&1 \
    | tee "$out/pytest-cuda.log" || true
if [ -n "${PROFILE_STAGE2:-}" ]; then  # PROFILE_STAGE2=1: where SENet-154's stage-2 step spends its time (~1 min)
    python3 -u benchmarks/profile_stage2.py 2>&1 | tee "$out/profile-stage2.log" || true
fi
if [ -n "${PROFILE_DECODE:-}" ]; then  # PROFILE_DECODE=1: decoder, augmentation and model apart, ResNet-50 (~1 min)
    python3 -u benchmarks/profile_gpu_decode.py 2>&1 | tee "$out/profile-gpu-decode.log" || true
fi
python3 -u benchmarks/throughput.py --out "$out" "$@" 2>&1 | tee "$out/throughput.log"
