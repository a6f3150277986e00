"""The real engine on the Ray backend: same outcome as the local backend."""
from __future__ import annotations

import pytest

from ray_factories import cpu_profile, make_engine, run_cfg
from lemix.api import engine_tasks, run_engine
from lemix.engine.backends import make_backend
from lemix.metrics import summarize

pytestmark = pytest.mark.ray


def test_short_run_completes_every_task_like_the_local_backend(ray_cluster):
    cfg = run_cfg(**{"workload.mode": "generate"})
    tasks = engine_tasks(cfg)
    profile = cpu_profile(cfg.cluster.stages)
    local = run_engine(cfg, profile=profile, tasks=tasks)
    cfg.cluster.backend = "ray"
    on_ray = run_engine(cfg, profile=profile, tasks=tasks)
    assert [r.policy for r in on_ray] == [r.policy for r in local] == ["lemix", "separate"]
    for lo, ra in zip(local, on_ray):
        s_lo, s_ra = summarize(lo), summarize(ra)
        for key in ("completed", "train_completed", "failed", "train_failed"):
            assert s_ra[key] == s_lo[key], (ra.policy, key)
        assert s_ra["failed"] == s_ra["train_failed"] == 0
        assert s_ra["completed"] + s_ra["train_completed"] == len(tasks)
        assert s_ra["train_steps"] > 0 and s_ra["train_loss_last"] is not None
        assert all(q.inference_loss is not None for q in ra.requests)
        assert ra.extras["backend"] == "ray" and len(ra.extras["placement"]) == cfg.cluster.nodes
        assert ra.extras["node_failures"] == 0 and lo.extras["backend"] == "local"


def test_greedy_generation_gives_the_local_tokens(ray_cluster):
    # one node, two stages: hidden states cross between actors; no training, so every request
    # sees the initial weights; batches of one, so the numbers cannot depend on batch shapes
    cfg = run_cfg(**{"cluster.nodes": 1, "cluster.stages": 2, "workload.mode": "generate",
                     "workload.train_share": 0.0, "workload.request_rate": 4.0, "workload.duration_s": 2.0,
                     "policy.max_batch": 1})
    tasks = engine_tasks(cfg)
    generated = {}
    for name in ("local", "ray"):
        engine = make_engine(cfg, make_backend(name))
        result = engine.run(tasks)
        assert summarize(result)["failed"] == summarize(result)["train_failed"] == 0
        generated[name] = engine.generated
    assert generated["ray"] == generated["local"]
    assert len(generated["ray"]) == len(tasks) and all(generated["ray"].values())
