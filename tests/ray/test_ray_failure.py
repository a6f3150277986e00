"""A stage actor killed mid-run: its node is taken out, its tasks re-queued, the node restarted
from a healthy peer's weights; every request and every training task still completes."""
from __future__ import annotations

import pytest

from ray_factories import make_engine, run_cfg
from lemix.api import engine_tasks
from lemix.engine.ray_backend import RayBackend
from lemix.metrics import summarize

pytestmark = pytest.mark.ray


def test_killed_actor_loses_no_task_and_its_node_comes_back(ray_cluster):
    cfg = run_cfg(**{"workload.mode": "generate", "workload.duration_s": 4.0, "workload.request_rate": 3.0})
    tasks = engine_tasks(cfg)
    backend = RayBackend()
    engine = make_engine(cfg, backend)
    victim = backend.actor(0, 0)
    arrived = []

    def kill_after_a_few(n: int) -> None:
        arrived.append(n)
        if sum(arrived) >= 6 and victim is backend.actor(0, 0):
            ray_cluster.kill(victim, no_restart=True)

    result = engine.run(tasks, progress=kill_after_a_few)
    s = summarize(result)
    assert s["failed"] == s["train_failed"] == 0, [e for e in result.events if e.kind.value == "task_failed"][:3]
    assert s["completed"] + s["train_completed"] == len(tasks)
    # every task resolved exactly once (re-queued ones are not counted twice)
    ids = [r.task_id for r in result.requests] + [t.task_id for t in result.train_tasks]
    assert sorted(ids) == sorted(t.task_id for t in tasks)
    events = [e.kind.value for e in result.events if e.node == 0]
    assert "node_failed" in events and "node_restored" in events
    failed = next(e for e in result.events if e.kind.value == "node_failed")
    assert "ActorDiedError" in failed.error or "lost" in failed.error
    assert result.extras["node_failures"] == 1 and result.extras["node_restores"] == 1
    assert [p["incarnation"] for p in result.extras["placement"]] == [1, 0]
    assert engine.generated and all(engine.generated.values())


def test_actor_killed_mid_backward_retrains_the_micro_batch(ray_cluster):
    """Kill stage 0's actor right after a Backward was sent to it: the micro-batch's gradients
    die with the node, its task is trained again elsewhere, and the run completes."""
    from lemix.engine.messages import Backward

    cfg = run_cfg(**{"workload.duration_s": 3.0, "workload.request_rate": 1.2, "workload.train_share": 0.8})
    tasks = engine_tasks(cfg)
    backend = RayBackend()
    engine = make_engine(cfg, backend, policy="naivemix")
    victim = backend.actor(0, 0)
    submit = backend.submit
    killed = []

    def submit_and_kill(node, stage, cmd, tag):
        submit(node, stage, cmd, tag)
        if isinstance(cmd, Backward) and node == 0 and stage == 0 and not killed:
            killed.append(cmd.batch_id)
            ray_cluster.kill(victim, no_restart=True)

    backend.submit = submit_and_kill
    result = engine.run(tasks)
    assert killed, "no backward reached node 0"
    s = summarize(result)
    assert s["failed"] == s["train_failed"] == 0, [e for e in result.events if e.kind.value == "task_failed"][:3]
    done = sorted(t.task_id for t in result.train_tasks if not t.failed)
    assert done == sorted(t.task_id for t in tasks if t.is_train)
    failed = next(e for e in result.events if e.kind.value == "node_failed")
    assert failed.node == 0 and failed.task_ids   # the killed node's tasks were offered again
