"""Plain data that crosses boundaries: tasks, scheduler decisions (ops), op results, records.

Everything here is a small frozen dataclass with units in field names, so it serializes across
Ray actor calls and the HTTP boundary. This module imports nothing from the rest of lemix.

The types built once per op or more (Op, OpResult, OpRecord, Outputs) write their own
`__init__` (`init=False`): the one a frozen dataclass generates sets each field through
object.__setattr__, theirs sets the instance's `__dict__` at once (Op, 15 fields: 1.1 us
against 5.2, timeit on a loaded machine). The result is the same value: frozen (assignment
still raises), equal, hashable, `replace`-able and picklable as before. A test pins each
`__init__` to the dataclass's fields, names, order and defaults
(tests/sched/test_sched_seam_types.py).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

_set = object.__setattr__   # (bypasses a frozen class's __setattr__: used in __init__ only)


class TaskKind(str, enum.Enum):
    INFER = "infer"
    TRAIN = "train"


_TRAIN = TaskKind.TRAIN   # (an Enum member read through its class costs a metaclass lookup, per use)


class OpKind(str, enum.Enum):
    FWD = "fwd"          # forward of a micro-batch on one stage (inference prefill or training)
    BWD = "bwd"          # backward of a training micro-batch on one stage
    DECODE = "decode"    # one decode iteration of a node's running batch on one stage
    OPTIM = "optim"      # optimizer step on one stage
    OFFLOAD = "offload"  # device -> host copy of KV cache / stashed activations
    RELOAD = "reload"    # host -> device copy back
    SYNC = "sync"        # weight copy into this (receiving) stage from node `peer`


@dataclass(frozen=True)
class Task:
    """One unit of work offered to the scheduler.

    Inference: a request with `prompt_tokens` and (generate mode) `output_tokens`.
    Training: a micro-batch of `batch_size` samples of `prompt_tokens` tokens each.
    """

    task_id: int
    kind: TaskKind
    arrival_s: float
    prompt_tokens: int
    output_tokens: int = 0
    batch_size: int = 1
    priority: int = 0            # higher runs earlier among inference requests
    slo_s: float | None = None   # absolute SLO; None -> derived by the scheduler (slo_scale x unloaded)

    @property
    def is_train(self) -> bool:
        return self.kind is _TRAIN


@dataclass(frozen=True)
class SyncSpec:
    """Where a SYNC op's weights come from: one node's copy of the stage, or a weighted average
    of several nodes' copies (a co-located merge)."""

    source: int = -1                  # copy node `source`'s stage (-1 when `mix` is given)
    mix: tuple[float, ...] = ()       # weight of each node's copy (sums to 1; 0 = not used)
    version: int = 0                  # the weight version the receiver has afterwards
    # a staggered merge (round > 0): the members take it one node at a time; the first copy of
    # a stage snapshots every member's copy, and each later member adds (average - its snapshot)
    # to its current weights, so training it did in between is kept
    round: int = 0
    members: tuple[int, ...] = ()     # the nodes the staggered round snapshots and updates

    @property
    def average(self) -> bool:
        return bool(self.mix)

    def sources(self, receiver: int) -> tuple[int, ...]:
        """The nodes whose copies are read (a merge reads the receiver's own copy too)."""
        if not self.mix:
            return (self.source,)
        return tuple(i for i, w in enumerate(self.mix) if w > 0)


@dataclass(frozen=True, init=False)
class Op:
    """A scheduler decision: run this op now on device (node, stage)."""

    op_id: int
    kind: OpKind
    node: int
    stage: int
    batch_id: int                     # micro-batch / decode-iteration id the op belongs to
    task_ids: tuple[int, ...]
    train: bool                       # True for training work (fwd/bwd/optim of training)
    batch_size: int = 1               # sequences in the op
    seq_tokens: int = 0               # padded tokens per sequence (fwd/bwd); 1 for decode
    kv_tokens: int = 0                # summed KV length of the batch (decode)
    bytes: int = 0                    # offload/reload/sync bytes
    predicted_s: float = 0.0
    sync: SyncSpec | None = None      # SYNC: where the new weights come from
    layers: tuple[int, int] | tuple[()] = ()   # FWD/BWD of training: a chunk, [first, end) of the
                                               # stage's own layers (sched/chunking.py); () = all
    cuts: tuple[int, ...] = ()        # FWD over several chunks (adaptive chunks): the chunk
                                      # boundaries inside `layers`, where a backward may stop

    def __init__(self, op_id: int, kind: OpKind, node: int, stage: int, batch_id: int,
                 task_ids: tuple[int, ...], train: bool, batch_size: int = 1, seq_tokens: int = 0,
                 kv_tokens: int = 0, bytes: int = 0, predicted_s: float = 0.0,
                 sync: SyncSpec | None = None, layers: tuple[int, int] | tuple[()] = (),
                 cuts: tuple[int, ...] = ()) -> None:
        _set(self, "__dict__", {
            "op_id": op_id, "kind": kind, "node": node, "stage": stage, "batch_id": batch_id,
            "task_ids": task_ids, "train": train, "batch_size": batch_size, "seq_tokens": seq_tokens,
            "kv_tokens": kv_tokens, "bytes": bytes, "predicted_s": predicted_s, "sync": sync,
            "layers": layers, "cuts": cuts})


