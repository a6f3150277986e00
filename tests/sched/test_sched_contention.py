"""Host contention (sched/contention.py): what the scheduler learns from synthetic observations
of ops on a shared host, and the host gate it drives. Deterministic: hand-built op results."""
from __future__ import annotations

import pytest

from sched_factory import finish, infer, make_params, make_scheduler, train
from lemix.sched.contention import HostContention
from lemix.types import Op, OpKind

MS = 1e-3


def _op(op_id: int, node: int, stage: int, *, train_op: bool = False, predicted_s: float = 1 * MS,
        kind: OpKind = OpKind.FWD) -> Op:
    return Op(op_id, kind, node, stage, op_id, (op_id,), train_op, 1, 10, predicted_s=predicted_s)


def _teach(hc: HostContention, slowdown_by_others: dict[int, float], n: int = 20) -> None:
    """n inference ops per count of other busy devices, each `slowdown` x its prediction; the
    others are training ops running over the whole op."""
    t, oid = 0.0, 0
    for others, slow in slowdown_by_others.items():
        for _ in range(n):
            dur = slow * MS
            running = [((1, s), t - MS) for s in range(others)]   # devices of node 1, busy throughout
            hc.observe(_op(oid, 0, 0), t, t + dur, running)
            t += 10 * MS   # no overlap between the taught ops themselves
            oid += 1


def test_others_busy_is_the_time_averaged_count_of_other_devices():
    hc = HostContention(4)
    hc.observe(_op(0, 1, 0, train_op=True), 0.0, 2 * MS, [])     # busy 0..2 ms on (1, 0)
    hc.observe(_op(1, 1, 1, train_op=True), 1 * MS, 4 * MS, [])  # busy 1..4 ms on (1, 1)
    # an op on (0, 0) over 0..4 ms: (1,0) for 2 ms, (1,1) for 3 ms, (0,1) running since 3 ms: 1 ms
    k = hc.others_busy(0.0, 4 * MS, (0, 0), [((0, 1), 3 * MS)])
    assert k == pytest.approx((2 + 3 + 1) / 4)
    assert hc.others_busy(0.0, 4 * MS, (1, 0), []) == pytest.approx(3 / 4)   # its own device does not count
    assert hc.others_busy(1.0, 1.0, (0, 0), []) == 0.0


def test_learns_the_slowdown_relative_to_no_other_busy_device():
    hc = HostContention(4, slowdown=1.5)
    # the calibrated prediction already includes some average contention: base 0.8 x
    _teach(hc, {0: 0.8, 1: 0.88, 2: 1.6, 3: 2.4})
    assert hc.factor(1) == pytest.approx(1.1)
    assert hc.factor(2) == pytest.approx(2.0)
    assert hc.factor(3) == pytest.approx(3.0)
    # 2 other busy devices slow inference 2x (> 1.5): a request must find at most one: 1 slot
    assert hc.training_slots() == 1
    assert hc.allows_training(0) and not hc.allows_training(1)
    assert hc.summary() == {"host_slowdown": {"1": 1.1, "2": 2.0, "3": 3.0}, "host_training_slots": 1}


def test_flat_times_leave_every_slot_open():
    """A GPU host (or one with cores to spare): no slowdown, the gate never binds."""
    hc = HostContention(4)
    _teach(hc, {0: 1.0, 1: 1.02, 2: 0.98, 3: 1.01})
    assert hc.training_slots() == 4
    assert all(hc.allows_training(k) for k in range(4))


def test_no_evidence_no_slowdown_and_training_ops_teach_nothing():
    hc = HostContention(4, min_obs=5)
    _teach(hc, {0: 1.0}, n=5)
    _teach(hc, {2: 3.0}, n=4)               # too few observations at 2 others
    assert hc.factor(2) == 1.0 and hc.training_slots() == 4
    for i in range(20):                     # training ops are not what the gate protects
        hc.observe(_op(100 + i, 0, 0, train_op=True), i, i + 5 * MS, [((1, 0), i), ((1, 1), i)])
    assert hc.training_slots() == 4
    _teach(hc, {2: 3.0}, n=1)               # the 5th inference observation closes the slot
    assert hc.training_slots() == 1


def test_one_slot_even_on_a_single_core():
    hc = HostContention(4)
    _teach(hc, {0: 1.0, 1: 2.0, 2: 3.0})
    assert hc.training_slots() == 1


@pytest.mark.parametrize("kw", [dict(devices=0), dict(devices=2, slowdown=1.0)])
def test_bad_arguments_are_errors(kw):
    with pytest.raises(ValueError):
        HostContention(**kw)


def _two_trainers(**kw):
    """2 nodes x 2 stages, a training task placed on each node at t=0."""
    sched, clock = make_scheduler(make_params(nodes=2, stages=2, **kw))
    sched.on_arrival(train(0, 0.0))
    sched.on_arrival(train(1, 0.0))
    return sched, clock


def test_host_gate_runs_one_training_op_once_contention_is_learned():
    sched, clock = _two_trainers(shared_host=True)
    _teach(sched.contention, {0: 1.0, 1: 1.0, 2: 2.0})
    ops = sched.plan().ops
    assert len([o for o in ops if o.train]) == 1            # the host has one training slot
    finish(sched, ops[0], 0.0, ops[0].predicted_s)
    clock.advance_to(ops[0].predicted_s)
    nxt = sched.plan().ops
    assert len([o for o in nxt if o.train]) == 1            # the slot passes on
    # inference is never held by the gate
    sched.on_arrival(infer(10, clock.now()))
    assert any(not o.train for o in sched.plan().ops)


