"""Each policy's defining behaviour, on hand-built clusters with hand-computed numbers.

Factory profile: forward 1 ms per token per stage, backward 2 ms; SLO = 5 x unloaded latency.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
from sched_factory import (MS, check_all, failures, infer, make_params, make_profile,
                           make_scheduler, make_stage, simulate, train)

from lemix.metrics import summarize
from lemix.sched.latency import OpCoeffs
from lemix.sched.policies import make_policy, policy_names
from lemix.sched.registry import register
from lemix.types import OpKind


def placed(sched) -> dict[int, int]:
    return dict(sched.ledger.node_of)


# ---------------------------------------------------------------------------- registry
def test_registry_names_and_errors():
    names = policy_names()
    for n in ("naivemix", "random", "luf", "separate", "separate-dynamic", "lemix", "lemix-paper",
              "lemix/no-profile", "lemix/no-prioritization", "lemix/no-memory-check"):
        assert n in names
    with pytest.raises(ValueError, match=r"unknown policy 'fifo'; allowed: .*naivemix"):
        make_policy("fifo", make_params())
    with pytest.raises(ValueError, match="'luf' is already registered"):
        register("luf")(object)


# ---------------------------------------------------------------------------- baselines
def test_naivemix_round_robin_in_arrival_order():
    tasks = [infer(i, i * MS, 5) if i % 2 else train(i, i * MS, 5) for i in range(7)]
    result = simulate(make_params(policy="naivemix", nodes=3), tasks)
    nodes = {r.task_id: r.node for r in result.requests + result.train_tasks}
    assert [nodes[i] for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_naivemix_round_robin_in_queue_order_at_one_instant():
    # one instant: the queue is inference first (priority, then arrival), then training
    sched, _ = make_scheduler(make_params(policy="naivemix", nodes=3))
    for t in (train(0), infer(1), infer(2, priority=1), train(3), infer(4)):
        sched.on_arrival(t)
    sched.plan()
    assert placed(sched) == {2: 0, 1: 1, 4: 2, 0: 0, 3: 1}


def test_random_is_seeded_and_deterministic():
    tasks = [infer(i, i * MS, 5) for i in range(30)]

    def nodes(seed):
        r = simulate(make_params(policy="random", nodes=3, seed=seed), tasks)
        return [r_.node for r_ in sorted(r.requests, key=lambda r_: r_.task_id)]

    assert nodes(0) == nodes(0)
    assert nodes(1) == nodes(1)
    assert nodes(0) != nodes(1)
    assert set(nodes(0)) == {0, 1, 2}


def test_luf_least_predicted_work_ties_to_lowest_index():
    # forward 2^-10 s per token: sums of predictions are exact binary fractions, so ties are real
    exact = make_stage(fwd_ms_per_token=1.0)
    exact = replace(exact, fwd=OpCoeffs(b=2.0 ** -10))
    sched, _ = make_scheduler(make_params(policy="luf", nodes=2), make_profile(stage_list=[exact, exact]))
    sched.on_arrival(infer(0, 0.0, 100))             # owes 2 x 100 units
    for i in range(1, 12):
        sched.on_arrival(infer(i, 0.0, 10))          # 2 x 10 units each
    sched.plan()
    # task 0 -> node 0 (tie at 0), then node 1 until it owes as much (tasks 1..10),
    # then the tie goes to the lower index.
    assert placed(sched) == {0: 0, **{i: 1 for i in range(1, 11)}, 11: 0}
    assert sched.view.pending_work_s(0) == 220 * 2.0 ** -10
    assert sched.view.pending_work_s(1) == 200 * 2.0 ** -10


def test_luf_drained_node_owes_exactly_zero():
    # 0.6 s of predicted work, subtracted op by op, used to leave float residue that broke ties
    tasks = [train(0, 0.0, 100), train(1, 1.0, 100), train(2, 2.0, 100)]
    result = simulate(make_params(policy="luf", nodes=2), tasks)
    assert [t.node for t in result.train_tasks] == [0, 0, 0]


# ---------------------------------------------------------------------------- separate
def test_separate_split_sync_and_stale_serving():
    tasks = []
    for i in range(16):
        tasks.append(train(2 * i, i * 30 * MS, 10))
        tasks.append(infer(2 * i + 1, i * 30 * MS + 15 * MS, 10))
    params = make_params(policy="separate", nodes=4, train_share=0.5, sync_every=2, microbatches=1)
    result = simulate(params, tasks)
    check_all(result, tasks)
    assert failures(result) == []
    serving, training = {0, 1}, {2, 3}
    assert {r.node for r in result.requests} <= serving
    assert {t.node for t in result.train_tasks} <= training
    assert {o.node for o in result.ops if o.train} <= training
    assert {o.node for o in result.ops if o.kind is OpKind.FWD and not o.train} <= serving
    syncs = [o for o in result.ops if o.kind is OpKind.SYNC]
    assert {o.node for o in syncs} == serving
    # a sync every K=2 training steps (counted over all training nodes), every serving stage
    assert len(syncs) == (len(result.train_steps) // 2) * len(serving) * params.stages
    # a sync copies weight_bytes (1000) at 1 MB/s: 1 ms, blocking the receiving stage
    assert all(o.end_s - o.start_s == pytest.approx(1 * MS) for o in syncs)
    # serving weights lag: no request saw more than the synced versions, some saw stale ones
    assert max(r.weight_version for r in result.requests) < max(s.step for s in result.train_steps) + 1
    assert any(r.staleness_steps > 0 for r in result.requests)
    assert all(r.staleness_s >= 0 for r in result.requests)
    first_sync_end = min(o.end_s for o in syncs)
    assert all(r.weight_version == 0 for r in result.requests if r.first_token_s < first_sync_end)


def test_colocated_single_node_serves_fresh_weights():
    tasks = [train(0, 0.0, 10), infer(1, 0.2, 10), train(2, 0.3, 10), infer(3, 0.6, 10)]
    result = simulate(make_params(policy="lemix", nodes=1, microbatches=1), tasks)
    assert [(r.weight_version, r.staleness_steps) for r in result.requests] == [(1, 0), (2, 0)]
    assert not [o for o in result.ops if o.kind is OpKind.SYNC]


def test_separate_dynamic_grows_the_training_side_with_training_load():
    tasks = []
    for i in range(12):
        tasks.append(train(2 * i, float(i), 100))        # 600 ms of work each
        tasks.append(infer(2 * i + 1, i + 0.5, 10))
    from lemix.sim import simulate_policy
    result, sim = simulate_policy(make_params(policy="separate-dynamic", nodes=4), make_profile(2), tasks,
                                  noise=0.0)
    assert sim.sched.policy.roles(sim.sched.view) == (frozenset({0}), frozenset({1, 2, 3}))
    by_id = {r.task_id: r for r in result.train_tasks + result.requests}
    # before the first re-evaluation (period 10 s): the static 2/2 split
    assert {by_id[2 * i].node for i in range(10)} <= {2, 3}
    assert {by_id[2 * i + 1].node for i in range(10)} <= {0, 1}
    # after it: node 1 trains, only node 0 serves
    assert by_id[20].node == 1 and by_id[22].node == 1
    assert by_id[21].node == 0 and by_id[23].node == 0


# ---------------------------------------------------------------------------- lemix
def busy_node_scene(policy: str, **kw):
    """S=4, 2 nodes; task 0 (10 tokens) runs stage 0 of node 0 over [0, 10] ms; at 5 ms a new
    10-token request arrives. Node 0: II 0, R 45 ms (slots behind task 0). Node 1: the fill
    bubble II = 10+20+30 = 60 ms, R 40 ms. SLO = 5 x 40 ms = 200 ms."""
    sched, clock = make_scheduler(make_params(policy=policy, nodes=2, stages=4, lambda2=0.0, **kw))
    sched.on_arrival(infer(0, 0.0, 10))
    sched.plan()
    assert placed(sched) == {0: 0}
    clock.advance_to(5 * MS)
    task = infer(1, 5 * MS, 10)
    f0, f1 = sched.view.forecast(0, task), sched.view.forecast(1, task)
    assert (f0.ii_s, f0.r_s) == (pytest.approx(0.0), pytest.approx(45 * MS))
    assert (f1.ii_s, f1.r_s) == (pytest.approx(60 * MS), pytest.approx(40 * MS))
    assert sched.view.slo_s(task) == pytest.approx(200 * MS)
    return sched, task


@pytest.mark.parametrize("kw, s0, s1, node", [
    # score = -max(II / bubble, tau) - lambda1 R / SLO; bubble = the task's II on an idle node
    # (60 ms here), so node 1's fill bubble counts 1.0
    (dict(lambda1=0.5, tau=0.2), -0.2 - 0.5 * 45 / 200, -1.0 - 0.5 * 40 / 200, 0),    # consolidate
    (dict(lambda1=100.0, tau=0.2), -0.2 - 100 * 45 / 200, -1.0 - 100 * 40 / 200, 1),  # latency wins
    (dict(lambda1=0.5, tau=2.0), -2.0 - 0.5 * 45 / 200, -2.0 - 0.5 * 40 / 200, 1),    # idleness tie
])
def test_lemix_score_consolidation_vs_latency(kw, s0, s1, node):
    sched, task = busy_node_scene("lemix", **kw)
    assert sched.policy.score(task, 0, sched.view) == pytest.approx(s0)
    assert sched.policy.score(task, 1, sched.view) == pytest.approx(s1)
    assert sched.policy.place(task, sched.view) == node


def test_lemix_tradeoff_on_a_stream():
    # 20 requests every 5 ms, 10 ms per stage, 4 stages, 4 nodes
    tasks = [infer(i, i * 5 * MS, 10) for i in range(20)]

    def run(**kw):
        r = simulate(make_params(policy="lemix", nodes=4, stages=4, **kw), tasks)
        return len({x.node for x in r.requests}), summarize(r)["mean_e2el_ms"]

    packed_nodes, packed_ms = run(lambda1=0.01, tau=0.0)
    spread_nodes, spread_ms = run(lambda1=5.0)
    assert packed_nodes == 1 and packed_ms == pytest.approx(87.5)   # queues: 40 ms unloaded
    assert spread_nodes > 1 and spread_ms < packed_ms


def test_lemix_paper_sign_bug_prefers_the_larger_response():
    # naivemix places three requests: node 0 gets tasks 0 and 2, node 1 task 1. A fourth
    # request at 0: both nodes give it II = 0; R = 40 ms on node 0, 30 ms on node 1.
    params = make_params(policy="naivemix", nodes=2, lambda1=0.5, lambda2=0.0, tau=0.2)
    sched, _ = make_scheduler(params)
    for i in range(3):
        sched.on_arrival(infer(i, 0.0, 10))
    sched.plan()
    task = infer(3, 0.0, 10)
    assert [sched.view.forecast(n, task).r_s for n in (0, 1)] == [pytest.approx(40 * MS), pytest.approx(30 * MS)]
    assert [sched.view.forecast(n, task).ii_paper_s for n in (0, 1)] == [pytest.approx(0.0), pytest.approx(0.0)]
    paper, fixed = make_policy("lemix-paper", params), make_policy("lemix", params)
    # research formula: (IP + l2 LC) / (l1 R) with IP = -max(II/S - gap, tau) = -0.2 on both
    assert paper.score(task, 0, sched.view) == pytest.approx(-0.2 / (0.5 * 0.040))   # -10
    assert paper.score(task, 1, sched.view) == pytest.approx(-0.2 / (0.5 * 0.030))   # -13.3
    assert paper.place(task, sched.view) == 0         # the LARGER response time wins
    # sign-correct: -max(0, tau) - l1 R / SLO, SLO = 100 ms
    assert fixed.score(task, 0, sched.view) == pytest.approx(-0.2 - 0.5 * 0.4)
    assert fixed.score(task, 1, sched.view) == pytest.approx(-0.2 - 0.5 * 0.3)
    assert fixed.place(task, sched.view) == 1


def test_lemix_length_consistency_prefers_a_node_of_similar_lengths():
    params = make_params(policy="naivemix", nodes=2, lambda1=0.0, lambda2=1.0, tau=10.0)
    sched, _ = make_scheduler(params)
    for i, n in enumerate((10, 100, 12, 110)):   # node 0: 10, 12; node 1: 100, 110
        sched.on_arrival(infer(i, 0.0, n))
    sched.plan()
    assert placed(sched) == {0: 0, 1: 1, 2: 0, 3: 1}
    lemix = make_policy("lemix", params)
    assert lemix.place(infer(9, 0.0, 11), sched.view) == 0
    assert lemix.place(infer(9, 0.0, 105), sched.view) == 1
    # LC' = exp(-(l - mu)^2 / (2 var)): 11 on node 0 (mu 11, var 2) -> exactly 1
    assert sched.view.length_stats(0).consistency(11) == pytest.approx(1.0)


def test_lemix_defers_training_during_an_inference_burst_and_runs_it_later():
    # 12 requests of 40 tokens at 0 (80 ms unloaded, SLO 400 ms) on one node; stage 0 is busy
    # until 480 ms, so a typical request placed at t finishes at 560 ms: congested until
    # 560 - t <= 400, i.e. t >= 160 ms (the 4th stage-0 op end). Training arriving at 1..4 ms
    # is deferred until then.
    tasks = [infer(i, 0.0, 40) for i in range(12)] + [train(12 + i, (i + 1) * MS, 10) for i in range(4)]
    # (the paper's Eq. 4 alone: with late binding the node also takes one training task at a time)
    result = simulate(make_params(policy="lemix", nodes=1, min_train_share=0.0, no_late_binding=True,
                                  eq4_inference_only=True), tasks)
    check_all(result, tasks)
    assert result.deferred_total == 4
    assert all(t.finish_s is not None and not t.failed for t in result.train_tasks)
    assert [round(t.deferred_s / MS, 6) for t in result.train_tasks] == [159.0, 158.0, 157.0, 156.0]
    # inference first: no training op starts before the last request left stage 0
    assert min(o.start_s for o in result.ops if o.train) == pytest.approx(480 * MS)

    baseline = simulate(make_params(policy="lemix/no-prioritization", nodes=1, min_train_share=0.0,
                                    no_late_binding=True), tasks)
    assert baseline.deferred_total == 0


def test_lemix_starvation_bound_forces_training_through():
    tasks = [infer(i, 0.0, 40) for i in range(12)] + [train(12 + i, (i + 1) * MS, 10) for i in range(4)]
    result = simulate(make_params(policy="lemix", nodes=1, min_train_share=0.1, no_late_binding=True,
                                  eq4_inference_only=True), tasks)
    # 0/12 and 1/13 placed tasks were training (< 10 %): tasks 12 and 13 are forced at once;
    # the device-level training share then lets their ops through between requests, which is
    # why 14 and 15 wait a little longer for the congestion to clear. (When it clears depends on
    # the last bits of the calibration: measured end - start in absolute times is not the exact
    # duration, so the ratios are 1 +- a few ulps, and this profile's round times make ties; with
    # a publish after every op it was 187 and 186 ms.)
    assert [round(t.deferred_s / MS, 6) for t in result.train_tasks] == [0.0, 0.0, 177.0, 176.0]


def test_inference_first_dispatch_keeps_a_minimum_training_share_of_device_time():
    # requests back to back for 3 s saturate the node; training must still get its share
    tasks = [infer(i, i * 20 * MS, 40) for i in range(150)]
    tasks += [train(1000 + i, 0.0, 10) for i in range(6)]
    for share in (0.0, 0.2):
        result = simulate(make_params(policy="lemix", nodes=1, min_train_share=share), tasks)
        inference_end = max(r.finish_s for r in result.requests)
        early = [t for t in result.train_tasks if t.finish_s < inference_end / 2]
        if share == 0.0:
            assert not early                  # strict inference-first: training waits out the burst
        else:
            assert len(early) == 6            # every training task ran during the burst


def test_lemix_max_defer_forces_placement_at_exactly_its_wake_up():
    # tau_r = 0.1: a request in flight makes the node look congested, so training waits
    # max_defer_s (the request of 100 tokens runs 0.15..0.35 s; on a node with no inference
    # left the task would be placed at once: test_sched_liveness.py).
    # 0.1502 + 0.05 == 0.2002 in floats, but 0.2002 - 0.1502 < 0.05: the wake-up must still force.
    tasks = [infer(0, 0.15, 100), train(1, 0.1502, 10)]
    params = make_params(policy="lemix", nodes=1, tau_r=0.1, min_train_share=0.0, max_defer_s=0.05)
    result = simulate(params, tasks)
    (t,) = result.train_tasks
    assert not t.failed and result.deferred_total == 1
    assert t.deferred_s == pytest.approx(0.05)   # placed at 0.2002, not at the next event (0.25)


def test_lemix_prioritization_protects_slo_against_interleaved_training():
    # requests (80 ms unloaded) every 30 ms with a 60-token training micro-batch after each
    tasks = []
    for i in range(10):
        tasks.append(infer(2 * i, i * 30 * MS, 40))
        tasks.append(train(2 * i + 1, i * 30 * MS + 1 * MS, 30))
    att = {p: summarize(simulate(make_params(policy=p, nodes=1), tasks))["slo_attainment"]
           for p in ("lemix", "lemix/no-prioritization", "naivemix")}
    assert att["lemix"] == 1.0
    assert att["lemix/no-prioritization"] < 0.5 and att["naivemix"] < 0.5


def test_no_profile_starts_generic_and_calibrates_online():
    tasks = [infer(i, i * 50 * MS, 10) for i in range(6)]
    from lemix.sim import simulate_policy
    result, sim = simulate_policy(make_params(policy="lemix/no-profile", nodes=1), make_profile(2), tasks,
                                  noise=0.0)
    fwd = [o for o in result.ops if o.kind is OpKind.FWD]
    # the generic guess is 2.5 x stage 0's coefficients: 25 ms predicted for a 10 ms op
    assert fwd[0].predicted_s == pytest.approx(25 * MS)
    # after each finished op the correction moves the prediction towards the truth
    last = [o for o in fwd if o.stage == 0][-1]
    assert abs(last.predicted_s - 10 * MS) < abs(fwd[0].predicted_s - 10 * MS) / 2
