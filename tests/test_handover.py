"""The memops hand-over (HMOE_HANDOVER=memops): the mailbox protocol with a Python thread playing the
GPU stream, its results against the host-function path, shutdown, and the mode's selection and
fallback. GPU tests (same logits as hostfunc, eagerly and from a CUDA graph) are marked."""

import ctypes
import os
import threading
import time

import numpy as np
import pytest
import torch

from orchestrator import doorbell, hybrid
from orchestrator.doorbell import BAD, BELL, DONE, Mailbox
from orchestrator.hybrid import HostStaging, HybridExperts, attach, handover_mode
from runtime.errors import HmoeError
from runtime.loader import load_model
from runtime.moe import MoE

from .test_orchestrator import _round_experts_to_bf16

_JOB_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _FakeEngine:
    """Native-callable submit/wait (ctypes callbacks) that log what the dispatcher calls, in order."""

    def __init__(self):
        self.calls = []
        self._submit = _JOB_FN(lambda job: self.calls.append(("submit", job)))
        self._wait = _JOB_FN(lambda job: self.calls.append(("wait", job)))
        self.fns = tuple(ctypes.cast(f, ctypes.c_void_p).value for f in (self._submit, self._wait))


def _gpu_stand_in(mailbox: Mailbox, bells: list[int], timeout: float = 10.0):
    """What the stream does per launch, from another thread: DONE = 0, ring, wait for DONE == 1."""
    slots, failures = mailbox.slots, []

    def play():
        for bell in bells:
            slots[DONE] = 0
            slots[BELL] = bell
            deadline = time.monotonic() + timeout
            while slots[DONE] != 1:
                if time.monotonic() > deadline:
                    failures.append(bell)
                    return
                time.sleep(0)

    thread = threading.Thread(target=play)
    thread.start()
    thread.join(timeout + 5)
    assert not thread.is_alive() and not failures, f"no DONE for bell {failures}"


def test_dispatcher_runs_each_rung_job_once_in_order():
    engine = _FakeEngine()
    jobs = [np.zeros(8, np.int64) for _ in range(3)]
    mailbox = Mailbox(spin=1000, sleep_us=20)
    try:
        bells = [mailbox.bell_for(job, *engine.fns) for job in jobs]
        assert bells == [1, 2, 3] and mailbox.bell_for(jobs[1], *engine.fns) == 2  # one row per job
        mailbox.start()
        order = [bells[i % 3] for i in range(300)]  # many cycles, in the spin and the sleep phases
        _gpu_stand_in(mailbox, order[:150])
        time.sleep(0.01)  # past the spin budget: the dispatcher polls between sleeps now
        _gpu_stand_in(mailbox, order[150:])
        want = [(name, jobs[b - 1].ctypes.data) for b in order for name in ("submit", "wait")]
        assert engine.calls == want
        assert mailbox.runs == 300 and mailbox.slots[BELL] == 0
    finally:
        mailbox.close()
    assert not mailbox.running


def test_a_bell_without_a_job_is_recorded_and_still_answered():
    mailbox = Mailbox(spin=100)
    try:
        mailbox.start()
        _gpu_stand_in(mailbox, [7])  # no row 7: DONE comes anyway, so a stream would not hang
        assert mailbox.slots[BAD] == 7 and mailbox.runs == 0
    finally:
        mailbox.close()


@pytest.mark.parametrize("spin", [0, 10**9])  # asleep between polls, or spinning
def test_close_stops_the_dispatcher_and_releases_a_waiting_stream(spin):
    mailbox = Mailbox(spin=spin, yield_every=16, sleep_us=1000)
    mailbox.start()
    mailbox.slots[DONE] = 0  # a stream waits on DONE; the bell never rings
    released = threading.Event()

    def wait_done():
        while mailbox.slots[DONE] != 1:
            time.sleep(1e-4)
        released.set()

    waiter = threading.Thread(target=wait_done)
    waiter.start()
    t0 = time.monotonic()
    mailbox.close()
    waiter.join(5)
    assert released.is_set() and not mailbox.running
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(RuntimeError, match="closed"):
        mailbox.start()


