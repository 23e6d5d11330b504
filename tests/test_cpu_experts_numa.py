"""NUMA policies: every policy gives the same numbers on this (one-node) machine; no libnuma -> 'none'."""
import warnings

import numpy as np
import pytest

from cpu_experts import numa
from cpu_experts.experts import CPUExperts


def _layer(policy):
    rng = np.random.default_rng(5)
    g, u, d = (rng.standard_normal(s).astype(np.float32) * 0.1 for s in ((4, 64, 128), (4, 64, 128), (4, 128, 64)))
    return CPUExperts.from_tensors(g, u, d, fmt="q8_0", threads=2, numa=policy)


@pytest.mark.skipif(len(numa.node_cpus()) > 1, reason="split/replicate on several nodes are refused (not built)")
def test_all_policies_agree_on_one_node():
    x = np.random.default_rng(6).standard_normal((9, 128)).astype(np.float32)
    ids = np.random.default_rng(7).integers(0, 4, (9, 2))
    w = np.full((9, 2), 0.5, np.float32)
    outs = {p: _layer(p).forward(x, ids, w) for p in numa.POLICIES}
    for p in numa.POLICIES:
        np.testing.assert_array_equal(outs[p], outs["none"])


def test_buffer_is_page_aligned_and_writable():
    buf = numa.Buffer(10_000, "interleave")
    assert buf.address % 4096 == 0
    a = buf.array(np.float32)
    a[:] = 3.0
    assert buf.array(np.float32, 4, 2).tolist() == [3.0, 3.0]
    buf.close()


@pytest.mark.parametrize("policy", ["interleave", "none"])
def test_large_buffer_starts_on_a_huge_page_and_is_writable_to_its_end(policy):
    buf = numa.Buffer(5 << 20, policy)
    assert buf.address % numa.HUGE_PAGE == 0
    a = buf.array(np.uint8)
    a[:] = 7
    assert a[0] == a[-1] == 7 and a.size == 5 << 20
    buf.close()


def test_missing_libnuma_degrades_to_none_with_one_warning(monkeypatch):
    monkeypatch.setattr(numa, "_libnuma", lambda: None)
    monkeypatch.setattr(numa, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert numa.effective_policy("interleave") == "none"
        assert numa.effective_policy("split") == "none"
    assert len(caught) == 1 and "libnuma" in str(caught[0].message)


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown NUMA policy 'spread'"):
        numa.effective_policy("spread")


def test_worker_cpus_are_distinct_physical_cores():
    cpus = numa.worker_cpus(None)
    assert cpus and len(set(cpus)) == len(cpus)
    assert numa.worker_cpus(len(cpus) + 1)[-1] == cpus[0]  # oversubscription wraps around
