"""sweep.csv, tables and plots from hand-built rows."""
from __future__ import annotations

import pandas as pd

from lemix.metrics.sweep_report import (format_capacity_table, format_sweep_table, frontier_best,
                                        plot_frontier, plot_vs_load, write_rows_csv)


def row(point, policy, rate, share, slo, tput, train, seed=1):
    return {"point": point, "arrival": "poisson", "mode": "prefill", "nodes": 4, "stages": 2,
            "train_share": share, "burstiness": None, "rate": rate, "trace_speedup": None,
            "seed": seed, "policy": policy, "load_per_s": rate, "slo_attainment": slo,
            "total_task_throughput": tput, "train_samples_per_s": train}


ROWS = [row(0, "a", 8.0, 0.5, 0.99, 8.0, 10.0), row(0, "b", 8.0, 0.5, 0.95, 8.0, 9.0),
        row(1, "a", 16.0, 0.5, 0.80, 15.0, 30.0), row(1, "b", 16.0, 0.5, 0.97, 12.0, 20.0),
        row(2, "a", 8.0, 0.8, 0.92, 7.5, 25.0), row(2, "b", 8.0, 0.8, None, 7.0, 21.0)]


def test_csv_round_trips_through_pandas(tmp_path):
    df = pd.read_csv(write_rows_csv(tmp_path / "s.csv", ROWS + [dict(ROWS[0], extra=1.5)]))
    assert list(df.columns[:3]) == ["point", "arrival", "mode"] and df.columns[-1] == "extra"
    assert len(df) == 7 and df["burstiness"].isna().all() and df["slo_attainment"].isna().sum() == 1
    assert df["extra"].isna().sum() == 6


def test_sweep_table_shows_varying_axes_and_policy_cells():
    text = format_sweep_table(ROWS)
    head, rule, *body = text.splitlines()
    assert head.split()[:2] == ["share", "rate"] and "a: SLO tasks/s train/s" in head
    assert "nodes" not in head and len(body) == 3
    assert body[1].split() == ["0.5", "16", "80.0%", "15.0", "30.0", "97.0%", "12.0", "20.0"]
    assert body[2].split()[-3:] == ["-", "7.0", "21.0"]


def test_frontier_best_is_the_most_training_at_target():
    assert frontier_best(ROWS, 0.9) == {"a": 25.0, "b": 20.0}
    assert frontier_best(ROWS, 0.999) == {"a": None, "b": None}


def test_capacity_table():
    rows = [{"train_share": 0.5, "policy": "a", "target": 0.9, "load_axis": "rate", "capacity": 21.75,
             "capacity_load_per_s": 21.75, "capacity_request_rate": 10.9, "slo_at_capacity": 0.927,
             "train_samples_per_s_at_capacity": 43.5, "bound": "found", "lo": 2, "hi": 48, "evaluations": 9},
            {"train_share": 0.5, "policy": "b", "target": 0.9, "load_axis": "rate", "capacity": 48.0,
             "capacity_load_per_s": 48.0, "capacity_request_rate": 22.8, "slo_at_capacity": 0.95,
             "train_samples_per_s_at_capacity": 38.4, "bound": "at-least-hi", "lo": 2, "hi": 48, "evaluations": 1},
            {"train_share": 0.5, "policy": "c", "target": 0.9, "load_axis": "rate", "capacity": None,
             "capacity_load_per_s": None, "capacity_request_rate": None, "slo_at_capacity": None,
             "train_samples_per_s_at_capacity": None, "bound": "below-lo", "lo": 2, "hi": 48, "evaluations": 2}]
    lines = format_capacity_table(rows).splitlines()
    assert lines[0] == "capacity at SLO attainment >= 0.9"
    assert "21.8 (rate)" in lines[3] and "92.7%" in lines[3]
    assert ">=48 (rate)" in lines[4] and "< 2 (rate)" in lines[5]


def test_plots(tmp_path):
    assert plot_vs_load(ROWS, "slo_attainment", "SLO %", tmp_path / "a.png", scale=100,
                        target=0.9).read_bytes().startswith(b"\x89PNG")
    assert plot_frontier(ROWS, tmp_path / "f.png", target=0.9).read_bytes().startswith(b"\x89PNG")
    assert plot_vs_load([], "slo_attainment", "", tmp_path / "none.png") is None
    assert plot_frontier([dict(r, slo_attainment=None) for r in ROWS], tmp_path / "n.png", target=0.9) is None
    assert not (tmp_path / "none.png").exists() and not (tmp_path / "n.png").exists()


def test_sweep_imports_no_torch_pandas_or_pyplot_and_metrics_stays_below_it():
    import subprocess
    import sys

    code = ("import sys, lemix.metrics.sweep_report; assert 'lemix.sweep' not in sys.modules; "
            "import lemix.sweep; "
            "bad = [m for m in ('torch', 'pandas', 'matplotlib.pyplot') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
