"""What an idle device may run next, and in which order (a dispatch order, chosen by the policy).

A device's candidates are named values: a `Candidate` is a kind, the work it starts (a Batch, a
DecodeIter or None for new work formed at start) and a `CandKey`; lower keys go first. Order on
a device: a pending weight sync; a due optimizer step; then, per the dispatch order,

- `FirstReady` (the baselines, lemix without prioritization): first ready, first served;
- `InferenceFirst` (lemix): inference (decode, prefill) before training backward before training
  forward before admitting a new training task; with `lookahead`, a device does not start a
  training op that would still run when inference already on its way reaches it (and with
  `step_after_inference`, a due optimizer step waits for inference ready on the device; with
  `lookahead_queued`, inference queued on the stage before behind a training op counts as on
  its way, due when that op ends). Training is
  not starved: below `min_train_share` of a device's recent busy time (a decayed window) its
  training ops go first. With `backlog_share` (issue 10), while both workloads are backlogged
  (the scheduler's `backlogged`: training waits for placement and more than a full batch of
  requests is queued per node) the floor is that share: what separation would give training.
  Under overload, inference-first held training at the 10% floor and lost to separate on
  total throughput (the code trace at 8x, 80% training).

Solo training (issue 10; `solo_training`, `--no-solo-training`): on a quiet cluster (requests
were seen, none arrived for `chunk_quiet_s` and none is queued or running anywhere: the
chunker's `quiet`, when training also runs unchunked) there is nothing for the inference-first
order to protect, so training is ordered first ready, as on a dedicated training node: stage 0 admits new
micro-batches ahead of the backwards of earlier ones (as far as the pipeline mode and the memory
gate let it), so more micro-batches share each optimizer step's pipeline drain (apipe steps a
stage only when it holds no stash). Kept inference-first (backward before forward before
admission), a 2-stage node trained 1F1B-like with about M micro-batches per drain and idled 13%
of its device time in the training-only tail of an overloaded run (the code trace at 8x, 80%
training: 0.976x separate's task throughput, whose training nodes run ahead). The first request
to arrive restores inference-first. Per node (any node without inference) it cost the default
scenario requests (a node between two requests ran ahead, and the next one found backward
chunks ready on both stages), so it waits for the cluster to be quiet. The trade: fewer, larger optimizer steps there
(more micro-batches' gradients per step), and a request arriving while the node still works
through its run-ahead finds backward chunks ready on every stage (each blocks it at most the
chunk bound, as bounded blocking accepts).

The order is a seam: a dispatch order that, say, chunks training ops or backs training off
under an SLO budget is one new class here that a policy returns.
"""
from __future__ import annotations

import enum
import math
from typing import Callable, NamedTuple, Protocol

from lemix.sched.state import Device, NodeState
from lemix.types import OpKind

INF = float("inf")
SHARE_WINDOW_S = 10.0   # time constant of the training-share window
_DECODE = OpKind.DECODE   # (an Enum member read through its class costs a metaclass lookup, per use)


class CandKind(enum.Enum):
    SYNC = "sync"              # the stage's pending weight copy / merge
    OPTIM = "optim"            # the stage's optimizer step
    DECODE = "decode"          # the node's running decode iteration reaches this stage
    DECODE_NEW = "decode_new"  # stage 0: start a decode iteration over the pool
    FWD = "fwd"                # a micro-batch's forward (inference prefill or training)
    BWD = "bwd"                # a training micro-batch's backward
    INFER_NEW = "infer_new"    # stage 0: form a prefill batch from the node's queued requests
    TRAIN_NEW = "train_new"    # stage 0: admit the node's next queued training task


class CandKey(NamedTuple):
    cls: int        # the dispatch class (lower first)
    ready_s: float  # then the earliest ready
    tie: int        # then by kind
    bid: int        # then by batch id (-1: work formed at start)


class Candidate(NamedTuple):
    key: CandKey
    kind: CandKind
    obj: object     # Batch (FWD, BWD), DecodeIter (DECODE), None (the rest)


# dispatch classes
SYNC_CLASS, OPTIM_CLASS, INFER_CLASS, BWD_CLASS, FWD_CLASS, NEW_CLASS, STARVED_INFER_CLASS = 0, 1, 2, 3, 4, 5, 6
SYNC_KEY = CandKey(SYNC_CLASS, 0.0, 0, 0)
OPTIM_KEY = CandKey(OPTIM_CLASS, 0.0, 0, 0)
# inference first: a due step waits for the inference waiting on its device (it is training
# work; a step of ~30 ms on the built-in 3B profile went ahead of requests and missed them)
OPTIM_AFTER_INFER_KEY = CandKey(INFER_CLASS, INF, 0, 0)


class Classes(NamedTuple):
    """The dispatch class of each kind of work on one device now."""

    inference: int
    backward: int
    forward: int     # of a training micro-batch already admitted
    admit: int       # a new training task
    step: CandKey = OPTIM_KEY   # a due optimizer step's key


