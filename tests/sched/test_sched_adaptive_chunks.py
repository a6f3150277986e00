"""Adaptive chunks (sched/chunking.py, `Chunker.span`): while a node serves nothing, a training
op covers as many of its micro-batch's chunks as the tight request arriving then would still
meet its SLO behind; with a request on the node, one chunk per op again. And the optimizer step
that waits for the inference ready on its device (`step_first` off, the default)."""
from __future__ import annotations

import pytest
from sched_factory import (MS, check_all, check_chunk_order, check_memory_released, infer, make_params,
                           make_profile, simulate_full, train)

from lemix.types import OpKind

# 2 stages x 8 layers, fwd 1 ms/token, bwd 2 ms/token per stage. Ten 40-token requests (80 ms
# alone, SLO 400 ms) set the tight SLO: 400 ms, the chunk bound 0.25 x 400 = 100 ms. A
# 200-token micro-batch: 200 ms forward, 400 ms backward per stage, 25 / 50 ms a layer: chunks
# of 2 layers (a 100 ms backward). Merge budget (the tight request arriving at the op's start
# still meets its SLO): stage 0, 400 - 80 (its forward) - 100 (stage 1 may still run one chunk
# into its way, lookahead slack) = 220 ms; stage 1, 400 - 40 = 360 ms.
LAYERS = 8
REQUESTS = [infer(i, 0.1 * i, 40) for i in range(10)]


def _run(extra=(), **kw):
    tasks = [*REQUESTS, train(50, 1.0, 200), *extra]
    params = make_params(nodes=1, stages=2, **kw)
    result, sched = simulate_full(params, tasks, make_profile(2, layers=LAYERS))
    check_all(result, tasks)
    check_chunk_order(result, [LAYERS, LAYERS])
    check_memory_released(sched)
    ops = [(o.kind.value, o.stage, round(o.start_s, 6), o.layers, o.cuts) for o in result.ops
           if o.train and o.kind in (OpKind.FWD, OpKind.BWD)]
    return result, sched, ops


def test_budget_from_the_tight_request():
    _, sched, _ = _run()
    ch = sched.chunker
    assert ch.target_s() == pytest.approx(100 * MS)
    assert ch.merge_budget_s(0) == pytest.approx(220 * MS)
    assert ch.merge_budget_s(1) == pytest.approx(360 * MS)
    assert sched.chunker.adaptive and not make_params(adaptive_chunks=False).adaptive_chunks


def test_a_node_serving_nothing_merges_chunks_within_the_budget():
    result, _, ops = _run()
    assert ops == [
        ("fwd", 0, 1.0, (0, 8), (2, 4, 6)),   # 200 ms <= 220: the whole forward as one op
        ("fwd", 1, 1.2, (0, 8), (2, 4, 6)),
        ("bwd", 1, 1.4, (2, 8), ()),          # 3 chunks = 300 ms <= 360; 4 would be 400
        ("bwd", 1, 1.7, (0, 2), ()),
        ("bwd", 0, 1.8, (4, 8), ()),          # 2 chunks = 200 ms <= 220
        ("bwd", 0, 2.0, (0, 4), ()),
    ]
    assert result.train_tasks[0].finish_s == pytest.approx(2.2)   # merged ops cost no more here (a = 0)


def test_one_chunk_per_op_while_a_request_is_on_the_node():
    # a request arrives at 1.15 s, during stage 0's merged forward: stage 1 then runs single
    # chunks while it is on the node, and merges again once it left (1.29 s)
    result, _, ops = _run([infer(99, 1.15, 40)])
    assert ops[:3] == [("fwd", 0, 1.0, (0, 8), (2, 4, 6)),
                       ("fwd", 1, 1.2, (0, 2), ()),
                       ("fwd", 1, 1.29, (2, 8), (4, 6))]
    req = next(r for r in result.requests if r.task_id == 99)
    assert req.slo_met and req.e2e_s == pytest.approx(0.14)   # 50 ms behind the forward, one 50 ms chunk


def test_switched_off_every_op_is_one_chunk():
    result, _, ops = _run(adaptive_chunks=False)
    assert all(o.layers[1] - o.layers[0] == 2 and not o.cuts for o in result.ops if o.layers)
    assert len(ops) == 16


def test_no_merging_before_the_first_request():
    # the tight SLO of a 1-token request (10 ms) leaves no budget for a longer op
    result, _ = simulate_full(make_params(nodes=1, stages=2), [train(0, 0.0, 200)], make_profile(2, layers=LAYERS))
    assert all(not o.cuts for o in result.ops)
    assert len([o for o in result.ops if o.kind is OpKind.FWD]) == 2 * LAYERS


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
