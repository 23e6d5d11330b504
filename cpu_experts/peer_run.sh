#!/bin/bash
# Issue 3's targets measured beside the peer in ONE device call (device tool, tree root, $OUT set):
#   bash cpu_experts/peer_run.sh   (kt-kernel's extension carried in _dev/kt: see benchmarks/kt_peer.py)
# Default STEPS: hmoe bench-moe (V3 layer; q4_k, q8_0, q4_0, bf16; 16 threads) alternating with kt-kernel
# AMXINT4 / AMXINT8 (15 threads, as it asks) on the same host, q4_k and AMXINT4 once more (drift), the
# quant_rows=1 A/B at 8 tokens, then the formats' accuracy (of the formats in $ACC). A step is ours:FMT,
# kt:METHOD, q1, accuracy, sweep:FMT[/DOWN] (cpu_experts.sweep of $VARIANTS, down_proj in DOWN) or tests
# (pytest $TESTS); TOK (default 1,8,512,2048) and REPEATS (default 10) apply to all. Each engine in its own
# process (a V3 bf16 layer is 22.5 GB). JSON under $OUT/res, packed into $OUT/results-TIME.tgz.
# HMOE_COMMIT names the tree.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 HMOE_CACHE_DIR=${HMOE_CACHE_DIR:-/tmp/hmoe-cache}
OUT=${OUT:-/tmp/out}; R=$OUT/res; mkdir -p "$R"
EXT=${EXT:-_dev/kt/kt_kernel/_kt_kernel_ext_amx.cpython-312-x86_64-linux-gnu.so}
TOK=${TOK:-1,8,512,2048}; REPEATS=${REPEATS:-10}; VARIANTS=${VARIANTS:-base}; TESTS=${TESTS:-}
ACC=${ACC:-q4_k,q4_0,q8_0,bf16}
STEPS=${STEPS:-ours:q4_k kt:AMXINT4 ours:q8_0 kt:AMXINT8 ours:q4_0 ours:bf16 ours:q4_k kt:AMXINT4 q1 accuracy}
quiet() { grep -v "^Creating\|Hello\|Goodbye\|NumaPool\|Numa Worker\|^WorkerPool\|^TP MOE\|^From BF16\|online quant"; }
name() { local n=1; while [ -e "$R/$1-$n.json" ]; do n=$((n + 1)); done; echo "$R/$1-$n.json"; }
{
  date -u; lscpu | grep -E "^(Model name|CPU\(s\)|L2|L3|Thread|Core)"; echo "commit ${HMOE_COMMIT:-?}"
  timeout 100 python3 -m cpu_experts.precompile --sweep "base,q1,$VARIANTS" --sweep-fmts q4_k,q8_0,q4_0,bf16 | tail -1
  for step in $STEPS; do
    case $step in
      ours:*) timeout 150 python3 -m runtime.cli bench-moe --shape v3 --fmt "${step#ours:}" --threads 16 --tokens "$TOK" \
                --repeats "$REPEATS" --out "$(name ours-${step#ours:})" ;;
      kt:*) timeout 150 python3 benchmarks/kt_peer.py --ext "$EXT" --method "${step#kt:}" --threads 15 --tokens "$TOK" \
              --repeats "$REPEATS" --out "$(name kt-${step#kt:})" 2>&1 | quiet ;;
      sweep:*) f=${step#sweep:}; down=(); [ "${f#*/}" != "$f" ] && down=(--down-fmt "${f#*/}")   # sweep:FMT[/DOWN]
               timeout 200 python3 -m cpu_experts.sweep --shape v3 --fmt "${f%/*}" "${down[@]}" --threads 16 --tokens "$TOK" \
                 --variants "$VARIANTS" --repeats "$REPEATS" --out "$(name sweep-${f/\//-})" | grep -v "^  " ;;
      tests) eval "timeout 200 python3 -m pytest -q -p no:cacheprovider $TESTS" > "$R/tests.txt" 2>&1; echo "tests EXIT=$?"
             tail -3 "$R/tests.txt" ;;
      q1) timeout 60 python3 -m cpu_experts.sweep --shape v3 --fmt q4_k --threads 16 --tokens 8 --variants base,q1 \
            --repeats 20 --out "$R/sweep-q1-v3-q4_k.json" | grep -v "^  " ;;
      accuracy) timeout 150 python3 benchmarks/kt_peer.py --ext "$EXT" --threads 15 --accuracy "$ACC" \
                  --experts 8 --out "$R/accuracy.json" 2>&1 | quiet ;;
    esac
  done
  date -u
} 2>&1 | tee -a "$OUT/log.txt"
tar czf "$OUT/results-$(date +%H%M%S).tgz" -C "$R" . && rm -rf "$R"
