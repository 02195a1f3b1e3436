#!/usr/bin/env bash
# GPU check for the device tool: build for sm_90 with all cores, check the CUDA kernels against
# the CPU kernels, run the whole test suite on the GPU, run the benchmarks; logs + JSON under
# $OUT; a summary table last.
#
#   bash scripts/gpu_check.sh                      # stages: build check tests ops  (~6-9 min)
#   STAGES="model" bash scripts/gpu_check.sh       # end-to-end model benchmarks (second call,
#                                                  # same warm machine: the build is kept)
# Env: OUT (default ./gpu_out); BENCH_K="expr" selects benchmarks (pytest -k).
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
STAGES=${STAGES:-build check tests ops}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
has() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
echo "== $(date -u) stages: $STAGES | $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
status=0

if has build; then
  t0=$(date +%s)
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) FORCE_CUDA=1 timeout 420 python setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { echo "BUILD FAILED"; tail -50 "$OUT/build.log"; exit 1; }
  echo "build_seconds=$(( $(date +%s) - t0 )) on $(nproc) cores" | tee "$OUT/build_time.txt"
fi
python -c "import dit_kernels as dk; print('HAS_EXT', dk.HAS_EXT, 'cuda ops', sorted(dk._ext.KERNELS['cuda']))"

if has check; then  # CUDA vs CPU kernels on awkward shapes, determinism, graph capture (about a minute)
  timeout 180 python scripts/check_foundation_cuda.py --no-bench > "$OUT/check_foundation_cuda.log" 2>&1 || status=1
  tail -5 "$OUT/check_foundation_cuda.log"
fi

if has tests; then
  timeout 300 python -m pytest tests -q -x -p no:cacheprovider --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1 || status=1
  tail -5 "$OUT/tests.log"
fi

for stage in ops model; do
  has $stage || continue
  timeout 420 python -m pytest "benchmarks/bench_$stage.py" --benchmark-only -q -p no:cacheprovider ${BENCH_K:+-k "$BENCH_K"} \
    --benchmark-json="$OUT/bench_$stage.json" > "$OUT/bench_$stage.log" 2>&1 || status=1
  tail -3 "$OUT/bench_$stage.log"
  [ -f "$OUT/bench_$stage.json" ] && python scripts/summarize_bench.py "$OUT/bench_$stage.json" | tee "$OUT/summary_$stage.md"
done
echo "gpu_check status=$status"
exit $status
