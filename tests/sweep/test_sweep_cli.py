"""`lemix sweep` end to end: files, tables, and one-line errors that name the flag."""
from __future__ import annotations

import re

import pandas as pd
import pytest
import yaml

from lemix.cli import main
from lemix.config import load_config

TINY = ["--nodes", "2", "--stages", "2", "--duration", "4", "--seed", "3", "--no-progress"]


def test_sweep_writes_csv_config_plots_and_capacity(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["sweep", *TINY, "--policy", "lemix,separate", "--request-rates", "2,4,6", "--train-shares",
               "0.2,0.5", "--target", "0.5", "--capacity-range", "1,8", "--capacity-tol", "0.5",
               "--out", str(out)])
    assert rc == 0
    df = pd.read_csv(out / "sweep.csv")
    assert len(df) == 3 * 2 * 2
    assert set(df["policy"]) == {"lemix", "separate"}
    assert sorted(set(df["request_rate"])) == [2.0, 4.0, 6.0] and df["rate"].isna().all()
    assert df.groupby("point").size().eq(2).all()
    assert df["slo_attainment"].between(0, 1).all() and df["trace_speedup"].isna().all()
    cfg = load_config(out / "config.yaml")                # loadable as --config
    assert cfg.cluster.nodes == 2 and cfg.workload.duration_s == 4.0
    assert cfg.sweep.request_rates == [2.0, 4.0, 6.0] and cfg.sweep.target == 0.5   # the sweep's own flags too
    grid = yaml.safe_load((out / "grid.yaml").read_text())
    assert grid == {"grid": {"train_shares": [0.2, 0.5], "request_rates": [2.0, 4.0, 6.0]}, "target": 0.5}
    for png in ("slo_vs_load.png", "train_vs_load.png", "frontier.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    cap = pd.read_csv(out / "capacity.csv")
    assert len(cap) == 2 * 2 and list(cap["policy"]) == ["lemix", "separate"] * 2
    assert ((cap["lo"] == 1) & (cap["hi"] == 8)).all()
    text = capsys.readouterr().out
    assert "6 points x 2 policies = 12 runs" in text
    assert "lemix: SLO tasks/s train/s" in text and "capacity at SLO attainment >= 0.5" in text
    assert (out / "sweep.txt").read_text().count("\n") > 8


@pytest.mark.parametrize("argv,flag", [
    (["--request-rates", "8,x"], "--request-rates"),
    (["--request-rates", "8,-1"], "--request-rates"),
    (["--rates", "8,x"], "--rates"),
    (["--train-rates", "-2"], "--train-rates"),
    (["--train-shares", "0.5,1"], "--train-shares"),
    (["--nodes-grid", "2,0"], "--nodes-grid"),
    (["--stages-grid", "1.5"], "--stages-grid"),
    (["--modes", "prefill,chat"], "--modes"),
    (["--arrivals", "poisson,bursty"], "--arrivals"),
    (["--trace-speedups", "1,2"], "--trace-speedups"),
    (["--burstiness-grid", "0"], "--burstiness-grid"),
    (["--seeds", "1,two"], "--seeds"),
    (["--target", "1.5"], "--target"),
    (["--target", "0.9", "--capacity-range", "8"], "--capacity-range"),
    (["--target", "0.9", "--capacity-range", "8,4"], "--capacity-range"),
    (["--jobs", "0"], "--jobs"),
])
def test_bad_values_give_one_line_naming_the_flag(argv, flag, tmp_path, capsys):
    rc = main(["sweep", *TINY, "--out", str(tmp_path / "x"), *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert re.match(rf"lemix: (invalid config: )?{flag}\b", err) and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()                   # nothing ran, nothing written
