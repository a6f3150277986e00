"""Grid parsing and point building: the product of the axes, axes dropped where they do not apply."""
from __future__ import annotations

import pytest
from sweep_factory import TRACE, make_cfg

from lemix.config import ConfigError
from lemix.sweep import AXES, SweepGrid, sweep_points


def test_points_are_the_product_in_axis_order():
    cfg = make_cfg()
    pts = sweep_points(cfg, SweepGrid.parse(request_rates="4,8,12", train_shares="0.2,0.5", nodes="1,2"))
    assert len(pts) == 12
    assert [p.index for p in pts] == list(range(12))
    cols = [p.columns for p in pts]
    # nodes before train_share before rate: the rate varies fastest
    assert [(c["nodes"], c["train_share"], c["request_rate"]) for c in cols[:4]] == [
        (1, 0.2, 4.0), (1, 0.2, 8.0), (1, 0.2, 12.0), (1, 0.5, 4.0)]
    assert pts[-1].cfg.cluster.nodes == 2 and pts[-1].cfg.workload.train_share == 0.5
    assert all(c["stages"] == 2 and c["seed"] == 3 and c["arrival"] == "poisson" for c in cols)
    # the base config is not touched
    assert cfg.workload.request_rate == 2.0 and cfg.cluster.nodes == 2


def test_no_grid_is_the_base_config():
    (p,) = sweep_points(make_cfg(), SweepGrid())
    assert p.columns["request_rate"] == 2.0 and p.columns["train_share"] == 0.5 and p.columns["rate"] is None


def test_axes_that_do_not_apply_are_dropped_per_point():
    cfg = make_cfg(workload__trace=TRACE)
    assert cfg.workload.arrival == "trace"
    grid = SweepGrid.parse(arrivals="poisson,gamma,trace", request_rates="4,8", trace_speedups="1,2",
                           burstiness="1,0.25")
    cols = [p.columns for p in sweep_points(cfg, grid)]
    # poisson x 2 rates; poisson with burstiness 0.25 is gamma (vLLM's rule); gamma x 2 burstiness
    # x 2 rates (0.25: the same points again, dropped); trace x 2 speedups (no rate, no burstiness)
    assert [(c["arrival"], c["burstiness"], c["request_rate"], c["trace_speedup"]) for c in cols] == [
        ("poisson", 1.0, 4.0, None), ("poisson", 1.0, 8.0, None), ("gamma", 0.25, 4.0, None),
        ("gamma", 0.25, 8.0, None), ("gamma", 1.0, 4.0, None), ("gamma", 1.0, 8.0, None),
        ("trace", None, None, 1.0), ("trace", None, None, 2.0)]


def test_poisson_point_from_a_trace_config_really_is_poisson():
    cfg = make_cfg(workload__trace=TRACE)
    (p,) = sweep_points(cfg, SweepGrid.parse(arrivals="poisson"))
    assert p.cfg.workload.arrival == "poisson" and p.cfg.workload.trace is None


def test_repeated_values_count_once():
    assert SweepGrid.parse(request_rates="8,8,16").request_rates == (8.0, 16.0)


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
    ("request_rates", "8,0", "--request-rates 0.0: workload.request_rate"),
    ("rates", "8,0", "--rates 0.0: workload.rate"),
    ("train_rates", "-1", "--train-rates -1.0: workload.train_rate"),
    ("train_shares", "0.5,1.5", "--train-shares 1.5: workload.train_share"),
    ("nodes", "0", "--nodes-grid 0: cluster.nodes"),
    ("stages", "100", "--stages-grid 100: cluster.stages"),
    ("modes", "prefill,decode", "--modes decode: workload.mode"),
    ("arrivals", "uniform", "--arrivals uniform: workload.arrival"),
    ("arrivals", "trace", "--arrivals trace: workload: workload.arrival is 'trace' but workload.trace"),
    ("burstiness", "-1", "--burstiness-grid -1.0: workload.burstiness"),
    ("trace_speedups", "2", "--trace-speedups: applies to trace arrivals only"),
])
def test_invalid_values_name_the_flag(axis, text, needle):
    with pytest.raises(ConfigError) as e:
        sweep_points(make_cfg(), SweepGrid.parse(**{axis: text}))
    assert str(e.value).startswith(needle)
    assert "\n" not in str(e.value)


def test_rates_with_only_trace_points_is_an_error():
    for axis, flag in (("request_rates", "--request-rates"), ("rates", "--rates"), ("burstiness", "--burstiness-grid")):
        with pytest.raises(ConfigError, match=f"^{flag}: applies to poisson or gamma arrivals only"):
            sweep_points(make_cfg(workload__trace=TRACE), SweepGrid.parse(**{axis: "4,8"}))


def test_a_burstiness_axis_makes_poisson_points_gamma():
    pts = sweep_points(make_cfg(), SweepGrid.parse(burstiness="0.5,1"))
    assert [(p.cfg.workload.arrival, p.columns["burstiness"]) for p in pts] == [("gamma", 0.5), ("poisson", 1.0)]


def test_an_axis_overrides_its_alternative_in_the_base():
    # train shares over a base with a train rate, request rates over the deprecated total rate
    (p,) = sweep_points(make_cfg(workload__train_rate=1.0), SweepGrid.parse(train_shares="0.2"))
    assert (p.cfg.workload.train_share, p.cfg.workload.train_rate) == (0.2, None)
    with pytest.warns(FutureWarning):
        base = make_cfg(workload__rate=4.0, workload__request_rate=None)
    (p,) = sweep_points(base, SweepGrid.parse(request_rates="3"))
    assert (p.cfg.workload.request_rate, p.cfg.workload.rate) == (3.0, None)


def test_unknown_axis():
    with pytest.raises(ConfigError, match="unknown sweep axis 'rate'"):
        SweepGrid.parse(rate="8")


def test_cli_grid_flags_are_the_axes():
    from lemix.cli.flags import SWEEP
    from lemix.config_commands import SweepConfig

    flag_of = {f.field.removeprefix("sweep."): f.flag for f in SWEEP}
    assert all(flag_of.get(a.name) == a.flag for a in AXES)     # sweep.<axis> is the axis's flag
    full = SweepConfig(**{a.name: {"arrivals": ["gamma"], "modes": ["generate"]}.get(a.name, ["1"]) for a in AXES})
    assert list(full.grid_axes()) == [a.name for a in AXES]
