"""`hmoe bench-moe`'s driver (cpu_experts.bench): the row schema, each call judged against the read
that evicted the cache right before it, and the bound native path timed beside forward()."""
import numpy as np
import pytest

from cpu_experts import bench
from cpu_experts.bandwidth import PoolFlusher
from cpu_experts.experts import CPUExperts


@pytest.fixture
def tiny_shape(monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "tiny", dict(num_experts=8, topk=2, hidden=256, inter=256))
    # the 2 GiB readings before and after: scripted (what they are compared with is what is tested)
    monkeypatch.setattr(bench, "measure_read_bandwidth", lambda *a, **k: 1.0)


def test_rows_pair_each_call_with_the_read_before_it(tiny_shape):
    res = bench.run("tiny", "q8_0", 2, [1, 3], repeats=3, log=lambda *a: None)
    assert [r["tokens"] for r in res["results"]] == [1, 3]
    largest = max([1.0] + [r["read_gbs_range"][1] for r in res["results"]])
    assert res["read_bandwidth_gbs"] == pytest.approx(largest)
    for r in res["results"]:
        lo, hi = r["read_gbs_range"]
        assert 0 < lo <= r["read_gbs"] <= hi
        assert r["pct_bandwidth"] == r["pct_paired"] > 0
        assert r["pct_of_max_reading"] == pytest.approx(100 * r["gbs"] / largest)
        # the native path read the same bytes per call on average: its GB/s follows its own time
        assert r["gbs_native"] == pytest.approx(r["weight_gb"] / (r["ms_native"] / 1e3))
        assert r["pct_paired_native"] > 0
        assert r["gflops"] == pytest.approx(2 * 3 * r["tokens"] * 2 * 256 * 256 / (r["ms"] / 1e3) / 1e9)
        assert 1 <= r["experts_touched"] <= 8


def test_native_timing_can_be_left_out(tiny_shape):
    res = bench.run("tiny", "q8_0", 2, [2], repeats=2, native=False, log=lambda *a: None)
    assert "ms_native" not in res["results"][0] and "pct_paired_native" not in res["results"][0]


def test_each_call_is_judged_against_the_reads_before_and_after_it(monkeypatch, tiny_shape):
    # scripted reads: 10, 30, 50, ... GB/s in the order the flushes run; 2 calls and a last read
    reads = iter(range(10, 1000, 20))

    class Reads:
        def __init__(self, pool):
            self.pool = pool

        def __call__(self):
            self.pool.wake()
            return float(next(reads))

    monkeypatch.setattr(bench, "PoolFlusher", Reads)
    res = bench.run("tiny", "q8_0", 2, [1], repeats=2, native=False, log=lambda *a: None)
    row = res["results"][0]
    # the yardsticks are the means of neighbouring reads: (10+30)/2 and (30+50)/2 -> median 30
    assert row["read_gbs"] == 30.0 and row["read_gbs_range"] == [10.0, 50.0]


def test_pct_paired_is_the_median_of_per_call_ratios():
    # 1 GB in 0.1 s against 20 GB/s (50%), in 0.05 s against 10 (200%), in 0.1 s against 8 (125%)
    calls = [(0.1, 1e9, 20.0), (0.05, 1e9, 10.0), (0.1, 1e9, 8.0)]
    assert bench.pct_paired(calls) == pytest.approx(125.0)


def test_pool_flusher_reads_on_the_workers_and_leaves_the_pool_working():
    ex = CPUExperts.random(fmt="q8_0", num_experts=4, hidden=256, inter=128, threads=2, seed=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    ids = np.array([[0, 1], [2, 3], [1, 2]], np.int64)
    w = rng.uniform(0.1, 1, (3, 2)).astype(np.float32)
    before = ex.forward(x, ids, w).copy()
    flush = PoolFlusher(ex.pool, nbytes=1 << 22)
    assert flush.nbytes == 1 << 22 and flush() > 0
    np.testing.assert_array_equal(ex.forward(x, ids, w), before)   # the expert job runs as before
    ex.close()


def test_pool_flusher_writes_only_its_own_job_slot():
    # the read job's one store (the xor that keeps the loads) lands in job[OUT], nothing past the job
    from cpu_experts.codegen.fields import J, JOB_FIELDS
    from cpu_experts.pool import aligned_zeros

    ex = CPUExperts.random(fmt="q8_0", num_experts=4, hidden=256, inter=128, threads=2, seed=1)
    flush = PoolFlusher(ex.pool, nbytes=1 << 20)
    guarded = aligned_zeros(len(JOB_FIELDS) + 128, np.int64)
    guarded[:len(JOB_FIELDS)] = flush.job
    guarded[len(JOB_FIELDS):] = -7
    guarded[J["OUT"]] = -7
    flush.job = guarded
    assert flush() > 0
    assert (guarded[len(JOB_FIELDS):] == -7).all()
    assert guarded[J["OUT"]] != -7
    ex.close()
