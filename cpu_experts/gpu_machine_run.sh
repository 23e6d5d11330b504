#!/bin/bash
# How the GPU-machine figures in NOTES.md were taken (device tool, repository root, $OUT set):
#   bash cpu_experts/gpu_machine_run.sh
# Compiles every library in parallel first (one core each), checks AMX on hardware, times kernel
# variants on the V3 layer (python -m cpu_experts.sweep), then runs the cpu_experts tests.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 HMOE_CACHE_DIR=/tmp/hmoe-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG=$OUT/log.txt
SHAPE=${SHAPE:-v3}; THREADS=${THREADS:-16}; REPEATS=${REPEATS:-12}
DEC=${DEC:-base,cold,old_pf,pf4k,rd32,nonext}
PRE=${PRE:-base,int8,int8_min1,min8,min32,max64}
FMTS=${FMTS:-q4_k q8_0}
{
  date -u; lscpu | grep -E "^(Model name|CPU\(s\)|Thread|Core|Socket|L2|L3|NUMA node\(s\))"; python3 -c "import llvmlite, numpy, sys; print(sys.version, llvmlite.__version__, numpy.__version__)"
  cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null
  git rev-parse HEAD 2>/dev/null
  timeout 120 python3 -m cpu_experts.precompile --sweep "$DEC,$PRE" --sweep-fmts ${FMTS// /,},bf16
  if ! timeout 90 python3 -m pytest -q -x tests/test_cpu_experts_moe.py -k "amx" > "$OUT/amx.txt" 2>&1; then
    PRE=int8,int8_min1; echo "AMX tests failed: prefill variants $PRE only"; fi
  tail -3 "$OUT/amx.txt"
  for f in $FMTS; do
    timeout 150 python3 -m cpu_experts.sweep --shape $SHAPE --fmt $f --threads $THREADS --tokens 1,8,512,2048 \
      --variants $DEC --prefill-variants $PRE --repeats $REPEATS --out "$OUT/sweep-$f.json"
  done
  timeout 150 python3 -m cpu_experts.sweep --shape $SHAPE --fmt bf16 --threads $THREADS --tokens 1,8,512,2048 \
    --variants $DEC --prefill-variants base --repeats $REPEATS --out "$OUT/sweep-bf16.json"
  timeout 150 python3 -m pytest -q tests/test_cpu_experts_moe.py tests/test_cpu_experts_numa.py \
    tests/test_cpu_experts_formats.py 2>&1 | tail -4
  date -u
} 2>&1 | tee "$LOG"
