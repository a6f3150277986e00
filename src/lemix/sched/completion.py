"""What a finished op changes: one handler per OpKind.

Every result is recorded and calibrates the latency model; then the handler of its kind moves
its work on (the next stage, a backward, the decode pool, a finished request or training
task, a step, a copy). A failed op's work is taken off its node (failures.py): an inference
batch or decode iteration fails, a training micro-batch is trained again.
"""
from __future__ import annotations

from typing import Callable

from lemix.sched.chunking import advance_bwd, advance_fwd, chunk_stash_bytes, start_bwd
from lemix.sched.cluster import Cluster
from lemix.sched.dispatch import Dispatcher, Running
from lemix.sched.failures import Failures
from lemix.sched.latency import LatencyModel, Profile
from lemix.sched.ledger import TaskLedger
from lemix.sched.memory import MemoryGate
from lemix.sched.order import account_busy
from lemix.sched.outputs import Recorder
from lemix.sched.params import SchedParams
from lemix.sched.pipeline import PipelineMode
from lemix.sched.placement import Placement
from lemix.sched.state import Batch, DecodeIter, NodeState, Seq
from lemix.sched.weights import Weights
from lemix.types import Event, EventKind, OpKind, OpRecord, OpResult, RunResult, Task

Handler = Callable[[NodeState, Running, OpResult], None]


