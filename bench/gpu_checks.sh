#!/usr/bin/env bash
# The GPU checks of fastopt, prepared to run in a lent device session (an H100/H200 with torch
# 2.11, triton 3.6 and nvcc installed, nothing downloadable; 15 minutes of device time in all,
# machine start included). Two stages, each one `run` call (timeout_s 420) whose steps are capped
# at 6 minutes together, so that both fit one lease with a minute or two to spare:
#
#   bash bench/gpu_checks.sh a   # triton backend: parity on many-tile shapes, capturable (CUDA-graph
#                                # capture and replay), AMP, LM kernel tests; bench_ladam, LM products
#   bash bench/gpu_checks.sh b   # fastopt._C built with its CUDA kernels (at first import), then the
#                                # cuda backend's parity, capture, LM kernel tests and bench_ladam rows
#
# Before the session, here (pure-Python packages the image lacks, as wheels; ninja for stage b if
# the image's is missing):
#   python3 -m pip download --no-deps -d .whl ladam==0.4.1 torch-levenberg-marquardt==1.2.3
# (.whl/ is git-ignored) and pass carry=[".whl"] to each run. Logs, JUnit XML and CSVs go to $OUT,
# which the device tool brings back; copy the CSVs into bench/results/ and commit them. The
# benchmarks write their CSV at the end: a step cut by its time limit leaves none, so their
# workloads are kept small.
set -uo pipefail
stage=${1:?usage: bash bench/gpu_checks.sh a|b}
OUT=${OUT:-/tmp/fastopt_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/log_$stage.txt"

log() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }
# step LIMIT_S CMD...: run with a time limit, output to the log; returns the command's status.
step() {
  local limit=$1
  shift
  log "+ $*"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local status=${PIPESTATUS[0]}
  log "exit $status"
  return "$status"
}

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD"
export PATH="/tmp/site/bin:$PATH"
# fastopt from this checkout without installing it: kernels/ is the package fastopt.kernels.
[ -e fastopt/kernels ] || ln -s ../kernels fastopt/kernels
python3 - <<'EOF' 2>&1 | tee -a "$LOG"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")
EOF

# pytests in groups, most telling first, each with its own limit: a group cut short loses only its
# own summary (-rfEs: failures, errors and skip reasons; JUnit XML per group).
tests() {
  local limit=$1 name=$2
  shift 2
  step "$limit" python3 -m pytest -q -p no:cacheprovider -rfEs --junitxml "$OUT/tests_${stage}_$name.xml" "$@"
}

case "$stage" in
  a)
    export FASTOPT_JIT_BUILD=0  # no C++ build in this stage: the cpu/cuda cases skip with that reason
    tests 90 parity tests/test_gpu_parity.py -k triton
    tests 60 capturable tests/test_capturable.py
    tests 80 rest tests/test_triton_kernels.py tests/test_amp.py tests/test_reliability.py tests/test_lm_kernels.py \
      tests/test_backends.py tests/test_optim_api.py
    step 80 python3 bench/bench_ladam.py --device cuda --workloads 4x4096x4096 resnet50 1000x1K-64K \
      --dtypes float32 --min-time 0.3 --out "$OUT/ladam_cuda.csv"
    step 40 python3 bench/bench_lm.py --device cuda --problems products --out "$OUT/lm_cuda.csv"
    ;;
  b)
    if ! command -v nvcc >/dev/null && [ -z "${CUDA_HOME:-}" ]; then
      log "no nvcc and no CUDA_HOME: the extension would build without its CUDA kernels; stopping"
      exit 3
    fi
    # fastopt._C with its CUDA kernels, built at first import (torch.utils.cpp_extension.load, ninja).
    step 210 env MAX_JOBS=16 python3 -c "
import fastopt.extension as e
print(e.BUILD, e._INFO)
assert 'cuda' in e._INFO.split(), 'built without CUDA kernels'" || { log "build failed; stopping"; exit 4; }
    tests 50 parity tests/test_gpu_parity.py -k cuda
    # The run-time-build and nvcc-compile tests are CPU-side checks that would rebuild the
    # extension twice here.
    tests 70 rest tests/test_capturable.py tests/test_lm_kernels.py tests/test_reliability.py tests/test_extension.py \
      -k "not built_at_run_time and not compile_with_nvcc and not host_code_compiles"
    step 30 python3 bench/bench_ladam.py --device cuda --workloads 4x4096x4096 --dtypes float32 \
      --only cuda fused --min-time 0.3 --out "$OUT/ladam_cuda_backend.csv"
    ;;
  *)
    echo "unknown stage $stage (a or b)" >&2
    exit 2
    ;;
esac
log "stage $stage done"
