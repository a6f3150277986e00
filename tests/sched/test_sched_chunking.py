"""Bounded blocking (sched/chunking.py): training forwards and backwards run as chunks of layers.

Properties over random workloads (no device overlap, chunk order, backward chunks in reverse,
every task completes, memory within kappa x capacity with the gate on and released at the
end), the chunk plan's bound, and the case that motivated it: short requests arriving behind a
long training micro-batch miss their SLO without chunks and meet it with them.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sched_factory import (MS, PIPELINES, check_all, check_chunk_order, check_memory_released, failures,
                           finish, infer, make_params, make_profile, make_scheduler, simulate_full, train)

from lemix.clock import SimClock
from lemix.sched.latency import LatencyModel
from lemix.sched.scheduler import Scheduler
from lemix.sim import Simulator
from lemix.types import OpKind

LAYERS = 4
PROPS = settings(max_examples=int(os.environ.get("LEMIX_PROP_EXAMPLES", "120")), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])

task_specs = st.lists(
    st.tuples(st.booleans(), st.floats(0.0, 0.02), st.integers(1, 40), st.integers(1, 4)),
    min_size=1, max_size=12)
cluster = st.fixed_dictionaries({
    "policy": st.sampled_from(["lemix", "lemix/no-prioritization"]),
    "pipeline": st.sampled_from(PIPELINES),
    "generate": st.booleans(),
    "nodes": st.integers(1, 3),
    "stages": st.integers(1, 3),
    "max_batch": st.integers(1, 3),
    "microbatches": st.integers(1, 3),
    "average_every": st.sampled_from([0, 1, 2]),
    "t_max_s": st.sampled_from([0.0, 0.001, 0.05]),
    "train_chunk_ms": st.sampled_from([1.0, 5.0, 15.0]),
    "adaptive_chunks": st.booleans(),
})


def build_tasks(specs) -> list:
    t, tasks = 0.0, []
    for i, (is_train, gap, tokens, out) in enumerate(specs):
        t += gap
        tasks.append(train(i, t, tokens) if is_train else infer(i, t, tokens, out))
    return tasks


def run_checked(params, tasks, profile):
    """Simulate, checking after every plan that no device holds more than kappa x capacity
    (unless the gate reported running an op over it because nothing could be freed)."""
    clock = SimClock()
    sched = Scheduler(params, profile, clock)
    plan = sched.plan
    worst = []

    def checked_plan():
        out = plan()
        over = any(e.kind.value == "memory_overcommit" for e in sched.result.events)
        for n in sched.nodes:
            for d in n.devices:
                if not over:
                    assert d.used_bytes <= params.kappa * d.capacity_bytes + 1e-9, (n.index, d)
                worst.append(d.used_bytes)
        return out
    sched.plan = checked_plan
    sim = Simulator(sched, clock, LatencyModel(profile, calibrate=False), noise=0.0, seed=params.seed)
    return sim.run(tasks), sched


@PROPS
@given(kw=cluster, specs=task_specs, capacity=st.sampled_from([None, 1300, 1500, 2000]))
def test_chunked_runs_keep_every_invariant(kw, specs, capacity):
    tasks = build_tasks(specs)
    profile = make_profile(kw["stages"], layers=LAYERS,
                           **({} if capacity is None else {"capacity_bytes": capacity}))
    params = make_params(**kw)
    result, sched = run_checked(params, tasks, profile)
    check_all(result, tasks)
    check_chunk_order(result, [LAYERS] * kw["stages"])
    check_memory_released(sched)
    assert sched.idle
    if capacity is None:
        assert failures(result) == []
        assert all(r.finish_s is not None for r in result.train_tasks)
    else:   # the only failures: tasks no device could hold, rejected at admission
        for f in failures(result):
            assert "more than the" in f.error and f.node == -1, f
    assert sum(s.samples for s in result.train_steps) == sum(r.samples for r in result.train_tasks
                                                            if r.finish_s is not None)
    # a chunk is predicted under the bound unless it is a single layer; an op over several
    # chunks (adaptive chunks) starts only while its node serves nothing
    for o in result.ops:
        if not o.layers:
            continue
        if covers_several_chunks(o, result):
            assert kw["adaptive_chunks"], o
            assert not any(r.node == o.node and r.arrival_s <= o.start_s < (r.finish_s or float("inf"))
                           for r in result.requests), o
        elif o.layers[1] - o.layers[0] > 1:
            assert o.predicted_s <= kw["train_chunk_ms"] * MS + 1e-12, o


def covers_several_chunks(o, result) -> bool:
    """A forward op with cuts, or a backward op with a boundary of the forward's chunks inside."""
    if o.kind is OpKind.FWD:
        return bool(o.cuts)
    inner = {c for f in result.ops if f.kind is OpKind.FWD and (f.node, f.batch_id, f.stage) == (o.node, o.batch_id,
                                                                                                 o.stage)
             for c in (*f.layers, *f.cuts)}
    return any(o.layers[0] < c < o.layers[1] for c in inner)


