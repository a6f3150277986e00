"""Library API behind `lemix run`: config -> model, texts, tasks, profile -> one engine run per
policy on the same workload and the same initial weights."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

from lemix.config import RUN_DEFAULTS, ConfigError, LemixConfig  # noqa: F401  (re-exported)
from lemix.engine.adapt import spec_from_config
from lemix.engine.backends import make_backend
from lemix.engine.data import TaskTexts
from lemix.engine.model import load_model, split_stages
from lemix.engine.runtime import Engine
from lemix.sched.latency import Profile
from lemix.types import RunResult, Task
from lemix.workload import (DatasetSource, LognormalLengths, TextSource, TopicDrift, builtin_corpus,
                            load_jsonl, shift_times_s)

def set_threads_per_worker(workers: int) -> None:
    """Split the cores between concurrently busy stage workers (oversubscribed intra-op threads
    make CPU timings meaningless)."""
    import os

    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))


def stage_devices(cfg: LemixConfig) -> list[str]:
    """One device per stage: 'cpu', 'cuda' (cuda:0..k round-robin) or an explicit comma list.

    A device this machine does not have is a ConfigError naming the field and what it has."""
    spec, S = cfg.cluster.device, cfg.cluster.stages
    if spec == "cpu":
        return ["cpu"] * S
    devices = [d.strip() for d in spec.split(",")]
    import torch

    k = torch.cuda.device_count()
    have = "cpu" + (f", cuda, cuda:0..cuda:{k - 1}" if k else "")
    if spec == "cuda":
        if k == 0:
            raise ConfigError(f"invalid config: cluster.device: 'cuda' but torch sees no CUDA device on this "
                              f"machine; allowed here: {have}")
        return [f"cuda:{s % k}" for s in range(S)]
    if len(devices) != S:
        raise ConfigError(f"invalid config: cluster.device lists {len(devices)} devices for {S} stages")
    for d in devices:
        if d.startswith("cuda:") and int(d.split(":")[1]) >= k:
            raise ConfigError(f"invalid config: cluster.device: {d} is not on this machine ({k} CUDA "
                              f"devices); allowed here: {have}")
    return devices


def engine_tasks(cfg: LemixConfig) -> list[Task]:
    """The workload with lengths scaled to the real (small) model."""
    from lemix.experiment import build_tasks

    w = cfg.workload
    lengths = LognormalLengths(prompt_median=min(64, w.max_prompt_tokens), max_prompt=w.max_prompt_tokens,
                               output_median=min(16, w.max_output_tokens), max_output=w.max_output_tokens,
                               min_prompt=min(8, w.max_prompt_tokens))
    return build_tasks(cfg, length_model=lengths)


def text_source(cfg: LemixConfig) -> TextSource:
    """A fresh source (a dataset source keeps a read position: one per run)."""
    if cfg.workload.dataset:
        return DatasetSource(load_jsonl(cfg.workload.dataset), duration_s=cfg.workload.duration_s)
    return TopicDrift(builtin_corpus(), cfg.workload.drift_groups, duration_s=cfg.workload.duration_s,
                      rng=np.random.default_rng(cfg.seed))


def engine_profile(cfg: LemixConfig, hf_model, progress: Callable[[int], None] | None = None) -> Profile:
    """The profile the scheduler predicts with: `--profile FILE`, else a quick measurement of
    this model on these devices (a few seconds), calibrated online during the run."""
    from lemix.profiling import load_profile, measure_profile
    from lemix.engine.worker import StageWorker

    capacity = int(cfg.cluster.device_memory_gb * 1e9)
    if cfg.model.profile:
        return load_profile(cfg.model.profile, stages=cfg.cluster.stages, force=cfg.model.force_profile,
                            capacity_bytes=capacity, model=cfg.model.name, device=cfg.cluster.device)
    devices = stage_devices(cfg)
    set_threads_per_worker(cfg.cluster.stages)
    workers = [StageWorker(m, s, cfg.cluster.stages, devices[s], lr=cfg.model.lr)
               for s, m in enumerate(split_stages(hf_model, cfg.cluster.stages))]
    profile, _ = measure_profile(workers, model_name=cfg.model.name, device=cfg.cluster.device, quick=True,
                                 capacity_bytes=capacity, progress=progress, seed=cfg.seed)
    return profile


def run_engine(cfg: LemixConfig, *, progress: Callable[[str, int], Callable[[int], None]] | None = None,
               profile: Profile | None = None, tasks: list[Task] | None = None) -> list[RunResult]:
    """Run every policy of cfg.policy.names on the real engine, same tasks, same initial weights.

    cluster.clock 'wall': ops run in real time, timed by a profile measured here (or --profile).
    'virtual': the simulator's loop, tasks and profile (the modeled GPU of --sim-model, or
    --profile) decide when each op runs, exactly as `lemix simulate`; the ops are computed for real.
    """
    import time

    from lemix.clock import SimClock
    from lemix.engine.virtual import VirtualEngine
    from lemix.experiment import build_tasks, sim_horizon_s, sim_profile

    virtual = cfg.cluster.clock == "virtual"
    hf_model, tokenizer, _ = load_model(cfg.model.name, seed=cfg.seed, tokenizer=cfg.model.tokenizer,
                                        byte_tokenizer=cfg.model.byte_tokenizer,
                                        adapt=spec_from_config(cfg.model))
    if tasks is None:
        tasks = build_tasks(cfg) if virtual else engine_tasks(cfg)
    profile = profile or (sim_profile(cfg) if virtual else engine_profile(cfg, hf_model))
    results = []
    for name in cfg.policy.names:
        source = text_source(cfg)
        texts = TaskTexts(tokenizer, source, seed=cfg.seed)
        backend = make_backend(cfg.cluster.backend, **({"address": cfg.cluster.ray_address}
                                                       if cfg.cluster.backend == "ray" else {}))
        # on the wall clock on CPUs the devices share this host's cores (sched/contention.py)
        params = replace(cfg.sched_params(name), shared_host=cfg.shared_host)
        engine = Engine(params, profile, hf_model, tokenizer, texts, backend,
                        devices=stage_devices(cfg), lr=cfg.model.lr, weight_decay=cfg.model.weight_decay,
                        memory_budget_bytes=int(cfg.cluster.device_memory_gb * 1e9),
                        clock=SimClock() if virtual else None, ignore_eos=cfg.workload.ignore_eos)
        tick = progress(name, len(tasks)) if progress else None
        t0 = time.perf_counter()
        if virtual:
            result = VirtualEngine(engine, profile).run(tasks, progress=tick, horizon_s=sim_horizon_s(cfg))
        else:
            result = engine.run(tasks, progress=tick, horizon_s=cfg.workload.duration_s * 10 + 60)
        result.wall_s = time.perf_counter() - t0
        result.extras["drift_shifts_s"] = list(shift_times_s(source))
        results.append(result)
    return results
