"""Run directory contents and the comparison table."""
from __future__ import annotations

import json

import pandas as pd
from metrics_factory import make_result, mixed_result, req

from lemix.metrics.report import (REQUEST_COLUMNS, TRAIN_STEP_COLUMNS, TRAIN_TASK_COLUMNS,
                                  format_table, policy_labels, write_run_dir)
from lemix.metrics.summary import summarize


def test_write_run_dir(tmp_path):
    results = [mixed_result("lemix"), mixed_result("fcfs")]
    run = tmp_path / "run"
    written = write_run_dir(run, results, "seed: 1\npolicies: [lemix, fcfs]", title="demo")
    names = {p.name for p in written}
    assert {"config.yaml", "summary.json", "summary.txt", "requests.csv", "train_tasks.csv",
            "train_steps.csv", "timeline.json", "policy_bars.png", "latency_cdf.png",
            "inference_loss.png", "gantt_lemix.png", "gantt_fcfs.png"} <= names
    assert all(p.exists() and p.stat().st_size > 0 for p in written)
    assert (run / "config.yaml").read_text() == "seed: 1\npolicies: [lemix, fcfs]\n"

    summary = json.loads((run / "summary.json").read_text())
    assert list(summary) == ["lemix", "fcfs"]
    assert summary["lemix"] == summarize(results[0])

    reqs = pd.read_csv(run / "requests.csv")
    assert tuple(reqs.columns) == REQUEST_COLUMNS
    assert len(reqs) == 10 and list(reqs["policy"].unique()) == ["lemix", "fcfs"]
    r2 = reqs[(reqs.policy == "lemix") & (reqs.task_id == 2)].iloc[0]
    assert r2.e2e_s == 2.0 and r2.ttft_s == 0.5 and not r2.slo_met and r2.weight_version == 3
    unfinished = reqs[(reqs.policy == "lemix") & (reqs.task_id == 4)].iloc[0]
    assert pd.isna(unfinished.e2e_s) and pd.isna(unfinished.inference_loss)
    assert reqs.slo_met.sum() == 4 and reqs.failed.sum() == 2

    tasks = pd.read_csv(run / "train_tasks.csv")
    assert tuple(tasks.columns) == TRAIN_TASK_COLUMNS and len(tasks) == 6
    steps = pd.read_csv(run / "train_steps.csv")
    assert tuple(steps.columns) == TRAIN_STEP_COLUMNS and len(steps) == 6
    assert steps.loss.isna().sum() == 2

    trace = json.loads((run / "timeline.json").read_text())
    assert sum(e["ph"] == "X" for e in trace["traceEvents"]) == 8
    assert "demo" in (run / "summary.txt").read_text()


def test_write_run_dir_without_losses_or_training(tmp_path):
    res = make_result("only-serve", requests=[req(1, 0.0, 0.2, 0.5)])
    names = {p.name for p in write_run_dir(tmp_path, [res], "", title="t")}
    assert "inference_loss.png" not in names and "gantt_only-serve.png" not in names
    steps = pd.read_csv(tmp_path / "train_steps.csv")
    assert tuple(steps.columns) == TRAIN_STEP_COLUMNS and steps.empty


def test_duplicate_policy_names_get_unique_labels():
    rs = [make_result("a"), make_result("b"), make_result("a"), make_result("a")]
    assert policy_labels(rs) == ["a", "b", "a-2", "a-3"]


def test_format_table_marks_best_and_hides_absent_loss():
    good = summarize(mixed_result("good"))
    bad = dict(good, policy="bad", slo_attainment=0.1, failed=9, mean_e2el_ms=5000.0)
    slow = dict(good, policy="slow", request_throughput=0.1)
    table = format_table({"good": good, "bad": bad, "slow": slow})
    lines = table.splitlines()
    header, good_row, bad_row, slow_row = lines[0], lines[2], lines[3], lines[4]
    assert header.split()[0] == "policy" and "inf loss" in header
    assert "40.0*" in good_row and "10.0 " in bad_row
    assert "966.7*" in good_row and "5000.0 " in bad_row
    assert " 2*" in good_row and " 9 " in bad_row          # failed requests; failed training: its own column
    assert "0.375*" in good_row and "0.375*" in bad_row      # ties are both best
    assert "0.100 " in slow_row
    assert "2.5000 " in good_row                              # all equal: nothing marked
    assert len({len(line) for line in lines[:5]}) == 1        # fixed width

    plain = summarize(make_result("p", requests=[req(1, 0.0, 0.2, 0.5)]))
    single = format_table({"p": plain})
    assert "inf loss" not in single and "*" not in single.splitlines()[2]