class Completion:
    def __init__(self, params: SchedParams, profile: Profile, lat: LatencyModel, pipe: PipelineMode,
                 cluster: Cluster, dispatcher: Dispatcher, memory: MemoryGate, weights: Weights,
                 ledger: TaskLedger, placement: Placement, failures: Failures, rec: Recorder,
                 result: RunResult) -> None:
        self.params = params
        self.profile = profile
        self.lat = lat
        self.pipe = pipe
        self.cluster = cluster
        self.dispatcher = dispatcher
        self.memory = memory
        self.weights = weights
        self.ledger = ledger
        self.placement = placement
        self.failures = failures
        self.rec = rec
        self.result = result
        self._handlers: dict[OpKind, Handler] = {
            OpKind.FWD: self._fwd, OpKind.BWD: self._bwd, OpKind.DECODE: self._decode,
            OpKind.OPTIM: lambda node, r, res: self.weights.stepped(node, r.op, res.end_s),
            OpKind.SYNC: lambda node, r, res: self.weights.synced(node, r.op),
            OpKind.OFFLOAD: self._offload, OpKind.RELOAD: self._reload,
        }

    def finish(self, result: OpResult) -> None:
        entry = self.dispatcher.running.pop(result.op_id, None)
        if entry is None:
            if result.op_id in self.dispatcher.cancelled:
                self.dispatcher.cancelled.discard(result.op_id)
                return
            raise ValueError(f"op {result.op_id} is not running")
        op = entry.op
        start_s, end_s = result.start_s, result.end_s
        node = self.cluster.nodes[op.node]
        dev = node.devices[op.stage]
        dev.running = None
        dev.running_extra_bytes = 0
        account_busy(dev, op.train, start_s, end_s)
        self.cluster.touch(node)
        self.rec.op(OpRecord(op.node, op.stage, op.kind, start_s, end_s, op.batch_id,
                             op.task_ids, op.train, op.predicted_s, op.batch_size,
                             op.seq_tokens, op.kv_tokens, op.bytes, op.layers, op.cuts))
        self.placement.op_ended(op)
        if result.error:
            self._failed(node, entry, result.error)
            return
        self.lat.observe(op, end_s - start_s, end_s)
        self._handlers[op.kind](node, entry, result)

    # ------------------------------------------------------------------ handlers
    def _fwd(self, node: NodeState, r: Running, result: OpResult) -> None:
        b: Batch = r.obj
        b.running = False
        if b.chunks and not advance_fwd(b):
            # bounded blocking: the stage's next chunk is due. It keeps the ready time of the
            # stage's first chunk, so a device finishes the micro-batch it started before it
            # starts another's chunks (re-queued at each chunk's end, it went round-robin over
            # every admitted micro-batch, each one's stash held at once: memory full, offloads)
            return
        b.ready_s = result.end_s
        b.fwd_next += 1
        if not b.fwd_done:
            return
        if b.train:
            b.bwd_next = node.num_stages - 1
            start_bwd(b, b.bwd_next)
            self.pipe.on_fwd_done(node, b)
            return
        del node.batches[b.bid]
        generate = self.params.generate
        served = self.ledger.served
        for t in b.tasks:
            served[t.task_id] = served[t.task_id]._replace(first_token_s=result.end_s)
            seq = Seq(t, generated=1)   # the prefill produced the first token
            if generate and not seq.done and t.task_id not in result.stopped_task_ids:
                node.seqs[t.task_id] = seq
            else:
                if generate:
                    self.memory.free_kv(node, seq)  # its prefill KV, on every stage
                self._request_done(node, t, result.end_s, 1 if generate else None)

    def _bwd(self, node: NodeState, r: Running, result: OpResult) -> None:
        b: Batch = r.obj
        s = r.op.stage
        dev = node.devices[s]
        b.running = False
        if b.chunks:   # bounded blocking: this chunk's layers free their share of the stash
            dev.held_bytes -= chunk_stash_bytes(b, s, self.profile.stages[s].act_bytes_per_token)
            if not advance_bwd(b):
                return   # the next chunk keeps the stage's ready time (see _fwd)
        else:
            dev.held_bytes -= b.tokens * self.profile.stages[s].act_bytes_per_token
        b.ready_s = result.end_s
        b.stash_stages.discard(s)
        dev.grads_pending += 1
        self.pipe.on_bwd_done(node, b, s)
        b.bwd_next -= 1
        start_bwd(b, b.bwd_next)
        if s > 0:
            return
        del node.batches[b.bid]
        self.weights.trained(node, b)
        self.ledger.train_done(node.index, b.tasks, result.end_s)

    def _decode(self, node: NodeState, r: Running, result: OpResult) -> None:
        it: DecodeIter = r.obj
        it.running = False
        it.stage += 1
        it.ready_s = result.end_s
        if it.stage < node.num_stages:
            return
        node.decode = None
        node.last_decode_end_s = result.end_s
        stopped = set(result.stopped_task_ids)
        for tid in it.seq_ids:
            seq = node.seqs[tid]
            seq.generated += 1
            if seq.done or tid in stopped:
                self.memory.free_kv(node, seq)
                del node.seqs[tid]
                self._request_done(node, seq.task, result.end_s, seq.generated)

    def _offload(self, node: NodeState, r: Running, result: OpResult) -> None:
        op = r.op
        self.memory.offload_done(node, op.stage, op.bytes)
        self.result.offload_events += 1
        self.rec.event(Event(result.end_s, EventKind.OFFLOAD, node.index, op.stage, op.task_ids, bytes=op.bytes))

    def _reload(self, node: NodeState, r: Running, result: OpResult) -> None:
        self.memory.reload_done(node, r.op.stage, r.obj)

    def _request_done(self, node: NodeState, task: Task, end_s: float, generated: int | None) -> None:
        self.memory.kv.pop(task.task_id, None)
        if self.params.generate:
            self.rec.release(node.index, (task.task_id,))   # its KV cache on every stage
        self.ledger.request_done(node.index, task, end_s, generated)

    # ------------------------------------------------------------------ failures
    def _failed(self, node: NodeState, r: Running, error: str) -> None:
        """An executor reported an op error: its tasks fail with that error (never silently);
        a training micro-batch is released on every stage and trained again."""
        op = r.op
        if op.kind is OpKind.FWD or op.kind is OpKind.BWD:
            self.failures.drop_batch(node, r.obj, error, retry=True)
        elif op.kind is OpKind.DECODE:
            self.failures.drop_decode(node, r.obj.seq_ids, error)
            self.rec.release(node.index, (), (r.obj.bid,))
        else:
            raise RuntimeError(f"{op.kind.value} op on node {node.index} stage {op.stage} failed: {error}")
