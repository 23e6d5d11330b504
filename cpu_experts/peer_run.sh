#!/bin/bash
# Issue 3's targets measured beside the peer in ONE device call (device tool, tree root, $OUT set):
#   bash cpu_experts/peer_run.sh   (kt-kernel's extension carried in _dev/kt: see benchmarks/kt_peer.py)
# hmoe bench-moe (V3 layer; q4_k, q8_0, q4_0, bf16; 1, 8, 512, 2048 tokens; 16 threads) alternating with
# kt-kernel AMXINT4 / AMXINT8 (15 threads, as it asks) on the same host, q4_k and AMXINT4 once more (drift),
# the quant_rows=1 A/B at 8 tokens, then the formats' accuracy (kt_peer --accuracy). Each engine in its own
# process (memory: a V3 bf16 layer is 22.5 GB). JSON under $OUT/res, packed into $OUT/results.tgz.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 HMOE_CACHE_DIR=${HMOE_CACHE_DIR:-/tmp/hmoe-cache}
OUT=${OUT:-/tmp/out}; R=$OUT/res; mkdir -p "$R"
EXT=${EXT:-_dev/kt/kt_kernel/_kt_kernel_ext_amx.cpython-312-x86_64-linux-gnu.so}
TOK=${TOK:-1,8,512,2048}
quiet() { grep -v "^Creating\|Hello\|Goodbye\|NumaPool\|Numa Worker\|^WorkerPool\|^TP MOE\|^From BF16\|online quant"; }
ours() { timeout 150 python3 -m runtime.cli bench-moe --shape v3 --fmt "$1" --threads 16 --tokens "$TOK" --out "$R/ours-$1-$2.json"; }
kt() { timeout 150 python3 benchmarks/kt_peer.py --ext "$EXT" --method "$1" --threads 15 --tokens "$TOK" --out "$R/kt-$1-$2.json" 2>&1 | quiet; }
{
  date -u; lscpu | grep -E "^(Model name|CPU\(s\)|L2|L3|Thread|Core)"; git rev-parse HEAD 2>/dev/null
  timeout 100 python3 -m cpu_experts.precompile --sweep base,q1 --sweep-fmts q4_k,q8_0,q4_0,bf16 | tail -1
  ours q4_k 1; kt AMXINT4 1
  ours q8_0 1; kt AMXINT8 1
  ours q4_0 1; ours bf16 1
  ours q4_k 2; kt AMXINT4 2
  timeout 60 python3 -m cpu_experts.sweep --shape v3 --fmt q4_k --threads 16 --tokens 8 --variants base,q1 \
    --repeats 20 --out "$R/sweep-q1-v3-q4_k.json" | grep -v "^  "
  timeout 150 python3 benchmarks/kt_peer.py --ext "$EXT" --threads 15 --accuracy q4_k,q4_0,q8_0,bf16 --experts 8 \
    --out "$R/accuracy.json" 2>&1 | quiet
  date -u
} 2>&1 | tee "$OUT/log.txt"
tar czf "$OUT/results.tgz" -C "$R" . && rm -rf "$R"
