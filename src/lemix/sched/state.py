"""The scheduler's picture of each node: micro-batches in flight, decode sequences, devices.

Internal to sched/: mutable. Executors see only what lemix.types carries (Op, Outputs,
ClusterSnapshot); policies read a node's LengthStats through ClusterView.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from lemix.types import Op, SyncSpec, Task


@dataclass
class Batch:
    """A micro-batch flowing through one node's pipeline (inference prefill or training)."""

    bid: int
    node: int
    train: bool
    tasks: list[Task]
    seq_tokens: int                  # padded length of the batch
    num_stages: int
    fwd_next: int = 0                # next stage whose forward is due (== S when forward done)
    bwd_next: int = -1               # next stage whose backward is due (-1: not started / done)
    ready_s: float = 0.0             # when its next op became ready
    running: bool = False
    round: int = 0                   # S-PP round on its node
    stash_stages: set[int] = field(default_factory=set)      # stages holding its activations
    offloaded_stages: set[int] = field(default_factory=set)  # ... of which moved to host
    # bounded blocking (chunking.py): per stage, the layer boundaries of its chunks (() = one op
    # per stage), and the chunk due next on the current stage (forward: ascending; backward:
    # descending from the last), and how many chunks the op running or due there covers
    # (adaptive chunks: merged into one op while the node serves nothing)
    chunks: tuple[tuple[int, ...], ...] = ()
    chunk: int = 0
    span: int = 1

    def __post_init__(self) -> None:
        # tasks and seq_tokens never change after the batch is formed: what every op of the
        # batch reads is computed once here (plain attributes, not dataclass fields)
        self.size: int = sum(t.batch_size for t in self.tasks)
        self.tokens: int = self.size * self.seq_tokens
        self.task_ids: tuple[int, ...] = tuple([t.task_id for t in self.tasks])

    @property
    def fwd_done(self) -> bool:
        return self.fwd_next >= self.num_stages


@dataclass
class Seq:
    """A sequence in a node's decode pool (generate mode)."""

    task: Task
    generated: int                   # tokens produced so far (the prefill produced the first)
    offloaded_stages: set[int] = field(default_factory=set)

    @property
    def kv_tokens(self) -> int:
        return self.task.prompt_tokens + self.generated

    @property
    def done(self) -> bool:
        return self.generated >= max(1, self.task.output_tokens)


@dataclass
class DecodeIter:
    """One decode iteration of a node's running batch, moving stage by stage."""

    bid: int
    seq_ids: tuple[int, ...]
    kv_tokens: int
    stage: int = 0
    ready_s: float = 0.0
    running: bool = False


@dataclass
class Device:
    """One stage device of a node: the op it runs and the memory it holds."""

    static_bytes: int
    capacity_bytes: int
    held_bytes: int = 0              # stashed activations + KV resident on the device
    host_bytes: int = 0              # what was offloaded from it
    running: Op | None = None
    running_start_s: float = 0.0
    running_extra_bytes: int = 0     # transient memory of the running op
    wait_since_s: float | None = None   # memory gate: when the waiting op started waiting
    wait_key: tuple | None = None       # ... and which op that is
    grads_pending: int = 0           # micro-batches whose gradients are accumulated, not stepped
    step_count: int = 0
    busy_ewma_s: float = 0.0         # recent busy time (decayed), for the training-share bound
    train_ewma_s: float = 0.0        # ... of which training ops
    ewma_at_s: float = 0.0
    sync: SyncSpec | None = None     # a weight copy (or merge) due on this stage

    @property
    def used_bytes(self) -> int:
        return self.static_bytes + self.held_bytes + self.running_extra_bytes


