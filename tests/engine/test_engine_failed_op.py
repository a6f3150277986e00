"""A training op that fails on one stage (non-strict, as `lemix serve` runs): the micro-batch's
state is released on every stage, its task is trained again, and the engine keeps running.

The failure is real: the stage worker's own backward raises (once) inside the worker thread,
exactly where an exception of the model code would surface."""
from __future__ import annotations

import threading

from lemix.config import RUN_DEFAULTS, load_config
from lemix.api import stage_devices, text_source
from lemix.engine.backends import make_backend
from lemix.engine.data import TaskTexts
from lemix.engine.model import load_model
from lemix.engine.runtime import Engine
from lemix.engine.worker import StageWorker
from lemix.sched.latency import OpCoeffs, Profile, StageProfile
from lemix.types import EventKind, Task, TaskKind


def cpu_profile(stages: int) -> Profile:
    st = StageProfile(fwd=OpCoeffs(1e-3, 2e-6, 0.0), bwd=OpCoeffs(2e-3, 4e-6, 0.0),
                      decode=OpCoeffs(1e-3, 1e-4, 1e-7), optim=OpCoeffs(3e-3),
                      weight_bytes=1_300_000, train_state_bytes=3_900_000, act_bytes_per_token=22_000,
                      tmp_bytes_per_token=12_000, kv_bytes_per_token=1024)
    return Profile("builtin-tiny", "cpu", "float32", (st,) * stages, capacity_bytes=10**9,
                   host_bandwidth_Bps=2e9, network_bandwidth_Bps=2e9)


def make_engine(policy: str, backend) -> Engine:
    """1 node x 2 stages of the built-in tiny model, non-strict (as `lemix serve` runs it)."""
    base = dict(RUN_DEFAULTS)
    base.update({"cluster.nodes": 1, "cluster.stages": 2, "policy.names": policy})
    cfg = load_config(None, {}, base)
    hf_model, tok, _ = load_model(cfg.model.name, seed=cfg.seed)
    texts = TaskTexts(tok, text_source(cfg), seed=cfg.seed)
    return Engine(cfg.sched_params(policy), cpu_profile(2), hf_model, tok, texts, backend,
                  devices=stage_devices(cfg), lr=cfg.model.lr, strict=False)


def fail_once(monkeypatch, method: str, stage: int) -> list[int]:
    """Make StageWorker.<method> raise the first time it runs on `stage`; returns the batch ids hit."""
    original = getattr(StageWorker, method)
    hit: list[int] = []
    lock = threading.Lock()

    def flaky(self, cmd):
        with lock:
            first = self.stage_index == stage and not hit
            if first:
                hit.append(cmd.batch_id)
        if first:
            raise RuntimeError(f"injected {method} failure on stage {stage}")
        return original(self, cmd)

    monkeypatch.setattr(StageWorker, method, flaky)
    return hit


def train_tasks(n: int, tokens: int = 24, batch: int = 2) -> list[Task]:
    return [Task(i, TaskKind.TRAIN, 0.01 * i, tokens, batch_size=batch) for i in range(n)]


def run_failing(monkeypatch, method: str, stage: int, policy: str = "lemix"):
    hit = fail_once(monkeypatch, method, stage)
    engine = make_engine(policy, make_backend("local"))
    tasks = train_tasks(4) + [Task(10, TaskKind.INFER, 0.5, 16)]
    result = engine.run(tasks)
    return result, hit


def test_failed_backward_on_last_stage_is_trained_again_and_the_engine_keeps_running(monkeypatch):
    result, hit = run_failing(monkeypatch, "_backward", stage=1)
    assert len(hit) == 1
    done = sorted(t.task_id for t in result.train_tasks if not t.failed)
    assert done == [0, 1, 2, 3], result.train_tasks           # every task trained, the failed one again
    assert [r.task_id for r in result.requests if r.finish_s is not None] == [10]
    retried = [e for e in result.events if e.kind is EventKind.TASK_RETRIED]
    assert len(retried) == 1 and "injected _backward failure" in retried[0].error
    assert not [e for e in result.events if e.kind is EventKind.TASK_FAILED]
    # every stage stepped every micro-batch it trained: the stash on stage 0 was released, so
    # the optimizer step there did not refuse to run
    assert sum(s.samples for s in result.train_steps) == 4 * 2


def test_failed_forward_on_first_stage_is_trained_again(monkeypatch):
    result, hit = run_failing(monkeypatch, "_forward", stage=1, policy="naivemix")
    assert len(hit) == 1
    assert sorted(t.task_id for t in result.train_tasks if not t.failed) == [0, 1, 2, 3]
