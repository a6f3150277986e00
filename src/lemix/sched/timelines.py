"""Forecasts over each node's predicted timeline: what policies ask before placing a task.

A node's timeline (forecast.py) holds its running ops and the chains of everything queued or
in flight on it, in dispatch order. Timelines are cached per node and view ("all" work, or
"infer"ence only, for Eq. 4) until the node changes, a predicted event fails to happen, or a new
calibration epoch (latency.py) or chunk plan (chunking.py) begins: so a cached timeline is the
one a build now would give, and which nodes a placement forecasts changes no later result.
Idle nodes share one forecast per task. `View` is the ClusterView a policy reads.
"""
from __future__ import annotations

import numpy as np

from lemix.clock import Clock
from lemix.sched.cluster import Cluster
from lemix.sched.forecast import Forecast, NodeTimeline, Runs, build_from_runs, forecast_alone, forecast_chain
from lemix.sched.order import DispatchOrder
from lemix.sched.params import SchedParams
from lemix.sched.placement import Placement
from lemix.sched.state import LengthStats, NodeState
from lemix.sched.times import StageTimes
from lemix.types import Task, TaskKind

CHAIN_CAP = 32  # queued tasks per node modeled one by one in a forecast; the rest as one block
_ALL, _INFER = "all", "infer"


