"""Fitting the latency model (DESIGN section 4) to measured samples.

    t_fwd(C, l)    = a + b*C*l + c*C*l^2      (also bwd)
    t_decode(C, K) = a + b*C + c*K            (K = summed KV length of the batch)
    t_optim        = a

Coefficients come from non-negative least squares on the *relative* residuals: each row of the
design matrix and the target are divided by the measured time, so a 1 ms op mispredicted by
0.5 ms weighs as much as a 100 ms op mispredicted by 50 ms. Plain least squares would let the
largest shapes dominate and leave the small ones (decode, short prompts) badly off.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import nnls

from lemix.sched.latency import OpCoeffs


class ProfileError(ValueError):
    """A profile that cannot be measured, fitted, read or used as asked."""


def _as_arrays(samples, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arr = np.asarray([tuple(s) for s in samples], dtype=float)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] != 3:
        raise ProfileError(f"{what}: need a non-empty list of (x1, x2, seconds) samples")
    x1, x2, t = arr.T
    if not np.all(np.isfinite(arr)) or np.any(t <= 0) or np.any(x1 < 0) or np.any(x2 < 0):
        raise ProfileError(f"{what}: samples must be finite, shapes >= 0 and times > 0")
    return x1, x2, t


def _relative_nnls(design: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, float]:
    """min ||(design @ x - t) / t|| over x >= 0; returns x and the MAPE (fraction) on the samples."""
    rows = design / t[:, None]
    scale = np.abs(rows).max(axis=0)            # equalize columns: C*l^2 can be 1e7 times 1
    scale[scale == 0] = 1.0
    x, _ = nnls(rows / scale, np.ones_like(t))
    x = np.maximum(x / scale, 0.0)
    mape = float(np.mean(np.abs(design @ x - t) / t))
    return x, mape


def fit_fwd(samples: Sequence[tuple[int, int, float]]) -> tuple[OpCoeffs, float]:
    """(C, l, seconds) samples -> coefficients of a + b*C*l + c*C*l^2 and the fit's MAPE."""
    C, l, t = _as_arrays(samples, "fit_fwd")
    design = np.stack([np.ones_like(t), C * l, C * l * l], axis=1)
    (a, b, c), mape = _relative_nnls(design, t)
    return OpCoeffs(float(a), float(b), float(c)), mape


def fit_decode(samples: Sequence[tuple[int, int, float]]) -> tuple[OpCoeffs, float]:
    """(C, K, seconds) samples -> coefficients of a + b*C + c*K and the fit's MAPE."""
    C, K, t = _as_arrays(samples, "fit_decode")
    design = np.stack([np.ones_like(t), C, K], axis=1)
    (a, b, c), mape = _relative_nnls(design, t)
    return OpCoeffs(float(a), float(b), float(c)), mape


def fit_const(samples: Sequence[float | Sequence[float]]) -> tuple[OpCoeffs, float]:
    """Times (or tuples whose last item is the time) -> OpCoeffs(a=median) and the MAPE."""
    t = np.asarray([s[-1] if isinstance(s, (tuple, list)) else s for s in samples], dtype=float)
    if t.size == 0 or not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise ProfileError("fit_const: need a non-empty list of positive times")
    a = float(np.median(t))
    return OpCoeffs(a=a), float(np.mean(np.abs(a - t) / t))
