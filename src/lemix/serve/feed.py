"""From journaled samples to training tasks: micro-batches of up to C samples.

A sample waits for its micro-batch to fill for at most `wait_s` (`--train-batch-wait`, default
1 s), then goes out in a smaller one. Why wait at all: a training op's cost has a fixed part
(the `a` of the latency model: kernel launches, the pipeline's hand-offs) and every A-PP step
takes M micro-batches, so a half-empty micro-batch costs nearly a full one; samples arriving
one by one would each pay it. Why not longer: the wait adds directly to the lag between a
sample's acceptance and its effect on serving (lag ~ wait + queueing + step), and training
traffic usually comes in bursts that fill a micro-batch at once anyway.

Samples go out in acceptance order (FIFO, across restarts too); the engine pads a micro-batch to
its longest sample. Thread-safe: HTTP workers add, the engine thread reports outcomes, one feed
thread submits.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class FeedSample:
    sample_id: int
    ids: tuple[int, ...]


class TrainFeed:
    def __init__(self, submit: Callable[[list[FeedSample]], int], *, batch_size: int, wait_s: float,
                 now: Callable[[], float]) -> None:
        """submit(samples) hands one micro-batch to the engine and returns its task id."""
        self._submit = submit
        self.batch_size = batch_size
        self.wait_s = wait_s
        self._now = now
        self._pending: deque[tuple[FeedSample, float]] = deque()   # (sample, time added)
        self._tasks: dict[int, list[FeedSample]] = {}             # submitted, not yet applied
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ producers / outcomes
    def add(self, samples: list[FeedSample]) -> None:
        with self._cond:
            t = self._now()
            self._pending.extend((s, t) for s in samples)
            self._cond.notify()

    def requeue(self, task_id: int) -> int:
        """A training task failed: its samples go back to the front, to be sent again."""
        with self._cond:
            samples = self._tasks.pop(task_id, [])
            t = self._now() - self.wait_s      # no second wait
            self._pending.extendleft((s, t) for s in reversed(samples))
            self._cond.notify()
        return len(samples)

    def applied(self, task_ids: tuple[int, ...]) -> list[int]:
        """Sample ids of training tasks an optimizer step applied (tasks not ours are ignored)."""
        with self._cond:
            return [s.sample_id for t in task_ids for s in self._tasks.pop(t, [])]

    @property
    def queued(self) -> int:
        """Samples accepted and not yet applied."""
        with self._cond:
            return len(self._pending) + sum(len(v) for v in self._tasks.values())

    @property
    def in_engine(self) -> int:
        """Training tasks submitted and not yet applied."""
        with self._cond:
            return len(self._tasks)

    # ------------------------------------------------------------------ the feed thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lemix-train-feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Submit nothing more; what is pending stays queued in the journal."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
                while batch is None and not self._stopped:
                    self._cond.wait(self._timeout())
                    batch = self._next_batch()
                if self._stopped:
                    return
                task_id = self._submit(batch)   # under the lock: the task is known before it can finish
                self._tasks[task_id] = batch

    def _next_batch(self) -> list[FeedSample] | None:
        if not self._pending:
            return None
        full = len(self._pending) >= self.batch_size
        if not full and self._now() - self._pending[0][1] < self.wait_s:
            return None
        n = min(self.batch_size, len(self._pending))
        return [self._pending.popleft()[0] for _ in range(n)]

    def _timeout(self) -> float | None:
        if not self._pending:
            return None
        return max(0.001, self._pending[0][1] + self.wait_s - self._now())
