"""Capacity search: bisection finds a known threshold; on the simulator it brackets a crossing."""
from __future__ import annotations

import math

import pytest
from sweep_factory import make_cfg

from lemix.config import ConfigError, with_overrides
from lemix.experiment import simulate
from lemix.metrics import summarize
from lemix.sweep import Bound, SweepGrid, bisect_capacity, bisection_evaluations, capacity


@pytest.mark.parametrize("threshold", [2.0, 2.3, 23.7, 47.9])
def test_bisection_finds_a_step_threshold(threshold):
    def attainment(x):    # 100% up to the threshold, 50% above it
        return 1.0 if x <= threshold else 0.5

    x, bound, seen = bisect_capacity(attainment, 2.0, 48.0, 0.9, 0.25)
    assert bound is Bound.FOUND
    assert threshold - 0.25 < x <= threshold
    assert attainment(x) >= 0.9
    assert len(seen) == bisection_evaluations(2.0, 48.0, 0.25) == 2 + math.ceil(math.log2(46 / 0.25))
    assert seen[:2] == [(48.0, 0.5), (2.0, 1.0)]     # hi first, then lo


def test_bisection_on_a_falling_curve():
    # SLO attainment 1 - load/100 crosses 0.9 at load 10
    x, bound, seen = bisect_capacity(lambda x: 1 - x / 100, 1.0, 64.0, 0.9, 0.01)
    assert bound is Bound.FOUND and 9.99 < x <= 10.0
    assert all(b - a > 0 for a, b in zip(sorted(p for p, _ in seen), sorted(p for p, _ in seen)[1:]))


def test_bisection_at_the_range_ends():
    x, bound, seen = bisect_capacity(lambda x: 1.0, 1.0, 64.0, 0.9, 0.5)
    assert (x, bound, len(seen)) == (64.0, Bound.AT_LEAST_HI, 1)
    x, bound, seen = bisect_capacity(lambda x: 0.2, 1.0, 64.0, 0.9, 0.5)
    assert (x, bound, len(seen)) == (None, Bound.BELOW_LO, 2)
    # no requests at all (attainment undefined) is a miss, not a pass
    x, bound, _ = bisect_capacity(lambda x: None if x > 5 else 1.0, 1.0, 64.0, 0.9, 0.5)
    assert bound is Bound.FOUND and 4.5 < x <= 5.0


@pytest.mark.parametrize("lo,hi,tol", [(8, 4, 1), (0, 4, 1), (1, 4, 0), (1, 1, 1)])
def test_bad_range(lo, hi, tol):
    with pytest.raises(ConfigError, match="^--capacity-range"):
        bisect_capacity(lambda x: 1.0, lo, hi, 0.9, tol)


def test_capacity_on_the_simulator_brackets_the_target():
    cfg = make_cfg(policy__names="naivemix", workload__train_share=0.0, workload__duration_s=10.0)
    (row,) = capacity(cfg, SweepGrid(), target=0.9, lo=1.0, hi=128.0, tol=1.0)
    assert row["bound"] == "found" and row["policy"] == "naivemix" and row["load_axis"] == "request_rate"
    x, miss = row["capacity"], row["missed_at"]
    assert 0 < miss - x <= 1.0
    assert row["evaluations"] == bisection_evaluations(1.0, 128.0, 1.0)

    def slo(rate):
        (res,) = simulate(with_overrides(cfg, {"workload.request_rate": rate}))
        return summarize(res)["slo_attainment"]
    assert slo(x) == row["slo_at_capacity"] >= 0.9
    assert slo(miss) < 0.9
    assert row["capacity_load_per_s"] == x
    assert 0.8 * x <= row["capacity_request_rate"] <= 1.2 * x   # requests drawn at rate x


@pytest.mark.parametrize("axis,column", [("request_rates", "request_rate"), ("rates", "rate")])
def test_capacity_per_series_and_policy(axis, column):
    cfg = make_cfg(workload__duration_s=3.0)
    rows = capacity(cfg, SweepGrid.parse(**{axis: "2,4"}, train_shares="0.2,0.5"), target=0.5)
    assert [(r["train_share"], r["policy"]) for r in rows] == [
        (0.2, "lemix"), (0.2, "separate"), (0.5, "lemix"), (0.5, "separate")]
    assert all((r["lo"], r["hi"], r["tol"]) == (0.5, 8.0, 0.08) for r in rows)   # [min/4, 2 max], 1%
    assert all(column not in r and r["load_axis"] == column for r in rows)


def test_target_out_of_range():
    with pytest.raises(ConfigError, match=r"^--target: .* \(0, 1\], got 90"):
        capacity(make_cfg(), SweepGrid(), target=90)
