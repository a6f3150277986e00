"""How the served model follows a drifting workload: served loss over time and adaptation lag.

Definitions (requests ordered by arrival; only those with a finite inference loss count):

- served loss at a request = the mean inference loss of the `window` requests ending with it;
- level before a shift at s = the mean loss of the last `window` requests that arrived before s;
- adaptation lag of a shift at s = (arrival of the first request r after s whose served loss,
  over a window of requests that all arrived after s, is within `tolerance` of the level before
  s) - s. A shift the loss never recovers from before the next shift (or the run's end) has no
  lag (None: not recovered); a shift with fewer than `window` requests before it is skipped.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lemix.types import RequestRecord


@dataclass(frozen=True)
class ShiftLag:
    shift_s: float
    level_before: float          # served loss just before the shift
    peak_after: float            # highest served loss after it (windows of post-shift requests)
    lag_s: float | None          # None: not back within tolerance before the next shift


def _losses(requests: Sequence[RequestRecord]) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted((r.arrival_s, r.inference_loss) for r in requests
                 if r.inference_loss is not None and math.isfinite(r.inference_loss))
    if not pts:
        return np.zeros(0), np.zeros(0)
    t, loss = np.array(pts, dtype=float).T
    return t, loss


def served_loss_curve(requests: Sequence[RequestRecord], window: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(arrival times, trailing mean loss over `window` requests); the first window-1 are partial."""
    t, loss = _losses(requests)
    if not len(t):
        return t, loss
    c = np.cumsum(np.insert(loss, 0, 0.0))
    idx = np.arange(1, len(loss) + 1)
    lo = np.maximum(0, idx - window)
    return t, (c[idx] - c[lo]) / (idx - lo)


def adaptation_lags(requests: Sequence[RequestRecord], shifts_s: Sequence[float], *, window: int = 20,
                    tolerance: float = 0.05) -> list[ShiftLag]:
    """One ShiftLag per shift that has `window` requests before it (see the module docstring)."""
    t, loss = _losses(requests)
    bounds = list(shifts_s) + [math.inf]
    out = []
    for s, nxt in zip(bounds, bounds[1:]):
        before = loss[t < s]
        if len(before) < window:
            continue
        level = float(before[-window:].mean())
        post_t, post = t[(t >= s) & (t < nxt)], loss[(t >= s) & (t < nxt)]
        if len(post) < window:
            out.append(ShiftLag(float(s), level, float(post.mean()) if len(post) else math.nan, None))
            continue
        c = np.cumsum(np.insert(post, 0, 0.0))
        means = (c[window:] - c[:-window]) / window      # windows ending at post[window-1:]
        ok = np.nonzero(means <= level * (1.0 + tolerance))[0]
        lag = float(post_t[ok[0] + window - 1] - s) if len(ok) else None
        out.append(ShiftLag(float(s), level, float(means.max()), lag))
    return out


def adaptation_summary(requests: Sequence[RequestRecord], shifts_s: Sequence[float], *,
                       window: int = 20, tolerance: float = 0.05) -> dict:
    """Summary fields: mean lag over recovered shifts, how many shifts never recovered, and the
    mean jump of served loss after a shift (peak / level before)."""
    lags = adaptation_lags(requests, shifts_s, window=window, tolerance=tolerance)
    done = [x.lag_s for x in lags if x.lag_s is not None]
    jumps = [x.peak_after / x.level_before for x in lags if x.level_before > 0 and math.isfinite(x.peak_after)]
    return {
        "adaptation_lag_s_mean": float(np.mean(done)) if done else None,
        "adaptation_unrecovered": sum(1 for x in lags if x.lag_s is None),
        "adaptation_shifts": len(lags),
        "drift_loss_jump_mean": float(np.mean(jumps)) if jumps else None,
    }
