"""A host-contention model for the simulator (issue 10): the devices share `cores` CPU cores,
as the wall-clock engine's stage threads share this machine's, so the host gate
(sched/contention.py) can be tested deterministically.

An op started while b ops are in flight (itself included) takes max(1, b / cores) x its time,
fixed when it starts (an op already running is not slowed by later ones). Off unless asked for:
a GPU cluster has no such coupling between devices.
"""
from __future__ import annotations

import heapq

from lemix.sim.simulator import Simulator
from lemix.types import Op


class ContendedSimulator(Simulator):
    def __init__(self, *args, cores: int, **kw) -> None:
        if cores < 1:
            raise ValueError(f"host cores must be >= 1, got {cores}")
        super().__init__(*args, **kw)
        self.cores = cores
        self._ends: list[float] = []   # end times of the ops in flight (a min-heap)

    def duration(self, op: Op) -> float:
        t, ends = self.clock.now(), self._ends
        while ends and ends[0] <= t:
            heapq.heappop(ends)
        d = super().duration(op) * max(1.0, (len(ends) + 1) / self.cores)
        heapq.heappush(ends, t + d)
        return d
