"""Placement: which node each arrived task goes to, and when.

Arrived tasks wait in `incoming` until the next plan(); inference first (by priority, then
arrival), then training. The policy places each (a registry-chosen object, behind the
ClusterView it reads); a training task it declines (Eq. 4 deprioritization) goes to the
deferred queue, FIFO, and is offered again at every plan: it is placed by force after
`max_defer_s`, or while training's share of placed tasks is below `min_train_share`.
Placement also owns the node roles (separate policies: serving vs training nodes) and each
node's owed predicted work.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from lemix.sched.cluster import Cluster
from lemix.sched.latency import Profile
from lemix.sched.ledger import TaskLedger
from lemix.sched.params import SchedParams
from lemix.sched.times import StageTimes
from lemix.sched.weights import Weights
from lemix.types import Op, OpKind, RunResult, Task

Roles = tuple[frozenset[int], frozenset[int]]   # (serving nodes, training nodes)
_UNSET = object()


class Placement:
    def __init__(self, params: SchedParams, profile: Profile, cluster: Cluster, times: StageTimes,
                 ledger: TaskLedger, weights: Weights, policy, result: RunResult,
                 timer: Callable[[], float] | None) -> None:
        self.params = params
        self.profile = profile
        self.cluster = cluster
        self.times = times
        self.ledger = ledger
        self.weights = weights
        self.policy = policy
        self.result = result
        self.timer = timer
        self.incoming: deque[Task] = deque()
        self.deferred: deque[tuple[Task, float]] = deque()   # (task, deferred since)
        self._owed: list[float] = [0.0] * params.nodes
        self._placed_train = 0
        self._placed_total = 0
        self._roles: object = _UNSET
        self.admission = None   # hook (issue 10): TrainAdmission, set by the Scheduler (admission.py)

    def offer(self, task: Task) -> None:
        """A task to place at the next plan (arrived, or offered again)."""
        self.incoming.append(task)

    @property
    def pending(self) -> bool:
        return bool(self.incoming or self.deferred)

    # ------------------------------------------------------------------ what policies read
    def candidate_nodes(self, task: Task) -> list[int]:
        return self._candidates(task)

    def _pool(self, task: Task) -> list[int]:
        healthy = [n.index for n in self.cluster.nodes if n.healthy]
        if not healthy:
            return []
        if self._roles is None:
            return healthy
        serve, train = self._roles
        pool = train if task.is_train else serve
        return [n for n in healthy if n in pool] or healthy

    def _candidates(self, task: Task) -> list[int]:
        """The nodes that may take the task; a request skips a node taking a staggered merge
        (it cannot serve until the copy ends) while another node can take it."""
        nodes = self._pool(task)
        if task.is_train or len(nodes) < 2:
            return nodes
        free = [n for n in nodes if not self.weights.merging(self.cluster.nodes[n])]
        return free or nodes

    def pending_work_s(self, node: int) -> float:
        return self._owed[node]

    # ------------------------------------------------------------------ placing
    def place(self, now: float, view) -> None:
        """Apply the policy's roles, place what arrived, then offer deferred training again."""
        self.apply_roles(self.policy.roles(view))
        self._place_incoming(now, view)
        self._reoffer_deferred(now, view)

    def _place_incoming(self, now: float, view) -> None:
        if not self.incoming:
            return
        tasks = sorted(self.incoming, key=lambda t: (t.is_train, -t.priority, t.arrival_s, t.task_id))
        self.incoming.clear()
        for task in tasks:
            if task.is_train and self.deferred:
                self.deferred.append((task, now))   # keep FIFO among training tasks
                self.result.deferred_total += 1
                continue
            if task.is_train and self.admission is not None and \
                    not self.admission.any_room(self.candidate_nodes(task)):
                self.deferred.append((task, now))   # late binding: no node has room yet
                continue
            if not self._try_place(task, now, False, view):
                self.deferred.append((task, now))
                self.result.deferred_total += 1

    def _reoffer_deferred(self, now: float, view) -> None:
        while self.deferred:
            task, since = self.deferred[0]
            starving = (self._placed_total > 0 and
                        self._placed_train / self._placed_total < self.params.min_train_share)
            force = starving or now >= since + self.params.max_defer_s  # the wake-up's float
            adm = self.admission
            if adm is not None:   # hook (issue 10): late binding and liveness (admission.py)
                if not adm.any_room(self.candidate_nodes(task)):
                    return   # every node is busy with training: placed when one has room
                force = force or adm.cluster_idle()
            if not self._try_place(task, now, force, view):
                self.cluster.wakeups.add(since + self.params.max_defer_s)
                return
            self.deferred.popleft()
            self.ledger.deferred_s[task.task_id] = now - since

    def _try_place(self, task: Task, now: float, force: bool, view) -> bool:
        if not self.candidate_nodes(task):
            self.ledger.fail(task, -1, "no healthy node left")
            return True
        timer = self.timer
        t0 = timer() if timer else 0.0
        node = self.policy.place(task, view, force)
        if timer:
            self.result.decision_us.append((timer() - t0) * 1e6)
        if node is None:
            if force:
                raise RuntimeError(f"policy {self.policy.name} refused a forced placement")
            return False
        self._assign(task, node)
        return True

    def _assign(self, task: Task, node_idx: int) -> None:
        node = self.cluster.nodes[node_idx]
        self.ledger.node_of[task.task_id] = node_idx
        node.lengths.add(task.prompt_tokens)
        node.last_arrival_s = task.arrival_s
        fwd, bwd = self.times.of(task)
        self._owed[node_idx] += sum(fwd) + sum(bwd)
        self._placed_total += 1
        if task.is_train:
            self._placed_train += 1
            node.train_wait.append(task)
        else:
            node.infer_wait.append(task)
            node.infer_wait.sort(key=lambda t: (-t.priority, t.arrival_s, t.task_id))
        self.cluster.touch(node)

    def op_ended(self, op: Op) -> None:
        """A forward or backward the node owed is done."""
        if op.kind is OpKind.FWD or op.kind is OpKind.BWD:
            rest = self._owed[op.node] - op.predicted_s
            self._owed[op.node] = rest if rest > 1e-9 else 0.0  # no float residue (luf ties)

    def node_failed(self, node_idx: int) -> None:
        self._owed[node_idx] = 0.0

    # ------------------------------------------------------------------ roles
    def apply_roles(self, roles: Roles | None) -> None:
        if roles == self._roles:
            return
        old = None if self._roles is _UNSET else self._roles
        self._roles = roles
        for n in self.cluster.nodes:
            trains = roles is None or n.index in roles[1]
            serves = roles is None or n.index in roles[0]
            became_server = old is not None and serves and n.index not in old[0]
            n.trains, n.serves = trains, serves
            for s, d in enumerate(n.devices):
                st = self.profile.stages[s]
                d.static_bytes = st.weight_bytes + (st.train_state_bytes if trains else 0)
            if became_server:
                self.weights.request_sync(n)
