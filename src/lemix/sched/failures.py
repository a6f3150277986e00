"""Taking work off a node when it cannot go on (an OOM without the gate, a failed op).

Its memory is freed on every stage, the workers are told what to release (stashes keyed by
batch id, KV by sequence id), and its tasks fail with the reason, never silently; a training
task whose op failed is offered again instead, up to MAX_TRAIN_ATTEMPTS tries.
"""
from __future__ import annotations

from lemix.clock import Clock
from lemix.sched.cluster import Cluster
from lemix.sched.ledger import TaskLedger
from lemix.sched.memory import MemoryGate
from lemix.sched.outputs import Recorder
from lemix.sched.params import SchedParams
from lemix.sched.placement import Placement
from lemix.sched.state import Batch, NodeState, Seq
from lemix.types import Event, EventKind, Task

MAX_TRAIN_ATTEMPTS = 3   # a training task whose op failed is trained again, up to this many tries


class Failures:
    def __init__(self, params: SchedParams, clock: Clock, cluster: Cluster, memory: MemoryGate,
                 ledger: TaskLedger, placement: Placement, rec: Recorder) -> None:
        self.params = params
        self.clock = clock
        self.cluster = cluster
        self.memory = memory
        self.ledger = ledger
        self.placement = placement
        self.rec = rec

    def oom_event(self, node: NodeState, s: int, need: int, why: str) -> None:
        self.rec.event(Event(self.clock.now(), EventKind.OOM, node.index, s, bytes=need, error=why))

    def fail_task(self, node: NodeState, task: Task, why: str) -> None:
        """A queued task that never started fails."""
        self.ledger.fail(task, node.index, why)
        self.cluster.touch(node)

    def drop_seq(self, node: NodeState, seq: Seq, why: str) -> None:
        self.memory.free_kv(node, seq)
        node.seqs.pop(seq.task.task_id, None)
        self.rec.release(node.index, (seq.task.task_id,))
        self.ledger.fail(seq.task, node.index, why)

    def drop_decode(self, node: NodeState, seq_ids: tuple[int, ...], why: str) -> None:
        """A decode iteration cannot go on: its sequences fail."""
        for tid in seq_ids:
            if tid in node.seqs:
                self.drop_seq(node, node.seqs[tid], why)
        node.decode = None
        self.cluster.touch(node)

    def drop_batch(self, node: NodeState, b: Batch, why: str, retry: bool = False) -> None:
        """Take a micro-batch off its node and fail its tasks; with `retry`, training tasks are
        offered again instead (up to MAX_TRAIN_ATTEMPTS tries)."""
        self.memory.free_batch(node, b)
        if b.train and b.bid in node.batches and node.round_members.get(b.round, 0) > 0:
            node.round_members[b.round] -= 1  # S-PP: the round's flush step stops waiting for it
        node.batches.pop(b.bid, None)
        seqs = tuple(t.task_id for t in b.tasks) if not b.train and self.params.generate else ()
        self.rec.release(node.index, seqs, (b.bid,))
        attempts = self.ledger.attempts
        for t in b.tasks:
            tries = attempts.get(t.task_id, 1)
            if retry and b.train and tries < MAX_TRAIN_ATTEMPTS:
                attempts[t.task_id] = tries + 1
                self.ledger.node_of.pop(t.task_id, None)
                self.placement.offer(t)
                self.rec.requeued((t.task_id,))
                self.rec.event(Event(self.clock.now(), EventKind.TASK_RETRIED, node.index,
                                     task_ids=(t.task_id,), error=why))
            else:
                self.ledger.fail(t, node.index, why if not retry else f"{why} (after {tries} tries)")
        self.cluster.touch(node)
