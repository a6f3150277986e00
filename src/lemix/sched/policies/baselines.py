"""Co-located baselines: naivemix (round-robin), random, luf (least-utilized first)."""
from __future__ import annotations

from lemix.sched.policies.base import ClusterView, PolicyBase
from lemix.sched.registry import register
from lemix.types import Task


@register("naivemix")
class NaiveMix(PolicyBase):
    """Co-located, round-robin over nodes in queue order."""

    def __init__(self, name, params) -> None:
        super().__init__(name, params)
        self._next = 0

    def place(self, task: Task, view: ClusterView, force: bool = False) -> int | None:
        nodes = view.candidate_nodes(task)
        node = nodes[self._next % len(nodes)]
        self._next += 1
        return node


@register("random")
class RandomPolicy(PolicyBase):
    def place(self, task: Task, view: ClusterView, force: bool = False) -> int | None:
        nodes = view.candidate_nodes(task)
        return nodes[int(view.rng.integers(len(nodes)))]


@register("luf")
class LeastUtilizedFirst(PolicyBase):
    """The node owing the least predicted work; ties to the lowest index."""

    def place(self, task: Task, view: ClusterView, force: bool = False) -> int | None:
        return min(view.candidate_nodes(task), key=view.pending_work_s)
