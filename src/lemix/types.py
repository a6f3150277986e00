"""Plain data that crosses boundaries: tasks, scheduler decisions (ops), op results, records.

Everything here is a small frozen dataclass with units in field names, so it serializes across
Ray actor calls and the HTTP boundary. This module imports nothing from the rest of lemix.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class TaskKind(str, enum.Enum):
    INFER = "infer"
    TRAIN = "train"


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
        return self.kind is TaskKind.TRAIN


@dataclass(frozen=True)
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
    peer: int = -1                    # SYNC: source node (-2: a weighted average, see mix)
    predicted_s: float = 0.0
    mix: tuple[float, ...] = ()       # SYNC average: weight of each node's copy (sums to 1)


@dataclass(frozen=True)
class OpResult:
    """What an executor reports back when an op finished."""

    op_id: int
    start_s: float
    end_s: float
    stopped_task_ids: tuple[int, ...] = ()   # DECODE on the last stage: sequences that hit EOS/stop
    error: str | None = None                 # an op that failed (e.g. OOM without memory gate)


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

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    @property
    def slo_met(self) -> bool:
        e2e = self.e2e_s
        return (not self.failed) and e2e is not None and e2e <= self.slo_s


@dataclass(frozen=True)
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
    events: list[dict] = field(default_factory=list)   # notable events (failures, offloads) for reports
    extras: dict = field(default_factory=dict)         # executor-specific figures, copied into the summary
