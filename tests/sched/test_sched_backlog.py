"""--train-backlog (sched/backlog.py): training drawn whenever a node lacks a training task."""
from __future__ import annotations

import pytest
from sched_factory import check_all, check_memory_released, failures, infer, make_params, simulate_full

from lemix.config import load_config
from lemix.sched.backlog import FIRST_ID


@pytest.mark.parametrize("policy", ["lemix", "naivemix", "separate", "separate-dynamic"])
def test_backlog_keeps_training_nodes_busy_until_the_end(policy):
    tasks = [infer(i, 0.01 * i, 10) for i in range(50)]    # 0 .. 0.49 s
    params = make_params(policy=policy, nodes=2, stages=2, train_backlog=True, backlog_batch=2,
                         backlog_tokens=10, backlog_until_s=0.5)
    result, sched = simulate_full(params, tasks)
    drawn = [t for t in result.train_tasks if t.task_id >= FIRST_ID]
    assert drawn and len(drawn) == len(result.train_tasks) == sched.backlog.drawn
    assert all(t.arrival_s < 0.5 for t in drawn)
    assert failures(result) == []
    check_all(result, tasks + [sched.ledger.tasks[t.task_id] for t in drawn])
    check_memory_released(sched)
    # training is not capped by arrivals: 60 ms of work per task and stage (20 tokens x 3 ms), and
    # requests take at most half of a co-located node's time, so a node trains >= 0.5 s / 60 ms / 2
    trainers = 1 if policy.startswith("separate") else 2
    assert len(drawn) >= trainers * 0.5 / 0.06 / 2
    assert {t.node for t in drawn} <= ({1} if policy == "separate" else {0, 1})


def test_backlog_config_arrivals_are_inference_and_separate_splits_half_half():
    cfg = load_config(None, {"workload.train_backlog": True, "workload.duration_s": 5.0})
    from lemix.experiment import build_tasks
    assert not any(t.is_train for t in build_tasks(cfg))
    sp = cfg.sched_params("separate")
    assert sp.train_backlog and sp.train_share == 0.5 and sp.backlog_until_s == 5.0
    assert load_config(None, {"workload.train_backlog": True, "workload.train_share": 0.25}
                       ).sched_params("separate").train_share == 0.25