@dataclass(frozen=True, init=False)
class OpResult:
    """What an executor reports back when an op finished."""

    op_id: int
    start_s: float
    end_s: float
    stopped_task_ids: tuple[int, ...] = ()   # DECODE on the last stage: sequences that hit EOS/stop
    error: str | None = None                 # an op that failed (e.g. OOM without memory gate)

    def __init__(self, op_id: int, start_s: float, end_s: float, stopped_task_ids: tuple[int, ...] = (),
                 error: str | None = None) -> None:
        _set(self, "__dict__", {"op_id": op_id, "start_s": start_s, "end_s": end_s,
                                "stopped_task_ids": stopped_task_ids, "error": error})


@dataclass(frozen=True)
class RequestRecord:
    """Outcome of one inference request (one row of requests.csv)."""

    task_id: int
    arrival_s: float
    node: int
    prompt_tokens: int
    output_tokens: int
    first_token_s: float | None   # None when it never produced a token
    finish_s: float | None        # None when unfinished / failed
    slo_s: float
    failed: bool
    weight_version: int = 0
    staleness_steps: int = 0
    staleness_s: float = 0.0
    inference_loss: float | None = None
    error: str = ""
    ttft_slo_s: float | None = None   # an absolute TTFT limit it must meet too (generate mode)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    @property
    def slo_met(self) -> bool:
        e2e = self.e2e_s
        if self.failed or e2e is None or e2e > self.slo_s:
            return False
        ttft = self.ttft_s
        return self.ttft_slo_s is None or (ttft is not None and ttft <= self.ttft_slo_s)


@dataclass(frozen=True, init=False)
class OpRecord:
    """One executed op, for the timeline and idle ratios."""

    node: int
    stage: int
    kind: OpKind
    start_s: float
    end_s: float
    batch_id: int
    task_ids: tuple[int, ...]
    train: bool
    predicted_s: float = 0.0
    batch_size: int = 0
    seq_tokens: int = 0
    kv_tokens: int = 0
    bytes: int = 0
    layers: tuple[int, int] | tuple[()] = ()   # a training chunk's layer range (Op.layers)
    cuts: tuple[int, ...] = ()                 # ... the chunk boundaries inside it (Op.cuts)

    def __init__(self, node: int, stage: int, kind: OpKind, start_s: float, end_s: float, batch_id: int,
                 task_ids: tuple[int, ...], train: bool, predicted_s: float = 0.0, batch_size: int = 0,
                 seq_tokens: int = 0, kv_tokens: int = 0, bytes: int = 0,
                 layers: tuple[int, int] | tuple[()] = (), cuts: tuple[int, ...] = ()) -> None:
        _set(self, "__dict__", {
            "node": node, "stage": stage, "kind": kind, "start_s": start_s, "end_s": end_s,
            "batch_id": batch_id, "task_ids": task_ids, "train": train, "predicted_s": predicted_s,
            "batch_size": batch_size, "seq_tokens": seq_tokens, "kv_tokens": kv_tokens, "bytes": bytes,
            "layers": layers, "cuts": cuts})


@dataclass(frozen=True)
class TrainTaskRecord:
    """Outcome of one training task (micro-batch)."""

    task_id: int
    arrival_s: float
    node: int               # -1 when never placed
    finish_s: float | None  # end of its last backward op; None when unfinished
    samples: int
    tokens: int
    deferred_s: float = 0.0  # time spent in the deferred queue
    failed: bool = False
    error: str = ""


@dataclass(frozen=True)
class TrainStepRecord:
    """One optimizer step of one node (all its stages stepped)."""

    node: int
    step: int                 # the node's weight version after this step
    time_s: float
    samples: int
    tokens: int
    loss: float | None = None


