#!/bin/bash
# The memops hand-over on the GPU machine (H100 + 16 cores), next to host functions on the same bench:
# 1. what the driver says (CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1 and the probe) -> memops-driver.json;
# 2. the GPU tests of the hand-over, and the hybrid/graph GPU tests again with HMOE_HANDOVER=memops;
# 3. `hmoe bench` on the 4-layer V2-Lite model (routed experts q8_0 on the CPU, the rest bf16 on
#    cuda:0), graphs and --compare-no-graph, once per hand-over, alternating (A B A B) so drift
#    shows; 4. one V3 MoE layer's overhead over its CPU experts alone, per hand-over.
# Results land in $OUT; budget $BUDGET seconds (default 540). Run from the repository root, e.g.
#   OUT=$OUT bash benchmarks/gpu_handover_run.sh
export HMOE_CACHE_DIR=/tmp/hc PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT; BUDGET=${BUDGET:-540}
exec > >(tee $OUT/log-handover.txt) 2>&1
T0=$(date +%s); left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
( [ -d /tmp/v2l4 ] || python3 -m runtime make-model --preset v2-lite --layers 4 --out /tmp/v2l4 >/dev/null 2>&1 ) &
MM=$!
python3 -c "import json, torch; from orchestrator.cuda_host import describe_memops; \
print(json.dumps({'device': torch.cuda.get_device_name(0), 'cuda': torch.version.cuda, **describe_memops(0)}))" \
  | tee $OUT/memops-driver.json
timeout 120 python3 -m pytest -m gpu -p no:cacheprovider -rfE tests/test_handover.py 2>&1 | tail -6
HMOE_HANDOVER=memops timeout 150 python3 -m pytest -m gpu -p no:cacheprovider -rfE \
  tests/test_orchestrator.py tests/test_graph.py 2>&1 | tail -6
wait $MM; echo "tests and model ready after $(( $(date +%s) - T0 )) s"
printf "name: V2-Lite 4 layers, hybrid q8_0\nrules:\n  - match: 'model\\\\.layers\\\\.\\\\d+\\\\.mlp\\\\.experts'\n    device: cpu\n    op: jit\n    quant: q8_0\n  - match: '.*'\n    device: cuda:0\n    dtype: bf16\n" > /tmp/hybrid-q8_0.yaml
for round in 1 2; do
  for mode in hostfunc memops; do
    L=$(left); [ $L -gt 40 ] && HMOE_HANDOVER=$mode timeout $L python3 -m runtime bench --model /tmp/v2l4 \
      --rules /tmp/hybrid-q8_0.yaml -p 512 -n 128 -r 3 --bw-gib 1 --compare-no-graph \
      --out $OUT/bench-v2l4-q8_0-$mode-$round.json 2>&1 | grep -v repetition | tail -6
  done
done
for mode in hostfunc memops; do
  L=$(left); [ $L -gt 60 ] && HMOE_HANDOVER=$mode timeout $L python3 -m orchestrator.overhead --shape v3 --fmt q4_k \
    --threads 16 --wait-spin 2000 --sync blocking --steps 60 --out $OUT/overhead-v3-q4_k-$mode.json 2>&1 | tail -4
done
echo "total $(( $(date +%s) - T0 )) s"
