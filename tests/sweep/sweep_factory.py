"""Tiny sweep configs: 2 nodes x 2 stages of the built-in 3B profile, a few seconds of arrivals,
so one simulated run takes milliseconds and a whole test grid well under a second."""
from __future__ import annotations

from pathlib import Path

from lemix.config import LemixConfig, load_config

TRACE = str(Path(__file__).resolve().parents[1] / "workload" / "data" / "azure_code_excerpt.csv")
# Host timings: measured, not results; everything else in a row must be reproducible.
HOST_TIMING = {"wall_s", "sched_decision_us_p50", "sched_decision_us_p99"}


def make_cfg(**overrides) -> LemixConfig:
    base = {"policy.names": "lemix,separate", "cluster.nodes": 2, "cluster.stages": 2,
            "workload.request_rate": 2.0, "workload.duration_s": 4.0, "seed": 3}
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, base)


def results_only(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in HOST_TIMING} for r in rows]
