"""Issue 10, second round: chunked stages run to the end before another micro-batch's chunks,
unchunked training on a quiet cluster, SLO-aware prefill batching, the backlog floor."""
from __future__ import annotations

from sched_factory import (MS, check_all, check_chunk_order, check_memory_released, infer, make_params,
                           make_profile, simulate_full, train)

from lemix.sched.order import InferenceFirst
from lemix.sched.policies.lemix import Lemix
from lemix.types import OpKind

LAYERS = 4


def _stage_runs(result, kind):
    """Per (node, stage): the batch ids of its training ops of `kind`, consecutive repeats merged."""
    runs: dict[tuple[int, int], list[int]] = {}
    for o in sorted(result.ops, key=lambda o: o.start_s):
        if o.train and o.kind is kind:
            seq = runs.setdefault((o.node, o.stage), [])
            if not seq or seq[-1] != o.batch_id:
                seq.append(o.batch_id)
    return runs


def test_a_stage_finishes_its_micro_batch_before_another_ones_chunks():
    # three micro-batches at once, 4 one-layer chunks per stage: stage 1 receives the second
    # before it finished the first's chunks; re-queued at each chunk's end it went round-robin
    tasks = [train(i, 0.0, 100) for i in range(3)]
    result, sched = simulate_full(make_params(nodes=1, stages=2, train_chunk_ms=60.0, microbatches=4),
                                  tasks, make_profile(2, layers=LAYERS))
    check_all(result, tasks)
    check_chunk_order(result, [LAYERS, LAYERS])
    for kind in (OpKind.FWD, OpKind.BWD):
        for dev, seq in _stage_runs(result, kind).items():
            assert len(seq) == len(set(seq)), (kind, dev, seq)   # each batch's chunks contiguous
    check_memory_released(sched)


def _chunked_after_requests(quiet_s):
    # a request at 0, a training task at 1 s (quiet after 0.5 s) and one at 0.2 s (not quiet);
    # one chunk per op (adaptive chunks would merge some while the node serves nothing)
    tasks = [infer(0, 0.0, 10), train(1, 0.2, 100), train(2, 1.0, 100)]
    result, _ = simulate_full(make_params(nodes=1, stages=2, train_chunk_ms=60.0, chunk_quiet_s=quiet_s,
                                          adaptive_chunks=False),
                              tasks, make_profile(2, layers=LAYERS))
    check_all(result, tasks)
    return {tid: sorted({o.layers for o in result.ops if o.train and o.kind is OpKind.FWD and o.task_ids == (tid,)})
            for tid in (1, 2)}


def test_training_runs_unchunked_once_the_cluster_is_quiet():
    layers = _chunked_after_requests(0.5)
    assert layers[1] == [(0, 1), (1, 2), (2, 3), (3, 4)]   # 0.2 s after a request: chunked
    assert layers[2] == [()]                               # 1 s after the last one: one op per stage
    always = _chunked_after_requests(None)
    assert always[2] == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_training_before_any_request_stays_chunked():
    result, _ = simulate_full(make_params(nodes=1, stages=2, train_chunk_ms=60.0, chunk_quiet_s=0.5),
                              [train(0, 0.0, 100), train(1, 2.0, 100)], make_profile(2, layers=LAYERS))
    assert all(o.layers for o in result.ops if o.train and o.kind is OpKind.FWD)


def test_slo_aware_batching_keeps_a_short_request_out_of_a_long_padded_batch():
    # 2 stages, 1 ms/token/stage: A (10 tokens) alone 20 ms, SLO 100 ms; batched with B
    # (100 tokens) both pay 2 x 100 tokens per stage = 400 ms and A misses. Left out, B starts
    # when A leaves stage 0 and ends at 210 ms, well inside its 1 s SLO.
    tasks = [infer(0, 0.0, 10), infer(1, 0.0, 100)]
    met = {}
    for off in (False, True):
        result, _ = simulate_full(make_params(nodes=1, stages=2, max_batch=8, no_slo_batching=off),
                                  tasks, make_profile(2))
        check_all(result, tasks)
        met[off] = {r.task_id: r.finish_s - r.arrival_s <= r.slo_s for r in result.requests}
        if not off:
            ends = {r.task_id: r.finish_s for r in result.requests}
            assert ends[0] == 20 * MS and abs(ends[1] - 210 * MS) < 1e-9
    assert met[False] == {0: True, 1: True}
    assert met[True] == {0: False, 1: True}


def test_both_backlogged_raises_the_training_floor_to_separations_share():
    order = Lemix("lemix", make_params(nodes=4, train_share=0.8, backlog_floor=True)).dispatch_order()
    assert isinstance(order, InferenceFirst)
    assert order.floor() == 0.1            # no scheduler hook yet: the minimum share
    order.backlogged = lambda: True
    assert order.floor() == 0.75           # separate gives training 3 of 4 nodes at share 0.8
    order.backlogged = lambda: False
    assert order.floor() == 0.1
    off = Lemix("lemix", make_params(nodes=4, train_share=0.8)).dispatch_order()
    off.backlogged = lambda: True
    assert off.floor() == 0.1              # backlog_floor off (the default)
