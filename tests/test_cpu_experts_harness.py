"""The timing harnesses' options for small boxes and split formats: native_timing with fewer experts
per layer and a down_proj format of its own (V2-Lite q4_k: rows of 1408 take q4_0 down)."""
from cpu_experts import native_timing


def test_native_timing_takes_experts_and_down_fmt(monkeypatch):
    # the 2 GiB bandwidth yardstick is not what this tests
    monkeypatch.setattr(native_timing, "measure_read_bandwidth", lambda *a, **k: 10.0)
    res = native_timing.run("v2-lite", "q4_k", threads=2, tokens=[1], variants=["base", "q1"], layers=2, steps=1,
                            rounds=1, waits=("spin",), down_fmt="q4_0", experts=8, log=lambda s: None)
    assert (res["fmt"], res["down_fmt"], res["experts"], res["layers"]) == ("q4_k", "q4_0", 8, 2)
    assert res["tiles"]["q1"]["quant_rows"] == 1
    rows = {r["variant"]: r for r in res["results"]}
    assert set(rows) == {"base", "q1"}
    for r in rows.values():
        assert r["calls"] == 2 and r["us_median"] > 0
        # the bytes per call follow the experts touched and the mixed format's bytes per expert
        assert abs(r["weight_mb"] - r["experts_touched"] * res["bytes_per_expert"] / 1e6) < 1e-3 * r["weight_mb"]