@pytest.mark.parametrize("kw", [dict(shared_host=True, no_host_gate=True), dict(shared_host=False),
                                dict(shared_host=True, policy="naivemix")])
def test_without_the_gate_both_nodes_train_at_once(kw):
    sched, _ = _two_trainers(**kw)
    if sched.contention is not None:
        _teach(sched.contention, {0: 1.0, 1: 1.0, 2: 2.0})
    assert len([o for o in sched.plan().ops if o.train]) == 2
    assert (sched.contention is None) == (not kw["shared_host"])


def test_unlearned_host_gate_is_open():
    sched, _ = _two_trainers(shared_host=True)
    assert len([o for o in sched.plan().ops if o.train]) == 2


# ---------------------------------------------------------------------------- simulated host
def _host_workload(gap_s: float = 0.12, until_s: float = 6.0, seed: int = 1):
    """Requests and 2-sample training micro-batches, half and half, Poisson arrivals."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tasks, t, i = [], 0.0, 0
    while t < until_s:
        t += float(rng.exponential(gap_s))
        if rng.random() < 0.5:
            tasks.append(train(i, t, int(rng.integers(8, 24)), batch=2))
        else:
            tasks.append(infer(i, t, int(rng.integers(2, 12))))
        i += 1
    return tasks


def _slo(result) -> float:
    met = sum(1 for r in result.requests if r.finish_s is not None and r.finish_s - r.arrival_s <= r.slo_s)
    return met / len(result.requests)


def test_contended_simulator_slows_ops_started_on_a_full_host_and_is_deterministic():
    from sched_factory import make_profile, ops_of
    from lemix.sim import simulate_policy

    tasks = _host_workload()
    prof = make_profile(2, layers=4)
    p = make_params(policy="naivemix", max_batch=4)
    a, _ = simulate_policy(p, prof, tasks, noise=0.0, host_cores=1)
    b, _ = simulate_policy(p, prof, tasks, noise=0.0, host_cores=1)
    assert [(o.start_s, o.end_s) for o in a.ops] == [(o.start_s, o.end_s) for o in b.ops]
    plain, _ = simulate_policy(p, prof, tasks, noise=0.0)
    assert "host_training_slots" not in plain.extras      # no host unless asked for
    # an inference forward started while another op ran took twice its profile time (1 core)
    fwd = [o for o in ops_of(a, OpKind.FWD) if not o.train]
    doubled = [o for o in fwd
               if sum(1 for x in a.ops if x is not o and x.start_s <= o.start_s < x.end_s) == 1]
    # (the test profile: a forward is 1 ms per token per stage)
    assert doubled and all((o.end_s - o.start_s) == pytest.approx(2 * o.batch_size * o.seq_tokens * MS)
                           for o in doubled)


def test_host_gate_on_a_simulated_one_core_host():
    """Four devices on one core: lemix learns that a busy device doubles an inference op's time,
    runs training ops one at a time (mostly) once it knows, and meets more SLOs than without."""
    from sched_factory import make_profile
    from lemix.sim import simulate_policy

    tasks = _host_workload()
    prof = make_profile(2, layers=4)
    on, _ = simulate_policy(make_params(max_batch=4), prof, tasks, noise=0.05, host_cores=1)
    off, _ = simulate_policy(make_params(max_batch=4, no_host_gate=True), prof, tasks, noise=0.05, host_cores=1)
    assert on.extras["host_training_slots"] == 1 and on.extras["host_slowdown"]["1"] > 1.5
    def overlap_s(result):   # time training forwards/backwards ran two at once, after the first 3 s
        ops = [o for o in result.ops if o.train and o.kind in (OpKind.FWD, OpKind.BWD) and o.start_s > 3.0]
        return sum(max(0.0, min(a.end_s, b.end_s) - max(a.start_s, b.start_s))
                   for i, a in enumerate(ops) for b in ops[i + 1:])

    # one at a time, but for training that fell behind (the valve gives it S slots)
    assert overlap_s(on) < 0.5 * overlap_s(off)
    # (with a calibration publish after every op the ungated run met 0.84; calibration epochs
    # steadied its predictions to 0.88, so the margin is no longer 0.1)
    assert _slo(on) > _slo(off) and _slo(on) >= 0.95
    assert len([t for t in on.train_tasks if not t.failed]) == len([t for t in tasks if t.is_train])


def test_training_that_falls_behind_gets_a_pipeline_of_slots():
    """One slot learned; once a waiting micro-batch is older than slo_scale x its unloaded time
    (5 x (10 + 20) ms per stage here), a second training op may start."""
    sched, clock = _two_trainers(shared_host=True)
    _teach(sched.contention, {0: 1.0, 1: 1.0, 2: 2.0})
    first = [o for o in sched.plan().ops if o.train]
    assert len(first) == 1
    clock.advance_to(0.1)                 # under 5 x 60 ms: still one at a time
    sched.cluster.touch(sched.nodes[1 - first[0].node])
    assert not [o for o in sched.plan().ops if o.train]
    clock.advance_to(0.31)                # the other node's task waited past 300 ms
    sched.cluster.touch(sched.nodes[1 - first[0].node])
    second = [o for o in sched.plan().ops if o.train]
    assert len(second) == 1 and second[0].node != first[0].node
