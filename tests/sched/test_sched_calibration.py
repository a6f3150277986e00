"""Calibration epochs (sched/latency.py) and what they buy: forecasts that are a function of state.

- Measured/predicted ratios move an EWMA after every op, but predictions change only when an
  epoch publishes them: `period_s` after the last publish, at once on a first measurement or when
  a ratio moved more than `tolerance`; period 0 is the per-op calibration.
- Between epochs a node's cached timeline is the one a fresh build would give, so a run in which
  every forecast rebuilds its timeline, and one in which lemix scores every node (no pruning),
  give the very same records as the normal run.
"""
from __future__ import annotations

import hashlib

import pytest

from lemix.config import load_config
from lemix.experiment import build_tasks, sim_horizon_s, sim_profile
from lemix.sched import timelines
from lemix.sched.latency import LatencyModel, _raw, default_profile
from lemix.sched.policies.lemix import Lemix
from lemix.sim import simulate_policy
from lemix.types import Op, OpKind


def fwd_op(i: int, stage: int = 0) -> Op:
    return Op(i, OpKind.FWD, 0, stage, 0, (), False, 2, 256, 0, 0, 0.0, None, ())


def test_predictions_move_only_at_calibration_epochs():
    prof = default_profile(stages=2)
    lat = LatencyModel(prof, period_s=1.0, tolerance=0.1)
    raw = _raw(prof, OpKind.FWD, 0, 2, 256, 0, 0)
    lat.observe(fwd_op(0), 1.05 * raw, at_s=0.0)        # a first measurement publishes at once
    assert lat.correction(0, OpKind.FWD) == pytest.approx(1.05) and lat.version == 1
    lat.observe(fwd_op(1), 1.00 * raw, at_s=0.4)        # EWMA 1.04: within 10%, no epoch yet
    lat.observe(fwd_op(2), 1.00 * raw, at_s=0.8)        # EWMA 1.032
    assert lat.correction(0, OpKind.FWD) == pytest.approx(1.05) and lat.version == 1
    assert lat.predict(OpKind.FWD, 0, 2, 256) == pytest.approx(1.05 * raw)
    lat.observe(fwd_op(3), 1.00 * raw, at_s=1.0)        # a period after the last publish
    assert lat.correction(0, OpKind.FWD) == pytest.approx(1.0256) and lat.version == 2
    lat.observe(fwd_op(4), 3.00 * raw, at_s=1.1)        # EWMA 1.42: off by > 10%, published at once
    assert lat.correction(0, OpKind.FWD) == pytest.approx(0.8 * 1.0256 + 0.6) and lat.version == 3
    lat.observe(fwd_op(5, stage=1), 1.0 * raw, at_s=1.2)   # another stage's first: publishes all
    assert lat.version == 4 and lat.correction(1, OpKind.FWD) == pytest.approx(
        1.0 * raw / _raw(prof, OpKind.FWD, 1, 2, 256, 0, 0))


def test_period_zero_is_the_per_op_ewma():
    prof = default_profile(stages=2)
    lat = LatencyModel(prof, period_s=0.0, alpha=0.2)
    raw = _raw(prof, OpKind.FWD, 0, 2, 256, 0, 0)
    want = None
    for i, f in enumerate((1.3, 0.9, 1.01, 1.02, 0.7)):
        lat.observe(fwd_op(i), f * raw, at_s=0.001 * i)
        want = f if want is None else 0.8 * want + 0.2 * f
        assert lat.correction(0, OpKind.FWD) == pytest.approx(want) and lat.version == i + 1


def run_digest(sets: dict, policy: str = "lemix") -> str:
    cfg = load_config(None, sets)
    result, _ = simulate_policy(cfg.sched_params(policy), sim_profile(cfg), build_tasks(cfg),
                                horizon_s=sim_horizon_s(cfg))
    h = hashlib.sha256()
    for rows in (result.requests, result.train_tasks, result.train_steps, result.ops, result.events):
        h.update(repr(rows).encode())
    assert result.ops   # (the run did something)
    return h.hexdigest()


SCENARIOS = {   # (big enough that timelines are reused: with per-op calibration and no epochs
                #  each of these gave three different runs)
    "predict, epochs": {"cluster.nodes": 16, "cluster.stages": 2, "workload.request_rate": 32,
                        "workload.train_share": 0.5, "workload.duration_s": 10},
    "generate, per-op calibration": {"cluster.nodes": 12, "cluster.stages": 4, "workload.request_rate": 24,
                                     "workload.train_share": 0.5, "workload.duration_s": 8,
                                     "workload.mode": "generate", "policy.calibration_period_s": 0.0},
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_which_nodes_are_forecast_changes_no_result(name, monkeypatch):
    sets = SCENARIOS[name]
    normal = run_digest(sets)
    with monkeypatch.context() as m:   # every forecast builds its node's timeline afresh
        build = timelines.Timelines._timeline

        def fresh(self, node_idx, view):
            self._timelines[view][node_idx] = None
            return build(self, node_idx, view)
        m.setattr(timelines.Timelines, "_timeline", fresh)
        assert run_digest(sets) == normal
    with monkeypatch.context() as m:   # lemix scores every node: no bound, no pruning
        m.setattr(Lemix, "prune", False)
        assert run_digest(sets) == normal
