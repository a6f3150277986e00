"""Factory helpers for scheduler and simulator tests (vLLM-style small fixtures).

The default profile has round coefficients so every time is hand-computable:
forward = 1 ms per token per stage (a = c = 0), backward = 2 ms per token per stage,
decode = 1 ms per iteration per stage, optimizer step = 1 ms per stage; bytes are tiny
integers and memory is ample unless a test asks otherwise.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from lemix.clock import SimClock
from lemix.sched.latency import OpCoeffs, Profile, StageProfile
from lemix.sched.params import SchedParams
from lemix.sched.scheduler import Scheduler
from lemix.types import Op, OpKind, OpResult, RunResult, Task, TaskKind

MS = 1e-3

ALL_POLICIES = ("naivemix", "random", "luf", "separate", "separate-dynamic", "lemix",
                "lemix-paper", "lemix/no-profile", "lemix/no-prioritization",
                "lemix/no-memory-check")
PIPELINES = ("apipe", "gpipe", "1f1b")


def make_stage(*, fwd_ms_per_token: float = 1.0, bwd_ms_per_token: float = 2.0,
               decode_ms: float = 1.0, optim_ms: float = 1.0, weight_bytes: int = 1000,
               train_state_bytes: int = 0, act_bytes_per_token: int = 10,
               tmp_bytes_per_token: int = 1, kv_bytes_per_token: int = 10, layers: int = 0) -> StageProfile:
    return StageProfile(
        fwd=OpCoeffs(b=fwd_ms_per_token * MS), bwd=OpCoeffs(b=bwd_ms_per_token * MS),
        decode=OpCoeffs(a=decode_ms * MS), optim=OpCoeffs(a=optim_ms * MS),
        weight_bytes=weight_bytes, train_state_bytes=train_state_bytes,
        act_bytes_per_token=act_bytes_per_token, tmp_bytes_per_token=tmp_bytes_per_token,
        kv_bytes_per_token=kv_bytes_per_token, layers=layers)


def make_profile(stages: int = 2, *, capacity_bytes: int = 10**12, host_bandwidth_Bps: float = 1e6,
                 network_bandwidth_Bps: float = 1e6, stage_list: list[StageProfile] | None = None,
                 **stage_kw) -> Profile:
    if stage_list is None:
        stage_list = [make_stage(**stage_kw) for _ in range(stages)]
    sts = tuple(stage_list)
    return Profile(model="test", device="test", dtype="float32", stages=sts,
                   capacity_bytes=capacity_bytes, host_bandwidth_Bps=host_bandwidth_Bps,
                   network_bandwidth_Bps=network_bandwidth_Bps)


def make_params(**kw) -> SchedParams:
    base = dict(policy="lemix", nodes=2, stages=2, max_batch=1, microbatches=2, seed=0)
    base.update(kw)
    return SchedParams(**base)


def infer(tid: int, arrival_s: float = 0.0, tokens: int = 10, out: int = 0, **kw) -> Task:
    return Task(tid, TaskKind.INFER, arrival_s, tokens, out, **kw)


def train(tid: int, arrival_s: float = 0.0, tokens: int = 10, batch: int = 1) -> Task:
    return Task(tid, TaskKind.TRAIN, arrival_s, tokens, 0, batch_size=batch)


def make_tasks(n: int = 10, *, seed: int = 0, train_share: float = 0.5, gap_s: float = 0.005,
               min_tokens: int = 4, max_tokens: int = 40, max_out: int = 4) -> list[Task]:
    """n tasks with seeded random kinds, lengths and exponential inter-arrival gaps."""
    rng = np.random.default_rng(seed)
    t, out = 0.0, []
    for i in range(n):
        t += float(rng.exponential(gap_s))
        tokens = int(rng.integers(min_tokens, max_tokens + 1))
        if rng.random() < train_share:
            out.append(train(i, t, tokens))
        else:
            out.append(infer(i, t, tokens, int(rng.integers(1, max_out + 1))))
    return out


def make_scheduler(params: SchedParams | None = None, profile: Profile | None = None,
                   clock: SimClock | None = None) -> tuple[Scheduler, SimClock]:
    params = params or make_params()
    clock = clock or SimClock()
    return Scheduler(params, profile or make_profile(params.stages), clock), clock


def finish(sched: Scheduler, op: Op, start_s: float, end_s: float, **kw) -> None:
    """Hand-built result of a running op."""
    sched.on_op_finished(OpResult(op.op_id, start_s, end_s, **kw))


def simulate_full(params: SchedParams, tasks: list[Task], profile: Profile | None = None,
                  noise: float = 0.0) -> tuple[RunResult, Scheduler]:
    """Run the discrete-event simulator; return the result and the scheduler it drove."""
    from lemix.sim import simulate_policy
    result, sim = simulate_policy(params, profile or make_profile(params.stages), tasks, noise=noise)
    return result, sim.sched


def simulate(params: SchedParams, tasks: list[Task], profile: Profile | None = None,
             noise: float = 0.0) -> RunResult:
    return simulate_full(params, tasks, profile, noise)[0]


def ops_of(result: RunResult, kind: OpKind | None = None, node: int | None = None):
    return [o for o in result.ops if (kind is None or o.kind is kind) and (node is None or o.node == node)]


# ---------------------------------------------------------------------------- run invariants
EPS = 1e-12


def check_no_device_overlap(result: RunResult) -> None:
    """A device (node, stage) runs one op at a time."""
    by_dev: dict[tuple[int, int], list] = {}
    for o in result.ops:
        by_dev.setdefault((o.node, o.stage), []).append(o)
    for dev, ops in by_dev.items():
        ops.sort(key=lambda o: (o.start_s, o.end_s))
        for a, b in zip(ops, ops[1:]):
            assert b.start_s >= a.end_s - EPS, f"device {dev}: {a} overlaps {b}"


def _per_batch(result: RunResult, kinds: tuple[OpKind, ...]) -> dict[tuple[int, int], dict]:
    """Per (node, batch): its op per (kind, stage); a chunked stage's ops (bounded blocking,
    `OpRecord.layers`) as one record from its first chunk's start to its last chunk's end (their
    own order is check_chunk_order's)."""
    out: dict[tuple[int, int], dict] = {}
    for o in result.ops:
        if o.kind in kinds and o.batch_id >= 0:
            d = out.setdefault((o.node, o.batch_id), {})
            key = (o.kind, o.stage)
            if o.layers and key in d and d[key].layers:
                a = d[key]
                d[key] = replace(a, start_s=min(a.start_s, o.start_s), end_s=max(a.end_s, o.end_s))
                continue
            assert key not in d, f"batch {o.batch_id} ran {o.kind.value} on stage {o.stage} twice"
            d[key] = o
    return out


def check_chunk_order(result: RunResult, layers_per_stage: list[int] | None = None) -> None:
    """Bounded blocking: per (node, batch, stage), forward ops run one after another over
    ascending, contiguous layer ranges, backward ops over descending contiguous ranges of the
    same chunks (adaptive chunks: an op may cover several chunks, `OpRecord.cuts`; a backward
    op starts and ends only at boundaries of the forward's chunks, so the backward runs over
    the same chunks in reverse); with `layers_per_stage`, the ranges cover each stage's layers
    exactly."""
    chunks: dict[tuple, list] = {}
    for o in result.ops:
        if o.layers:
            assert o.kind in (OpKind.FWD, OpKind.BWD) and o.train, o
            chunks.setdefault((o.node, o.batch_id, o.stage, o.kind), []).append(o)
    for (node, bid, s, kind), ops in chunks.items():
        ops.sort(key=lambda o: o.start_s)
        for a, b in zip(ops, ops[1:]):
            assert b.start_s >= a.end_s - EPS, f"node {node} batch {bid} stage {s}: {a} overlaps {b}"
        ranges = [o.layers for o in ops]
        if kind is OpKind.BWD:
            ranges = ranges[::-1]
        assert ranges[0][0] == 0, (node, bid, s, kind, ranges)
        for (lo, hi), (lo2, hi2) in zip(ranges, ranges[1:]):
            assert hi == lo2 and lo < hi, (node, bid, s, kind, ranges)
        if layers_per_stage is not None:
            assert ranges[-1][1] == layers_per_stage[s], (node, bid, s, kind, ranges)
        for o in ops:
            assert not o.cuts or kind is OpKind.FWD, o   # a backward needs no cuts
            assert all(lo < c < hi for c in o.cuts for lo, hi in [o.layers]), o
            assert list(o.cuts) == sorted(set(o.cuts)), o
        if kind is OpKind.BWD:
            fwd = chunks.get((node, bid, s, OpKind.FWD), [])
            cut_at = {b for o in fwd for b in (*o.layers, *o.cuts)}
            assert cut_at and {b for o in ops for b in o.layers} <= cut_at, (node, bid, s, ranges, cut_at)
            assert ranges[-1][1] == max(cut_at), (node, bid, s)


def check_stage_order(result: RunResult) -> None:
    """Per batch: fwd(s) ends before fwd(s+1) starts, the first bwd after the last fwd,
    bwd(s+1) before bwd(s); per decode iteration: decode(s) before decode(s+1)."""
    S = result.stages
    for (node, bid), d in _per_batch(result, (OpKind.FWD, OpKind.BWD, OpKind.DECODE)).items():
        for kind in (OpKind.FWD, OpKind.DECODE):
            for s in range(S - 1):
                a, b = d.get((kind, s)), d.get((kind, s + 1))
                if b is not None:
                    assert a is not None, f"node {node} batch {bid}: {kind.value} on {s + 1} without {s}"
                    assert b.start_s >= a.end_s - EPS, f"node {node} batch {bid}: {a} then {b}"
        last_fwd = d.get((OpKind.FWD, S - 1))
        bwd_top = d.get((OpKind.BWD, S - 1))
        if bwd_top is not None:
            assert last_fwd is not None and bwd_top.start_s >= last_fwd.end_s - EPS, (node, bid)
        for s in range(S - 1):
            lo, hi = d.get((OpKind.BWD, s)), d.get((OpKind.BWD, s + 1))
            if lo is not None:
                assert hi is not None and lo.start_s >= hi.end_s - EPS, \
                    f"node {node} batch {bid}: {hi} then {lo}"


def check_no_update_under_pending_backward(result: RunResult) -> None:
    """Correctness rule: no OPTIM (or weight SYNC) on a stage while a training batch has done its
    forward there but not yet its backward."""
    failed = {t.task_id for t in result.train_tasks if t.failed}  # dropped: nothing pending
    stash: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for (node, bid), d in _per_batch(result, (OpKind.FWD, OpKind.BWD)).items():
        for (kind, s), f in d.items():
            if kind is OpKind.FWD and f.train and not failed.intersection(f.task_ids):
                b = d.get((OpKind.BWD, s))
                stash.setdefault((node, s), []).append((f.start_s, b.end_s if b else float("inf")))
    for o in result.ops:
        if o.kind in (OpKind.OPTIM, OpKind.SYNC):
            for lo, hi in stash.get((o.node, o.stage), []):
                inside = o.end_s > lo + EPS and o.start_s < hi - EPS
                assert not inside, f"{o.kind.value} on node {o.node} stage {o.stage} at {o.start_s} " \
                                   f"while a batch stashed activations over [{lo}, {hi}]"


def check_accounted_once(result: RunResult, tasks: list[Task]) -> None:
    """Every arrived task is recorded exactly once, as completed or failed."""
    ids = [r.task_id for r in result.requests] + [t.task_id for t in result.train_tasks]
    assert sorted(ids) == sorted(t.task_id for t in tasks), "a task was lost or recorded twice"
    kinds = {t.task_id: t.is_train for t in tasks}
    assert all(not kinds[r.task_id] for r in result.requests)
    assert all(kinds[t.task_id] for t in result.train_tasks)
    for r in result.requests:
        assert r.failed == (r.finish_s is None), r
        assert r.failed == bool(r.error), r
    for t in result.train_tasks:
        assert t.failed == (t.finish_s is None), t


def check_all(result: RunResult, tasks: list[Task]) -> None:
    check_no_device_overlap(result)
    check_stage_order(result)
    check_chunk_order(result)
    check_no_update_under_pending_backward(result)
    check_accounted_once(result, tasks)


def failures(result: RunResult) -> list:
    return [r for r in result.requests if r.failed] + [t for t in result.train_tasks if t.failed]


def check_memory_released(sched: Scheduler) -> None:
    """After a run every device holds only its static bytes: nothing leaked on device or host."""
    for n in sched.nodes:
        for s, d in enumerate(n.devices):
            assert (d.held_bytes, d.host_bytes, d.running_extra_bytes) == (0, 0, 0), (n.index, s, d)
            assert d.running is None
