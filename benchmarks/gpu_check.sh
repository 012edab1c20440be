#!/usr/bin/env bash
# The one prepared GPU run (issues #9 and #20), for a machine with a CUDA device, from the repository root:
#   1. the test suite's gpu-marked tests (full callback set on a CUDA model with bf16-mixed / 16-mixed,
#      CUDA histograms equal to CPU ones);
#   2. the demo on CUDA with every callback on, bf16-mixed;
#   3. whole-fit overhead on CUDA: the default set against none, demo CNN and 64 px ResNet, 10 epochs;
#   4. where the callbacks' time goes in the ResNet fit on CUDA (profile_fit.py: per hook, and by function);
#   5. peak allocated CUDA memory on 3x384x384 images: the default set and each heavy callback alone, against none;
#   6. the rest of the benchmark suite on CUDA (run_all.py --quick), last: it gets whatever time is left.
# Each step has its own time limit inside GPU_CHECK_SECONDS (default 540) and a failed step does not stop the
# next ones, so one short lease gives every answer it can. Logs go under ${OUT:-gpu_check_out}; steps.txt lists
# each step's exit status and seconds. Offline machines: PYTHON names the interpreter that holds torch; wheels
# in .whl/ (captum, for the benchmarks that compare with it) are installed first when present.
# GPU_CHECK_ONLY="pytest_gpu demo" runs only the named steps (to split a lease over two calls).
# Seen on an H200 (2026-12-04): tests 25 s, demo 25 s, whole fit 147 s, memory 150 s for these five
# configurations; run_all.py --quick then got through histograms, attributions and LRP before the limit.
set -uo pipefail
OUT="${OUT:-gpu_check_out}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
TOTAL="${GPU_CHECK_SECONDS:-540}"
mkdir -p "$OUT"
export MPLBACKEND=Agg PYTHONUNBUFFERED=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
if [ -d .whl ]; then "$PY" -m pip install -q --no-index --no-deps .whl/*.whl; fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME SECONDS COMMAND...: run within min(SECONDS, time left), log to $OUT/NAME.txt, record status and time
    local name=$1 limit=$2; shift 2
    local left=$((TOTAL - SECONDS)) t0=$SECONDS
    if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " $GPU_CHECK_ONLY " != *" $name "* ]]; then return; fi
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    if [ "$limit" -lt 20 ]; then echo "$name rc=skipped (no time left)" | tee -a "$OUT/steps.txt"; return; fi
    echo "===== $name (at most ${limit} s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/steps.txt"
}

step pytest_gpu 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_mixed_precision.py tests/test_weights_methods.py
step demo 100 "$PY" -m lightning_introspect.cli demo --accelerator gpu --precision bf16-mixed --out "${DEMO_OUT:-/tmp/gpu_check_demo}"
step whole_fit 150 "$PY" benchmarks/bench_whole_fit.py --device cuda --epochs 10 --models demo resnet64 --repeats 1
step profile_cuda 90 "$PY" benchmarks/profile_fit.py --device cuda --model resnet64 --epochs 10 --top 30
step memory_cuda 160 "$PY" benchmarks/bench_memory.py --device cuda --only none default SanityChecks Attributions FeatureVisualization
step benchmarks "$TOTAL" "$PY" benchmarks/run_all.py --quick --device cuda --skip bench_whole_fit.py bench_memory.py
cat "$OUT/steps.txt"
