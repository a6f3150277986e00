"""The scheduler's record of what happened: the run's result, and the Outputs of the current call.

Every record the scheduler makes goes through one Recorder, which keeps it for the run's
RunResult (unless `keep` is off: a long-running server aggregates records itself) and for the
Outputs value the current contract call returns, so executors learn what finished, what to free
and what was applied from that value alone.
"""
from __future__ import annotations

from lemix.types import (Applied, Event, OpRecord, Outputs, Release, RequestRecord, RunResult,
                         TrainStepRecord, TrainTaskRecord)


class Recorder:
    def __init__(self, result: RunResult, *, keep: bool = True) -> None:
        self.result = result
        self.keep = keep
        self._clear()

    def _clear(self) -> None:
        self._requests: list[RequestRecord] = []
        self._train_tasks: list[TrainTaskRecord] = []
        self._train_steps: list[TrainStepRecord] = []
        self._applied: list[Applied] = []
        self._releases: list[Release] = []
        self._events: list[Event] = []
        self._ops: list[OpRecord] = []
        self._requeued: list[int] = []

    def request(self, rec: RequestRecord) -> None:
        self._requests.append(rec)
        if self.keep:
            self.result.requests.append(rec)

    def train_task(self, rec: TrainTaskRecord) -> None:
        self._train_tasks.append(rec)
        if self.keep:
            self.result.train_tasks.append(rec)

    def train_step(self, rec: TrainStepRecord) -> None:
        self._train_steps.append(rec)
        if self.keep:
            self.result.train_steps.append(rec)

    def op(self, rec: OpRecord) -> None:
        self._ops.append(rec)
        if self.keep:
            self.result.ops.append(rec)

    def event(self, ev: Event) -> None:
        self._events.append(ev)
        self.result.events.append(ev)   # rare: kept even when records are not

    def applied(self, applied: Applied) -> None:
        self._applied.append(applied)

    def release(self, node: int, seq_ids: tuple[int, ...] = (), batch_ids: tuple[int, ...] = ()) -> None:
        if seq_ids or batch_ids:
            self._releases.append(Release(node, tuple(seq_ids), tuple(batch_ids)))

    def requeued(self, task_ids: list[int] | tuple[int, ...]) -> None:
        self._requeued.extend(task_ids)

    def forget_train_tasks(self, task_ids: set[int]) -> None:
        """Finished training tasks whose gradients died with their node: they train again."""
        if self.keep:
            self.result.train_tasks = [r for r in self.result.train_tasks if r.task_id not in task_ids]

    def take(self) -> Outputs:
        """The Outputs gathered since the last take (and start a new one)."""
        if not (self._requests or self._train_tasks or self._train_steps or self._applied
                or self._releases or self._events or self._requeued):
            ops = self._ops   # (most calls: an op ended and nothing else happened, or nothing)
            if not ops:
                return _EMPTY
            self._ops = []
            return Outputs(ops=tuple(ops))
        out = Outputs(tuple(self._requests), tuple(self._train_tasks), tuple(self._train_steps),
                      tuple(self._applied), tuple(self._releases), tuple(self._events),
                      tuple(self._requeued), tuple(self._ops))
        self._clear()
        return out


_EMPTY = Outputs()
