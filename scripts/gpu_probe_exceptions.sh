#!/usr/bin/env bash
# Diagnose "C++ exception -> segfault" on the GPU machine (seen 2026-11-30 on the H200: every test
# that expects a RuntimeError from a TORCH_CHECK inside dit_kernels._C died with SIGSEGV).
# Separates the compiler (the image's /opt/gcc vs the system g++), the CUDA part of the build and
# torch's own exceptions, each in a fresh process. Fits in ~3 minutes on 16 cores.
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-$PWD/probe_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/probe.log") 2>&1
T0=$(date +%s)
t() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }

t "compilers"
echo "CC=${CC:-} CXX=${CXX:-} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
for c in /opt/gcc/bin/g++ /usr/bin/g++ /usr/bin/c++ "$(command -v g++)"; do [ -x "$c" ] && echo "$c: $($c --version | head -1)"; done
nvcc --version | tail -2
$PY -c "import torch; print(torch.__config__.show())" | grep -i -E "gcc|compiler|abi" | head -5
ldconfig -p | grep -E "libgcc_s|libstdc\+\+" | head

# Builds in the background (all cores): A = default build (CUDA), B = CPU-only, C = CPU-only with the system g++.
mk() { rm -rf "/tmp/$1" && mkdir -p "/tmp/$1" && cp -r setup.py csrc dit_kernels dit_models "/tmp/$1"/ && rm -f /tmp/$1/dit_kernels/_C*.so; }
mk A; mk B; mk C
(cd /tmp/A && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=12 FORCE_CUDA=1 timeout 150 $PY setup.py build_ext --inplace > "$OUT/build_A.log" 2>&1; echo "A rc=$?" >> "$OUT/build_A.log") &
PIDS=$!
(cd /tmp/B && MAX_JOBS=3 FORCE_CPU=1 timeout 150 $PY setup.py build_ext --inplace > /tmp/build_B.log 2>&1; echo "B rc=$?" >> /tmp/build_B.log) &
PIDS="$PIDS $!"
if [ -x /usr/bin/g++ ]; then
  (cd /tmp/C && CC=/usr/bin/gcc CXX=/usr/bin/g++ MAX_JOBS=3 FORCE_CPU=1 timeout 150 $PY setup.py build_ext --inplace > /tmp/build_C.log 2>&1; echo "C rc=$?" >> /tmp/build_C.log) &
  PIDS="$PIDS $!"
fi

# Torch-free probe: a shared library that captures a backtrace and throws/catches, built by each compiler.
cat > /tmp/probe.cpp <<'EOF'
#include <execinfo.h>
#include <stdexcept>
extern "C" int probe() {
  void* frames[64];
  int n = backtrace(frames, 64);
  try { throw std::runtime_error("x"); } catch (const std::exception&) { return n; }
  return -1;
}
EOF
for c in /opt/gcc/bin/g++ /usr/bin/g++; do
  [ -x "$c" ] || continue
  tag=$(echo "$c" | tr '/' '_')
  $c -O2 -shared -fPIC /tmp/probe.cpp -o "/tmp/probe$tag.so" || continue
  echo "$c probe.so: $(readelf -lW /tmp/probe$tag.so | grep -c GNU_EH_FRAME) GNU_EH_FRAME, $(nm -D /tmp/probe$tag.so | grep -c register_frame) register_frame refs"
  for pre in "" "import torch; torch.zeros(1, device='cuda'); "; do
    timeout 60 $PY -c "${pre}import ctypes; print('  probe ok, frames =', ctypes.CDLL('/tmp/probe$tag.so').probe())" || echo "  probe CRASHED (rc $?) with prelude '${pre}'"
  done
done

t "waiting for builds"
wait $PIDS  # not a bare `wait`: bash would also wait for the tee of the log, forever
tail -3 "$OUT/build_A.log"; tail -1 /tmp/build_B.log; [ -f /tmp/build_C.log ] && tail -1 /tmp/build_C.log
grep -m3 -E "^/[^ ]*(g\+\+|c\+\+|gcc) " "$OUT/build_A.log" | cut -c1-200

cat > /tmp/raise.py <<'EOF'
import sys, torch
what = sys.argv[1]
if what != "torch-only":
    import dit_kernels
    ops = torch.ops.dit_kernels
dev = "cuda" if "cuda" in what else "cpu"
try:
    if what.startswith("torch"):
        torch.ones(2, 3, device=dev) @ torch.ones(4, 5, device=dev)
    else:
        x = torch.randn(2, 4, 8, device=dev)
        ops.gated_residual(x, x, torch.zeros(3, 8, device=dev))
    print("  no exception?!")
except RuntimeError as e:
    print("  raised OK:", str(e).splitlines()[0][:100])
EOF
for b in A B C; do
  ls /tmp/$b/dit_kernels/_C*.so > /dev/null 2>&1 || { echo "build $b: no .so"; continue; }
  for what in torch-only torch-after-ext ext-cpu ext-cuda; do
    [ "$b" != A ] && [ "$what" = ext-cuda ] && continue
    echo "build $b, $what:"
    (cd /tmp/$b && PYTHONPATH=/tmp/$b timeout 60 $PY /tmp/raise.py $what) || echo "  CRASHED (rc $?)"
  done
  readelf -lW /tmp/$b/dit_kernels/_C*.so | grep -c GNU_EH_FRAME | sed "s/^/  GNU_EH_FRAME segments in $b: /"
  nm -D /tmp/$b/dit_kernels/_C*.so | grep -i "register_frame\|GLIBCXX_3.4.3" | head -3
done
t "done"
