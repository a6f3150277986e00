"""The discrete-event loop: event order at equal times, determinism, and a golden run."""
from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import pytest
from sched_factory import ALL_POLICIES, MS, check_all, infer, make_params, make_profile, simulate

from lemix.clock import SimClock
from lemix.metrics import summarize
from lemix.sched.latency import LatencyModel
from lemix.sched.scheduler import Plan
from lemix.sim import Simulator
from lemix.types import Op, OpKind, RunResult
from lemix.workload import make_tasks
from lemix.workload.lengths import LognormalLengths


class RecordingScheduler:
    """A stand-in scheduler that logs every call the simulator makes."""

    def __init__(self, clock: SimClock, plans: dict[float, Plan]) -> None:
        self.clock, self.plans, self.log = clock, plans, []

    def on_arrival(self, task):
        self.log.append(("arrival", task.task_id, self.clock.now()))

    def on_op_finished(self, result):
        self.log.append(("finish", result.op_id, result.start_s, result.end_s))

    def plan(self):
        t = self.clock.now()
        self.log.append(("plan", t))
        return self.plans.get(t, Plan())

    def finalize(self):
        return RunResult(policy="recording")


def fwd_op(op_id: int, tokens: int) -> Op:
    return Op(op_id, OpKind.FWD, 0, 0, op_id, (op_id,), False, batch_size=1, seq_tokens=tokens)


def test_equal_times_finish_then_arrival_then_one_plan():
    clock = SimClock()
    # at 0: start a 10 ms op and ask for a wake-up at 10 ms, when task 1 also arrives
    plans = {0.0: Plan((fwd_op(0, 10),), wakeup_s=10 * MS)}
    sched = RecordingScheduler(clock, plans)
    sim = Simulator(sched, clock, LatencyModel(make_profile(1), calibrate=False), noise=0.0)
    sim.run([infer(1, 10 * MS), infer(0, 0.0)])
    assert sched.log == [
        ("arrival", 0, 0.0), ("plan", 0.0),
        # op end, arrival and wake-up share t = 10 ms: the finish is absorbed first (it frees
        # the device), then the arrival; the wake-up adds no call; then a single plan
        ("finish", 0, 0.0, 10 * MS), ("arrival", 1, 10 * MS), ("plan", 10 * MS),
    ]
    assert sim.events_processed == 4 and sim.ops_executed == 1   # 2 arrivals, 1 finish, 1 wake-up


def test_duplicate_and_past_wakeups_are_dropped():
    clock = SimClock()
    plans = {0.0: Plan((), wakeup_s=5 * MS), 5 * MS: Plan((), wakeup_s=5 * MS)}
    sched = RecordingScheduler(clock, plans)
    Simulator(sched, clock, LatencyModel(make_profile(1)), noise=0.0).run([infer(0, 0.0)])
    assert sched.log == [("arrival", 0, 0.0), ("plan", 0.0), ("plan", 5 * MS)]


def test_task_arriving_as_a_device_frees_starts_at_once():
    tasks = [infer(0, 0.0, 10), infer(1, 10 * MS, 10)]
    result = simulate(make_params(policy="naivemix", nodes=1, stages=1), tasks)
    starts = sorted((o.start_s, o.task_ids) for o in result.ops)
    assert starts == [(0.0, (0,)), (10 * MS, (1,))]


def test_horizon_stops_the_run_and_unfinished_tasks_are_failed():
    from lemix.sim import simulate_policy
    tasks = [infer(0, 0.0, 10), infer(1, 1.0, 10)]
    result, _ = simulate_policy(make_params(nodes=1), make_profile(2), tasks, noise=0.0, horizon_s=0.5)
    assert [(r.task_id, r.failed) for r in sorted(result.requests, key=lambda r: r.task_id)] == [
        (0, False)]
    # task 1 never arrived before the horizon: the scheduler never saw it
    assert len(result.requests) == 1


