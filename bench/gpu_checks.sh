#!/usr/bin/env bash
# The GPU checks of fastopt, prepared to run in a lent device session (an H100/H200 with torch
# 2.11 and triton 3.6 installed, nothing downloadable; 15 minutes of device time in all). Two
# stages, each one `run` call of under 8 minutes, so that a failed stage can be rerun:
#
#   bash bench/gpu_checks.sh a   # triton backend: GPU parity + capturable + AMP + LM kernel tests,
#                                # bench_ladam (triton vs fused/foreach Adam and ladam), LM products
#   bash bench/gpu_checks.sh b   # builds fastopt._C with CUDA (at first import), then the cuda
#                                # backend's tests and bench_ladam rows
#
# Before the session, here (pure-Python test dependencies the image lacks, as wheels):
#   echo /.whl/ >> .git/info/exclude   # .gitignore has it too
#   python3 -m pip download --no-deps -d .whl ladam==0.4.1 torch-levenberg-marquardt==1.2.3
# and pass carry=[".whl"] to each run. Results, logs and CSVs go to $OUT (the device tool brings
# them back); copy the CSVs into bench/results/ and commit them with the commit they name.
set -uo pipefail
stage=${1:?usage: bash bench/gpu_checks.sh a|b}
OUT=${OUT:-/tmp/fastopt_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

log() { echo "[$(date +%T)] $*" | tee -a "$OUT/log_$stage.txt"; }
# step LIMIT_S CMD...: run with a time limit, output to the log, never stop the stage.
step() {
  local limit=$1
  shift
  log "+ $*"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/log_$stage.txt"
  log "exit ${PIPESTATUS[0]}"
}

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD"
# fastopt from this checkout without installing it: kernels/ is the package fastopt.kernels.
[ -e fastopt/kernels ] || ln -s ../kernels fastopt/kernels
python3 - <<'EOF' 2>&1 | tee -a "$OUT/log_$stage.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")
EOF

TESTS_A=(tests/test_capturable.py tests/test_triton_kernels.py tests/test_amp.py tests/test_reliability.py
         tests/test_lm_kernels.py tests/test_backends.py tests/test_optim_api.py)
case "$stage" in
  a)
    export FASTOPT_JIT_BUILD=0  # no C++ build in this stage: the cpu/cuda cases skip with that reason
    step 240 python3 -m pytest -q -p no:cacheprovider -rs "${TESTS_A[@]}" --junitxml "$OUT/tests_a.xml"
    step 150 python3 bench/bench_ladam.py --device cuda --workloads 4x4096x4096 resnet50 1000x1K-64K \
      --min-time 0.5 --out "$OUT/ladam_cuda.csv"
    step 60 python3 bench/bench_lm.py --device cuda --problems products --out "$OUT/lm_cuda.csv"
    ;;
  b)
    # fastopt._C built at first import (torch.utils.cpp_extension.load, ninja), CUDA kernels included.
    step 360 env MAX_JOBS=16 python3 -c "import fastopt.extension as e; print(e.BUILD, e._INFO)"
    step 120 python3 -m pytest -q -p no:cacheprovider -rs tests/test_extension.py tests/test_capturable.py \
      tests/test_lm_kernels.py tests/test_reliability.py --junitxml "$OUT/tests_b.xml"
    step 60 python3 bench/bench_ladam.py --device cuda --workloads 4x4096x4096 --only cuda fused \
      --min-time 0.5 --out "$OUT/ladam_cuda_backend.csv"
    ;;
  *)
    echo "unknown stage $stage (a or b)" >&2
    exit 2
    ;;
esac
log "stage $stage done"
