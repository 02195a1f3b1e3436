#!/usr/bin/env bash
# Compile one or more csrc/cuda/*.cu files to objects with nvcc against a CUDA build of
# torch, without linking or running: a fast way to catch CUDA compile errors on a GPU-less
# machine. Usage: scripts/check_cuda_compile.sh csrc/cuda/foo_kernel.cu [...]
# CUDA_VENV (default /work/venv-cuda) must hold a CUDA build of torch.
set -euo pipefail
CUDA_VENV=${CUDA_VENV:-/work/venv-cuda}
PY="$CUDA_VENV/bin/python"
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
SITE=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
TORCH_INC="$SITE/torch/include"
PY_INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
ARCH=${ARCH:-90}
OUTDIR=$(mktemp -d)
for f in "$@"; do
  echo "nvcc $f (sm_$ARCH)"
  "$CUDA_HOME/bin/nvcc" -c "$f" -o "$OUTDIR/$(basename "$f").o" \
    -I"$TORCH_INC" -I"$TORCH_INC/torch/csrc/api/include" -I"$PY_INC" -I"$SITE/nvidia/cu13/include" -Icsrc \
    -DWITH_CUDA -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=1 \
    -gencode arch=compute_$ARCH,code=sm_$ARCH --expt-relaxed-constexpr --use_fast_math -O3 -std=c++20 \
    -Xcompiler -fPIC ${NVCC_FLAGS:-}
done
rm -rf "$OUTDIR"
echo "CUDA compile OK: $*"
