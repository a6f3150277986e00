"""Weights: versions, optimizer steps, weight copies and merges, staleness.

A node's weight version counts its own optimizer steps, or is the freshest version a copy or a
merge brought. A weight regime (chosen by the policy) says what happens after steps:

- `LocalWeights`: a co-located node serves what it trains (updates visible at once);
- `MergeEvery(K)`: co-located nodes train on different data; every K steps (cluster-wide) every
  healthy node replaces its weights by the sample-weighted average of all copies (FedAvg).
  Staggered (the default), one node takes the merge at a time, so the others keep serving: the
  first node's copy snapshots every member's weights, and each later node adds (average - its
  snapshot) to its current weights, keeping the training it did in between;
- `SyncServersEvery(K)` (separate): every K steps serving-only nodes copy the freshest trainer's.

Each stage takes its copy or merge when no pending backward needs its old weights.
"""
from __future__ import annotations

from typing import Protocol

from lemix.sched.cluster import Cluster
from lemix.sched.latency import Profile
from lemix.sched.outputs import Recorder
from lemix.sched.pipeline import PipelineMode
from lemix.sched.state import Batch, NodeState
from lemix.types import Applied, Op, SyncSpec, Task, TrainStepRecord


class WeightRegime(Protocol):
    def after_step(self, weights: "Weights") -> None:
        """A node completed an optimizer step on every stage."""
        ...


class LocalWeights:
    def after_step(self, weights: "Weights") -> None:
        pass


class _EveryK:
    """Acts every `every` cluster steps."""

    def __init__(self, every: int) -> None:
        self.every = every
        self._steps = 0

    def after_step(self, weights: "Weights") -> None:
        self._steps += 1
        if self._steps >= self.every:
            self._steps = 0
            self.act(weights)

    def act(self, weights: "Weights") -> None:
        raise NotImplementedError


class MergeEvery(_EveryK):
    def __init__(self, every: int, stagger: bool = False) -> None:
        super().__init__(every)
        self.stagger = stagger

    def act(self, weights: "Weights") -> None:
        weights.request_merge(self.stagger)


class SyncServersEvery(_EveryK):
    def act(self, weights: "Weights") -> None:
        for n in weights.cluster.nodes:
            if n.serves and not n.trains:
                weights.request_sync(n)


