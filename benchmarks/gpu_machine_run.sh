#!/bin/bash
# The lead's GPU-machine run (H100 + 16 cores): every GPU test of the suite, then `hmoe bench` on a
# 4-layer V2-Lite model (attention, dense and shared experts on cuda:0 in bf16, routed experts q8_0 in
# the CPU kernels): decode from CUDA graphs and eagerly (--compare-no-graph), routing statistics
# collected on the way, then the same with the 8 most used experts per layer kept on the GPU; before
# that every GPU test and the AMX/VNNI CPU-expert tests.
# Results land in $OUT; the per-script budget is $BUDGET seconds (default 240).
export HMOE_CACHE_DIR=/tmp/hc PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT; BUDGET=${BUDGET:-240}
exec > >(tee $OUT/log.txt) 2>&1  # the log comes back even if the call runs out of time
T0=$(date +%s); left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
( [ -d /tmp/v2l4 ] || python3 -m runtime make-model --preset v2-lite --layers 4 --out /tmp/v2l4 >/dev/null 2>&1 ) &
MM=$!
timeout $(( BUDGET / 2 )) python3 -m pytest -m gpu -p no:cacheprovider -rfE tests/ 2>&1 | tail -12
# the CPU-expert tests that only run on an AMX/VNNI host (skipped on the CI box)
timeout $(( BUDGET / 5 )) python3 -m pytest -p no:cacheprovider -rfE -k "amx or vnni or mixed" \
  tests/test_cpu_experts_moe.py tests/test_cpu_experts_mixed.py tests/test_cpu_experts_codegen.py 2>&1 | tail -6
wait $MM; echo "tests and model ready after $(( $(date +%s) - T0 )) s"
rules() {  # $1 = name, $2 = the experts rule's extra line
  printf "name: V2-Lite 4 layers, %s\nrules:\n  - match: 'model\\\\.layers\\\\.\\\\d+\\\\.mlp\\\\.experts'\n    device: cpu\n    op: jit\n    quant: q8_0\n%s\n  - match: '.*'\n    device: cuda:0\n    dtype: bf16\n" "$1" "$2" > /tmp/$1.yaml
}
rules hybrid-q8_0 ""
rules gpu-experts-8 "    gpu_experts: {count: 8, device: cuda:0, quant: bf16, routing: $OUT/routing-v2l4.json}"
L=$(left); [ $L -gt 20 ] && timeout $L python3 -m runtime bench --model /tmp/v2l4 --rules /tmp/hybrid-q8_0.yaml \
  -p 512 -n 128 -r 3 --bw-gib 1 --compare-no-graph --collect-routing $OUT/routing-v2l4.json \
  --out $OUT/bench-v2l4-hybrid-q8_0.json 2>&1 | grep -v repetition | tail -9
L=$(left); [ $L -gt 20 ] && timeout $L python3 -m runtime bench --model /tmp/v2l4 --rules /tmp/gpu-experts-8.yaml \
  -p 512 -n 128 -r 3 --bw-gib 1 --out $OUT/bench-v2l4-gpu-experts-8.json 2>&1 | grep -v repetition | tail -7
echo "total $(( $(date +%s) - T0 )) s"
