#!/bin/bash
# Issue 5 on the GPU machine: the GPU attention tests (TMA kernel first), the generic-vs-TMA decode
# sweep (benchmarks/attn_tma_sweep.py), then `hmoe bench-attn` with the code defaults. Results land in
# $OUT; BUDGET seconds in all (default 280). bench-attn runs through its register() because the GPU
# machine has no gguf (runtime.cli imports it).
export HMOE_CACHE_DIR=/tmp/hc PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT; BUDGET=${BUDGET:-280}
exec > >(tee $OUT/log.txt) 2>&1  # the log comes back even if the call runs out of time
T0=$(date +%s); left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout ${TEST_S:-90} python3 -m pytest -q -p no:cacheprovider -rfE tests/test_gpu_attention_tma.py \
  tests/test_gpu_attention_kernels.py 2>&1 | tail -12
echo "tests done after $(( $(date +%s) - T0 )) s"
timeout $(( $(left) - ${BENCH_S:-90} )) python3 benchmarks/attn_tma_sweep.py --seconds ${SWEEP_S:-90} \
  --out $OUT/sweep.json 2>&1 | cut -c1-400
echo "sweep done after $(( $(date +%s) - T0 )) s"
timeout $(( $(left) - 5 )) python3 -c "
import argparse, sys
from runtime.commands import bench_attn
p = argparse.ArgumentParser(prog='hmoe'); sub = p.add_subparsers()
bench_attn.register(sub)
a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))
" bench-attn --heads 16,128 --ctx 1024,8192,32768,131072 --batch 1 --prefill-tokens 0 --out $OUT/attn.json 2>&1 | tail -14
echo "total $(( $(date +%s) - T0 )) s"
