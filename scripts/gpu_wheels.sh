#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels the GPU machine lacks into .whl/ (git-ignored):
# structlog (a run-time dependency) and pytest-asyncio (one test uses it), for Python 3.12,
# at the versions installed here. Everything else pipesched and its tests need is in the
# device image (torch, anyio, numpy, pytest, hypothesis, setuptools), except transformers:
# it and its dependencies (about 30 MB without numpy, which the image has) come too, for
# the check's any-model item (a Hugging Face Llama in bf16); GPU_WHEELS_HF=0 leaves them out
# and the item falls back to a causal LM of its own. Run from anywhere:
#     bash scripts/gpu_wheels.sh            # then carry ".whl" in the device run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "structlog==$(version structlog)" "pytest-asyncio==$(version pytest-asyncio)"
if [[ ${GPU_WHEELS_HF:-1} != 0 ]]; then
    "$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "transformers==$(version transformers)"
    rm -f .whl/numpy-*.whl  # the image's own numpy is the one torch was built against
fi
ls -l .whl
du -sh .whl