def test_bad_settings_and_a_full_mailbox_are_refused(monkeypatch):
    with pytest.raises(HmoeError, match="1 <= sleep_us < 1000000"):
        Mailbox(sleep_us=0)
    monkeypatch.setattr(doorbell, "CAPACITY", 2)
    mailbox, engine = Mailbox(), _FakeEngine()
    jobs = [np.zeros(8, np.int64) for _ in range(3)]
    mailbox.bell_for(jobs[0], *engine.fns)
    mailbox.bell_for(jobs[1], *engine.fns)
    with pytest.raises(RuntimeError, match="mailbox full: 2 jobs"):
        mailbox.bell_for(jobs[2], *engine.fns)


def test_mailbox_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("HMOE_DOORBELL_SPIN", "123")
    monkeypatch.setenv("HMOE_DOORBELL_YIELD", "0")
    mailbox = Mailbox.from_env()
    assert (mailbox.slots[doorbell.SPIN], mailbox.slots[doorbell.YIELD], mailbox.slots[doorbell.SLEEP_NS]) == \
        (123, 0, 50_000)
    monkeypatch.setenv("HMOE_DOORBELL_SLEEP_US", "fast")
    with pytest.raises(HmoeError, match="HMOE_DOORBELL_SLEEP_US must be an integer, got 'fast'"):
        Mailbox.from_env()


# ---------------------------------------------------------------- selection and fallback

def test_handover_mode_default_env_and_bad_value(monkeypatch):
    monkeypatch.delenv("HMOE_HANDOVER", raising=False)
    assert handover_mode() == "auto"
    monkeypatch.setenv("HMOE_HANDOVER", "memops")
    assert handover_mode() == "memops"
    assert HostStaging(max_tokens=2, hidden=8, top_k=2).handover == "memops"
    assert handover_mode("hostfunc") == "hostfunc"  # an explicit value wins
    monkeypatch.setenv("HMOE_HANDOVER", "futex")
    with pytest.raises(HmoeError, match="HMOE_HANDOVER must be one of auto, hostfunc, memops, got 'futex'"):
        handover_mode()


def test_hostfunc_never_makes_a_mailbox():
    staging = HostStaging(max_tokens=2, hidden=8, top_k=2, handover="hostfunc")
    assert staging.mailbox_for(torch.device("cpu")) is None and staging.mailbox is None


def test_auto_takes_host_functions_on_the_cpu_or_without_a_spare_core(monkeypatch, capsys):
    from cpu_experts.numa import physical_cpus

    staging = HostStaging(max_tokens=2, hidden=8, top_k=2, handover="auto")
    assert staging.mailbox_for(torch.device("cpu")) is None and staging.handover == "hostfunc"
    staging = HostStaging(max_tokens=2, hidden=8, top_k=2, handover="auto")
    assert staging.mailbox_for(torch.device("cuda", 0), busy_cpus=physical_cpus()) is None  # every core a worker's
    assert staging.handover == "hostfunc" and staging.mailbox is None
    staging = HostStaging(max_tokens=2, hidden=8, top_k=2, handover="auto")
    monkeypatch.setattr(hybrid.cuda_host, "memops_unsupported", lambda device: "no driver")
    assert staging.mailbox_for(torch.device("cuda", 0), busy_cpus=physical_cpus()[:1]) is None
    assert staging.handover == "hostfunc" and capsys.readouterr().err == ""  # not asked for by name: no warning


