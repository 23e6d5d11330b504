#!/bin/bash
# Hybrid decode on the GPU machine, whole DeepSeek-V2-Lite (27 layers, random weights): where a step
# goes (`hmoe bench --breakdown`), the default (host functions, one worker per core but one) against
# the memops hand-over and 14 or 16 workers; routed experts in q8_0 on the CPU (q4_k would spend the budget quantizing 26 layers in numpy),
# everything else bf16 on cuda:0. Before that: the decode-path GPU tests and the CPU-expert tests
# that need AMX/VNNI (the shared worker pool included).
# Results land in $OUT; budget $BUDGET seconds (default 540). From the repository root:
#   OUT=$OUT bash benchmarks/gpu_decode_run.sh
export HMOE_CACHE_DIR=/tmp/hc PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT; BUDGET=${BUDGET:-540}
exec > >(tee $OUT/log-decode.txt) 2>&1
T0=$(date +%s); left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
( [ -d /tmp/v2l ] || { S=$(date +%s); python3 -m runtime make-model --preset v2-lite --out /tmp/v2l >/dev/null 2>&1;
  echo "make-model v2-lite: $(( $(date +%s) - S )) s"; } ) &
MM=$!
timeout 150 python3 -m pytest -m gpu -p no:cacheprovider -rfE ${TESTS:-tests/test_step_profile.py tests/test_graph.py \
  tests/test_orchestrator.py tests/test_handover.py} 2>&1 | tail -6
[ -n "$CPU_TESTS" ] && timeout 100 python3 -m pytest -p no:cacheprovider -rfE -k "amx or vnni or mixed or pool or share" \
  tests/test_cpu_experts_moe.py tests/test_cpu_experts_mixed.py 2>&1 | tail -4
wait $MM; stamp "tests done, model ready"; df -h /tmp | tail -1
printf "name: V2-Lite hybrid q8_0\nrules:\n  - match: 'model\\\\.layers\\\\.\\\\d+\\\\.mlp\\\\.experts'\n    device: cpu\n    op: jit\n    quant: q8_0\n  - match: '.*'\n    device: cuda:0\n    dtype: bf16\n" > /tmp/q8_0.yaml
bench() {  # $1 = output name, $2 = rules, rest = extra options; env passes through
  local name=$1 r=$2; shift 2
  L=$(left); [ $L -gt 60 ] || { stamp "skipped $name: budget"; return; }
  S=$(date +%s)
  timeout $L python3 -m runtime bench --model /tmp/v2l --rules /tmp/$r.yaml -p 512 -n 64 -r 3 --bw-gib 1 --breakdown \
    --out $OUT/bench-v2l-$name.json "$@" 2>&1 | grep -v repetition | tail -8
  stamp "$name took $(( $(date +%s) - S )) s"
}
bench q8_0-default q8_0                        # first load quantizes and fills the packed cache
HMOE_HANDOVER=memops bench q8_0-memops q8_0
bench q8_0-w14 q8_0 --experts-threads 14
bench q8_0-w16 q8_0 --experts-threads 16
bench q8_0-default-2 q8_0                      # drift check: the first configuration again
stamp total
