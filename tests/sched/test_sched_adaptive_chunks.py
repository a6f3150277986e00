"""Adaptive chunks (sched/chunking.py, `Chunker.span`): while a node serves nothing, a training
op covers as many of its micro-batch's chunks as the tight request arriving then would still
meet its SLO behind; with a request on the node, one chunk per op again. And the optimizer step
that waits for the inference ready on its device (`step_first` off, the default)."""
from __future__ import annotations

import pytest
from sched_factory import (MS, check_all, check_chunk_order, check_memory_released, infer, make_params,
                           make_profile, simulate_full, train)

from lemix.types import OpKind

# 2 nodes x 2 stages x 8 layers, fwd 1 ms/token, bwd 2 ms/token per stage. Ten 40-token requests (80 ms
# alone, SLO 400 ms) set the tight SLO: 400 ms, the chunk bound 0.25 x 400 = 100 ms. A
# 200-token micro-batch: 200 ms forward, 400 ms backward per stage, 25 / 50 ms a layer: chunks
# of 2 layers (a 100 ms backward). Merge budget (the tight request arriving at the op's start
# still meets its SLO): stage 0, 400 - 80 (its forward) - 100 (stage 1 may still run one chunk
# into its way, lookahead slack) = 220 ms; stage 1, 400 - 40 = 360 ms.
LAYERS = 8
REQUESTS = [infer(i, 0.1 * i, 40) for i in range(10)]


def _run(extra=(), nodes=2, n_train=6, **kw):
    # n_train micro-batches at 1 s: with 2 nodes the rest wait for placement (training waits)
    tasks = [*REQUESTS, *[train(50 + i, 1.0, 200) for i in range(n_train)], *extra]
    params = make_params(nodes=nodes, stages=2, **kw)
    result, sched = simulate_full(params, tasks, make_profile(2, layers=LAYERS))
    check_all(result, tasks)
    check_chunk_order(result, [LAYERS, LAYERS])
    check_memory_released(sched)
    return result, sched


def _merged(result):
    """Training ops over several chunks: forwards with cuts, backwards across a chunk boundary."""
    fwd_cuts = {}
    for o in result.ops:
        if o.kind is OpKind.FWD and o.layers:
            fwd_cuts.setdefault((o.node, o.batch_id, o.stage), set()).update((*o.layers, *o.cuts))
    return [o for o in result.ops if o.layers and (o.cuts or (o.kind is OpKind.BWD and any(
        o.layers[0] < c < o.layers[1] for c in fwd_cuts[(o.node, o.batch_id, o.stage)])))]


def test_budget_from_the_tight_request():
    _, sched = _run()
    ch = sched.chunker
    assert ch.target_s() == pytest.approx(100 * MS)
    assert ch.merge_budget_s(0) == pytest.approx(220 * MS)
    assert ch.merge_budget_s(1) == pytest.approx(360 * MS)
    assert sched.chunker.adaptive and not make_params(adaptive_chunks=False).adaptive_chunks


def test_merged_ops_fit_the_budget_and_leave_a_fast_lane():
    result, sched = _run()
    merged = _merged(result)
    assert len(merged) >= 3
    for o in merged:
        assert o.predicted_s <= sched.chunker.merge_budget_s(o.stage) + 1e-12, o
        # another node runs no merged op when it starts (at any time one node keeps the bound)
        assert not any(m.node != o.node and m.start_s < o.start_s < m.end_s for m in merged), o
    # chunks of 2 layers (a 100 ms backward), so a merged op covers 4 layers or more
    assert all(o.layers[1] - o.layers[0] >= 4 for o in merged)


def test_one_chunk_per_op_while_a_request_is_on_the_node():
    result, _ = _run([infer(99, 1.15, 40), infer(98, 1.5, 40)])
    reqs = [r for r in result.requests if r.task_id in (98, 99)]
    assert all(r.slo_met for r in reqs)
    for o in _merged(result):
        assert not any(r.node == o.node and r.arrival_s <= o.start_s < r.finish_s for r in result.requests), o


def test_switched_off_every_op_is_one_chunk():
    result, _ = _run(adaptive_chunks=False)
    assert not _merged(result)
    assert all(o.layers[1] - o.layers[0] == 2 and not o.cuts for o in result.ops if o.layers)


def test_no_merging_without_a_fast_lane_or_waiting_training():
    # one node: no other node to keep the bound for the tightest requests
    assert not _merged(_run(nodes=1, n_train=2)[0])
    # one micro-batch on two nodes: no training waits for the device time a merge would save
    assert not _merged(_run(n_train=1)[0])


def test_no_merging_before_the_first_request():
    # the tight SLO of a 1-token request (10 ms) leaves no budget for a longer op
    result, _ = simulate_full(make_params(nodes=2, stages=2), [train(i, 0.0, 200) for i in range(3)],
                              make_profile(2, layers=LAYERS))
    assert not _merged(result)
    assert len([o for o in result.ops if o.kind is OpKind.FWD]) == 3 * 2 * LAYERS   # one per chunk


def _step_run(step_first: bool):
    # one node, 2 stages, no layers (no chunks), a 100 ms optimizer step. A 10-token micro-batch:
    # backward on stage 0 from 70 to 90 ms (request 1, 30 tokens, goes first at 40 ms); its
    # step is then due on both stages. Request 2 (10 tokens: 20 ms alone, SLO 100 ms) arrives
    # at 85 ms and is ready on stage 0 at 90 ms, when the step is due there.
    profile = make_profile(2, optim_ms=100.0)
    tasks = [train(0, 0.0, 10), infer(1, 0.040, 30), infer(2, 0.085, 10)]
    result, _ = simulate_full(make_params(nodes=1, stages=2, step_first=step_first), tasks, profile)
    check_all(result, tasks)
    return result


def test_a_due_step_waits_for_the_inference_ready_on_its_device():
    after, first = _step_run(False), _step_run(True)
    e2e = lambda r: {q.task_id: (round(q.e2e_s, 9), q.slo_met) for q in r.requests}   # noqa: E731
    assert e2e(after) == {1: (0.06, True), 2: (0.025, True)}
    assert e2e(first) == {1: (0.06, True), 2: (0.125, False)}   # behind the step on stage 0
    steps = sorted((o.stage, round(o.start_s, 9)) for o in after.ops if o.kind is OpKind.OPTIM)
    assert steps == [(0, 0.1), (1, 0.11)]   # each right after request 2 left its stage
