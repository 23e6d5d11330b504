#!/bin/bash
# How the GPU-machine figures in NOTES.md were taken (device tool, repository root, $OUT set):
#   bash cpu_experts/gpu_machine_run.sh
# Compiles every library in parallel first (one core each), checks AMX on hardware, times kernel
# variants on the V3 layer (python -m cpu_experts.sweep: decode variants at 1 and 8 tokens, prefill
# variants at 512 and 2048, bf16 at 1 and 8 only), then runs the cpu_experts tests (FULL=0: skip).
# Steps run in order of value, each under its own timeout; the sweeps rewrite their JSON after
# every token count, so a run cut short still leaves its finished parts in $OUT.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 HMOE_CACHE_DIR=${HMOE_CACHE_DIR:-/tmp/hmoe-cache}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG=$OUT/log.txt
SHAPE=${SHAPE:-v3}; THREADS=${THREADS:-16}; REPEATS=${REPEATS:-12}; SWEEP_S=${SWEEP_S:-150}
DEC=${DEC:-base,cold,prof,yield64,w15,ru64,rd32,pf4k,nonext}
PRE=${PRE:-base,prof,bf16_min16,int8_min8,mixed_v8,mixed_v8_48}
FMTS=${FMTS:-q4_k q8_0}
FULL=${FULL:-1}
{
  date -u; lscpu | grep -E "^(Model name|CPU\(s\)|Thread|Core|Socket|L2|L3|NUMA node\(s\))"; python3 -c "import llvmlite, numpy, sys; print(sys.version, llvmlite.__version__, numpy.__version__)"
  cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null
  git rev-parse HEAD 2>/dev/null
  timeout 120 python3 -m cpu_experts.precompile --sweep "$DEC,$PRE" --sweep-fmts ${FMTS// /,},bf16
  if ! timeout 90 python3 -m pytest -q -x tests/test_cpu_experts_moe.py -k "amx or pool or routing_flag or profile" > "$OUT/amx.txt" 2>&1; then
    PRE=int8,int8_min1; echo "AMX tests failed: prefill variants $PRE only"; fi
  tail -3 "$OUT/amx.txt"
  for f in $FMTS; do
    timeout $SWEEP_S python3 -m cpu_experts.sweep --shape $SHAPE --fmt $f --threads $THREADS --tokens 1,8,512,2048 \
      --variants $DEC --prefill-variants $PRE --repeats $REPEATS --out "$OUT/sweep-$f.json"
  done
  timeout $SWEEP_S python3 -m cpu_experts.sweep --shape $SHAPE --fmt bf16 --threads $THREADS --tokens 1,8 \
    --variants $DEC --repeats $REPEATS --out "$OUT/sweep-bf16.json"
  if [ "$FULL" = 1 ]; then
    timeout 150 python3 -m pytest -q tests/test_cpu_experts_moe.py tests/test_cpu_experts_numa.py \
      tests/test_cpu_experts_formats.py 2>&1 | tail -4
  fi
  date -u
} 2>&1 | tee "$LOG"
