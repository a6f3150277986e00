"""Issue 10, overload: solo training. On a quiet cluster (no request for chunk_quiet_s, none
present) training is ordered first ready, as on a dedicated training node, instead of
inference-first's backward before admission, so more micro-batches share each optimizer step's
pipeline drain; any request restores inference-first."""
from __future__ import annotations

from sched_factory import check_all, infer, make_params, make_profile, make_tasks, simulate_full, train

from lemix.sched.order import FirstReady, InferenceFirst
from lemix.sched.policies.lemix import Lemix
from lemix.sched.state import Device
from lemix.types import OpKind


def test_a_quiet_cluster_orders_training_first_ready():
    order = Lemix("lemix", make_params()).dispatch_order()
    assert isinstance(order, InferenceFirst) and order.solo_training
    dev = Device(0, 10**9)
    normal = order.classes(dev, 0.0)
    assert normal.inference < normal.backward < normal.forward < normal.admit
    assert order.classes(dev, 0.0, solo=True) == FirstReady().classes(dev, 0.0)
    off = Lemix("lemix", make_params(no_solo_training=True)).dispatch_order()
    assert not off.solo_training
    assert off.classes(dev, 0.0, solo=True) == normal   # the switch: inference-first everywhere
    assert not FirstReady().solo_training


def _run(solo: bool):
    # one 2-stage node (4 layers per stage, 25 ms chunks), overloaded by training: two requests,
    # then a backlog of 24 micro-batches (late binding keeps one at a time waiting on the node);
    # the cluster is quiet from 0.53 s; requests come back at 5 s, while the node trains
    tasks = [infer(0, 0.0, 10), infer(1, 0.01, 10)] + [train(2 + i, 0.02, 100) for i in range(24)]
    tasks += [infer(30 + i, 5.0 + 0.05 * i, 10) for i in range(4)]
    params = make_params(nodes=1, stages=2, microbatches=4, train_chunk_ms=30.0, chunk_quiet_s=0.5,
                         no_solo_training=not solo)
    result, _ = simulate_full(params, tasks, make_profile(2, layers=4))
    check_all(result, tasks)
    train_end = max(r.finish_s for r in result.train_tasks)
    met = sum(r.slo_met for r in result.requests)
    steps = sum(1 for o in result.ops if o.kind is OpKind.OPTIM and o.stage == 0)
    return train_end, met, len(result.requests), steps


def test_solo_training_trains_faster_without_costing_slo():
    end_on, met_on, n_on, steps_on = _run(True)
    end_off, met_off, n_off, steps_off = _run(False)
    assert n_on == n_off == 6
    assert met_on >= met_off >= 3   # the first three meet theirs either way
    # 24 micro-batches x (100 ms fwd + 200 ms bwd) per stage = 7.2 s of work per stage: with the
    # step drains shared by more micro-batches (fewer, larger steps) the backlog ends sooner
    assert steps_on < steps_off
    assert end_on < 0.8 * end_off, (end_on, end_off)
    assert end_on < 7.2 * 1.1


def test_a_cluster_that_is_never_quiet_runs_as_without_it():
    tasks = make_tasks(60, seed=3, train_share=0.5, gap_s=0.02, min_tokens=8, max_tokens=60)
    runs = []
    for off in (False, True):
        params = make_params(nodes=2, stages=2, microbatches=2, chunk_quiet_s=1.0, no_solo_training=off)
        result, _ = simulate_full(params, tasks, make_profile(2, layers=4))
        check_all(result, tasks)
        runs.append([(o.node, o.stage, o.kind, o.task_ids, o.start_s, o.layers) for o in result.ops])
    assert runs[0] == runs[1]
