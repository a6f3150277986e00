"""Running a sweep: one row per point x policy, the same numbers as `simulate`, any --jobs."""
from __future__ import annotations

import os

from sweep_factory import HOST_TIMING, TRACE, make_cfg, results_only

from lemix.config import with_overrides
from lemix.experiment import build_tasks, simulate
from lemix.metrics import summarize
from lemix.sweep import SweepGrid, _cost, _map, default_jobs, sweep, sweep_points


def test_one_row_per_point_and_policy_in_order():
    cfg = make_cfg()
    grid = SweepGrid.parse(request_rates="3,6", train_shares="0.2,0.6")
    seen = []
    rows = sweep(cfg, grid, on_row=seen.append)
    assert [(r["point"], r["policy"]) for r in rows] == [
        (p, name) for p in range(4) for name in ("lemix", "separate")]
    assert seen == rows          # serial: called in order, once per run
    for r in rows:
        assert r["request_rate"] in (3.0, 6.0) and r["train_share"] in (0.2, 0.6) and r["rate"] is None
        assert r["load_per_s"] == r["request_rate"]
        assert r["requests_total"] + r["train_tasks_total"] == round(r["offered_tasks_per_s"] * 4.0)
        assert "idle_ratio_per_stage" not in r and "slo_attainment" in r
    # every policy at a point saw the same tasks; different points saw different ones
    for p in range(4):
        lem, sep = rows[2 * p], rows[2 * p + 1]
        assert (lem["requests_total"], lem["train_tasks_total"], lem["first_arrival_s"]) == \
            (sep["requests_total"], sep["train_tasks_total"], sep["first_arrival_s"])
    assert rows[0]["requests_total"] != rows[2]["requests_total"] or \
        rows[0]["first_arrival_s"] != rows[2]["first_arrival_s"]


def test_rows_are_what_simulate_reports():
    cfg = make_cfg()
    rows = sweep(cfg, SweepGrid.parse(request_rates="5", train_shares="0.3"))
    direct = simulate(with_overrides(cfg, {"workload.request_rate": 5.0, "workload.train_share": 0.3}))
    for row, res in zip(rows, direct):
        s = summarize(res)
        assert row["policy"] == res.policy
        for k in ("slo_attainment", "total_task_throughput", "train_samples_per_s", "p99_e2el_ms",
                  "idle_ratio", "completed", "train_completed", "makespan_s", "staleness_steps_mean"):
            assert row[k] == s[k], k


def test_identical_rows_for_one_and_two_processes():
    cfg = make_cfg(policy__names="lemix,naivemix")
    grid = SweepGrid.parse(request_rates="3,6", seeds="1,2")
    one = sweep(cfg, grid, jobs=1)
    got = []
    two = sweep(cfg, grid, jobs=2, on_row=got.append)
    assert len(one) == len(two) == 8 and len(got) == 8
    assert results_only(one) == results_only(two)
    assert len({r["slo_attainment"] for r in one}) > 1     # not a degenerate grid


def test_longest_first_order_keeps_results_in_job_order():
    # costs only decide which job a process takes first; results come back in job order
    jobs = [(divmod, (n, 3)) for n in range(7)]
    assert _map(jobs, 2, None, costs=[0, 5, 1, 9, 2, 2, 8]) == [divmod(n, 3) for n in range(7)]
    heavy = make_cfg(workload__request_rate=8.0)
    light = make_cfg(workload__request_rate=2.0)
    assert _cost(heavy, "luf") > _cost(light, "luf") and _cost(light, "lemix") > _cost(light, "luf")


def test_default_jobs_is_one_per_cpu_at_most_one_per_run():
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_jobs(1) == 1 and default_jobs(10_000) == cpus
    assert default_jobs(2) == min(2, cpus)


def test_deprecated_total_rates_mean_what_they_did():
    # --rates 4 at share 0.5 is --request-rates 2: the same tasks, the same numbers
    cfg = make_cfg()
    old = sweep(cfg, SweepGrid.parse(rates="4"))
    new = sweep(cfg, SweepGrid.parse(request_rates="2"))
    assert [r["load_per_s"] for r in old] == [4.0, 4.0] and [r["load_per_s"] for r in new] == [2.0, 2.0]
    assert [r["rate"] for r in old] == [4.0, 4.0] and [r["request_rate"] for r in old] == [2.0, 2.0]
    skip = HOST_TIMING | {"rate", "load_per_s"}
    assert [{k: v for k, v in r.items() if k not in skip} for r in old] == \
        [{k: v for k, v in r.items() if k not in skip} for r in new]


def test_trace_points_use_the_offered_rate_as_load():
    cfg = make_cfg(workload__trace=TRACE, workload__duration_s=20.0)   # a lull from 5 s to 33 s
    rows = sweep(cfg, SweepGrid.parse(trace_speedups="1,2"))
    slow, fast = rows[0], rows[2]
    assert slow["rate"] is None and slow["trace_speedup"] == 1.0 and fast["trace_speedup"] == 2.0
    n = len(build_tasks(sweep_points(cfg, SweepGrid.parse(trace_speedups="2"))[0].cfg))
    assert fast["load_per_s"] == fast["offered_tasks_per_s"] == n / 20.0
    assert fast["load_per_s"] > slow["load_per_s"]
