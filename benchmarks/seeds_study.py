"""SLO attainment and training throughput over seeds: does a behaviour change move them?

    python benchmarks/seeds_study.py [--seeds 0-5] [--scenarios trace,generate,gen4x4,default]
                                     [--set policy.calibration_period_s=0] [--json out.json]

Each scenario is simulated once per seed and policy; prints the mean and standard error of SLO
attainment and the mean training tokens/s. Run it on the code before and after a change (or with
`--set` on one of them) and compare. The scenarios are check_identical.py's default table, its
generate mode (also at 4 x 4) and the Azure code trace at 2.5x when `../shared/traces/` is there.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from check_identical import DEFAULT, TRACE

from lemix.config import load_config
from lemix.experiment import build_tasks, sim_horizon_s, sim_profile
from lemix.metrics import summarize
from lemix.sim import simulate_policy

_NO_RATE = {k: v for k, v in DEFAULT.items() if k != "workload.rate"}   # a trace brings its arrivals
SCENARIOS = {
    "trace": ({**_NO_RATE, "workload.trace": str(TRACE), "workload.trace_speedup": 2.5,
               "workload.duration_s": 300}, "lemix,separate"),
    "generate": ({**DEFAULT, "workload.duration_s": 60, "workload.mode": "generate"}, "lemix,separate"),
    "gen4x4": ({**DEFAULT, "cluster.stages": 4, "workload.duration_s": 60, "workload.mode": "generate"},
               "lemix,separate"),
    "default": (dict(DEFAULT), "lemix,separate,luf"),
}


def seed_range(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0-5", help="a seed or a range, e.g. 0-5")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of " + ", ".join(SCENARIOS))
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override (repeatable)")
    ap.add_argument("--json", type=Path, help="also write every run's figures here")
    args = ap.parse_args()
    sets = dict(kv.split("=", 1) for kv in args.set)
    runs: dict[str, list[tuple[float, float]]] = {}
    for name in args.scenarios.split(","):
        if name == "trace" and not TRACE.exists():
            print("trace: skipped (no ../shared/traces/)")
            continue
        base, policies = SCENARIOS[name]
        for seed in seed_range(args.seeds):
            cfg = load_config(None, {**base, "policy.names": policies, "seed": seed, **sets})
            tasks, profile = build_tasks(cfg), sim_profile(cfg)
            for policy in cfg.policy.names:
                result, _ = simulate_policy(cfg.sched_params(policy), profile, tasks, horizon_s=sim_horizon_s(cfg))
                s = summarize(result)
                runs.setdefault(f"{name}/{policy}", []).append((s["slo_attainment"], s["train_tokens_per_s"]))
    for key, got in runs.items():
        slo = [a for a, _ in got]
        se = statistics.stdev(slo) / len(slo) ** 0.5 if len(slo) > 1 else float("nan")
        print(f"{key:24s} SLO {statistics.mean(slo):.4f} +- {se:.4f}  train tok/s "
              f"{statistics.mean(b for _, b in got):.0f}  ({len(got)} seeds)")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