class DispatchOrder(Protocol):
    overtakes_training: bool   # queued inference passes queued training (forecasts model it)
    solo_training: bool        # a quiet cluster orders its training first ready

    def classes(self, dev: Device, now: float, solo: bool = False) -> Classes:
        """`solo`: the cluster is quiet, no inference to protect (the dispatcher asks only
        when `solo_training`)."""
        ...

    def hold_until(self, node: NodeState, s: int, now: float) -> float:
        """A training op that would end after this time must not start on stage s now (INF:
        no such bound)."""
        ...

    def look(self, node: NodeState, s: int, now: float, solo: bool = False) -> None:
        """A look at stage s that finds no candidate: change what hold_until() and classes()
        would have changed there (the dispatcher skips building candidates it knows are none)."""
        ...


class FirstReady:
    overtakes_training = False
    solo_training = False
    _ALL = Classes(INFER_CLASS, INFER_CLASS, INFER_CLASS, INFER_CLASS)

    def classes(self, dev: Device, now: float, solo: bool = False) -> Classes:
        return self._ALL

    def hold_until(self, node: NodeState, s: int, now: float) -> float:
        return INF

    def look(self, node: NodeState, s: int, now: float, solo: bool = False) -> None:
        pass   # (it keeps no state)


class InferenceFirst:
    overtakes_training = True
    _NORMAL = Classes(INFER_CLASS, BWD_CLASS, FWD_CLASS, NEW_CLASS)
    _STARVED = Classes(STARVED_INFER_CLASS, BWD_CLASS, FWD_CLASS, NEW_CLASS)  # training first until its share recovers

    def __init__(self, min_train_share: float, *, lookahead: bool = True,
                 backlog_share: float | None = None, solo_training: bool = False,
                 step_after_inference: bool = False, lookahead_queued: bool = False) -> None:
        self.min_train_share = min_train_share
        self.lookahead = lookahead
        self.solo_training = solo_training   # issue 10 (overload): see the module's docstring
        self.queued_before = _queued_before if lookahead_queued else (lambda node, s: False)
        if step_after_inference:   # (issue 10) see OPTIM_AFTER_INFER_KEY
            self._NORMAL = self._NORMAL._replace(step=OPTIM_AFTER_INFER_KEY)
        # issue 10 (both backlogged): while both workloads are backlogged, training's floor is
        # the share of devices separation would give it; `backlogged` is set by the Scheduler
        self.backlog_share = backlog_share
        self.backlogged: Callable[[], bool] | None = None

    def classes(self, dev: Device, now: float, solo: bool = False) -> Classes:
        if solo and self.solo_training:
            return FirstReady._ALL   # nothing to protect: training first ready (solo training)
        return self._STARVED if self.training_starved(dev, now) else self._NORMAL

    def look(self, node: NodeState, s: int, now: float, solo: bool = False) -> None:
        """hold_until() and classes() change nothing but the device's busy-share window, which
        they may age to `now` (later shares depend on when it was aged, to the last bit):
        classes() does unless `solo` orders training first ready; hold_until() may."""
        if solo and self.solo_training:
            self.hold_until(node, s, now)
        else:
            decay(node.devices[s], now)

    def floor(self) -> float:
        """Training's share of a device's busy time below which it goes first."""
        if self.backlog_share is not None and self.backlogged is not None and self.backlogged():
            return max(self.min_train_share, self.backlog_share)
        return self.min_train_share

    def training_starved(self, dev: Device, now: float) -> bool:
        """Below the floor of the device's recent busy time, training goes first."""
        decay(dev, now)
        return dev.busy_ewma_s > 0 and dev.train_ewma_s < self.floor() * dev.busy_ewma_s

    def hold_until(self, node: NodeState, s: int, now: float) -> float:
        """Lookahead: when running inference work reaches stage s (its op on the stage before
        ends; for stage 0, a decode iteration finishing the last stage). The training-share
        bound overrides it."""
        if not self.lookahead:
            return INF
        prev = node.devices[s - 1] if s > 0 else node.devices[-1]
        op = prev.running
        if op is None:
            return INF
        if op.train:
            # (issue 10) inference queued on the stage before, behind the training op running
            # there, comes next: it reaches this stage no earlier than that op's end
            if s == 0 or not self.queued_before(node, s):
                return INF
        elif s == 0 and op.kind is not _DECODE:
            return INF
        due = prev.running_start_s + op.predicted_s
        if self.training_starved(node.devices[s], now):
            return INF
        return due


def _queued_before(node: NodeState, s: int) -> bool:
    """Inference waits to run on stage s - 1 of the node (not running there yet)."""
    if s == 1 and node.infer_wait:
        return True
    it = node.decode
    if it is not None and it.stage == s - 1 and not it.running:
        return True
    for b in node.batches.values():   # (a plain loop: asked per look at a stage behind training)
        if not b.train and not b.running and b.fwd_next == s - 1:
            return True
    return False


def decay(dev: Device, now: float) -> None:
    """Age the device's busy-time window to `now`."""
    if now > dev.ewma_at_s:
        k = math.exp(-(now - dev.ewma_at_s) / SHARE_WINDOW_S)
        dev.busy_ewma_s *= k
        dev.train_ewma_s *= k
        dev.ewma_at_s = now


def account_busy(dev: Device, train: bool, start_s: float, end_s: float) -> None:
    """An op ended on the device: add its time (within the window) to the busy share."""
    decay(dev, end_s)
    busy = max(0.0, end_s - max(start_s, end_s - SHARE_WINDOW_S))
    dev.busy_ewma_s += busy
    if train:
        dev.train_ewma_s += busy