def test_unsupported_memops_fall_back_to_host_functions_with_one_message(monkeypatch, capsys):
    staging = HostStaging(max_tokens=2, hidden=8, top_k=2, handover="memops")
    probes = []
    monkeypatch.setattr(hybrid.cuda_host, "memops_unsupported", lambda device: probes.append(device) or "no driver")
    gpu = torch.device("cuda", 0)
    assert staging.mailbox_for(gpu) is None and staging.mailbox_for(gpu) is None
    assert staging.handover == "hostfunc" and staging.mailbox is None and len(probes) == 1
    err = capsys.readouterr().err
    assert err.count("stream memory operations unavailable (no driver); using host functions") == 1


# ---------------------------------------------------------------- HybridExperts on CPU inputs

@pytest.fixture(scope="module")
def pair(tiny_v3):
    """The same tiny model twice, its experts on one set of CPU engines: host functions' stand-in
    (the calling thread calls submit/wait) and the memops stand-in (the calling thread rings)."""
    plain = _round_experts_to_bf16(load_model(tiny_v3, dtype="float32"))
    attach(plain, fmt="bf16", threads=2, max_tokens=16, handover="hostfunc")  # one scratch size for both
    rung = _round_experts_to_bf16(load_model(tiny_v3, dtype="float32"))
    staging = HostStaging(max_tokens=16, hidden=rung.cfg.hidden_size, top_k=rung.cfg.num_experts_per_tok,
                          handover="memops")
    for a, b in zip(plain.model.layers, rung.model.layers):
        if isinstance(a.mlp, MoE):
            b.mlp.experts = HybridExperts(a.mlp.experts.engine, staging)
    return plain, rung, staging


def test_memops_stand_in_equals_the_host_function_path_exactly(pair):
    plain, rung, staging = pair
    moes = [(a.mlp, b.mlp) for a, b in zip(plain.model.layers, rung.model.layers) if isinstance(a.mlp, MoE)]
    gen = torch.Generator().manual_seed(0)
    launches = 0
    for i in range(60):  # token counts 1..5 and one 40-token batch in 16-token chunks
        T = 40 if i == 30 else 1 + i % 5
        x = torch.randn(1, T, plain.cfg.hidden_size, generator=gen)
        for want_moe, got_moe in moes:
            assert torch.equal(got_moe(x), want_moe(x))
            launches += 3 if T == 40 else 1
    assert staging.mailbox.runs == launches and staging.mailbox.slots[BAD] == 0


def test_memops_stand_in_gives_the_same_tokens(pair):
    plain, rung, _ = pair
    prompt = [0] + [int(t) for t in torch.randint(2, 1000, (11,), generator=torch.Generator().manual_seed(1))]

    def greedy(model, n=8):
        cache = model.new_cache(batch=1, max_len=len(prompt) + n)
        logits, out = model(torch.tensor([prompt]), cache=cache, last_only=True), []
        for i in range(n):
            out.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[out[-1]]]), cache=cache, start_pos=len(prompt) + i, last_only=True)
        return out, logits

    want, want_logits = greedy(plain)
    got, got_logits = greedy(rung)
    assert got == want and torch.equal(got_logits, want_logits)


@pytest.mark.skipif(len(__import__("cpu_experts.numa", fromlist=["x"]).physical_cpus()) < 2,
                    reason="needs a core beside the worker's")
