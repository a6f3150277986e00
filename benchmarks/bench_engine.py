"""Engine overhead: the fraction of a saturated stage worker's wall time spent inside model compute.

A 1-node engine is fed back-to-back training micro-batches (saturation), once on the local
backend; for each op the worker reports `compute_s` (time inside model compute) and the engine
measures the op's wall time from submit to reply. The figure is sum(compute) / sum(op wall time)
per stage; the rest is messaging, copies and scheduling.

    python benchmarks/bench_engine.py [--stages 2] [--seconds 20] [--seq 128] [--batch 4]
"""
from __future__ import annotations

import argparse
import time

from lemix.config import RUN_DEFAULTS, load_config
from lemix.api import engine_profile, run_engine
from lemix.engine.model import load_model
from lemix.metrics import summarize
from lemix.types import Task, TaskKind


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--mode", choices=["train", "infer"], default="train")
    args = ap.parse_args()

    cfg = load_config(None, {"cluster.nodes": 1, "cluster.stages": args.stages, "policy.names": ["lemix"],
                             "workload.duration_s": args.seconds}, RUN_DEFAULTS)
    hf, _, _ = load_model(cfg.model.name)
    t0 = time.perf_counter()
    profile = engine_profile(cfg, hf)
    print(f"quick profile: {time.perf_counter() - t0:.1f} s")
    # enough work, all arriving at t=0, to keep every stage busy for about `seconds`
    per_task = sum(st.fwd.a + st.fwd.b * args.batch * args.seq + st.bwd.a + st.bwd.b * args.batch * args.seq
                   for st in profile.stages) / args.stages
    n = max(8, int(args.seconds / max(per_task, 1e-4)))
    if args.mode == "train":
        tasks = [Task(i, TaskKind.TRAIN, 0.0, args.seq, 0, args.batch) for i in range(n)]
    else:
        tasks = [Task(i, TaskKind.INFER, 0.0, args.seq, 1) for i in range(n)]
    (r,) = run_engine(cfg, profile=profile, tasks=tasks)
    s = summarize(r)
    print(f"{n} {args.mode} tasks of {args.batch} x {args.seq} tokens on 1 node x {args.stages} stages "
          f"(local backend): wall {r.wall_s:.1f} s, failed {s['failed']}")
    print(f"compute fraction of op wall time: {r.extras['compute_fraction']:.3f}")
    busy = 1 - s["idle_ratio"]
    print(f"device busy fraction of the makespan: {busy:.3f} (per stage: "
          f"{', '.join(f'{1 - x:.3f}' for x in s['idle_ratio_per_stage'])})")
    print(f"=> model compute as a fraction of a stage worker's wall time: {busy * r.extras['compute_fraction']:.3f}")


if __name__ == "__main__":
    main()
