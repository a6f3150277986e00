"""Served loss over time and adaptation lag after a drift shift, on hand-built requests."""
from __future__ import annotations

import pytest

from lemix.metrics.adaptation import adaptation_lags, adaptation_summary, served_loss_curve
from lemix.types import RequestRecord


def req(i: int, t: float, loss: float | None) -> RequestRecord:
    return RequestRecord(i, t, 0, 8, 1, t + 0.1, t + 0.1, 1.0, False, inference_loss=loss)


def series(losses, t0=0.0, dt=1.0, start_id=0):
    return [req(start_id + i, t0 + i * dt, x) for i, x in enumerate(losses)]


def test_served_loss_curve_is_a_trailing_mean():
    t, y = served_loss_curve(series([4.0, 2.0, 3.0, 1.0, None]), window=2)
    assert list(t) == [0.0, 1.0, 2.0, 3.0] and list(y) == [4.0, 3.0, 2.5, 2.0]


def test_lag_is_until_a_post_shift_window_is_back_within_tolerance():
    # level 2.0 before the shift at t=4; after it 3.0, 2.5, 2.2, 2.0, 2.0, 2.0
    reqs = series([2.0] * 4) + series([3.0, 2.5, 2.2, 2.0, 2.0, 2.0], t0=4.0, start_id=4)
    (lag,) = adaptation_lags(reqs, [4.0], window=2, tolerance=0.05)
    assert lag.level_before == 2.0 and lag.peak_after == 2.75
    # windows: (3, 2.5) 2.75, (2.5, 2.2) 2.35, (2.2, 2.0) 2.1 <= 2.1 -> ends at the request of t=7
    assert lag.lag_s == pytest.approx(3.0)
    # tighter: back only when both are 2.0 (window ending at t=8)
    assert adaptation_lags(reqs, [4.0], window=2, tolerance=0.0)[0].lag_s == pytest.approx(4.0)


def test_unrecovered_and_skipped_shifts():
    reqs = series([2.0] * 4) + series([3.0] * 4, t0=4.0, start_id=4) + series([3.0] * 4, t0=8.0, start_id=8)
    lags = adaptation_lags(reqs, [1.0, 4.0, 8.0], window=2)   # 1.0: too few requests before it
    assert [x.shift_s for x in lags] == [4.0, 8.0]
    assert lags[0].lag_s is None          # never back to 2.0 before the next shift
    assert lags[1].lag_s == pytest.approx(1.0)   # level 3.0 before 8.0: the first window is back
    s = adaptation_summary(reqs, [1.0, 4.0, 8.0], window=2)
    assert s["adaptation_unrecovered"] == 1 and s["adaptation_shifts"] == 2
    assert s["adaptation_lag_s_mean"] == pytest.approx(1.0)
    assert s["drift_loss_jump_mean"] == pytest.approx((1.5 + 1.0) / 2)
