#!/usr/bin/env bash
# On a GPU machine: rebuild the extension, run the GPU tests, compute-sanitizer on every kernel
# family, and the benchmarks. Logs and tables go to OUT (default gpu_check) and, after every
# step, to OUT.tar (or $GPU_CHECK_TAR), so a run cut short still leaves what it did.
#   bash scripts/gpu_check.sh [OUT] [all|tests|bench|ns5|ns5-triton|ns5-bench|cpu-bench]
# all: every step; tests = build + GPU tests + sanitizers; bench = build + benchmarks; ns5 = build +
# the op's ns5 GPU tests (CUDA kernels, graphs, grouped, the symmetric Triton route); ns5-triton =
# build + the stream-K Gram and ns5_small GPU tests + the Triton sanitizer cases; ns5-bench = build +
# the ns5 benchmark + the wgmma kernel's A/B + profiles of the Triton routes beside the op. ns5,
# ns5-triton and ns5-bench are meant to fit a 10-minute run each (on an H200 the four Triton and
# grouped test files together ran past 230 s). cpu-bench = build + the CPU ns5 benchmark on the GPU
# machine's host, whose CPU may have the bf16 matrix instructions CI's lacks (README, "CPU"). The
# study's small preset is timed apart:
# time python -m muonkern.study --preset small --out runs/study-small
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="$(mkdir -p "${1:-gpu_check}" && cd "${1:-gpu_check}" && pwd)"
phase="${2:-all}"
[[ "$phase" =~ ^(all|tests|bench|ns5|ns5-triton|ns5-bench|cpu-bench)$ ]] || { echo "phase must be all, tests, bench, ns5, ns5-triton, ns5-bench or cpu-bench, got '$phase'"; exit 2; }
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MUONKERN_BENCH_OUT="$out" PYTHONUNBUFFERED=1
status=0
step() {  # step NAME COMMAND...: runs, logs to NAME.log, records a failure without stopping
  echo "== $1"
  local start=$SECONDS
  "${@:2}" > "$out/$1.log" 2>&1 || { echo "   FAILED (see $out/$1.log)"; status=1; }
  tail -n 3 "$out/$1.log"
  echo "   ($(( SECONDS - start )) s)"
  tar cf "${GPU_CHECK_TAR:-$out.tar}" -C "$(dirname "$out")" "$(basename "$out")"
}
if python -c "import muonkern._C" 2>/dev/null && [[ -n "${MUONKERN_PREBUILT:-}" ]]; then
  echo "== build: using the prebuilt extension"
else
  step build python -m pip install --no-build-isolation --no-deps -e .
fi
ns5_op_tests=(tests/test_ns5_cuda.py tests/test_ns5_graphs.py tests/test_ns5_grouped.py tests/test_ns5_triton.py)
ns5_triton_tests=(tests/test_ns5_triton_gram.py tests/test_ns5_triton_small.py)
ns5_tests=("${ns5_op_tests[@]}" "${ns5_triton_tests[@]}")
# racecheck of sanitize_ns5.py: the run must finish, and every hazard it reports must lie inside
# cuBLAS's own kernels (nvjet_*: reported for the split-K ones its heuristic picks for some shapes,
# never in ours); leaving them out with --kernel-name-exclude made the sanitizer itself fail.
ns5_racecheck() {
  local log
  log="$(compute-sanitizer --tool racecheck python scripts/sanitize_ns5.py --racecheck 2>&1)"
  echo "$log"
  grep -q "ns5 kernels ran" <<< "$log" && [[ -z "$(grep "Race reported" <<< "$log" | grep -v nvjet)" ]]
}
sanitize() {  # sanitize SCRIPT...: memcheck and racecheck of each scripts/SCRIPT.py
  for script in "$@"; do
    for tool in memcheck racecheck; do
      step "${script}_${tool}" compute-sanitizer --tool "$tool" --error-exitcode 3 python "scripts/$script.py"
    done
  done
}
if [[ "$phase" == all || "$phase" == tests ]]; then
  step gpu_tests python -m pytest -q -rs -s "${ns5_tests[@]}" tests/test_dirquad.py tests/test_curvature_cuda.py \
    tests/test_taylor_cuda.py tests/test_taylor_layers.py
  step sanitize_ns5_memcheck compute-sanitizer --tool memcheck --error-exitcode 3 python scripts/sanitize_ns5.py
  step sanitize_ns5_racecheck ns5_racecheck
  sanitize sanitize_ns5_triton sanitize_dirquad sanitize_taylor sanitize_taylor_layers
fi
if [[ "$phase" == ns5 ]]; then
  step gpu_tests_ns5 python -m pytest -q -rs "${ns5_op_tests[@]}"
fi
if [[ "$phase" == ns5-triton ]]; then
  step gpu_tests_ns5_triton python -m pytest -q -rs "${ns5_triton_tests[@]}"
  sanitize sanitize_ns5_triton
fi
if [[ "$phase" == ns5-bench ]]; then
  step bench_ns5 python -m pytest -q bench/test_bench_ns5.py -k "not compiled and not optim and not cpu"
  # the Gram iteration's large-call pieces (README, "Gram iteration") turned off, against the rows above
  step bench_ns5_gram_options_off env MUONKERN_NS5_DEFER_SCALE=0 MUONKERN_NS5_SPLIT_GRAM=0 MUONKERN_NS5_BLOCK_SQUARE=0 python -m pytest -q \
    bench/test_bench_ns5.py -k "test_ns5_cuda and (1024x4096 or 2048x8192) and muonkern]"
  # the wgmma kernel on, off, on (README, "Backends"), and the small shapes' rows with it off
  step wgmma_ab python bench/ns5_diagnostics.py wgmma
  step bench_ns5_wgmma_off env MUONKERN_NS5_WGMMA=0 python -m pytest -q bench/test_bench_ns5.py \
    -k "test_ns5_cuda and (48x128x128 or 12x64x768) and (reference] or muonkern])"
  step profile_gram python bench/ns5_profile.py --impl triton-gram --shape 2048x8192 --shape 1024x4096
  step profile_small python bench/ns5_profile.py --impl triton-small --shape 48x128x128 --shape 12x64x768
  step profile_fused python bench/ns5_profile.py --algorithm standard --shape 48x128x128 --shape 12x64x768
fi
if [[ "$phase" == cpu-bench ]]; then
  lscpu > "$out/lscpu.txt" 2>&1
  step bench_ns5_cpu env MUONKERN_BENCH_CPU=1 python -m pytest -q bench/test_bench_ns5.py -k test_ns5_cpu
fi
if [[ "$phase" == all || "$phase" == bench ]]; then
  # torch.compile of the reference per shape takes minutes; the full table: python -m pytest bench -q
  step bench_ns5 python -m pytest -q bench/test_bench_ns5.py -k "not reference_compiled"
  step bench_curvature python -m pytest -q bench/test_bench_curvature.py
  step bench_taylor python -m pytest -q bench/test_bench_taylor.py
  step hvp_paths python bench/hvp_paths.py
fi
exit $status
