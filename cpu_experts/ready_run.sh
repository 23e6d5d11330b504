#!/bin/bash
# The GPU-machine run behind NOTES.md "Per-expert readiness and a finer tail" (device tool, from the tree
# root, $OUT set): precompile, the AMX/VNNI/pool tests and the new option's tests on hardware, then V2-Lite
# q8_0 at 15 workers: native per-layer timing (bound submit/wait back to back over 26 layers' weights)
# and the Python sweep, variants round-robin.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 HMOE_CACHE_DIR=${HMOE_CACHE_DIR:-/tmp/hmoe-cache}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# run 1 (commit 703cf03): NATIVE=base,prof,ready,tail256,ready_tail256,ready_tail512,ready_tail256_prof
# SWEEP=base,prof,ready,tail256,ready_tail256 NATIVE8= ; run 2: the defaults below
NATIVE=${NATIVE:-base,prof,ready_tail512,pf_first,ready_tail512_pf,ready_tail512_pf_prof,base@shared,ready_tail512_pf@shared}
NATIVE8=${NATIVE8:-base,ready_tail512,ready_tail512_pf}
SWEEP=${SWEEP:-base,prof,tail512,ready_tail512,ready_tail512_pf}
STEPS=${STEPS:-20}; ROUNDS=${ROUNDS:-6}; REPEATS=${REPEATS:-40}
TESTS=${TESTS:-1}
{
  date -u; hostname; lscpu | grep -E "^(Model name|CPU\(s\)|L2|L3)"; nvidia-smi -L 2>/dev/null | head -1
  timeout 120 python3 -m cpu_experts.precompile --sweep "$(echo "$NATIVE,$NATIVE8,$SWEEP" | sed 's/@shared//g')" --sweep-fmts q8_0
  if [ "$TESTS" = 1 ]; then
    timeout 180 python3 -m pytest -p no:cacheprovider -q tests/test_cpu_experts_moe.py tests/test_cpu_experts_ready.py \
      -k "amx or vnni or pool or ready" 2>&1 | tail -4
  fi
  timeout 150 python3 -m cpu_experts.native_timing --shape v2-lite --fmt q8_0 --threads 15 --tokens 1 \
    --variants "$NATIVE" --layers 26 --steps $STEPS --rounds $ROUNDS --out "$OUT/native.json" | grep -v "^  "
  if [ -n "$NATIVE8" ]; then
    timeout 60 python3 -m cpu_experts.native_timing --shape v2-lite --fmt q8_0 --threads 15 --tokens 8 \
      --variants "$NATIVE8" --layers 26 --steps 4 --rounds 3 --waits spin --out "$OUT/native8.json" | grep -v "^  "
  fi
  timeout 90 python3 -m cpu_experts.sweep --shape v2-lite --fmt q8_0 --threads 15 --tokens 1,8 \
    --variants "$SWEEP" --repeats $REPEATS --out "$OUT/sweep.json" | grep -v "^  "
  date -u
} 2>&1 | tee "$OUT/log.txt"
