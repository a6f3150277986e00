"""A heap-based discrete-event loop that executes scheduler decisions on N nodes x S stages.

Events are ordered by (time, kind, sequence): at equal times op completions come first (they
free devices), then arrivals, then wake-ups; within a kind, in creation order. All events at one
time are absorbed before the scheduler plans once. Op durations come from the *true* latency
model (the profile), times seeded log-normal noise; the scheduler only sees them afterwards.

An optional `OpExecutor` rides along: it hears every arrival, op start and scheduler output in
event order and may add the outcome of an op (the sequences that stopped) to its result. The
virtual-clock engine (lemix.engine.virtual) is one: it computes every op on real model stages
while this loop decides when each op runs.
"""
from __future__ import annotations

import gc
import heapq
import time
from dataclasses import replace
from typing import Callable, Iterable, Protocol

import numpy as np

from lemix.clock import SimClock
from lemix.sched.latency import LatencyModel, Profile
from lemix.sched.params import SchedParams
from lemix.sched.scheduler import Scheduler
from lemix.types import Op, OpResult, Outputs, RunResult, Task

FINISH, ARRIVAL, WAKEUP = 0, 1, 2
DEFAULT_NOISE = 0.05   # sigma of the log-normal factor on every op duration


class OpExecutor(Protocol):
    """What executes ops alongside the event loop, called in event order."""

    def arrive(self, task: Task) -> None:
        """`task` arrives now (before the scheduler hears of it)."""
        ...

    def start(self, op: Op) -> None:
        """The scheduler started `op` now."""
        ...

    def finish(self, op: Op, result: OpResult) -> OpResult:
        """`op` ends now with the modeled `result`; return what the scheduler is told."""
        ...

    def take(self, out: Outputs | None) -> None:
        """What a scheduler call returned (releases, finished records)."""
        ...


class Simulator:
    def __init__(self, scheduler: Scheduler, clock: SimClock, truth: LatencyModel, *,
                 noise: float = DEFAULT_NOISE, seed: int = 0, horizon_s: float = float("inf"),
                 executor: OpExecutor | None = None) -> None:
        self.sched = scheduler
        self.executor = executor
        self.clock = clock
        self.truth = truth
        self.noise = noise
        self.rng = np.random.default_rng(seed + 7919)
        self._draws: list[float] = []   # noise factors not used yet, next one last
        self.horizon_s = horizon_s
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._wakeups: set[float] = set()
        self.ops_executed = 0
        self.events_processed = 0

    def _push(self, t: float, kind: int, payload: object) -> None:
        heapq.heappush(self._heap, (t, kind, self._seq, payload))
        self._seq += 1

    def duration(self, op: Op) -> float:
        d = self.truth.predict_op(op)
        if self.noise > 0:
            if not self._draws:   # drawn in blocks: the same sequence as one draw per op
                self._draws = self.rng.lognormal(0.0, self.noise, 4096).tolist()[::-1]
            d *= self._draws.pop()
        return max(d, 1e-9)

    def run(self, tasks: Iterable[Task], progress: Callable[[int], None] | None = None) -> RunResult:
        # The loop makes no reference cycles (checked: a full collection after a run finds no
        # garbage), so the cyclic collector would only re-scan the growing records, ~10% of
        # the CPU time of a run: it is paused for a run without an executor, and restored after.
        pause_gc = self.executor is None and gc.isenabled()
        if pause_gc:
            gc.disable()
        try:
            return self._run(tasks, progress)
        finally:
            if pause_gc:
                gc.enable()

    def _run(self, tasks: Iterable[Task], progress: Callable[[int], None] | None) -> RunResult:
        for task in tasks:
            self._push(task.arrival_s, ARRIVAL, task)
        # the loop runs once per op: the calls it makes are bound once here
        heap, heappop, heappush = self._heap, heapq.heappop, heapq.heappush
        sched, ex, clock, duration = self.sched, self.executor, self.clock, self.duration
        on_op_finished, on_arrival, plan_now = sched.on_op_finished, sched.on_arrival, sched.plan
        wakeups = self._wakeups
        horizon = self.horizon_s
        # (counted in locals, stored on self after each time step)
        events, ops_executed = self.events_processed, self.ops_executed
        while heap:
            t = heap[0][0]
            if t > horizon:
                break
            clock.advance_to(t)
            resolved = 0
            while heap and heap[0][0] == t:
                _, kind, _, payload = heappop(heap)
                events += 1
                if kind == FINISH:
                    op, res = payload
                    out = on_op_finished(res if ex is None else ex.finish(op, res))
                elif kind == ARRIVAL:
                    if ex is not None:
                        ex.arrive(payload)
                    out = on_arrival(payload)
                else:
                    wakeups.discard(t)
                    out = None
                if ex is not None:
                    ex.take(out)
                if progress is not None and out is not None:   # (Outputs.resolved: 0 when empty)
                    resolved += out.resolved
            plan = plan_now()
            outputs = plan.outputs
            if progress is not None:
                resolved += outputs.resolved
            if ex is not None:
                ex.take(outputs)
            seq = self._seq
            for op in plan.ops:
                ops_executed += 1
                end = t + duration(op)
                if ex is not None:
                    ex.start(op)
                heappush(heap, (end, FINISH, seq, (op, OpResult(op.op_id, t, end))))
                seq += 1
            self._seq = seq
            self.events_processed, self.ops_executed = events, ops_executed
            w = plan.wakeup_s
            if w is not None and w > t and w not in wakeups:
                wakeups.add(w)
                self._push(w, WAKEUP, None)
            if progress and resolved:   # tasks done (finished or failed), not arrivals
                progress(resolved)
        return sched.finalize()


class ContendedSimulator(Simulator):
    """A host-contention model (issue 10): the devices share `cores` CPU cores, as the
    wall-clock engine's stage threads share a machine's, so the host gate (sched/contention.py)
    can be tested deterministically. An op started while b ops are in flight (itself included)
    takes max(1, b / cores) x its time, fixed when it starts (an op already running is not
    slowed by later ones). Only when asked for: a GPU cluster has no such coupling."""

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


def simulate_policy(params: SchedParams, profile: Profile, tasks: list[Task], *, noise: float = DEFAULT_NOISE,
                    horizon_s: float = float("inf"), host_cores: int = 0,
                    progress: Callable[[int], None] | None = None) -> tuple[RunResult, Simulator]:
    """Run one policy over a task list on a fresh scheduler; return its result and the loop.
    `host_cores` > 0: every device shares that many cores (ContendedSimulator; the scheduler is
    told its host is shared)."""
    clock = SimClock()
    if host_cores > 0:
        params = replace(params, shared_host=True)
    sched = Scheduler(params, profile, clock, timer=time.perf_counter)
    kw = dict(noise=noise, seed=params.seed, horizon_s=horizon_s)
    sim = (ContendedSimulator(sched, clock, LatencyModel(profile, calibrate=False), cores=host_cores, **kw)
           if host_cores > 0 else Simulator(sched, clock, LatencyModel(profile, calibrate=False), **kw))
    wall0 = time.perf_counter()
    result = sim.run(tasks, progress)
    result.wall_s = time.perf_counter() - wall0
    return result, sim
