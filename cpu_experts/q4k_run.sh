#!/bin/bash
# The GPU-machine runs behind NOTES.md "Is the q4_k decode kernel compute-bound?" (device tool, tree root,
# $OUT set): RUN=1|2 bash cpu_experts/q4k_run.sh.
# Run 1: the vector kernels alone (dotprof: L2 / L3 / DRAM, 1-16 threads, q4_k split vs fused layout, q8_0),
#   then the whole layer (sweep, Python forward) with the phase profile: V3 q4_k at 1 and 8 tokens on 16 and 15
#   threads, q8_0 on 16, variants round-robin (its V2-Lite q4_k line failed: rows of 1408 need q4_0 down).
# Run 2: the AMX/VNNI tests, dotprof again, the layer through the bound native submit/wait (native_timing:
#   what a GPU-driven decode calls), and the sweep again, V3 q4_k / q8_0 and V2-Lite q4_k (q4_0 down).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 HMOE_CACHE_DIR=${HMOE_CACHE_DIR:-/tmp/hmoe-cache}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RUN=${RUN:-2}
REPEATS=${REPEATS:-30}
NT="--layers 2 --steps 10 --rounds 3"
{
  date -u; lscpu | grep -E "^(Model name|CPU\(s\)|L2|L3|Thread|Core)"; git rev-parse HEAD 2>/dev/null
  if [ "$RUN" = 1 ]; then
    DEC=base,prof,ready_tail1024,ready_tail1792,ready_tail1792_prof
    timeout 100 python3 -m cpu_experts.precompile --sweep "$DEC" --sweep-fmts q4_k,q8_0
    timeout 90 python3 -m cpu_experts.dotprof --fmts q4_k,q8_0 --out "$OUT/dotprof.json"
    for t in 16 15; do
      timeout 60 python3 -m cpu_experts.sweep --shape v3 --fmt q4_k --threads $t --tokens 1,8 --variants "$DEC" \
        --repeats $REPEATS --out "$OUT/sweep-v3-q4_k-t$t.json" | grep -v "^  "
    done
    timeout 60 python3 -m cpu_experts.sweep --shape v3 --fmt q8_0 --threads 16 --tokens 1,8 --variants base,prof \
      --repeats $REPEATS --out "$OUT/sweep-v3-q8_0-t16.json" | grep -v "^  "
  else
    timeout 100 python3 -m cpu_experts.precompile --sweep base,prof,ready_tail1792 --sweep-fmts q4_k,q8_0
    timeout 150 python3 -m pytest -p no:cacheprovider -q tests/test_cpu_experts_*.py -k "amx or vnni or dotprof" 2>&1 | tail -3
    timeout 50 python3 -m cpu_experts.dotprof --fmts q4_k,q8_0 --out "$OUT/dotprof.json" | grep "stream\|hot.*thr=16"
    timeout 50 python3 -m cpu_experts.native_timing --shape v3 --fmt q4_k --threads 16 --tokens 1,8 \
      --variants base,prof,ready_tail1792 $NT --out "$OUT/native-v3-q4_k-t16.json" | grep -v "^  "
    timeout 50 python3 -m cpu_experts.native_timing --shape v3 --fmt q4_k --threads 15 --tokens 1,8 \
      --variants base,prof,ready_tail1792 $NT --out "$OUT/native-v3-q4_k-t15.json" | grep -v "^  "
    timeout 50 python3 -m cpu_experts.native_timing --shape v3 --fmt q8_0 --threads 16 --tokens 1,8 \
      --variants base,prof $NT --out "$OUT/native-v3-q8_0-t16.json" | grep -v "^  "
    for t in 16 15; do
      timeout 40 python3 -m cpu_experts.sweep --shape v3 --fmt q4_k --threads $t --tokens 1,8 \
        --variants base,ready_tail1792 --repeats $REPEATS --out "$OUT/sweep-v3-q4_k-t$t.json" | grep -v "^  "
    done
    timeout 40 python3 -m cpu_experts.native_timing --shape v2-lite --fmt q4_k --down-fmt q4_0 --threads 15 \
      --tokens 1 --variants base,prof --layers 8 --steps 10 --rounds 3 --out "$OUT/native-v2lite-q4_k-t15.json" | grep -v "^  "
    timeout 30 python3 -m cpu_experts.sweep --shape v2-lite --fmt q4_k --down-fmt q4_0 --threads 15 --tokens 1 \
      --variants base --repeats 60 --out "$OUT/sweep-v2lite-q4_k-t15.json" | grep -v "^  "
  fi
  date -u
} 2>&1 | tee "$OUT/log.txt"
