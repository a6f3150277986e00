"""The virtual-clock engine (`lemix run --clock virtual`): the simulator's schedule, the real
model's compute. Deterministic by construction, so these tests may compare policies."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from engine_factories import tiny_hf

from lemix.cli import main
from lemix.config import RUN_DEFAULTS, load_config
from lemix.api import run_engine
from lemix.experiment import simulate
from lemix.metrics import summarize
from lemix.types import OpKind

# summary fields measured on the wall clock (everything else must repeat bit for bit)
WALL_FIELDS = {"wall_s", "sched_decision_us_p50", "sched_decision_us_p99", "compute_wall_s"}


def virtual_cfg(**overrides):
    base = dict(RUN_DEFAULTS)
    base.update({"cluster.clock": "virtual", "workload.duration_s": 3.0, "workload.request_rate": 4.0,
                 "workload.max_prompt_tokens": 48, "workload.train_seq_tokens": 32,
                 "workload.max_output_tokens": 6, "policy.names": "lemix,separate"})
    base.update(overrides)
    return load_config(None, {}, base)


def op_rows(result):
    return [(op.kind, op.node, op.stage, op.start_s, op.end_s) for op in result.ops]


@pytest.mark.parametrize("mode", ["prefill", "generate"])
def test_virtual_schedule_is_the_simulators_op_for_op(mode):
    cfg = virtual_cfg(**{"workload.mode": mode, "workload.ignore_eos": True})
    real, sim = run_engine(cfg), simulate(cfg)
    for r, s in zip(real, sim):
        assert r.policy == s.policy
        assert len(r.ops) > 50 and op_rows(r) == op_rows(s)
        assert [(q.task_id, q.finish_s, q.output_tokens) for q in r.requests] == \
               [(q.task_id, q.finish_s, q.output_tokens) for q in s.requests]
        assert [(t.node, t.step, t.time_s) for t in r.train_steps] == \
               [(t.node, t.step, t.time_s) for t in s.train_steps]
        # ... and every op ran on the real model: losses of every request and training step
        assert all(q.inference_loss is not None and q.inference_loss > 0 for q in r.requests)
        assert all(q.inference_loss is None for q in s.requests)
        assert summarize(r)["train_loss_last"] is not None
        assert r.extras["clock"] == "virtual" and r.extras["compute_wall_s"] > 0
    if mode == "generate":
        assert any(op.kind is OpKind.DECODE for op in real[0].ops)


def test_virtual_separate_syncs_copy_real_weights():
    # separate's serving node (0) serves the initial weights until the first copy; after a copy
    # its weight version is the trainer's, and the served loss follows the trained weights
    cfg = virtual_cfg(**{"policy.names": "separate", "policy.sync_every": 2, "model.lr": 3e-3,
                         "workload.duration_s": 4.0})
    (r,) = run_engine(cfg)
    assert any(op.kind is OpKind.SYNC for op in r.ops)
    fresh = [q.inference_loss for q in r.requests if q.weight_version == 0]
    synced = [q.inference_loss for q in r.requests if q.weight_version >= 4]
    assert fresh and synced and np.mean(synced) < np.mean(fresh) - 0.2


def _burn_cores(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def test_two_cli_runs_give_identical_summaries_under_cpu_load(tmp_path):
    argv = ["run", "--clock", "virtual", "--policy", "lemix,separate", "--seed", "1", "--duration", "3",
            "--max-prompt-tokens", "48", "--train-seq-tokens", "32", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    burners = _burn_cores(2)   # another process keeps both cores busy during the second run
    try:
        assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    finally:
        for p in burners:
            p.kill()
            p.wait()
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("a", "b"))
    assert set(a) == {"lemix", "separate"}
    for policy in a:
        assert a[policy]["inference_loss_mean"] is not None
        assert a[policy]["drift_shifts_s"] == [0.75, 1.5, 2.25]
        assert {k: v for k, v in a[policy].items() if k not in WALL_FIELDS} == \
               {k: v for k, v in b[policy].items() if k not in WALL_FIELDS}
    assert (tmp_path / "a" / "requests.csv").read_text() == (tmp_path / "b" / "requests.csv").read_text()


@pytest.mark.parametrize("stagger,margin", [(False, 0.97), (True, 0.98)])
def test_colocated_inference_loss_beats_separate_under_drift(stagger, margin):
    # co-located nodes serve what they train (merged every 4 steps); separate's serving node gets
    # the trainer's weights every 8 steps, so it lags behind the drifting topic. On the virtual
    # clock the outcome is the same on every machine under any load. Staggered merges serve
    # the requests that arrive during a merge from the node not yet merged (on time, but with
    # older weights than waiting for the merge would give): a smaller margin.
    cfg = virtual_cfg(**{"workload.duration_s": 8.0, "workload.drift_groups": 3, "model.lr": 2e-3,
                         "policy.merge_stagger": stagger})
    results = {r.policy: summarize(r) for r in run_engine(cfg)}
    lemix, separate = results["lemix"], results["separate"]
    assert lemix["inference_loss_mean"] < margin * separate["inference_loss_mean"]
    assert lemix["staleness_steps_mean"] < separate["staleness_steps_mean"]


def eos_checkpoint(path) -> None:
    """A tiny Llama that always says EOS (id 257 of the byte tokenizer): a huge constant feature
    on every embedding survives the final norm, and only EOS's output row reads it."""
    hf = tiny_hf("llama", layers=2)
    with torch.no_grad():
        hf.model.embed_tokens.weight[:, 0] = 100.0
        hf.lm_head.weight[:, 0] = 0.0
        hf.lm_head.weight[257, 0] = 5.0
    hf.save_pretrained(path)


def test_generated_eos_ends_the_sequence_unless_ignored(tmp_path):
    eos_checkpoint(tmp_path)
    cfg = virtual_cfg(**{"model.name": str(tmp_path), "model.byte_tokenizer": True, "workload.mode": "generate",
                         "policy.names": "lemix",
                         "workload.train_share": 0.0})
    (stopped,) = run_engine(cfg)
    (sim,) = simulate(cfg)
    assert stopped.requests and all(q.output_tokens == 1 and not q.failed for q in stopped.requests)
    assert not any(op.kind is OpKind.DECODE for op in stopped.ops)      # EOS at prefill: no decode
    assert any(op.kind is OpKind.DECODE for op in sim.ops)
    cfg.workload.ignore_eos = True
    (ignored,) = run_engine(cfg)
    assert op_rows(ignored) == op_rows(sim)
