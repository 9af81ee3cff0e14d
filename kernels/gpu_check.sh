#!/usr/bin/env bash
# The FP8 kernels on a real GPU, in under 10 minutes on one H100/H200:
#   1. every kernel test compiled for the GPU (tests/kernels with CUDA visible: the `device` fixture is "cuda",
#      TRITON_INTERPRET stays unset, tolerances follow the Hopper accumulation model; the compile_check tests
#      are left out, they need no GPU and run in `make test`),
#   2. bench/kernels_gpu.py, rows appended to bench/results/kernels_gpu.csv.
# Usage (from the repository root, in an environment with a CUDA build of torch 2.13 and triton):
#   PY=python kernels/gpu_check.sh            # PY defaults to .venv/bin/python
#   PY=python kernels/gpu_check.sh --no-csv   # extra arguments go to bench.kernels_gpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH=$PWD TRITON_DEFAULT_FP_FUSION=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
unset TRITON_INTERPRET
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "kernels/gpu_check.sh: no CUDA GPU visible")'
"$PY" -c 'import torch; print("GPU:", torch.cuda.get_device_name(), "torch", torch.__version__)'
start=$(date +%s)
timeout 330 "$PY" -m pytest -q -x tests/kernels --ignore=tests/kernels/test_compile_check.py -p no:cacheprovider
echo "kernel tests on the GPU: $(( $(date +%s) - start )) s"
timeout 240 "$PY" -m bench.kernels_gpu "$@"
echo "total: $(( $(date +%s) - start )) s"
