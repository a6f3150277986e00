"""The run invariants used by the property tests catch hand-built violations (so they are not
vacuous) and accept a hand-built correct run."""
from __future__ import annotations

import pytest
from sched_factory import (check_accounted_once, check_all, check_no_device_overlap,
                           check_no_update_under_pending_backward, check_stage_order, infer, train)

from lemix.types import OpKind, OpRecord, RequestRecord, RunResult, TrainTaskRecord

F, B, O, S = OpKind.FWD, OpKind.BWD, OpKind.OPTIM, OpKind.SYNC


def op(stage, kind, start, end, bid=0, train=True, node=0, tids=(0,)):
    return OpRecord(node, stage, kind, start, end, bid if kind not in (O, S) else -1, tids, train)


def good_train_ops():
    # one micro-batch through 2 stages, then both stages step
    return [op(0, F, 0, 1), op(1, F, 1, 2), op(1, B, 2, 4), op(0, B, 4, 6),
            op(1, O, 4, 5, tids=()), op(0, O, 6, 7, tids=())]


def run_of(ops, requests=(), train_tasks=()):
    return RunResult("t", list(requests), list(ops), list(train_tasks), nodes=1, stages=2)


def test_a_correct_hand_built_run_passes():
    tasks = [train(0)]
    rec = TrainTaskRecord(0, 0.0, 0, 6.0, 1, 10)
    check_all(run_of(good_train_ops(), train_tasks=[rec]), tasks)


def test_overlap_on_one_device_is_caught():
    with pytest.raises(AssertionError, match="overlaps"):
        check_no_device_overlap(run_of([op(0, F, 0, 2), op(0, F, 1, 3, bid=1)]))
    check_no_device_overlap(run_of([op(0, F, 0, 2), op(0, F, 2, 3, bid=1), op(0, F, 1, 3, node=1)]))


@pytest.mark.parametrize("ops", [
    [op(0, F, 0, 2), op(1, F, 1, 3)],                                   # s+1 before s ended
    [op(1, F, 0, 1)],                                                   # s+1 without s
    [op(0, F, 0, 1), op(1, F, 1, 2), op(1, B, 1.5, 3)],                 # bwd before last fwd
    [op(0, F, 0, 1), op(1, F, 1, 2), op(1, B, 2, 4), op(0, B, 3, 5)],   # bwd(s) before bwd(s+1) ended
    [op(0, F, 0, 1), op(1, F, 1, 2), op(0, B, 2, 4)],                   # bwd(0) without bwd(1)
])
def test_stage_order_violations_are_caught(ops):
    with pytest.raises(AssertionError):
        check_stage_order(run_of(ops))


@pytest.mark.parametrize("kind", [O, S])
def test_weight_update_under_a_pending_backward_is_caught(kind):
    ops = good_train_ops()[:4] + [op(0, kind, 2, 3, tids=())]          # stage 0 stashed over [0, 6]
    with pytest.raises(AssertionError, match="stashed activations"):
        check_no_update_under_pending_backward(run_of(ops))
    # a dropped (failed) micro-batch leaves nothing pending
    ops = [op(0, F, 0, 1), op(0, kind, 2, 3, tids=())]
    failed = TrainTaskRecord(0, 0.0, 0, None, 1, 10, failed=True, error="oom")
    check_no_update_under_pending_backward(run_of(ops, train_tasks=[failed]))


def test_accounting_catches_lost_and_duplicate_tasks():
    tasks = [infer(0), train(1)]
    ok_req = RequestRecord(0, 0.0, 0, 10, 0, 1.0, 1.0, 5.0, False)
    ok_task = TrainTaskRecord(1, 0.0, 0, 2.0, 1, 10)
    check_accounted_once(run_of([], [ok_req], [ok_task]), tasks)
    with pytest.raises(AssertionError, match="lost or recorded twice"):
        check_accounted_once(run_of([], [ok_req], []), tasks)
    with pytest.raises(AssertionError, match="lost or recorded twice"):
        check_accounted_once(run_of([], [ok_req, ok_req], [ok_task]), tasks)
    silent = RequestRecord(0, 0.0, 0, 10, 0, None, None, 5.0, True)   # failed without a reason
    with pytest.raises(AssertionError):
        check_accounted_once(run_of([], [silent], [ok_task]), tasks)
