#!/usr/bin/env bash
# One-call GPU check (device tool): build with all cores for sm_90, run the whole test suite on
# the GPU, run the benchmarks, write logs + JSON under $OUT, print a summary table last.
#   run: bash scripts/gpu_check.sh            (OUT defaults to ./gpu_out)
# Env: SKIP_BUILD=1 reuses a build; BENCH_K="expr" selects benchmarks (pytest -k);
#      SKIP_MODEL_BENCH=1 skips the end-to-end model benchmarks.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
echo "== $(date -u) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
status=0

if [ "${SKIP_BUILD:-0}" != "1" ]; then
  t0=$(date +%s)
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) FORCE_CUDA=1 python setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { echo "BUILD FAILED"; tail -50 "$OUT/build.log"; exit 1; }
  echo "build_seconds=$(( $(date +%s) - t0 )) on $(nproc) cores" | tee "$OUT/build_time.txt"
fi
python -c "import dit_kernels as dk; print('HAS_EXT', dk.HAS_EXT, 'cuda ops', sorted(dk._ext.KERNELS['cuda']))"

timeout 420 python -m pytest tests -q -x -p no:cacheprovider --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1 || status=1
tail -5 "$OUT/tests.log"

timeout 300 python -m pytest benchmarks --benchmark-only -q -p no:cacheprovider ${BENCH_K:+-k "$BENCH_K"} \
  --benchmark-json="$OUT/bench.json" > "$OUT/bench.log" 2>&1 || status=1
tail -3 "$OUT/bench.log"

python scripts/summarize_bench.py "$OUT/bench.json" | tee "$OUT/summary.md"
exit $status
