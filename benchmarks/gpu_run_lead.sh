#!/bin/bash
# Lead's GPU-machine run: an end-to-end hybrid bench on a 4-layer V2-Lite model (attention, dense
# and shared experts on cuda:0, routed experts in the CPU JIT kernels), then every GPU test.
export HMOE_CACHE_DIR=/tmp/hc PYTHONPATH=.
[ -d /tmp/v2l4 ] || python3 -m runtime make-model --preset v2-lite --layers 4 --out /tmp/v2l4 2>&1 | tail -1
for fmt in q8_0 q4_0; do
  cat > /tmp/hybrid-$fmt.yaml <<YAML
name: V2-Lite experts on the CPU ($fmt), everything else on cuda:0
rules:
  - match: 'model\.layers\.\d+\.mlp\.experts'
    device: cpu
    op: jit
    quant: $fmt
  - match: '.*'
    device: cuda:0
    dtype: bf16
YAML
  timeout 150 python3 -m runtime bench --model /tmp/v2l4 --rules /tmp/hybrid-$fmt.yaml -p 512 -n 64 -r 3 \
    --out $OUT/bench-v2l4-hybrid-$fmt.json 2>&1 | grep -v repetition | tail -9
done
timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tail -15
