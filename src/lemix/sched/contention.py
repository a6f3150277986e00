"""Host contention (issue 10, wall-clock engine on CPUs): devices that share a host's cores slow
each other down, and the scheduler learns by how much.

On the real engine the stage workers of every node are threads of one process: on a 2-core
machine, 2 x 2 device threads share 2 cores. An op running while two other devices are busy
took 1.6-2.3x its predicted time (an inference forward predicted at 6 ms took 18), while one other
busy device cost little. The per-(stage, op) calibration (latency.py) only sees the average, and
lemix's misses were short requests slowed by training running on *other* devices.

`HostContention` learns, from every finished inference op, the geometric mean of measured /
predicted time as a function of how many other devices of the host were busy during it (the
time-averaged count, rounded), relative to when none was (or the fewest seen, on a host never
quiet). `training_slots` is the most other busy
devices an inference op tolerates before that factor exceeds `slowdown`; the host gate
(`allows_training`) starts a training forward or backward only while fewer of them than that
run on the host (at least one always may; optimizer steps, short, are not held), so a request finds a core when it comes. On GPUs (or a host with
cores to spare) the learned factors stay ~1 and the gate never binds; a bucket with fewer than
`min_obs` observations counts as no slowdown, so the gate starts open and closes only on
evidence. Learned factors do not decay: a bucket the gate keeps empty keeps its last value.

All devices of the cluster count as one host (the local engine); on hosts that do not share
cores the learned factors stay flat, so the assumption costs nothing there.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Iterable

from lemix.types import Op, OpKind


class HostContention:
    def __init__(self, devices: int, *, slowdown: float = 1.5, alpha: float = 0.1, min_obs: int = 5,
                 history: int = 64) -> None:
        if devices < 1:
            raise ValueError(f"a host needs at least one device, got {devices}")
        if slowdown <= 1.0:
            raise ValueError(f"host slowdown threshold must be > 1, got {slowdown}")
        self.devices = devices
        self.slowdown = slowdown
        self.alpha = alpha
        self.min_obs = min_obs
        self._log = [0.0] * devices       # EWMA of log(measured / predicted), by other busy devices
        self._n = [0] * devices           # observations per bucket
        self._done: deque[tuple[float, float, tuple[int, int]]] = deque(maxlen=history)
        self.slots = devices              # cached training_slots (recomputed on each observation)

    # ------------------------------------------------------------------ learning
    def others_busy(self, start_s: float, end_s: float, device: tuple[int, int],
                    running: Iterable[tuple[tuple[int, int], float]]) -> float:
        """Time-averaged count of other devices busy during [start_s, end_s]: ops that ended
        recently, and ops still running (`running`: (device, start_s); they run until end_s)."""
        dur = end_s - start_s
        if dur <= 0:
            return 0.0
        busy = 0.0
        for s, e, dev in self._done:
            if dev != device and e > start_s and s < end_s:
                busy += min(e, end_s) - max(s, start_s)
        for dev, s in running:
            if dev != device and s < end_s:
                busy += end_s - max(s, start_s)
        return busy / dur

    def observe(self, op: Op, start_s: float, end_s: float,
                running: Iterable[tuple[tuple[int, int], float]]) -> None:
        """A finished op (measured start/end); `running` are the host's other ops in flight."""
        device = (op.node, op.stage)
        if end_s <= start_s:
            return
        if not op.train and op.predicted_s > 0 and (op.kind is OpKind.FWD or op.kind is OpKind.DECODE):
            k = min(self.devices - 1, int(round(self.others_busy(start_s, end_s, device, running))))
            x = math.log((end_s - start_s) / op.predicted_s)
            n = self._n[k]
            self._log[k] = x if n == 0 else (1 - self.alpha) * self._log[k] + self.alpha * x
            self._n[k] = n + 1
            self.slots = self._training_slots()
        self._done.append((start_s, end_s, device))

    # ------------------------------------------------------------------ what it learned
    def _base(self) -> int:
        """The fewest other busy devices with enough observations: what slowdowns are relative
        to (0 unless the host is never quiet)."""
        for k in range(self.devices):
            if self._n[k] >= self.min_obs:
                return k
        return self.devices

    def factor(self, others: int) -> float:
        """Learned slowdown of an inference op with `others` other busy devices, relative to the
        fewest others observed (1.0 at or below that, or without enough observations)."""
        base = self._base()
        if others <= base or others >= self.devices or self._n[others] < self.min_obs:
            return 1.0
        return math.exp(self._log[others] - self._log[base])

    def _training_slots(self) -> int:
        for k in range(1, self.devices):
            if self.factor(k) > self.slowdown:
                return max(1, k - 1)
        return self.devices

    def training_slots(self) -> int:
        """Training ops the host may run at once: the most other busy devices an inference op
        tolerates within `slowdown` (at least 1)."""
        return self.slots

    def allows_training(self, training_running: int) -> bool:
        return training_running < self.slots

    def summary(self) -> dict:
        """For the run's summary: the learned factors and the training slots."""
        return {"host_slowdown": {str(k): round(self.factor(k), 3) for k in range(1, self.devices)
                                  if self._n[k] >= self.min_obs},
                "host_training_slots": self.slots}