class Weights:
    def __init__(self, profile: Profile, cluster: Cluster, pipe: PipelineMode, rec: Recorder,
                 regime: WeightRegime) -> None:
        self.profile = profile
        self.cluster = cluster
        self.pipe = pipe
        self.rec = rec
        self.regime = regime
        self.max_version = 0
        self._version_first_s: dict[int, float] = {0: 0.0}
        self._merge_samples = [0] * len(cluster.nodes)   # samples trained per node since the last merge
        self._unstepped: dict[int, list[Task]] = {}      # node -> trained tasks its next step applies
        self._round = 0                                  # staggered merges: the last round's number
        self._stagger: list[int] = []                    # ... nodes still to take the current one
        self._stagger_spec: SyncSpec | None = None
        self._stagger_first = -1                         # ... the node whose copy snapshots it
        self._merge_due = False                          # ... another round was asked for meanwhile

    def staleness(self, node: NodeState, now: float) -> tuple[int, float]:
        """How far the node's weights are behind the freshest: in steps, and in seconds since
        the first version it lacks appeared."""
        steps = self.max_version - node.version
        return steps, (now - self._version_first_s[node.version + 1] if steps > 0 else 0.0)

    # ------------------------------------------------------------------ training steps
    def trained(self, node: NodeState, b: Batch) -> None:
        """A micro-batch's backward finished on every stage: the node's next step applies it."""
        node.step_samples += b.size
        self._merge_samples[node.index] += b.size
        self._unstepped.setdefault(node.index, []).extend(b.tasks)
        node.step_tokens += b.tokens

    def stepped(self, node: NodeState, op: Op, end_s: float) -> None:
        """An OPTIM op ended; once every stage took the step, the node's version moves."""
        dev = node.devices[op.stage]
        dev.grads_pending = 0
        dev.step_count += 1
        steps = min(d.step_count for d in node.devices)
        if steps <= node.steps_done:
            return
        node.version += steps - node.steps_done
        node.steps_done = steps
        version = node.version
        applied = self._unstepped.pop(node.index, [])
        self.rec.train_step(TrainStepRecord(node.index, version, end_s, node.step_samples, node.step_tokens))
        if applied:
            self.rec.applied(Applied(node.index, version, end_s, tuple(t.task_id for t in applied)))
        node.step_samples = node.step_tokens = 0
        if version > self.max_version:
            self.max_version = version
            self._version_first_s[version] = end_s
        self.regime.after_step(self)

    # ------------------------------------------------------------------ copies and merges
    def request_merge(self, stagger: bool = False) -> None:
        """Every healthy node replaces its weights by the average of all nodes' copies weighted
        by the samples each trained since the last merge, so a node that only served gets the
        trainers' progress and a trainer is not pulled back by it. The result counts as the
        freshest version. Staggered: one node at a time (a request while a round is still going
        starts the next round when this one ends)."""
        if stagger and self._stagger_spec is not None:
            self._merge_due = True
            return
        nodes = self.cluster.nodes
        healthy = [n for n in nodes if n.healthy]
        total = sum(self._merge_samples[n.index] for n in healthy)
        if len(healthy) < 2 or total <= 0:
            return
        mix = tuple((self._merge_samples[n.index] / total) if n.healthy else 0.0 for n in nodes)
        self._merge_samples = [0] * len(nodes)
        version = max(n.version for n in healthy)
        if not stagger:
            spec = SyncSpec(-1, mix, version)
            for n in healthy:
                self._start_sync(n, spec)
            return
        self._round += 1
        self._stagger_spec = SyncSpec(-1, mix, version, self._round, tuple(n.index for n in healthy))
        self._stagger = [n.index for n in healthy]
        self._stagger_first = -1
        self._next_staggered()

    def merging(self, node: NodeState) -> bool:
        """The node is taking (or about to take) a staggered merge's copy."""
        return self._stagger_spec is not None and any(d.sync is self._stagger_spec for d in node.devices)

    def _start_sync(self, node: NodeState, spec: SyncSpec) -> None:
        for d in node.devices:
            d.sync = spec
        self.pipe.flush(node)
        self.cluster.touch(node)

    def _next_staggered(self) -> None:
        """The next healthy member takes the staggered merge; the round ends after the last."""
        nodes = self.cluster.nodes
        while self._stagger:
            n = nodes[self._stagger.pop(0)]
            if n.healthy:
                if self._stagger_first < 0:
                    self._stagger_first = n.index
                self._start_sync(n, self._stagger_spec)
                return
        self._stagger_spec = None
        if self._merge_due:
            self._merge_due = False
            self.request_merge(True)

    def request_sync(self, node: NodeState) -> None:
        """Copy weights into every stage of `node` from the freshest training node."""
        trainers = [n for n in self.cluster.nodes if n.trains and n.healthy and n is not node]
        if not trainers:
            return
        src = max(trainers, key=lambda n: (n.version, -n.index))
        self._start_sync(node, SyncSpec(src.index, (), src.version))

    def sync_bytes(self, node: NodeState, s: int, spec: SyncSpec) -> int:
        """What the stage's copy moves: its weights, from every other contributing node."""
        nbytes = self.profile.stages[s].copy_bytes   # LoRA: the adapters only
        if spec.round and node.index != self._stagger_first:
            return nbytes   # a later member of a staggered merge: its delta only
        if spec.round:  # the first member snapshots every other member's copy
            return nbytes * max(1, len(spec.members) - 1)
        if spec.mix:  # pull every other contributing node's copy
            nbytes *= max(1, sum(1 for i, w in enumerate(spec.mix) if w > 0 and i != node.index))
        return nbytes

    def synced(self, node: NodeState, op: Op) -> None:
        """A SYNC op ended on one stage; once every stage has its copy, the version moves."""
        dev = node.devices[op.stage]
        pending = dev.sync
        if pending is None or pending.average != op.sync.average or (
                not pending.average and pending.source != op.sync.source):
            return  # re-requested from another source while this copy ran (its source died)
        dev.sync = None
        if all(d.sync is None for d in node.devices):
            # the weight version moves; step counts stay (S-PP rounds are numbered by them)
            node.version = max(node.version, pending.version)
            if pending.round and pending is self._stagger_spec:
                self._next_staggered()

    # ------------------------------------------------------------------ failures
    def node_failed(self, dead: NodeState) -> list[Task]:
        """The dead node's trained-but-unstepped tasks (their gradients died with it: they train
        again); a copy another node was taking from it is taken from another source."""
        lost = self._unstepped.pop(dead.index, [])
        taking = any(d.sync is not None and d.sync.round for d in dead.devices)
        for d in dead.devices:
            d.sync = None
        if taking and self._stagger_spec is not None:
            self._next_staggered()   # the dead node was taking the staggered merge: the next one does
        for other in self.cluster.nodes:
            if other.healthy and any(d.sync is not None and not d.sync.average and d.sync.source == dead.index
                                     for d in other.devices):
                for d in other.devices:
                    d.sync = None
                self.request_sync(other)
        return lost
