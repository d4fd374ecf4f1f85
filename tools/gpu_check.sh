#!/usr/bin/env bash
# Everything that needs a GPU, as named steps of under 8 minutes each on an H100, each
# runnable alone on a fresh machine and each leaving its raw log plus JSON under $OUT
# (default gpu_results/):
#
#   tools/gpu_check.sh build         build _C in place (all cores, bounded by memory), copy the .so to $OUT
#   tools/gpu_check.sh tests         tests/test_gpu.py                          -> pytest_gpu.txt, pytest_gpu.xml
#   tools/gpu_check.sh memcheck      compute-sanitizer memcheck, every kernel   -> memcheck.txt
#   tools/gpu_check.sh racecheck     compute-sanitizer racecheck, fewer shapes  -> racecheck.txt
#   tools/gpu_check.sh bench-gemm    benchmarks/gemm_2to4.py                    -> gemm_2to4_<gpu>_<date>.{json,csv,png}
#   tools/gpu_check.sh bench-decode  benchmarks/e2e_decode.py (CUDA graphs)     -> e2e_decode_<gpu>_<date>.json
#   tools/gpu_check.sh bench-prune   benchmarks/prune_speed.py                  -> prune_speed_<gpu>_<date>.json
#   tools/gpu_check.sh tune          benchmarks/tune_sm90.py, tune_mask.py      -> tune_sm90_fp16_<gpu>_<date>.json, tune_mask_<gpu>_<date>.json
#   tools/gpu_check.sh tune-schedules  benchmarks/tune_sm90.py --schedules      -> tune_sm90_schedules_fp16_<gpu>_<date>.json
#   tools/gpu_check.sh smollm2       the built-in SmolLM2-135M on the GPU: the perplexity table, a Wanda prune
#                                    with the paper's calibration on the GPU and on this machine's CPU, the
#                                    demo, the bitmap checkpoint (BitmapLinear's perplexity and eval time),
#                                    and a SmolLM2-shaped decode  -> smollm2/ (needs the model's and
#                                    corpus's assets installed: tools/install_assets.sh, or see NOTES.md)
#
# Several steps may be named in one call; each runs under its own time limit, and a
# failing step does not stop the next. Every step but `build` needs a built _C: either
# installed, or in the checkout (wanda_kernels/_C*.so, e.g. carried from a `build` step).
# The checkout is put first on PYTHONPATH, so the in-place .so is the one imported.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STEP_LIMIT=${STEP_LIMIT:-470}  # seconds; under 8 minutes
status=0
STEPS="build tests memcheck racecheck bench-gemm bench-decode bench-prune tune tune-schedules smollm2"

device_info() {
  "$PY" - <<'EOF' 2>&1 | tee "$OUT/device.txt"
import json, subprocess, torch, triton
import wanda_kernels.gemm24 as e
ext = e.extension()
p = torch.cuda.get_device_properties(0)
drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
print(json.dumps(dict(gpu=p.name, cc=f"{p.major}.{p.minor}", sms=p.multi_processor_count, driver=drv,
                      torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__,
                      ext_archs=ext and ext.cuda_archs, ext_error=None if ext else e.extension_error())))
EOF
}

run_step() {  # run_step NAME LOG CMD...: time-limited, log to $OUT/LOG, remember failure
  local name=$1 log=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S))"
  local t0=$SECONDS
  timeout --kill-after=10 "$STEP_LIMIT" "$@" 2>&1 | tee "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
  [ "$rc" = 0 ] || status=$rc
}

build() {  # setup.py runs one job per core, bounded by free memory (WANDA_KERNELS_BUILD_JOBS overrides)
  run_step build build.txt "$PY" setup.py build_ext --inplace
  cp wanda_kernels/_C*.so "$OUT/" 2>/dev/null || { echo "build produced no _C*.so"; status=1; }
}

sanitize() {  # sanitize TOOL [ARGS...]: compute-sanitizer TOOL over tools/memcheck_sparse24.py ARGS
  local tool=$1; shift
  device_info
  if ! command -v compute-sanitizer >/dev/null; then
    echo "no compute-sanitizer on PATH: $tool not run" | tee "$OUT/$tool.txt"; status=1; return
  fi
  # No caching allocator: every tensor is its own allocation, so out-of-bounds accesses are seen.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step "$tool" "$tool.txt" compute-sanitizer --tool "$tool" \
    --error-exitcode 3 "$PY" tools/memcheck_sparse24.py "$@"
}

for step in "$@"; do
  case $step in
    build) build ;;
    tests)
      device_info
      run_step tests pytest_gpu.txt "$PY" -m pytest -q -p no:cacheprovider -rs --junitxml "$OUT/pytest_gpu.xml" \
        tests/test_gpu.py ;;
    memcheck) sanitize memcheck ;;
    racecheck) sanitize racecheck --quick --cpu-reference ;;
    bench-gemm)  # BENCH_ARGS, e.g. "--models 70B --dtypes bf16", splits the sweep across calls
      device_info; run_step bench-gemm gemm_2to4.txt "$PY" benchmarks/gemm_2to4.py --out-dir "$OUT" ${BENCH_ARGS:-} ;;
    bench-decode) device_info; run_step bench-decode e2e_decode.txt "$PY" benchmarks/e2e_decode.py --out-dir "$OUT" ;;
    bench-prune) device_info; run_step bench-prune prune_speed.txt "$PY" benchmarks/prune_speed.py --out-dir "$OUT" ;;
    tune)
      device_info
      run_step tune-sm90 tune_sm90.txt "$PY" benchmarks/tune_sm90.py --out-dir "$OUT"
      run_step tune-mask tune_mask.txt "$PY" benchmarks/tune_mask.py --out-dir "$OUT" ;;
    smollm2)
      device_info; mkdir -p "$OUT/smollm2"
      nproc > "$OUT/smollm2/cpu.txt"; lscpu | grep -i "model name" >> "$OUT/smollm2/cpu.txt"
      run_step ppl-table smollm2/ppl_table.txt "$PY" benchmarks/ppl_table.py --device cuda --out-dir "$OUT/smollm2"
      for dev in cuda cpu; do
        run_step "prune-$dev" "smollm2/cli_prune_$dev.txt" bash -c "time '$PY' -m wanda_kernels -v prune \
          --sparsity 0.5 --device $dev --eval --output \"\$(mktemp -d)/pruned\""
      done
      run_step demo smollm2/demo.txt bash -c "time '$PY' -m wanda_kernels demo --device cuda --output-dir '$OUT/smollm2'"
      run_step bitmap-checkpoint smollm2/bitmap_checkpoint.txt "$PY" benchmarks/bitmap_checkpoint.py --device cuda \
        --out-dir "$OUT/smollm2"
      run_step decode-smollm2-shape smollm2/e2e_decode.txt "$PY" benchmarks/e2e_decode.py --layers 30 --hidden 576 \
        --intermediate 1536 --heads 9 --out-dir "$OUT/smollm2" ;;
    tune-schedules)
      device_info; run_step tune-schedules tune_sm90_schedules.txt "$PY" benchmarks/tune_sm90.py --schedules --out-dir "$OUT" ;;
    *) echo "unknown step '$step'; steps: $STEPS" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: tools/gpu_check.sh STEP [STEP ...]; steps: $STEPS" >&2; exit 2; }
exit $status
