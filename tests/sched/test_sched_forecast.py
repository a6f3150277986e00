"""Forecast (II, R) on hand-computed timelines, directly and through a hand-clocked Scheduler.

Factory profile: forward 1 ms per token per stage, backward 2 ms; a 10-token task takes 10 ms per
stage forward and 20 ms backward. Times below are in ms and converted with MS.
"""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sched_factory import MS, finish, infer, make_params, make_scheduler, train

from lemix.sched.forecast import NodeTimeline, build_timeline, forecast_chain


def idle(stages: int, now: float = 0.0) -> NodeTimeline:
    return NodeTimeline(stages, now)


# ---------------------------------------------------------------------------- NodeTimeline direct
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_idle_node_ii_is_the_pipeline_fill_bubble(stages):
    t = 10.0
    f = forecast_chain(idle(stages), 0.0, 0.0, [t] * stages, [], False)
    # stage s waits for stages 0..s-1: II = sum_s s * t
    assert f.ii_s == pytest.approx(sum(s * t for s in range(stages)))
    assert f.r_s == pytest.approx(stages * t)
    assert f.stage_s == pytest.approx(t)
    assert f.first_start_s == 0.0


def test_idle_node_unequal_stages():
    f = forecast_chain(idle(3), 0.0, 0.0, [1.0, 2.0, 3.0], [], False)
    # stage 1 starts at 1, stage 2 at 1 + 2 = 3
    assert (f.ii_s, f.r_s) == (pytest.approx(4.0), pytest.approx(6.0))


def test_idle_node_training_task_counts_its_own_forward_as_busy():
    # fwd s0 [0,10], s1 [10,20]; bwd s1 [20,40], s0 [40,60].
    # Idle: stage 1 over [0,10]; stage 0 over [10,40] (between its forward and its backward).
    f = forecast_chain(idle(2), 0.0, 0.0, [10.0, 10.0], [20.0, 20.0], False)
    assert f.ii_s == pytest.approx(40.0)
    assert f.ii_paper_s == pytest.approx(40.0)
    assert f.r_s == pytest.approx(20.0)          # R ends at the last forward
    assert f.stage_s == pytest.approx(15.0)      # mean of its four stage ops


def test_busy_balanced_pipeline_slots_in_with_no_idleness():
    tl = idle(3)
    for _ in range(3):                           # three tasks already queued back to back
        tl.chain([(0, 10.0), (1, 10.0), (2, 10.0)], 0.0, False)
    f = forecast_chain(tl, 0.0, 0.0, [10.0] * 3, [], False)
    assert f.ii_s == pytest.approx(0.0)
    # stage 0 is free at 30, the task ends on stage 2 at 60: R includes the 30 ms wait
    assert f.first_start_s == pytest.approx(30.0)
    assert f.r_s == pytest.approx(60.0)


def test_sunk_idleness_does_not_count_but_paper_counts_from_previous_end():
    tl = idle(2, now=20.0)
    tl.add(1, 0.0, 5.0, False)                   # stage 1 idle since 5: sunk
    f = forecast_chain(tl, 20.0, 20.0, [10.0, 10.0], [], False)
    assert f.ii_s == pytest.approx(10.0)         # stage 1 from now (20) to 30
    assert f.ii_paper_s == pytest.approx(25.0)   # research form: from 5 to 30
    assert f.r_s == pytest.approx(20.0)


def test_far_dependency_long_backward_on_a_later_stage():
    # Stage 1 runs a training backward until 50; stage 0 is free.
    tl = build_timeline(2, 0.0, running=[(1, 0.0, 50.0, True)], chains=[])
    inf = forecast_chain(tl, 0.0, 0.0, [10.0, 10.0], [], False)
    # stage 0 [0,10], stage 1 waits for the backward: [50,60]. The wait is in R, not in II
    # (stage 1 is busy, not idle) -- the research code's R missed this stage dependency.
    assert (inf.ii_s, inf.r_s) == (pytest.approx(0.0), pytest.approx(60.0))
    # A training task: its stage-0 backward waits for its own path through the blocked stage:
    # fwd s0 [0,10], s1 [50,60], bwd s1 [60,80], s0 [80,100] -> stage 0 idles 10..80 upstream.
    tr = forecast_chain(tl, 0.0, 0.0, [10.0, 10.0], [20.0, 20.0], False)
    assert tr.ii_s == pytest.approx(70.0)
    assert tr.r_s == pytest.approx(60.0)
    on_idle = forecast_chain(idle(2), 0.0, 0.0, [10.0, 10.0], [20.0, 20.0], False)
    assert tr.ii_s - on_idle.ii_s == pytest.approx(30.0)   # the extra upstream wait


