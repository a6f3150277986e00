"""Separate serving and training nodes, the common practice LeMix is compared against."""
from __future__ import annotations

from lemix.sched.policies.base import ClusterView, PolicyBase
from lemix.sched.registry import register
from lemix.sched.weights import SyncServersEvery, WeightRegime
from lemix.types import Task


def split(nodes: int, train_fraction: float) -> tuple[frozenset[int], frozenset[int]]:
    """Serving nodes first, then training nodes; both non-empty when nodes >= 2."""
    if nodes == 1:
        return frozenset({0}), frozenset({0})
    n_train = min(nodes - 1, max(1, round(nodes * train_fraction)))
    n_serve = nodes - n_train
    return frozenset(range(n_serve)), frozenset(range(n_serve, nodes))


@register("separate")
class Separate(PolicyBase):
    """Static split of nodes by the training share; each side places least-loaded first;
    the scheduler copies weights from training to serving nodes every K steps."""

    def weight_regime(self) -> WeightRegime:
        return SyncServersEvery(self.params.sync_every)

    def roles(self, view: ClusterView):
        share = self.params.train_share if self.params.train_share is not None else 0.5
        return split(self.params.nodes, share)

    def place(self, task: Task, view: ClusterView, force: bool = False) -> int | None:
        return min(view.candidate_nodes(task), key=view.pending_work_s)


@register("separate-dynamic")
class SeparateDynamic(Separate):
    """Resizes the split with load: the training side gets the nodes' share of predicted work
    that training tasks brought recently (EWMA), re-evaluated at most every `period_s`."""

    period_s = 10.0

    def __init__(self, name, params) -> None:
        super().__init__(name, params)
        share = params.train_share if params.train_share is not None else 0.5
        self._train_work = share
        self._roles = split(params.nodes, share)
        self._last_change_s = 0.0

    def observe(self, task: Task, work_s: float) -> None:
        x = 1.0 if task.is_train else 0.0
        # weight the EWMA by work so long training micro-batches count for what they cost
        a = min(1.0, 0.02 * max(work_s, 1e-6) / 0.05)
        self._train_work = (1 - a) * self._train_work + a * x

    def roles(self, view: ClusterView):
        if view.now_s - self._last_change_s >= self.period_s:
            new = split(self.params.nodes, self._train_work)
            if new != self._roles:
                self._roles = new
                self._last_change_s = view.now_s
        return self._roles

    def place(self, task: Task, view: ClusterView, force: bool = False) -> int | None:
        self.observe(task, view.slo_s(task) / max(self.params.slo_scale, 1e-9))
        return super().place(task, view, force)
