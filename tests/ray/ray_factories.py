"""Factory helpers for the Ray tests: a hand-built CPU profile and short engine configs."""
from __future__ import annotations

from lemix.config import RUN_DEFAULTS, load_config
from lemix.sched.latency import OpCoeffs, Profile, StageProfile


def cpu_profile(stages: int, capacity_bytes: int = 10**9) -> Profile:
    """Coefficients of the order the built-in tiny model shows on one CPU core, and its memory."""
    st = StageProfile(fwd=OpCoeffs(1e-3, 2e-6, 0.0), bwd=OpCoeffs(2e-3, 4e-6, 0.0),
                      decode=OpCoeffs(1e-3, 1e-4, 1e-7), optim=OpCoeffs(3e-3),
                      weight_bytes=1_300_000, train_state_bytes=3_900_000, act_bytes_per_token=22_000,
                      tmp_bytes_per_token=12_000, kv_bytes_per_token=1024)
    return Profile("builtin-tiny", "cpu", "float32", (st,) * stages, capacity_bytes=capacity_bytes,
                   host_bandwidth_Bps=2e9, network_bandwidth_Bps=2e9)


def run_cfg(**overrides):
    """A short real run: 2 nodes x 1 stage, a few seconds of arrivals, small shapes."""
    base = dict(RUN_DEFAULTS)
    base.update({"cluster.nodes": 2, "cluster.stages": 1, "workload.duration_s": 3.0, "workload.request_rate": 2.5,
                 "workload.max_prompt_tokens": 64, "workload.train_seq_tokens": 32,
                 "workload.train_batch_size": 2, "workload.max_output_tokens": 8,
                 "policy.names": "lemix,separate"})
    return load_config(None, overrides, base)


def make_engine(cfg, backend, policy: str = "lemix", profile: Profile | None = None):
    """An Engine for `cfg` on `backend` (built-in tiny model, texts from the config's source)."""
    from lemix.api import stage_devices, text_source
    from lemix.engine.data import TaskTexts
    from lemix.engine.model import load_model
    from lemix.engine.runtime import Engine

    hf_model, tok, _ = load_model(cfg.model.name, seed=cfg.seed)
    texts = TaskTexts(tok, text_source(cfg), seed=cfg.seed)
    return Engine(cfg.sched_params(policy), profile or cpu_profile(cfg.cluster.stages), hf_model, tok, texts,
                  backend, devices=stage_devices(cfg), lr=cfg.model.lr,
                  memory_budget_bytes=int(cfg.cluster.device_memory_gb * 1e9))
