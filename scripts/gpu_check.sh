#!/usr/bin/env bash
# Issue 16 on a CUDA machine, in one call: install, CUDA tests, the whole suite, the measurements.
#
#     bash scripts/gpu_check.sh [OUTDIR]     # OUTDIR: default $OUT (the device run's), else ./gpu-out
#
# Steps (GPU_CHECK_STEPS, default "install cuda suite bench"; each is skipped when too
# little of the total budget is left, and says so):
#   install  carried wheels (.whl/*.whl: structlog, pytest-asyncio) into /tmp/site (GPU_CHECK_SITE); then
#            pipesched editable into the running python3 (no network, no build isolation:
#            setuptools and wheel come from the image). If that fails, no build at all:
#            scripts/register_checkout.py writes pipesched's dist-info (its entry points, from
#            pyproject.toml) into /tmp/site and links pipesched/schedules -> ../schedules, and
#            the checkout goes on PYTHONPATH: the built-in schedules then resolve through
#            entry points exactly as installed (no library code is touched). Then checks that
#            pipesched, its schedules, structlog and CUDA are all there.
#   cuda     pytest -m cuda -rA                       (cap GPU_CHECK_CUDA_S, default 90 s)
#   suite    pytest -m "not cuda", CUDA visible       (cap GPU_CHECK_SUITE_S, default 150 s; in 6
#            pytest-xdist workers, --dist loadfile, where xdist is installed: GPU_CHECK_SUITE_WORKERS)
#   bench    python -m benchmarks.gpu --out OUTDIR    (budget: min(480, what is left - 45) s)
# GPU_CHECK_TOTAL_S (default 560) is the whole script's budget: keep it under the run's timeout_s.
# Rehearsing without a GPU (CPU, a throwaway venv): GPU_CHECK_BENCH_ARGS=--cpu-dry-run runs the
# dry run as the bench step; GPU_CHECK_FORCE_FALLBACK=1 takes the register_checkout.py route.
# Writes at most 7 files to OUTDIR (the device returns 8): summary.txt, install.log,
# pytest_cuda.log, pytest_suite.log, bench.log, gpu.json, gpu.md. Exit status: 0 when every
# step that ran passed, else 1 (summary.txt and the end of the output say which).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUTDIR=${1:-${OUT:-gpu-out}}
mkdir -p "$OUTDIR"
STEPS=${GPU_CHECK_STEPS:-install cuda suite bench}
SITE=${GPU_CHECK_SITE:-/tmp/site}  # the carried wheels go here (the device README's place)
TOTAL=${GPU_CHECK_TOTAL_S:-560}
CUDA_S=${GPU_CHECK_CUDA_S:-90}
SUITE_S=${GPU_CHECK_SUITE_S:-150}
START=$(date +%s)
SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"
FAILED=0
left() { echo $((TOTAL - ($(date +%s) - START))); }
say() { echo "gpu_check: $*" | tee -a "$SUMMARY"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }
record() { # step rc seconds
    say "$1: $([[ $2 -eq 0 ]] && echo ok || echo "FAILED (exit $2)") in ${3}s"
    [[ $2 -eq 0 ]] || FAILED=1
}

# -- install ---------------------------------------------------------------------------------
if want install; then
    t0=$(date +%s)
    rm -f "$SITE.registered"
    (
        rc=0
        if compgen -G ".whl/*.whl" >/dev/null; then
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$SITE" .whl/*.whl || rc=1
        else
            echo "no .whl/*.whl: run scripts/gpu_wheels.sh here and carry .whl (structlog is missing there)"
        fi
        if [[ -n ${GPU_CHECK_FORCE_FALLBACK:-} ]] ||
            ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
            echo "no editable install into $(python3 -c 'import sys; print(sys.prefix)');" \
                 "registering the checkout instead (scripts/register_checkout.py)"
            python3 scripts/register_checkout.py "$SITE" && touch "$SITE.registered" || rc=1
        fi
        exit $rc
    ) >"$OUTDIR/install.log" 2>&1
    rc=$?
    [[ -f "$SITE.registered" ]] && export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    python3 - >>"$OUTDIR/install.log" 2>&1 <<'EOF' || rc=1
