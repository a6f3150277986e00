"""Where a simulated run's time goes: placement vs the rest of the loop, and a profile of either.

    python benchmarks/profile_scheduler.py [--nodes 4] [--stages 4] [--tasks 4000] [--policy lemix]
                                           [--place-only] [--profiler pyinstrument|cprofile|none]

The scenario of bench_simulator.py (4 tasks/s per node, half training). Runs it twice: first
unprofiled, printing the CPU time per simulated op split into placement (`Placement.place`: the
policy's decisions, their forecasts and timeline rebuilds) and the rest (event loop, dispatch,
finishing ops); then under the profiler, of the whole run or, with --place-only, of what runs
inside the policy's `place` only. pyinstrument
(a sampling profiler, the default) shows the call tree; cprofile the top functions by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from lemix.config import load_config
from lemix.experiment import build_tasks, sim_profile
from lemix.sched.placement import Placement
import lemix.sched.policies  # noqa: F401  (registers the built-in policies)
from lemix.sched.registry import registered
from lemix.sim import simulate_policy

PER_NODE_RATE = 4.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=4000)
    ap.add_argument("--policy", default="lemix")
    ap.add_argument("--place-only", action="store_true", help="profile only inside the policy's place()")
    ap.add_argument("--profiler", choices=("pyinstrument", "cprofile", "none"), default="pyinstrument")
    args = ap.parse_args()
    rate = PER_NODE_RATE * args.nodes
    cfg = load_config(None, {"cluster.nodes": args.nodes, "cluster.stages": args.stages,
                             "workload.request_rate": rate / 2, "workload.duration_s": args.tasks / rate,
                             "policy.names": args.policy, "seed": 0})
    tasks, profile = build_tasks(cfg), sim_profile(cfg)

    if args.profiler == "pyinstrument":
        from pyinstrument import Profiler
        prof = Profiler()
        start, stop = prof.start, prof.stop
    elif args.profiler == "cprofile":
        prof = cProfile.Profile()
        start, stop = prof.enable, prof.disable
    else:
        prof, start, stop = None, (lambda: None), (lambda: None)

    placing = [0.0]
    real_place = Placement.place
    policy_cls = registered()[args.policy]
    real_policy_place = policy_cls.place

    def timed_place(self, now, view):   # placement's share of the run's CPU time
        t0 = time.thread_time()
        try:
            return real_place(self, now, view)
        finally:
            placing[0] += time.thread_time() - t0

    def profiled_policy_place(self, task, view, force=False):
        start()
        try:
            return real_policy_place(self, task, view, force)
        finally:
            stop()

    # 1: the split, unprofiled (the timer around each plan's placement adds ~1 us per plan)
    Placement.place = timed_place
    try:
        c0 = time.thread_time()
        _, sim = simulate_policy(cfg.sched_params(args.policy), profile, tasks)
        cpu = time.thread_time() - c0
    finally:
        Placement.place = real_place
    n = max(1, sim.ops_executed)
    print(f"{args.policy} on {args.nodes} x {args.stages}, {len(tasks)} tasks, {sim.ops_executed} ops: "
          f"{cpu:.2f} CPU s = {cpu / n * 1e6:.1f} us/op; placement {placing[0] / n * 1e6:.1f} us/op, "
          f"the rest {(cpu - placing[0]) / n * 1e6:.1f} us/op")
    if prof is None:
        return
    # 2: the same run again under the profiler (the whole run, or the policy's place only)
    if args.place_only:
        policy_cls.place = profiled_policy_place
    try:
        if not args.place_only:
            start()
        simulate_policy(cfg.sched_params(args.policy), profile, tasks)
        if not args.place_only:
            stop()
    finally:
        policy_cls.place = real_policy_place
    if args.profiler == "pyinstrument":
        print(prof.output_text(unicode=False, color=False, show_all=False))
    elif args.profiler == "cprofile":
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