class Timelines:
    def __init__(self, params: SchedParams, clock: Clock, cluster: Cluster, times: StageTimes,
                 order: DispatchOrder) -> None:
        self.params = params
        self.clock = clock
        self.cluster = cluster
        self.times = times
        self.jump = order.overtakes_training   # inference passes queued training in dispatch
        self._nodes = cluster.nodes             # (hot paths: one attribute each)
        self._lat = times.lat
        self._stage_times = times.of
        # per view, each node's cached timeline (None: to build when asked for)
        self._timelines: dict[str, list[NodeTimeline | None]] = {
            _ALL: [None] * len(cluster.nodes), _INFER: [None] * len(cluster.nodes)}
        self._epoch: object = None   # calibration (and chunk plans) the cached timelines were built with
        self._idle_fc: tuple[tuple, Forecast | None] = ((), None)   # see idle_forecast
        self._probe: tuple = ((),)                                   # see inference_congested
        self._infer_len = LengthStats()   # the typical request (Eq. 4's probe)
        self._infer_out = LengthStats()
        self.chunker = None   # set by the Scheduler: chunked training chains (chunking.py)
        self.eq4_sees_training = False   # set by the Scheduler (issue 10): see _congested_with_training

    def arrived(self, task: Task) -> None:
        if not task.is_train:
            self._infer_len.add(task.prompt_tokens)
            self._infer_out.add(task.output_tokens)

    # ------------------------------------------------------------------ forecasts
    def forecast(self, node: int, task: Task) -> Forecast:
        if node in self.cluster.idle_nodes():
            return self.idle_forecast(task)
        fwd, bwd = self._stage_times(task)
        jump = self.jump and not task.is_train   # inference overtakes queued training
        f = forecast_chain(self._timeline(node, _ALL), self.clock.now(), task.arrival_s, fwd, bwd, jump)
        return self._with_decode(f, task, self._nodes[node].seqs)

    def idle_forecast(self, task: Task) -> Forecast:
        """The forecast on any idle node: every idle node has the same (empty) timeline, so one
        computation per task and time serves them all."""
        now = self.clock.now()
        key = (task.batch_size, task.prompt_tokens, task.output_tokens, task.is_train, task.arrival_s,
               now, self._lat.version)
        if self._idle_fc[0] != key:
            fwd, bwd = self._stage_times(task)
            self._idle_fc = (key, self._with_decode(forecast_alone(now, task.arrival_s, fwd, bwd), task, {}))
        return self._idle_fc[1]

    def _with_decode(self, f: Forecast, task: Task, seqs: dict) -> Forecast:
        """Generate mode: R also covers the request's decode iterations on the node."""
        if self.params.generate and not task.is_train and task.output_tokens > 1:
            it = self.times.decode_iter_s(len(seqs) + 1, sum(s.kv_tokens for s in seqs.values())
                                          + task.prompt_tokens)
            f = Forecast(f.ii_s, f.r_s + (task.output_tokens - 1) * it, f.stage_s, f.ii_paper_s,
                         f.first_start_s)
        return f

    def response_floor_s(self, node: int, task: Task) -> float:
        """A lower bound on forecast(node, task).r_s from the node's running ops alone (O(S), no
        timeline): each stage starts no earlier than its input is ready and its running op ends
        (a running training op that a jumping inference query would pass is left out)."""
        return self.response_floors_s([node], task)[0]

    def response_floors_s(self, nodes: list[int], task: Task) -> list[float]:
        """response_floor_s of each node (the task's stage times looked up once)."""
        fwd, _ = self._stage_times(task)
        jump = self.jump and not task.is_train
        arrival = task.arrival_s
        t0 = max(self.clock.now(), arrival)
        out = []
        for node in nodes:
            t = t0
            for d, f in zip(self._nodes[node].devices, fwd):
                op = d.running
                if op is not None and not (jump and op.train and d.running_start_s >= t):
                    end = d.running_start_s + op.predicted_s
                    if end > t:
                        t = end
                t = t + f
            out.append(t - arrival)
        return out

    def inference_congested(self, node: int) -> bool:
        """Eq. 4: would a typical request queued on this node now miss tau_R x SLO, counting
        only the inference it already owes (training yields to inference)?"""
        if self._infer_len.n == 0:
            return False
        now = self.clock.now()
        key = (max(1, int(self._infer_len.mean)), max(1, int(self._infer_out.mean)), now, self._lat.version)
        if self._probe[0] != key:   # the typical request, its stage times, its limit, the empty verdict
            probe = Task(-1, TaskKind.INFER, now, key[0], key[1])
            fwd, _ = self._stage_times(probe)
            limit = self.params.tau_r * self.times.compute_slo(probe)
            self._probe = (key, probe, fwd, limit, forecast_alone(now, now, fwd, []).r_s > limit)
        _, probe, fwd, limit, empty_verdict = self._probe
        if self.eq4_sees_training:
            return self._congested_with_training(node, now, probe, fwd, limit)
        if self._nodes[node].has_no_inference():
            # no inference to protect (issue 10, liveness): a probe that misses even alone
            # means the SLO cannot be met by deferring; placing training here harms no request
            return False
        f = forecast_chain(self._timeline(node, _INFER), now, probe.arrival_s, fwd, [], False)
        return f.r_s > limit

    def _congested_with_training(self, node: int, now: float, probe: Task, fwd: list[float],
                                 limit: float) -> bool:
        """Eq. 4 that sees training (issue 10): the typical request forecast on the node's whole
        timeline as dispatch will treat it (it overtakes queued training, but waits for the
        training op running or due when it gets to a stage), plus the one chunk per stage the
        new task may add (the chunk bound; devices are non-preemptive). A node with no
        inference and no training is never congested (nothing to protect; liveness)."""
        n = self.cluster.nodes[node]
        if n.is_idle():
            return False
        f = forecast_chain(self._timeline(node, _ALL), now, probe.arrival_s, fwd, [], self.jump)
        block = self.chunker.target_s() if self.chunker is not None else 0.0
        return f.r_s + block > limit

    # ------------------------------------------------------------------ timelines
    def _timeline(self, node_idx: int, view: str) -> NodeTimeline:
        node = self._nodes[node_idx]
        cached = self._timelines
        chunker = self.chunker
        epoch = (self._lat.version, chunker.target_s(), chunker.quiet()) if chunker else self._lat.version
        if self._epoch != epoch:   # every duration (or queued training's chunk plan) moved
            self._epoch = epoch
            for tls in cached.values():
                tls[:] = [None] * len(tls)
        if node.dirty:
            cached[_ALL][node_idx] = cached[_INFER][node_idx] = None
            node.dirty = False
        tl = cached[view][node_idx]
        if tl is None or self.clock.now() > tl.horizon_s:  # a predicted event did not happen
            tl = cached[view][node_idx] = self._build(node, include_train=view == _ALL)
        return tl

    def _build(self, node: NodeState, include_train: bool) -> NodeTimeline:
        now = self.clock.now()
        S = node.num_stages
        times = self.times
        running = []
        for s, d in enumerate(node.devices):
            op = d.running
            if op is not None and (include_train or not op.train):
                running.append((s, d.running_start_s, d.running_start_s + op.predicted_s, op.train))
        infer, train = [], []
        it = node.decode
        if it is not None:
            first = it.stage + (1 if it.running else 0)
            dur = times.decode_iter_s(len(it.seq_ids), it.kv_tokens) / S
            ready = node.running_end(it.stage, it.ready_s) if it.running else it.ready_s
            infer.append((ready, [(s, (dur,)) for s in range(first, S)], False))
        elif node.seqs:
            dur = times.decode_iter_s(len(node.seqs), sum(q.kv_tokens for q in node.seqs.values())) / S
            infer.append((node.last_decode_end_s, [(s, (dur,)) for s in range(S)], False))
        shape_chain = times.chain
        for b in node.batches.values():
            if b.train and not include_train:
                continue
            ready = b.ready_s
            done = b.fwd_next >= S
            if b.running:  # the rest of its chain waits for its running op
                ready = node.running_end(b.bwd_next if done else b.fwd_next, ready)
            if b.chunks:   # bounded blocking: what is left of its chunks
                ops = self.chunker.remaining_chain(b)
            else:
                # what is left of its chain (forwards 0..S-1, then backwards S-1..0) is a suffix;
                # next: the backward of stage bwd_next, or the one below a running one
                left = (S + (S - 1 - b.bwd_next) if done else b.fwd_next) + (1 if b.running else 0)
                ops = shape_chain(b.size, b.seq_tokens, b.train)[left:]
            (train if b.train else infer).append((ready, ops, b.train))
        for t in node.infer_wait[:CHAIN_CAP]:
            infer.append((t.arrival_s, shape_chain(t.batch_size, t.prompt_tokens, False), False))
        if len(node.infer_wait) > CHAIN_CAP:
            # (issue 10) the requests queued beyond the cap, as one block per stage: without it
            # R stopped growing at 32 queued requests and a burst piled onto one node (the code
            # trace at 4x: 260 of 594 requests on one node, 17 s mean latency there)
            per_stage = [0.0] * S
            for t in node.infer_wait[CHAIN_CAP:]:
                for s, d in enumerate(times.of(t)[0]):
                    per_stage[s] += d
            infer.append((node.infer_wait[CHAIN_CAP].arrival_s, [(s, (d,)) for s, d in enumerate(per_stage)],
                          False))
        if include_train:
            train.extend(self._train_wait_chains(node))
        chains = infer + train if self.jump else sorted(infer + train, key=lambda c: c[0])
        return build_from_runs(S, now, running, chains)

    def _train_wait_chains(self, node: NodeState) -> list[tuple[float, Runs, bool]]:
        """Queued training tasks as chains; beyond CHAIN_CAP, one block per stage of their
        estimated total (count x mean of the modeled ones), so long queues stay cheap."""
        S = node.num_stages
        out = []
        per_stage = [0.0] * S
        chunker = self.chunker
        for t in node.train_wait[:CHAIN_CAP]:
            ops = chunker.task_chain(t) if chunker is not None else None
            out.append((t.arrival_s, ops or self.times.chain(t.batch_size, t.prompt_tokens, True), True))
        extra = len(node.train_wait) - CHAIN_CAP
        if extra > 0:
            for t in node.train_wait[:CHAIN_CAP]:
                fwd, bwd = self._stage_times(t)
                for s in range(S):
                    per_stage[s] += fwd[s] + bwd[s]
            out.append((0.0, [(s, (per_stage[s] / CHAIN_CAP * extra,)) for s in range(S)], True))
        return out


class View:
    """The ClusterView a policy reads (policies/base.py declares it): the forecasts above, the
    placement's candidate nodes and owed work, each node's lengths, and the SLOs."""

    def __init__(self, params: SchedParams, clock: Clock, rng: np.random.Generator, cluster: Cluster,
                 timelines: Timelines, placement: Placement, times: StageTimes) -> None:
        self.params = params
        self.rng = rng
        self._clock = clock
        self._nodes = cluster.nodes
        # bound methods of the collaborators that own them (no extra call per forecast)
        self.forecast = timelines.forecast
        self.idle_forecast = timelines.idle_forecast
        self.response_floor_s = timelines.response_floor_s
        self.response_floors_s = timelines.response_floors_s
        self.inference_congested = timelines.inference_congested
        self.idle_nodes = cluster.idle_nodes
        self.candidate_nodes = placement.candidate_nodes
        self.pending_work_s = placement.pending_work_s
        self.slo_s = times.slo_s

    @property
    def now_s(self) -> float:
        return self._clock.now()

    def length_stats(self, node: int) -> LengthStats:
        return self._nodes[node].lengths

    def last_arrival_s(self, node: int) -> float:
        return self._nodes[node].last_arrival_s
