#!/usr/bin/env bash
# Runs pytest with the CUDA emulation built under AddressSanitizer: out-of-bounds reads and writes of
# the emulated CUDA kernels on tensor memory (which torch allocates through the preloaded sanitizer's
# malloc, with red zones) abort the run with a report, printed here. Usage, from the repo root:
#   bash tests/cuda_emu/run_asan.sh tests/test_cuda_emulation.py -q
#   DIT_EMULATE_CUDA=1 bash tests/cuda_emu/run_asan.sh tests/test_tokens.py -q
set -uo pipefail
PY=${PYTHON:-python}
reports=$(mktemp -d /tmp/dit-asan.XXXXXX)
# The sanitizer runtime must come first; libstdc++ too, or its exception interceptor finds no
# __cxa_throw (python itself does not link libstdc++) and the first C++ exception aborts.
preload="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
LD_PRELOAD="$preload" DIT_EMU_SANITIZE=address \
  ASAN_OPTIONS="detect_leaks=0:log_path=$reports/asan" \
  "$PY" -m pytest -p no:cacheprovider "$@"
rc=$?
# (Files holding only the warning that makecontext/swapcontext is not fully supported are no report.)
errors=$(grep -l "ERROR: AddressSanitizer" "$reports"/asan* 2>/dev/null)
if [ -n "$errors" ]; then
  echo "AddressSanitizer reports (pytest's own output is cut short by the abort):"
  cat $errors
  rc=1
fi
rm -rf "$reports"
exit $rc