def test_noise_is_seeded_lognormal_on_true_durations():
    tasks = [infer(i, i * 50 * MS, 10) for i in range(5)]
    plain = simulate(make_params(policy="naivemix", nodes=1), tasks, noise=0.0)
    noisy = simulate(make_params(policy="naivemix", nodes=1), tasks, noise=0.2)
    assert all(o.end_s - o.start_s == pytest.approx(10 * MS) for o in plain.ops)
    assert len({round(o.end_s - o.start_s, 12) for o in noisy.ops}) == len(noisy.ops)


def small_workload(seed: int = 3):
    return make_tasks(rng=np.random.default_rng(seed), arrival="gamma", rate_per_s=40.0, burstiness=4.0,
                      duration_s=0.5, train_share=0.4,
                      length_model=LognormalLengths(prompt_median=12, output_median=3, max_prompt=48,
                                                    max_output=8),
                      train_batch_size=1, train_seq_tokens=12)


def comparable(result: RunResult) -> dict:
    d = asdict(result)
    d.pop("decision_us"), d.pop("wall_s")      # measured wall time, not simulated behaviour
    return d


@pytest.mark.parametrize("policy", ALL_POLICIES)
@pytest.mark.parametrize("generate", [False, True])
def test_same_seed_same_run(policy, generate):
    tasks = small_workload()
    params = make_params(policy=policy, nodes=2, stages=2, max_batch=3, generate=generate, seed=5)
    a = simulate(params, tasks, noise=0.3)
    b = simulate(params, tasks, noise=0.3)
    check_all(a, tasks)
    assert comparable(a) == comparable(b)
    assert len(a.decision_us) == len(b.decision_us)
    c = simulate(make_params(policy=policy, nodes=2, stages=2, max_batch=3, generate=generate, seed=6),
                 tasks, noise=0.3)
    assert [o.end_s for o in c.ops] != [o.end_s for o in a.ops]   # the seed drives the noise


# ---------------------------------------------------------------------------- golden
def golden_workload():
    """32 tasks over 1 s (17 requests, 15 training micro-batches of 16 tokens), seed 7."""
    return make_tasks(rng=np.random.default_rng(7), arrival="poisson", rate_per_s=30.0, duration_s=1.0,
                      train_share=0.5,
                      length_model=LognormalLengths(prompt_median=16, output_median=4, max_prompt=64,
                                                    max_output=16),
                      train_batch_size=1, train_seq_tokens=16)


# Computed once and checked for plausibility: arrivals end at 0.9955 s, the last training task
# (96 ms of stage work) finishes about 0.1-0.2 s later; requests are ~16-64 tokens (32-128 ms
# unloaded on 2 stages, SLO 5x). naivemix/luf meet every SLO; lemix misses one: it batches
# request 14 (15 tokens) with request 15 (56 tokens) on node 0, so 14 pays the padded 2 x 112 ms
# prefill after a backward (251 ms > 150 ms SLO). If a deliberate scheduler change moves these
# numbers, re-derive and update them here.
# Issue 10 changed lemix on purpose: with late binding (training placed when a node's training
# queue has room, sched/admission.py) request 14 no longer queues behind a backward: 17/17; the
# lookahead slack and Eq. 4 seeing training (on with bounded blocking) move the rest a little.
# `no_late_binding` + `no_chunking` (+ `no_slo_batching`, the second round's SLO-aware prefill batching,
# which leaves these numbers as they are) give the previous numbers exactly (test_golden_without_...).
# Third round: a due optimizer step waits for inference ready on its device (`step_first` off):
# mean E2E 52.3823 -> 52.3234 ms, the rest unchanged (`step_first=True` gives 52.3823 again;
# the lookahead that sees queued inference changes nothing here, and with the other issue 10
# mechanisms off it takes `no_lookahead_queued` too to give the previous numbers).
# The profile has no layer counts, so adaptive chunks (like chunking) do not apply here.
GOLDEN = {
    "lemix": dict(slo_attainment=1.0, completed=17, train_completed=15, failed=0, makespan_s=1.12769484312,
                  mean_e2el_ms=52.3234423209, train_steps=6),
    "naivemix": dict(slo_attainment=1.0, completed=17, train_completed=15, failed=0, makespan_s=1.10390246863,
                     mean_e2el_ms=59.2748530847, train_steps=8),
}


