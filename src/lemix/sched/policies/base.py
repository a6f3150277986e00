"""The contract between the scheduler and a placement policy."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from lemix.sched.forecast import Forecast
from lemix.sched.order import DispatchOrder, FirstReady
from lemix.sched.params import SchedParams
from lemix.sched.state import LengthStats
from lemix.sched.weights import LocalWeights, MergeEvery, WeightRegime
from lemix.types import Task


class ClusterView(Protocol):
    """What a policy may read from the scheduler (declared here, in full)."""

    now_s: float
    params: SchedParams
    rng: np.random.Generator

    def candidate_nodes(self, task: Task) -> list[int]: ...
    def forecast(self, node: int, task: Task) -> Forecast: ...
    def response_floor_s(self, node: int, task: Task) -> float: ...
    def response_floors_s(self, nodes: list[int], task: Task) -> list[float]: ...   # of each node
    def idle_nodes(self) -> set[int]: ...
    def idle_forecast(self, task: Task) -> Forecast: ...
    def pending_work_s(self, node: int) -> float: ...
    def slo_s(self, task: Task) -> float: ...
    def length_stats(self, node: int) -> LengthStats: ...
    def last_arrival_s(self, node: int) -> float: ...
    def inference_congested(self, node: int) -> bool: ...
    def train_room(self, node: int) -> bool: ...   # late binding (admission.py): may take training


class Policy(Protocol):
    """A policy places tasks and names the mechanisms it runs with: the order devices run
    their candidates in, and what happens to weights after training steps."""

    name: str
    use_profile: bool        # False: start from a generic latency model, calibrate online
    memory_check: bool       # the wait-or-offload gate

    def dispatch_order(self) -> DispatchOrder: ...
    def weight_regime(self) -> WeightRegime: ...

    def roles(self, view: ClusterView) -> tuple[frozenset[int], frozenset[int]] | None:
        """(serving nodes, training nodes) for separate policies; None when co-located."""
        ...

    def place(self, task: Task, view: ClusterView, force: bool = False) -> int | None:
        """The node for `task`, or None to defer a training task (never when force)."""
        ...


class PolicyBase:
    """Defaults shared by the built-in policies: co-located, first-ready dispatch, the memory
    gate on, weights merged across nodes every `average_every` steps (0: never)."""

    use_profile = True
    memory_check = True
    chunk_training = False   # bounded blocking: cut training ops into chunks of layers (chunking.py)

    def __init__(self, name: str, params: SchedParams) -> None:
        self.name = name
        self.params = params

    def dispatch_order(self) -> DispatchOrder:
        return FirstReady()

    def weight_regime(self) -> WeightRegime:
        every = self.params.average_every
        return MergeEvery(every, self.params.merge_stagger) if every else LocalWeights()

    def roles(self, view: ClusterView) -> tuple[frozenset[int], frozenset[int]] | None:
        return None
