"""The nodes' state and what changed in it: the bookkeeping every collaborator shares.

A node is `touch`ed whenever its state changes: plan() dispatches only on touched nodes (and on
nodes waiting for a time to pass), its forecast timelines are rebuilt, and whether it is idle is
looked at again. `wakeups` are the times plan() must be called at even if nothing happens.
"""
from __future__ import annotations

from lemix.sched.latency import Profile
from lemix.sched.params import SchedParams
from lemix.sched.state import Device, NodeState


class Cluster:
    def __init__(self, params: SchedParams, profile: Profile) -> None:
        self.nodes = [NodeState(i, [Device(0, profile.capacity_bytes) for _ in range(params.stages)])
                      for i in range(params.nodes)]
        self.wakeups: set[float] = set()
        self._touched: set[int] = set(range(params.nodes))
        self._waiting: set[int] = set()      # nodes whose dispatch waits for a time (T_w, T_max)
        self._idle: set[int] = set()         # see idle_nodes
        self._idle_check: set[int] = set(range(params.nodes))

    def touch(self, node: NodeState) -> None:
        node.dirty = True
        self._touched.add(node.index)
        self._idle_check.add(node.index)

    def wait_until(self, node: NodeState, t: float) -> None:
        """The node's dispatch waits for time t (plan() is called again then)."""
        self.wakeups.add(t)
        self._waiting.add(node.index)

    def wait(self, node: NodeState) -> None:
        """The node's dispatch waits for something that will happen (an op ending)."""
        self._waiting.add(node.index)

    def begin_plan(self, now: float) -> None:
        w = self.wakeups
        if w and min(w) <= now:   # (most plans find none passed: the set is kept)
            self.wakeups = {t for t in w if t > now}

    def take_touched(self) -> list[NodeState]:
        """The nodes to dispatch on now (touched or waiting), in index order."""
        return [self.nodes[n] for n in sorted(self._touched)]

    def dispatched(self, node: NodeState) -> None:
        self._waiting.discard(node.index)

    def end_plan(self) -> None:
        """Nodes still waiting are looked at again at the next plan."""
        self._touched = set(self._waiting)

    def next_wakeup(self) -> float | None:
        return min(self.wakeups) if self.wakeups else None

    def idle_nodes(self) -> set[int]:
        """Nodes with nothing running, queued or in flight (they share one forecast). Kept up
        to date lazily: a node is re-examined after it was touched. Read only."""
        for n in self._idle_check:
            if self.nodes[n].is_idle():
                self._idle.add(n)
            else:
                self._idle.discard(n)
        self._idle_check.clear()
        return self._idle
