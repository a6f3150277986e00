"""Library API behind `lemix simulate`: config -> workload -> one simulation per policy -> run dir.

The CLI is a thin shell over these functions; a user can call them from Python:

    cfg = load_config(overrides={"policy.names": "all"})
    results = simulate(cfg)
    write_results(cfg, results, Path("runs/x"))
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from lemix.config import LemixConfig
from lemix.sched.latency import Profile, default_profile
from lemix.sim import DEFAULT_NOISE, simulate_policy
from lemix.types import RunResult, Task
from lemix.workload import LengthModel, LognormalLengths, make_tasks, read_trace


def sim_profile(cfg: LemixConfig) -> Profile:
    """The simulator's ground truth: a measured profile (`--profile`) or the built-in default."""
    c = cfg.cluster
    if cfg.model.profile:
        from lemix.profiling import load_profile

        return load_profile(cfg.model.profile, stages=c.stages, force=cfg.model.force_profile,
                            capacity_bytes=int(c.device_memory_gb * 1e9))
    if cfg.model.sim_preset:   # the preset's device memory, unless --device-memory is given
        from lemix.sched.presets import preset_profile

        explicit = "device_memory_gb" in c.model_fields_set
        return preset_profile(cfg.model.sim_preset, stages=c.stages,
                              capacity_bytes=int(c.device_memory_gb * 1e9) if explicit else None,
                              host_bandwidth_Bps=c.host_bandwidth_gbps * 1e9,
                              network_bandwidth_Bps=c.network_bandwidth_gbps * 1e9)
    return default_profile(model=cfg.model.sim_model, stages=c.stages,
                           capacity_bytes=int(c.device_memory_gb * 1e9),
                           host_bandwidth_Bps=c.host_bandwidth_gbps * 1e9,
                           network_bandwidth_Bps=c.network_bandwidth_gbps * 1e9)


def build_tasks(cfg: LemixConfig, length_model: LengthModel | None = None) -> list[Task]:
    """The run's tasks, deterministic for cfg.seed; the same list is given to every policy.

    With a trace, requests keep the trace's own lengths unless `length_model` is given (the real
    engine passes one scaled to its small model).
    """
    w = cfg.workload
    rng = np.random.default_rng(cfg.seed)
    share = w.arrival_train_share
    common = dict(rng=rng, train_batch_size=w.train_batch_size, train_seq_tokens=w.train_seq_tokens,
                  priority_share=w.priority_share)
    if w.arrival == "trace":
        trace = read_trace(w.trace, speedup=w.trace_speedup, duration_s=w.duration_s * w.trace_speedup)
        return make_tasks(arrival="trace", trace=trace, length_model=length_model, train_share=share,
                          train_rate_per_s=w.train_rate, **common)
    lengths = length_model or LognormalLengths(
        prompt_median=min(256, w.max_prompt_tokens), max_prompt=w.max_prompt_tokens,
        output_median=min(64, w.max_output_tokens), max_output=w.max_output_tokens)
    return make_tasks(arrival=w.arrival, duration_s=w.duration_s, burstiness=w.cv2 if w.arrival == "gamma" else 1.0,
                      length_model=lengths, **_arrival_rates(w), **common)


def _arrival_rates(w) -> dict:
    """make_tasks' rate arguments for Poisson/Gamma arrivals (see WorkloadConfig).

    - the deprecated total `rate`: one process at that rate, each arrival training with
      probability train_share (as before the request rate existed);
    - Poisson with a share: one Poisson process at request_rate / (1 - share) split the same way,
      which is the same in distribution as independent Poisson processes of requests at
      request_rate and of training at request_rate x share / (1 - share), and draws what the total
      rate did at the same load;
    - Gamma (burstiness != 1): requests are vllm bench serve's Gamma process at request_rate, and
      training is a Poisson process of its own at train_rate (or the rate the share gives).
    """
    share = w.arrival_train_share
    if w.rate is not None:
        return dict(rate_per_s=w.rate, train_share=share, train_rate_per_s=w.train_rate)
    if share is not None and w.arrival == "poisson":
        return dict(rate_per_s=w.request_rate / (1.0 - share), train_share=share)
    train = w.train_rate if share is None else w.request_rate * share / (1.0 - share)
    return dict(rate_per_s=w.request_rate, train_rate_per_s=train or None)


def sim_horizon_s(cfg: LemixConfig) -> float:
    """Where a simulated (or virtual-clock) run stops waiting for stragglers."""
    return max(cfg.workload.duration_s * 20, cfg.workload.duration_s + 3600)


def simulate(cfg: LemixConfig, *, noise: float = DEFAULT_NOISE,
             progress: Callable[[str, int], Callable[[int], None]] | None = None) -> list[RunResult]:
    """Simulate every policy of cfg.policy.names on the same workload."""
    tasks = build_tasks(cfg)
    profile = sim_profile(cfg)
    results = []
    horizon = sim_horizon_s(cfg)
    for name in cfg.policy.names:
        tick = progress(name, len(tasks)) if progress else None
        result, _ = simulate_policy(cfg.sched_params(name), profile, tasks, noise=noise,
                                    horizon_s=horizon, progress=tick)
        results.append(result)
    return results


def write_results(cfg: LemixConfig, results: list[RunResult], run_dir: Path, title: str) -> list[Path]:
    from lemix.metrics import write_run_dir

    return write_run_dir(run_dir, results, cfg.to_yaml(), title)