@dataclass
class LengthStats:
    """Running mean/std of task lengths placed on a node (for length consistency)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    def consistency(self, x: float) -> float:
        """exp(-(x-mu)^2 / (2 sigma^2)) in [0, 1]; 0 while undefined."""
        if self.n < 2:
            return 0.0
        var = self.m2 / (self.n - 1)
        if var <= 0:
            return 1.0 if x == self.mean else 0.0
        return math.exp(-((x - self.mean) ** 2) / (2 * var))

    def density(self, x: float) -> float:
        """The research code's N(x; mu, sigma): a Gaussian density (0 while undefined)."""
        if self.n < 2:
            return 0.0
        var = self.m2 / (self.n - 1)
        if var <= 0:
            return 0.0
        return math.exp(-((x - self.mean) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)


@dataclass
class NodeState:
    """Everything the scheduler tracks about one node."""

    index: int
    devices: list[Device]
    infer_wait: list[Task] = field(default_factory=list)   # placed, not yet in a batch
    train_wait: list[Task] = field(default_factory=list)   # placed, not yet entered stage 0
    batches: dict[int, Batch] = field(default_factory=dict)
    seqs: dict[int, Seq] = field(default_factory=dict)     # decode pool
    decode: DecodeIter | None = None
    last_decode_end_s: float = 0.0
    version: int = 0                 # weight version: own steps, or a sync/merge's freshest version
    steps_done: int = 0              # own optimizer steps completed on every stage
    healthy: bool = True
    trains: bool = True              # holds training state (False for separate's serving nodes)
    serves: bool = True
    lengths: LengthStats = field(default_factory=LengthStats)
    last_arrival_s: float = 0.0
    train_round: int = 0             # S-PP: the open round
    round_members: dict[int, int] = field(default_factory=dict)  # round -> batches in it
    step_samples: int = 0            # samples whose backward finished since the last step
    step_tokens: int = 0
    dirty: bool = True               # forecast cache invalid

    @property
    def num_stages(self) -> int:
        return len(self.devices)

    # ---- predicates over the node's state (one definition each)
    def is_idle(self) -> bool:
        """Nothing running, queued or in flight: its forecast timeline is empty."""
        return (not self.batches and not self.infer_wait and not self.train_wait and not self.seqs
                and self.decode is None and all(d.running is None for d in self.devices))

    def has_no_inference(self) -> bool:
        """No inference running, queued or in flight: its inference-only timeline is empty."""
        if self.infer_wait or self.seqs or self.decode is not None:
            return False
        for b in self.batches.values():   # (plain loops: this is asked per dispatch)
            if not b.train:
                return False
        for d in self.devices:
            op = d.running
            if op is not None and not op.train:
                return False
        return True

    def holds_nothing(self) -> bool:
        """Nothing queued, in flight or pending on any stage (no gradients, no weight copy)."""
        return (not self.infer_wait and not self.train_wait and not self.batches and not self.seqs
                and not any(d.grads_pending or d.sync is not None for d in self.devices))

    def quiescent(self) -> bool:
        """No gradient of the node lives outside its weights: no training micro-batch has begun
        its backward (a finished one has left `batches`), no stage holds accumulated gradients or
        a weight copy in progress, and every stage took the same steps."""
        last = self.num_stages - 1
        for b in self.batches.values():
            if b.train and b.fwd_done and (b.running or b.bwd_next < last
                                           or (b.chunks and b.chunk < len(b.chunks[last]) - 2)):
                return False   # (a chunked backward that began on the last stage holds gradients)
        return (all(d.grads_pending == 0 and d.sync is None for d in self.devices)
                and len({d.step_count for d in self.devices}) == 1)

    def held_batch_ids(self) -> tuple[int, ...]:
        """Micro-batches and the decode iteration in flight (state its workers may hold)."""
        return tuple(self.batches) + ((self.decode.bid,) if self.decode is not None else ())

    def stash_on(self, s: int) -> bool:
        """A training micro-batch's activations are stashed on stage s (its backward is due)."""
        return any(b.train and s in b.stash_stages for b in self.batches.values())

    def due_stages(self) -> dict[int, list[Batch]]:
        """The batches by the stage their next op is due on (one pass per dispatch, so a device
        looks only at its own)."""
        due: dict[int, list[Batch]] = {}
        for b in self.batches.values():
            s = b.bwd_next if b.train and b.fwd_next >= b.num_stages else b.fwd_next   # (fwd_done)
            at = due.get(s)
            if at is None:
                due[s] = [b]
            else:
                at.append(b)
        return due

    def running_end(self, stage: int, ready: float) -> float:
        """When work ready at `ready` can start on `stage` after the op running there."""
        d = self.devices[stage]
        return ready if d.running is None else max(ready, d.running_start_s + d.running.predicted_s)

    def decode_set(self, max_batch: int) -> list[int]:
        """The sequences the next decode iteration takes (the first C of the pool)."""
        return list(self.seqs)[:max_batch]
