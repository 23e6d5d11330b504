#!/bin/bash
# Issue 6 (decode-step CUDA graphs) GPU-machine run: the graph GPU tests, the per-layer overhead
# experiment (V3 shape, q4_k), and hmoe bench graph vs --no-graph on a 4-layer V2-Lite model with the
# routed experts on the CPU (q8_0, then q4_k). Everything lands in $OUT.
export HMOE_CACHE_DIR=/tmp/hc PYTHONPATH=. PYTHONUNBUFFERED=1
T0=$(date +%s); left() { echo $(( $1 - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name --format=csv,noheader
( [ -d /tmp/v2l4 ] || python3 -m runtime make-model --preset v2-lite --layers 4 --out /tmp/v2l4 > $OUT/make-model.log 2>&1 ) &
MM=$!
timeout 70 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_graph.py tests/test_orchestrator.py \
  2>&1 | tail -15 | tee $OUT/gpu-tests.txt
wait $MM; echo "make-model done at $(( $(date +%s) - T0 )) s"; tail -1 $OUT/make-model.log
timeout 60 python3 -m orchestrator.overhead --shape v3 --fmt q4_k --threads 16,15 --wait-spin 2000,0 \
  --sync spin,blocking --steps 60 --out $OUT/overhead-v3-q4_k.json 2>&1 | tail -12
for fmt in q8_0 q4_k; do
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
  L=$(left 250); [ $L -lt 20 ] && break
  echo "bench $fmt (limit $L s)"
  timeout $L python3 -m runtime bench --model /tmp/v2l4 --rules /tmp/hybrid-$fmt.yaml -p 512 -n 128 -r 3 \
    --bw-gib 1 --compare-no-graph --out $OUT/bench-v2l4-hybrid-$fmt-graph.json 2>&1 | grep -v repetition | tail -12
done
echo "total $(( $(date +%s) - T0 )) s"
