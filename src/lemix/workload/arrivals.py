"""Arrival processes: Poisson and Gamma-bursty renewal processes on [0, duration).

Both return a sorted float64 array of arrival times in seconds. Randomness comes only from the
`numpy.random.Generator` passed in, so a seed fixes the result.
"""
from __future__ import annotations

import math

import numpy as np

# Refuse requests whose expected size would exhaust memory; a typo (rate in ms, duration in
# ms) is far more likely than a real need for this many arrivals.
MAX_EXPECTED_ARRIVALS = 50_000_000


def check_finite(name: str, value: float) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return x


def _check_rate_duration(rate_per_s: float, duration_s: float) -> tuple[float, float]:
    rate = check_finite("rate_per_s", rate_per_s)
    duration = check_finite("duration_s", duration_s)
    if rate < 0:
        raise ValueError(f"rate_per_s must be >= 0, got {rate_per_s!r}")
    if duration < 0:
        raise ValueError(f"duration_s must be >= 0, got {duration_s!r}")
    if rate * duration > MAX_EXPECTED_ARRIVALS:
        raise ValueError(
            f"rate_per_s * duration_s = {rate * duration:.3g} expected arrivals exceeds "
            f"{MAX_EXPECTED_ARRIVALS:,}; check the units (seconds)"
        )
    return rate, duration


def _check_rng(rng: np.random.Generator) -> None:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


def _below(duration: float) -> float:
    """The largest float strictly below `duration` (keeps times inside [0, duration))."""
    return float(np.nextafter(duration, -np.inf))


def poisson_arrivals(
    rate_per_s: float, duration_s: float, rng: np.random.Generator
) -> np.ndarray:
    """Homogeneous Poisson arrivals at `rate_per_s` on [0, duration_s), sorted.

    Uses the order-statistics property: given N ~ Poisson(rate * duration) arrivals, their times
    are i.i.d. uniform on the interval. A rate or duration of 0 gives an empty array.
    """
    rate, duration = _check_rate_duration(rate_per_s, duration_s)
    _check_rng(rng)
    if rate == 0.0 or duration == 0.0:
        return np.empty(0, dtype=np.float64)
    n = int(rng.poisson(rate * duration))
    times = np.sort(rng.random(n) * duration)
    # rng.random() < 1, but the product may round up to `duration`; keep the interval half-open.
    return np.minimum(times, _below(duration))


def gamma_arrivals(
    rate_per_s: float, burstiness: float, duration_s: float, rng: np.random.Generator
) -> np.ndarray:
    """Renewal process with Gamma inter-arrival times on [0, duration_s), sorted.

    Inter-arrivals have mean 1/rate_per_s and squared coefficient of variation `burstiness`
    (shape = 1/burstiness, scale = burstiness/rate). burstiness = 1 gives exponential gaps, i.e. a
    Poisson process; > 1 is burstier, < 1 more regular. The process starts at time 0 (the first
    arrival is one inter-arrival after 0).
    """
    rate, duration = _check_rate_duration(rate_per_s, duration_s)
    b = check_finite("burstiness", burstiness)
    if b <= 0:
        raise ValueError(f"burstiness (CV^2 of inter-arrival times) must be > 0, got {burstiness!r}")
    _check_rng(rng)
    if rate == 0.0 or duration == 0.0:
        return np.empty(0, dtype=np.float64)
    shape, scale = 1.0 / b, b / rate

    # Draw gaps in chunks until their running sum passes `duration`.
    expected = rate * duration
    chunk = int(expected + 4.0 * math.sqrt(expected * max(b, 1.0)) + 16)
    pieces: list[np.ndarray] = []
    t_last = 0.0
    while t_last < duration:
        gaps = rng.gamma(shape, scale, size=chunk)
        times = t_last + np.cumsum(gaps)
        pieces.append(times)
        t_last = float(times[-1])
    times = np.concatenate(pieces)
    return times[times < duration]