def test_golden_without_issue_10_mechanisms():
    s = summarize(simulate(make_params(policy="lemix", nodes=2, stages=2, max_batch=4, microbatches=4,
                                       no_late_binding=True, no_chunking=True, no_slo_batching=True,
                                       step_first=True, no_lookahead_queued=True),   # (third round)
                           golden_workload()))
    old = dict(slo_attainment=16 / 17, completed=17, train_completed=15, failed=0, makespan_s=1.20160813083,
               mean_e2el_ms=77.1410407131, train_steps=3)
    assert {k: s[k] for k in old} == pytest.approx(old, rel=1e-9)


@pytest.mark.parametrize("policy", list(GOLDEN))
def test_golden_summary(policy):
    tasks = golden_workload()
    assert (len(tasks), sum(t.is_train for t in tasks)) == (32, 15)
    result = simulate(make_params(policy=policy, nodes=2, stages=2, max_batch=4, microbatches=4), tasks)
    check_all(result, tasks)
    s = summarize(result)
    got = {k: s[k] for k in GOLDEN[policy]}
    assert got == pytest.approx(GOLDEN[policy], rel=1e-9)
    assert s["first_arrival_s"] == pytest.approx(tasks[0].arrival_s)


def test_golden_with_the_step_first():
    s = summarize(simulate(make_params(policy="lemix", nodes=2, stages=2, max_batch=4, microbatches=4,
                                       step_first=True), golden_workload()))
    assert s["mean_e2el_ms"] == pytest.approx(52.3822658503, rel=1e-9)
    assert s["makespan_s"] == pytest.approx(GOLDEN["lemix"]["makespan_s"], rel=1e-9)


class RecordingExecutor:
    """An OpExecutor that logs what the loop tells it and stops sequence 2 at its first decode."""

    def __init__(self, clock: SimClock) -> None:
        self.clock, self.log, self.outputs = clock, [], 0

    def arrive(self, task):
        self.log.append(("arrive", task.task_id, self.clock.now()))

    def start(self, op):
        self.log.append(("start", op.op_id, self.clock.now()))

    def finish(self, op, result):
        assert result.end_s == self.clock.now() and result.op_id == op.op_id
        self.log.append(("finish", op.op_id, self.clock.now()))
        if op.kind is OpKind.DECODE and 2 in op.task_ids:
            return replace(result, stopped_task_ids=(2,))
        return result

    def take(self, out):
        self.outputs += out is not None


def test_executor_hears_every_event_in_order_and_its_results_reach_the_scheduler():
    from lemix.sched.scheduler import Scheduler

    tasks = [infer(i, i * 5 * MS, 10, out=6) for i in range(4)]
    params = make_params(policy="naivemix", nodes=1, stages=2, generate=True)

    def run(with_executor: bool):
        clock = SimClock()
        sched = Scheduler(params, make_profile(2), clock)
        ex = RecordingExecutor(clock) if with_executor else None
        sim = Simulator(sched, clock, LatencyModel(make_profile(2), calibrate=False), noise=0.1, executor=ex)
        return sim.run(tasks), ex

    plain, _ = run(False)
    fed, ex = run(True)
    starts = [e for e in ex.log if e[0] == "start"]
    finishes = [e for e in ex.log if e[0] == "finish"]
    assert len(starts) == len(finishes) == len(fed.ops) and [e[0] for e in ex.log][:1] == ["arrive"]
    assert [e[2] for e in ex.log] == sorted(e[2] for e in ex.log)          # event order
    assert {e[1] for e in starts} == {e[1] for e in finishes}
    assert ex.outputs > len(tasks)                                          # every call's outputs
    out = {r.task_id: r.output_tokens for r in fed.requests}
    assert out[2] < 6 and out == {**{r.task_id: r.output_tokens for r in plain.requests}, 2: out[2]}
