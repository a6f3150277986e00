"""lemix placement-decision time as the cluster grows, at a comparable load per node.

    python benchmarks/bench_scheduler.py [--nodes 4,16,64,256] [--stages 4] [--timer wall|cpu]
                                         [--decisions 3000] [--policy lemix] [--set F=V] [--quick]

For each N: a steady Poisson workload of 4 tasks/s per node (the default scenario's 16/s on 4
nodes; half training), simulated long enough for `--decisions` placements; decisions of the
first 20% of the run (warm-up: queues and timelines filling) are dropped. A decision is one
`policy.place` call, timed around the call by the scheduler's injected timer, and includes the
forecasts and timeline rebuilds it triggers. `--timer cpu` uses this thread's CPU time, which
other processes on a busy machine do not inflate; `wall` is what RunResult.decision_us records.
Prints p50 / p99 / mean in microseconds, forecasts per decision and per-node growth.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from lemix.clock import SimClock
from lemix.config import load_config
from lemix.experiment import build_tasks, sim_profile
from lemix.sched.latency import LatencyModel
from lemix.sched.scheduler import Scheduler
from lemix.sim.simulator import Simulator

PER_NODE_RATE = 4.0   # tasks/s per node, as the default scenario (16/s on 4 nodes)


def bench(nodes: int, stages: int, policy: str, decisions: int, timer, seed: int, sets: dict) -> dict:
    rate = PER_NODE_RATE * nodes
    duration = decisions / rate / 0.8      # the first 20% is warm-up
    # rate/2 requests/s plus as many training tasks (the default share of 0.5): `rate` tasks/s
    cfg = load_config(None, {"cluster.nodes": nodes, "cluster.stages": stages, "workload.request_rate": rate / 2,
                             "workload.duration_s": duration, "policy.names": policy, "seed": seed, **sets})
    tasks, profile = build_tasks(cfg), sim_profile(cfg)
    clock = SimClock()
    sched = Scheduler(cfg.sched_params(policy), profile, clock, timer=timer)
    forecasts = [0]
    real_forecast = sched.view.forecast

    def counted(node, task):
        forecasts[0] += 1
        return real_forecast(node, task)

    sched.view.forecast = counted   # count the forecasts the policy asks for
    sim = Simulator(sched, clock, LatencyModel(profile, calibrate=False), seed=seed)
    wall0 = time.perf_counter()
    result = sim.run(tasks)
    wall = time.perf_counter() - wall0
    us = np.asarray(result.decision_us)
    kept = us[len(us) // 5:]
    return dict(nodes=nodes, tasks=len(tasks), decisions=len(kept), p50=float(np.percentile(kept, 50)),
                p99=float(np.percentile(kept, 99)), mean=float(kept.mean()),
                forecasts=forecasts[0] / max(1, len(us)), wall=wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="4,16,64,256", help="comma list of cluster sizes")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--policy", default="lemix")
    ap.add_argument("--decisions", type=int, default=3000, help="placements measured per size")
    ap.add_argument("--timer", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="config override, e.g. policy.lambda1=2 (repeatable)")
    ap.add_argument("--quick", action="store_true", help="N = 4, 16, 64 and 600 decisions each")
    args = ap.parse_args()
    sets = dict(kv.split("=", 1) for kv in args.set)
    sizes = [int(x) for x in args.nodes.split(",")]
    if args.quick:
        sizes, args.decisions = [n for n in sizes if n <= 64], 600
    timer = time.perf_counter if args.timer == "wall" else time.thread_time
    print(f"{args.policy} decision time, S={args.stages}, {PER_NODE_RATE:g} tasks/s per node, "
          f"timer={args.timer}")
    print(f"{'N':>5} {'tasks':>7} {'decisions':>9} {'p50 us':>9} {'p99 us':>9} {'mean us':>9} "
          f"{'forecasts':>9} {'p50/N us':>9} {'wall s':>7}")
    for n in sizes:
        r = bench(n, args.stages, args.policy, args.decisions, timer, args.seed, sets)
        print(f"{r['nodes']:>5} {r['tasks']:>7} {r['decisions']:>9} {r['p50']:>9.1f} {r['p99']:>9.1f} "
              f"{r['mean']:>9.1f} {r['forecasts']:>9.1f} {r['p50'] / n:>9.2f} {r['wall']:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
