"""`hmoe sweep`: one MoE layer's routed experts on the CPU over threads × NUMA policy × token count.

Each setting builds the layer with random weights (cpu_experts' `CPUExperts.random`) and times it
the way `hmoe bench-moe` does (cpu_experts.bench.time_layer). The read bandwidth of all physical cores,
measured once in the same run, is the yardstick of every setting. Settings this machine cannot
run (more threads than cores, a NUMA policy refused here) are reported as skipped with the reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .bench_common import markdown_table
from .errors import HmoeError


@dataclass(frozen=True)
class Shape:
    name: str
    num_experts: int
    topk: int
    hidden: int
    inter: int


def named_shape(name: str) -> Shape:
    from cpu_experts.bench import SHAPES

    if name not in SHAPES:
        raise HmoeError(f"unknown shape '{name}'; choose one of {', '.join(SHAPES)}")
    return Shape(name, **SHAPES[name])


def model_shape(model_dir: str | Path) -> Shape:
    from .config import load_config

    cfg = load_config(model_dir)
    if not cfg.n_routed_experts:
        raise HmoeError(f"{model_dir}/config.json: the model has no routed experts (n_routed_experts)")
    return Shape(Path(model_dir).name, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size,
                 cfg.moe_intermediate_size)


def skip_reason(threads: int, policy: str, cores: int) -> str | None:
    """Why this machine cannot run the setting, or None."""
    from cpu_experts import numa

    if threads > cores:
        return f"{threads} threads > {cores} physical cores available to this process"
    try:
        used = numa.effective_policy(policy)
    except ValueError as e:
        return str(e)
    if used != policy:
        return f"NUMA policy '{policy}' would run as '{used}' here (libnuma unavailable)"
    return None


def run_sweep(shape: Shape, fmt: str, threads: list[int], policies: list[str], tokens: list[int], *,
              repeats: int = 10, bw_bytes: int = 2 << 30, isa: str | None = None, amx: bool | None = None,
              seed: int = 0, log=print) -> dict:
    from cpu_experts.bandwidth import Flusher, measure_read_bandwidth
    from cpu_experts.bench import repeats_for, time_layer
    from cpu_experts.experts import CPUExperts
    from cpu_experts.numa import physical_cpus, worker_cpus

    cores = len(physical_cpus())
    log(f"measuring read bandwidth ({bw_bytes / 2**30:.2f} GiB, {cores} threads)...")
    bw = measure_read_bandwidth(cores, bw_bytes, cpus=worker_cpus(None))
    log(f"read bandwidth {bw:.1f} GB/s")
    flush = Flusher(cores, worker_cpus(None))  # evicts the last-level cache before each timed call
    settings = []
    for policy in policies:
        for n in threads:
            setting = {"threads": n, "numa": policy}
            settings.append(setting)
            reason = skip_reason(n, policy, cores)
            if reason:
                setting.update(status="skipped", reason=reason)
                log(f"threads {n:3d} numa {policy:10s} skipped: {reason}")
                continue
            try:
                engine = CPUExperts.random(fmt=fmt, num_experts=shape.num_experts, hidden=shape.hidden,
                                           inter=shape.inter, threads=n, numa=policy, isa=isa, amx=amx, seed=seed)
            except ValueError as e:  # the format cannot hold the shape, or an ISA/AMX the host lacks
                raise HmoeError(f"{shape.name} experts in {fmt}: {e}") from None
            rng = np.random.default_rng(seed)
            rows = []
            try:
                for T in tokens:
                    row = time_layer(engine, T, top_k=shape.topk, repeats=repeats_for(T, repeats), rng=rng,
                                     flush=flush)
                    row["pct_bandwidth"] = 100 * row["gbs"] / bw
                    rows.append(row)
                    log(f"threads {n:3d} numa {policy:10s} tokens {T:5d}  {row['ms']:9.3f} ms  {row['gbs']:7.1f} GB/s"
                        f"  {row['pct_bandwidth']:5.1f}% of read bw  {row['gflops']:8.1f} GFLOP/s")
            finally:
                engine.close()
            setting.update(status="ok", isa=engine.isa.name, amx=engine.tiles.amx, results=rows)
    return {"shape": asdict(shape), "fmt": fmt, "tokens": tokens, "read_bandwidth_gbs": bw, "bandwidth_threads": cores,
            "settings": settings, "best": best_settings(settings, tokens)}


def best_settings(settings: list[dict], tokens: list[int]) -> dict[str, dict]:
    """Per token count (as a string key, for JSON): the setting with the lowest median time."""
    best = {}
    for T in tokens:
        runs = [(r, s) for s in settings if s["status"] == "ok" for r in s["results"] if r["tokens"] == T]
        if runs:
            r, s = min(runs, key=lambda rs: rs[0]["ms"])
            best[str(T)] = {"threads": s["threads"], "numa": s["numa"], "ms": r["ms"], "gbs": r["gbs"],
                            "pct_bandwidth": r["pct_bandwidth"], "gflops": r["gflops"]}
    return best


def table(result: dict) -> str:
    rows = [[s["threads"], s["numa"], r["tokens"], f"{r['ms']:.3f}", f"{r['gbs']:.1f}", f"{r['pct_bandwidth']:.1f}",
             f"{r['gflops']:.1f}"] for s in result["settings"] if s["status"] == "ok" for r in s["results"]]
    sh = result["shape"]
    lines = [f"{sh['name']}: {sh['num_experts']} experts, top-{sh['topk']}, hidden {sh['hidden']}, inter "
             f"{sh['inter']}, {result['fmt']}; read bandwidth {result['read_bandwidth_gbs']:.1f} GB/s "
             f"({result['bandwidth_threads']} threads, same run)", ""]
    if rows:
        lines.append(markdown_table(["threads", "numa", "tokens", "ms/layer", "GB/s", "% of bw", "GFLOP/s"], rows))
    for s in result["settings"]:
        if s["status"] == "skipped":
            lines.append(f"skipped: {s['threads']} threads, numa {s['numa']}: {s['reason']}")
    lines.append("")
    for T, b in result["best"].items():
        lines.append(f"best at {T} token{'s' if T != '1' else ''}: {_threads(b['threads'])}, numa {b['numa']} "
                     f"({b['ms']:.3f} ms/layer, {b['pct_bandwidth']:.0f}% of read bandwidth, {b['gflops']:.0f} GFLOP/s)")
    if not result["best"]:
        lines.append("no setting could run on this machine")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> None:
    """ms/layer against threads, one panel per token count, one line per NUMA policy; best circled."""
    try:
        import matplotlib
    except ImportError:
        raise HmoeError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    tokens = result["tokens"]
    fig, axes = plt.subplots(1, len(tokens), figsize=(4.2 * len(tokens), 3.6), squeeze=False)
    for ax, T in zip(axes[0], tokens):
        for policy in dict.fromkeys(s["numa"] for s in result["settings"]):
            pts = sorted((s["threads"], r["ms"]) for s in result["settings"] if s["numa"] == policy
                         and s["status"] == "ok" for r in s["results"] if r["tokens"] == T)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"numa {policy}")
        b = result["best"].get(str(T))
        if b:
            ax.plot([b["threads"]], [b["ms"]], marker="o", markersize=14, fillstyle="none", color="black",
                    label=f"best: {_threads(b['threads'])}, {b['numa']}")
        ax.set_title(f"{T} token{'s' if T != 1 else ''}")
        ax.set_xlabel("threads")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("ms per layer (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    sh = result["shape"]
    fig.suptitle(f"{sh['name']} routed experts, {result['fmt']}, one MoE layer "
                 f"(read bandwidth {result['read_bandwidth_gbs']:.0f} GB/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _threads(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"
