"""Training pipeline modes: when a micro-batch may run forward/backward on a stage, and when a
stage takes its optimizer step.

Correctness rule (DESIGN section 3): a stage never steps while a pending backward still needs its
old weights. The scheduler enforces it for every mode (no stash on the stage); modes decide the
rest. Gradients of M micro-batches are accumulated per step in every mode.
"""
from __future__ import annotations

from typing import Protocol

from lemix.sched.state import Batch, NodeState


class PipelineMode(Protocol):
    name: str

    def admit(self, node: NodeState, batch: Batch) -> None: ...
    def can_fwd(self, node: NodeState, batch: Batch, stage: int) -> bool: ...
    def can_bwd(self, node: NodeState, batch: Batch, stage: int) -> bool: ...
    def step_due(self, node: NodeState, stage: int) -> bool: ...
    def on_bwd_done(self, node: NodeState, batch: Batch, stage: int) -> None: ...
    def on_fwd_done(self, node: NodeState, batch: Batch) -> None: ...
    def forget_rounds(self, node: NodeState, from_round: int) -> None: ...
    def flush(self, node: NodeState) -> None:
        """A weight sync is due on the node: stop waiting for more members of the open round."""
        ...


def _training_in_flight(node: NodeState) -> bool:
    if node.train_wait:
        return True
    for b in node.batches.values():   # (a plain loop: asked per dispatch of a stage with gradients)
        if b.train:
            return True
    return False


class AsyncPipeline:
    """A-PP: micro-batches flow independently; a stage steps once M micro-batches' gradients
    are accumulated (a barrier: its new forwards wait until the step), or earlier when the node
    has no training left in flight (so gradients are never left unapplied)."""

    name = "apipe"

    def __init__(self, microbatches: int) -> None:
        self.m = microbatches

    def admit(self, node: NodeState, batch: Batch) -> None:
        batch.round = 0

    def can_fwd(self, node: NodeState, batch: Batch, stage: int) -> bool:
        return node.devices[stage].grads_pending < self.m

    def can_bwd(self, node: NodeState, batch: Batch, stage: int) -> bool:
        return True

    def step_due(self, node: NodeState, stage: int) -> bool:
        pending = node.devices[stage].grads_pending
        return pending >= self.m or (pending > 0 and not _training_in_flight(node))

    def on_bwd_done(self, node: NodeState, batch: Batch, stage: int) -> None:
        pass

    def on_fwd_done(self, node: NodeState, batch: Batch) -> None:
        pass

    def forget_rounds(self, node: NodeState, from_round: int) -> None:
        pass

    def flush(self, node: NodeState) -> None:
        pass


class GPipePipeline:
    """S-PP GPipe: rounds of up to M micro-batches; all forwards, then all backwards, then a
    flush step on every stage before the next round's forwards on that stage."""

    name = "gpipe"
    one_f_one_b = False

    def __init__(self, microbatches: int) -> None:
        self.m = microbatches
        self._closed: dict[tuple[int, int], bool] = {}

    def admit(self, node: NodeState, batch: Batch) -> None:
        r = node.train_round
        batch.round = r
        node.round_members[r] = node.round_members.get(r, 0) + 1
        if node.round_members[r] >= self.m:
            self._close(node, r)

    def _close(self, node: NodeState, r: int) -> None:
        if not self._closed.get((node.index, r)):
            self._closed[(node.index, r)] = True
            node.train_round = r + 1

    def _maybe_close(self, node: NodeState, r: int) -> None:
        """Do not wait for more members when none are coming."""
        if self._closed.get((node.index, r)) or node.train_wait:
            return
        members = [b for b in node.batches.values() if b.train and b.round == r]
        if members and all(b.fwd_done for b in members):
            self._close(node, r)

    def can_fwd(self, node: NodeState, batch: Batch, stage: int) -> bool:
        if node.devices[stage].step_count < batch.round:
            return False  # the previous round has not stepped this stage yet
        if self.one_f_one_b:
            outstanding = sum(1 for b in node.batches.values()
                              if b.train and b.round == batch.round and stage in b.stash_stages)
            return outstanding < node.num_stages - stage
        return True

    def can_bwd(self, node: NodeState, batch: Batch, stage: int) -> bool:
        if self.one_f_one_b:
            return True
        self._maybe_close(node, batch.round)
        if not self._closed.get((node.index, batch.round)):
            return False
        return all(b.fwd_done for b in node.batches.values() if b.train and b.round == batch.round)

    def step_due(self, node: NodeState, stage: int) -> bool:
        dev = node.devices[stage]
        r = dev.step_count
        self._maybe_close(node, r)
        if not self._closed.get((node.index, r)):
            return False
        return dev.grads_pending >= node.round_members.get(r, 0) > 0

    def on_bwd_done(self, node: NodeState, batch: Batch, stage: int) -> None:
        pass

    def on_fwd_done(self, node: NodeState, batch: Batch) -> None:
        self._maybe_close(node, batch.round)

    def flush(self, node: NodeState) -> None:
        r = node.train_round
        if node.round_members.get(r, 0) > 0:
            self._close(node, r)

    def forget_rounds(self, node: NodeState, from_round: int) -> None:
        """After a node failure its unfinished rounds are void (their micro-batches re-queued)."""
        for key in [k for k in self._closed if k[0] == node.index and k[1] >= from_round]:
            del self._closed[key]


class OneFOneBPipeline(GPipePipeline):
    """S-PP 1F1B: a backward runs as soon as its forward finished (backwards preferred), and a
    stage keeps at most S - s forwards outstanding; flush step after the round's M backwards."""

    name = "1f1b"
    one_f_one_b = True


PIPELINES = {"apipe": AsyncPipeline, "gpipe": GPipePipeline, "1f1b": OneFOneBPipeline}


def make_pipeline(name: str, microbatches: int) -> PipelineMode:
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline mode {name!r}; allowed: {', '.join(PIPELINES)}")
    return PIPELINES[name](microbatches)