def test_a_long_training_op_is_cut_into_chunks_in_order():
    # 100-token micro-batch: 100 ms forward, 200 ms backward per stage; 4 layers per stage
    params = make_params(nodes=1, stages=2, train_chunk_ms=60.0)
    result, sched = simulate_full(params, [train(0, 0.0, 100)], make_profile(2, layers=LAYERS))
    check_all(result, [train(0, 0.0, 100)])
    check_chunk_order(result, [LAYERS, LAYERS])
    fwd = [(o.stage, o.layers) for o in result.ops if o.kind is OpKind.FWD]
    bwd = [(o.stage, o.layers) for o in result.ops if o.kind is OpKind.BWD]
    # backward of one layer = 50 ms <= 60 ms; two layers = 100 ms: one layer per chunk
    assert fwd == [(0, (0, 1)), (0, (1, 2)), (0, (2, 3)), (0, (3, 4)),
                   (1, (0, 1)), (1, (1, 2)), (1, (2, 3)), (1, (3, 4))]
    assert bwd == [(1, (3, 4)), (1, (2, 3)), (1, (1, 2)), (1, (0, 1)),
                   (0, (3, 4)), (0, (2, 3)), (0, (1, 2)), (0, (0, 1))]
    for o in result.ops:
        if o.kind is OpKind.FWD:
            assert o.predicted_s == pytest.approx(25 * MS)
        if o.kind is OpKind.BWD:
            assert o.predicted_s == pytest.approx(50 * MS)
    assert result.train_tasks[0].finish_s == pytest.approx(0.6)   # 8 x 25 ms + 8 x 50 ms
    check_memory_released(sched)


def test_chunk_stash_follows_the_chunks():
    # 10 B/token of activations per stage: a 100-token micro-batch stashes 1000 B per stage,
    # 250 B per chunk of one of the four layers
    params = make_params(nodes=1, stages=1, train_chunk_ms=60.0)
    sched, clock = make_scheduler(params, make_profile(1, layers=LAYERS))
    sched.on_arrival(train(0, 0.0, 100))
    dev = sched.nodes[0].devices[0]
    held = []
    for _ in range(8):
        ops = sched.plan().ops
        assert len(ops) == 1 and ops[0].kind in (OpKind.FWD, OpKind.BWD)
        held.append(dev.held_bytes)
        start = clock.now()
        clock.advance_to(start + ops[0].predicted_s)
        finish(sched, ops[0], start, clock.now())
        held.append(dev.held_bytes)
    # forward chunks add 250 B each at their start; backward chunks free 250 B each at their end
    assert held == [250, 250, 500, 500, 750, 750, 1000, 1000, 1000, 750, 750, 500, 500, 250, 250, 0]


def test_plan_bound_from_the_tightest_slo():
    # fwd 1 ms/token, bwd 2 ms/token per stage, 8 layers; SLO = 5 x unloaded (2 stages)
    params = make_params(nodes=1, stages=2)
    profile = make_profile(2, layers=8)
    sched, _ = make_scheduler(params, profile)
    ch = sched.chunker
    assert ch.enabled
    for i in range(80):   # requests of 40..119 tokens: SLO 400..1190 ms; the 10th percentile: 480 ms
        sched.on_arrival(infer(i, 0.0, 40 + i))
    assert ch.target_s() == pytest.approx(0.25 * 5 * 2 * 48 * MS)
    # a 200-token micro-batch: backward 400 ms per stage = 50 ms per layer; 120 ms bound: 2 layers
    plan = ch.plan(1, 200)
    assert plan == ((0, 2, 4, 6, 8), (0, 2, 4, 6, 8))
    # nothing to cut when the whole op fits; the baselines never cut
    assert ch.plan(1, 20) == ()
    assert not make_scheduler(make_params(policy="naivemix"), profile)[0].chunker.enabled
    assert not make_scheduler(make_params(no_chunking=True), profile)[0].chunker.enabled


def test_requests_behind_a_long_training_op_meet_their_slo_with_chunks():
    """A 300-token micro-batch is 300 ms forward / 600 ms backward per stage; requests of 10
    tokens take 20 ms alone, SLO 100 ms. Without chunks a request arriving behind the backward
    waits up to 600 ms; with chunks (16 layers per stage: one layer = 37.5 ms backward) at most
    a chunk per stage."""
    profile = make_profile(2, layers=16)
    tasks = [train(0, 0.0, 300), train(1, 0.4, 300)]
    tasks += [infer(10 + i, 0.005 + 0.037 * i, 10) for i in range(80)]
    got = {}
    for policy in ("lemix", "lemix/no-chunking"):
        result, _ = simulate_full(make_params(policy=policy, nodes=1, stages=2), tasks, profile)
        check_all(result, tasks)
        assert failures(result) == []
        reqs = result.requests
        got[policy] = sum(r.slo_met for r in reqs) / len(reqs)
    assert got["lemix"] == 1.0
    assert got["lemix/no-chunking"] < 0.9   # the same workload misses without chunks
