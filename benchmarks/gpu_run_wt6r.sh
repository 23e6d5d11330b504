#!/bin/bash
# GPU-resident experts on the GPU machine: the GPU tests of the split, then tg on a 4-layer V2-Lite
# model with 0 and with N experts per MoE layer on cuda:0 (the N most used in routing statistics
# collected by the first run), routed experts q8_0 in the CPU kernels, everything else on cuda:0.
# Cold machine: making the model plus both benches takes more than 110 s; run the benches in two calls.
export HMOE_CACHE_DIR=/tmp/hc PYTHONPATH=. PYTHONUNBUFFERED=1
N=${N:-8}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
exec > >(tee $OUT/log.txt) 2>&1  # the log comes back even if the call runs out of time
t0=$(date +%s)
[ -d /tmp/v2l4 ] || python3 -m runtime make-model --preset v2-lite --layers 4 --out /tmp/v2l4 2>&1 | tail -1
echo "model ready after $(( $(date +%s) - t0 )) s"
timeout 40 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_split_experts.py 2>&1 | tail -6
echo "tests done after $(( $(date +%s) - t0 )) s"
for n in 0 $N; do
  extra=""
  [ $n -gt 0 ] && extra="    gpu_experts: {count: $n, device: cuda:0, quant: bf16, routing: $OUT/routing-v2l4.json}"
  cat > /tmp/split-$n.yaml <<YAML
name: V2-Lite experts q8_0 on the CPU, $n per layer on cuda:0
rules:
  - match: 'model\.layers\.\d+\.mlp\.experts'
    device: cpu
    op: jit
    quant: q8_0
$extra
  - match: '.*'
    device: cuda:0
    dtype: bf16
YAML
  collect=""
  [ $n -eq 0 ] && collect="--collect-routing $OUT/routing-v2l4.json"
  timeout 45 python3 -m runtime bench --model /tmp/v2l4 --rules /tmp/split-$n.yaml -p 128 -n 64 -r 3 --bw-gib 0.5 \
    $collect --out $OUT/bench-v2l4-gpu-experts-$n.json 2>&1 | grep -v repetition | tail -6
  echo "bench n=$n done after $(( $(date +%s) - t0 )) s"
done
