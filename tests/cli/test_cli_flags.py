"""The `lemix` flags come from the one config schema: every flag of every command has help, a
default and a YAML field it round-trips through; bad values are one line before anything runs;
deprecated spellings still mean what they meant and say what to use."""
from __future__ import annotations

import re
import typing
import warnings

import pytest
import yaml

from lemix.cli import COMMANDS, build_parser, config_of, main
from lemix.cli.flags import COMMAND_FLAGS, _bare, field_info, get_dotted, is_switch
from lemix.config import LemixDeprecationWarning, load_config
from lemix.experiment import build_tasks
from lemix.sched.policies import policy_names
from lemix.sched.presets import PRESETS

TEXT = {"model.name": "some/checkpoint", "cluster.device": "cuda", "policy.names": "luf",
        "model.lora_targets": "q_proj,v_proj", "model.sim_preset": next(iter(PRESETS)),
        "cluster.ray_address": "auto", "serve.host": "0.0.0.0", "sweep.arrivals": "poisson,gamma",
        "sweep.modes": "prefill,generate", "sweep.capacity_range": "1,2", "policy.host_slowdown": "2.0"}


def sample(dotted: str, default) -> str:
    """A valid value for the flag of `dotted` that differs from its default, as typed."""
    if dotted in TEXT:
        return TEXT[dotted]
    ann = _bare(field_info(dotted).annotation)
    if typing.get_origin(ann) is typing.Literal:
        return next(str(c) for c in typing.get_args(ann) if c != default)
    if typing.get_origin(ann) is list:
        return "1,2"
    if ann is int:
        return str((default or 0) + 1)
    if ann is float:
        return str(default / 2 if default else 0.25)
    return f"x-{dotted.split('.')[-1]}"


def cases():
    for c in COMMANDS:
        for f in COMMAND_FLAGS[c.name]:
            yield pytest.param(c.name, f, id=f"{c.name} {f.flag}")


def parse(argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LemixDeprecationWarning)
        return config_of(build_parser().parse_args(argv))


@pytest.mark.parametrize("command,flag", list(cases()))
def test_every_flag_round_trips_through_its_yaml_field(command, flag, tmp_path):
    default = parse([command])
    before = get_dotted(default, flag.field)
    argv = [command, flag.flag] if is_switch(flag.field) else [command, flag.flag, sample(flag.field, before)]
    cfg = parse(argv)
    value = get_dotted(cfg, flag.field)
    assert value != before, f"{flag.flag} did not change {flag.field}"
    tree: dict = {}
    node = tree
    *sections, name = flag.field.split(".")
    for part in sections:
        node = node.setdefault(part, {})
    node[name] = _json(cfg, flag.field)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert parse([command, "--config", str(path)]).model_dump() == cfg.model_dump()


def _json(cfg, dotted):
    node = cfg.model_dump(mode="json")
    for part in dotted.split("."):
        node = node[part]
    return node


def test_every_flag_shows_help_its_field_and_default():
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    for c in COMMANDS:
        for action in subs[c.name]._actions:
            if action.dest in ("help", "config"):
                continue
            text = action.help or ""
            m = re.fullmatch(r"(.+) \[(\S+)\] \(default: (.+)\)", text, re.S)
            assert m and len(m.group(1)) > 10, f"{c.name} {action.option_strings}: {text!r}"
            assert m.group(2) == action.dest


def test_every_commands_help_prints(capsys):
    for c in COMMANDS:      # argparse %-formats help: a stray % in a description crashed `--help`
        with pytest.raises(SystemExit) as e:
            main([c.name, "--help"])
        assert e.value.code == 0
        assert f"usage: lemix {c.name}" in capsys.readouterr().out
    sweep_help = build_parser()._subparsers._group_actions[0].choices["sweep"].format_help()
    assert "1% of HI" in sweep_help


