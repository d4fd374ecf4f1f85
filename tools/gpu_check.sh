#!/usr/bin/env bash
# Everything that needs a GPU, in one go, with raw results under $OUT (default gpu_results/):
# the GPU tests, compute-sanitizer memcheck of every 2:4 kernel, and the benchmarks.
# Run from a checkout where `pip install .` built wanda_kernels._C (with nvcc) and pytest,
# triton and matplotlib are installed. Exits non-zero if a step fails; later steps still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
status=0
step() { echo "=== $1"; shift; "$@" 2>&1 | tee "$OUT/$LOG"; local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || status=$rc; }

python -c "import torch, wanda_kernels._ext as e; print(torch.cuda.get_device_name(), torch.cuda.get_device_capability(), 'archs', e.extension() and e.extension().cuda_archs)" | tee "$OUT/device.txt"
# From another directory, so that the installed package (with _C) is imported.
LOG=pytest_gpu.txt step "GPU tests" bash -c "cd \"\$(mktemp -d)\" && python -m pytest -q -p no:cacheprovider -rs \"$PWD/tests/test_gpu.py\""
if command -v compute-sanitizer >/dev/null; then
  LOG=memcheck.txt step "compute-sanitizer memcheck" compute-sanitizer --tool memcheck --error-exitcode 3 \
    python tools/memcheck_sparse24.py
else
  echo "no compute-sanitizer on PATH: memcheck skipped" | tee "$OUT/memcheck.txt"
fi
LOG=gemm_2to4.txt step "2:4 GEMM benchmark" python benchmarks/gemm_2to4.py --out-dir "$OUT"
LOG=e2e_decode.txt step "decode benchmark" python benchmarks/e2e_decode.py --out-dir "$OUT"
LOG=prune_speed.txt step "pruning kernels benchmark" python benchmarks/prune_speed.py --out-dir "$OUT"
exit $status
