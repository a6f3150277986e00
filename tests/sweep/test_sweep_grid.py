"""Grid parsing and point building: the product of the axes, axes dropped where they do not apply."""
from __future__ import annotations

import pytest
from sweep_factory import TRACE, make_cfg

from lemix.config import ConfigError
from lemix.sweep import AXES, SweepGrid, sweep_points


def test_points_are_the_product_in_axis_order():
    cfg = make_cfg()
    pts = sweep_points(cfg, SweepGrid.parse(rates="4,8,12", train_shares="0.2,0.5", nodes="1,2"))
    assert len(pts) == 12
    assert [p.index for p in pts] == list(range(12))
    cols = [p.columns for p in pts]
    # nodes before train_share before rate: the rate varies fastest
    assert [(c["nodes"], c["train_share"], c["rate"]) for c in cols[:4]] == [
        (1, 0.2, 4.0), (1, 0.2, 8.0), (1, 0.2, 12.0), (1, 0.5, 4.0)]
    assert pts[-1].cfg.cluster.nodes == 2 and pts[-1].cfg.workload.train_share == 0.5
    assert all(c["stages"] == 2 and c["seed"] == 3 and c["arrival"] == "poisson" for c in cols)
    # the base config is not touched
    assert cfg.workload.rate == 4.0 and cfg.cluster.nodes == 2


def test_no_grid_is_the_base_config():
    (p,) = sweep_points(make_cfg(), SweepGrid())
    assert p.columns["rate"] == 4.0 and p.columns["train_share"] == 0.5


def test_axes_that_do_not_apply_are_dropped_per_point():
    cfg = make_cfg(workload__trace=TRACE)
    assert cfg.workload.arrival == "trace"
    grid = SweepGrid.parse(arrivals="poisson,gamma,trace", rates="4,8", trace_speedups="1,2",
                           burstiness="4")
    cols = [p.columns for p in sweep_points(cfg, grid)]
    # poisson x 2 rates, gamma x 2 rates (one burstiness), trace x 2 speedups: duplicates removed
    assert [(c["arrival"], c["rate"], c["trace_speedup"], c["burstiness"]) for c in cols] == [
        ("poisson", 4.0, None, None), ("poisson", 8.0, None, None),
        ("gamma", 4.0, None, 4.0), ("gamma", 8.0, None, 4.0),
        ("trace", None, 1.0, None), ("trace", None, 2.0, None)]


def test_poisson_point_from_a_trace_config_really_is_poisson():
    cfg = make_cfg(workload__trace=TRACE)
    (p,) = sweep_points(cfg, SweepGrid.parse(arrivals="poisson"))
    assert p.cfg.workload.arrival == "poisson" and p.cfg.workload.trace is None


def test_repeated_values_count_once():
    assert SweepGrid.parse(rates="8,8,16").rates == (8.0, 16.0)


@pytest.mark.parametrize("axis,text,needle", [
    ("rates", "8,x", "--rates: 'x' is not a number"),
    ("rates", "8,,16", "--rates: empty value"),
    ("rates", "", "--rates: give a comma list"),
    ("rates", "nan", "--rates: 'nan' is not a finite number"),
    ("nodes", "2.5", "--nodes-grid: '2.5' is not an integer"),
    ("seeds", "a", "--seeds: 'a' is not an integer"),
])
def test_unparsable_values_name_the_flag(axis, text, needle):
    with pytest.raises(ConfigError, match="^" + needle.replace("(", r"\(")):
        SweepGrid.parse(**{axis: text})


@pytest.mark.parametrize("axis,text,needle", [
    ("rates", "8,0", "--rates 0.0: workload.rate"),
    ("train_shares", "0.5,1.5", "--train-shares 1.5: workload.train_share"),
    ("nodes", "0", "--nodes-grid 0: cluster.nodes"),
    ("stages", "100", "--stages-grid 100: cluster.stages"),
    ("modes", "prefill,decode", "--modes decode: workload.mode"),
    ("arrivals", "uniform", "--arrivals uniform: workload.arrival"),
    ("arrivals", "trace", "--arrivals trace: workload: workload.arrival is 'trace' but workload.trace"),
    ("burstiness", "-1", "--burstiness-grid -1.0: workload.burstiness"),
    ("trace_speedups", "2", "--trace-speedups: applies to trace arrivals only"),
    ("burstiness", "4", "--burstiness-grid: applies to gamma arrivals only"),
])
def test_invalid_values_name_the_flag(axis, text, needle):
    with pytest.raises(ConfigError) as e:
        sweep_points(make_cfg(), SweepGrid.parse(**{axis: text}))
    assert str(e.value).startswith(needle)
    assert "\n" not in str(e.value)


def test_rates_with_only_trace_points_is_an_error():
    with pytest.raises(ConfigError, match="^--rates: applies to poisson or gamma arrivals only"):
        sweep_points(make_cfg(workload__trace=TRACE), SweepGrid.parse(rates="4,8"))


def test_train_shares_against_a_train_rate_names_the_flag():
    with pytest.raises(ConfigError, match="^--train-shares 0.2: .*train_share or workload.train_rate"):
        sweep_points(make_cfg(workload__train_rate=1.0), SweepGrid.parse(train_shares="0.2"))


def test_unknown_axis():
    with pytest.raises(ConfigError, match="unknown sweep axis 'rate'"):
        SweepGrid.parse(rate="8")


def test_cli_grid_flags_are_the_axes():
    from lemix.cli import _GRID

    assert {(flag, name) for flag, name, _ in _GRID} == {(a.flag, a.name) for a in AXES}
