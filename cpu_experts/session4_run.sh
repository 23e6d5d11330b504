#!/bin/bash
# Session 4's GPU-machine run (device tool, repository root, $OUT set): bash cpu_experts/session4_run.sh
# AMX-BF16 kernel profile (amxprof), the AMX tests on hardware, then prefill variants (larger task
# row blocks) for q4_k and q8_0 (python -m cpu_experts.sweep). Runs 1-2 (NOTES.md, session 4) also
# timed the K-segmented and vcvtne2ps2bf16 kernels, removed since (commit 7afc3ec has them).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 HMOE_CACHE_DIR=${HMOE_CACHE_DIR:-/tmp/hmoe-cache}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PRE=${PRE:-base,ru128,rd256,big,ru512,huge}
DEC=${DEC:-base,big,huge}
FMTS=${FMTS:-q4_k q8_0}
REPEATS=${REPEATS:-30}
PROF=${PROF:-1}
TESTS=${TESTS:-1}
{
  date -u; lscpu | grep -E "^(Model name|CPU\(s\)|L2|L3)"; git rev-parse HEAD 2>/dev/null
  timeout 100 python3 -m cpu_experts.precompile --sweep "$DEC,$PRE" --sweep-fmts ${FMTS// /,}
  if [ "$PROF" = 1 ]; then
    timeout 100 python3 -m cpu_experts.amxprof --fmt q4_k --out "$OUT/amxprof-q4_k.json"
  fi
  if [ "$TESTS" = 1 ]; then
    timeout 120 python3 -m pytest -q tests/test_cpu_experts_moe.py tests/test_cpu_experts_amxprof.py \
      -k "${TEST_K:-amx or kernels_alone}" 2>&1 | tail -3
  fi
  for f in $FMTS; do
    timeout 150 python3 -m cpu_experts.sweep --shape v3 --fmt $f --threads 16 --tokens 1,8,512,2048 \
      --variants $DEC --prefill-variants $PRE --repeats $REPEATS --out "$OUT/sweep-$f.json" | grep -v "^  "
  done
  date -u
} 2>&1 | tee "$OUT/log.txt"