def test_dispatcher_on_a_spare_core_spin_waits_and_gives_the_same_outputs(tiny_v3):
    """One worker: the dispatcher is pinned to the cores the worker leaves free, never yields, and
    runs each job through the long-spinning native wait; outputs equal the host-function path's."""
    from cpu_experts.numa import spare_cpus

    plain = _round_experts_to_bf16(load_model(tiny_v3, dtype="float32"))
    attach(plain, fmt="bf16", threads=1, max_tokens=4, handover="hostfunc")
    rung = _round_experts_to_bf16(load_model(tiny_v3, dtype="float32"))
    staging = HostStaging(max_tokens=4, hidden=rung.cfg.hidden_size, top_k=rung.cfg.num_experts_per_tok,
                          handover="memops")
    moes = []
    for a, b in zip(plain.model.layers, rung.model.layers):
        if isinstance(a.mlp, MoE):
            b.mlp.experts = HybridExperts(a.mlp.experts.engine, staging)
            moes.append((a.mlp, b.mlp))
    pool = moes[0][0].experts.engine.pool
    gen = torch.Generator().manual_seed(2)
    try:
        for i in range(20):
            x = torch.randn(1, 1 + i % 3, plain.cfg.hidden_size, generator=gen)
            for want_moe, got_moe in moes:
                assert torch.equal(got_moe(x), want_moe(x))
        mailbox = staging.mailbox
        spare = spare_cpus(pool.cpus)
        assert mailbox.cpus == spare and os.sched_getaffinity(mailbox._thread.native_id) == set(spare)
        assert mailbox.slots[doorbell.YIELD] == 0 and mailbox.runs == 20 * len(moes)
        waits = mailbox.slots[doorbell.TABLE + 2:doorbell.TABLE + doorbell.ENTRY * int(mailbox.slots[doorbell.COUNT]):
                              doorbell.ENTRY]
        assert set(waits.tolist()) == {pool.wait_job_spin_address}
    finally:
        staging.mailbox.close()


# ---------------------------------------------------------------- on a GPU

_needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture
def on_gpu(pair):
    plain, rung, staging = pair
    for m in (plain, rung):
        m.to("cuda")
    try:
        yield plain, rung, staging
    finally:
        for m in (plain, rung):
            m.to("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memops_probe_passes_on_this_gpu():
    from orchestrator.cuda_host import describe_memops

    assert describe_memops(0)["probe"] == "ok"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memops_gives_the_host_function_logits_on_a_gpu(on_gpu):
    plain, rung, staging = on_gpu
    prompt = torch.tensor([[0] + list(range(5, 40))], device="cuda")  # 36 tokens: 16 + 16 + 4 chunks
    for _ in range(3):
        want = plain(prompt, cache=plain.new_cache(batch=1, max_len=64))
        got = rung(prompt, cache=rung.new_cache(batch=1, max_len=64))
        torch.cuda.synchronize()
        assert staging.handover == "memops" and staging.mailbox_device  # no silent fallback
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memops_graph_replay_equals_eager_and_hostfunc(on_gpu):
    plain, rung, staging = on_gpu
    want_moe, moe = plain.model.layers[1].mlp, rung.model.layers[1].mlp
    gen = torch.Generator(device="cuda").manual_seed(1)
    static_x = torch.randn(1, 1, rung.cfg.hidden_size, device="cuda", generator=gen)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: binds the 1-token job and registers its bell
        for _ in range(2):
            moe(static_x)
    torch.cuda.synchronize()  # the warm-up's launches done before counting from here
    runs = staging.mailbox.runs
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = moe(static_x)
    for _ in range(20):  # replays re-use the baked constants: DONE = 0, bell, wait DONE == 1
        x = torch.randn(1, 1, rung.cfg.hidden_size, device="cuda", generator=gen)
        static_x.copy_(x)
        graph.replay()
        eager = moe(x)
        assert torch.equal(static_out, eager)
        assert torch.equal(eager, want_moe(x))
    torch.cuda.synchronize()
    assert staging.mailbox.runs == runs + 40


def test_prompt_sized_launches_keep_host_functions(tiny_v3):
    """Every (layer, token count) rung through the mailbox keeps a table row for good: only decode
    sizes (<= MEMOPS_MAX_TOKENS) use it, so prompts of any length never fill it."""
    model = load_model(tiny_v3, dtype="float32")
    attach(model, fmt="bf16", threads=2, max_tokens=64, handover="memops")
    moe = next(layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE))
    staging = moe.experts.staging
    for T in (1, 2, hybrid.MEMOPS_MAX_TOKENS, hybrid.MEMOPS_MAX_TOKENS + 1, 40, 64):
        moe(torch.randn(1, T, model.cfg.hidden_size))
    assert staging.mailbox.runs == 3
