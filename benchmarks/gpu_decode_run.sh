#!/bin/bash
# Hybrid decode on the GPU machine, whole DeepSeek-V2-Lite (27 layers, random weights): where a step
# goes (`hmoe bench --breakdown`) for the default (one worker per core but one, the hand-over `auto`)
# and variants. Routed experts q8_0 (or q4_k) on the CPU, everything else bf16 on cuda:0. Before that,
# GPU tests.
# Results land in $OUT; budget $BUDGET seconds (default 540). From the repository root:
#   OUT=$OUT bash benchmarks/gpu_decode_run.sh
# TESTS= the GPU test files (default: the decode path's; "none" skips), CPU_TESTS=1 adds the AMX/VNNI
# CPU-expert tests, VARIANTS= the bench variants in order (default, memops, wN = N workers, depth, q4_k =
# the experts in q4_k, gpuN = N experts per layer kept on the GPU, base = the tree in _dev/base (base_q4_k:
# with q4_k experts), e.g.
# `git archive REV | tar -x -C _dev/base`, carried along: A/B in one call). Output: bench-v2l-VARIANT.json.
export HMOE_CACHE_DIR=/tmp/hc PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT; BUDGET=${BUDGET:-540}
exec > >(tee $OUT/log-decode.txt) 2>&1
T0=$(date +%s); left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
( [ -d /tmp/v2l ] || { S=$(date +%s); python3 -m runtime make-model --preset v2-lite --out /tmp/v2l >/dev/null 2>&1;
  echo "make-model v2-lite: $(( $(date +%s) - S )) s"; } ) &
MM=$!
[ "$TESTS" = none ] || timeout ${TEST_S:-150} python3 -m pytest -m gpu -p no:cacheprovider -rfE ${TESTS:-tests/test_step_profile.py \
  tests/test_graph.py tests/test_orchestrator.py tests/test_handover.py tests/test_fused.py} 2>&1 | tail -12
[ -n "$CPU_TESTS" ] && timeout 100 python3 -m pytest -p no:cacheprovider -rfE -k "amx or vnni or mixed or pool or share" \
  tests/test_cpu_experts_moe.py tests/test_cpu_experts_mixed.py 2>&1 | tail -4
wait $MM; stamp "tests done, model ready"; df -h /tmp | tail -1
rules() {  # $1 = experts' format, $2 = extra line of the experts' rule
  printf "name: V2-Lite hybrid $1\nrules:\n  - match: 'model\\\\.layers\\\\.\\\\d+\\\\.mlp\\\\.experts'\n    device: cpu\n    op: jit\n    quant: $1\n$2  - match: '.*'\n    device: cuda:0\n    dtype: bf16\n"
}
rules q8_0 > /tmp/q8_0.yaml; rules q4_k > /tmp/q4_k.yaml
bench() {  # $1 = variant: default, memops, wN (N workers); repeated names get -2, -3
  local variant=$1 name=$1 n=2 env=() opts=() dir=. rules=/tmp/q8_0.yaml
  while [ -e $OUT/bench-v2l-$name.json ]; do name=$variant-$n; n=$((n + 1)); done
  case $variant in base*) dir=_dev/base ;; esac   # base_q4_k: the tree in _dev/base with q4_k experts
  case $variant in *q4_k) rules=/tmp/q4_k.yaml ;; esac
  case $variant in  # depth: tg at 0 and 32768 cached tokens (the MLA promise: a flat curve)
    memops) env=(HMOE_HANDOVER=memops) ;;
    gpu*) rules=/tmp/$variant.yaml; rules q8_0 "    gpu_experts: {count: ${variant#gpu}, device: cuda:0, quant: bf16}\n" > $rules ;; w*) opts=(--experts-threads ${variant#w}) ;; depth) opts=(-p 0 -d 0,32768) ;;
  esac
  L=$(left); [ $L -gt 60 ] || { stamp "skipped $name: budget"; return; }
  S=$(date +%s)
  (cd $dir && env "${env[@]}" timeout $L python3 -m runtime bench --model /tmp/v2l --rules $rules -p 512 \
    -n ${NGEN:-128} -r 3 --bw-gib 1 --breakdown --out $OUT/bench-v2l-$name.json "${opts[@]}") 2>&1 |
    grep -v repetition | tail -12
  stamp "$name took $(( $(date +%s) - S )) s"
}
for v in ${VARIANTS:-default memops w14 w16 default}; do bench $v; done  # the first load quantizes and packs
stamp total
