"""Staggered merges on the engine: what a member's SYNC op reads and what it writes.

A staggered merge round (SyncSpec.round > 0, sched/weights.py) reaches its members one node at
a time. For each stage, the first member's op reads every member's copy (the snapshot): it takes
the sample-weighted average, and every other member's delta (average - its snapshot) is kept
here. A later member's op reads only its own current weights w and writes w + delta, so the
training it did since the snapshot is kept on top of the merge. A round's deltas go once every
member took them, or when a newer round snapshots the same stage.
"""
from __future__ import annotations

import torch

from lemix.engine.outcomes import average_weights
from lemix.types import Op

StateDict = dict[str, torch.Tensor]


class StaggeredMerges:
    def __init__(self) -> None:
        self._deltas: dict[tuple[int, int], dict[int, StateDict]] = {}   # (round, stage) -> node -> delta

    def sources(self, op: Op) -> tuple[int, ...]:
        """The nodes whose copies the op reads: every member for the stage's first, else its own."""
        if (op.sync.round, op.stage) in self._deltas:
            return (op.node,)
        return op.sync.members

    def result(self, op: Op, copies: dict[int, StateDict]) -> StateDict:
        """The weights the op writes into (op.node, op.stage), from the copies `sources` named
        (a member lost meanwhile is missing: the average goes on without it)."""
        spec, key = op.sync, (op.sync.round, op.stage)
        deltas = self._deltas.get(key)
        if deltas is None:   # the stage's first member: snapshot, average, keep the others' deltas
            used = [(spec.mix[n], sd) for n, sd in copies.items() if spec.mix[n] > 0]
            avg = average_weights(used) if used else copies[op.node]
            for old in [k for k in self._deltas if k[1] == op.stage]:
                del self._deltas[old]
            others = {n: {k: avg[k] - sd[k] for k in avg} for n, sd in copies.items() if n != op.node}
            if others:
                self._deltas[key] = others
            return avg
        own = copies[op.node]
        delta = deltas.pop(op.node, None)
        if not deltas:
            del self._deltas[key]
        if delta is None:   # not snapshotted (it joined after the round began): keeps its weights
            return own
        return {k: own[k] + delta[k] for k in own}