def test_queued_backward_in_the_way_of_a_later_stage():
    # A queued training micro-batch: fwd s0 [0,10], s1 [10,20], bwd s1 [20,40], bwd s0 [40,60]
    chains = [(0.0, [(0, 10.0), (1, 10.0), (1, 20.0), (0, 20.0)], True)]
    tl = build_timeline(2, 0.0, running=[], chains=chains)
    assert tl.iv == [[(0.0, 10.0, True), (40.0, 60.0, True)], [(10.0, 20.0, True), (20.0, 40.0, True)]]
    f = forecast_chain(tl, 0.0, 0.0, [10.0, 10.0], [], False)
    # stage 0 fits [10,20] before the backward at 40; stage 1 waits for the backward: [40,50]
    assert f.first_start_s == pytest.approx(10.0)
    assert (f.ii_s, f.r_s) == (pytest.approx(0.0), pytest.approx(50.0))


def test_inference_jumps_queued_training_but_not_running_training():
    chains = [(0.0, [(0, 10.0), (1, 10.0), (1, 20.0), (0, 20.0)], True)]
    tl = build_timeline(2, 0.0, running=[], chains=chains)
    behind = forecast_chain(tl, 0.0, 0.0, [10.0, 10.0], [], False)
    jumped = forecast_chain(tl, 0.0, 0.0, [10.0, 10.0], [], True)
    assert behind.r_s == pytest.approx(50.0)
    assert jumped.first_start_s == 0.0 and jumped.r_s == pytest.approx(20.0)
    # a training op that is already running (started before now) is never jumped
    tl = build_timeline(2, 5.0, running=[(0, 0.0, 15.0, True)], chains=[])
    f = forecast_chain(tl, 5.0, 5.0, [10.0, 10.0], [], True)
    assert f.first_start_s == pytest.approx(15.0)
    assert f.r_s == pytest.approx(30.0)          # ends at 35, arrived at 5


def test_build_timeline_clips_overdue_running_ops_to_now():
    # a running op predicted to end at 8 but still running at 12: busy until now at least
    tl = build_timeline(1, 12.0, running=[(0, 0.0, 8.0, False)], chains=[])
    assert tl.iv[0] == [(0.0, 12.0, False)]


# ---------------------------------------------------------------------------- properties
intervals = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 60), st.integers(1, 20)), max_size=8)


@settings(max_examples=200, deadline=None)
@given(stages=st.integers(1, 3), busy=intervals, durs=st.lists(st.integers(1, 15), min_size=3, max_size=3),
       ready=st.integers(0, 40), now=st.integers(0, 40))
def test_chain_respects_stage_order_and_never_overlaps(stages, busy, durs, ready, now):
    tl = NodeTimeline(stages, float(now))
    for s, start, dur in busy:
        if s < stages:
            tl.chain([(s, float(dur))], float(start), False)   # non-overlapping committed ops
    before = [Counter(iv) for iv in tl.iv]
    fwd = [float(d) for d in durs[:stages]]
    f = forecast_chain(tl, float(now), float(ready), fwd, [], False)
    end = tl.chain(list(enumerate(fwd)), max(float(now), float(ready)), False)
    mine = []
    for s in range(stages):
        (new,) = list((Counter(tl.iv[s]) - before[s]).elements())   # the op chain() added
        mine.append(new)
        for other in before[s]:       # no overlap with what was committed
            assert new[1] <= other[0] or new[0] >= other[1]
    for s in range(1, stages):        # stage s never starts before stage s-1 ends
        assert mine[s][0] >= mine[s - 1][1]
    assert mine[0][0] >= max(now, ready)
    # forecast_chain predicts exactly what chain() commits
    assert f.r_s == pytest.approx(end - ready)
    assert f.first_start_s == pytest.approx(mine[0][0])
    assert f.ii_s >= -1e-9


