"""load_config: errors name the field and what is allowed; overrides map onto SchedParams."""
from __future__ import annotations

import re

import pytest

from lemix.config import ConfigError, load_config
from lemix.sched.params import SchedParams


def error_of(path=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


def test_unknown_policy_lists_the_allowed_names():
    msg = error_of(overrides={"policy.names": "fifo"})
    assert msg.startswith("invalid config: policy.names: unknown policy 'fifo'; allowed: ")
    for name in ("naivemix", "random", "luf", "lemix", "lemix-paper", "lemix/no-profile",
                 "separate", "separate-dynamic", "all", "ablations"):
        assert name in msg
    assert error_of(overrides={"policy.names": "lemix,fifo"}).count("unknown policy 'fifo'") == 1


@pytest.mark.parametrize("field, value, allowed", [
    ("workload.arrival", "uniform", "'poisson', 'gamma' or 'trace'"),
    ("workload.mode", "decode", "'prefill' or 'generate'"),
    ("policy.pipeline", "zb", "'apipe', 'gpipe' or '1f1b'"),
    ("cluster.backend", "mpi", "'local' or 'ray'"),
])
def test_bad_literal_names_field_and_choices(field, value, allowed):
    assert error_of(overrides={field: value}) == \
        f"invalid config: {field}: Input should be {allowed} (got {value!r})"


@pytest.mark.parametrize("field, value, rule", [
    ("workload.request_rate", -1, "greater than 0"),
    ("workload.request_rate", 0, "greater than 0"),
    ("workload.rate", 0, "greater than 0"),
    ("workload.burstiness", 0, "greater than 0"),
    ("serve.port", 70000, "less than or equal to 65535"),
    ("cluster.nodes", 0, "greater than or equal to 1"),
    ("policy.kappa", 1.5, "less than or equal to 1"),
    ("workload.train_share", 1.0, "less than 1"),
    ("policy.lambda1", -0.1, "greater than or equal to 0"),
])
def test_out_of_range_numbers(field, value, rule):
    assert error_of(overrides={field: value}) == \
        f"invalid config: {field}: Input should be {rule} (got {value!r})"


def test_unknown_yaml_keys_are_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("workload:\n  rate: 5\n  colour: red\n")
    assert error_of(p) == "invalid config: workload.colour: unknown field"
    p.write_text("wokload:\n  rate: 5\n")
    assert error_of(p) == "invalid config: wokload: unknown field"


def test_train_share_and_train_rate_together():
    msg = error_of(overrides={"workload.train_share": 0.3, "workload.train_rate": 2.0})
    assert msg == "invalid config: workload: set workload.train_share or workload.train_rate, not both"


def test_several_errors_are_reported_together():
    msg = error_of(overrides={"workload.request_rate": -1, "cluster.stages": 0})
    assert "cluster.stages:" in msg and "workload.request_rate:" in msg and msg.count(";") == 1


def test_file_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert error_of(missing) == f"config file {str(missing)!r} does not exist"
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    assert error_of(p) == f"config file {str(p)!r} must hold a mapping of sections"
    p.write_text("a: [\n")
    assert re.match(rf"config file {re.escape(repr(str(p)))} is not valid YAML: ", error_of(p))


def test_trace_arrival_needs_a_trace():
    assert error_of(overrides={"workload.arrival": "trace"}) == (
        "invalid config: workload: workload.arrival is 'trace' but workload.trace (a CSV path) is not set")


def test_validation_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    load_config(None, {"out": str(tmp_path / "run")})
    assert list(tmp_path.iterdir()) == []


def test_yaml_plus_overrides_to_sched_params(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("cluster:\n  nodes: 3\npolicy:\n  names: [lemix, luf]\n  lambda1: 0.3\n"
                 "workload:\n  mode: generate\n")
    cfg = load_config(p, {"policy.lambda1": 0.7, "workload.train_rate": 1.0, "seed": 4,
                          "cluster.stages": None})   # None: not overridden
    assert cfg.policy.names == ["lemix", "luf"]
    sp = cfg.sched_params("luf")
    assert sp == SchedParams(policy="luf", nodes=3, stages=2, lambda1=0.7, generate=True, train_share=None,
                             seed=4)
    # defaults: the training share in force is 0.5
    assert load_config().sched_params("lemix").train_share == 0.5


def test_policy_groups_expand():
    assert "lemix/no-profile" not in load_config(None, {"policy.names": "all"}).policy.names
    assert load_config(None, {"policy.names": "ablations"}).policy.names == [
        "lemix", "lemix/no-profile", "lemix/no-prioritization", "lemix/no-memory-check", "lemix/no-chunking"]
