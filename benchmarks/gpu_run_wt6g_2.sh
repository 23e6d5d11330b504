#!/bin/bash
# Issue 6 decode-graph run 2: GPU tests that the graph change touches, then hmoe bench graph vs
# --no-graph on the 4-layer V2-Lite model: experts on the CPU in q8_0 (depths 0 and 8192), all on
# the GPU in bf16, experts on the CPU in q4_0 (V2-Lite's 1408-wide rows cannot take q4_k). -> $OUT
export HMOE_CACHE_DIR=/tmp/hc PYTHONPATH=. PYTHONUNBUFFERED=1
T0=$(date +%s); left() { echo $(( $1 - ($(date +%s) - T0) )); }
( [ -d /tmp/v2l4 ] || python3 -m runtime make-model --preset v2-lite --layers 4 --out /tmp/v2l4 >/dev/null 2>&1 ) &
MM=$!
timeout 55 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_graph.py tests/test_gpu_attention_kernels.py \
  tests/test_gpu_attention.py tests/test_orchestrator.py 2>&1 | tail -6 | tee $OUT/gpu-tests.txt
wait $MM; echo "make-model done at $(( $(date +%s) - T0 )) s"
rules() {  # $1 = name, $2 = experts device, $3 = op/quant lines
  printf 'name: V2-Lite 4 layers, %s\nrules:\n  - match: %s\n%s\n  - match: %s\n    device: cuda:0\n    dtype: bf16\n' \
    "$1" "'model\.layers\.\d+\.mlp\.experts'" "$2" "'.*'" > /tmp/$1.yaml
}
rules hybrid-q8_0 "    device: cpu
    op: jit
    quant: q8_0"
rules all-gpu "    device: cuda:0
    dtype: bf16"
rules hybrid-q4_0 "    device: cpu
    op: jit
    quant: q4_0"
for cfg in "hybrid-q8_0 -d 0,8192" "all-gpu" "hybrid-q4_0"; do
  set -- $cfg; L=$(left 165); [ $L -lt 15 ] && break
  echo "== bench $cfg (limit $L s)"
  timeout $L python3 -m runtime bench --model /tmp/v2l4 --rules /tmp/$1.yaml -p 512 -n 128 -r 3 --bw-gib 1 \
    --compare-no-graph ${@:2} --out $OUT/bench-v2l4-$1-graph.json 2>&1 | grep -v repetition | tail -14
done
echo "total $(( $(date +%s) - T0 )) s"
