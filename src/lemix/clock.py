"""Clocks are injected: the simulator advances a SimClock, the real engine reads a WallClock.

The scheduler never reads the time itself: it uses the clock it is given (and an injected
`timer` to measure its decision time), and the simulated time is the SimClock's alone (the
simulator reads the wall clock only to report how long a run took). Executor-side code (stage
workers timing ops, the server's timestamps and drain timeouts, the profiler) reads the wall
time directly.
"""
from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...


class SimClock:
    """A virtual clock advanced by the event loop; never goes backwards."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._t = start_s

    def now(self) -> float:
        return self._t

    def advance_to(self, t_s: float) -> None:
        if t_s < self._t:
            raise ValueError(f"SimClock cannot go back from {self._t} to {t_s}")
        self._t = t_s


class WallClock:
    """Seconds since construction, over time.monotonic."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._t0
