"""The default scenario's comparison table, over several seeds.

    python benchmarks/default_table.py [--seeds 0,1,2] [--policy all] [--quick]

Runs what

    lemix simulate --policy all --nodes 4 --stages 2 --request-rate 8 --train-share 0.5 --duration 120

runs, once per seed (`--seed N`), and prints per policy the mean +- std over seeds of SLO
attainment, request throughput, training samples/s and p99 end-to-end latency. One seed moves
SLO attainment by about 1%: compare policies on these means, not on one run.
"""
from __future__ import annotations

import argparse

import numpy as np

from lemix.config import load_config
from lemix.experiment import simulate
from lemix.metrics import summarize

COLUMNS = (("slo_attainment", "SLO attainment", "{:.4f}"), ("request_throughput", "req/s", "{:.3f}"),
           ("train_samples_per_s", "train samples/s", "{:.2f}"), ("p99_e2el_ms", "p99 E2E ms", "{:.0f}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--policy", default="all", help="as lemix simulate --policy")
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--quick", action="store_true", help="30 s of arrivals, seeds 0 and 1")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.seeds = 30.0, "0,1"
    seeds = [int(x) for x in args.seeds.split(",")]
    per_policy: dict[str, list[dict]] = {}
    for seed in seeds:
        cfg = load_config(None, {"policy.names": args.policy, "cluster.nodes": 4, "cluster.stages": 2,
                                 "workload.request_rate": 8, "workload.train_share": 0.5,
                                 "workload.duration_s": args.duration, "seed": seed})
        for result in simulate(cfg):
            per_policy.setdefault(result.policy, []).append(summarize(result))
        print(f"seed {seed} done", flush=True)
    print(f"lemix simulate --policy {args.policy} --nodes 4 --stages 2 --request-rate 8 --train-share 0.5 "
          f"--duration {args.duration:g}; seeds {args.seeds}; mean +- std over seeds")
    print(f"{'policy':<26}" + "".join(f"{title:>22}" for _, title, _ in COLUMNS))
    for policy, runs in per_policy.items():
        cells = []
        for key, _, fmt in COLUMNS:
            vals = np.array([r[key] for r in runs if r[key] is not None], dtype=float)
            cells.append(f"{fmt.format(vals.mean())} +- {fmt.format(vals.std())}" if len(vals) else "-")
        print(f"{policy:<26}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
