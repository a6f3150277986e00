"""Liveness of deferred training (issue 10): a deferred training task runs as soon as nothing is
left to protect; an idle cluster never sits on deferred work (the seed-2 engine run kept two
tasks deferred exactly max_defer_s = 30 s after the last request)."""
from __future__ import annotations

import pytest
from sched_factory import MS, check_all, failures, infer, make_params, simulate, train


@pytest.mark.parametrize("late_binding", [True, False])
def test_deferred_training_runs_once_inference_is_done(late_binding):
    # tau_R = 0.01: any queued request counts as congested (the engine's calibrated predictions
    # looked like this), so the training task is deferred while requests are queued
    tasks = [infer(i, 0.0, 20) for i in range(6)] + [train(10, 0.001, 20)]
    params = make_params(nodes=1, stages=2, tau_r=0.01, max_defer_s=30.0, min_train_share=0.0,
                         no_late_binding=not late_binding)
    result = simulate(params, tasks)
    check_all(result, tasks)
    assert failures(result) == []
    (t,) = result.train_tasks
    last_req = max(r.finish_s for r in result.requests)
    assert t.deferred_s > 0                      # it was held back while requests were queued
    # and placed when the requests were done: 2 stages x (20 ms fwd + 40 ms bwd) after them
    assert t.finish_s == pytest.approx(last_req + 2 * 60 * MS, abs=5 * MS)


def test_training_deferred_on_an_idle_cluster_runs_at_once():
    # a probe request alone misses tau_R x SLO (tau_R tiny): Eq. 4 has no inference to protect on
    # an empty node, so the task is placed on arrival instead of waiting max_defer_s
    tasks = [infer(0, 0.0, 5), train(1, 1.0, 20), train(2, 1.001, 20)]
    result = simulate(make_params(nodes=2, stages=2, tau_r=1e-6, max_defer_s=30.0, min_train_share=0.0), tasks)
    check_all(result, tasks)
    for t in result.train_tasks:
        assert t.finish_s - t.arrival_s < 0.5, t
