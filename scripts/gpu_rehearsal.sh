#!/usr/bin/env bash
# Rehearse scripts/gpu_check.sh on a machine without a GPU, on the device image's software:
# Python 3.12 and torch 2.11 (the CUDA wheel from PyPI: it imports and runs on the CPU).
# Catches what the CPU build of a newer torch hides (an API that 2.11 lacks, a CUDA-wheel-only
# crash) before device time is spent on it.
#
#     bash scripts/gpu_rehearsal.sh [OUTDIR]      # default /tmp/gpu-rehearsal
#
# Needs PyPI and about 6 GB of disk for the venv (torch's CUDA wheel and its nvidia-* wheels),
# kept in GPU_REHEARSAL_VENV (default /tmp/gpu-rehearsal-venv) and reused on the next run.
# Python: GPU_REHEARSAL_PYTHON (default python3.12). Takes about 2.5 minutes on 2 cores after
# the venv exists. Expected: every step ok except install's last check,
# "torch.cuda.is_available() is False"; the suite's counts are in OUTDIR/pytest_suite.log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-/tmp/gpu-rehearsal}
VENV=${GPU_REHEARSAL_VENV:-/tmp/gpu-rehearsal-venv}
PYTHON=${GPU_REHEARSAL_PYTHON:-python3.12}
TORCH=${GPU_REHEARSAL_TORCH:-2.11.0}
if [[ ! -x "$VENV/bin/python3" ]]; then
    "$PYTHON" -m venv "$VENV"
    # what the device image has (torch, anyio, numpy, pytest, hypothesis, setuptools, wheel),
    # plus pytest-xdist so the suite step runs in parallel as there
    "$VENV/bin/pip" install -q "torch==$TORCH" numpy anyio pytest hypothesis setuptools wheel pytest-xdist
fi
bash scripts/gpu_wheels.sh >/dev/null
# gpu_check's editable install writes pipesched.egg-info here; a stale one would shadow the
# entry points of the development install for commands run from the repository root
[[ -e pipesched.egg-info ]] && had_egg_info=1 || had_egg_info=0
rm -rf "$OUTDIR" /tmp/gpu-rehearsal-site
mkdir -p "$OUTDIR"
# the suite gets more time than on the device's 16 cores; the bench step runs its CPU dry run
PATH="$VENV/bin:$PATH" GPU_CHECK_SITE=/tmp/gpu-rehearsal-site GPU_CHECK_BENCH_ARGS=--cpu-dry-run \
    GPU_CHECK_SUITE_WORKERS=2 GPU_CHECK_SUITE_S=400 GPU_CHECK_TOTAL_S=900 \
    bash scripts/gpu_check.sh "$OUTDIR" | tail -12 || true
((had_egg_info)) || rm -rf pipesched.egg-info
echo "rehearsal: outputs in $OUTDIR"