class EventKind(str, enum.Enum):
    TASK_FAILED = "task_failed"              # a task will not finish (error says why)
    TASK_RETRIED = "task_retried"            # a training task offered again after a failed op
    OOM = "oom"                              # an op did not fit its device (memory gate off)
    MEMORY_OVERCOMMIT = "memory_overcommit"  # the gate ran an op over kappa x capacity (nothing to free)
    OFFLOAD = "offload"                      # bytes moved device -> host
    NODE_FAILED = "node_failed"              # task_ids: the tasks offered again
    NODE_RESTORED = "node_restored"          # version: the weights it came back with
    NODE_ABANDONED = "node_abandoned"        # restarts exhausted (or the backend cannot restart)
    RESTORE_FAILED = "restore_failed"
    SYNC_SKIPPED = "sync_skipped"            # a weight copy lost its source; the receiver kept its weights


@dataclass(frozen=True)
class Event:
    """A notable event of a run (failures, offloads, recoveries), for reports and executors."""

    time_s: float
    kind: EventKind
    node: int = -1
    stage: int = -1
    task_ids: tuple[int, ...] = ()
    bytes: int = 0
    version: int = -1
    error: str = ""

    def as_dict(self) -> dict:
        return {"time_s": self.time_s, "event": self.kind.value, "node": self.node, "stage": self.stage,
                "task_ids": list(self.task_ids), "bytes": self.bytes, "version": self.version,
                "error": self.error}


@dataclass(frozen=True)
class Release:
    """Worker state of node `node` to drop on every stage: the KV cache of finished or failed
    inference sequences, and the stashed activations / partial gradients flow of abandoned
    training micro-batches (keyed by batch id, as Forward/Backward key them)."""

    node: int
    seq_ids: tuple[int, ...] = ()
    batch_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Applied:
    """An optimizer step of `node` applied the gradients of these training tasks."""

    node: int
    version: int
    time_s: float
    task_ids: tuple[int, ...]


@dataclass(frozen=True, init=False)
class Outputs:
    """What happened during one scheduler call: the executor's only view of the results."""

    requests: tuple[RequestRecord, ...] = ()       # finished or failed inference requests
    train_tasks: tuple[TrainTaskRecord, ...] = ()  # finished (backward done) or failed training tasks
    train_steps: tuple[TrainStepRecord, ...] = ()
    applied: tuple[Applied, ...] = ()
    releases: tuple[Release, ...] = ()
    events: tuple[Event, ...] = ()
    requeued: tuple[int, ...] = ()                 # tasks offered again (node failure, failed op)
    ops: tuple[OpRecord, ...] = ()                 # ops that ended (measured times)

    def __init__(self, requests: tuple[RequestRecord, ...] = (),
                 train_tasks: tuple[TrainTaskRecord, ...] = (),
                 train_steps: tuple[TrainStepRecord, ...] = (), applied: tuple[Applied, ...] = (),
                 releases: tuple[Release, ...] = (), events: tuple[Event, ...] = (),
                 requeued: tuple[int, ...] = (), ops: tuple[OpRecord, ...] = ()) -> None:
        _set(self, "__dict__", {
            "requests": requests, "train_tasks": train_tasks, "train_steps": train_steps,
            "applied": applied, "releases": releases, "events": events, "requeued": requeued,
            "ops": ops})

    @property
    def resolved(self) -> int:
        """Tasks this call finished or failed for good (what a progress bar counts)."""
        return len(self.requests) + len(self.train_tasks)

    def __bool__(self) -> bool:
        return bool(self.requests or self.train_tasks or self.train_steps or self.applied
                    or self.releases or self.events or self.requeued or self.ops)


@dataclass(frozen=True)
class NodeSnapshot:
    index: int
    healthy: bool
    serves: bool
    trains: bool
    version: int                  # the weight version it serves
    quiescent: bool               # no gradient outside its weights, no weight copy pending, stages in step
    batch_ids: tuple[int, ...]    # micro-batches / decode iteration in flight (state executors may hold)


@dataclass(frozen=True)
class ClusterSnapshot:
    """A read-only picture of the scheduler for executors and the server (taken on its thread)."""

    time_s: float
    nodes: tuple[NodeSnapshot, ...]
    idle: bool                    # nothing queued, running, deferred or pending
    max_version: int
    deferred_total: int
    offload_events: int


@dataclass
class RunResult:
    """Everything one policy run produced; metrics turn it into summary/CSV/plots."""

    policy: str
    requests: list[RequestRecord] = field(default_factory=list)
    ops: list[OpRecord] = field(default_factory=list)
    train_tasks: list[TrainTaskRecord] = field(default_factory=list)
    train_steps: list[TrainStepRecord] = field(default_factory=list)
    decision_us: list[float] = field(default_factory=list)
    deferred_total: int = 0
    offload_events: int = 0
    nodes: int = 1
    stages: int = 1
    wall_s: float = 0.0
    events: list[Event] = field(default_factory=list)  # notable events (failures, offloads) for reports
    extras: dict = field(default_factory=dict)         # executor-specific figures, copied into the summary
