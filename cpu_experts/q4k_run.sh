#!/bin/bash
# The GPU-machine run behind NOTES.md "Is the q4_k decode kernel compute-bound?" (device tool, tree root,
# $OUT set): bash cpu_experts/q4k_run.sh. The vector kernels alone (dotprof: L2 / L3 / DRAM, 1-16 threads,
# q4_k split vs fused layout, q8_0), then the whole layer (sweep) with the phase profile: V3 q4_k and q8_0
# at 1 and 8 tokens on 16 and 15 threads, V2-Lite q4_k at 1 token on 15, variants round-robin.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 HMOE_CACHE_DIR=${HMOE_CACHE_DIR:-/tmp/hmoe-cache}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DEC=${DEC:-base,prof,ready_tail1024,ready_tail1792,ready_tail1792_prof}
DEC8=${DEC8:-base,prof}
REPEATS=${REPEATS:-30}
DOTPROF=${DOTPROF:-1}
TESTS=${TESTS:-0}
{
  date -u; lscpu | grep -E "^(Model name|CPU\(s\)|L2|L3|CPU max MHz)"; git rev-parse HEAD 2>/dev/null
  timeout 100 python3 -m cpu_experts.precompile --sweep "$DEC,$DEC8" --sweep-fmts q4_k,q8_0
  if [ "$DOTPROF" = 1 ]; then
    timeout 90 python3 -m cpu_experts.dotprof --fmts q4_k,q8_0 --out "$OUT/dotprof.json"
  fi
  if [ "$TESTS" = 1 ]; then
    timeout 150 python3 -m pytest -p no:cacheprovider -q tests/test_cpu_experts_*.py -k "amx or vnni" 2>&1 | tail -4
  fi
  timeout 60 python3 -m cpu_experts.sweep --shape v3 --fmt q4_k --threads 16 --tokens 1,8 --variants "$DEC" \
    --repeats $REPEATS --out "$OUT/sweep-v3-q4_k-t16.json" | grep -v "^  "
  timeout 60 python3 -m cpu_experts.sweep --shape v3 --fmt q4_k --threads 15 --tokens 1,8 --variants "$DEC" \
    --repeats $REPEATS --out "$OUT/sweep-v3-q4_k-t15.json" | grep -v "^  "
  timeout 60 python3 -m cpu_experts.sweep --shape v3 --fmt q8_0 --threads 16 --tokens 1,8 --variants "$DEC8" \
    --repeats $REPEATS --out "$OUT/sweep-v3-q8_0-t16.json" | grep -v "^  "
  timeout 40 python3 -m cpu_experts.sweep --shape v2-lite --fmt q4_k --threads 15 --tokens 1 --variants base,prof \
    --repeats 60 --out "$OUT/sweep-v2lite-q4_k-t15.json" | grep -v "^  "
  date -u
} 2>&1 | tee "$OUT/log.txt"
