"""DSA decode against dense MLA decode at given contexts: one layer at DeepSeek-V3.2's shapes, CUDA.

`time_decode(contexts)` returns one row per context with the median times (µs) of dense absorbed
decode (attention.mla_attention), of DSA decode (indexer top-k + attention over the selected rows)
and of the indexer alone, plus DSA's error against the plain-torch reference on the same indices.
`hmoe bench-attn --dsa` prints these rows; `python -m gpu_attention.dsa_bench` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from .attention import backend_for, mla_attention
from .dsa import dsa_attention, select_topk
from .dsa_torch import indexer_scores, indexer_topk, mla_sparse_absorbed
from .latent_cache import LatentCache

V32 = dict(heads=128, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
           index_n_heads=64, index_head_dim=128, index_topk=2048)


def _median_us(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def _filled_cache(dim: int, ctx: int, dtype: str, gen: torch.Generator, device) -> LatentCache:
    cache = LatentCache.for_batch(num_layers=1, latent_dim=dim, batch=1, max_len=ctx, dtype=dtype,
                                  compute_dtype=torch.bfloat16, device=device)
    cache.prepare(0, ctx, 1)
    cache.write(0, 0, torch.randn(1, ctx, dim, generator=gen, device=device, dtype=torch.bfloat16))
    return cache


def time_decode(contexts=(4096, 8192, 32768, 131072), *, index_dtype: str = "bf16", reps: int = 50,
                device: str = "cuda", shapes: dict = V32) -> list[dict]:
    s = shapes
    H, R, rope, nope, v = s["heads"], s["kv_lora_rank"], s["qk_rope_head_dim"], s["qk_nope_head_dim"], s["v_head_dim"]
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    q_nope, q_pe = randn(1, 1, H, nope), randn(1, 1, H, rope)
    kv_b = randn(H * (nope + v), R) * R**-0.5
    q_idx, w_idx = randn(1, 1, s["index_n_heads"], s["index_head_dim"]), randn(1, 1, s["index_n_heads"],
                                                                                dtype=torch.float32)
    scale, iscale = (nope + rope) ** -0.5, s["index_head_dim"] ** -0.5
    rows = []
    for ctx in contexts:
        latent = _filled_cache(R + rope, ctx, "bf16", gen, device)
        keys = _filled_cache(s["index_head_dim"], ctx, index_dtype, gen, device)

        def select():
            return select_topk(q_idx, w_idx, keys, 0, topk=s["index_topk"], scale=iscale)

        def dsa():
            return dsa_attention(q_nope, q_pe, latent, 0, kv_b, select(), v_head_dim=v, scale=scale, form="absorbed")

        def dense():
            return mla_attention(q_nope, q_pe, latent, 0, kv_b, v_head_dim=v, scale=scale, form="absorbed")

        idx = select()
        ref = mla_sparse_absorbed(q_nope, q_pe, latent.prefix(0, 1), kv_b, idx, kv_lora_rank=R, v_head_dim=v,
                                  scale=scale)
        got = dsa_attention(q_nope, q_pe, latent, 0, kv_b, idx, v_head_dim=v, scale=scale, form="absorbed")
        exact = indexer_topk(q_idx, w_idx, keys.prefix(0, 1), topk=s["index_topk"], scale=iscale)
        overlap = len(set(idx[0, 0].tolist()) & set(exact[0, 0].tolist())) / idx.shape[-1]
        row = dict(ctx=ctx, dsa_us=_median_us(dsa, reps), indexer_us=_median_us(select, reps),
                   dsa_rel_err=float((got - ref).norm() / ref.norm()), topk_overlap_vs_torch=overlap)
        if backend_for(q_idx.device) == "triton":
            from .dsa_triton import index_scores
            want = indexer_scores(q_idx, w_idx, keys.prefix(0, 1), scale=iscale, first_pos=ctx - 1)
            got_scores = index_scores(q_idx, w_idx, keys, 0, scale=iscale)
            row["index_scores_rel_err"] = float((got_scores - want).norm() / want.norm())
        try:  # the dense kernel is issue 5's; a failure there should not hide the DSA numbers
            row["dense_us"] = _median_us(dense, reps)
        except Exception as e:  # noqa: BLE001
            row["dense_error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        del latent, keys
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="4096,8192,32768,131072")
    ap.add_argument("--index-dtype", default="bf16", choices=["bf16", "fp8"])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--commit", default="")
    ap.add_argument("--out")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    rows = time_decode([int(c) for c in args.contexts.split(",")], index_dtype=args.index_dtype, reps=args.reps)
    for r in rows:
        print(f"ctx {r['ctx']:>7}: dense {r.get('dense_us', float('nan')):8.1f} us  dsa {r['dsa_us']:8.1f} us  "
              f"(indexer {r['indexer_us']:7.1f} us)  err {r['dsa_rel_err']:.1e}  "
              f"overlap {r['topk_overlap_vs_torch']:.3f}")
    result = dict(date=time.strftime("%Y-%m-%d"), device=torch.cuda.get_device_name(), host=platform.node(),
                  commit=args.commit, backend=backend_for(torch.device("cuda")), index_dtype=args.index_dtype,
                  shapes=V32, command="python -m gpu_attention.dsa_bench " + " ".join(argv), rows=rows,
                  dsa_128k_over_4k=_ratio(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


def _ratio(rows: list[dict]) -> float | None:
    by_ctx = {r["ctx"]: r["dsa_us"] for r in rows}
    return by_ctx[131072] / by_ctx[4096] if 4096 in by_ctx and 131072 in by_ctx else None


if __name__ == "__main__":
    main()
