"""The LeMix scheduler: one state machine driven by both executors.

Contract (vLLM-v1 style, two calls plus arrivals):

    sched.on_arrival(task)          a task arrived (at clock.now())
    plan = sched.plan()             ops to start now on idle devices (+ when to call again)
    sched.on_op_finished(result)    an op ended; absorb its result

The simulator and the real engine differ only in the clock they inject and in how they execute
ops. No torch, no threads, no sockets, no wall clock here: `timer` (for measuring decision time)
is injected too.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from lemix.clock import Clock
from lemix.sched.dispatch import Dispatcher
from lemix.sched.forecast import Forecast, NodeTimeline, build_timeline, forecast_alone, forecast_chain
from lemix.sched.latency import LatencyModel, Profile, generic_profile
from lemix.sched.params import SchedParams
from lemix.sched.pipeline import make_pipeline
from lemix.sched.registry import make_policy
from lemix.sched.state import SYNC_NONE, Device, LengthStats, NodeState
from lemix.types import Op, OpKind, OpResult, RequestRecord, RunResult, Task, TaskKind, TrainTaskRecord

_UNSET = object()
_CHAIN_CAP = 32  # queued tasks per node modeled one by one in a forecast; the rest as one block


@dataclass(frozen=True)
class Plan:
    ops: tuple[Op, ...] = ()
    wakeup_s: float | None = None   # call plan() again at this time even if nothing happens


class Scheduler(Dispatcher):
    def __init__(self, params: SchedParams, profile: Profile, clock: Clock, *,
                 timer: Callable[[], float] | None = None) -> None:
        if profile.num_stages != params.stages:
            raise ValueError(f"profile has {profile.num_stages} stages, the cluster {params.stages}")
        self.params = params
        self.profile = profile
        self.clock = clock
        self.timer = timer
        self.policy = make_policy(params.policy, params)
        self.memory_check = self.policy.memory_check and not params.no_memory_check
        self.infer_first = self.policy.infer_first
        self.lat = LatencyModel(profile if self.policy.use_profile else generic_profile(profile))
        self.pipe = make_pipeline(params.pipeline, params.microbatches)
        self.rng = np.random.default_rng(params.seed)
        self.nodes = [NodeState(i, [Device(0, profile.capacity_bytes) for _ in range(params.stages)])
                      for i in range(params.nodes)]
        self.result = RunResult(policy=params.policy, nodes=params.nodes, stages=params.stages)
        self._incoming: deque[Task] = deque()
        self._deferred: deque[tuple[Task, float]] = deque()
        self._tasks: dict[int, Task] = {}
        self._resolved: set[int] = set()
        self._slo: dict[int, float] = {}
        self._raw_times: dict[tuple[int, int, bool], tuple[list[float], list[float]]] = {}
        self._times: dict[tuple[int, int, bool], list] = {}   # shape -> [version, fwd, bwd, chain]
        self._corr: tuple[int, list[float], list[float]] = (-1, [], [])
        self._owed: list[float] = [0.0] * params.nodes
        self._timelines: dict[tuple[int, str], NodeTimeline] = {}
        self._idle_fc: tuple[tuple, Forecast | None] = ((), None)   # see idle_forecast
        self._probe: tuple = ((),)                                   # see inference_congested
        self._infer_len = LengthStats()
        self._infer_out = LengthStats()
        self._placed_train = 0
        self._placed_total = 0
        self._roles: object = _UNSET
        self._steps_since_sync = 0
        self._merge_samples = [0] * params.nodes   # samples trained per node since the last merge
        self._version_first_s: dict[int, float] = {0: 0.0}
        self._max_version = 0
        self._wakeups: set[float] = set()
        self._init_dispatch()
        self._apply_roles(self.policy.roles(self))

    # ------------------------------------------------------------------ contract
    def on_arrival(self, task: Task) -> None:
        if task.task_id in self._tasks:
            raise ValueError(f"task {task.task_id} arrived twice")
        self._tasks[task.task_id] = task
        if not task.is_train:
            self._infer_len.add(task.prompt_tokens)
            self._infer_out.add(task.output_tokens)
        too_big = self._too_big(task)
        if too_big:
            self._fail_task(task, -1, too_big)
            return
        self._incoming.append(task)

    def plan(self) -> Plan:
        now = self.clock.now()
        self._wakeups = {w for w in self._wakeups if w > now}
        self._apply_roles(self.policy.roles(self))
        self._place_incoming(now)
        self._reoffer_deferred(now)
        ops: list[Op] = []
        for n in sorted(self._touched):
            ops.extend(self._dispatch_node(self.nodes[n], now))
        self._touched = set(self._waiting_nodes)
        wake = min(self._wakeups) if self._wakeups else None
        return Plan(tuple(ops), wake)

    def on_op_finished(self, result: OpResult) -> None:
        self._finish_op(result)

    def on_node_failed(self, node_idx: int, why: str = "node failed") -> list[int]:
        """A node died: take it out of placement, cancel its ops, and offer every task it held
        again (inference restarts from its prompt; training tasks whose gradients died with the
        node, applied or not, are trained again). Returns the re-queued task ids."""
        node = self.nodes[node_idx]
        now = self.clock.now()
        node.healthy = False
        for op_id, (op, _) in list(self._running.items()):
            if op.node == node_idx:
                del self._running[op_id]
                self._cancelled.add(op_id)
        tasks = list(node.infer_wait) + list(node.train_wait)
        tasks += [t for b in node.batches.values() for t in b.tasks]
        tasks += [q.task for q in node.seqs.values()]
        lost = self._unstepped.pop(node_idx, [])
        lost_ids = {t.task_id for t in lost}
        self.result.train_tasks = [r for r in self.result.train_tasks if r.task_id not in lost_ids]
        tasks += lost
        node.infer_wait, node.train_wait, node.batches, node.seqs = [], [], {}, {}
        node.decode = None
        # the node's S-PP rounds restart after the last one every stage completed
        r0 = max(d.step_count for d in node.devices)
        for d in node.devices:
            d.step_count = r0
        node.steps_done = r0
        node.train_round = r0
        node.round_members = {r: m for r, m in node.round_members.items() if r < r0}
        self.pipe.forget_rounds(node, r0)
        for d in node.devices:
            d.running, d.held_bytes, d.host_bytes, d.running_extra_bytes = None, 0, 0, 0
            d.grads_pending, d.wait_since_s, d.wait_key, d.sync_pending = 0, None, None, -1
        self._owed[node_idx] = 0.0
        for other in self.nodes:   # a sync from the dead node is re-sourced
            if other.healthy and any(d.sync_pending == node_idx for d in other.devices):
                for d in other.devices:
                    d.sync_pending = -1
                self._request_sync(other)
        requeued = []
        for t in sorted(tasks, key=lambda t: (t.arrival_s, t.task_id)):
            self._resolved.discard(t.task_id)
            self._served.pop(t.task_id, None)
            self._kv.pop(t.task_id, None)
            self._incoming.append(t)
            requeued.append(t.task_id)
        self.result.events.append({"time_s": now, "event": "node_failed", "node": node_idx, "error": why,
                                   "requeued": requeued})
        self._touch(node)
        return requeued

    def on_node_restored(self, node_idx: int, version: int) -> None:
        """A failed node is back, with weights of `version` copied from a healthy peer."""
        node = self.nodes[node_idx]
        node.healthy = True
        node.version = version
        self.result.events.append({"time_s": self.clock.now(), "event": "node_restored",
                                   "node": node_idx, "version": version})
        self._touch(node)

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing running, nothing deferred."""
        return (not self._incoming and not self._deferred and not self._running
                and all(not n.infer_wait and not n.train_wait and not n.batches and not n.seqs
                        and not any(d.grads_pending or d.sync_pending != SYNC_NONE for d in n.devices)
                        for n in self.nodes))

    def forget(self, task_ids) -> None:
        """The driver has consumed these resolved tasks' records (a long-running server that
        keeps no history): drop every per-task entry, so memory stays flat with uptime. A task
        still needed (unresolved, or trained but not yet stepped) must not be passed."""
        for tid in task_ids:
            self._tasks.pop(tid, None)
            self._resolved.discard(tid)
            self._slo.pop(tid, None)
            self._node_of.pop(tid, None)
            self._served.pop(tid, None)
            self._deferred_s.pop(tid, None)

    def finalize(self) -> RunResult:
        """Count every task that never finished as failed ("unfinished"); return the result."""
        for tid, task in self._tasks.items():
            if tid not in self._resolved:
                self._fail_task(task, self._node_of.get(tid, -1), "unfinished when the run ended")
        return self.result

    # ------------------------------------------------------------------ view for policies
    @property
    def now_s(self) -> float:
        return self.clock.now()

    def candidate_nodes(self, task: Task) -> list[int]:
        healthy = [n.index for n in self.nodes if n.healthy]
        if not healthy:
            return []
        if self._roles is None:
            return healthy
        serve, train = self._roles
        pool = train if task.is_train else serve
        return [n for n in healthy if n in pool] or healthy

    def slo_s(self, task: Task) -> float:
        slo = self._slo.get(task.task_id)
        if slo is None:
            slo = self._compute_slo(task)
            self._slo[task.task_id] = slo
        return slo

    def pending_work_s(self, node: int) -> float:
        return self._owed[node]

    def length_stats(self, node: int) -> LengthStats:
        return self.nodes[node].lengths

    def last_arrival_s(self, node: int) -> float:
        return self.nodes[node].last_arrival_s

    def forecast(self, node: int, task: Task) -> Forecast:
        if node in self.idle_nodes():
            return self.idle_forecast(task)
        fwd, bwd = self._stage_times(task)
        jump = self.infer_first and not task.is_train   # inference overtakes queued training
        f = forecast_chain(self._timeline(node, "all"), self.clock.now(), task.arrival_s, fwd, bwd, jump)
        return self._with_decode(f, task, self.nodes[node].seqs)

    def idle_forecast(self, task: Task) -> Forecast:
        """The forecast on any idle node: every idle node has the same (empty) timeline, so one
        computation per task and time serves them all."""
        now = self.clock.now()
        key = (task.batch_size, task.prompt_tokens, task.output_tokens, task.is_train, task.arrival_s,
               now, self.lat.version)
        if self._idle_fc[0] != key:
            fwd, bwd = self._stage_times(task)
            self._idle_fc = (key, self._with_decode(forecast_alone(now, task.arrival_s, fwd, bwd), task, {}))
        return self._idle_fc[1]

    def _with_decode(self, f: Forecast, task: Task, seqs: dict) -> Forecast:
        """Generate mode: R also covers the request's decode iterations on the node."""
        if self.params.generate and not task.is_train and task.output_tokens > 1:
            it = self._decode_iter_s(len(seqs) + 1, sum(s.kv_tokens for s in seqs.values())
                                     + task.prompt_tokens)
            f = Forecast(f.ii_s, f.r_s + (task.output_tokens - 1) * it, f.stage_s, f.ii_paper_s,
                         f.first_start_s)
        return f

    def idle_nodes(self) -> set[int]:
        """Nodes with nothing running, queued or in flight (they share one forecast). Kept up
        to date lazily: a node is re-examined after it was touched. Read only."""
        for n in self._idle_check:
            if self._node_idle(self.nodes[n]):
                self._idle_nodes.add(n)
            else:
                self._idle_nodes.discard(n)
        self._idle_check.clear()
        return self._idle_nodes

    def response_floor_s(self, node: int, task: Task) -> float:
        """A lower bound on forecast(node, task).r_s from the node's running ops alone (O(S), no
        timeline): each stage starts no earlier than its input is ready and its running op ends
        (a running training op that a jumping inference query would pass is left out)."""
        fwd, _ = self._stage_times(task)
        jump = self.infer_first and not task.is_train
        t = max(self.clock.now(), task.arrival_s)
        for d, f in zip(self.nodes[node].devices, fwd):
            op = d.running
            if op is not None and not (jump and op.train and d.running_start_s >= t):
                end = d.running_start_s + op.predicted_s
                if end > t:
                    t = end
            t = t + f
        return t - task.arrival_s

    def inference_congested(self, node: int) -> bool:
        """Eq. 4: would a typical request queued on this node now miss tau_R x SLO, counting
        only the inference it already owes (training yields to inference)?"""
        if self._infer_len.n == 0:
            return False
        now = self.clock.now()
        key = (max(1, int(self._infer_len.mean)), max(1, int(self._infer_out.mean)), now, self.lat.version)
        if self._probe[0] != key:   # the typical request, its stage times, its limit, the empty verdict
            probe = Task(-1, TaskKind.INFER, now, key[0], key[1])
            fwd, _ = self._stage_times(probe)
            limit = self.params.tau_r * self._compute_slo(probe)
            self._probe = (key, probe, fwd, limit, forecast_alone(now, now, fwd, []).r_s > limit)
        _, probe, fwd, limit, empty_verdict = self._probe
        if self._no_inference(self.nodes[node]):   # its inference view is empty
            return empty_verdict
        f = forecast_chain(self._timeline(node, "infer"), now, probe.arrival_s, fwd, [], False)
        return f.r_s > limit

    @staticmethod
    def _no_inference(node: NodeState) -> bool:
        """No inference running, queued or in flight: its inference-only timeline is empty."""
        return (not node.infer_wait and not node.seqs and node.decode is None
                and all(b.train for b in node.batches.values())
                and all(d.running is None or d.running.train for d in node.devices))

    @staticmethod
    def _node_idle(node: NodeState) -> bool:
        """Nothing running, queued or in flight: its forecast timeline is empty."""
        return (not node.batches and not node.infer_wait and not node.train_wait and not node.seqs
                and node.decode is None and all(d.running is None for d in node.devices))

    # ------------------------------------------------------------------ placement
    def _place_incoming(self, now: float) -> None:
        if not self._incoming:
            return
        tasks = sorted(self._incoming, key=lambda t: (t.is_train, -t.priority, t.arrival_s, t.task_id))
        self._incoming.clear()
        for task in tasks:
            if task.is_train and self._deferred:
                self._deferred.append((task, now))   # keep FIFO among training tasks
                self.result.deferred_total += 1
                continue
            if not self._try_place(task, now, force=False):
                self._deferred.append((task, now))
                self.result.deferred_total += 1

    def _reoffer_deferred(self, now: float) -> None:
        while self._deferred:
            task, since = self._deferred[0]
            starving = (self._placed_total > 0 and
                        self._placed_train / self._placed_total < self.params.min_train_share)
            force = starving or now >= since + self.params.max_defer_s  # the wake-up's float
            if not self._try_place(task, now, force=force):
                self._wakeups.add(since + self.params.max_defer_s)
                return
            self._deferred.popleft()
            self._deferred_s[task.task_id] = now - since

    def _try_place(self, task: Task, now: float, force: bool) -> bool:
        if not self.candidate_nodes(task):
            self._fail_task(task, -1, "no healthy node left")
            return True
        t0 = self.timer() if self.timer else 0.0
        node = self.policy.place(task, self, force)
        if self.timer:
            self.result.decision_us.append((self.timer() - t0) * 1e6)
        if node is None:
            if force:
                raise RuntimeError(f"policy {self.policy.name} refused a forced placement")
            return False
        self._assign(task, node, now)
        return True

    def _assign(self, task: Task, node_idx: int, now: float) -> None:
        node = self.nodes[node_idx]
        self._node_of[task.task_id] = node_idx
        node.lengths.add(task.prompt_tokens)
        node.last_arrival_s = task.arrival_s
        fwd, bwd = self._stage_times(task)
        self._owed[node_idx] += sum(fwd) + sum(bwd)
        self._placed_total += 1
        if task.is_train:
            self._placed_train += 1
            node.train_wait.append(task)
        else:
            node.infer_wait.append(task)
            node.infer_wait.sort(key=lambda t: (-t.priority, t.arrival_s, t.task_id))
        self._touch(node)

    def _apply_roles(self, roles: tuple[frozenset[int], frozenset[int]] | None) -> None:
        if roles == self._roles:
            return
        old = None if self._roles is _UNSET else self._roles
        self._roles = roles
        for n in self.nodes:
            trains = roles is None or n.index in roles[1]
            serves = roles is None or n.index in roles[0]
            became_server = old is not None and serves and n.index not in old[0]
            n.trains, n.serves = trains, serves
            for s, d in enumerate(n.devices):
                st = self.profile.stages[s]
                d.static_bytes = st.weight_bytes + (st.train_state_bytes if trains else 0)
            if became_server:
                self._request_sync(n)

    # ------------------------------------------------------------------ forecasting helpers
    def _stage_times(self, task: Task) -> tuple[list[float], list[float]]:
        """Predicted per-stage forward (and backward) times of a task (shared lists: read only)."""
        return self._shape_times(task.batch_size, task.prompt_tokens, task.is_train)

    def _shape_times(self, batch: int, tokens: int, train: bool) -> tuple[list[float], list[float]]:
        """Per-stage forward (and, for training, backward) times of a (batch x tokens) micro-batch:
        the raw model times cached per shape, times the current calibration factors, cached until
        the calibration changes. The same floats as LatencyModel.predict."""
        key = (batch, tokens, train)
        version = self.lat.version
        hit = self._times.get(key)
        if hit is not None and hit[0] == version:
            return hit[1], hit[2]
        raw = self._raw_times.get(key)
        if raw is None:
            S, b, l = self.params.stages, batch, tokens
            p = self.lat.profile.stages
            raw = ([p[s].fwd.a + p[s].fwd.b * b * l + p[s].fwd.c * b * l * l for s in range(S)],
                   [p[s].bwd.a + p[s].bwd.b * b * l + p[s].bwd.c * b * l * l for s in range(S)]
                   if train else [])
            self._raw_times[key] = raw
        cf, cb = self._corrections()
        fwd = [t * c for t, c in zip(raw[0], cf)]
        bwd = [t * c for t, c in zip(raw[1], cb)]
        self._times[key] = [version, fwd, bwd, None]   # the chain is made when first asked for
        return fwd, bwd

    def _shape_chain(self, batch: int, tokens: int, train: bool) -> list[tuple[int, float]]:
        """The whole chain of a fresh task of that shape as (stage, duration) ops: forwards
        0..S-1, then (training) backwards S-1..0. Cached like _shape_times; read only."""
        key = (batch, tokens, train)
        hit = self._times.get(key)
        if hit is None or hit[0] != self.lat.version:
            self._shape_times(batch, tokens, train)
            hit = self._times[key]
        if hit[3] is None:
            fwd, bwd = hit[1], hit[2]
            hit[3] = list(enumerate(fwd)) + [(s, bwd[s]) for s in range(len(bwd) - 1, -1, -1)]
        return hit[3]

    def _corrections(self) -> tuple[list[float], list[float]]:
        version = self.lat.version
        if self._corr[0] != version:
            S = self.params.stages
            self._corr = (version, [self.lat.correction(s, OpKind.FWD) for s in range(S)],
                          [self.lat.correction(s, OpKind.BWD) for s in range(S)])
        return self._corr[1], self._corr[2]

    def _decode_iter_s(self, batch: int, kv: int) -> float:
        return sum(self.lat.predict(OpKind.DECODE, s, batch, 1, kv) for s in range(self.params.stages))

    def _compute_slo(self, task: Task) -> float:
        if not task.is_train:
            if self.params.slo_e2e_s is not None:
                return self.params.slo_e2e_s
            if task.slo_s is not None:
                return task.slo_s
        # unloaded latency from the (true) profile, so every policy is judged by the same SLO
        S = self.params.stages
        prof = self.profile.stages
        t = sum(prof[s].fwd.a + prof[s].fwd.b * task.batch_size * task.prompt_tokens
                + prof[s].fwd.c * task.batch_size * task.prompt_tokens ** 2 for s in range(S))
        if task.is_train:
            t *= 3.0
        elif self.params.generate and task.output_tokens > 1:
            kv = task.prompt_tokens + task.output_tokens // 2
            t += (task.output_tokens - 1) * sum(prof[s].decode.a + prof[s].decode.b + prof[s].decode.c * kv
                                                for s in range(S))
        return self.params.slo_scale * t

    def _timeline(self, node_idx: int, view: str) -> NodeTimeline:
        node = self.nodes[node_idx]
        if node.dirty:
            self._timelines.pop((node_idx, "all"), None)
            self._timelines.pop((node_idx, "infer"), None)
            node.dirty = False
        tl = self._timelines.get((node_idx, view))
        if tl is None or self.clock.now() > tl.horizon_s:  # a predicted event did not happen
            tl = self._build_timeline(node, include_train=view == "all")
            self._timelines[(node_idx, view)] = tl
        return tl

    def _build_timeline(self, node: NodeState, include_train: bool) -> NodeTimeline:
        now = self.clock.now()
        S = node.num_stages
        running = []
        for s, d in enumerate(node.devices):
            op = d.running
            if op is not None and (include_train or not op.train):
                running.append((s, d.running_start_s, d.running_start_s + op.predicted_s, op.train))
        infer, train = [], []
        it = node.decode
        if it is not None:
            first = it.stage + (1 if it.running else 0)
            dur = self._decode_iter_s(len(it.seq_ids), it.kv_tokens) / S
            ready = self._running_end(node, it.stage, it.ready_s) if it.running else it.ready_s
            infer.append((ready, [(s, dur) for s in range(first, S)], False))
        elif node.seqs:
            dur = self._decode_iter_s(len(node.seqs), sum(q.kv_tokens for q in node.seqs.values())) / S
            infer.append((node.last_decode_end_s, [(s, dur) for s in range(S)], False))
        shape_chain = self._shape_chain
        for b in node.batches.values():
            if b.train and not include_train:
                continue
            ready = b.ready_s
            done = b.fwd_next >= S
            if b.running:  # the rest of its chain waits for its running op
                ready = self._running_end(node, b.bwd_next if done else b.fwd_next, ready)
            # what is left of its chain (forwards 0..S-1, then backwards S-1..0) is a suffix
            if done:   # next: the backward of stage bwd_next, or the one below a running one
                left = S + (S - 1 - b.bwd_next) + (1 if b.running else 0)
            else:
                left = b.fwd_next + (1 if b.running else 0)
            ops = shape_chain(b.size, b.seq_tokens, b.train)[left:]
            (train if b.train else infer).append((ready, ops, b.train))
        for t in node.infer_wait[:_CHAIN_CAP]:
            infer.append((t.arrival_s, shape_chain(t.batch_size, t.prompt_tokens, False), False))
        if include_train:
            train.extend(self._train_wait_chains(node))
        chains = infer + train if self.infer_first else sorted(infer + train, key=lambda c: c[0])
        return build_timeline(S, now, running, chains)

    @staticmethod
    def _running_end(node: NodeState, stage: int, ready: float) -> float:
        d = node.devices[stage]
        return ready if d.running is None else max(ready, d.running_start_s + d.running.predicted_s)

    def _train_wait_chains(self, node: NodeState) -> list[tuple[float, list[tuple[int, float]], bool]]:
        """Queued training tasks as chains; beyond _CHAIN_CAP, one block per stage of their
        estimated total (count x mean of the modeled ones), so long queues stay cheap."""
        S = node.num_stages
        out = []
        per_stage = [0.0] * S
        for t in node.train_wait[:_CHAIN_CAP]:
            out.append((t.arrival_s, self._shape_chain(t.batch_size, t.prompt_tokens, True), True))
        extra = len(node.train_wait) - _CHAIN_CAP
        if extra > 0:
            for t in node.train_wait[:_CHAIN_CAP]:
                fwd, bwd = self._stage_times(t)
                for s in range(S):
                    per_stage[s] += fwd[s] + bwd[s]
            out.append((0.0, [(s, per_stage[s] / _CHAIN_CAP * extra) for s in range(S)], True))
        return out

    # ------------------------------------------------------------------ records
    def _fail_task(self, task: Task, node: int, why: str) -> None:
        if task.task_id in self._resolved:
            return
        self._resolved.add(task.task_id)
        self.result.events.append({"time_s": self.clock.now(), "event": "task_failed",
                                   "task_id": task.task_id, "node": node, "error": why})
        if task.is_train:
            self.result.train_tasks.append(TrainTaskRecord(
                task.task_id, task.arrival_s, node, None, task.batch_size,
                task.batch_size * task.prompt_tokens, self._deferred_s.get(task.task_id, 0.0), True, why))
        else:
            served = self._served.get(task.task_id)
            self.result.requests.append(RequestRecord(
                task.task_id, task.arrival_s, node, task.prompt_tokens, task.output_tokens,
                served[3] if served else None, None, self.slo_s(task), True, error=why))


