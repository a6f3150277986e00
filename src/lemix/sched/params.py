"""Scheduler parameters as a plain dataclass (the config layer builds it; sched never reads YAML).

These defaults are the only ones: config.PolicyConfig and SLOConfig take theirs from here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedParams:
    policy: str = "lemix"
    nodes: int = 4
    stages: int = 2
    lambda1: float = 2.0    # lemix defaults: chosen by benchmarks/sweep_lemix.py (see policies/lemix.py)
    lambda2: float = 0.5
    tau: float = 0.5
    tau_r: float = 1.0
    t_max_s: float = 0.05
    kappa: float = 0.95
    min_train_share: float = 0.1
    max_defer_s: float = 30.0
    max_batch: int = 8
    max_wait_s: float = 0.0
    pipeline: str = "apipe"
    microbatches: int = 4
    sync_every: int = 8
    average_every: int = 0
    merge_stagger: bool = True        # co-located merges one node at a time (weights.py)
    generate: bool = False
    train_share: float | None = 0.5
    no_profile: bool = False
    calibration_period_s: float = 0.5    # calibration epochs (latency.py): publish at most this often...
    calibration_tolerance: float = 0.1   # ... or when a factor moved more than this (relative)
    no_prioritization: bool = False
    no_memory_check: bool = False
    slo_scale: float = 5.0
    slo_ttft_s: float | None = None   # generate mode: a request must also have TTFT <= this
    slo_e2e_s: float | None = None
    seed: int = 0
    # issue 10 (SLO-safe co-location); each mechanism switchable for the ablation table
    no_chunking: bool = False            # bounded blocking off: one training op per stage
    train_chunk_ms: float | None = None  # chunk bound override (ms); default chunk_frac x tight SLO
    chunk_frac: float = 0.25             # a chunk's predicted time under this x the tightest SLO
    no_lookahead_slack: bool = False     # lookahead holds devices for any inference delay
    eq4_inference_only: bool = False     # Eq. 4 forecasts queued inference only (the paper's)
    no_late_binding: bool = False        # place training at arrival, not when a node has room
    train_queue_depth: int = 1           # late binding: placed training tasks waiting per node
    train_backlog: bool = False          # training data always waiting (backlog.py)
    backlog_batch: int = 4               # ... the drawn micro-batches' samples
    backlog_tokens: int = 512            # ... and tokens per sample
    backlog_until_s: float = float("inf")   # ... drawn until this time
    # issue 10, second round (slo-rest); each switchable
    backlog_floor: bool = False          # both backlogged: training's floor is separation's share
    no_slo_batching: bool = False        # lemix: a request joins a prefill batch even if someone misses by it
    chunk_quiet_s: float | None = 10.0   # unchunked training once no request arrived this long (None: always chunk)
    # issue 10, third round (overload)
    no_solo_training: bool = False       # lemix: a node without inference still orders training inference-first
    # issue 10, host contention (contention.py): devices sharing a host's cores slow each other
    shared_host: bool = False            # set by the executor: the devices share one host's CPUs (wall clock, cpu)
    no_host_gate: bool = False           # lemix: training ops not capped to the host's contention-free concurrency
    host_slowdown: float = 1.5           # a learned inference slowdown above this closes a training slot
    # issue 10, third round (adaptive-chunks)
    adaptive_chunks: bool = True         # merge chunks into one op while a node serves nothing (chunking.py)
    step_first: bool = False             # lemix: a due optimizer step goes before inference waiting on its device
    no_lookahead_queued: bool = False    # lemix: the lookahead ignores inference queued behind training on the stage before