def test_defaults_in_help_are_the_commands_own():
    subs = next(a for a in build_parser()._actions if a.dest == "command").choices
    helps = {c: {a.option_strings[0]: a.help for a in subs[c]._actions if a.option_strings}
             for c in ("simulate", "run", "serve")}
    assert helps["simulate"]["--request-rate"].endswith("(default: 8)")
    assert helps["run"]["--request-rate"].endswith("(default: 4)")
    assert helps["serve"]["--nodes"].endswith("(default: 1)") and helps["serve"]["--port"].endswith("(default: 8000)")
    # a --no-X flag says it turns the feature off, and the feature's default (progress bars: on)
    assert helps["simulate"]["--no-progress"].startswith("turn off: show progress bars")
    assert helps["simulate"]["--no-progress"].endswith("(default: on)")


def test_policy_help_lists_the_registered_names():
    subs = next(a for a in build_parser()._actions if a.dest == "command").choices
    text = next(a.help for a in subs["simulate"]._actions if a.dest == "policy.names")
    for name in policy_names():
        assert name in text


@pytest.mark.parametrize("argv,needles", [
    (["serve", "--port", "70000"], ["--port (serve.port)", "65535", "70000"]),
    (["serve", "--port", "abc"], ["--port (serve.port)", "valid integer", "abc"]),
    (["serve", "--log-level", "verbose"], ["--log-level (serve.log_level)", "'debug', 'info'", "verbose"]),
    (["run", "--device", "tpu"], ["--device (cluster.device)", "allowed: cpu, cuda, cuda:N", "tpu"]),
    (["run", "--device", "cpu,cpu,cpu"], ["cluster.device lists 3 devices for 2 stages"]),
    (["simulate", "--burstiness", "0.5", "--trace", "t.csv"], ["burstiness", "trace"]),
    (["simulate", "--request-rate", "8", "--rate", "16"], ["request_rate", "rate, not both"]),
    (["simulate", "--nodes"], ["--nodes", "expected one argument"]),
])
def test_bad_values_are_one_line_before_anything_runs(argv, needles, tmp_path, capsys):
    config = str(_empty(tmp_path))
    rc = main([*argv, "--no-progress", "--config", config]) if argv[-1] != "--nodes" else _exit_code(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("lemix: "), err
    for n in needles:
        assert n in err, err
    assert list(tmp_path.iterdir()) == [tmp_path / "c.yaml"]     # nothing ran, nothing written


def _empty(tmp_path):
    (tmp_path / "c.yaml").write_text("out: " + str(tmp_path / "run") + "\n")
    return tmp_path / "c.yaml"


def _exit_code(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_cuda_on_a_machine_without_it_names_the_field(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["run", "--device", "cuda", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cluster.device" in err and "allowed here: cpu" in err, err


def test_serve_section_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("serve:\n  port: 9000\n  log_level: WARNING\nexport:\n  adapter: true\n")
    cfg = load_config(p)
    assert (cfg.serve.port, cfg.serve.log_level, cfg.export.adapter) == (9000, "warning", True)


def test_deprecated_rate_means_the_total_and_says_what_to_use(capsys, tmp_path):
    with pytest.warns(LemixDeprecationWarning, match=r"use workload.request_rate .* = 16 x \(1 - 0.5\) = 8"):
        old = load_config(None, {"workload.rate": 16.0, "workload.duration_s": 20})
    new = load_config(None, {"workload.request_rate": 8.0, "workload.duration_s": 20})
    assert build_tasks(old) == build_tasks(new)         # one Poisson process, split by the share
    assert old.workload.requests_per_s == 8.0 and load_config().workload.request_rate == 8.0
    # on the command line the warning is one `lemix: warning:` line, and the run goes on
    assert main(["simulate", "--rate", "8", "--duration", "2", "--nodes", "1", "--policy", "naivemix",
                 "--no-progress", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("lemix: warning: workload.rate (--rate) is deprecated") and err.count("\n") == 1
    summary = yaml.safe_load((tmp_path / "run" / "summary.json").read_text())
    s = summary[0] if isinstance(summary, list) else next(iter(summary.values()))
    assert s["completed"] + s["failed"] == s["requests_total"]          # requests only, as vLLM
    assert s["train_completed"] + s["train_failed"] == s["train_tasks_total"] > 0


@pytest.fixture
def trace(tmp_path):
    """A two-request Azure-format trace."""
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n")
    return path


def test_deprecated_rate_with_a_trace_warns_instead_of_crashing(trace):
    with pytest.warns(LemixDeprecationWarning, match=r"a trace sets its own request arrivals"):
        cfg = load_config(None, {"workload.trace": str(trace), "workload.rate": 8.0})
    assert cfg.workload.requests_per_s is None


def test_request_rate_with_a_trace_warns_that_it_has_no_effect(trace):
    with pytest.warns(LemixDeprecationWarning, match=r"no effect with a trace.*--trace-speedup"):
        cfg = load_config(None, {"workload.trace": str(trace), "workload.request_rate": 8.0})
    assert cfg.workload.requests_per_s is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, {"workload.trace": str(trace)})     # a trace alone warns of nothing


def test_deprecated_cv2_is_the_old_gamma():
    with pytest.warns(LemixDeprecationWarning, match=r"use workload.burstiness .* = 1 / CV\^2 = 0.25"):
        old = load_config(None, {"workload.arrival": "gamma", "workload.burstiness_cv2": 4.0, "workload.rate": 16.0})
    with pytest.warns(LemixDeprecationWarning):
        new = load_config(None, {"workload.burstiness": 0.25, "workload.rate": 16.0})
    assert new.workload.arrival == "gamma" and build_tasks(old) == build_tasks(new)


def test_burstiness_is_vllms_gamma_shape():
    cfg = load_config(None, {"workload.burstiness": 0.25, "workload.request_rate": 20.0,
                             "workload.train_rate": 0.0, "workload.duration_s": 500.0})
    assert cfg.workload.arrival == "gamma" and cfg.workload.cv2 == 4.0     # implied, not ignored
    tasks = build_tasks(cfg)
    assert all(not t.is_train for t in tasks)
    import numpy as np

    gaps = np.diff([t.arrival_s for t in tasks])
    assert len(tasks) == pytest.approx(20 * 500, rel=0.1)                  # requests/s, as asked
    assert np.var(gaps) / np.mean(gaps) ** 2 == pytest.approx(4.0, rel=0.25)   # CV^2 = 1/burstiness
    # training comes on top of the requests, as its own Poisson process
    both = build_tasks(load_config(None, {"workload.burstiness": 0.25, "workload.request_rate": 20.0,
                                          "workload.train_share": 0.5, "workload.duration_s": 500.0}))
    assert sum(not t.is_train for t in both) == len(tasks)
    assert sum(t.is_train for t in both) == pytest.approx(20 * 500, rel=0.1)


def test_a_flag_overrides_its_alternative_in_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("workload:\n  request_rate: 3\n  burstiness: 0.5\n")
    cfg = parse(["simulate", "--config", str(p), "--rate", "12", "--burstiness-cv2", "2"])
    assert (cfg.workload.request_rate, cfg.workload.rate) == (None, 12.0)
    assert (cfg.workload.burstiness, cfg.workload.burstiness_cv2) == (1.0, 2.0)
    cfg = parse(["run", "--rate", "12"])          # over run's own default request rate
    assert (cfg.workload.request_rate, cfg.workload.rate) == (None, 12.0)


def test_progress_counts_tasks_done_not_arrived():
    from lemix.experiment import sim_profile
    from lemix.sim import simulate_policy

    cfg = load_config(None, {"workload.request_rate": 30.0, "workload.duration_s": 10.0, "cluster.nodes": 1,
                             "policy.names": "naivemix"})   # overloaded: the run goes on past the arrivals
    tasks = build_tasks(cfg)
    for horizon, done_all in ((cfg.workload.duration_s, False), (float("inf"), True)):
        ticks: list[int] = []
        result, _ = simulate_policy(cfg.sched_params("naivemix"), sim_profile(cfg), tasks, horizon_s=horizon,
                                    progress=ticks.append)
        finished = sum(1 for r in [*result.requests, *result.train_tasks] if r.finish_s is not None)
        assert all(n > 0 for n in ticks)
        if done_all:
            assert sum(ticks) == finished == len(tasks)
        else:       # every task arrived by the horizon, but not every one was done: the bar says so
            assert sum(ticks) == finished < len(tasks)


def test_the_api_key_is_never_written_to_a_run_directory():
    cfg = load_config(None, {"serve.api_key": "s3cret"})
    assert cfg.serve.api_key == "s3cret" and "s3cret" not in cfg.to_yaml()
