"""Every task the scheduler was offered and its fate.

A task is resolved exactly once, as a finished or a failed record (through the Recorder), and
the ledger keeps what its record needs: where it was placed, the weights that served it, how
long it was deferred, how often it was tried.
"""
from __future__ import annotations

from typing import NamedTuple

from lemix.clock import Clock
from lemix.sched.outputs import Recorder
from lemix.sched.times import StageTimes
from lemix.types import Event, EventKind, RequestRecord, Task, TrainTaskRecord


class Served(NamedTuple):
    """The weights a request was served with, and when its first token came."""

    version: int
    stale_steps: int
    stale_s: float
    first_token_s: float | None = None


class TaskLedger:
    def __init__(self, times: StageTimes, clock: Clock, rec: Recorder) -> None:
        self.times = times
        self.clock = clock
        self.rec = rec
        self.tasks: dict[int, Task] = {}
        self.resolved: set[int] = set()
        self.node_of: dict[int, int] = {}       # task -> the node it was placed on
        self.served: dict[int, Served] = {}
        self.deferred_s: dict[int, float] = {}  # training task -> time in the deferred queue
        self.attempts: dict[int, int] = {}      # training task -> tries (after a failed op)

    def admit(self, task: Task) -> None:
        if task.task_id in self.tasks:
            raise ValueError(f"task {task.task_id} arrived twice")
        self.tasks[task.task_id] = task

    def offered_again(self, task: Task) -> None:
        """A task whose node died is placed afresh (inference restarts from its prompt)."""
        self.resolved.discard(task.task_id)
        self.served.pop(task.task_id, None)

    def fail(self, task: Task, node: int, why: str) -> None:
        if task.task_id in self.resolved:
            return
        self.resolved.add(task.task_id)
        self.rec.event(Event(self.clock.now(), EventKind.TASK_FAILED, node, task_ids=(task.task_id,), error=why))
        if task.is_train:
            self.rec.train_task(TrainTaskRecord(
                task.task_id, task.arrival_s, node, None, task.batch_size,
                task.batch_size * task.prompt_tokens, self.deferred_s.get(task.task_id, 0.0), True, why))
        else:
            served = self.served.get(task.task_id)
            self.rec.request(RequestRecord(
                task.task_id, task.arrival_s, node, task.prompt_tokens, task.output_tokens,
                served.first_token_s if served else None, None, self.times.slo_s(task), True, error=why,
                ttft_slo_s=self.times.ttft_limit_s(task)))

    def request_done(self, node: int, task: Task, end_s: float, generated: int | None) -> None:
        version, stale_steps, stale_s, first = self.served[task.task_id]
        self.resolved.add(task.task_id)
        out = task.output_tokens if generated is None else generated
        self.rec.request(RequestRecord(
            task.task_id, task.arrival_s, node, task.prompt_tokens, out, first, end_s,
            self.times.slo_s(task), False, version, stale_steps, stale_s,
            ttft_slo_s=self.times.ttft_limit_s(task)))

    def train_done(self, node: int, tasks: list[Task], end_s: float) -> None:
        """Their backward finished on every stage (their step may still be to come)."""
        for t in tasks:
            self.resolved.add(t.task_id)
            self.rec.train_task(TrainTaskRecord(
                t.task_id, t.arrival_s, node, end_s, t.batch_size, t.batch_size * t.prompt_tokens,
                self.deferred_s.get(t.task_id, 0.0)))

    def finalize(self) -> None:
        """Count every task that never finished as failed ("unfinished")."""
        for tid, task in self.tasks.items():
            if tid not in self.resolved:
                self.fail(task, self.node_of.get(tid, -1), "unfinished when the run ended")