# ---------------------------------------------------------------------------- through a Scheduler
def test_scheduler_forecast_idle_vs_busy_node_by_hand():
    sched, clock = make_scheduler(make_params(policy="naivemix", nodes=2))
    sched.on_arrival(infer(0, 0.0, 10))
    (op0,) = sched.plan().ops
    assert (op0.node, op0.stage, op0.predicted_s) == (0, 0, pytest.approx(10 * MS))
    probe = infer(1, 0.0, 10)
    busy, free = sched.view.forecast(0, probe), sched.view.forecast(1, probe)
    # node 1 idle: the fill bubble (stage 1 waits one stage time); R = 2 stage times
    assert (free.ii_s, free.r_s) == (pytest.approx(10 * MS), pytest.approx(20 * MS))
    # node 0: behind task 0 (stage 0 [0,10], stage 1 [10,20]) -> [10,20], [20,30]: no idleness
    assert (busy.ii_s, busy.r_s) == (pytest.approx(0.0), pytest.approx(30 * MS))

    clock.advance_to(5 * MS)                     # sunk time passes; arrival at 5
    busy = sched.view.forecast(0, infer(1, 5 * MS, 10))
    assert (busy.ii_s, busy.r_s) == (pytest.approx(0.0), pytest.approx(25 * MS))

    clock.advance_to(10 * MS)
    finish(sched, op0, 0.0, 10 * MS)
    (op1,) = sched.plan().ops
    assert (op1.node, op1.stage) == (0, 1)
    # stage 0 free now, stage 1 busy until 20: a training task fwd [10,20], [20,30];
    # bwd s1 [30,50], s0 [50,70]; stage 0 idles 20..50 waiting for its backward.
    f = sched.view.forecast(0, train(2, 10 * MS, 10))
    assert (f.ii_s, f.r_s) == (pytest.approx(30 * MS), pytest.approx(20 * MS))


def test_scheduler_forecast_when_running_op_overruns_its_prediction():
    sched, clock = make_scheduler(make_params(policy="naivemix", nodes=1))
    sched.on_arrival(infer(0, 0.0, 10))
    sched.plan()
    clock.advance_to(15 * MS)                    # predicted end 10, still running at 15
    f = sched.view.forecast(0, infer(1, 15 * MS, 10))
    # stage 0 free from now: [15,25]; stage 1: task 0 [15,25] then ours [25,35]
    assert f.first_start_s == pytest.approx(15 * MS)
    assert (f.ii_s, f.r_s) == (pytest.approx(0.0), pytest.approx(20 * MS))


@pytest.mark.parametrize("policy, r_ms", [("lemix", 25.0), ("lemix/no-prioritization", 55.0)])
def test_scheduler_inference_jumps_queued_training_only_when_inference_first(policy, r_ms):
    sched, clock = make_scheduler(make_params(policy=policy, nodes=1, tau_r=100.0))
    sched.on_arrival(infer(0, 0.0, 10))
    sched.on_arrival(train(1, 0.0, 10))
    (op,) = sched.plan().ops                     # inference first on stage 0; training queued
    assert op.task_ids == (0,) and not op.train
    clock.advance_to(5 * MS)
    f = sched.view.forecast(0, infer(2, 5 * MS, 10))
    # task 0: stage 0 [0,10], stage 1 [10,20]. Queued training: fwd [10,20], [20,30],
    # bwd s1 [30,50], s0 [50,70].
    # lemix (inference first) jumps it: stage 0 [10,20], stage 1 [20,30] -> R = 30 - 5 = 25.
    # FCFS stays behind it: stage 0 [20,30], stage 1 after the backward: [50,60] -> R = 55.
    assert f.r_s == pytest.approx(r_ms * MS)