import platform, structlog, torch, pipesched
from pipesched.plan.registry import schedules_for
names = [name for name, _ in schedules_for(2)]
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "| structlog", structlog.__version__)
print("pipesched from", pipesched.__file__, "| schedules for 2 ranks:", ", ".join(names))
assert len(names) >= 8, f"built-in schedules missing (entry points not registered?): {names}"
try:
    import transformers
    print("transformers", transformers.__version__, "(the any-model item uses a Hugging Face Llama)")
except ImportError as error:
    print("no transformers:", error, "(the any-model item uses its own causal LM)")
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print("device:", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
    tail -4 "$OUTDIR/install.log" | tee -a "$SUMMARY"
    record install $rc $(($(date +%s) - t0))
else
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# -- pytest flags that depend on the image's plugins ------------------------------------------
PYTEST=(python3 -m pytest -p no:cacheprovider)
if ! python3 -m pytest -p no:cacheprovider -q --co tests/test_gpu_script.py >/dev/null 2>&1; then
    say "pytest does not start with the carried pytest-asyncio; running with -p no:asyncio"
    PYTEST+=(-p no:asyncio)
fi
python3 -c "import pytest_timeout" 2>/dev/null && HAVE_TIMEOUT=1 || HAVE_TIMEOUT=0
# the suite in GPU_CHECK_SUITE_WORKERS (default 6) pytest-xdist processes, one test file each at a time
WORKERS=${GPU_CHECK_SUITE_WORKERS:-6}
SUITE_PARALLEL=()
if ((WORKERS > 1)) && python3 -c "import xdist" 2>/dev/null; then
    SUITE_PARALLEL=(-n "$WORKERS" --dist loadfile)
fi

run_pytest() { # name cap_s per_test_timeout_s args...
    local name=$1 cap=$2 per=$3
    shift 3
    local budget
    budget=$(($(left) - 60))
    ((budget < cap)) && cap=$budget
    if ((cap < 20)); then
        say "$name: skipped (only $(left) s of the budget left)"
        FAILED=1
        return
    fi
    local extra=()
    ((HAVE_TIMEOUT)) && extra=(--timeout "$per")
    local t0 rc
    t0=$(date +%s)
    # SIGINT first: pytest then prints what passed and failed so far
    timeout -s INT -k 15 "$cap" "${PYTEST[@]}" "${extra[@]}" "$@" 2>&1 | tee "$OUTDIR/pytest_$name.log"
    rc=${PIPESTATUS[0]}
    tail -1 "$OUTDIR/pytest_$name.log" | sed "s/^/$name: /" | tee -a "$SUMMARY"
    (($(date +%s) - t0 >= cap)) && say "$name: STOPPED at its ${cap}s cap: the counts above are partial"
    record "$name" "$rc" $(($(date +%s) - t0))
}

want cuda && run_pytest cuda "$CUDA_S" 60 -m cuda -rA tests
want suite && run_pytest suite "$SUITE_S" 120 -m "not cuda" -q -rfEs "${SUITE_PARALLEL[@]}" tests

# -- measurements ----------------------------------------------------------------------------
if want bench; then
    budget=$(($(left) - 45))
    ((budget > 480)) && budget=480
    if ((budget < 60)); then
        say "bench: skipped (only $(left) s of the budget left)"
        FAILED=1
    else
        t0=$(date +%s)
        # shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS: extra words, e.g. --cpu-dry-run to rehearse
        timeout -k 10 $((budget + 40)) python3 -m benchmarks.gpu --out "$OUTDIR" --budget-s "$budget" \
            --grace-s 30 ${GPU_CHECK_BENCH_ARGS:-} 2>&1 | tee "$OUTDIR/bench.log" | grep -E "^gpu check:|FAILED|Error"
        rc=${PIPESTATUS[0]}
        record bench "$rc" $(($(date +%s) - t0))
    fi
fi

say "done in $(($(date +%s) - START)) s; $([[ $FAILED -eq 0 ]] && echo 'every step passed' || echo 'SOMETHING FAILED')"
[[ -f "$OUTDIR/gpu.md" ]] && head -c 7000 "$OUTDIR/gpu.md"
echo "----- summary.txt"
cat "$SUMMARY"
exit $FAILED
