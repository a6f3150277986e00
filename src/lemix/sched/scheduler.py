"""The LeMix scheduler: one state machine driven by both executors.

Contract (vLLM-v1 style: the scheduler returns what happened; executors read nothing else):

    out = sched.on_arrival(task)          a task arrived (at clock.now())
    plan = sched.plan()                   ops to start now on idle devices, when to call again,
                                          and plan.outputs (what planning resolved or released)
    out = sched.on_op_finished(result)    an op ended; absorb its result
    out = sched.on_node_failed(node, why) a node died (executor side); its tasks are offered again
    out = sched.on_node_restored(node, v) it is back with weights of version v
    sched.record_event(event)             an executor-side event (copies, recoveries) for the report
    snap = sched.snapshot()               read-only picture: node health, versions, quiescence
    result = sched.finalize()             the run's RunResult

Every `out` is an Outputs value (lemix.types): finished requests and training tasks, applied
training samples, the worker state to release, typed events, ended ops. The simulator and the
engines inject a clock (and, for measuring decision time, a `timer`) and execute the ops; they
differ in the clock, in how they execute ops, and in the executor-side events they report
(failures, restores, copies). No torch, no threads, no sockets, no wall clock here.

The Scheduler composes collaborators that each own their state:

    Cluster      the nodes' state, which nodes changed, wake-up times          (cluster.py)
    TaskLedger   every task's fate and what its record needs                   (ledger.py)
    StageTimes   predicted per-stage times of task shapes, SLOs                (times.py)
    Placement    incoming and deferred tasks, roles, owed work; asks the policy (placement.py)
    Timelines    per-node forecast timelines; View, what policies read         (timelines.py)
    Dispatcher   candidates per device in the policy's DispatchOrder, starting ops (dispatch.py, order.py)
    MemoryGate   wait-or-offload, victims, reloads, memory needs, KV bytes      (memory.py)
    Weights      steps, versions, copies and merges per the policy's regime    (weights.py)
    Completion   what a finished op changes, one handler per OpKind            (completion.py)
    Failures     taking work off a node: release, fail or train again          (failures.py)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from lemix.clock import Clock
from lemix.sched.admission import TrainAdmission
from lemix.sched.backlog import TrainBacklog
from lemix.sched.chunking import Chunker
from lemix.sched.cluster import Cluster
from lemix.sched.completion import Completion
from lemix.sched.contention import HostContention
from lemix.sched.dispatch import Dispatcher
from lemix.sched.failures import Failures
from lemix.sched.latency import LatencyModel, Profile, generic_profile
from lemix.sched.ledger import TaskLedger
from lemix.sched.memory import MemoryGate
from lemix.sched.outputs import Recorder
from lemix.sched.params import SchedParams
from lemix.sched.pipeline import make_pipeline
from lemix.sched.placement import Placement
from lemix.sched.policies import make_policy
from lemix.sched.state import NodeState
from lemix.sched.times import StageTimes
from lemix.sched.timelines import Timelines, View
from lemix.sched.weights import Weights
from lemix.types import (ClusterSnapshot, Event, EventKind, NodeSnapshot, Op, OpKind, OpResult, Outputs,
                         RunResult, Task)

_NO_OUTPUTS = Outputs()


@dataclass(frozen=True, init=False)
class Plan:
    ops: tuple[Op, ...] = ()
    wakeup_s: float | None = None   # call plan() again at this time even if nothing happens
    outputs: Outputs = _NO_OUTPUTS  # what planning resolved (e.g. failed at admission) or released

    def __init__(self, ops: tuple[Op, ...] = (), wakeup_s: float | None = None,
                 outputs: Outputs = _NO_OUTPUTS) -> None:
        # one per plan(): built as the seam types are (lemix.types' docstring)
        object.__setattr__(self, "__dict__", {"ops": ops, "wakeup_s": wakeup_s, "outputs": outputs})


class Scheduler:
    def __init__(self, params: SchedParams, profile: Profile, clock: Clock, *,
                 timer: Callable[[], float] | None = None, keep_records: bool = True) -> None:
        if profile.num_stages != params.stages:
            raise ValueError(f"profile has {profile.num_stages} stages, the cluster {params.stages}")
        self.params = params
        self.clock = clock
        self.policy = make_policy(params.policy, params)
        self.lat = LatencyModel(profile if self.policy.use_profile else generic_profile(profile),
                                period_s=params.calibration_period_s, tolerance=params.calibration_tolerance)
        self.pipe = make_pipeline(params.pipeline, params.microbatches)
        self.result = RunResult(policy=params.policy, nodes=params.nodes, stages=params.stages)
        self.rec = Recorder(self.result, keep=keep_records)
        order = self.policy.dispatch_order()
        self.cluster = Cluster(params, profile)
        self.nodes = self.cluster.nodes
        self.times = StageTimes(self.lat, profile, params)
        self.ledger = TaskLedger(self.times, clock, self.rec)
        self.weights = Weights(profile, self.cluster, self.pipe, self.rec, self.policy.weight_regime())
        self.memory = MemoryGate(params, profile, self.pipe, self.cluster, self.rec,
                                 enabled=self.policy.memory_check and not params.no_memory_check)
        self.placement = Placement(params, profile, self.cluster, self.times, self.ledger, self.weights,
                                   self.policy, self.result, timer)
        self.failures = Failures(params, clock, self.cluster, self.memory, self.ledger, self.placement,
                                 self.rec)
        self.dispatcher = Dispatcher(params, profile, clock, self.lat, self.pipe, self.cluster, self.memory,
                                     self.weights, self.ledger, self.failures, order)
        self.completion = Completion(params, profile, self.lat, self.pipe, self.cluster, self.dispatcher,
                                     self.memory, self.weights, self.ledger, self.placement, self.failures,
                                     self.rec, self.result)
        self.timelines = Timelines(params, clock, self.cluster, self.times, order)
        self.view = View(params, clock, np.random.default_rng(params.seed), self.cluster, self.timelines,
                         self.placement, self.times)
        self.placement.apply_roles(self.policy.roles(self.view))
        # hook (issue 10, bounded blocking): the chunk planner, read by dispatch, memory, timelines
        self.chunker = Chunker(params, self.lat, self.times.compute_slo,
                               enabled=getattr(self.policy, "chunk_training", False) and not params.no_chunking,
                               now=clock.now, inference_present=self._inference_present, nodes=self.nodes,
                               training_waits=lambda: bool(self.placement.deferred))
        if self.chunker.enabled:
            self.dispatcher.chunker = self.memory.chunker = self.timelines.chunker = self.chunker
        # hook (issue 10, late binding and liveness of deferred training): admission.py
        late = getattr(self.policy, "late_binding", False) and not params.no_late_binding
        self.admission = TrainAdmission(params, self.cluster, late_binding=late)
        if getattr(self.policy, "late_binding", False):
            self.placement.admission = self.admission
        self.view.train_room = self.admission.room
        self.timelines.eq4_sees_training = (getattr(self.policy, "chunk_training", False)
                                            and not params.eq4_inference_only)
        # hook (issue 10): SLO-aware prefill batching (dispatch.py, _slo_batch)
        self.dispatcher.slo_batching = getattr(self.policy, "slo_batching", False) and not params.no_slo_batching
        # hook (issue 10, solo training: order.py): no request for chunk_quiet_s, none present
        self.dispatcher.quiet = self.chunker.quiet
        # hook (issue 10): both workloads backlogged raises training's floor (order.py)
        if hasattr(order, "backlogged"):
            order.backlogged = self._both_backlogged
        # hook (issue 10, --train-backlog): training tasks drawn whenever a node lacks one
        self.backlog = TrainBacklog(params, self.cluster, self.placement, self.ledger, self.memory)
        # hook (issue 10, host contention): learned on a shared host; lemix caps training by it
        self.contention = (HostContention(params.nodes * params.stages, slowdown=params.host_slowdown)
                           if params.shared_host else None)
        if (self.contention is not None and getattr(self.policy, "host_gate", False)
                and not params.no_host_gate):
            self.dispatcher.host_gate = self._host_allows_training

    # ------------------------------------------------------------------ contract
    def on_arrival(self, task: Task) -> Outputs:
        self.ledger.admit(task)
        self.timelines.arrived(task)
        if self.chunker.enabled and not task.is_train:
            self.chunker.observe(task, self.times.slo_s(task))
        too_big = self.memory.too_big(task)
        if too_big:
            self.ledger.fail(task, -1, too_big)
        else:
            self.placement.offer(task)
        return self._take()

    def plan(self) -> Plan:
        now = self.clock.now()
        self.cluster.begin_plan(now)
        self.backlog.draw(now)
        self.placement.place(now, self.view)
        ops: list[Op] = []
        dispatch = self.dispatcher.dispatch_node
        for node in self.cluster.take_touched():
            dispatch(node, now, ops)
        self.cluster.end_plan()
        return Plan(tuple(ops), self.cluster.next_wakeup(), self._take())

    def on_op_finished(self, result: OpResult) -> Outputs:
        if self.contention is not None and result.error is None:
            self._observe_contention(result)
        self.completion.finish(result)
        return self._take()

    def record_event(self, event: Event) -> None:
        """An executor-side event (a weight copy skipped, a restore failed) for the run's report."""
        self.rec.event(event)

    def on_node_failed(self, node_idx: int, why: str = "node failed") -> Outputs:
        """A node died: take it out of placement, cancel its ops, and offer every task it held
        again (inference restarts from its prompt; training tasks whose gradients died with the
        node, applied or not, are trained again). The outputs' `requeued` lists those tasks and
        one Release names the batches and sequences the node held (its workers are gone: the
        executor drops what it kept for them)."""
        node = self.nodes[node_idx]
        now = self.clock.now()
        self.rec.release(node_idx, tuple(node.seqs), node.held_batch_ids())
        node.healthy = False
        self.dispatcher.cancel_node(node_idx)
        tasks = list(node.infer_wait) + list(node.train_wait)
        tasks += [t for b in node.batches.values() for t in b.tasks]
        tasks += [q.task for q in node.seqs.values()]
        lost = self.weights.node_failed(node)
        self.rec.forget_train_tasks({t.task_id for t in lost})
        tasks += lost
        node.infer_wait, node.train_wait, node.batches, node.seqs = [], [], {}, {}
        node.decode = None
        self._restart_rounds(node)
        for d in node.devices:
            d.running, d.held_bytes, d.host_bytes, d.running_extra_bytes = None, 0, 0, 0
            d.grads_pending, d.wait_since_s, d.wait_key = 0, None, None
        self.placement.node_failed(node_idx)
        requeued = []
        for t in sorted(tasks, key=lambda t: (t.arrival_s, t.task_id)):
            self.ledger.offered_again(t)
            self.memory.kv.pop(t.task_id, None)
            self.placement.offer(t)
            requeued.append(t.task_id)
        self.rec.requeued(requeued)
        self.rec.event(Event(now, EventKind.NODE_FAILED, node_idx, task_ids=tuple(requeued), error=why))
        self.cluster.touch(node)
        return self._take()

    def _restart_rounds(self, node: NodeState) -> None:
        """The node's S-PP rounds restart after the last one every stage completed."""
        r0 = max(d.step_count for d in node.devices)
        for d in node.devices:
            d.step_count = r0
        node.steps_done = r0
        node.train_round = r0
        node.round_members = {r: m for r, m in node.round_members.items() if r < r0}
        self.pipe.forget_rounds(node, r0)

    def on_node_restored(self, node_idx: int, version: int) -> Outputs:
        """A failed node is back, with weights of `version` copied from a healthy peer."""
        node = self.nodes[node_idx]
        node.healthy = True
        node.version = version
        self.rec.event(Event(self.clock.now(), EventKind.NODE_RESTORED, node_idx, version=version))
        self.cluster.touch(node)
        return self._take()

    def snapshot(self) -> ClusterSnapshot:
        """A read-only picture for executors and the server (no internals leave the scheduler)."""
        nodes = tuple(NodeSnapshot(n.index, n.healthy, n.serves, n.trains, n.version, n.quiescent(),
                                   n.held_batch_ids()) for n in self.nodes)
        return ClusterSnapshot(self.clock.now(), nodes, self.idle, self.weights.max_version,
                               self.result.deferred_total, self.result.offload_events)

    def _both_backlogged(self) -> bool:
        """Training waits for placement and more than a full batch of requests is queued per
        healthy node."""
        if not self.placement.deferred:
            return False
        healthy = [n for n in self.nodes if n.healthy]
        queued = sum(len(n.infer_wait) for n in healthy)
        return queued > self.params.max_batch * len(healthy)

    def _observe_contention(self, result: OpResult) -> None:
        entry = self.dispatcher.running.get(result.op_id)
        if entry is None:
            return
        nodes = self.nodes
        running = [((r.op.node, r.op.stage), nodes[r.op.node].devices[r.op.stage].running_start_s)
                   for op_id, r in self.dispatcher.running.items() if op_id != result.op_id]
        self.contention.observe(entry.op, result.start_s, result.end_s, running)

    def _host_allows_training(self) -> bool:
        """The host gate: fewer training forwards and backwards run on the host than its
        training slots (optimizer steps, as short as a request's op, are not held). Training
        that falls behind gets a node's pipeline worth of slots (what separation gives it)."""
        busy = sum(1 for r in self.dispatcher.running.values()
                   if r.op.train and (r.op.kind is OpKind.FWD or r.op.kind is OpKind.BWD))
        if self.contention.allows_training(busy):
            return True
        return busy < self.params.stages and self._training_behind()

    def _training_behind(self) -> bool:
        """Some unfinished training task waited longer than slo_scale x its unloaded time (the
        bound requests get)."""
        now, scale, times = self.clock.now(), self.params.slo_scale, self.times
        tasks = [t for t, _ in self.placement.deferred]
        for n in self.nodes:
            tasks.extend(n.train_wait)
            tasks.extend(b.tasks[0] for b in n.batches.values() if b.train)
        for t in tasks:
            if now - t.arrival_s > scale * sum(map(sum, times.of(t))):
                return True
        return False

    def _inference_present(self) -> bool:
        """A request is waiting for placement, queued or in flight on some node."""
        return (any(not t.is_train for t in self.placement.incoming)
                or not all(n.has_no_inference() for n in self.nodes))

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing running, nothing deferred."""
        return (not self.placement.pending and not self.dispatcher.running
                and all(n.holds_nothing() for n in self.nodes))

    def _take(self) -> Outputs:
        """The Outputs of this call. Without kept records (a long-running server), a task whose
        record is final -- a request's, a training task's once applied or failed -- leaves every
        per-task table here too, so memory stays flat with uptime."""
        out = self.rec.take()
        if not self.rec.keep and out:
            done = [r.task_id for r in out.requests]
            done += [t.task_id for t in out.train_tasks if t.failed]
            done += [tid for ap in out.applied for tid in ap.task_ids]
            if done:
                self.ledger.forget(done)
                self.times.forget(done)
            del self.result.decision_us[:-4096]
        return out

    def finalize(self) -> RunResult:
        """Count every task that never finished as failed ("unfinished"); return the result."""
        self.ledger.finalize()
        if self.contention is not None:
            self.result.extras.update(self.contention.summary())
        return self.result
