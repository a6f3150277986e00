"""End-to-end runs of the real engine: scheduler ops executed on real stage workers."""
from __future__ import annotations

import json

from lemix.config import RUN_DEFAULTS, load_config
from lemix.api import run_engine
from lemix.metrics import summarize, write_run_dir
from lemix.sched.latency import OpCoeffs, Profile, StageProfile
from lemix.types import OpKind


def cpu_profile(stages: int, capacity_bytes: int = 10**9) -> Profile:
    """Round coefficients of the order the tiny model shows on a CPU, and its memory figures."""
    st = StageProfile(fwd=OpCoeffs(2e-3, 1e-5, 0.0), bwd=OpCoeffs(4e-3, 2e-5, 0.0),
                      decode=OpCoeffs(2e-3, 2e-4, 1e-7), optim=OpCoeffs(5e-3),
                      weight_bytes=1_300_000, train_state_bytes=3_900_000, act_bytes_per_token=22_000,
                      tmp_bytes_per_token=12_000, kv_bytes_per_token=1024)
    return Profile("builtin-tiny", "cpu", "float32", (st,) * stages, capacity_bytes=capacity_bytes,
                   host_bandwidth_Bps=2e9, network_bandwidth_Bps=2e9)


def make_cfg(**overrides):
    base = dict(RUN_DEFAULTS)
    base.update({"workload.duration_s": 3.0, "workload.request_rate": 3.0, "workload.max_prompt_tokens": 96,
                 "workload.train_seq_tokens": 64, "workload.max_output_tokens": 8})
    return load_config(None, overrides, base)


def test_every_policy_completes_every_task(tmp_path):
    cfg = make_cfg(**{"policy.names": "all"})
    ticks: dict[str, list[int]] = {}
    results = run_engine(cfg, profile=cpu_profile(cfg.cluster.stages),
                         progress=lambda name, total: ticks.setdefault(name, [total]).append)
    assert [r.policy for r in results] == cfg.policy.names
    n_tasks = len(results[0].requests) + len(results[0].train_tasks)
    for r in results:
        # the progress bar's ticks count tasks as they finish: all of them, by the end of the run
        assert ticks[r.policy][0] == n_tasks and sum(ticks[r.policy][1:]) == n_tasks
        s = summarize(r)
        assert s["failed"] == 0, (r.policy, [e for e in r.events if e.kind.value == "task_failed"][:3])
        assert s["train_failed"] == 0 and s["completed"] + s["train_completed"] == n_tasks
        assert all(q.inference_loss is not None and q.inference_loss > 0 for q in r.requests)
        assert s["train_steps"] > 0 and s["train_loss_last"] is not None
        # every op ran on one device at a time
        by_dev: dict = {}
        for op in r.ops:
            by_dev.setdefault((op.node, op.stage), []).append((op.start_s, op.end_s))
        for spans in by_dev.values():
            spans.sort()
            assert all(a[1] <= b[0] + 1e-9 for a, b in zip(spans, spans[1:]))
    written = write_run_dir(tmp_path, results, cfg.to_yaml(), "test")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == set(cfg.policy.names)
    assert any(p.name == "inference_loss.png" for p in written)


def test_generate_mode_decodes_and_stops():
    cfg = make_cfg(**{"workload.mode": "generate", "policy.names": "lemix,separate"})
    for r in run_engine(cfg, profile=cpu_profile(cfg.cluster.stages)):
        assert summarize(r)["failed"] == summarize(r)["train_failed"] == 0
        assert any(op.kind is OpKind.DECODE for op in r.ops)
        done = [q for q in r.requests if q.output_tokens > 1]
        assert done and all(q.first_token_s <= q.finish_s for q in done)


def test_tight_device_memory_offloads_and_completes():
    # weights + optimizer state take 5.2 MB of each stage; 0.95 x 16 MB leaves 10 MB: one stashed
    # micro-batch (64 tokens x 4 samples x 22 KB = 5.6 MB, plus 3 MB working memory) fits, a
    # second does not, so the gate must wait or offload. Which of the two it picks depends on op
    # timing, so this runs on the virtual clock (real workers and real offloads, modeled times):
    # on the wall clock a loaded machine decided it.
    cfg = make_cfg(**{"policy.names": "lemix", "workload.train_share": 0.8, "workload.request_rate": 2.0,
                      "policy.pipeline": "gpipe", "policy.microbatches": 4, "policy.t_max_s": 0.0,
                      "cluster.device_memory_gb": 0.016, "cluster.clock": "virtual"})
    (r,) = run_engine(cfg, profile=cpu_profile(cfg.cluster.stages, capacity_bytes=16_000_000))
    s = summarize(r)
    assert s["failed"] == s["train_failed"] == 0
    assert r.offload_events > 0
    kinds = {op.kind for op in r.ops}
    assert OpKind.OFFLOAD in kinds and OpKind.RELOAD in kinds


# Which policy learns better is decided on the virtual clock (deterministic, load-free):
# tests/engine/test_engine_virtual.py::test_colocated_inference_loss_beats_separate_under_drift
