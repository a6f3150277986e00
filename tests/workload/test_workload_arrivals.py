import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lemix.workload import gamma_arrivals, poisson_arrivals


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_poisson_count_and_gaps_match_rate():
    t = poisson_arrivals(5.0, 2000.0, rng(1))
    expected = 5.0 * 2000.0
    assert abs(len(t) - expected) < 5 * math.sqrt(expected)
    gaps = np.diff(t)
    assert abs(gaps.mean() - 0.2) < 0.01
    assert abs(gaps.var() / gaps.mean() ** 2 - 1.0) < 0.06  # exponential gaps: CV^2 = 1


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_mean_and_cv(burstiness):
    t = gamma_arrivals(10.0, burstiness, 5000.0, rng(2))
    gaps = np.diff(t)
    assert abs(gaps.mean() - 0.1) < 0.1 * 0.05
    cv2 = gaps.var() / gaps.mean() ** 2
    assert abs(cv2 - burstiness) < 0.1 * burstiness


def test_gamma_burstiness_one_is_poisson_like():
    counts_g = [len(gamma_arrivals(3.0, 1.0, 100.0, rng(s))) for s in range(200)]
    counts_p = [len(poisson_arrivals(3.0, 100.0, rng(s))) for s in range(200)]
    for counts in (counts_g, counts_p):
        assert abs(np.mean(counts) - 300) < 5
        assert abs(np.var(counts) / 300 - 1.0) < 0.3  # Poisson counts: variance = mean


def test_bursty_counts_are_overdispersed():
    counts = [len(gamma_arrivals(3.0, 8.0, 100.0, rng(s))) for s in range(200)]
    assert np.var(counts) / np.mean(counts) > 3.0


def test_deterministic_for_a_seed():
    np.testing.assert_array_equal(poisson_arrivals(2.0, 50.0, rng(7)), poisson_arrivals(2.0, 50.0, rng(7)))
    np.testing.assert_array_equal(gamma_arrivals(2.0, 3.0, 50.0, rng(7)), gamma_arrivals(2.0, 3.0, 50.0, rng(7)))
    assert not np.array_equal(poisson_arrivals(2.0, 50.0, rng(7)), poisson_arrivals(2.0, 50.0, rng(8)))


def test_zero_rate_or_duration_is_empty():
    assert len(poisson_arrivals(0.0, 10.0, rng())) == 0
    assert len(poisson_arrivals(3.0, 0.0, rng())) == 0
    assert len(gamma_arrivals(0.0, 2.0, 10.0, rng())) == 0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: poisson_arrivals(-1.0, 10.0, rng()), "rate_per_s must be >= 0"),
        (lambda: poisson_arrivals(1.0, -10.0, rng()), "duration_s must be >= 0"),
        (lambda: poisson_arrivals(float("nan"), 10.0, rng()), "rate_per_s must be finite"),
        (lambda: poisson_arrivals(1.0, float("inf"), rng()), "duration_s must be finite"),
        (lambda: poisson_arrivals("fast", 10.0, rng()), "rate_per_s must be a number"),
        (lambda: poisson_arrivals(1e6, 1e6, rng()), "check the units"),
        (lambda: poisson_arrivals(1.0, 10.0, 42), "numpy.random.Generator"),
        (lambda: gamma_arrivals(1.0, 0.0, 10.0, rng()), "burstiness"),
        (lambda: gamma_arrivals(1.0, -2.0, 10.0, rng()), "burstiness"),
    ],
)
def test_invalid_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@settings(max_examples=60, deadline=None)
@given(
    rate=st.floats(0.0, 50.0),
    duration=st.floats(0.0, 100.0),
    burstiness=st.floats(0.05, 20.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_arrivals_sorted_and_in_range(rate, duration, burstiness, seed):
    for t in (poisson_arrivals(rate, duration, rng(seed)),
              gamma_arrivals(rate, burstiness, duration, rng(seed))):
        assert t.dtype == np.float64
        assert np.all(np.diff(t) >= 0)
        assert np.all(t >= 0) and np.all(t < duration)


def test_poisson_stays_below_duration_at_float_edge():
    # Tiny durations make rounding up to `duration` plausible; the interval stays half-open.
    t = poisson_arrivals(1e7, 1e-1, rng(3))
    assert len(t) and t.max() < 1e-1
