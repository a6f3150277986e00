"""Simulator speed: simulated ops/s and events/s, and the wall time of a 100,000-task run.

    python benchmarks/bench_simulator.py [--tasks 100000] [--nodes 64] [--stages 4]
                                         [--policies lemix,luf] [--quick]

A Poisson workload of 4 tasks/s per node (the default scenario's per-node load: 256/s on 64
nodes; half training) with as many seconds of arrivals as it takes to produce `--tasks` tasks.
For each policy: the scheduler + event loop run (workload generation excluded), timed in wall
and in this process's CPU time (other processes on a busy machine inflate wall, not CPU), with
the ops and events it executed and the run's SLO attainment and decision time.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from lemix.config import load_config
from lemix.experiment import build_tasks, sim_profile
from lemix.metrics import summarize
from lemix.sim import simulate_policy

PER_NODE_RATE = 4.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--nodes", type=int, default=64)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--policies", default="lemix,luf")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="10,000 tasks")
    args = ap.parse_args()
    if args.quick:
        args.tasks = 10_000
    rate = PER_NODE_RATE * args.nodes
    # rate/2 requests/s plus as many training tasks (the default share of 0.5): `rate` tasks/s
    cfg = load_config(None, {"cluster.nodes": args.nodes, "cluster.stages": args.stages, "workload.request_rate": rate / 2,
                             "workload.duration_s": args.tasks / rate, "seed": args.seed})
    t0 = time.perf_counter()
    tasks, profile = build_tasks(cfg), sim_profile(cfg)
    print(f"{len(tasks)} tasks on {args.nodes} x {args.stages} at {rate:g}/s "
          f"({args.tasks / rate:.0f} s of arrivals), built in {time.perf_counter() - t0:.1f} s")
    print(f"{'policy':<8} {'wall s':>8} {'cpu s':>8} {'ops':>9} {'events':>9} {'ops/s':>9} {'events/s':>9} "
          f"{'tasks/s':>8} {'SLO':>7} {'dec p50 us':>10} {'dec p99 us':>10}")
    for policy in args.policies.split(","):
        c0, w0 = time.process_time(), time.perf_counter()
        result, sim = simulate_policy(cfg.sched_params(policy), profile, tasks)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        s = summarize(result)
        us = np.asarray(result.decision_us)
        print(f"{policy:<8} {wall:>8.1f} {cpu:>8.1f} {sim.ops_executed:>9} {sim.events_processed:>9} "
              f"{sim.ops_executed / wall:>9.0f} {sim.events_processed / wall:>9.0f} {len(tasks) / wall:>8.0f} "
              f"{s['slo_attainment']:>7.4f} {np.percentile(us, 50):>10.1f} {np.percentile(us, 99):>10.1f}",
              flush=True)


if __name__ == "__main__":
    main()
