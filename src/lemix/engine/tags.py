"""Completion tags: what a worker's reply answers. The engine gives one with every command it
submits; the backend hands it back untouched with the result (or the exception, or WorkerLost)."""
from __future__ import annotations

from typing import NamedTuple


class OpTag(NamedTuple):
    """The command of scheduler op `op_id`: its reply becomes the op's OpResult."""
    op_id: int


class FetchTag(NamedTuple):
    """A weight copy's first half: the source stage's weights (then SetWeights on the receiver)."""
    op_id: int


class GatherTag(NamedTuple):
    """A merge: node `node`'s copy of the stage (the average is set once every copy arrived)."""
    op_id: int
    node: int


class FreeTag(NamedTuple):
    """A Free of state the scheduler released on (node, stage)."""
    node: int
    stage: int


class RestoreTag(NamedTuple):
    """Restoring a restarted node: GetState from the peer (set=False), SetState into the new
    worker (set=True); `attempt` tells a current restore from an abandoned one."""
    set: bool
    node: int
    stage: int
    attempt: int


class SubmitTag(NamedTuple):
    """A task submitted online (from another thread) through the completions queue."""


SUBMIT = SubmitTag()
