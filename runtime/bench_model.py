"""`hmoe bench`: prompt processing and generation rates of a whole model, llama-bench style, with the
decode roofline of this model on this machine.

Tests (llama-bench's names): `pp512` processes a 512-token prompt in one pass (ubatches of
`ubatch` tokens), `tg128` generates 128 tokens one decode step at a time (greedy), and
`... @ d8192` runs the same test after 8192 tokens already sit in the latent cache. The depth is
filled by prefill and never timed. Each test runs `reps` times after one untimed warm-up; rates
are mean ± sample standard deviation of the per-repetition tokens/s.

Decode roofline: a decode step must read every routed expert it uses once, so tokens/s ≤ read
bandwidth ÷ (MoE layers × top-k × bytes per expert in its format). The bandwidth is measured in
the same run with cpu_experts' streaming read on the experts' threads, before and after the tests;
the larger reading counts (it moves by a third between processes on the GPU machine).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .bench_common import csv_text, markdown_table
from .errors import HmoeError
from .moe import MoE, TorchExperts


@dataclass(frozen=True)
class BenchTest:
    n_prompt: int
    n_gen: int
    n_depth: int

    @property
    def name(self) -> str:
        base = f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}"
        return base + (f" @ d{self.n_depth}" if self.n_depth else "")


def make_tests(prompts: list[int], gens: list[int], depths: list[int]) -> list[BenchTest]:
    """Depth by depth (ascending, so the cache fill is reused), prompt tests first (as llama-bench)."""
    tests = []
    for d in sorted(set(depths)):
        tests += [BenchTest(p, 0, d) for p in prompts if p > 0]
        tests += [BenchTest(0, n, d) for n in gens if n > 0]
    if not tests:
        raise HmoeError("nothing to run: -p and -n are all 0")
    return tests


def context_needed(tests: list[BenchTest]) -> int:
    return max(t.n_depth + t.n_prompt + t.n_gen for t in tests)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Runner:
    """Runs tests on one model and one cache of batch 1. Positions [0, filled) of the cache hold
    the depth tokens; a test at depth d overwrites positions from d on."""

    def __init__(self, model, *, max_len: int, ubatch: int, seed: int = 0, graph: bool = True, log=None):
        from .graph import DecodeGraphs

        self.model, self.ubatch = model, ubatch
        self.device = model.lm_head.weight.device
        self.cache = model.new_cache(batch=1, max_len=max_len)
        self.decode = DecodeGraphs(model, self.cache, enabled=graph, log=log)
        gen = torch.Generator().manual_seed(seed)
        vocab = model.cfg.vocab_size
        self.depth_ids = torch.randint(0, vocab, (max_len,), generator=gen)
        self.test_ids = torch.randint(0, vocab, (max_len,), generator=gen)
        self.filled = 0

    def _prefill(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        logits = None
        for s in range(0, len(ids), self.ubatch):
            chunk = ids[s:s + self.ubatch].to(self.device)[None]
            logits = self.model(chunk, cache=self.cache, start_pos=start + s, last_only=True)
        return logits

    def fill(self, depth: int, log) -> None:
        if depth > self.filled:
            log(f"filling the cache to depth {depth} (prefill, not timed)")
            t0 = time.perf_counter()
            self._prefill(self.depth_ids[self.filled:depth], self.filled)
            _sync()
            log(f"  filled in {time.perf_counter() - t0:.1f} s")
        self.filled = depth

    def run(self, test: BenchTest) -> float:
        """Seconds of one repetition."""
        _sync()
        t0 = time.perf_counter()
        if test.n_prompt:
            self._prefill(self.test_ids[:test.n_prompt], test.n_depth)
        else:
            token = self.test_ids[:1].to(self.device)[None]
            for i in range(test.n_gen):  # greedy, as generation does: one step, then the next token
                logits = self.decode.step(token, test.n_depth + i)
                token = logits[:, -1].argmax(-1, keepdim=True)
        _sync()
        self.filled = min(self.filled, test.n_depth)
        return time.perf_counter() - t0


def run_tests(runner: Runner, tests: list[BenchTest], *, reps: int, warmup: bool = True, read=None,
              log=print) -> list[dict]:
    """Each test `reps` times. For decode tests with CPU experts also: the expert jobs of those very
    steps (the pools' counters, submit to last worker out: no profiler, no separate run) and, with
    read (a callable returning GB/s, e.g. a PoolFlusher), a read-bandwidth reading right before each
    repetition, the yardstick of that repetition's roofline."""
    results = []
    for test in tests:
        runner.fill(test.n_depth, log)
        if warmup:
            runner.run(BenchTest(test.n_prompt, min(test.n_gen, 2), test.n_depth))  # 2 steps: a graph's warm-up and capture
        n = test.n_prompt or test.n_gen
        pools = expert_pools(runner.model) if test.n_gen and not test.n_prompt else []
        samples, readings, cycles = [], [], 0
        for r in range(reps):
            if pools and read is not None:
                readings.append(read())
            before = job_cycles(pools)
            seconds = runner.run(test)
            cycles += job_cycles(pools) - before
            samples.append(seconds)
            log(f"{test.name}: repetition {r + 1}/{reps}: {n / seconds:.2f} t/s")
        ts = [n / s for s in samples]
        row = {"test": test.name, "n_prompt": test.n_prompt, "n_gen": test.n_gen, "n_depth": test.n_depth,
               "reps": reps, "samples_ns": [round(s * 1e9) for s in samples], "samples_ts": ts,
               "avg_ns": round(statistics.fmean(samples) * 1e9),
               "stddev_ns": round(statistics.stdev(samples) * 1e9) if reps > 1 else 0,
               "avg_ts": statistics.fmean(ts), "stddev_ts": statistics.stdev(ts) if reps > 1 else 0.0,
               "cpu_jobs_ms_per_token": None, "outside_jobs_fraction": None, "read_gbs_before_reps": readings or None}
        if pools:
            from cpu_experts.pool import tsc_hz
            jobs_ms = cycles / tsc_hz() / (reps * n) * 1e3
            row["cpu_jobs_ms_per_token"] = jobs_ms
            row["outside_jobs_fraction"] = 1 - jobs_ms / (sum(samples) / (reps * n) * 1e3)
        results.append(row)
    return results


def job_cycles(pools) -> int:
    """Cycles from submit to last worker out, summed over every job the pools ran so far."""
    return sum(pool.profile(reset=False)["last_out"] for pool in pools)


def expert_pools(model) -> list:
    """The distinct worker pools of the model's CPU experts."""
    return list({id(e.pool): e.pool for e in cpu_engines(model)}.values())


def cpu_part(experts):
    """A layer's routed experts as the CPU runs them: a SplitExperts' `slow` part, else themselves."""
    return getattr(experts, "slow", experts)


def routed_experts(model) -> dict:
    """What one decode token must read of the routed experts: per MoE layer top-k experts."""
    cfg = model.cfg
    layers, per_layer, kinds, some_on_gpu = 0, [], set(), False
    for layer in model.model.layers:
        if not isinstance(layer.mlp, MoE):
            continue
        experts = layer.mlp.experts
        fast = getattr(experts, "fast_ids", None) and (len(experts.fast_ids), experts.fast_device)
        some_on_gpu = some_on_gpu or bool(fast)
        experts = cpu_part(experts)  # SplitExperts: the roofline of its CPU part
        engine = getattr(experts, "engine", None)
        if engine is not None:
            per_expert, kind = engine.bytes_per_expert(), f"{engine.fmt} (cpu_experts)"
            if fast:
                kind += f" + {fast[0]}/layer on {fast[1]}"
        elif isinstance(experts, TorchExperts):
            w = experts.gate_proj
            per_expert = 3 * w.shape[1] * w.shape[2] * w.element_size()
            kind = f"torch {str(w.dtype).removeprefix('torch.')} on {w.device.type}"
        else:
            raise HmoeError(f"hmoe bench cannot tell the bytes per expert of {type(experts).__name__} "
                            f"(layer {layer.layer})")
        layers += 1
        per_layer.append(per_expert)
        kinds.add(kind)
    if not layers:
        raise HmoeError("the model has no MoE layers: there is no routed-expert roofline")
    k = cfg.num_experts_per_tok
    # experts kept on a GPU (gpu_experts) take part of each token's choices off the CPU, by a share the
    # routing decides: the roofline still counts every choice as read from RAM, so t/s can pass it
    return {"moe_layers": layers, "top_k": k, "bytes_per_expert": per_layer[0], "experts": ", ".join(sorted(kinds)),
            "bytes_per_token": k * sum(per_layer), "some_on_gpu": some_on_gpu}


def cpu_engines(model) -> list:
    """The cpu_experts engine of every MoE layer that has one (a split layer's CPU part included)."""
    found = (getattr(cpu_part(layer.mlp.experts), "engine", None) for layer in model.model.layers
             if isinstance(layer.mlp, MoE))
    return [e for e in found if e is not None]


def cpu_expert_memory(model) -> dict | None:
    """Bytes of the CPU experts' weight buffers and GB of the process's memory on transparent huge pages
    (the buffers ask for them; 4 KiB pages stream ~11% slower, cpu_experts/NOTES.md). None without
    CPU experts."""
    from cpu_experts.numa import anon_huge_gb
    from cpu_experts.packed_cache import nbytes

    engines = cpu_engines(model)
    if not engines:
        return None
    return {"cpu_experts_bytes": sum(nbytes(e) for e in engines), "anon_huge_pages_gb": anon_huge_gb()}


def cpu_experts_step_ms(model, steps: int = 50, seed: int = 0) -> float | None:
    """Milliseconds one decode token's routed experts take on the CPU alone: every MoE layer's
    cpu_experts engine, 1 token, random hidden and top-k per step, run back to back as a step runs
    them, each through its native submit and wait (the job bound once to host buffers: no Python
    between layers, as in a GPU-driven step). Where the workers leave a core free, this thread runs
    there and waits spinning, as the memops hand-over's dispatcher does (a futex wait adds ~25 us per
    layer of wake-up that a step with that hand-over does not pay). None without cpu_experts. The
    rest of a step is what the target calls 'outside'."""
    import os

    from cpu_experts.numa import spare_cpus

    engines = cpu_engines(model)
    if not engines:
        return None
    spare = spare_cpus({c for e in engines for c in (e.pool.cpus or ())})
    affinity = os.sched_getaffinity(0)
    if spare:
        os.sched_setaffinity(0, spare)
    try:
        return _time_steps(model, engines, steps, seed, spin=bool(spare))
    finally:
        os.sched_setaffinity(0, affinity)


def _time_steps(model, engines, steps: int, seed: int, spin: bool) -> float:
    import numpy as np

    from cpu_experts.pool import NATIVE_FN

    cfg, rng = model.cfg, np.random.default_rng(seed)
    H, k = cfg.hidden_size, cfg.num_experts_per_tok
    hidden, weights = np.zeros((1, H), np.float32), np.full((1, k), 1 / k, np.float32)
    out = np.zeros((1, H), np.float32)
    calls = []  # (submit, wait, job, ids buffer, ids per step): a split layer's CPU part has fewer experts
    for engine in engines:
        ids = np.zeros((1, k), np.int64)
        submit, wait, job = engine.bind(hidden, ids, weights, out)
        if spin:
            wait = engine.pool.wait_job_spin_address
        chosen = [rng.permutation(engine.E)[None, :k] if engine.E >= k else rng.integers(0, engine.E, (1, k))
                  for _ in range(steps + 1)]
        calls.append((NATIVE_FN(submit), NATIVE_FN(wait), job, ids, chosen))
    xs = [rng.standard_normal((1, H), dtype=np.float32) for _ in range(steps + 1)]

    def step(i):
        hidden[:] = xs[i]
        for submit, wait, job, ids, chosen in calls:
            ids[:] = chosen[i]
            submit(job)
            wait(job)

    step(0)  # warm-up
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    return (time.perf_counter() - t0) / steps * 1e3


def attach_outside(results: list[dict], experts_ms: float | None) -> None:
    """Per tg row: the share of a decode step spent outside the CPU experts' time alone (a separate run
    of the same engines; outside_jobs_fraction is the same share from the steps' own jobs)."""
    for r in results:
        step_ms = 1e3 / r["avg_ts"] if r["n_gen"] and r["avg_ts"] else None
        r["outside_experts_fraction"] = 1 - experts_ms / step_ms if step_ms and experts_ms else None


def experts_threads(model) -> tuple[int, list[int] | None]:
    """Threads (and CPUs) of the CPU expert workers; torch's thread count without cpu_experts."""
    for layer in model.model.layers:
        engine = getattr(getattr(layer.mlp, "experts", None), "engine", None)
        if engine is not None:
            return engine.threads, engine.pool.cpus
    return torch.get_num_threads(), None


def roofline(experts: dict, bandwidth_gbs: float, threads: int) -> dict:
    return {**experts, "read_bandwidth_gbs": bandwidth_gbs, "bandwidth_threads": threads,
            "tokens_per_s": bandwidth_gbs * 1e9 / experts["bytes_per_token"]}


def attach_roofline(results: list[dict], roof: dict) -> None:
    """roofline_fraction: t/s over the roofline at the run's yardstick (the larger of two readings);
    roofline_fraction_paired: the median over repetitions of t/s over the roofline at the reading taken
    right before that repetition (the host's bandwidth moves between readings minutes apart)."""
    for r in results:
        r["roofline_fraction"] = r["avg_ts"] / roof["tokens_per_s"] if r["n_gen"] else None
        reads = r.get("read_gbs_before_reps")
        r["roofline_fraction_paired"] = statistics.median(
            ts * roof["bytes_per_token"] / (gbs * 1e9) for ts, gbs in zip(r["samples_ts"], reads)) if reads else None


# ---------------------------------------------------------------- output

FIELDS = ["model", "experts", "test", "n_prompt", "n_gen", "n_depth", "reps", "avg_ts", "stddev_ts",
          "roofline_fraction"]


def as_markdown(result: dict) -> str:
    roof = result["roofline"]
    rows = [[result["model"], roof["experts"], r["test"], f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}",
             f"{100 * r['roofline_fraction']:.1f}%" if r["roofline_fraction"] is not None else ""]
            for r in result["results"]]
    table = markdown_table(["model", "experts", "test", "t/s", "of roofline"], rows)
    lines = [table, "",
             f"decode roofline: {roof['moe_layers']} MoE layers × top-{roof['top_k']} × "
             f"{_size(roof['bytes_per_expert'])} per expert = {_size(roof['bytes_per_token'])} of routed experts per "
             f"token ÷ {roof['read_bandwidth_gbs']:.1f} GB/s read bandwidth ({roof['bandwidth_threads']} threads, "
             f"the larger of two readings in this run) = {roof['tokens_per_s']:.4g} t/s"
             + ("; every choice counted as read from RAM, though some experts run on the GPU: t/s may pass it"
                if roof.get("some_on_gpu") else "")]
    if result.get("cpu_experts_step_ms"):
        outside = ", ".join(f"{r['test']} {100 * r['outside_experts_fraction']:.0f}%" for r in result["results"]
                            if r.get("outside_experts_fraction") is not None)
        lines.append(f"CPU experts alone: {result['cpu_experts_step_ms']:.3f} ms per decode token; share of a step "
                     f"outside them: {outside}")
    paired = [r for r in result["results"] if r.get("roofline_fraction_paired") is not None]
    if paired:
        lines.append("of the roofline against a read right before each repetition (median): " + ", ".join(
            f"{r['test']} {100 * r['roofline_fraction_paired']:.1f}% (reads {min(r['read_gbs_before_reps']):.0f}-"
            f"{max(r['read_gbs_before_reps']):.0f} GB/s)" for r in paired))
    jobs = [r for r in result["results"] if r.get("cpu_jobs_ms_per_token") is not None]
    if jobs:
        lines.append("CPU expert jobs inside the decode steps (submit to last worker out, per token): " + ", ".join(
            f"{r['test']} {r['cpu_jobs_ms_per_token']:.3f} ms, {100 * r['outside_jobs_fraction']:.0f}% of the step "
            f"outside them" for r in jobs))
    mem = result.get("host_memory")
    if mem and mem["anon_huge_pages_gb"] is not None:
        lines.append(f"CPU experts' weights {mem['cpu_experts_bytes'] / 1e9:.2f} GB; process memory on huge pages "
                     f"{mem['anon_huge_pages_gb']:.2f} GB")
    if result.get("step_breakdown"):
        from .step_profile import describe

        lines.append(describe(result["step_breakdown"]))
    return "\n".join(lines)


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def as_csv(result: dict) -> str:
    experts = result["roofline"]["experts"]
    rows = [[result["model"], experts] + [r[f] for f in FIELDS[2:]] for r in result["results"]]
    return csv_text(FIELDS, rows)
