#!/usr/bin/env bash
# The one prepared GPU run of issue #9, for a machine with a CUDA device (run from the repository root):
#   1. the test suite's gpu-marked tests (full callback set on a CUDA model with bf16-mixed / 16-mixed,
#      CUDA histograms equal to CPU ones);
#   2. the demo on CUDA with every callback on, bf16-mixed;
#   3. the benchmark suite on CUDA (--quick);
#   4. peak allocated CUDA memory of the default set on 3x384x384 images (bench_memory.py --device cuda).
# Writes everything under ${OUT:-gpu_check_out}; the benchmark table is the last thing printed.
set -euo pipefail
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
export MPLBACKEND=Agg
python -m pytest -q -m gpu -p no:cacheprovider -rs 2>&1 | tee "$OUT/pytest_gpu.txt"
lightning-introspect demo --accelerator gpu --precision bf16-mixed --out "$OUT/demo" 2>&1 | tee "$OUT/demo.txt"
python benchmarks/run_all.py --quick --device cuda 2>&1 | tee "$OUT/benchmarks.txt"
# 4. peak allocated CUDA memory on 3x384x384 images, the default set against none (issue #20)
python benchmarks/bench_memory.py --device cuda --only none default 2>&1 | tee "$OUT/memory_cuda.txt"
