"""summarize(): exact numbers on hand-built runs."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from metrics_factory import make_result, mixed_result, op, req, task

from lemix.metrics.summary import merged_busy_s, summarize


def test_makespan_counts_and_throughput():
    s = summarize(mixed_result())
    # First arrival: failed training task at 0.0; last completion: training task 11 at 8.0.
    # The failed request finishing at 9.0 is not a completion.
    assert s["first_arrival_s"] == 0.0 and s["last_completion_s"] == 8.0
    assert s["makespan_s"] == 8.0
    assert (s["completed"], s["failed"]) == (3, 2)          # requests, as vllm bench serve counts
    assert (s["train_completed"], s["train_failed"]) == (1, 2)
    assert s["request_throughput"] == pytest.approx(3 / 8)
    assert s["total_task_throughput"] == pytest.approx(4 / 8)
    # Secondary figure: node spans 1..5 (4 s) and 2..4 (2 s) -> 4 / 6. Not the headline number.
    assert s["throughput_per_busy_node_span"] == pytest.approx(4 / 6)
    assert s["total_task_throughput"] != s["throughput_per_busy_node_span"]
    assert (s["requests_total"], s["train_tasks_total"]) == (5, 3)
    assert (s["policy"], s["nodes"], s["stages"]) == ("mixed", 2, 2)


def test_slo_attainment_counts_unfinished_and_failed_as_missed():
    s = summarize(mixed_result())
    # Met: requests 1 and 3. Request 2 too slow, 4 unfinished, 5 failed: all in the denominator.
    assert s["slo_met"] == 2
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    # A failed request within its SLO still misses.
    fast_but_failed = make_result(requests=[req(1, 0.0, 0.1, 0.2, failed=True)])
    assert summarize(fast_but_failed)["slo_attainment"] == 0.0
    assert summarize(make_result(requests=[req(1, 0.0)]))["slo_attainment"] == 0.0


def test_latency_percentiles_ms():
    s = summarize(mixed_result())
    # TTFT over finished requests: 200, 500, 100 ms (linear interpolation between ranks).
    assert s["mean_ttft_ms"] == pytest.approx(800 / 3)
    assert s["median_ttft_ms"] == pytest.approx(200.0)
    assert s["p90_ttft_ms"] == pytest.approx(440.0)      # 200 + 0.8 * 300
    assert s["p99_ttft_ms"] == pytest.approx(494.0)      # 200 + 0.98 * 300
    # E2E: 500, 2000, 400 ms.
    assert s["mean_e2el_ms"] == pytest.approx(2900 / 3)
    assert s["median_e2el_ms"] == pytest.approx(500.0)
    assert s["p90_e2el_ms"] == pytest.approx(1700.0)
    assert s["p99_e2el_ms"] == pytest.approx(1970.0)


def test_tpot_excludes_single_token_requests():
    s = summarize(mixed_result())
    # Request 1: (500 - 200) / 3 = 100 ms; request 2: (2000 - 500) / 5 = 300 ms;
    # request 3 has a single output token, so no TPOT.
    assert s["mean_tpot_ms"] == pytest.approx(200.0)
    assert s["median_tpot_ms"] == pytest.approx(200.0)
    assert s["p90_tpot_ms"] == pytest.approx(280.0)
    assert s["p99_tpot_ms"] == pytest.approx(298.0)


def test_training_and_serving_quality():
    s = summarize(mixed_result())
    assert s["train_samples_per_s"] == pytest.approx(4 / 8)    # only the finished task counts
    assert s["train_tokens_per_s"] == pytest.approx(512 / 8)
    assert s["train_steps"] == 3
    assert s["train_loss_last"] == 1.0      # latest step by time that has a loss
    assert s["train_loss_mean"] == pytest.approx(1.5)
    assert s["deferred_total"] == 3 and s["offload_events"] == 2
    assert s["inference_loss_mean"] == pytest.approx(2.5)
    assert s["staleness_steps_mean"] == pytest.approx(1.0)     # failed request's 10 excluded
    assert s["staleness_s_mean"] == pytest.approx(0.5)
    assert s["sched_decision_us_p50"] == pytest.approx(25.0)
    assert s["sched_decision_us_p99"] == pytest.approx(39.7)
    assert s["wall_s"] == 1.25


def test_idle_ratio_merges_overlaps_and_clips_to_window():
    res = make_result(
        requests=[req(1, 0.0, 1.0, 10.0, slo_s=20.0)], nodes=1, stages=2,
        ops=[
            op(0, 0, 1.0, 3.0), op(0, 0, 2.0, 5.0),      # overlap -> [1, 5]
            op(0, 0, -2.0, 1.0),                         # clipped to [0, 1], touches [1, 5]
            op(0, 0, 9.0, 12.0),                         # clipped to [9, 10]
            op(0, 0, 11.0, 13.0),                        # entirely after the window
            op(0, 1, 0.0, 10.0), op(0, 1, 0.0, 10.0),    # duplicate counted once
        ])
    s = summarize(res)
    assert s["makespan_s"] == 10.0
    assert s["idle_ratio_per_stage"] == pytest.approx([0.4, 0.0])   # stage 0 busy 6 of 10
    assert s["idle_ratio"] == pytest.approx(1 - 16 / 20)


def test_idle_ratio_per_stage_averages_over_nodes():
    res = make_result(requests=[req(1, 0.0, 1.0, 4.0, slo_s=9.0)], nodes=2, stages=1,
                      ops=[op(0, 0, 0.0, 4.0), op(1, 0, 0.0, 1.0)])
    s = summarize(res)
    assert s["idle_ratio_per_stage"] == pytest.approx([1 - 5 / 8])
    assert s["idle_ratio"] == pytest.approx(1 - 5 / 8)


def test_merged_busy_s_direct():
    busy = merged_busy_s([op(0, 0, 0.0, 2.0), op(0, 0, 3.0, 4.0), op(0, 0, 1.0, 2.5),
                          op(1, 0, 5.0, 6.0)], 0.0, 10.0)
    assert busy == {(0, 0): pytest.approx(3.5), (1, 0): pytest.approx(1.0)}


def test_op_outside_cluster_is_an_error():
    res = make_result(requests=[req(1, 0.0, 0.5, 1.0)], ops=[op(0, 3, 0.0, 1.0)], stages=2)
    with pytest.raises(ValueError, match="outside"):
        summarize(res)


def test_empty_run_is_all_none_not_nan():
    s = summarize(make_result())
    assert s["makespan_s"] is None and s["slo_attainment"] is None
    assert s["request_throughput"] is None and s["idle_ratio"] is None
    assert s["mean_ttft_ms"] is None and s["train_loss_last"] is None
    assert s["completed"] == s["failed"] == s["train_completed"] == s["train_failed"] == 0
    json.dumps(s, allow_nan=False)


def test_only_training_has_no_request_latency_and_no_slo():
    res = make_result(train_tasks=[task(1, 0.0, 2.0, samples=8, tokens=100)])
    s = summarize(res)
    assert s["slo_attainment"] is None
    assert s["request_throughput"] == 0.0
    assert s["train_samples_per_s"] == pytest.approx(4.0)
    assert s["p99_e2el_ms"] is None


def test_summary_json_round_trip_has_only_plain_values():
    s = summarize(mixed_result())
    text = json.dumps(s, allow_nan=False)
    assert json.loads(text) == s

    def plain(v):
        if isinstance(v, list):
            return all(plain(x) for x in v)
        return v is None or type(v) in (bool, int, float, str)

    assert all(plain(v) for v in s.values())
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in s.values())


def test_nan_loss_becomes_none():
    res = make_result(requests=[req(1, 0.0, 0.5, 1.0, inference_loss=float("nan"))])
    assert summarize(res)["inference_loss_mean"] is None


def test_metrics_imports_no_torch_pandas_or_pyplot():
    code = ("import sys, lemix.metrics, lemix.metrics.plots; "
            "bad = [m for m in ('torch', 'pandas', 'matplotlib.pyplot') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
