#!/usr/bin/env bash
# One call on a GPU machine: rebuild the extension, run the GPU tests, compute-sanitizer on every
# kernel family, and the benchmarks; logs and tables go to ${1:-gpu_check} (and gpu_check.tar).
# About 8 minutes on an H100. The study's small preset is timed apart:
#   time python -m muonkern.study --preset small --out runs/study-small
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="$(mkdir -p "${1:-gpu_check}" && cd "${1:-gpu_check}" && pwd)"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MUONKERN_BENCH_OUT="$out"
status=0
step() {  # step NAME COMMAND...: runs, logs to NAME.log, records a failure without stopping
  echo "== $1"
  "${@:2}" > "$out/$1.log" 2>&1 || { echo "   FAILED (see $out/$1.log)"; status=1; }
  tail -n 3 "$out/$1.log"
}
step build python -m pip install --no-build-isolation --no-deps -e .
step gpu_tests python -m pytest -q -rs -s tests/test_ns5_cuda.py tests/test_ns5_grouped.py \
  tests/test_dirquad.py tests/test_curvature_cuda.py tests/test_taylor_cuda.py
for script in sanitize_ns5 sanitize_dirquad sanitize_taylor; do
  for tool in memcheck racecheck; do
    step "${script}_${tool}" compute-sanitizer --tool "$tool" --error-exitcode 3 python "scripts/$script.py"
  done
done
# torch.compile of the reference per shape takes minutes; the full table: python -m pytest bench -q
step bench_ns5 python -m pytest -q bench/test_bench_ns5.py -k "not reference_compiled"
step bench_curvature python -m pytest -q bench/test_bench_curvature.py
step bench_taylor python -m pytest -q bench/test_bench_taylor.py
step hvp_paths python bench/hvp_paths.py
tar cf "$out.tar" -C "$(dirname "$out")" "$(basename "$out")"
exit $status
