#!/usr/bin/env bash
# GPU check for the device tool, one call: build for sm_90 with all cores, the DiT-XL/2 training
# step on the plain / plain + compile / fused / fused + compile paths, the op benchmarks, the CUDA
# kernels against the CPU kernels, the CUDA tests, then the other model cases.
#
#   bash scripts/gpu_check.sh                    # every stage, inside BUDGET_S seconds (default 560)
#   STAGES="build ops" bash scripts/gpu_check.sh # a subset
#
# Stages run in priority order; each gets at most its own limit and never more than the time left
# in BUDGET_S, and a stage with under 20 s left is skipped (said in the log), so the call ends inside
# the device tool's 10-minute limit with everything measured so far under $OUT. Benchmarks append
# one JSON line per record as they go (DIT_BENCH_JSONL), so a cut-short stage keeps its figures.
# $OUT holds at most 8 files (what the device tool brings back): gpu_check.log (everything, with
# the summary tables), build.log, check.log, tests.log, ops.jsonl, ops.log, model.jsonl, model.log.
# Env: PY (default python3: the GPU machine has no `python`), OUT (default ./gpu_out), BUDGET_S,
# STAGES, OPS_K / MODEL_K (extra pytest -k filters).
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-$PWD/gpu_out}
BUDGET_S=${BUDGET_S:-560}
STAGES=${STAGES:-build check ops tests model}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
T0=$(date +%s)
has() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
status=0

# stage NAME LIMIT_S LOG CMD...: run CMD under timeout min(LIMIT_S, time left), output to LOG.
stage() {
  local name=$1 limit=$2 log=$3; shift 3
  local l; l=$(left)
  if (( l < 20 )); then echo "[+$(( $(date +%s) - T0 ))s] SKIPPED $name: ${l}s left of BUDGET_S=$BUDGET_S"; status=1; return 1; fi
  (( limit > l )) && limit=$l
  echo "[+$(( $(date +%s) - T0 ))s] $name (limit ${limit}s)"
  timeout "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  (( rc == 124 )) && echo "  TIMED OUT after ${limit}s"
  (( rc != 0 )) && { echo "  $name: exit $rc"; status=1; }
  return $rc
}

echo "== $(date -u) stages: $STAGES | budget ${BUDGET_S}s"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
echo "$(nproc) cores"

if has build; then
  stage build 240 "$OUT/build.log" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) FORCE_CUDA=1 $PY setup.py build_ext --inplace \
    || { tail -30 "$OUT/build.log"; echo "retrying without the wheel's CUDA headers on CPATH";
         stage build-retry 240 "$OUT/build.log" env DIT_WHEEL_CUDA_HEADERS=0 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) FORCE_CUDA=1 \
           $PY setup.py build_ext --inplace; } \
    || { echo "BUILD FAILED"; tail -60 "$OUT/build.log"; exit 1; }
fi
$PY -m dit_kernels.info

# The DiT-XL/2 training step on the four paths side by side: plain (bf16), plain + torch.compile,
# fused, fused + torch.compile. First after the build, compiled cases included: they are the
# figures RESULTS.md needs, and each compile is ~1-2 minutes.
CORE_MODEL='DiT and bf16 and not MaskDiT and not SD-DiT'
if has model; then
  export DIT_BENCH_JSONL=$OUT/model.jsonl
  stage "model: DiT plain / +compile / fused / fused+compile" 240 "$OUT/model.log" \
    $PY -m pytest benchmarks/bench_model.py --benchmark-only -q -s -p no:cacheprovider \
    -k "test_train_step and ($CORE_MODEL)${MODEL_K:+ and ($MODEL_K)}"
  grep -E "images/s|Error|error" "$OUT/model.log" | tail -10
fi

if has ops; then  # kernel and eager reference; the compiled reference (compile time) at the end
  export DIT_BENCH_JSONL=$OUT/ops.jsonl
  stage "ops: kernel + ref" 100 "$OUT/ops.log" $PY -m pytest benchmarks/bench_ops.py --benchmark-only -q -p no:cacheprovider \
    -k "not ref_compiled${OPS_K:+ and ($OPS_K)}"
  tail -2 "$OUT/ops.log"
fi

if has check; then  # CUDA vs CPU kernels on awkward shapes, determinism, graph capture
  stage check 60 "$OUT/check.log" $PY scripts/check_foundation_cuda.py --no-bench
  tail -5 "$OUT/check.log"
fi

if has tests; then  # the test files with CUDA cases (the CPU cases in them too), emulator excluded
  XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
  stage tests 90 "$OUT/tests.log" $PY -m pytest -q -p no:cacheprovider -rfE $XDIST \
    tests/test_modulated_layer_norm.py tests/test_gated_residual.py tests/test_branch_dtype.py tests/test_patchify.py \
    tests/test_tokens.py tests/test_sde_step.py tests/test_samplers.py tests/test_models.py tests/test_maskdit.py tests/test_ext_build.py
  tail -15 "$OUT/tests.log"
fi

# What is left of the budget: the other model cases (samplers, MaskDiT, SD-DiT), then the compiled
# reference of the op benchmarks.
if has model; then
  export DIT_BENCH_JSONL=$OUT/model.jsonl
  stage "model: the rest" 200 "$OUT/model.log" $PY -m pytest benchmarks/bench_model.py --benchmark-only -q -s -p no:cacheprovider \
    -k "not (test_train_step and ($CORE_MODEL))${MODEL_K:+ and ($MODEL_K)}"
  grep -E "images/s|Error|error" "$OUT/model.log" | tail -30
fi

if has ops; then
  export DIT_BENCH_JSONL=$OUT/ops.jsonl
  stage "ops: ref_compiled" 150 "$OUT/ops.log" $PY -m pytest benchmarks/bench_ops.py --benchmark-only -q -p no:cacheprovider \
    -k "ref_compiled${OPS_K:+ and ($OPS_K)}"
  tail -2 "$OUT/ops.log"
fi

for f in "$OUT/ops.jsonl" "$OUT/model.jsonl"; do
  [ -s "$f" ] && $PY scripts/summarize_bench.py "$f"
done
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
echo "gpu_check status=$status after $(( $(date +%s) - T0 ))s"
exit $status
