#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels the lent GPU machine lacks (CPython 3.12, manylinux x86-64), so that
# `bash benchmarks/run_on_gpu.sh` can run there with `.whl` carried. Run here, from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
pip_download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$@"
}
pip_download albucore==0.0.24 albumentations==2.0.8 annotated_types==0.8.0 munch==4.0.0 pydantic==2.14.4 \
  pydantic_core==2.50.5 simsimd==6.5.16 stringzilla==5.3.2 typing_extensions==4.16.0 typing_inspection==0.4.5
# pretrainedmodels is published as an sdist only: build its (pure-Python) wheel here.
[ -n "$(ls .whl/pretrainedmodels-0.7.4-*.whl 2>/dev/null)" ] || python3 -m pip wheel -q --no-deps pretrainedmodels==0.7.4 -w .whl
ls .whl/*.whl
