"""The virtual-clock engine on Ray actors: the same schedule and the same numbers as local threads."""
from __future__ import annotations

import pytest
from ray_factories import run_cfg

from lemix.api import run_engine
from lemix.metrics import summarize
from lemix.types import OpKind

pytestmark = pytest.mark.ray

WALL_FIELDS = {"wall_s", "sched_decision_us_p50", "sched_decision_us_p99", "compute_wall_s", "backend",
               "placement"}


def test_virtual_run_on_ray_equals_the_local_one(ray_cluster):
    cfg = run_cfg(**{"cluster.clock": "virtual", "workload.mode": "generate", "policy.sync_every": 1,
                     "policy.average_every": 1, "policy.microbatches": 1,
                     "model.sim_model": "tiny"})   # a modeled 3B on one stage could not hold its training state
    local = run_engine(cfg)
    cfg.cluster.backend = "ray"
    on_ray = run_engine(cfg)
    for lo, ra in zip(local, on_ray):
        assert ra.extras["backend"] == "ray" and ra.extras["clock"] == "virtual"
        assert [(o.kind, o.node, o.stage, o.start_s, o.end_s) for o in ra.ops] == \
               [(o.kind, o.node, o.stage, o.start_s, o.end_s) for o in lo.ops]
        assert any(o.kind is OpKind.SYNC for o in ra.ops)   # weight copies / merges crossed actors
        s_lo, s_ra = summarize(lo), summarize(ra)
        assert s_ra["failed"] == s_ra["train_failed"] == 0 and s_ra["inference_loss_mean"] is not None
        assert {k: v for k, v in s_ra.items() if k not in WALL_FIELDS} == \
               {k: v for k, v in s_lo.items() if k not in WALL_FIELDS}
